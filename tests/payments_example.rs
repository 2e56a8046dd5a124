//! The payments example honours its contract: run as a separate process exactly as a user
//! would, fed by an external publisher, stopped with SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn payment(id: Uuid, account: &str, cents: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "payment_id": id, "account_id": account, "amount_cents": cents, "currency": "EUR"
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_captures_each_payment_once_dead_letters_garbage_and_stops_cleanly_on_sigterm() {
    let (connection, queue) = (connection().await, fresh_queue("payments"));
    declare_durable(&connection, &queue).await;

    let mut child = Command::new(example_binary("payments"))
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", pg_url())
        .env("IDEM_QUEUE", &queue)
        .env("IDEM_PREFETCH", "50")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let account = format!("acct-{}", Uuid::new_v4());
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        let body = payment(*id, &account, 100 * (i as i64 + 1));
        publish(&connection, &queue, &body, Some(&id.to_string())).await;
        publish(&connection, &queue, &body, Some(&id.to_string())).await; // the producer retried
    }
    let bad_id = Uuid::new_v4();
    publish(
        &connection,
        &queue,
        &payment(bad_id, &account, -5),
        Some(&bad_id.to_string()),
    )
    .await;

    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let balance = || async {
        sqlx::query_scalar::<_, i64>("SELECT balance_cents FROM accounts WHERE account_id = $1")
            .bind(&account)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    };
    eventually(
        "every payment is captured and the bad one dead-lettered",
        || async {
            balance().await == Some(1500) && ready_messages(&connection, &queue).await == 0
        },
    )
    .await;

    // SIGTERM: stop consuming, finish in-flight work, exit 0.
    let status = terminate(&mut child, "payments").await;
    assert!(
        status.success(),
        "payments exited with {status} after SIGTERM"
    );

    for id in &ids {
        let captures: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM captures WHERE payment_id = $1")
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(captures, 1, "payment {id} captured {captures} times");
    }
    let letters = drain_dead_letters(&connection, &queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "malformed");
    assert!(letters[0].headers["x-idem-error"].contains("amount_cents must be greater than 0"));
    assert_eq!(balance().await, Some(1500));
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
}

/// A service runs its consumer and its relay in one process: one SIGTERM stops both — the
/// consumer finishes and acks, the relay settles and hands over — logged once, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sigterm_stops_the_consumer_and_the_relay_and_is_logged_once() {
    let (connection, queue) = (connection().await, fresh_queue("one-stop"));
    let orders = fresh_queue("one-stop-orders");
    let mut child = Command::new(example_binary("payments"))
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", pg_url())
        .env("IDEM_QUEUE", &queue)
        .env("IDEM_ORDERS_QUEUE", &orders)
        .env("IDEM_RELAY", "on")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log, line by line, as it comes.
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = std::thread::spawn({
        let (stdout, log) = (child.stdout.take().unwrap(), Arc::clone(&log));
        move || {
            for line in BufReader::new(stdout).lines() {
                log.lock().unwrap().push(line.unwrap_or_default());
            }
        }
    });
    let has = |text: &str| log.lock().unwrap().iter().any(|line| line.contains(text));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(has("ready: consuming") && has("outbox relay publishing")) {
        assert!(
            Instant::now() < deadline,
            "the consumer and the relay did not both start: {:#?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The relay declared the queue its announcements go to, before any orders consumer ran.
    assert_eq!(queue_depth(&connection, &orders).await, Some(0));

    let status = terminate(&mut child, "payments").await;
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "exited with {status}: {log:#?}");
    let count = |text: &str| log.iter().filter(|line| line.contains(text)).count();
    assert_eq!(count("SIGTERM received"), 1, "{log:#?}");
    let stops = log
        .iter()
        .filter(|line| line.contains("idem_amqp") && line.contains("stopping"))
        .count();
    assert_eq!(stops, 1, "one stop, logged once: {log:#?}");
    assert_eq!(count("consumer stopped"), 1, "{log:#?}");
    assert_eq!(count("outbox relay stopped"), 1, "{log:#?}");
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
    delete_queues(&connection, &orders, &idem::RetryPolicy::default()).await;
}

/// Either ledger the example runs on, for the few queries this story reads back.
enum Db {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Db {
    async fn execute(&self, sql: &'static str, account: &str) {
        match self {
            Db::Postgres(pool) => sqlx::query(sql).bind(account).execute(pool).await.map(drop),
            Db::Sqlite(pool) => sqlx::query(sql).bind(account).execute(pool).await.map(drop),
        }
        .unwrap();
    }
    /// `None` when there is no row, or no table yet.
    async fn scalar(&self, sql: &'static str, key: &str) -> Option<i64> {
        match self {
            Db::Postgres(pool) => sqlx::query_scalar(sql).bind(key).fetch_optional(pool).await,
            Db::Sqlite(pool) => sqlx::query_scalar(sql).bind(key).fetch_optional(pool).await,
        }
        .ok()
        .flatten()
    }
}

/// How the example's consumer runs in a story.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    PerMessage,
    /// `IDEM_GROUP_COMMIT` with `IDEM_BATCH_HANDLER=on`: a group's payments in one call.
    BatchHandler,
}

/// A credit that would carry a balance past i64::MAX is refused as a permanent error on both
/// ledgers — nothing of it applied — rather than wrapping or (SQLite) turning the balance into a
/// float. The example is what users copy. With the batch handler the refused payment sits among
/// good ones in one batch: it is split out and rejected alone, and the others are captured once.
async fn a_credit_that_would_overflow_the_balance_is_rejected(
    database_url: String,
    db: Db,
    mode: Mode,
) {
    let (connection, queue) = (connection().await, fresh_queue("overflow"));
    declare_durable(&connection, &queue).await;
    let mut command = Command::new(example_binary("payments"));
    if mode == Mode::BatchHandler {
        // Long enough a wait that the payments published back to back share a batch.
        command
            .env("IDEM_GROUP_COMMIT", "20")
            .env("IDEM_GROUP_WAIT_MS", "300")
            .env("IDEM_BATCH_HANDLER", "on");
    }
    let mut child = command
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", &database_url)
        .env("IDEM_QUEUE", &queue)
        .env("IDEM_RELAY", "off")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // The account sits just below i64::MAX once the example has created its tables.
    let account = format!("acct-{}", Uuid::new_v4());
    let deadline = Instant::now() + Duration::from_secs(30);
    while db
        .scalar(
            "SELECT COUNT(*) FROM accounts WHERE account_id = $1",
            &account,
        )
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the example never created its tables"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.execute(
        "INSERT INTO accounts (account_id, balance_cents) VALUES ($1, 9223372036854775800)",
        &account,
    )
    .await;
    let good: Vec<Uuid> = match mode {
        Mode::PerMessage => Vec::new(),
        Mode::BatchHandler => (0..8).map(|_| Uuid::new_v4()).collect(),
    };
    let good_account = format!("acct-{}", Uuid::new_v4());
    let id = Uuid::new_v4();
    for (n, beside) in good.iter().enumerate() {
        if n == good.len() / 2 {
            publish(
                &connection,
                &queue,
                &payment(id, &account, 100),
                Some(&id.to_string()),
            )
            .await;
        }
        publish(
            &connection,
            &queue,
            &payment(*beside, &good_account, 10),
            Some(&beside.to_string()),
        )
        .await;
    }
    if good.is_empty() {
        publish(
            &connection,
            &queue,
            &payment(id, &account, 100),
            Some(&id.to_string()),
        )
        .await;
    }
    eventually("the overflowing credit is dead-lettered", || async {
        queue_depth(&connection, &idem::amqp::dead_letter_queue(&queue))
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    eventually("the payments beside it are captured", || async {
        let captured = db
            .scalar(
                "SELECT COUNT(*) FROM captures WHERE account_id = $1",
                &good_account,
            )
            .await;
        captured == Some(good.len() as i64) || good.is_empty()
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    let letters = drain_dead_letters(&connection, &queue).await;
    assert_eq!(letters[0].reason(), "rejected");
    assert!(
        letters[0].headers["x-idem-error"].contains("would overflow"),
        "{:?}",
        letters[0].headers
    );
    let balance = db
        .scalar(
            "SELECT balance_cents FROM accounts WHERE account_id = $1",
            &account,
        )
        .await;
    assert_eq!(balance, Some(9_223_372_036_854_775_800));
    let captures = db
        .scalar(
            "SELECT COUNT(*) FROM captures WHERE payment_id = $1",
            &id.to_string(),
        )
        .await;
    assert_eq!(
        captures,
        Some(0),
        "the capture row of a refused credit stayed"
    );
    for good in &good {
        let captures = db
            .scalar(
                "SELECT COUNT(*) FROM captures WHERE payment_id = $1",
                &good.to_string(),
            )
            .await;
        assert_eq!(captures, Some(1), "payment {good} beside the refused one");
    }
    if !good.is_empty() {
        let balance = db
            .scalar(
                "SELECT balance_cents FROM accounts WHERE account_id = $1",
                &good_account,
            )
            .await;
        assert_eq!(balance, Some(10 * good.len() as i64));
    }
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
}

async fn on_postgres(mode: Mode) {
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    a_credit_that_would_overflow_the_balance_is_rejected(pg_url(), Db::Postgres(pool), mode).await;
}

async fn on_sqlite(mode: Mode) {
    let path = std::env::temp_dir().join(format!("idem-overflow-{}.db", Uuid::new_v4()));
    let url = format!("sqlite://{}", path.display());
    let options = url
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .unwrap()
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    a_credit_that_would_overflow_the_balance_is_rejected(url, Db::Sqlite(pool), mode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_credit_that_would_overflow_the_balance_is_rejected() {
    on_postgres(Mode::PerMessage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_credit_that_would_overflow_the_balance_is_rejected() {
    on_sqlite(Mode::PerMessage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_overflowing_credit_in_a_batch_is_rejected_alone() {
    on_postgres(Mode::BatchHandler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_overflowing_credit_in_a_batch_is_rejected_alone() {
    on_sqlite(Mode::BatchHandler).await;
}

/// The batch handler without group commit would run every payment as a batch of one: the
/// example refuses to start and says which setting to add.
#[test]
fn a_batch_handler_without_group_commit_is_refused_at_start() {
    let output = Command::new(example_binary("payments"))
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", "sqlite::memory:")
        .env("IDEM_BATCH_HANDLER", "on")
        .env_remove("IDEM_GROUP_COMMIT")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("IDEM_BATCH_HANDLER=on needs group commit"),
        "{stderr}"
    );
    assert!(stderr.contains("set IDEM_GROUP_COMMIT"), "{stderr}");
}

/// `IDEM_LOG_FORMAT=json`: every line the example logs is one JSON object a log pipeline can
/// ingest, the delivery's outcome among its fields; a format it does not know stops it at
/// start, saying what to write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_an_unknown_format_is_refused() {
    let refused = Command::new(example_binary("payments"))
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", pg_url())
        .env("IDEM_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains(r#"IDEM_LOG_FORMAT="yaml" is not a log format: write `json`"#),
        "{said}"
    );

    let (connection, queue) = (connection().await, fresh_queue("json-logs"));
    declare_durable(&connection, &queue).await;
    let mut child = Command::new(example_binary("payments"))
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", pg_url())
        .env("IDEM_QUEUE", &queue)
        .env("IDEM_RELAY", "off")
        .env("IDEM_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let id = Uuid::new_v4();
    let account = format!("acct-{}", Uuid::new_v4());
    publish(
        &connection,
        &queue,
        &payment(id, &account, 100),
        Some(&id.to_string()),
    )
    .await;
    eventually("the payment is consumed", || async {
        ready_messages(&connection, &queue).await == 0
    })
    .await;
    // Acked is not yet logged: give the line a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = terminate(&mut child, "payments").await;
    assert!(status.success(), "exited with {status}");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut log).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(!lines.is_empty(), "nothing was logged");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object()),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l["fields"]["outcome"] == "applied"),
        "no line says the payment was applied: {log}"
    );
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
}
