//! A handler on PostgreSQL: docs and lint attributes carried over, a business error type, a
//! non-unit success value; the generated items pass strict lints.
#![deny(warnings, missing_docs, unused_qualifications, rust_2018_idioms)]

use idem::{Handler, Postgres, Tx};

/// A payment to capture.
#[derive(Debug, serde::Deserialize, idem::Message)]
pub struct PaymentRequested {
    /// The key.
    #[idem(key)]
    pub payment_id: uuid::Uuid,
    /// Whose.
    pub account_id: String,
    /// How much.
    pub amount_cents: i64,
}

/// Why a capture fails.
#[derive(Debug)]
pub enum CaptureError {
    /// The database failed.
    Database(sqlx::Error),
    /// No such account.
    UnknownAccount,
}

impl std::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Database(error) => write!(f, "database: {error}"),
            Self::UnknownAccount => f.write_str("unknown account"),
        }
    }
}

impl std::error::Error for CaptureError {}

impl From<sqlx::Error> for CaptureError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

/// Captures a payment: credits the account, in idem's transaction.
#[idem::handler(consumer = "payments")]
#[allow(clippy::needless_return)]
pub async fn capture(tx: &mut Tx<'_, Postgres>, msg: PaymentRequested) -> Result<u64, CaptureError> {
    let done = sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $1 WHERE id = $2")
        .bind(msg.amount_cents)
        .bind(&msg.account_id)
        .execute(tx.conn())
        .await?;
    if done.rows_affected() == 0 {
        return Err(CaptureError::UnknownAccount);
    }
    return Ok(done.rows_affected());
}

mod inner {
    use idem::{sqlx, Postgres, Tx};

    /// The lint attribute reaches the body, where the unused variable is.
    #[idem::handler(consumer = "audit")]
    #[allow(unused_variables)]
    pub(crate) async fn audit(_tx: &mut Tx<'_, Postgres>, _msg: super::PaymentRequested) -> Result<(), String> {
        let unused = 1;
        Ok(())
    }

    #[idem::handler(consumer = "alias-result")]
    pub(crate) async fn aliased(_tx: &mut Tx<'_, Postgres>, _msg: super::PaymentRequested) -> sqlx::Result<()> {
        Ok(())
    }
}

fn assert_handler<H>(handler: H, consumer: &str)
where
    H: Handler<Postgres, Message = PaymentRequested> + Clone + Copy + Default + std::fmt::Debug,
{
    assert_eq!(handler.consumer(), consumer);
}

fn main() {
    assert_handler(capture, "payments");
    assert_handler(inner::audit, "audit");
    assert_handler(inner::aliased, "alias-result");
    assert_eq!(format!("{capture:?}"), "capture");
}
