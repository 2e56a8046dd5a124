//! An inventory service, written the way a new user writes one: its own tables, its own error
//! type, a handler that reserves stock and publishes `StockReserved` through the outbox, and a
//! consumer and a relay that stop together on one SIGTERM. README's "Your first service" is
//! this file; tests/inventory_example.rs runs it.
//!
//! ```sh
//! DATABASE_URL=postgres://app@127.0.0.1/shop AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!     cargo run --example inventory
//! ```

use idem::amqp::{Consumer, Relay, Shutdown};
use idem::{Backend, Classify, ErrorClass, Postgres, PublishError, Tx};
use uuid::Uuid;

/// The order service asks for stock: consumed from the queue `inventory.reserve`.
#[derive(Debug, serde::Deserialize, idem::Message)]
#[idem(kind = "inventory.reserve")]
struct ReserveStock {
    #[idem(key)] // the order service's idempotency key: one per reservation, stable across retries
    reservation_id: Uuid,
    order_id: String,
    sku: String,
    quantity: i64,
}

/// What this service tells the others; it only publishes it (to the queue named by the kind).
#[derive(Debug, serde::Serialize, idem::Publish)]
#[idem(kind = "inventory.reserved")]
struct StockReserved {
    reservation_id: Uuid,
    order_id: String,
    sku: String,
    quantity: i64,
}

#[derive(Debug, thiserror::Error)]
enum ReserveError {
    #[error("not enough {sku} in stock: {wanted} wanted, {left} left")]
    OutOfStock { sku: String, wanted: i64, left: i64 },
    #[error("no such sku: {0}")]
    UnknownSku(String),
    #[error("quantity must be at least 1, not {0}")]
    BadQuantity(i64),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("publishing the reservation")]
    Publish(#[from] PublishError),
}

/// Which failures a retry can cure: the class idem reads off the error.
impl Classify for ReserveError {
    fn class(&self) -> Option<ErrorClass> {
        match self {
            // No retry makes stock appear: dead-lettered at once as `rejected`.
            Self::OutOfStock { .. } | Self::UnknownSku(_) | Self::BadQuantity(_) => {
                Some(ErrorClass::Permanent)
            }
            // What the database said decides (a deadlock is retried, a lost server held).
            Self::Db(_) | Self::Publish(_) => None,
        }
    }
}

/// Runs inside idem's transaction: the ledger claim, the stock update, the reservation row
/// and the outbox row commit together, or none of them does.
#[idem::handler(consumer = "inventory")]
async fn reserve(tx: &mut Tx<'_, Postgres>, msg: ReserveStock) -> Result<(), ReserveError> {
    if msg.quantity < 1 {
        return Err(ReserveError::BadQuantity(msg.quantity));
    }
    let taken: Option<i64> = sqlx::query_scalar(
        "UPDATE stock SET available = available - $2 WHERE sku = $1 AND available >= $2
         RETURNING available",
    )
    .bind(&msg.sku)
    .bind(msg.quantity)
    .fetch_optional(tx.conn())
    .await?;
    if taken.is_none() {
        let left: Option<i64> = sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
            .bind(&msg.sku)
            .fetch_optional(tx.conn())
            .await?;
        return Err(match left {
            Some(left) => ReserveError::OutOfStock {
                sku: msg.sku,
                wanted: msg.quantity,
                left,
            },
            None => ReserveError::UnknownSku(msg.sku),
        });
    }
    sqlx::query(
        "INSERT INTO reservations (reservation_id, order_id, sku, quantity) VALUES ($1, $2, $3, $4)",
    )
    .bind(msg.reservation_id)
    .bind(&msg.order_id)
    .bind(&msg.sku)
    .bind(msg.quantity)
    .execute(tx.conn())
    .await?;
    tx.publish(&StockReserved {
        reservation_id: msg.reservation_id,
        order_id: msg.order_id,
        sku: msg.sku,
        quantity: msg.quantity,
    })
    .await?;
    Ok(())
}

/// This service's own tables (a real service would run its own migrations).
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS stock (
        sku       TEXT PRIMARY KEY,
        available BIGINT NOT NULL CHECK (available >= 0)
    );
    CREATE TABLE IF NOT EXISTS reservations (
        reservation_id UUID PRIMARY KEY,
        order_id       TEXT   NOT NULL,
        sku            TEXT   NOT NULL REFERENCES stock (sku),
        quantity       BIGINT NOT NULL
    );";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without a subscriber idem's logs (dead letters, reconnects, the stop) go nowhere. lapin
    // logs a returned message whole, body included: not in our logs.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(format!("lapin::returned_messages=off,{filter}"))
        .init();
    let database_url = std::env::var("DATABASE_URL").map_err(|_| {
        "set DATABASE_URL to the service's PostgreSQL, e.g. postgres://app@127.0.0.1/shop"
    })?;
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());

    let shutdown = Shutdown::on_signals()?; // SIGTERM / SIGINT stop every loop below, logged once
    let pool = Postgres::connect(&database_url, 10).await?;
    Postgres::migrate(&pool).await?; // idem's ledger and outbox
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;

    let consumer = Consumer::builder(pool.clone(), reserve)
        .queue("inventory.reserve") // declared on start, with `.dlq` and its delay queues
        .concurrency(8)
        .build()?;
    let relay = Relay::builder(pool)
        .declare_queue("inventory.reserved") // where StockReserved goes: declared before publishing
        .build()?;
    // Either loop ending (a configuration the broker refuses, say) stops the other one too.
    let (consumed, relayed) = tokio::join!(
        async {
            let consumed = consumer.serve(&amqp_url, shutdown.requested()).await;
            shutdown.request("the consumer stopped");
            consumed
        },
        async {
            let relayed = relay.serve(&amqp_url, shutdown.requested()).await;
            shutdown.request("the relay stopped");
            relayed
        },
    );
    consumed?;
    relayed?;
    Ok(())
}
