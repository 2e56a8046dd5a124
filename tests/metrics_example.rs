//! The payments example's `/metrics` tells the truth: scraped over HTTP while it runs (as
//! Prometheus would), its counters equal what the database and the queues say — applied =
//! captures written, duplicates = copies the producer sent twice, dead-lettered `malformed` =
//! the dead-letter queue's depth — and `/readyz` says ready.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

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
