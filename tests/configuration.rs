//! Bad configuration fails at start, with a message that says what to fix. No servers needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem::amqp::Consumer;
use idem::{Backend, RetryPolicy, Sqlite, Tx};
use std::time::Duration;

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Ping {
    #[idem(key)]
    id: u64,
}

#[idem::handler(consumer = "pings")]
async fn pong(_tx: &mut Tx<'_, Sqlite>, _ping: Ping) -> Result<(), sqlx::Error> {
    Ok(())
}

async fn pool() -> sqlx::SqlitePool {
    Sqlite::connect("sqlite::memory:", 1).await.unwrap()
}

async fn refused(builder: idem::amqp::ConsumerBuilder<Sqlite, pong>) -> String {
    builder
        .build()
        .expect_err("the configuration was accepted")
        .to_string()
}

#[tokio::test]
async fn impossible_consumer_settings_are_refused_with_the_fix() {
    let message = refused(Consumer::builder(pool().await, pong).prefetch(0)).await;
    assert!(message.contains("prefetch must be at least 1"), "{message}");

    let message = refused(
        Consumer::builder(pool().await, pong)
            .prefetch(4)
            .concurrency(16),
    )
    .await;
    assert!(
        message.contains("concurrency 16 exceeds prefetch 4"),
        "{message}"
    );
    assert!(
        message.contains("raise prefetch or lower concurrency"),
        "{message}"
    );

    let message = refused(Consumer::builder(pool().await, pong).concurrency(0)).await;
    assert!(
        message.contains("concurrency must be at least 1"),
        "{message}"
    );

    let message = refused(Consumer::builder(pool().await, pong).queue("")).await;
    assert!(message.contains("the queue name is empty"), "{message}");

    let message = refused(Consumer::builder(pool().await, pong).queue("q".repeat(250))).await;
    assert!(message.contains("too long: its delay queue"), "{message}");

    let retry =
        |policy| async move { refused(Consumer::builder(pool().await, pong).retry(policy)).await };
    let message = retry(RetryPolicy::default().max_attempts(0)).await;
    assert!(
        message.contains("max_attempts must be at least 1"),
        "{message}"
    );
    let message = retry(RetryPolicy::default().jitter(2.0)).await;
    assert!(
        message.contains("jitter 2 must be at least 0 and below 1"),
        "{message}"
    );
    let message = retry(RetryPolicy::exponential(
        Duration::from_secs(60),
        Duration::from_secs(1),
    ))
    .await;
    assert!(message.contains("below the initial delay"), "{message}");

    let message = refused(Consumer::builder(pool().await, pong).max_body_bytes(0)).await;
    assert!(
        message.contains("max_body_bytes must be at least 1"),
        "{message}"
    );
    let message = refused(Consumer::builder(pool().await, pong).crash_loop_limit(0)).await;
    assert!(
        message.contains("crash_loop_limit must be at least 1"),
        "{message}"
    );

    let message = refused(Consumer::builder(pool().await, pong).queue("amq.payments")).await;
    assert!(message.contains("reserves"), "{message}");

    // A small prefetch alone is fine: the default concurrency follows it down.
    Consumer::builder(pool().await, pong)
        .prefetch(1)
        .build()
        .unwrap();
}

#[tokio::test]
async fn a_bad_or_unreachable_broker_url_fails_at_start() {
    let error = idem::amqp::connect("payments-broker:5672")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("invalid AMQP URL"), "{error}");
    assert!(
        error.contains("amqp://user:password@host:port/vhost"),
        "{error}"
    );

    // Port 1 on loopback: nothing listens there.
    let error = idem::amqp::connect("amqp://guest:secret@127.0.0.1:1/%2f")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot connect to RabbitMQ"), "{error}");
    assert!(
        error.contains("guest:***@127.0.0.1:1"),
        "the password leaked into: {error}"
    );

    // A consumer that reconnects forever once running still fails fast at start.
    let consumer = Consumer::builder(pool().await, pong).build().unwrap();
    let error = consumer
        .serve(
            "amqp://guest:secret@127.0.0.1:1/%2f",
            std::future::pending(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot connect to RabbitMQ"), "{error}");
    assert!(
        !consumer.health().live,
        "a consumer that never started is not live"
    );
}

#[tokio::test]
async fn an_unusable_database_url_fails_at_start() {
    let error = Sqlite::connect("sqlite:///nonexistent-dir/x/ledger.db", 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot connect to SQLite"), "{error}");
    assert!(error.contains("Check the URL"), "{error}");
    // The library does not know which environment variable its caller read the URL from.
    assert!(!error.contains("DATABASE_URL"), "{error}");

    let error = idem::Postgres::connect("postgres://app:hunter2@127.0.0.1:1/payments", 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot connect to PostgreSQL"), "{error}");
    assert!(
        !error.contains("hunter2"),
        "the password leaked into: {error}"
    );
}
