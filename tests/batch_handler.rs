//! Batch handlers (`idem::BatchHandler`, `#[idem::handler(…, batch)]`) on both ledgers: the
//! claimed messages of a group in one call, and every message still gets exactly the outcome
//! it would get alone.
//!
//! - A poison message among 64 costs about 2·log2(64) extra calls: the batch is split until it
//!   is alone, where it is rejected with its own error; the other 63 apply once.
//! - A message that always fails transiently, or makes the handler panic, ends alone too and
//!   is retried there (its attempt counts); nothing of it stays.
//! - The handler never sees a message whose key the ledger holds (a duplicate, a key reused
//!   for another payload, a second copy inside the batch).
//! - What the handler publishes for a message (`BatchTx::publish_for`) has the ids that
//!   message gets when it is handled alone, whichever batch it ended up in.
//! - On real RabbitMQ: a consumer in group mode with a batch handler applies each payment
//!   once, skips the copies and dead-letters the poison with its reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::transport::{process, Outcome};
use idem::{async_trait, Batch, BatchHandler, BatchTx, HandlerError, Reason};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

on_both_backends!(
    a_poison_message_is_found_by_splitting_and_the_rest_apply_once,
    a_message_that_keeps_failing_or_panicking_ends_alone_and_is_retried_there,
    the_handler_only_ever_sees_first_time_messages,
    each_message_publishes_the_ids_it_has_alone,
    a_batch_consumer_applies_each_payment_once_and_dead_letters_the_poison,
);

/// What a recorded transfer announces.
#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "test.transfer-recorded")]
struct Recorded {
    id: Uuid,
}

/// A transfer handler for whole batches, with instruments: the size of every call; the whole
/// batch fails (permanently) when it holds a frozen transfer, transiently when it holds one on
/// `acct-unlucky`, and panics when it holds one on `acct-panicky`.
struct Ledgers<DB> {
    consumer: String,
    calls: Arc<Mutex<Vec<usize>>>,
    /// Whether each transfer announces itself (through the outbox, which no relay drains here).
    announce: bool,
    _db: std::marker::PhantomData<fn() -> DB>,
}

impl<DB> Ledgers<DB> {
    fn new(consumer: &str) -> Batch<Self> {
        Batch(Self {
            consumer: consumer.to_owned(),
            calls: Arc::default(),
            announce: false,
            _db: Default::default(),
        })
    }
}

#[async_trait]
impl<DB: TestDb> BatchHandler<DB> for Ledgers<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle_batch(
        &self,
        tx: &mut BatchTx<'_, DB>,
        transfers: Vec<Transfer>,
    ) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(transfers.len());
        for (i, transfer) in transfers.iter().enumerate() {
            DB::insert_effect(tx.conn(), &self.consumer, transfer).await?;
            if self.announce {
                tx.publish_for(i, &Recorded { id: transfer.id }).await?;
            }
        }
        if let Some(frozen) = transfers.iter().find(|t| t.fail) {
            return Err(HandlerError::permanent(format!(
                "account {} is frozen",
                frozen.account
            )));
        }
        if transfers.iter().any(|t| t.account == "acct-unlucky") {
            return Err("the unlucky account's row is locked".into());
        }
        assert!(
            !transfers.iter().any(|t| t.account == "acct-panicky"),
            "an impossible state"
        );
        Ok(())
    }
}

async fn a_poison_message_is_found_by_splitting_and_the_rest_apply_once<DB: TestDb>() {
    let story = Story::<DB>::begin("batch-poison").await;
    let handler = Ledgers::<DB>::new(&story.consumer);
    let ids: Vec<Uuid> = (0..64).map(|_| Uuid::new_v4()).collect();
    let transfers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            (
                *id,
                if n == 37 { "acct-frozen" } else { "acct-b1" },
                5,
                n == 37,
            )
        })
        .collect();
    let arrivals = Arrivals::of(&transfers);

    let processed = arrivals.in_one_group(&story.pool, &handler).await;

    for (n, (id, p)) in ids.iter().zip(&processed).enumerate() {
        if n == 37 {
            match &p.outcome {
                Outcome::DeadLetter { reason, error } => {
                    assert_eq!(*reason, Reason::Rejected);
                    assert!(error.contains("acct-frozen is frozen"), "{error}");
                }
                other => panic!("the frozen transfer: {other:?}"),
            }
            assert_eq!(story.effects(id).await, 0);
        } else {
            assert_eq!(p.outcome, Outcome::Applied, "transfer {n}");
            assert_eq!(story.effects(id).await, 1, "transfer {n}");
        }
    }
    let calls = handler.0.calls.lock().unwrap().clone();
    assert_eq!(
        calls[0], 64,
        "one call for the whole batch first: {calls:?}"
    );
    // Each halving commits the half without the poison and splits the other: 1 + 2·log2(64).
    assert!(calls.len() <= 13, "{} calls: {calls:?}", calls.len());
    assert_eq!(calls.iter().filter(|&&n| n == 1).count(), 2, "{calls:?}");
}

async fn a_message_that_keeps_failing_or_panicking_ends_alone_and_is_retried_there<DB: TestDb>() {
    let story = Story::<DB>::begin("batch-unlucky").await;
    let handler = Ledgers::<DB>::new(&story.consumer);
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let account = |n: usize| match n {
        3 => "acct-unlucky",
        15 => "acct-panicky",
        _ => "acct-b2",
    };
    let transfers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (*id, account(n), 2, false))
        .collect();
    let arrivals = Arrivals::of(&transfers);

    let processed = arrivals.in_one_group(&story.pool, &handler).await;

    for (n, (id, p)) in ids.iter().zip(&processed).enumerate() {
        match n {
            3 | 15 => {
                match &p.outcome {
                    Outcome::Retry {
                        attempts, error, ..
                    } => {
                        assert_eq!(*attempts, 1, "attempt 1 of 4 failed: {error}");
                        let expected = if n == 3 {
                            "is locked"
                        } else {
                            "impossible state"
                        };
                        assert!(error.contains(expected), "{error}");
                    }
                    other => panic!("transfer {n}: {other:?}"),
                }
                assert_eq!(story.effects(id).await, 0, "transfer {n}");
            }
            _ => {
                assert_eq!(p.outcome, Outcome::Applied, "transfer {n}");
                assert_eq!(story.effects(id).await, 1, "transfer {n}");
            }
        }
    }
}

async fn the_handler_only_ever_sees_first_time_messages<DB: TestDb>() {
    let story = Story::<DB>::begin("batch-dupes").await;
    let handler = Ledgers::<DB>::new(&story.consumer);
    let keys = KeysStory::new("acct-b3");
    let before = keys.before();
    let first = before.in_one_group(&story.pool, &handler).await;
    assert!(first.iter().all(|p| p.outcome == Outcome::Applied));
    handler.0.calls.lock().unwrap().clear();

    let arrivals = keys.group();
    let processed = arrivals.in_one_group(&story.pool, &handler).await;
    KeysStory::assert_outcomes(&processed);
    assert_eq!(
        *handler.0.calls.lock().unwrap(),
        vec![2],
        "one call, with the two first-time messages only"
    );
    for id in keys.keys() {
        assert_eq!(story.effects(&id).await, 1, "{id}");
    }
}

/// The message ids of what was published for `keys`, as `(key, message id)`.
async fn published<DB: TestDb>(pool: &sqlx::Pool<DB>, keys: &[Uuid]) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for key in keys {
        let ids = DB::outbox_ids(pool, &key.to_string()).await;
        rows.extend(ids.into_iter().map(|id| (key.to_string(), id)));
    }
    rows
}

async fn each_message_publishes_the_ids_it_has_alone<DB: TestDb>() {
    let story = Story::<DB>::begin("batch-ids").await;
    let mut handler = Ledgers::<DB>::new(&story.consumer);
    handler.0.announce = true;
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    // A poison message, so the batch is split and its messages commit in smaller batches.
    let transfers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            (
                *id,
                if n == 5 { "acct-frozen" } else { "acct-b4" },
                4,
                n == 5,
            )
        })
        .collect();
    let arrivals = Arrivals::of(&transfers);
    arrivals.in_one_group(&story.pool, &handler).await;
    let in_batches = published(&story.pool, &ids).await;
    assert_eq!(
        in_batches.len(),
        11,
        "one announcement per applied transfer"
    );

    // The same transfers, one at a time, by the same consumer, in another database.
    let elsewhere = if DB::NAME == "PostgreSQL" {
        let url = fresh_pg_database(&format!(
            "idem_batch_ids_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        ))
        .await;
        let pool = DB::connect(&url, 4).await.unwrap();
        DB::migrate(&pool).await.unwrap();
        DB::create_effects(&pool).await;
        pool
    } else {
        DB::pool().await
    };
    for delivery in arrivals.deliveries() {
        process(&elsewhere, &handler, delivery, &fast_policy()).await;
    }
    let alone = published(&elsewhere, &ids).await;
    assert_eq!(
        in_batches, alone,
        "the same message ids whichever batch a message landed in"
    );
    elsewhere.close().await;
    // No relay drains the shared test database's outbox: leave nothing pending in it.
    DB::forget_outbox(
        &story.pool,
        &ids.iter().map(Uuid::to_string).collect::<Vec<_>>(),
    )
    .await;
}

async fn a_batch_consumer_applies_each_payment_once_and_dead_letters_the_poison<DB: TestDb>() {
    let story = Story::<DB>::begin("batch-consumer").await;
    story.declare().await;
    let ids: Vec<Uuid> = (0..90).map(|_| Uuid::new_v4()).collect();
    // Published before the consumer starts, so its batches fill up; copies back to back.
    for (n, id) in ids.iter().enumerate() {
        let frozen = n == 44;
        let body = serde_json::to_vec(&serde_json::json!({
            "id": id, "account": if frozen { "acct-frozen" } else { "acct-b5" },
            "amount": 10, "fail": frozen,
        }))
        .unwrap();
        story.publish(&body, Some(&id.to_string())).await;
        if n % 3 == 0 {
            story.publish(&body, Some(&id.to_string())).await;
        }
        if n % 30 == 0 {
            story.publish(b"{\"id\": 1", None).await;
        }
    }
    let handler = Ledgers::<DB>::new(&story.consumer);
    let calls = Arc::clone(&handler.0.calls);
    let running = story
        .run_with(handler, |b| {
            b.group_commit(30, Duration::from_millis(20)).concurrency(3)
        })
        .await;
    running
        .wait_until("every payment, copy and bad message is settled", |s| {
            s.applied == 89 && s.duplicates == 30 && s.dead_lettered == 4
        })
        .await;
    let stats = running.stop().await;
    assert_eq!(stats.retried, 0, "{stats:?}");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(story.effects(id).await, i64::from(n != 44), "payment {n}");
    }
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 4);
    let rejected: Vec<_> = letters
        .iter()
        .filter(|l| l.reason() == "rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "the frozen payment");
    assert!(rejected[0].headers["x-idem-error"].contains("acct-frozen is frozen"));
    assert_eq!(
        letters.iter().filter(|l| l.reason() == "malformed").count(),
        3
    );
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().any(|&n| n > 1),
        "the handler got whole batches: {calls:?}"
    );
    story.end().await;
}
