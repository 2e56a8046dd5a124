//! Group commit's unit of work (`idem::transport::process_group`), on both ledgers: many
//! deliveries in one transaction, and every one of them still gets exactly the outcome it
//! would get alone. (The consumer's group mode, which collects the deliveries, builds on this.)
//!
//! - Twenty payments commit together (on PostgreSQL: in one transaction, the same txid).
//! - A payment to a frozen account among them is rejected alone; the others apply.
//! - A handler that fails transiently costs the group a re-run without that message, which is
//!   retried exactly as alone (its attempt counts); one that panics runs again alone at once.
//!   Nothing of either stays in the group's commit.
//! - A key already in the ledger is a duplicate, with another payload a key conflict; a second
//!   copy inside the group is a duplicate of the first, never a second effect.
//! - A handler that ignores a failed statement (PostgreSQL aborts the transaction) cannot be
//!   pinned on anyone at COMMIT: every message runs alone, and only the guilty one fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::transport::Outcome;
use idem::{async_trait, Handler, HandlerError, Reason, Tx};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

on_both_backends!(
    a_group_commits_together_and_each_message_keeps_its_own_outcome,
    a_failing_or_panicking_message_is_taken_out_and_the_rest_commit,
    duplicates_conflicts_and_copies_inside_a_group_apply_once,
    a_handler_that_hides_a_failed_statement_fails_alone,
);

/// A payout handler with instruments: it records the transaction it ran in, rejects frozen
/// accounts, fails transiently or panics on given accounts a given number of times, and on
/// `acct-sloppy` runs a statement that fails and carries on as if it had not.
struct Payouts<DB> {
    consumer: String,
    txids: Arc<Mutex<Vec<i64>>>,
    flaky: Arc<AtomicUsize>,
    panics: Arc<AtomicUsize>,
    _db: std::marker::PhantomData<fn() -> DB>,
}

impl<DB> Payouts<DB> {
    fn new(consumer: &str) -> Self {
        Self {
            consumer: consumer.to_owned(),
            txids: Arc::default(),
            flaky: Arc::default(),
            panics: Arc::default(),
            _db: Default::default(),
        }
    }
}

/// What the handler does that differs per backend.
#[async_trait]
trait Txid: TestDb {
    /// The transaction a statement runs in: PostgreSQL's txid; SQLite has none (0).
    async fn txid(conn: &mut Self::Connection) -> i64;
    /// Runs a statement that fails (no such table) and ignores the error.
    async fn hide_a_failed_statement(conn: &mut Self::Connection);
}

#[async_trait]
impl Txid for idem::Postgres {
    async fn txid(conn: &mut Self::Connection) -> i64 {
        sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(conn)
            .await
            .unwrap()
    }
    async fn hide_a_failed_statement(conn: &mut Self::Connection) {
        let _ = sqlx::query("INSERT INTO no_such_table VALUES (1)")
            .execute(conn)
            .await;
    }
}

#[async_trait]
impl Txid for idem::Sqlite {
    async fn txid(_: &mut Self::Connection) -> i64 {
        0
    }
    async fn hide_a_failed_statement(conn: &mut Self::Connection) {
        let _ = sqlx::query("INSERT INTO no_such_table VALUES (1)")
            .execute(conn)
            .await;
    }
}

fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl<DB: Txid> Handler<DB> for Payouts<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, transfer: Transfer) -> Result<(), HandlerError> {
        let txid = DB::txid(tx.conn()).await;
        self.txids.lock().unwrap().push(txid);
        DB::insert_effect(tx.conn(), &self.consumer, &transfer).await?;
        if transfer.account == "acct-sloppy" {
            DB::hide_a_failed_statement(tx.conn()).await;
        }
        if transfer.fail {
            return Err(HandlerError::permanent(format!(
                "account {} is frozen",
                transfer.account
            )));
        }
        if transfer.account == "acct-flaky" && take_one(&self.flaky) {
            return Err("the account row is locked by another transfer".into());
        }
        if transfer.account == "acct-panicky" && take_one(&self.panics) {
            panic!("an impossible state, once");
        }
        Ok(())
    }
}

async fn a_group_commits_together_and_each_message_keeps_its_own_outcome<DB: Txid>() {
    let story = Story::<DB>::begin("group").await;
    let handler = Payouts::<DB>::new(&story.consumer);
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let transfers: Vec<_> = ids.iter().map(|id| (*id, "acct-g1", 10, false)).collect();
    let batch = Arrivals::of(&transfers);

    let processed = batch.in_one_group(&story.pool, &handler).await;

    assert!(
        processed.iter().all(|p| p.outcome == Outcome::Applied),
        "{processed:?}"
    );
    for (id, p) in ids.iter().zip(&processed) {
        assert_eq!(p.key.as_ref().unwrap().as_str(), id.to_string());
        assert_eq!(story.effects(id).await, 1);
    }
    let txids = handler.txids.lock().unwrap().clone();
    assert_eq!(txids.len(), 20, "each handler ran once");
    assert!(
        txids.iter().all(|t| *t == txids[0]),
        "one transaction for the group: {txids:?}"
    );
}

async fn a_failing_or_panicking_message_is_taken_out_and_the_rest_commit<DB: Txid>() {
    let story = Story::<DB>::begin("group-failing").await;
    let handler = Payouts::<DB>::new(&story.consumer);
    handler.flaky.store(1, Ordering::SeqCst);
    handler.panics.store(1, Ordering::SeqCst);
    let (frozen, flaky, panicky) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let fine: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let mut transfers: Vec<_> = fine.iter().map(|id| (*id, "acct-g2", 5, false)).collect();
    transfers.insert(1, (frozen, "acct-frozen", 5, true));
    transfers.insert(3, (flaky, "acct-flaky", 5, false));
    transfers.insert(5, (panicky, "acct-panicky", 5, false));
    let batch = Arrivals::of(&transfers);

    let processed = batch.in_one_group(&story.pool, &handler).await;

    for (transfer, p) in transfers.iter().zip(&processed) {
        let id = transfer.0;
        if id == frozen {
            // Rejected on its first attempt, exactly as alone, and nothing of it stays.
            match &p.outcome {
                Outcome::DeadLetter { reason, error } => {
                    assert_eq!(*reason, Reason::Rejected);
                    assert!(error.contains("acct-frozen is frozen"), "{error}");
                }
                other => panic!("the frozen payout: {other:?}"),
            }
            assert_eq!(story.effects(&id).await, 0);
        } else if id == flaky {
            // Retried as alone: its attempt 1 of 4 failed transiently; nothing of it stays.
            match &p.outcome {
                Outcome::Retry {
                    attempts, error, ..
                } => {
                    assert_eq!(*attempts, 1);
                    assert!(error.contains("is locked"), "{error}");
                }
                other => panic!("{id}: {other:?}"),
            }
            assert_eq!(story.effects(&id).await, 0, "{id}");
        } else {
            // The panicky one too ran again alone (a panic may come from a transaction an
            // earlier handler spoiled), where it did not panic, and applied.
            assert_eq!(p.outcome, Outcome::Applied, "{id}: {processed:?}");
            assert_eq!(story.effects(&id).await, 1, "{id}");
        }
    }
    assert_eq!(handler.flaky.load(Ordering::SeqCst), 0);
    assert_eq!(handler.panics.load(Ordering::SeqCst), 0);
}

async fn duplicates_conflicts_and_copies_inside_a_group_apply_once<DB: Txid>() {
    let story = Story::<DB>::begin("group-dupes").await;
    let handler = Payouts::<DB>::new(&story.consumer);
    let keys = KeysStory::new("acct-g3");
    // Applied before.
    let before = keys.before();
    let first = before.in_one_group(&story.pool, &handler).await;
    assert!(first.iter().all(|p| p.outcome == Outcome::Applied));

    let batch = keys.group();
    let processed = batch.in_one_group(&story.pool, &handler).await;
    KeysStory::assert_outcomes(&processed);
    for id in keys.keys() {
        assert_eq!(story.effects(&id).await, 1, "{id}");
    }
    assert_eq!(
        DB::amount(&story.pool, &story.consumer, &keys.reused.to_string()).await,
        8,
        "the first effect stands"
    );
}

async fn a_handler_that_hides_a_failed_statement_fails_alone<DB: Txid>() {
    let story = Story::<DB>::begin("group-sloppy").await;
    let handler = Payouts::<DB>::new(&story.consumer);
    let sloppy = Uuid::new_v4();
    let fine: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let mut transfers: Vec<_> = fine.iter().map(|id| (*id, "acct-g4", 3, false)).collect();
    transfers.insert(2, (sloppy, "acct-sloppy", 3, false));
    let batch = Arrivals::of(&transfers);

    let processed = batch.in_one_group(&story.pool, &handler).await;

    for (transfer, p) in transfers.iter().zip(&processed) {
        if transfer.0 == sloppy && DB::NAME == "PostgreSQL" {
            // PostgreSQL aborted its transaction: retried, never called applied.
            assert!(matches!(p.outcome, Outcome::Retry { .. }), "{p:?}");
            assert_eq!(story.effects(&sloppy).await, 0);
        } else {
            // (SQLite does not abort a transaction over a failed statement: it applies.)
            assert_eq!(p.outcome, Outcome::Applied, "{p:?}");
            assert_eq!(story.effects(&transfer.0).await, 1);
        }
    }
}
