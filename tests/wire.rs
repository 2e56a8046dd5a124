//! What any producer can send, over the wire from a real client: a body that is a JSON array
//! rather than an object, an `x-idem-attempts` header the producer set itself, a transient
//! (non-persistent) message that ends as a dead letter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::amqp::lapin::options::BasicGetOptions;
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use std::sync::atomic::Ordering;
use uuid::Uuid;

on_both_backends!(
    a_struct_written_as_a_json_array_is_malformed_not_applied,
    a_producer_cannot_spend_the_retry_budget_with_its_own_attempts_header,
);

async fn a_struct_written_as_a_json_array_is_malformed_not_applied<DB: TestDb>() {
    let story = Story::<DB>::begin("array").await;
    let handler = story.recorder();
    let runs = handler.runs.clone();
    let running = story.run(handler).await;

    // serde takes an array as the struct's fields in order: id, account, amount.
    let id = Uuid::new_v4();
    let body = serde_json::to_vec(&serde_json::json!([id, "acct-w1", 100])).unwrap();
    story.publish(&body, Some(&id.to_string())).await;
    running
        .wait_until("the array is dead-lettered", |s| s.dead_lettered == 1)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.applied, 0, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(story.effects(&id).await, 0);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters[0].reason(), "malformed");
    assert!(letters[0].headers["x-idem-error"].contains("not a JSON object"));
    story.end().await;
}

async fn a_producer_cannot_spend_the_retry_budget_with_its_own_attempts_header<DB: TestDb>() {
    let story = Story::<DB>::begin("forgedattempts").await;
    // One transient failure, then success: a retry must be allowed whatever the producer wrote.
    let handler = story.recorder().failing_transiently(1);
    let running = story.run(handler).await;

    let id = Uuid::new_v4();
    let mut forged = FieldTable::default();
    forged.insert("x-idem-attempts".into(), AMQPValue::LongString("7".into()));
    forged.insert("x-idem-first-failure".into(), AMQPValue::Timestamp(1));
    publish_with(
        &story.connection,
        &story.queue,
        &transfer_body(id, "acct-w2", 100),
        Some(&id.to_string()),
        |p| p.with_headers(forged),
    )
    .await;
    running
        .wait_until("the transfer is applied after one retry", |s| {
            s.applied + s.dead_lettered == 1
        })
        .await;
    let stats = running.stop().await;

    assert_eq!(
        stats.dead_lettered, 0,
        "the forged header spent the retries: {stats:?}"
    );
    assert_eq!(stats.retried, 1, "{stats:?}");
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

/// The original was published transient (delivery mode 1); its dead letter is the only copy
/// left once the original is acked, so it is persistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_persistent_even_when_the_original_was_not() {
    let story = Story::<idem::Sqlite>::begin("transient").await;
    let running = story.run(story.recorder()).await;
    publish_with(
        &story.connection,
        &story.queue,
        b"{not json",
        Some("transient-1"),
        |p| p.with_delivery_mode(1),
    )
    .await;
    running
        .wait_until("the message is dead-lettered", |s| s.dead_lettered == 1)
        .await;
    running.stop().await;

    let channel = story.connection.create_channel().await.unwrap();
    let dlq = idem::amqp::dead_letter_queue(&story.queue);
    let letter = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead letter");
    assert_eq!(*letter.delivery.properties.delivery_mode(), Some(2));
    story.end().await;
}
