//! # idem: effectively-once RabbitMQ consumers
//!
//! Brokers deliver at least once; acks get lost; consumers crash between writing and acking.
//! idem runs every delivery as **one database transaction** — claim the message's idempotency
//! key in a dedup ledger, run your handler's side effect, commit — and acknowledges RabbitMQ
//! only after the commit. A redelivered copy finds its key in the ledger and is acknowledged
//! without running the handler again. Transient failures come back through delay queues with
//! backoff; bad input, reused keys and messages that crash the process are dead-lettered with a
//! reason; what a handler publishes goes through a transactional outbox.
//!
//! ## Quick start
//!
//! ```no_run
//! use idem::{amqp::Consumer, Backend, Sqlite, Tx};
//!
//! #[derive(Debug, serde::Deserialize, idem::Message)]
//! struct PaymentRequested {
//!     #[idem(key)]
//!     payment_id: uuid::Uuid,
//!     account_id: String,
//!     amount_cents: i64,
//! }
//!
//! #[idem::handler(consumer = "payments")]
//! async fn capture(tx: &mut Tx<'_, Sqlite>, msg: PaymentRequested) -> Result<(), sqlx::Error> {
//!     sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $1 WHERE id = $2")
//!         .bind(msg.amount_cents)
//!         .bind(&msg.account_id)
//!         .execute(tx.conn())
//!         .await?;
//!     Ok(()) // idem commits ledger claim + effect, then acks
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Sqlite::connect("sqlite://payments.db", 4).await?;
//! Sqlite::migrate(&pool).await?;
//! Consumer::builder(pool, capture)
//!     .queue("payments") // and payments.dlq, payments.retry.1s, .2s, ...
//!     .build()?
//!     // Reconnects by itself; SIGTERM/SIGINT finishes what is in flight, then returns.
//!     .serve("amqp://guest:guest@127.0.0.1:5672/%2f", idem::amqp::shutdown_signal())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## What is where
//!
//! - [`idem_core`] (re-exported here): [`Message`], [`Key`], [`Handler`], [`Tx`] (with
//!   [`Tx::publish`]), [`HandlerError`] and its [`ErrorClass`], [`RetryPolicy`] and [`Policy`],
//!   the ledger ([`Backend`] for PostgreSQL and SQLite), [`outbox`] and [`process`], the unit of
//!   work.
//! - `#[derive(Message)]` and `#[handler]` (feature `macros`): shorthand for those traits.
//! - [`amqp`] (feature `amqp`): the RabbitMQ adapter — topology (queue, dead-letter queue, delay
//!   queues), consume loop, ack after commit, retries and dead letters with confirms, reconnect,
//!   health, and the outbox [`amqp::Relay`].
//!
//! Features `postgres` and `sqlite` select the ledger backends; all four are on by default.

pub use idem_core::*;

#[cfg(feature = "macros")]
pub use idem_macros::{handler, Message};

#[cfg(feature = "amqp")]
pub use idem_amqp as amqp;

/// The sqlx version idem is built on, for the types handlers use.
pub use idem_core::sqlx;

#[cfg(feature = "postgres")]
pub use idem_core::sqlx::Postgres;

#[cfg(feature = "sqlite")]
pub use idem_core::sqlx::Sqlite;

/// What the macros' generated code names. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use idem_core::{
        async_trait, decode_json, json_fingerprint, json_value_parses_as, DecodeError, Handler,
        HandlerError, JsonKeyField, Key, KeyError, KeyField, Message, Tx,
    };
}

/// The README's code blocks, compiled as doctests so the quick start cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
