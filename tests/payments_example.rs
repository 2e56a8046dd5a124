//! The payments example honours its contract: run as a separate process exactly as a user
//! would, fed by an external publisher, stopped with SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::amqp::lapin::options::QueueDeclareOptions;
use idem::amqp::lapin::types::FieldTable;
use std::process::{Command, Stdio};
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
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();

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
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "payments did not exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
