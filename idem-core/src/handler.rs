//! The handler trait: what runs inside the transaction.

use crate::backend::Backend;
use crate::message::Message;
use crate::tx::Tx;

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A message handler: the business effect of one message, run inside idem's transaction.
///
/// `#[idem::handler(consumer = "...")]` writes this impl for an `async fn`; writing it by hand is
/// just as supported:
///
/// ```
/// use idem_core::{async_trait, Handler, HandlerError, Tx};
/// # #[derive(Debug, serde::Deserialize)] struct Ping { id: u64 }
/// # impl idem_core::Message for Ping {
/// #     const KIND: &'static str = "Ping";
/// #     fn decode(b: &[u8]) -> Result<Self, idem_core::DecodeError> { idem_core::decode_json(b, None) }
/// #     fn key(&self) -> Result<Option<idem_core::Key>, idem_core::KeyError> { Ok(None) }
/// # }
/// struct CountPings;
///
/// #[async_trait]
/// impl Handler<sqlx::Sqlite> for CountPings {
///     type Message = Ping;
///     fn consumer(&self) -> &str { "pings" }
///     async fn handle(&self, tx: &mut Tx<'_, sqlx::Sqlite>, ping: Ping) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE counters SET n = n + 1").execute(tx.conn()).await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Handler<DB: Backend>: Send + Sync + 'static {
    /// The message this handler consumes.
    type Message: Message;

    /// The consumer name: the ledger's scope. Two consumers of the same message each apply it
    /// once; renaming a consumer makes it forget what it has processed.
    fn consumer(&self) -> &str;

    /// Applies the message's effect through `tx`. Returning an error rolls back everything,
    /// including the ledger claim.
    async fn handle(&self, tx: &mut Tx<'_, DB>, message: Self::Message)
        -> Result<(), HandlerError>;
}

/// A handler's failure. Any error converts into it with `?`.
pub struct HandlerError {
    source: BoxError,
}

impl HandlerError {
    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Takes out the underlying error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self {
            source: error.into(),
        }
    }
}

impl std::fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.source, f)
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The whole chain: the dead letter's error text is all an operator gets at 3 a.m.
        write!(f, "{}", self.source)?;
        let mut next = self.source.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}
