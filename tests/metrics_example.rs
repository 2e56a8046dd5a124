//! The examples' `/metrics` tell the truth: scraped over HTTP while they run (as Prometheus
//! would), their numbers equal what the database and the queues say. The payments consumer:
//! applied = captures written, duplicates = copies the producer sent twice, dead-lettered
//! `malformed` = the dead-letter queue's depth, and `/readyz` says ready. The orders relay, on
//! both databases: published = rows the outbox marks published (and messages in the queue),
//! every batch timed to its confirm, and the waiting-row gauges equal to the outbox's own count
//! and age of what waits; the orders consumer serves its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::outbox::{Outgoing, Route};
use idem::{async_trait, Backend, Postgres, Sqlite};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

on_both_backends!(the_relay_metrics_agree_with_the_outbox);

fn payment(id: Uuid, account: &str, cents: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "payment_id": id, "account_id": account, "amount_cents": cents, "currency": "EUR"
    }))
    .unwrap()
}

/// Kills the example however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free a moment ago, for the example to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `url`: the status and body, whatever the status.
fn get(url: &str) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// The value of the series `name` whose labels include every `key="value"` of `labels`
/// (summed when several match); 0 when none does — a counter not yet incremented is absent.
fn value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_what_the_database_and_the_queues_show() {
    let (connection, queue) = (connection().await, fresh_queue("metrics"));
    declare_durable(&connection, &queue).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let example = Running(
        Command::new(example_binary("payments"))
            .env("AMQP_URL", amqp_url())
            .env("DATABASE_URL", pg_url())
            .env("IDEM_QUEUE", &queue)
            .env("IDEM_ORDERS_QUEUE", fresh_queue("metrics-orders"))
            .env("IDEM_METRICS_ADDR", &addr)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://{addr}");
    eventually("the example answers /readyz with 200", || async {
        matches!(get(&format!("{base}/readyz")), Ok((200, _)))
    })
    .await;

    // Five payments, three of them sent twice by a producer that retried, stamped with the
    // time they were sent; two that cannot be captured.
    let account = format!("acct-{}", Uuid::new_v4());
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let sent_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (i, id) in ids.iter().enumerate() {
        let body = payment(*id, &account, 100);
        let copies = if i < 3 { 2 } else { 1 };
        for _ in 0..copies {
            publish_with(&connection, &queue, &body, Some(&id.to_string()), |p| {
                p.with_timestamp(sent_at)
            })
            .await;
        }
    }
    let negative = Uuid::new_v4();
    let bad = payment(negative, &account, -5);
    publish(&connection, &queue, &bad, Some(&negative.to_string())).await;
    publish(&connection, &queue, b"{not json", Some("garbage-1")).await;

    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let dlq = idem::amqp::dead_letter_queue(&queue);
    eventually("every delivery is settled", || async {
        ready_messages(&connection, &queue).await == 0
            && ready_messages(&connection, &dlq).await == 2
    })
    .await;
    let captured: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM captures WHERE account_id = $1")
        .bind(&account)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(captured, 5);

    // Counters are bumped right after each ack, and the depth gauge on the next poll (every
    // 5 s): wait for the scrape to agree, then check every number against its source.
    let consumer = [("consumer", "payments")];
    let scrape = || {
        get(&format!("{base}/metrics"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    eventually("/metrics shows the dead-letter queue's depth", || async {
        value(&scrape(), "idem_dlq_messages", &[("queue", dlq.as_str())]) == 2.0
    })
    .await;
    let metrics = scrape();
    let deliveries = |outcome| {
        value(
            &metrics,
            "idem_deliveries_total",
            &[consumer[0], ("outcome", outcome)],
        )
    };
    assert_eq!(deliveries("applied"), captured as f64, "{metrics}");
    assert_eq!(deliveries("duplicate"), 3.0, "{metrics}");
    assert_eq!(
        value(
            &metrics,
            "idem_dead_letters_total",
            &[consumer[0], ("reason", "malformed")]
        ),
        f64::from(ready_messages(&connection, &dlq).await),
        "{metrics}"
    );
    assert_eq!(deliveries("dead_lettered"), 2.0, "{metrics}");
    assert_eq!(deliveries("retried"), 0.0, "{metrics}");
    assert_eq!(
        value(&metrics, "idem_in_flight", &consumer),
        0.0,
        "{metrics}"
    );
    assert_eq!(value(&metrics, "idem_ready", &consumer), 1.0, "{metrics}");
    // Every delivery went through the unit of work once (duplicates and dead letters too).
    assert_eq!(
        value(&metrics, "idem_handler_seconds_count", &consumer),
        10.0,
        "{metrics}"
    );
    // Only the stamped payments that were applied have an end-to-end time.
    assert_eq!(
        value(&metrics, "idem_end_to_end_seconds_count", &consumer),
        5.0,
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "idem_commit_to_ack_seconds_count", &consumer),
        5.0,
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "idem_taken_to_commit_seconds_count", &consumer),
        5.0,
        "{metrics}"
    );
    // The relay in the process sampled the outbox: these payments name no order, so it is empty.
    for gauge in [
        "idem_outbox_pending",
        "idem_outbox_parked",
        "idem_outbox_oldest_seconds",
    ] {
        assert!(
            metrics.lines().any(|l| l == format!("{gauge} 0")),
            "{gauge} 0 missing: {metrics}"
        );
    }
    assert!(
        metrics.contains("# TYPE idem_deliveries_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE idem_handler_seconds histogram"),
        "{metrics}"
    );

    let (live, _) = get(&format!("{base}/healthz")).unwrap();
    assert_eq!(live, 200);
    let (ready, body) = get(&format!("{base}/readyz")).unwrap();
    assert_eq!((ready, body.lines().next()), (200, Some("ready")));
    let (missing, _) = get(&format!("{base}/nope")).unwrap();
    assert_eq!(missing, 404);

    // What an operator would see (buckets left out), for the record (`--nocapture`).
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("idem_") && !l.contains("_bucket{"))
    {
        println!("{line}");
    }
    drop(example);
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
}

/// What the outbox says, per backend, read with SQL of its own rather than idem's.
#[async_trait]
trait OutboxTruth: Backend {
    /// A database of the test's own.
    async fn fresh_url() -> String;
    /// Rows marked published (their records in `idem_outbox_sent`).
    async fn published(pool: &sqlx::Pool<Self>) -> i64;
    /// Rows waiting to be published (not published, not parked), and the age in seconds of the
    /// oldest of them.
    async fn waiting(pool: &sqlx::Pool<Self>) -> (i64, f64);
    /// Publish attempts recorded for `message_id`.
    async fn attempts(pool: &sqlx::Pool<Self>, message_id: &str) -> i64;
    /// Makes `message_id` an hour old, on `conn` (in the transaction that wrote it).
    async fn an_hour_old(conn: &mut Self::Connection, message_id: &str);
}

#[async_trait]
impl OutboxTruth for Postgres {
    async fn fresh_url() -> String {
        fresh_pg_database(&format!("metrics_{}", Uuid::new_v4().simple())).await
    }
    async fn published(pool: &sqlx::PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM idem_outbox_sent")
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn waiting(pool: &sqlx::PgPool) -> (i64, f64) {
        sqlx::query_as(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
             FROM idem_outbox WHERE published_at IS NULL AND parked_at IS NULL",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    }
    async fn attempts(pool: &sqlx::PgPool, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT attempts::bigint FROM idem_outbox WHERE message_id = $1")
            .bind(message_id)
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn an_hour_old(conn: &mut sqlx::PgConnection, message_id: &str) {
        sqlx::query(
            "UPDATE idem_outbox SET created_at = now() - interval '1 hour' WHERE message_id = $1",
        )
        .bind(message_id)
        .execute(conn)
        .await
        .unwrap();
    }
}

#[async_trait]
impl OutboxTruth for Sqlite {
    async fn fresh_url() -> String {
        format!(
            "sqlite://{}/idem-metrics-{}.db",
            std::env::temp_dir().display(),
            Uuid::new_v4()
        )
    }
    async fn published(pool: &sqlx::SqlitePool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM idem_outbox_sent")
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn waiting(pool: &sqlx::SqlitePool) -> (i64, f64) {
        sqlx::query_as(
            "SELECT count(*),
                    COALESCE((julianday('now') - julianday(min(created_at))) * 86400.0, 0.0)
             FROM idem_outbox WHERE published_ms IS NULL AND parked_ms IS NULL",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    }
    async fn attempts(pool: &sqlx::SqlitePool, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT attempts FROM idem_outbox WHERE message_id = $1")
            .bind(message_id)
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn an_hour_old(conn: &mut sqlx::SqliteConnection, message_id: &str) {
        sqlx::query(
            "UPDATE idem_outbox SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-3600 seconds')
             WHERE message_id = $1",
        )
        .bind(message_id)
        .execute(conn)
        .await
        .unwrap();
    }
}

/// What the test itself writes to the outbox: a message to an exchange that does not exist.
#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "order.audited")]
struct Audited<'a> {
    order: &'a str,
}

/// Starts `orders <command>` against `database_url` and the story's queues, serving its
/// metrics on `addr`.
fn orders(command: &str, database_url: &str, queues: (&str, &str), addr: &str) -> Running {
    Running(
        Command::new(example_binary("orders"))
            .arg(command)
            .env("AMQP_URL", amqp_url())
            .env("DATABASE_URL", database_url)
            .env("IDEM_ORDERS_QUEUE", queues.0)
            .env("IDEM_PAYMENTS_QUEUE", queues.1)
            .env("IDEM_METRICS_ADDR", addr)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The orders service's relay publishes the payment requests of seven orders, and keeps
/// trying one message the broker refuses (its exchange does not exist), written an hour ago.
/// Its `/metrics`: published = the rows the outbox marks published = the requests in the
/// payments queue; confirm times recorded; one row waiting, as old as the outbox says. The
/// orders consumer beside it serves its own endpoint, ready.
async fn the_relay_metrics_agree_with_the_outbox<DB: OutboxTruth>() {
    let connection = connection().await;
    let (orders_queue, payments_queue) = (fresh_queue("m-orders"), fresh_queue("m-payments"));
    let queues = (orders_queue.as_str(), payments_queue.as_str());
    let database_url = DB::fresh_url().await;
    let pool = DB::connect(&database_url, 2).await.unwrap();
    DB::migrate(&pool).await.unwrap();
    let (relay_addr, consumer_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let relay = orders("relay", &database_url, queues, &relay_addr);
    let consumer = orders("consume", &database_url, queues, &consumer_addr);
    for addr in [&relay_addr, &consumer_addr] {
        eventually("the example answers /readyz with 200", || async {
            matches!(get(&format!("http://{addr}/readyz")), Ok((200, _)))
        })
        .await;
    }

    let placed = Command::new(example_binary("orders"))
        .args(["place", "--orders", "7"])
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", &database_url)
        .env("IDEM_ORDERS_QUEUE", &orders_queue)
        .env("IDEM_PAYMENTS_QUEUE", &payments_queue)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(placed.success(), "orders place failed: {placed}");
    let refused = Uuid::new_v4();
    let missing_exchange = format!("test-missing-{}", Uuid::new_v4().simple());
    let mut tx = pool.begin().await.unwrap();
    let message = Outgoing::json(&Audited { order: "x" }, refused)
        .unwrap()
        .route(Route::exchange(&missing_exchange, "anything"));
    assert!(idem::outbox::enqueue::<DB>(&mut *tx, &message)
        .await
        .unwrap());
    DB::an_hour_old(&mut *tx, &refused.to_string()).await;
    tx.commit().await.unwrap();

    eventually(
        "the requests are published and the refused row tried",
        || async {
            DB::published(&pool).await == 7 && DB::attempts(&pool, &refused.to_string()).await > 0
        },
    )
    .await;
    assert_eq!(ready_messages(&connection, &payments_queue).await, 7);
    let scrape = || {
        get(&format!("http://{relay_addr}/metrics"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    // The gauges are sampled at most once a second, after a round: wait for one that saw the
    // refused row.
    eventually("/metrics shows the row that waits", || async {
        value(&scrape(), "idem_outbox_pending", &[]) == 1.0
    })
    .await;
    let metrics = scrape();
    let (waiting, oldest) = DB::waiting(&pool).await;
    assert_eq!(
        value(&metrics, "idem_relay_published_total", &[]),
        DB::published(&pool).await as f64,
        "{metrics}"
    );
    assert!(
        value(&metrics, "idem_relay_confirm_seconds_count", &[]) > 0.0,
        "{metrics}"
    );
    // The only relay of its outbox publishes it, every partition of it.
    assert_eq!(
        value(&metrics, "idem_relay_publishing", &[]),
        1.0,
        "{metrics}"
    );
    if DB::NAME == "PostgreSQL" {
        assert_eq!(
            value(&metrics, "idem_relay_partitions", &[]),
            f64::from(idem::outbox::PARTITIONS),
            "{metrics}"
        );
    } else {
        // SQLite has a lease, not partitions.
        assert!(!metrics.contains("idem_relay_partitions"), "{metrics}");
    }
    assert_eq!(
        value(&metrics, "idem_outbox_pending", &[]),
        waiting as f64,
        "{metrics}"
    );
    assert_eq!(waiting, 1);
    assert_eq!(value(&metrics, "idem_outbox_parked", &[]), 0.0, "{metrics}");
    // Sampled up to a second before the scrape, read from the database after it.
    let gauge = value(&metrics, "idem_outbox_oldest_seconds", &[]);
    assert!(oldest >= 3_600.0, "the refused row is {oldest} s old");
    assert!(
        (oldest - gauge).abs() < 5.0,
        "idem_outbox_oldest_seconds {gauge}, the outbox says {oldest}: {metrics}"
    );

    let consumer_metrics = get(&format!("http://{consumer_addr}/metrics")).unwrap().1;
    assert_eq!(
        value(&consumer_metrics, "idem_ready", &[("consumer", "orders")]),
        1.0,
        "{consumer_metrics}"
    );
    let (live, _) = get(&format!("http://{relay_addr}/healthz")).unwrap();
    assert_eq!(live, 200);

    // What an operator would see (buckets left out), for the record (`--nocapture`).
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("idem_") && !l.contains("_bucket{"))
    {
        println!("{} relay: {line}", DB::NAME);
    }
    drop((relay, consumer));
    pool.close().await;
    let retry = idem::RetryPolicy::default();
    delete_queues(&connection, &orders_queue, &retry).await;
    delete_queues(&connection, &payments_queue, &retry).await;
}
