//! The handler trait: what runs inside the transaction.

use crate::backend::Backend;
use crate::batch::BatchHandler;
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

    /// The same handler for whole batches, if it has one: with group commit, a group's claimed
    /// messages then go to [`BatchHandler::handle_batch`] in one call instead of one
    /// [`Handler::handle`] each. `None` (the default): one call per message.
    /// [`Batch`](crate::Batch) and `#[idem::handler(…, batch)]` answer `Some`.
    fn batch(&self) -> Option<&dyn BatchHandler<DB, Message = Self::Message>> {
        None
    }
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

/// An error type of yours that says its own [`ErrorClass`]: implement it, and a handler that
/// returns your error gets that class with no further ceremony.
///
/// `class` answers for the error itself; `None` means "I do not know: read my source chain", so
/// a variant that wraps a database error keeps what the database said (a serialization failure
/// is retried, a constraint violation is rejected, a lost server is waited for).
///
/// ```
/// use idem_core::{Classify, ErrorClass, Tx};
/// # #[derive(Debug, serde::Deserialize)] struct Reserve { sku: String, quantity: i64 }
/// # impl idem_core::Message for Reserve {
/// #     const KIND: &'static str = "Reserve";
/// #     fn decode(b: &[u8]) -> Result<Self, idem_core::DecodeError> { serde_json::from_slice(b).map_err(|e| idem_core::DecodeError::malformed(e.to_string())) }
/// #     fn key(&self) -> Result<Option<idem_core::Key>, idem_core::KeyError> { Ok(None) }
/// # }
///
/// #[derive(Debug, thiserror::Error)]
/// enum ReserveError {
///     #[error("not enough stock for {sku}: {wanted} wanted, {left} left")]
///     OutOfStock { sku: String, wanted: i64, left: i64 },
///     #[error("the stock service is being re-indexed")]
///     Reindexing,
///     #[error(transparent)]
///     Db(#[from] sqlx::Error),
///     #[error("publishing the reservation failed")]
///     Publish(#[from] idem_core::PublishError),
/// }
///
/// impl Classify for ReserveError {
///     fn class(&self) -> Option<ErrorClass> {
///         match self {
///             // A business rule: no retry brings stock back. Dead-lettered at once, `rejected`.
///             Self::OutOfStock { .. } => Some(ErrorClass::Permanent),
///             Self::Reindexing => Some(ErrorClass::Transient),
///             // What the database (or the outbox) said decides: idem reads the source chain.
///             Self::Db(_) | Self::Publish(_) => None,
///         }
///     }
/// }
///
/// // With `#[idem::handler(consumer = "stock")]` on it, this is the whole handler: every `?`
/// // lands in `ReserveError`, and idem asks `ReserveError::class` what to do with a failure.
/// async fn reserve(tx: &mut Tx<'_, sqlx::Sqlite>, msg: Reserve) -> Result<(), ReserveError> {
///     let left: i64 = sqlx::query_scalar("SELECT quantity FROM stock WHERE sku = $1")
///         .bind(&msg.sku)
///         .fetch_one(tx.conn())
///         .await?;
///     if left < msg.quantity {
///         return Err(ReserveError::OutOfStock { sku: msg.sku, wanted: msg.quantity, left });
///     }
///     sqlx::query("UPDATE stock SET quantity = quantity - $1 WHERE sku = $2")
///         .bind(msg.quantity)
///         .bind(&msg.sku)
///         .execute(tx.conn())
///         .await?;
///     Ok(())
/// }
/// ```
///
/// Where the class is read:
///
/// - **`#[idem::handler]`** functions returning `Result<_, YourError>`: idem sees `YourError`'s
///   type and uses this trait. Nothing else to write.
/// - **A hand-written [`Handler`]** returns [`HandlerError`]: convert with
///   `.map_err(HandlerError::classified)?` (or return `Err(HandlerError::classified(error))`).
///   A bare `?` converts through `From`, which boxes the error without knowing it implements
///   `Classify` (Rust has no specialization): its class is then read from the source chain
///   only, as for any other error.
/// - **The source chain** (`#[source]`, `#[from]`, `#[error(transparent)]`): the first error in
///   the chain that says its class wins. idem reads the errors it knows there — sqlx errors,
///   the database's own errors below them, [`PublishError`](crate::PublishError) — but not
///   another type's `Classify` impl: an error of yours wrapped in an error of yours answers
///   for it in its own `class` (`Self::Inventory(inner) => inner.class()`).
/// - **`#[error(transparent)]`** over a `sqlx::Error` forwards `source()` past the
///   `sqlx::Error` itself to the database's error below it: idem still reads the database's
///   code (SQLSTATE, SQLite result code) and an I/O failure, so database errors keep their
///   class. A sqlx error with no database error below it (`RowNotFound`, a column that does not
///   decode, `PoolTimedOut`) is then out of sight and counts as transient; wrap sqlx errors
///   with `#[error("…")] Db(#[from] sqlx::Error)` to keep those classes too, or match them in
///   `class`.
///
/// An explicit `Some` is taken as said, like [`HandlerError::permanent`]: return `None` for a
/// variant that wraps a database error, so idem can also tell a lost database (the delivery is
/// held, no attempt counted) from the handler's own failure.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not say its error class to idem",
    label = "`{Self}` does not implement `idem::Classify`",
    note = "implement `idem::Classify` for `{Self}` (`fn class(&self) -> Option<ErrorClass>`), or say the class at the call: `HandlerError::permanent(error)` / `HandlerError::transient(error)`"
)]
pub trait Classify: std::error::Error + Send + Sync + 'static {
    /// The class of this error, or `None` to let idem read the source chain (sqlx errors in it
    /// keep their class; with nothing idem knows there, transient).
    fn class(&self) -> Option<ErrorClass>;
}

/// A handler's failure. Any error converts into it with `?`.
///
/// The conversion classifies it: sqlx errors by what the database said (deadlock, serialization
/// failure, lock or statement timeout: transient; constraint violations, bad SQL, decode
/// errors: permanent; out of connections, shutting down, disk full, read-only: the database is
/// away, so the delivery is held without counting an attempt), anything else as transient,
/// because a retry of something permanent costs a few attempts and ends in the dead-letter
/// queue anyway, while dead-lettering something transient at once makes an operator replay it
/// by hand. Say it yourself with [`HandlerError::permanent`] / [`HandlerError::transient`] or,
/// on a `Result`, [`ErrorClassExt`]:
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
///
/// # Your own error type
///
/// Implement [`Classify`] for it (a full example is there): an `#[idem::handler]` function
/// returning `Result<_, YourError>` then gets each error's class, and a hand-written handler
/// converts with [`HandlerError::classified`]. Do **not** write
/// `impl From<YourError> for HandlerError`: it collides with the conversion every error
/// already has (error E0119, "conflicting implementations of trait `From<YourError>`"), and
/// `Classify` is what that `From` was meant to say.
///
/// `HandlerError` is not itself a [`std::error::Error`] (like `anyhow::Error`: an error type
/// that converts from every error cannot be one, or it would convert from itself twice). To
/// put idem's errors in your own error enum with `#[from]`, use the typed errors idem's calls
/// return, such as [`PublishError`](crate::PublishError) from [`Tx::publish`](crate::Tx::publish).
///
/// Its `Display` prints the whole source chain, `: `-separated, leaving out a cause whose text
/// is already printed (as with `#[error("reserving failed: {0}")]` over a `#[source]`).
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

    /// An error that says its own class ([`Classify`]): what an `#[idem::handler]` function's
    /// error goes through, and what a hand-written handler calls —
    /// `reserve(tx, &msg).await.map_err(HandlerError::classified)?`. `None` from
    /// [`Classify::class`] leaves the class to the error's source chain.
    pub fn classified<E: Classify>(error: E) -> Self {
        Self {
            class: error.class(),
            source: Box::new(error),
        }
    }

    /// Whether a retry can help: as constructed, or as classified from the error's source
    /// chain (the first error in it that idem can read decides; transient when none).
    pub fn class(&self) -> ErrorClass {
        match self.class {
            Some(class) => class,
            None => crate::classify::class_of(&*self.source),
        }
    }

    /// Whether the class was said explicitly ([`HandlerError::transient`],
    /// [`HandlerError::permanent`], a [`Classify`] impl's `Some`) rather than inferred.
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

/// Every error (and `String`, `&str`, `anyhow::Error`, a boxed error) converts with `?`; its
/// class is read from its source chain, as [`HandlerError`] says.
///
/// This one impl covers every error type, yours included, so `impl From<YourError> for
/// HandlerError` does not compile (E0119): implement [`Classify`] for your error instead.
// Why not `impl<E: Classify> From<E>` beside this one: both would apply to an error type that
// implements `Classify`, and without specialization Rust rejects the overlap. Why not read a
// `Classify` impl from the boxed error later: a `dyn Error` offers no stable way to ask for
// another trait (`Error::provide` is unstable), short of a registry of types. So the class of
// a `Classify` type is taken where its type is still known: `HandlerError::classified`, which
// `#[idem::handler]` picks for such types (`__private::error_kind`).
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
        // The whole chain: the dead letter's error text is all an operator gets at 3 a.m. A
        // cause whose text is already there is left out: `#[error("…: {0}")]` over a
        // `#[source]`, `#[error(transparent)]`, and sqlx's "error returned from database: …"
        // over the database's own error all print their cause themselves.
        let mut printed = self.source.to_string();
        let mut next = self.source.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !printed.contains(text.as_str()) {
                printed.push_str(": ");
                printed.push_str(&text);
            }
            next = cause.source();
        }
        f.write_str(&printed)
    }
}

/// How `#[idem::handler]` turns the function's error into a [`HandlerError`]: through
/// [`HandlerError::classified`] when the error type implements [`Classify`], through `From`
/// otherwise. The choice is made at compile time by method resolution on the concrete type
/// (auto-ref specialization): a method found on `&E` (needs `E: Classify`) is preferred over
/// one found only on `&&E` (any `E`). Not an API.
#[doc(hidden)]
pub mod error_kind {
    use super::{Classify, HandlerError};

    /// The error type implements [`Classify`].
    pub struct Classified;
    /// Any other error type.
    pub struct Plain;

    /// Found first, for `E: Classify`.
    pub trait ClassifiedKind {
        /// The tag.
        fn __idem_error_kind(&self) -> Classified {
            Classified
        }
    }
    impl<E: Classify> ClassifiedKind for E {}

    /// Found one auto-ref later, for any type.
    pub trait PlainKind {
        /// The tag.
        fn __idem_error_kind(&self) -> Plain {
            Plain
        }
    }
    impl<E> PlainKind for &E {}

    impl Classified {
        /// [`HandlerError::classified`].
        pub fn into_handler_error<E: Classify>(self, error: E) -> HandlerError {
            HandlerError::classified(error)
        }
    }

    impl Plain {
        /// `HandlerError::from`: the error's class comes from its source chain.
        pub fn into_handler_error<E: IntoHandlerError>(self, error: E) -> HandlerError {
            error.into_handler_error()
        }
    }

    /// What a handler function may return as its error; here for the compile error that says
    /// so when it is not.
    #[diagnostic::on_unimplemented(
        message = "an idem handler cannot return `{Self}` as its error",
        label = "`{Self}` does not convert into `idem::HandlerError`",
        note = "return a type that implements `std::error::Error + Send + Sync + 'static` (and `idem::Classify`, to say each error's class), or `String`, `anyhow::Error`, `idem::HandlerError`"
    )]
    pub trait IntoHandlerError {
        /// `HandlerError::from`.
        fn into_handler_error(self) -> HandlerError;
    }
    impl<E> IntoHandlerError for E
    where
        HandlerError: From<E>,
    {
        fn into_handler_error(self) -> HandlerError {
            HandlerError::from(self)
        }
    }
}
