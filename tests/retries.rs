//! Failure stories of retries, key conflicts and recovery, on real RabbitMQ and on both ledgers:
//! transient failures come back through delay queues and apply once, the attempt count travels
//! in idem's own header, a key reused with another payload is parked, and a consumer rides out
//! a database outage and a lost broker connection by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::proxy::{upstream_of, Proxy};
use common::*;
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::Consumer;
use idem::{Backend, Postgres, RetryPolicy};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use uuid::Uuid;

/// The metrics every consumer of this test binary records, as Prometheus would scrape them:
/// one recorder per process, each story reading its own consumer's series.
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap()
    })
}

/// `name{consumer="…", labels…}` as last scraped (summed over the series that match).
fn counted(name: &str, consumer: &str, labels: &[(&str, &str)]) -> f64 {
    let consumer_label = format!("consumer=\"{consumer}\"");
    metrics()
        .render()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && series_labels.contains(&consumer_label)
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

on_both_backends!(
    a_transient_failure_comes_back_through_a_delay_queue_and_applies_once,
    a_message_that_keeps_failing_is_dead_lettered_with_its_history,
    a_panicking_handler_is_rolled_back_and_retried_and_the_consumer_lives_on,
    the_same_key_with_another_payload_is_a_key_conflict_and_the_first_effect_stands,
    a_stop_finishes_the_transaction_in_flight_and_acks_it,
);

async fn a_transient_failure_comes_back_through_a_delay_queue_and_applies_once<DB: TestDb>() {
    let story = Story::<DB>::begin("flaky").await;
    metrics();
    // A lock timeout, twice: the third attempt gets through.
    let handler = story.recorder().failing_transiently(2);
    let runs = handler.runs.clone();
    let running = story.run(handler).await;

    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-r1", 250), Some(&id.to_string()))
        .await;
    running
        .wait_until("the third attempt is applied", |s| s.applied == 1)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.retried, 2, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let deliveries = |outcome| {
        counted(
            "idem_deliveries_total",
            &story.consumer,
            &[("outcome", outcome)],
        )
    };
    assert_eq!((deliveries("retried"), deliveries("applied")), (2.0, 1.0));
    assert_eq!(
        story.effects(&id).await,
        1,
        "rolled-back attempts left rows"
    );
    assert!(drain_dead_letters(&story.connection, &story.queue)
        .await
        .is_empty());
    story.end().await;
}

async fn a_message_that_keeps_failing_is_dead_lettered_with_its_history<DB: TestDb>() {
    let story = Story::<DB>::begin("hopeless").await;
    metrics();
    let handler = story.recorder().failing_transiently(usize::MAX);
    let runs = handler.runs.clone();
    let running = story.run(handler).await;

    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-r2", 700);
    story.publish(&body, Some(&id.to_string())).await;
    running
        .wait_until("the retries are exhausted", |s| s.dead_lettered == 1)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.retried, 3, "4 attempts = 3 retries: {stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert_eq!(story.effects(&id).await, 0);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.reason(), "retries-exhausted");
    assert_eq!(letter.headers["x-idem-attempts"], "4");
    let error = &letter.headers["x-idem-error"];
    assert!(error.starts_with("attempt 4 of 4: "), "{error}");
    assert!(error.contains("acct-r2 is locked"), "{error}");
    let first: u64 = letter.headers["x-idem-first-failure"].parse().unwrap();
    let last: u64 = letter.headers["x-idem-last-failure"].parse().unwrap();
    assert!(first > 0 && first <= last, "{first} > {last}");
    assert_eq!(letter.headers["x-idem-consumer"], story.consumer);
    assert_eq!(letter.headers["x-idem-original-queue"], story.queue);
    // The key idem read, so an operator finds the letter by it (`idem dlq show --key`).
    assert_eq!(letter.headers["x-idem-key"], id.to_string());
    let reason = [("reason", "retries-exhausted")];
    assert_eq!(
        counted("idem_dead_letters_total", &story.consumer, &reason),
        1.0
    );
    assert_eq!(
        letter.body, body,
        "the body changed on its way through the retries"
    );
    assert_eq!(letter.message_id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(letter.correlation_id.as_deref(), Some("test-correlation"));
    story.end().await;
}

async fn a_panicking_handler_is_rolled_back_and_retried_and_the_consumer_lives_on<DB: TestDb>() {
    let story = Story::<DB>::begin("panic").await;
    let running = story.run(story.recorder().panicking(1)).await;

    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    story
        .publish(
            &transfer_body(first, "acct-r3", 5),
            Some(&first.to_string()),
        )
        .await;
    running
        .wait_until("the panicked message is applied on retry", |s| {
            s.applied == 1 && s.retried == 1
        })
        .await;
    story
        .publish(
            &transfer_body(second, "acct-r3", 6),
            Some(&second.to_string()),
        )
        .await;
    running
        .wait_until("the consumer still applies", |s| s.applied == 2)
        .await;
    running.stop().await;
    assert_eq!(story.effects(&first).await, 1);
    assert_eq!(story.effects(&second).await, 1);
    story.end().await;
}

async fn the_same_key_with_another_payload_is_a_key_conflict_and_the_first_effect_stands<
    DB: TestDb,
>() {
    let story = Story::<DB>::begin("conflict").await;
    metrics();
    let running = story.run(story.recorder()).await;

    let id = Uuid::new_v4();
    let original = transfer_body(id, "acct-r4", 100);
    story.publish(&original, Some(&id.to_string())).await;
    running
        .wait_until("the original is applied", |s| s.applied == 1)
        .await;
    // A producer bug reuses the payment id for another amount.
    let reused = transfer_body(id, "acct-r4", 999);
    story.publish(&reused, Some(&id.to_string())).await;
    // The same payment re-serialized (other key order, whitespace) is a plain duplicate.
    let reserialized = format!(r#"{{ "amount": 100, "account": "acct-r4", "id": "{id}" }}"#);
    story
        .publish(reserialized.as_bytes(), Some(&id.to_string()))
        .await;
    running
        .wait_until("both are handled", |s| {
            s.dead_lettered == 1 && s.duplicates == 1
        })
        .await;
    running.stop().await;

    assert_eq!(story.effects(&id).await, 1);
    let amount = DB::amount(&story.pool, &story.consumer, &id.to_string()).await;
    assert_eq!(amount, 100, "the first effect must stand");
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "key-conflict");
    assert_eq!(letters[0].body, reused);
    let error = &letters[0].headers["x-idem-error"];
    assert!(error.contains("different payload"), "{error}");
    assert_eq!(
        counted("idem_key_conflicts_total", &story.consumer, &[]),
        1.0
    );
    story.end().await;
}

async fn a_stop_finishes_the_transaction_in_flight_and_acks_it<DB: TestDb>() {
    let story = Story::<DB>::begin("drain").await;
    let handler = story.recorder().pausing(Duration::from_millis(800));
    let runs = handler.runs.clone();
    let running = story.run(handler).await;

    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-r5", 1), Some(&id.to_string()))
        .await;
    eventually("the handler is mid-transaction", || {
        let started = runs.load(Ordering::SeqCst) == 1;
        async move { started }
    })
    .await;
    // SIGTERM arrives now: the transaction in flight commits and is acked before the stop.
    let stats = running.stop().await;
    assert_eq!(stats.applied, 1, "{stats:?}");
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

/// Delay queues are tiered: a message due back in 100 ms is not stuck behind one due in 6.4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_delay_never_waits_behind_a_long_one() {
    let mut story = Story::<Postgres>::begin("tiers").await;
    // 100 ms doubling: 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4 s, one delay queue each.
    story.retry = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(10))
        .max_attempts(8)
        .jitter(0.0);
    let handler = story.recorder().failing_transiently(2);
    let running = story.run(handler).await;

    // `veteran` has failed 6 times before (idem's header says so, and the broker's `x-death` says
    // it came back through one of this queue's delay queues, without which idem would not
    // believe it): its next failure is attempt 7, which waits 6.4 s. `rookie` fails for the
    // first time and waits 100 ms.
    let (veteran, rookie) = (Uuid::new_v4(), Uuid::new_v4());
    let queue = story.queue.clone();
    publish_with(
        &story.connection,
        &story.queue,
        &transfer_body(veteran, "acct-r6", 1),
        Some(&veteran.to_string()),
        |p| {
            let mut headers = FieldTable::default();
            headers.insert("x-idem-attempts".into(), AMQPValue::LongLongInt(6));
            let mut death = FieldTable::default();
            let delay_queue = idem::amqp::retry_queue(&queue, Duration::from_millis(3200));
            death.insert("queue".into(), AMQPValue::LongString(delay_queue.into()));
            death.insert("reason".into(), AMQPValue::LongString("expired".into()));
            headers.insert(
                "x-death".into(),
                AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
            );
            p.with_headers(headers)
        },
    )
    .await;
    running
        .wait_until("the veteran failed", |s| s.retried == 1)
        .await;
    story
        .publish(
            &transfer_body(rookie, "acct-r6", 2),
            Some(&rookie.to_string()),
        )
        .await;
    running
        .wait_until("the rookie is applied after its short delay", |s| {
            s.applied == 1
        })
        .await;
    assert_eq!(story.effects(&rookie).await, 1);
    assert_eq!(
        story.effects(&veteran).await,
        0,
        "the long delay was cut short"
    );
    let long_queue = idem::amqp::retry_queue(&story.queue, Duration::from_millis(6400));
    assert_eq!(ready_messages(&story.connection, &long_queue).await, 1);

    running
        .wait_until("the veteran comes back and is applied", |s| s.applied == 2)
        .await;
    running.stop().await;
    assert_eq!(story.effects(&veteran).await, 1);
    story.end().await;
}

/// The database goes away for a while: deliveries are held and tried again, none is
/// dead-lettered or lost, the consumer says it is not ready, and it catches up by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_away_deliveries_wait_and_none_is_dead_lettered() {
    let story = Story::<Postgres>::begin("dbdown").await;
    let proxy = Proxy::start(upstream_of(&pg_url())).await;
    let pool = Postgres::connect(&proxy.url(&pg_url()), 4).await.unwrap();
    let consumer = Consumer::builder(pool, story.recorder())
        .queue(&story.queue)
        .retry(story.retry)
        .database_backoff(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = start(consumer).await;

    let ids: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for id in &ids[..10] {
        story
            .publish(&transfer_body(*id, "acct-r7", 1), Some(&id.to_string()))
            .await;
    }
    running
        .wait_until("the first ten apply", |s| s.applied == 10)
        .await;
    assert!(running.consumer.health().ready);

    proxy.cut();
    for id in &ids[10..] {
        story
            .publish(&transfer_body(*id, "acct-r7", 1), Some(&id.to_string()))
            .await;
    }
    let consumer = Arc::clone(&running.consumer);
    eventually("the consumer reports the outage", || {
        let health = consumer.health();
        async move { !health.ready && !health.database_reachable && health.live }
    })
    .await;
    // Several rounds of backoff pass while the database is away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = running.consumer.stats();
    assert_eq!(
        during.dead_lettered, 0,
        "an outage dead-lettered: {during:?}"
    );
    assert_eq!(during.retried, 0, "an outage used up attempts: {during:?}");

    proxy.restore();
    running
        .wait_until("everything applies after the outage", |s| s.applied == 30)
        .await;
    assert!(running.consumer.health().ready);
    let stats = running.stop().await;
    assert_eq!(stats.dead_lettered, 0);
    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "payment {id}");
    }
    story.end().await;
}

/// The broker connection drops (a broker restart, a load balancer, `close_all_connections`):
/// the consumer reconnects by itself, and what was unacked is redelivered and applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_connection_drops_the_consumer_reconnects_by_itself() {
    let story = Story::<Postgres>::begin("reconnect").await;
    metrics();
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    let consumer = Arc::new(
        Consumer::builder(
            story.pool.clone(),
            story.recorder().pausing(Duration::from_millis(100)),
        )
        .queue(&story.queue)
        .retry(story.retry)
        .build()
        .unwrap(),
    );
    // Declared up front, so nothing published before the consumer first connects is unroutable.
    consumer.declare(&story.connection).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = {
        let consumer = Arc::clone(&consumer);
        let url = proxy.url(&amqp_url());
        tokio::spawn(async move {
            consumer
                .serve(&url, async {
                    let _ = stopped.await;
                })
                .await
        })
    };

    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    for id in &ids[..20] {
        story
            .publish(&transfer_body(*id, "acct-r8", 1), Some(&id.to_string()))
            .await;
    }
    eventually("some are applied", || {
        let applied = consumer.stats().applied;
        async move { applied >= 5 }
    })
    .await;
    // Cut with deliveries mid-transaction and more prefetched: all of it comes back redelivered.
    proxy.cut();
    eventually("the consumer notices", || {
        let health = consumer.health();
        async move { !health.broker_connected && !health.ready && health.live }
    })
    .await;
    for id in &ids[20..] {
        story
            .publish(&transfer_body(*id, "acct-r8", 1), Some(&id.to_string()))
            .await;
    }
    proxy.restore();
    eventually("every message is handled after the reconnect", || {
        let s = consumer.stats();
        async move { s.applied + s.duplicates >= 40 && s.reconnects >= 1 }
    })
    .await;
    assert!(consumer.health().ready);
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
    assert!(!consumer.health().live);
    // What a dashboard shows of it: the reconnect, and every payment applied once.
    let stats = consumer.stats();
    let reconnects = counted("idem_reconnects_total", &story.consumer, &[]);
    assert!(
        reconnects >= 1.0 && reconnects == stats.reconnects as f64,
        "{reconnects} {stats:?}"
    );
    let applied = counted(
        "idem_deliveries_total",
        &story.consumer,
        &[("outcome", "applied")],
    );
    // (Not 40 - duplicates: an ack lost in the cut counts as an ack failure, and its redelivery
    // as a duplicate.)
    assert_eq!(applied, stats.applied as f64, "{stats:?}");
    let ack_failures = counted("idem_ack_failures_total", &story.consumer, &[]);
    assert_eq!(ack_failures, stats.ack_failures as f64, "{stats:?}");
    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "payment {id}");
    }
    story.end().await;
}
