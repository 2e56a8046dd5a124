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
/// #     fn decode(b: &[u8]) -> Result<Self, idem_core::DecodeError> { serde_json::from_slice(b).map_err(|e| idem_core::DecodeError::malformed(e.to_string())) }
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
    /// including the ledger claim; the error's [`ErrorClass`] decides between a retry later and
    /// the dead-letter queue.
    async fn handle(&self, tx: &mut Tx<'_, DB>, message: Self::Message)
        -> Result<(), HandlerError>;
}

/// Whether trying a failed message again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Try again later (with backoff, up to the retry policy's attempts): a deadlock, a
    /// serialization failure, a lock timeout, a panic, an error idem cannot classify.
    Transient,
    /// Trying again cannot help: dead-letter at once as `rejected` (a constraint violation, a
    /// business rule the message breaks).
    Permanent,
}

/// A handler's failure. Any error converts into it with `?`.
///
/// The conversion classifies it: sqlx errors by what the database said (deadlock, serialization
/// failure, lock timeout: transient; constraint violations, bad SQL, decode errors: permanent),
/// anything else as transient, because a retry of something permanent costs a few attempts and
/// ends in the dead-letter queue anyway, while dead-lettering something transient at once makes
/// an operator replay it by hand. Say it yourself with [`HandlerError::permanent`] /
/// [`HandlerError::transient`] or, on a `Result`, [`ErrorClassExt`]:
///
/// ```
/// use idem_core::{ErrorClassExt, HandlerError};
/// fn check(amount: i64) -> Result<(), HandlerError> {
///     if amount > 1_000_000 {
///         return Err(HandlerError::permanent("amount over the single-capture limit"));
///     }
///     "42".parse::<i64>().permanent()?;
///     Ok(())
/// }
/// ```
pub struct HandlerError {
    source: BoxError,
    class: Option<ErrorClass>,
}

impl HandlerError {
    /// An error that a later attempt may not hit: retried with backoff.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self {
            source: error.into(),
            class: Some(ErrorClass::Transient),
        }
    }

    /// An error no retry can fix: dead-lettered at once with reason `rejected`.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self {
            source: error.into(),
            class: Some(ErrorClass::Permanent),
        }
    }

    /// Whether a retry can help: as constructed, or as classified from the error itself.
    pub fn class(&self) -> ErrorClass {
        match self.class {
            Some(class) => class,
            None => crate::classify::class_of(&*self.source),
        }
    }

    /// Whether the class was said explicitly ([`HandlerError::transient`],
    /// [`HandlerError::permanent`]) rather than inferred.
    pub(crate) fn explicit_class(&self) -> Option<ErrorClass> {
        self.class
    }

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
            class: None,
        }
    }
}

/// Marks the error of a `Result` as transient or permanent, for `?` in a handler.
pub trait ErrorClassExt<T> {
    /// Fails with a [`HandlerError::transient`].
    fn transient(self) -> Result<T, HandlerError>;
    /// Fails with a [`HandlerError::permanent`].
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ErrorClassExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }

    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
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
