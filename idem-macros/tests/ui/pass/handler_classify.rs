//! A handler function whose error type implements `idem::Classify` compiles as it is (the
//! macro picks `HandlerError::classified` for it), and so do ones returning a plain error,
//! `HandlerError` itself, a `String` and idem's `PublishError`.
#![deny(warnings)]

use idem::{Classify, ErrorClass, HandlerError, PublishError, Sqlite, Tx};

#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
struct Reserve {
    #[idem(key)]
    id: uuid::Uuid,
    sku: String,
}

#[derive(Debug)]
enum ReserveError {
    OutOfStock(String),
    Db(sqlx::Error),
}

impl std::fmt::Display for ReserveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutOfStock(sku) => write!(f, "not enough stock for {sku}"),
            Self::Db(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for ReserveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::OutOfStock(_) => None,
            Self::Db(error) => Some(error),
        }
    }
}

impl From<sqlx::Error> for ReserveError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(error)
    }
}

impl Classify for ReserveError {
    fn class(&self) -> Option<ErrorClass> {
        match self {
            Self::OutOfStock(_) => Some(ErrorClass::Permanent),
            Self::Db(_) => None,
        }
    }
}

#[idem::handler(consumer = "stock")]
async fn reserve(tx: &mut Tx<'_, Sqlite>, msg: Reserve) -> Result<(), ReserveError> {
    sqlx::query("SELECT 1").execute(tx.conn()).await?;
    if msg.sku.is_empty() {
        return Err(ReserveError::OutOfStock(msg.sku));
    }
    Ok(())
}

#[idem::handler(consumer = "stock-sqlx")]
async fn plain(tx: &mut Tx<'_, Sqlite>, _msg: Reserve) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(tx.conn()).await?;
    Ok(())
}

#[idem::handler(consumer = "stock-handler-error")]
async fn told(_tx: &mut Tx<'_, Sqlite>, msg: Reserve) -> Result<(), HandlerError> {
    Err(HandlerError::permanent(format!("{} is discontinued", msg.sku)))
}

#[idem::handler(consumer = "stock-string")]
async fn text(_tx: &mut Tx<'_, Sqlite>, msg: Reserve) -> Result<(), String> {
    Err(format!("{} is discontinued", msg.sku))
}

#[idem::handler(consumer = "stock-publish")]
async fn announce(tx: &mut Tx<'_, Sqlite>, msg: Reserve) -> Result<(), PublishError> {
    tx.publish(&Reserve { id: msg.id, sku: msg.sku }).await?;
    Ok(())
}

fn main() {
    let _ = (reserve, plain, told, text, announce);
    let said = HandlerError::classified(ReserveError::OutOfStock("sku-1".into()));
    assert_eq!(said.class(), ErrorClass::Permanent);
}
