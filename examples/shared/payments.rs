//! The payments service proper — its messages, its handler and its tables — shared by the
//! payments example (`examples/payments.rs`) and the orders demo (`examples/orders.rs`, whose
//! `demo` runs the payments consumer in its own process). Not an example by itself: cargo only
//! builds `examples/*.rs` and `examples/*/main.rs`.

use idem::outbox::Route;
use idem::{
    async_trait, Backend, BatchHandler, BatchTx, Handler, HandlerError, Postgres, Sqlite, Tx,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use uuid::Uuid;

/// The consumer name of the payments service: the scope of its ledger rows.
pub const CONSUMER: &str = "payments";

/// A request to capture a payment. Every field is validated while decoding: anything else is
/// dead-lettered as `malformed` (or `missing-key`) before a transaction is even opened.
/// `Serialize` is for producers that share this type (the orders service).
#[derive(Debug, Serialize, Deserialize, idem::Message)]
#[idem(kind = "payment.requested")]
pub struct PaymentRequested {
    #[idem(key)]
    pub payment_id: Uuid,
    pub account_id: AccountId,
    pub amount_cents: PositiveCents,
    pub currency: Currency,
    /// The order this payment pays, when the orders service asked for it: the capture is then
    /// announced to the orders service as [`PaymentCaptured`]. Absent in a plain payment, which
    /// is captured exactly as before and announces nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// What the payments service announces after capturing a payment an order asked for. Keyed by
/// the payment: the orders service's ledger marks an order paid once per payment.
#[derive(Debug, Serialize, Deserialize, idem::Message)]
#[idem(kind = "payment.captured")]
pub struct PaymentCaptured {
    pub order_id: String,
    #[idem(key)]
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
}

/// 1 to 64 characters. (Serializes as the plain string: `try_from` only shapes `Deserialize`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct AccountId(pub String);

impl TryFrom<String> for AccountId {
    type Error = String;
    fn try_from(id: String) -> Result<Self, String> {
        match id.chars().count() {
            1..=64 => Ok(Self(id)),
            n => Err(format!("account_id must be 1 to 64 characters, got {n}")),
        }
    }
}

/// An amount in cents, greater than zero.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "i64")]
pub struct PositiveCents(pub i64);

impl TryFrom<i64> for PositiveCents {
    type Error = String;
    fn try_from(cents: i64) -> Result<Self, String> {
        if cents > 0 {
            Ok(Self(cents))
        } else {
            Err(format!("amount_cents must be greater than 0, got {cents}"))
        }
    }
}

/// An ISO 4217-shaped code: three capital letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Currency(pub String);

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(code: String) -> Result<Self, String> {
        if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(code))
        } else {
            Err(format!(
                "currency must be three capital letters like \"EUR\", got {code:?}"
            ))
        }
    }
}

// `captures` deliberately has no unique constraint on payment_id: the ledger alone stops
// duplicates, and the tests count these rows to prove it.
const CREATE_TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS accounts (
        account_id    TEXT   PRIMARY KEY,
        balance_cents BIGINT NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS captures (
        id           INTEGER_ID,
        payment_id   TEXT   NOT NULL,
        account_id   TEXT   NOT NULL,
        amount_cents BIGINT NOT NULL,
        currency     TEXT   NOT NULL
    )",
];
const INSERT_CAPTURE: &str =
    "INSERT INTO captures (payment_id, account_id, amount_cents, currency) VALUES ($1, $2, $3, $4)";
// Checked arithmetic in SQL: PostgreSQL would refuse an overflowing BIGINT sum, but SQLite turns
// it into a float. The WHERE keeps the row as it is when the sum would pass i64::MAX (amounts are
// positive), and the handler then sees no row changed.
const CREDIT_ACCOUNT: &str = "INSERT INTO accounts (account_id, balance_cents) VALUES ($1, $2)
     ON CONFLICT (account_id) DO UPDATE SET balance_cents = accounts.balance_cents + excluded.balance_cents
     WHERE accounts.balance_cents <= 9223372036854775807 - excluded.balance_cents";

/// The payments handler. Written by hand rather than with `#[idem::handler]` because it carries
/// configuration: the queue its `payment.captured` announcements go to. It is both a per-message
/// [`Handler`] and a [`BatchHandler`] (`idem::Batch(Capture::new(..))`, the payments example's
/// `IDEM_BATCH_HANDLER`): the same capture for every payment of a group in one call.
pub struct Capture {
    orders_queue: String,
}

impl Capture {
    /// A handler that announces captures of order payments to `orders_queue`.
    pub fn new(orders_queue: impl Into<String>) -> Self {
        Self {
            orders_queue: orders_queue.into(),
        }
    }
}

// One handler body, stamped for both backends because these binaries pick their database at
// run time from DATABASE_URL. A service with one database writes the impls once.
macro_rules! capture_handler {
    ($db:ty, $module:ident) => {
        mod $module {
            use super::*;

            /// Captures a payment: one `captures` row, and the amount credited to the account
            /// (the account row is created at 0 if missing). For an order's payment, returns the
            /// `payment.captured` to announce: through the outbox, in the same transaction, so
            /// the announcement goes out if and only if the capture happened.
            async fn capture(
                conn: &mut <$db as sqlx::Database>::Connection,
                payment: &PaymentRequested,
            ) -> Result<Option<PaymentCaptured>, HandlerError> {
                sqlx::query(INSERT_CAPTURE)
                    .bind(payment.payment_id.to_string())
                    .bind(&payment.account_id.0)
                    .bind(payment.amount_cents.0)
                    .bind(&payment.currency.0)
                    .execute(&mut *conn)
                    .await?;
                let credited = sqlx::query(CREDIT_ACCOUNT)
                    .bind(&payment.account_id.0)
                    .bind(payment.amount_cents.0)
                    .execute(&mut *conn)
                    .await?;
                if credited.rows_affected() != 1 {
                    // Nothing of it is applied: idem rolls back the capture row with the claim.
                    return Err(HandlerError::permanent(format!(
                        "crediting {} cents would overflow the balance of account {}",
                        payment.amount_cents.0, payment.account_id.0
                    )));
                }
                Ok(payment.order_id.as_ref().map(|order_id| PaymentCaptured {
                    order_id: order_id.clone(),
                    payment_id: payment.payment_id,
                    amount_cents: payment.amount_cents.0,
                    currency: payment.currency.0.clone(),
                }))
            }

            #[async_trait]
            impl Handler<$db> for Capture {
                type Message = PaymentRequested;

                fn consumer(&self) -> &str {
                    CONSUMER
                }

                async fn handle(
                    &self,
                    tx: &mut Tx<'_, $db>,
                    payment: PaymentRequested,
                ) -> Result<(), HandlerError> {
                    if let Some(captured) = capture(tx.conn(), &payment).await? {
                        // The id is derived from (consumer, payment id, ordinal): a run of this
                        // handler after a crash writes the same id, so the outbox keeps one row.
                        tx.publish_to(Route::queue(&self.orders_queue), &captured)
                            .await?;
                    }
                    Ok(())
                }
            }

            #[async_trait]
            impl BatchHandler<$db> for Capture {
                type Message = PaymentRequested;

                fn consumer(&self) -> &str {
                    CONSUMER
                }

                /// Every payment of the group in one transaction, in the group's lock order
                /// (accounts sorted: the consumer's `group_lock_order`), so that groups side by
                /// side never deadlock on an account row. A payment that fails fails the call;
                /// idem then splits the group until that payment is alone.
                async fn handle_batch(
                    &self,
                    tx: &mut BatchTx<'_, $db>,
                    payments: Vec<PaymentRequested>,
                ) -> Result<(), HandlerError> {
                    for (i, payment) in payments.iter().enumerate() {
                        if let Some(captured) = capture(tx.conn(), payment).await? {
                            // Numbered on payment i's own key: the same id as when it runs
                            // alone, whichever group it lands in.
                            tx.publish_to_for(i, Route::queue(&self.orders_queue), &captured)
                                .await?;
                        }
                    }
                    Ok(())
                }
            }
        }
    };
}
capture_handler!(Postgres, postgres);
capture_handler!(Sqlite, sqlite);

/// The payments tables and the demos' read-back queries, per backend.
pub trait PaymentsStore: Backend {
    /// Creates `accounts` and `captures` if missing.
    async fn create_tables(pool: &sqlx::Pool<Self>) -> Result<(), sqlx::Error>;
    /// Balances of the accounts whose id starts with `prefix`.
    async fn balances(
        pool: &sqlx::Pool<Self>,
        prefix: &str,
    ) -> Result<HashMap<String, i64>, sqlx::Error>;
    /// Capture rows per payment id, of the accounts whose id starts with `prefix`.
    async fn captures(
        pool: &sqlx::Pool<Self>,
        prefix: &str,
    ) -> Result<HashMap<String, i64>, sqlx::Error>;
}

macro_rules! payments_store {
    ($db:ty, $id_column:literal, $lock:literal) => {
        impl PaymentsStore for $db {
            async fn create_tables(pool: &sqlx::Pool<Self>) -> Result<(), sqlx::Error> {
                let mut tx = pool.begin().await?;
                // Two consumers starting at once must not race on CREATE TABLE.
                if !$lock.is_empty() {
                    sqlx::query($lock).execute(&mut *tx).await?;
                }
                for sql in CREATE_TABLES {
                    // Only the example's own column type is written into its DDL.
                    let sql = sqlx::AssertSqlSafe(sql.replace("INTEGER_ID", $id_column));
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                tx.commit().await
            }
            async fn balances(pool: &sqlx::Pool<Self>, prefix: &str) -> Result<HashMap<String, i64>, sqlx::Error> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT account_id, balance_cents FROM accounts WHERE account_id LIKE $1")
                        .bind(format!("{prefix}%"))
                        .fetch_all(pool)
                        .await?;
                Ok(rows.into_iter().collect())
            }
            async fn captures(pool: &sqlx::Pool<Self>, prefix: &str) -> Result<HashMap<String, i64>, sqlx::Error> {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT payment_id, COUNT(*) FROM captures WHERE account_id LIKE $1 GROUP BY payment_id",
                )
                .bind(format!("{prefix}%"))
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().collect())
            }
        }
    };
}
payments_store!(
    Postgres,
    "BIGSERIAL PRIMARY KEY",
    "SELECT pg_advisory_xact_lock(4931402250211918)"
);
payments_store!(Sqlite, "INTEGER PRIMARY KEY AUTOINCREMENT", "");
