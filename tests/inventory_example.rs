//! The service a new user writes from the README's first screen (examples/inventory.rs) does
//! what the README says, run as its own process against real RabbitMQ and PostgreSQL: each
//! reservation applied once however often it is sent, its event published once, a business
//! refusal dead-lettered at once (not retried), and one SIGTERM stopping consumer and relay.
//! And the README shows that very file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use idem::amqp::lapin::types::FieldTable;
use std::process::{Child, Command, Stdio};
use uuid::Uuid;

fn reserve(id: Uuid, order: &str, sku: &str, quantity: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "reservation_id": id, "order_id": order, "sku": sku, "quantity": quantity
    }))
    .unwrap()
}

/// The service's process, killed if the test fails before it stops it.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_service_reserves_once_publishes_once_and_rejects_what_no_retry_cures() {
    let connection = connection().await;
    let mut service = Service(
        Command::new(example_binary("inventory"))
            .env("AMQP_URL", amqp_url())
            .env("DATABASE_URL", pg_url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut service.0;

    // The service declares its queue once its tables exist.
    let channel = connection.create_channel().await.unwrap();
    eventually("the service is consuming", || async {
        let probe = connection.create_channel().await.unwrap();
        probe
            .queue_declare(
                "inventory.reserve".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok()
    })
    .await;
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let sku = format!("sku-{}", Uuid::new_v4().simple());
    sqlx::query("INSERT INTO stock (sku, available) VALUES ($1, 10)")
        .bind(&sku)
        .execute(&pool)
        .await
        .unwrap();

    // Three reservations, each sent twice (the order service retried); then one for more than
    // is left and one for a sku that does not exist.
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        let body = reserve(*id, &format!("order-{i}"), &sku, 3);
        publish(&connection, "inventory.reserve", &body, None).await;
        publish(&connection, "inventory.reserve", &body, None).await;
    }
    let available = || async {
        sqlx::query_scalar::<_, i64>("SELECT available FROM stock WHERE sku = $1")
            .bind(&sku)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    eventually("the three reservations are made", || async {
        available().await == 1
    })
    .await;
    let too_many = Uuid::new_v4();
    publish(
        &connection,
        "inventory.reserve",
        &reserve(too_many, "order-big", &sku, 5),
        None,
    )
    .await;
    let unknown = Uuid::new_v4();
    let nowhere = format!("sku-{}", Uuid::new_v4().simple());
    publish(
        &connection,
        "inventory.reserve",
        &reserve(unknown, "order-x", &nowhere, 1),
        None,
    )
    .await;

    eventually(
        "the reservations are settled and their events out",
        || async {
            available().await == 1
                && queue_depth(&connection, "inventory.reserve").await == Some(0)
                && queue_depth(&connection, "inventory.reserved").await == Some(3)
                && queue_depth(&connection, "inventory.reserve.dlq").await == Some(2)
        },
    )
    .await;

    // One SIGTERM stops both loops: exit 0.
    let status = terminate(child, "inventory").await;
    assert!(
        status.success(),
        "inventory exited with {status} after SIGTERM"
    );

    for id in &ids {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reservations WHERE reservation_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(rows, 1, "reservation {id}");
    }
    assert_eq!(available().await, 1, "3 × 3 of 10 reserved, nothing else");

    // Each event once, from the outbox, in JSON.
    let mut reserved = Vec::new();
    while let Some(event) = channel
        .basic_get(
            "inventory.reserved".into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        assert_eq!(
            event
                .delivery
                .properties
                .kind()
                .as_ref()
                .map(|k| k.as_str()),
            Some("inventory.reserved")
        );
        let body: serde_json::Value = serde_json::from_slice(&event.delivery.data).unwrap();
        assert_eq!(body["sku"], sku.as_str());
        assert_eq!(body["quantity"], 3);
        reserved.push(
            body["reservation_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap(),
        );
    }
    reserved.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(reserved, expected, "one StockReserved per reservation");

    // The business refusals: dead-lettered on the first attempt, saying why.
    let letters = drain_dead_letters(&connection, "inventory.reserve").await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.reason(), "rejected");
        assert_eq!(
            letter.headers["x-idem-attempts"], "1",
            "retried: {letter:?}"
        );
    }
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l.headers["x-idem-error"].as_str())
        .collect();
    assert!(
        errors.contains(&format!("not enough {sku} in stock: 5 wanted, 1 left").as_str()),
        "{errors:?}"
    );
    assert!(
        errors.contains(&format!("no such sku: {nowhere}").as_str()),
        "{errors:?}"
    );
}

/// The README's first screen is the example, line for line: what a new user copies compiles
/// and is what this suite runs.
#[test]
fn the_readme_shows_the_inventory_example_as_it_is() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let example = std::fs::read_to_string(format!("{root}/examples/inventory.rs")).unwrap();
    // From the first `use`: the module docs say how to run it, which the README says itself.
    let code = &example[example.find("\nuse ").unwrap() + 1..];
    assert!(
        readme.contains(&format!("```rust,ignore\n{code}```")),
        "README.md's service block differs from examples/inventory.rs (from its first `use` \
         on): copy the file's code into the README"
    );
}
