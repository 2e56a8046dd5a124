//! A message whose headers are just under the broker's frame limit, sent by a real client: its
//! dead letter or retry copy, with idem's `x-idem-*` headers added, would not fit in one frame,
//! and RabbitMQ answers such a frame by closing the connection (`FRAME_ERROR`). idem must leave
//! the producer's largest headers out (saying so in `x-idem-dropped-headers`), publish, ack, and
//! go on — on the same connection, with nothing left in the queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::amqp::lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::{BasicProperties, Connection};
use idem::amqp::{Consumer, ConsumerStats};
use idem::Handler;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

on_both_backends!(
    a_malformed_message_at_the_frame_limit_is_dead_lettered_without_its_largest_header,
    a_retry_copy_at_the_frame_limit_flows_and_applies_once,
    a_message_at_the_frame_limit_that_keeps_failing_ends_in_the_dlq_with_one_record,
);

/// How far under the frame limit the producer's message is: idem's headers take far more.
const SLACK: usize = 16;
const MEDIUM: usize = 20_000;

/// Header-frame bytes of a message sent by [`publish_with`] with a message id of `id_len`
/// bytes and long-string headers `(name, value length)`: 22 bytes of frame around the
/// property list (type, channel, size, class, weight, body size, flags, frame end); delivery
/// mode (1); content type and correlation id ("application/json", "test-correlation": 1 + 16
/// each); the message id (1 + its length); the headers table (4, then per entry 1 + name, 1 for
/// the type, 4 + the value).
fn frame_size(id_len: usize, headers: &[(&str, usize)]) -> usize {
    let entries: usize = headers
        .iter()
        .map(|(name, len)| 1 + name.len() + 1 + 4 + len)
        .sum();
    22 + 1 + 17 + 17 + (1 + id_len) + 4 + entries
}

/// Headers that make the frame of a message with id `id` exactly `frame` bytes: `x-big` takes
/// what `x-medium` and `x-small` leave.
fn headers_for_frame(id: &str, frame: usize) -> FieldTable {
    let others = [("x-medium", MEDIUM), ("x-small", 7)];
    let without_big = frame_size(id.len(), &[others[0], others[1], ("x-big", 0)]);
    let mut headers = FieldTable::default();
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString("b".repeat(frame - without_big).into()),
    );
    headers.insert(
        "x-medium".into(),
        AMQPValue::LongString("m".repeat(MEDIUM).into()),
    );
    headers.insert("x-small".into(), AMQPValue::LongString("keep me".into()));
    headers
}

/// What `x-idem-dropped-headers` says when `x-big` alone was left out of a `frame`-byte message.
fn big_dropped(id: &str, frame: usize) -> String {
    let big = frame - frame_size(id.len(), &[("x-medium", MEDIUM), ("x-small", 7)]);
    format!("{big} bytes: x-big")
}

/// The frame limit the broker negotiated (RabbitMQ's default: 131072 bytes).
fn frame_max(connection: &Connection) -> usize {
    let frame_max = connection.configuration().frame_max() as usize;
    assert!(frame_max > 2 * MEDIUM, "frame_max {frame_max}");
    frame_max
}

/// Publishes `body` with id `id` and headers filling the frame to `SLACK` bytes under the
/// limit; returns the frame size.
async fn publish_at_the_limit<DB: TestDb>(story: &Story<DB>, id: &str, body: &[u8]) -> usize {
    let frame = frame_max(&story.connection) - SLACK;
    let headers = headers_for_frame(id, frame);
    publish_with(&story.connection, &story.queue, body, Some(id), |p| {
        p.with_headers(headers)
    })
    .await;
    frame
}

/// A consumer under [`Consumer::serve`], which reconnects by itself and counts it: a copy that
/// cost the connection shows in `reconnects`.
struct Serving<DB: idem::Backend, H> {
    consumer: Arc<Consumer<DB, H>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), idem::amqp::Error>>,
}

async fn serve<DB: TestDb, H: Handler<DB>>(story: &Story<DB>, handler: H) -> Serving<DB, H> {
    let consumer = Consumer::builder(story.pool.clone(), handler)
        .queue(&story.queue)
        .retry(story.retry)
        .build()
        .unwrap();
    consumer.declare(&story.connection).await.unwrap();
    let consumer = Arc::new(consumer);
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = Arc::clone(&consumer);
    let task = tokio::spawn(async move {
        serving
            .serve(&amqp_url(), async {
                let _ = stopped.await;
            })
            .await
    });
    Serving {
        consumer,
        stop,
        task,
    }
}

impl<DB: idem::Backend, H: Handler<DB>> Serving<DB, H> {
    async fn wait_until(&self, what: &str, condition: impl Fn(ConsumerStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition(self.consumer.stats()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; the consumer's stats: {:?}",
                self.consumer.stats()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(self) -> ConsumerStats {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        self.consumer.stats()
    }
}

async fn a_malformed_message_at_the_frame_limit_is_dead_lettered_without_its_largest_header<
    DB: TestDb,
>() {
    let story = Story::<DB>::begin("dlsize").await;
    let serving = serve(&story, story.recorder()).await;

    let id = format!("huge-{}", Uuid::new_v4());
    let frame = publish_at_the_limit(&story, &id, b"{not json").await;
    // The messages behind it.
    let behind: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, key) in behind.iter().enumerate() {
        let body = transfer_body(*key, "acct-s1", 10 + i as i64);
        story.publish(&body, Some(&key.to_string())).await;
    }
    serving
        .wait_until("the big one is dead-lettered and the rest applied", |s| {
            s.dead_lettered == 1 && s.applied == 3
        })
        .await;
    let stats = serving.stop().await;

    assert_eq!(
        stats.reconnects, 0,
        "the dead letter cost the connection: {stats:?}"
    );
    assert_eq!(stats.redelivered_later, 0, "{stats:?}");
    for key in &behind {
        assert_eq!(story.effects(key).await, 1);
    }
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.reason(), "malformed");
    assert_eq!(letter.body, b"{not json");
    assert_eq!(letter.message_id.as_deref(), Some(id.as_str()));
    let h = &letter.headers;
    // serde_json's own words for `{not json`.
    assert!(
        h["x-idem-error"].contains("key must be a string"),
        "{}",
        h["x-idem-error"]
    );
    assert_eq!(h["x-idem-attempts"], "1");
    assert_eq!(h["x-idem-consumer"], story.consumer);
    assert_eq!(h["x-idem-original-queue"], story.queue);
    assert!(h.contains_key("x-idem-first-failure") && h.contains_key("x-idem-last-failure"));
    assert_eq!(h["x-idem-dropped-headers"], big_dropped(&id, frame));
    // Only the largest went: the others are the producer's, as they were.
    assert!(!h.contains_key("x-big"));
    assert_eq!(h["x-medium"].len(), MEDIUM);
    assert_eq!(h["x-small"], "keep me");
    story.end().await;
}

async fn a_retry_copy_at_the_frame_limit_flows_and_applies_once<DB: TestDb>() {
    let story = Story::<DB>::begin("rtsize").await;
    let handler = story.recorder().failing_transiently(1);
    let runs = handler.runs.clone();
    let serving = serve(&story, handler).await;

    let key = Uuid::new_v4();
    let body = transfer_body(key, "acct-s2", 42);
    publish_at_the_limit(&story, &key.to_string(), &body).await;
    // Alone, so that the one transient failure is the big message's.
    serving
        .wait_until("the big one is applied after a retry", |s| {
            s.applied == 1 && s.retried == 1
        })
        .await;
    let behind = Uuid::new_v4();
    story
        .publish(
            &transfer_body(behind, "acct-s2", 1),
            Some(&behind.to_string()),
        )
        .await;
    serving
        .wait_until("the next one is applied", |s| s.applied == 2)
        .await;
    let stats = serving.stop().await;

    assert_eq!(
        stats.reconnects, 0,
        "the retry copy cost the connection: {stats:?}"
    );
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(story.effects(&key).await, 1);
    assert_eq!(story.effects(&behind).await, 1);
    assert!(drain_dead_letters(&story.connection, &story.queue)
        .await
        .is_empty());
    story.end().await;
}

async fn a_message_at_the_frame_limit_that_keeps_failing_ends_in_the_dlq_with_one_record<
    DB: TestDb,
>() {
    let story = Story::<DB>::begin("exsize").await;
    let serving = serve(&story, story.recorder().failing_transiently(usize::MAX)).await;

    let key = Uuid::new_v4();
    let id = key.to_string();
    let body = transfer_body(key, "acct-s3", 7);
    let frame = publish_at_the_limit(&story, &id, &body).await;
    serving
        .wait_until("the retries are exhausted", |s| s.dead_lettered == 1)
        .await;
    let stats = serving.stop().await;

    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert_eq!(stats.retried, 3, "4 attempts = 3 retries: {stats:?}");
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    let h = &letters[0].headers;
    assert_eq!(letters[0].reason(), "retries-exhausted");
    assert_eq!(h["x-idem-attempts"], "4");
    // Dropped from the first retry copy, carried through the others: recorded once.
    assert_eq!(h["x-idem-dropped-headers"], big_dropped(&id, frame));
    assert_eq!(h["x-small"], "keep me");
    assert_eq!(letters[0].body, body);
    story.end().await;
}

/// The arithmetic above is the broker's: RabbitMQ refuses a frame whose payload is over
/// `frame_max` (it allows the 8 bytes of frame header and end on top, which the AMQP spec counts
/// in `frame_max`: idem keeps to the spec, which is also what lapin checks on receipt). A header
/// frame of `frame_max + 8` bytes is taken, one byte more and the broker closes the connection.
/// So "just under the limit" above really is, and the failure idem avoids is the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_closes_the_connection_over_a_header_frame_too_large() {
    let story = Story::<idem::Sqlite>::begin("framemax").await;
    let limit = frame_max(&story.connection);
    story.declare().await;
    for (frame, taken) in [(limit + 8, true), (limit + 9, false)] {
        let connection = connection().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_correlation_id("test-correlation".into())
            .with_message_id("limit".into())
            .with_headers(headers_for_frame("limit", frame));
        let published = async {
            channel
                .basic_publish(
                    "".into(),
                    story.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    properties,
                )
                .await?
                .await
        };
        let confirmed = tokio::time::timeout(Duration::from_secs(10), published).await;
        let ok = matches!(confirmed, Ok(Ok(confirmation)) if confirmation.is_ack());
        assert_eq!(ok, taken, "a {frame}-byte header frame, frame_max {limit}");
        if !taken {
            eventually("the broker closes the connection", || {
                let connected = connection.status().connected();
                async move { !connected }
            })
            .await;
        }
    }
    // Purged, not consumed: lapin itself refuses to receive a frame over frame_max.
    let channel = story.connection.create_channel().await.unwrap();
    let purged = channel
        .queue_purge(story.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 1);
    story.end().await;
}
