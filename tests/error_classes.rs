//! A user's own error type says its class, on real RabbitMQ and on both ledgers.
//!
//! A stock service writes its handler the way the docs suggest: an `#[idem::handler]` function
//! returning its own thiserror enum, `ReserveError`, which implements `idem::Classify`. "Not
//! enough stock" is a business rule, so it is dead-lettered `rejected` at once, after one
//! attempt, not retried until the policy gives up. A database error (`#[error(transparent)]`
//! over `sqlx::Error`) keeps what the database said: a serialization failure on PostgreSQL, a
//! busy database on SQLite, both real, are retried and then apply. An outbox publish that
//! fails (`#[from] idem::PublishError`) keeps its class too: a message that does not serialize
//! is rejected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::{Classify, ErrorClass, Postgres, PublishError, Sqlite, Tx};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use uuid::Uuid;

on_both_backends!(the_error_type_of_a_stock_service_says_which_failures_to_retry);

/// Reserve `quantity` of `sku`.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
struct Reserve {
    #[idem(key)]
    id: Uuid,
    sku: String,
    quantity: i64,
    /// Someone else writes the same stock while this reservation runs, the first time.
    #[serde(default)]
    contended: bool,
    /// Also publish an audit record that cannot be serialized.
    #[serde(default)]
    audit: bool,
}

/// What the handler publishes after a reservation.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
struct Reserved {
    #[idem(key)]
    id: Uuid,
    sku: String,
    quantity: i64,
}

/// An audit record keyed by (aisle, shelf): JSON object keys must be strings, so serde_json
/// refuses it, every time.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
struct Audit {
    #[idem(key)]
    id: Uuid,
    by_shelf: BTreeMap<(u8, u8), i64>,
}

/// The stock service's error, as its authors would write it.
#[derive(Debug, thiserror::Error)]
enum ReserveError {
    #[error("not enough stock for {sku}: {wanted} wanted, {left} left")]
    OutOfStock { sku: String, wanted: i64, left: i64 },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("publishing failed")]
    Publish(#[from] PublishError),
}

impl Classify for ReserveError {
    fn class(&self) -> Option<ErrorClass> {
        match self {
            // No retry brings stock back.
            Self::OutOfStock { .. } => Some(ErrorClass::Permanent),
            // What the database or the outbox said decides.
            Self::Db(_) | Self::Publish(_) => None,
        }
    }
}

/// Keys whose reservation was already contended: only the first attempt is.
static CONTENDED: Mutex<BTreeSet<Uuid>> = Mutex::new(BTreeSet::new());

/// The stock table, and what "someone else writes the same stock" is on each backend.
trait Stock: TestDb {
    /// Stock left of a contended `sku` that started at 10 and was reserved twice.
    const LEFT_AFTER_CONTENTION: i64;
    /// Someone else takes one unit of `sku` and commits, outside the handler's transaction.
    async fn someone_else_takes_one(sku: &str) -> Result<(), sqlx::Error>;
    /// Creates the stock table and puts `quantity` of each of `skus` in it.
    async fn stock_up(pool: &sqlx::Pool<Self>, skus: &[(&str, i64)]);
    /// What is left of `sku`.
    async fn left(pool: &sqlx::Pool<Self>, sku: &str) -> i64;
}

/// `Stock`'s SQL, the same on both backends.
macro_rules! stock_table {
    () => {
        async fn stock_up(pool: &sqlx::Pool<Self>, skus: &[(&str, i64)]) {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS reservation_stock (sku TEXT PRIMARY KEY, quantity BIGINT NOT NULL)",
            )
            .execute(pool)
            .await
            .unwrap();
            for (sku, quantity) in skus {
                sqlx::query("INSERT INTO reservation_stock (sku, quantity) VALUES ($1, $2)")
                    .bind(sku)
                    .bind(quantity)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
        async fn left(pool: &sqlx::Pool<Self>, sku: &str) -> i64 {
            sqlx::query_scalar("SELECT quantity FROM reservation_stock WHERE sku = $1")
                .bind(sku)
                .fetch_one(pool)
                .await
                .unwrap()
        }
    };
}

/// PostgreSQL: the story's database runs REPEATABLE READ; a unit taken elsewhere after the
/// handler's snapshot makes its UPDATE fail with a serialization failure (40001).
static PG_ELSEWHERE: OnceLock<sqlx::PgPool> = OnceLock::new();

impl Stock for Postgres {
    stock_table!();
    const LEFT_AFTER_CONTENTION: i64 = 7;
    async fn someone_else_takes_one(sku: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE reservation_stock SET quantity = quantity - 1 WHERE sku = $1")
            .bind(sku)
            .execute(PG_ELSEWHERE.get().unwrap())
            .await
            .map(|_| ())
    }
}

/// SQLite: idem's transaction holds the write lock, so a write from anywhere else is refused
/// with SQLITE_BUSY (the other writer gives up; the handler sees its error).
static SQLITE_FILE: OnceLock<std::path::PathBuf> = OnceLock::new();

impl Stock for Sqlite {
    stock_table!();
    const LEFT_AFTER_CONTENTION: i64 = 8;
    async fn someone_else_takes_one(sku: &str) -> Result<(), sqlx::Error> {
        use sqlx::{ConnectOptions, Connection};
        let mut elsewhere = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(SQLITE_FILE.get().unwrap())
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::ZERO)
            .connect()
            .await?;
        let taken =
            sqlx::query("UPDATE reservation_stock SET quantity = quantity - 1 WHERE sku = $1")
                .bind(sku)
                .execute(&mut elsewhere)
                .await;
        elsewhere.close().await?;
        taken.map(|_| ())
    }
}

/// The handler, once per backend: an `#[idem::handler]` function returning `ReserveError`.
macro_rules! reserve_handler {
    ($name:ident, $db:ty) => {
        #[idem::handler(consumer = "reservations")]
        async fn $name(tx: &mut Tx<'_, $db>, msg: Reserve) -> Result<(), ReserveError> {
            let left: i64 =
                sqlx::query_scalar("SELECT quantity FROM reservation_stock WHERE sku = $1")
                    .bind(&msg.sku)
                    .fetch_one(tx.conn())
                    .await?;
            if msg.contended && CONTENDED.lock().unwrap().insert(msg.id) {
                <$db as Stock>::someone_else_takes_one(&msg.sku).await?;
            }
            if left < msg.quantity {
                return Err(ReserveError::OutOfStock {
                    sku: msg.sku,
                    wanted: msg.quantity,
                    left,
                });
            }
            sqlx::query("UPDATE reservation_stock SET quantity = quantity - $1 WHERE sku = $2")
                .bind(msg.quantity)
                .bind(&msg.sku)
                .execute(tx.conn())
                .await?;
            tx.publish(&Reserved {
                id: msg.id,
                sku: msg.sku.clone(),
                quantity: msg.quantity,
            })
            .await?;
            if msg.audit {
                let by_shelf = BTreeMap::from([((3, 1), msg.quantity)]);
                tx.publish(&Audit {
                    id: msg.id,
                    by_shelf,
                })
                .await?;
            }
            Ok(())
        }
    };
}
reserve_handler!(reserve_on_postgres, Postgres);
reserve_handler!(reserve_on_sqlite, Sqlite);

/// The story's pool and handler, per backend.
trait StockStory: Stock {
    type Reserve: idem::Handler<Self>;
    fn handler() -> Self::Reserve;
    /// A pool for the story's consumer, where the contention can happen.
    async fn stock_pool(story: &Story<Self>) -> sqlx::Pool<Self>;
}

impl StockStory for Postgres {
    type Reserve = reserve_on_postgres;
    fn handler() -> Self::Reserve {
        reserve_on_postgres
    }
    async fn stock_pool(_: &Story<Self>) -> sqlx::Pool<Self> {
        let url = fresh_pg_database("idem_error_classes").await;
        let admin = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(
            "ALTER DATABASE idem_error_classes SET default_transaction_isolation = 'repeatable read'",
        )
        .execute(&admin)
        .await
        .unwrap();
        // Connections opened from now on run REPEATABLE READ.
        let pool = <Postgres as idem::Backend>::connect(&url, 4).await.unwrap();
        <Postgres as idem::Backend>::migrate(&pool).await.unwrap();
        PG_ELSEWHERE.set(admin).unwrap();
        pool
    }
}

impl StockStory for Sqlite {
    type Reserve = reserve_on_sqlite;
    fn handler() -> Self::Reserve {
        reserve_on_sqlite
    }
    async fn stock_pool(story: &Story<Self>) -> sqlx::Pool<Self> {
        SQLITE_FILE
            .set(story.pool.connect_options().get_filename().to_owned())
            .unwrap();
        story.pool.clone()
    }
}

async fn the_error_type_of_a_stock_service_says_which_failures_to_retry<DB: StockStory>() {
    let mut story = Story::<DB>::begin("error-classes").await;
    story.pool = DB::stock_pool(&story).await;
    let sku = |name: &str| format!("{name}-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let (scarce, contended, audited) = (sku("scarce"), sku("contended"), sku("audited"));
    DB::stock_up(
        &story.pool,
        &[(&scarce, 5), (&contended, 10), (&audited, 10)],
    )
    .await;
    let running = story.run(DB::handler()).await;

    let reserve = |sku: &String, quantity, contended, audit| Reserve {
        id: Uuid::new_v4(),
        sku: sku.clone(),
        quantity,
        contended,
        audit,
    };
    let too_many = reserve(&scarce, 10, false, false);
    let raced = reserve(&contended, 2, true, false);
    let unauditable = reserve(&audited, 1, false, true);
    for msg in [&too_many, &raced, &unauditable] {
        story.publish(&serde_json::to_vec(msg).unwrap(), None).await;
    }
    running
        .wait_until(
            "the race is applied and both others are dead-lettered",
            |s| s.applied == 1 && s.dead_lettered == 2,
        )
        .await;
    let stats = running.stop().await;

    // Only the raced reservation came back, once: "not enough stock" and the unserializable
    // audit record were dead-lettered on their first attempt.
    assert_eq!(stats.retried, 1, "{stats:?}");
    assert_eq!(DB::left(&story.pool, &scarce).await, 5);
    assert_eq!(
        DB::left(&story.pool, &contended).await,
        DB::LEFT_AFTER_CONTENTION
    );
    assert_eq!(
        DB::left(&story.pool, &audited).await,
        10,
        "the reservation rolled back with its failed publish"
    );
    assert_eq!(
        DB::outbox_rows(&story.pool).await,
        1,
        "one Reserved, for the race"
    );

    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    let letter_of = |msg: &Reserve| {
        letters
            .iter()
            .find(|l| serde_json::from_slice::<Reserve>(&l.body).unwrap().id == msg.id)
            .unwrap_or_else(|| panic!("no dead letter for {}: {letters:?}", msg.sku))
    };
    let out_of_stock = letter_of(&too_many);
    assert_eq!(out_of_stock.reason(), "rejected");
    assert_eq!(out_of_stock.headers["x-idem-attempts"], "1");
    assert_eq!(
        out_of_stock.headers["x-idem-error"],
        format!("not enough stock for {scarce}: 10 wanted, 5 left")
    );
    let audit = letter_of(&unauditable);
    assert_eq!(audit.reason(), "rejected");
    assert_eq!(audit.headers["x-idem-attempts"], "1");
    let text = &audit.headers["x-idem-error"];
    assert!(
        text.starts_with("publishing failed: cannot publish the Audit message"),
        "{text}"
    );
    assert_eq!(
        text.matches("key must be a string").count(),
        1,
        "the cause is printed once: {text}"
    );
    story.end().await;
}
