//! The consumer in group-commit mode (`ConsumerBuilder::group_commit`), on real RabbitMQ and
//! both ledgers: deliveries committed many to a transaction, and each message still applied
//! exactly once, its duplicates skipped, its failure its own.
//!
//! - Payments sent with their copies back to back (so a copy often lands in the same group as
//!   its original), bad messages among them: each payment applied once, every copy a duplicate,
//!   the bad ones dead-lettered with their reason.
//! - A frozen account's transfers among good ones: rejected alone; the rest of their groups
//!   commit.
//! - Two consumers in group mode on one queue (PostgreSQL), copies racing between them: one
//!   effect per key.
//! - Acks: a group's deliveries share one `basic.ack(multiple)`; and a delivery still in its
//!   transaction below a committed group is never covered by such an ack: after a crash it
//!   comes back, and only it (the same in per-message mode, whose acks take the same window).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::amqp::ConsumerBuilder;
use idem::{async_trait, Handler, HandlerError, Tx};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

on_both_backends!(
    payments_and_their_copies_apply_once_in_groups,
    a_rejected_message_leaves_its_group_and_the_rest_commit,
);

const GROUP: usize = 20;
const WAIT: Duration = Duration::from_millis(20);

async fn payments_and_their_copies_apply_once_in_groups<DB: TestDb>() {
    let story = Story::<DB>::begin("group-consumer").await;
    story.declare().await;
    let ids: Vec<Uuid> = (0..60).map(|_| Uuid::new_v4()).collect();
    // Published before the consumer starts, so its groups fill up.
    for (n, id) in ids.iter().enumerate() {
        let body = transfer_body(*id, "acct-gc1", 10);
        story.publish(&body, Some(&id.to_string())).await;
        if n % 3 == 0 {
            story.publish(&body, Some(&id.to_string())).await;
        }
        if n % 20 == 0 {
            story.publish(b"{\"id\": 1", None).await;
        }
    }
    let running = story
        .run_with(story.recorder(), |b| b.group_commit(GROUP, WAIT))
        .await;
    running
        .wait_until("every payment, copy and bad message is settled", |s| {
            s.applied == 60 && s.duplicates == 20 && s.dead_lettered == 3
        })
        .await;
    let stats = running.stop().await;
    assert_eq!(stats.retried, 0, "{stats:?}");
    // A group's acks go out as one frame (the dead letters, acked after their confirm, may go
    // alone). How big the groups get depends on timing — one starts at once when no other is in
    // flight, and on SQLite groups queue for the one writer and often finish one or two at a
    // time (42 frames for 83 deliveries seen on a loaded machine) — so the bound is what any
    // sharing gives: well under a frame per delivery (acks.rs tests the frames exactly).
    assert!(
        stats.ack_frames * 3 <= (stats.applied + stats.duplicates + stats.dead_lettered) * 2,
        "{stats:?}"
    );
    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "payment {id}");
    }
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 3);
    assert!(letters.iter().all(|l| l.reason() == "malformed"));
    story.end().await;
}

async fn a_rejected_message_leaves_its_group_and_the_rest_commit<DB: TestDb>() {
    let story = Story::<DB>::begin("group-rejected").await;
    story.declare().await;
    let ids: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        let frozen = n % 10 == 4;
        let body = serde_json::to_vec(&serde_json::json!({
            "id": id, "account": if frozen { "acct-frozen" } else { "acct-gc2" },
            "amount": 3, "fail": frozen,
        }))
        .unwrap();
        story.publish(&body, Some(&id.to_string())).await;
    }
    let running = story
        .run_with(story.recorder(), |b| b.group_commit(GROUP, WAIT))
        .await;
    running
        .wait_until("27 applied, 3 rejected", |s| {
            s.applied == 27 && s.dead_lettered == 3
        })
        .await;
    running.stop().await;
    for (n, id) in ids.iter().enumerate() {
        let expected = if n % 10 == 4 { 0 } else { 1 };
        assert_eq!(story.effects(id).await, expected, "transfer {n}");
    }
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert_eq!(letter.reason(), "rejected");
        assert_eq!(letter.headers["x-idem-attempts"], "1");
        assert!(letter.headers["x-idem-error"].contains("acct-frozen is frozen"));
    }
    story.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_group_consumers_racing_on_copies_apply_each_key_once() {
    let story = Story::<idem::Postgres>::begin("group-race").await;
    story.declare().await;
    let ids: Vec<Uuid> = (0..80).map(|_| Uuid::new_v4()).collect();
    let first = story
        .run_with(story.recorder(), |b| {
            b.group_commit(GROUP, WAIT).prefetch(40)
        })
        .await;
    let second = story
        .run_with(story.recorder(), |b| {
            b.group_commit(GROUP, WAIT).prefetch(40)
        })
        .await;
    // Each payment twice in a row: the copies go to either consumer, often at the same time.
    for id in &ids {
        let body = transfer_body(*id, "acct-gc3", 1);
        story.publish(&body, Some(&id.to_string())).await;
        story.publish(&body, Some(&id.to_string())).await;
    }
    eventually("all 160 deliveries are settled", || {
        let (a, b) = (first.consumer.stats(), second.consumer.stats());
        async move { a.applied + b.applied + a.duplicates + b.duplicates == 160 }
    })
    .await;
    let (a, b) = (first.stop().await, second.stop().await);
    assert_eq!(a.applied + b.applied, 80, "{a:?} {b:?}");
    assert_eq!(a.dead_lettered + b.dead_lettered, 0);
    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "payment {id}");
    }
    story.end().await;
}

/// Holds every transfer of account `acct-held` inside its transaction until the process dies;
/// says when one is there. Everything else is the recorder's.
struct Holding<DB> {
    recorder: Recorder<DB>,
    held: Arc<Notify>,
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for Holding<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.recorder.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, transfer: Transfer) -> Result<(), HandlerError> {
        if transfer.account == "acct-held" {
            DB::insert_effect(tx.conn(), &self.recorder.consumer, &transfer).await?;
            self.held.notify_one();
            std::future::pending::<()>().await;
        }
        self.recorder.handle(tx, transfer).await
    }
}

/// PostgreSQL only: on SQLite the held transaction's ledger claim holds the one write lock, so
/// nothing could commit beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_below_a_committed_group_comes_back_after_a_crash() {
    held_below_committed("group-held", |b| b.group_commit(GROUP, WAIT).concurrency(2)).await;
}

/// The same in per-message mode: the ten beside the held one are acked one by one (after the
/// window's wait for the gap below them), never by an ack that covers the held one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_below_committed_ones_comes_back_after_a_crash_per_message() {
    held_below_committed("message-held", |b| b.concurrency(2)).await;
}

/// One delivery (the lowest tag) held in its transaction while ten after it commit and are
/// acked; then the process dies: the held one, and only it, comes back.
async fn held_below_committed(
    name: &str,
    configure: impl FnOnce(
        ConsumerBuilder<idem::Postgres, Holding<idem::Postgres>>,
    ) -> ConsumerBuilder<idem::Postgres, Holding<idem::Postgres>>,
) {
    type DB = idem::Postgres;
    let story = Story::<DB>::begin(name).await;
    story.declare().await;
    let held = Arc::new(Notify::new());
    let handler = Holding {
        recorder: story.recorder(),
        held: Arc::clone(&held),
    };
    let running = story.run_with(handler, configure).await;
    // The first delivery (the lowest tag) stays in its transaction...
    let stuck = Uuid::new_v4();
    let body = transfer_body(stuck, "acct-held", 5);
    story.publish(&body, Some(&stuck.to_string())).await;
    tokio::time::timeout(Duration::from_secs(30), held.notified())
        .await
        .expect("the held transfer reached its handler");
    // ...while the next ones commit beside it (as a group, or one by one), and are acked.
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        let body = transfer_body(*id, "acct-gc4", 1);
        story.publish(&body, Some(&id.to_string())).await;
    }
    running
        .wait_until("the ten beside the held one are applied and acked", |s| {
            s.applied == 10
        })
        .await;
    // The process dies with the held one still in its transaction. An ack that covered every
    // tag up to the group's highest would have taken it along: lost, never applied.
    let crashed = running.crash().await;
    assert_eq!(crashed.applied, 10, "{crashed:?}");
    assert_eq!(
        story.effects(&stuck).await,
        0,
        "its transaction rolled back"
    );

    let after = story.run(story.recorder()).await;
    after
        .wait_until("the held transfer came back and is applied", |s| {
            s.applied == 1
        })
        .await;
    // Give anything wrongly left unacked time to come back too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = after.stop().await;
    assert_eq!((stats.applied, stats.duplicates), (1, 0), "{stats:?}");
    assert_eq!(story.effects(&stuck).await, 1);
    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "payment {id}");
    }
    story.end().await;
}
