//! Messages the client library cannot read as sent: a `message_id`, a `content_type` or a header
//! name that is not valid UTF-8, written by a raw AMQP client (a Rust client refuses to build
//! them; RabbitMQ accepts them, and clients in other languages send them). Before idem carried
//! its patch of the frame parser, such a message killed the connection, went back to the head of
//! the queue and blocked everything behind it, forever.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::raw_amqp::{publish_raw, RawMessage};
use common::*;
use std::sync::atomic::Ordering;
use uuid::Uuid;

on_both_backends!(an_unreadable_message_is_dead_lettered_and_the_queue_behind_it_flows);

async fn an_unreadable_message_is_dead_lettered_and_the_queue_behind_it_flows<DB: TestDb>() {
    let story = Story::<DB>::begin("unreadable").await;
    story.declare().await;
    let transfer = |account: &str| transfer_body(Uuid::new_v4(), account, 100);
    let (url, queue) = (amqp_url(), story.queue.clone());
    let poison = [
        RawMessage {
            message_id: Some(b"pay-\xff\xfe-1".to_vec()),
            body: transfer("acct-u1"),
            ..RawMessage::default()
        },
        RawMessage {
            content_type: Some(b"application/\xc3\x28json".to_vec()),
            body: transfer("acct-u2"),
            ..RawMessage::default()
        },
        RawMessage {
            headers: vec![(b"tenant-\xff".to_vec(), b"acme".to_vec())],
            body: transfer("acct-u3"),
            ..RawMessage::default()
        },
    ];
    tokio::task::spawn_blocking(move || {
        for message in &poison {
            publish_raw(&url, &queue, message);
        }
    })
    .await
    .unwrap();
    // And a good one behind them.
    let good = Uuid::new_v4();
    story
        .publish(
            &transfer_body(good, "acct-u4", 100),
            Some(&good.to_string()),
        )
        .await;

    let handler = story.recorder();
    let runs = handler.runs.clone();
    let running = story.run(handler).await;
    running
        .wait_until(
            "the unreadable ones are dead-lettered and the good one applied",
            |s| s.dead_lettered == 3 && s.applied == 1,
        )
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.reconnects, 0, "the connection died: {stats:?}");
    assert_eq!(stats.quick_losses, 0, "{stats:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "an unreadable message reached the handler"
    );
    assert_eq!(story.effects(&good).await, 1);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    let errors: Vec<&str> = letters
        .iter()
        .map(|letter| {
            assert_eq!(letter.reason(), "unreadable");
            letter.headers["x-idem-error"].as_str()
        })
        .collect();
    // Dead-lettered side by side, so in any order: each part is named once.
    assert_eq!(errors.len(), 3, "{errors:?}");
    for part in ["message_id", "content_type", "header name"] {
        assert_eq!(
            errors.iter().filter(|error| error.contains(part)).count(),
            1,
            "{part}: {errors:?}"
        );
    }
    story.end().await;
}
