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

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use std::time::Duration;
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
