//! The ledger over a long life, on real RabbitMQ and on both ledgers: it says when and from
//! which message a key was applied; it forgets keys past the retention in the background, in
//! batches, keeping what is recent (still deduplicated); crash-loop counts left behind by
//! messages that vanished are purged the same way once past the redelivery horizon, while live
//! counts and other consumers' stay; only one instance purges a consumer's ledger and counts at
//! a time; and a retention too short to outlast a message's redeliveries is refused at start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::amqp::Consumer;
use idem::{async_trait, Postgres, Sqlite};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

on_both_backends!(
    an_applied_key_says_when_and_from_which_message,
    keys_past_the_retention_are_purged_in_batches_and_recent_ones_stay_duplicates,
    crash_loop_counts_of_vanished_messages_are_purged_in_batches_and_live_ones_stay,
    while_another_instance_purges_a_consumer_s_ledger_this_one_leaves_it_alone,
);

/// How a story ages a ledger, per backend.
#[async_trait]
trait Aging: TestDb {
    /// Adds `count` keys `<prefix>-<n>` to `consumer`'s ledger, applied `days` days ago.
    async fn prefill(pool: &sqlx::Pool<Self>, consumer: &str, prefix: &str, count: i64, days: i64);
    /// Keys of `consumer` in the ledger whose key starts with `prefix`.
    async fn keys(pool: &sqlx::Pool<Self>, consumer: &str, prefix: &str) -> i64;
    /// Adds `count` crash-loop counts of keys `<prefix>-<n>` of `consumer`, last touched
    /// `days` days ago.
    async fn prefill_counts(
        pool: &sqlx::Pool<Self>,
        consumer: &str,
        prefix: &str,
        count: i64,
        days: i64,
    );
    /// Crash-loop counts of `consumer` whose key starts with `prefix`.
    async fn counts(pool: &sqlx::Pool<Self>, consumer: &str, prefix: &str) -> i64;
    /// Another instance takes the purge of `consumer`'s ledger, until the returned guard drops
    /// (PostgreSQL: the advisory lock on a connection of its own; SQLite: the lease).
    async fn purge_elsewhere(pool: &sqlx::Pool<Self>, consumer: &str) -> Elsewhere;
    /// The other instance is done purging.
    async fn stop_purging_elsewhere(pool: &sqlx::Pool<Self>, consumer: &str, elsewhere: Elsewhere);
}

/// What another instance holds while it purges.
type Elsewhere = Box<dyn std::any::Any + Send>;

#[async_trait]
impl Aging for Postgres {
    async fn prefill(pool: &sqlx::PgPool, consumer: &str, prefix: &str, count: i64, days: i64) {
        sqlx::query(
            "INSERT INTO idem_ledger (consumer, key, payload_hash, processed_at)
             SELECT $1, $2 || '-' || n, '\\x00', now() - $4 * interval '1 day'
             FROM generate_series(1, $3) n",
        )
        .bind(consumer)
        .bind(prefix)
        .bind(count)
        .bind(days as f64)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn keys(pool: &sqlx::PgPool, consumer: &str, prefix: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM idem_ledger WHERE consumer = $1 AND key LIKE $2 || '-%'",
        )
        .bind(consumer)
        .bind(prefix)
        .fetch_one(pool)
        .await
        .unwrap()
    }
    async fn prefill_counts(
        pool: &sqlx::PgPool,
        consumer: &str,
        prefix: &str,
        count: i64,
        days: i64,
    ) {
        sqlx::query(
            "INSERT INTO idem_redeliveries (consumer, key, count, first_at, last_at)
             SELECT $1, $2 || '-' || n, 2, now() - $4 * interval '1 day',
                    now() - $4 * interval '1 day'
             FROM generate_series(1, $3) n",
        )
        .bind(consumer)
        .bind(prefix)
        .bind(count)
        .bind(days as f64)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn counts(pool: &sqlx::PgPool, consumer: &str, prefix: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM idem_redeliveries WHERE consumer = $1 AND key LIKE $2 || '-%'",
        )
        .bind(consumer)
        .bind(prefix)
        .fetch_one(pool)
        .await
        .unwrap()
    }
    async fn purge_elsewhere(pool: &sqlx::PgPool, consumer: &str) -> Elsewhere {
        let mut conn = pool.acquire().await.unwrap().detach();
        sqlx::query("SELECT pg_advisory_lock(493140225, hashtext($1))")
            .bind(consumer)
            .execute(&mut conn)
            .await
            .unwrap();
        Box::new(conn)
    }
    async fn stop_purging_elsewhere(_pool: &sqlx::PgPool, consumer: &str, elsewhere: Elsewhere) {
        let mut conn = *elsewhere.downcast::<sqlx::PgConnection>().unwrap();
        sqlx::query("SELECT pg_advisory_unlock(493140225, hashtext($1))")
            .bind(consumer)
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

#[async_trait]
impl Aging for Sqlite {
    async fn prefill(pool: &sqlx::SqlitePool, consumer: &str, prefix: &str, count: i64, days: i64) {
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $3)
             INSERT INTO idem_ledger (consumer, key, payload_hash, processed_at)
             SELECT $1, $2 || '-' || i, x'00',
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $4 || ' days')
             FROM n",
        )
        .bind(consumer)
        .bind(prefix)
        .bind(count)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn keys(pool: &sqlx::SqlitePool, consumer: &str, prefix: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM idem_ledger WHERE consumer = $1 AND key LIKE $2 || '-%'",
        )
        .bind(consumer)
        .bind(prefix)
        .fetch_one(pool)
        .await
        .unwrap()
    }
    async fn prefill_counts(
        pool: &sqlx::SqlitePool,
        consumer: &str,
        prefix: &str,
        count: i64,
        days: i64,
    ) {
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $3)
             INSERT INTO idem_redeliveries (consumer, key, count, first_at, last_at)
             SELECT $1, $2 || '-' || i, 2,
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $4 || ' days'),
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $4 || ' days')
             FROM n",
        )
        .bind(consumer)
        .bind(prefix)
        .bind(count)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn counts(pool: &sqlx::SqlitePool, consumer: &str, prefix: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM idem_redeliveries WHERE consumer = $1 AND key LIKE $2 || '-%'",
        )
        .bind(consumer)
        .bind(prefix)
        .fetch_one(pool)
        .await
        .unwrap()
    }
    async fn purge_elsewhere(pool: &sqlx::SqlitePool, consumer: &str) -> Elsewhere {
        let expires_ms = (SystemTime::now() + Duration::from_secs(3600))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        sqlx::query("INSERT INTO idem_purge_lease (consumer, holder, expires_ms) VALUES ($1, 'another-instance', $2)")
            .bind(consumer)
            .bind(expires_ms)
            .execute(pool)
            .await
            .unwrap();
        Box::new(())
    }
    async fn stop_purging_elsewhere(pool: &sqlx::SqlitePool, consumer: &str, _: Elsewhere) {
        sqlx::query("DELETE FROM idem_purge_lease WHERE consumer = $1")
            .bind(consumer)
            .execute(pool)
            .await
            .unwrap();
    }
}

/// An operator at 3 a.m. asks: when was this payment applied, and from which message?
async fn an_applied_key_says_when_and_from_which_message<DB: Aging>() {
    let story = Story::<DB>::begin("forensics").await;
    let running = story.run(story.recorder()).await;
    let id = Uuid::new_v4();
    let before = SystemTime::now() - Duration::from_secs(5);
    publish_with(
        &story.connection,
        &story.queue,
        &transfer_body(id, "acct-l1", 7),
        Some("msg-l1"),
        |p| p.with_correlation_id("order-l1".into()),
    )
    .await;
    running
        .wait_until("the transfer is applied", |s| s.applied == 1)
        .await;
    running.stop().await;

    let entry = idem::ledger::lookup(&story.pool, &story.consumer, &id.to_string())
        .await
        .unwrap()
        .expect("the applied key is in the ledger");
    assert_eq!(entry.message_id.as_deref(), Some("msg-l1"));
    assert_eq!(entry.correlation_id.as_deref(), Some("order-l1"));
    assert_eq!(entry.fingerprint.len(), 32);
    let after = SystemTime::now() + Duration::from_secs(5);
    assert!(
        before <= entry.processed_at && entry.processed_at <= after,
        "processed_at {:?} is not now",
        entry.processed_at
    );
    let never = idem::ledger::lookup(&story.pool, &story.consumer, "never-applied")
        .await
        .unwrap();
    assert_eq!(never, None);
    story.end().await;
}

/// A ledger that grew for 40 days: the purge deletes what is past the 30-day retention in
/// batches (more rows than one batch), and leaves yesterday's keys, which still stop a
/// duplicate.
async fn keys_past_the_retention_are_purged_in_batches_and_recent_ones_stay_duplicates<
    DB: Aging,
>() {
    let story = Story::<DB>::begin("retention").await;
    DB::prefill(&story.pool, &story.consumer, "old", 12_000, 40).await;
    DB::prefill(&story.pool, &story.consumer, "recent", 50, 1).await;
    let id = Uuid::new_v4();
    let running = story
        .run_with(story.recorder(), |builder| {
            builder.ledger_purge_interval(Duration::from_millis(200))
        })
        .await;
    running
        .wait_until("the old keys are purged", |s| s.ledger_purged >= 12_000)
        .await;
    assert_eq!(DB::keys(&story.pool, &story.consumer, "old").await, 0);
    assert_eq!(DB::keys(&story.pool, &story.consumer, "recent").await, 50);

    // Still remembered: a copy of a message applied now is a duplicate.
    let body = transfer_body(id, "acct-l2", 9);
    story.publish(&body, Some(&id.to_string())).await;
    story.publish(&body, Some(&id.to_string())).await;
    running
        .wait_until("both copies are settled", |s| s.applied + s.duplicates == 2)
        .await;
    let stats = running.stop().await;
    assert_eq!((stats.applied, stats.duplicates), (1, 1), "{stats:?}");
    assert_eq!(stats.ledger_purged, 12_000, "{stats:?}");
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

/// A consumer that ran for weeks: crash-loop counts of messages that vanished (a purged queue,
/// a cut-short delivery whose copy never came back) were left behind, 12,000 of them, more
/// than two batches. The keeper deletes those untouched for longer than the redelivery horizon
/// (the retry schedule, the 7-day replay window and a day: 8 days here) and keeps the counts a
/// copy may still come for, and another consumer's; the ledger's own count is not inflated.
async fn crash_loop_counts_of_vanished_messages_are_purged_in_batches_and_live_ones_stay<
    DB: Aging,
>() {
    let story = Story::<DB>::begin("stale-counts").await;
    let other = format!("{}-other", story.consumer);
    DB::prefill_counts(&story.pool, &story.consumer, "vanished", 12_000, 10).await;
    DB::prefill_counts(&story.pool, &story.consumer, "live", 30, 1).await;
    DB::prefill_counts(&story.pool, &other, "vanished", 20, 10).await;
    let running = story
        .run_with(story.recorder(), |builder| {
            builder.ledger_purge_interval(Duration::from_millis(200))
        })
        .await;
    running
        .wait_until("the stale counts are purged", |s| {
            s.redelivery_counts_purged >= 12_000
        })
        .await;
    let stats = running.stop().await;
    assert_eq!(stats.redelivery_counts_purged, 12_000, "{stats:?}");
    assert_eq!(stats.ledger_purged, 0, "{stats:?}");
    assert_eq!(
        DB::counts(&story.pool, &story.consumer, "vanished").await,
        0
    );
    assert_eq!(DB::counts(&story.pool, &story.consumer, "live").await, 30);
    assert_eq!(DB::counts(&story.pool, &other, "vanished").await, 20);
    story.end().await;
}

/// Two instances of one consumer: while one purges the consumer's ledger and crash-loop
/// counts, the other does not take turns deleting the same rows; it purges once the first
/// lets go.
async fn while_another_instance_purges_a_consumer_s_ledger_this_one_leaves_it_alone<DB: Aging>() {
    let story = Story::<DB>::begin("purge-once").await;
    DB::prefill(&story.pool, &story.consumer, "old", 100, 40).await;
    DB::prefill_counts(&story.pool, &story.consumer, "old", 40, 10).await;
    let elsewhere = DB::purge_elsewhere(&story.pool, &story.consumer).await;
    let running = story
        .run_with(story.recorder(), |builder| {
            builder.ledger_purge_interval(Duration::from_millis(100))
        })
        .await;
    // Several purge rounds' time.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = running.consumer.stats();
    assert_eq!(
        (stats.ledger_purged, stats.redelivery_counts_purged),
        (0, 0)
    );
    assert_eq!(DB::keys(&story.pool, &story.consumer, "old").await, 100);
    assert_eq!(DB::counts(&story.pool, &story.consumer, "old").await, 40);
    DB::stop_purging_elsewhere(&story.pool, &story.consumer, elsewhere).await;
    running
        .wait_until("the purge is this instance's again", |s| {
            s.ledger_purged == 100 && s.redelivery_counts_purged == 40
        })
        .await;
    running.stop().await;
    assert_eq!(DB::keys(&story.pool, &story.consumer, "old").await, 0);
    assert_eq!(DB::counts(&story.pool, &story.consumer, "old").await, 0);
    story.end().await;
}

/// A retention shorter than the retry schedule plus the replay window would forget a key
/// while a copy of its message can still come: the build refuses it, saying the numbers.
#[tokio::test]
async fn a_retention_shorter_than_the_redelivery_horizon_is_refused_at_start() {
    let pool = <Sqlite as TestDb>::pool().await;
    let error = Consumer::builder(pool, Recorder::<Sqlite>::new("short-retention"))
        .ledger_retention(Duration::from_secs(2 * 86_400))
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("ledger_retention 2.0 days is shorter than the redelivery horizon 8.0 days"),
        "{error}"
    );
    assert!(
        error.contains("raise ledger_retention to at least 8.0 days"),
        "{error}"
    );
}
