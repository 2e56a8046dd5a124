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
//! - Messages: [`Message`] (derive it) for what a handler consumes, its [`Key`],
//!   [`DecodeError`]; [`Publish`] (derive it) for a type this service only publishes.
//! - Handlers: [`Handler`] (or `#[handler]`), the transaction handle [`Tx`] (with
//!   [`Tx::publish`] and its [`PublishError`]), [`HandlerError`] and its [`ErrorClass`];
//!   [`Classify`] makes your own error type say its class.
//! - Databases: [`Backend`] for [`Postgres`] and [`Sqlite`] (features `postgres`, `sqlite`):
//!   connect, migrate.
//! - Failures: [`RetryPolicy`], the dead-letter [`Reason`]s, idem's own [`Error`].
//! - [`outbox`]: messages published in the handler's transaction, or by service code in its own.
//! - [`amqp`] (feature `amqp`): the RabbitMQ adapter — [`amqp::Consumer`] (topology, consume
//!   loop, ack after commit, retries and dead letters with confirms, reconnect, health), the
//!   outbox [`amqp::Relay`] (which declares the queues and exchanges its messages go to), and
//!   [`amqp::Shutdown`]: one SIGTERM / SIGINT handler that stops every loop of a service.
//! - [`transport`]: the unit of work itself, for writing an adapter to another transport.
//!
//! All four features (`postgres`, `sqlite`, `amqp`, `macros`) are on by default; `amqp-tls`
//! adds `amqps://`; `opentelemetry` joins your traces (below).
//!
//! ## Traces
//!
//! Each delivery runs in a `tracing` span named `delivery` (consumer, key, message id,
//! correlation id, `traceparent`, redelivered). The W3C trace context headers (`traceparent`,
//! `tracestate`) of the inbound message are carried onto everything its handler publishes.
//!
//! With the feature `opentelemetry`, the delivery span continues the producer's trace: its
//! OpenTelemetry parent is the span that `traceparent` names (a missing or invalid one leaves it
//! a new root; the message is handled all the same). What the handler publishes then carries
//! the delivery span's own context, so the next consumer's span is its child. idem installs no
//! subscriber and no exporter: your service does, with a `tracing-opentelemetry` layer of the
//! version idem is built on (tracing-opentelemetry 0.34, opentelemetry 0.33). Without that layer
//! the feature changes nothing.
//!
//! ```no_run
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! # let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
//! // `exporter`: any span exporter, e.g. opentelemetry-otlp's
//! // `SpanExporter::builder().with_tonic().build()?`.
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_batch_exporter(exporter)
//!     .build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer())
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("payments")));
//! tracing::subscriber::set_global_default(subscriber)?;
//! // ... run the consumers; at exit, `provider.shutdown()` sends what is still buffered.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use idem_core::{
    async_trait, redact_url, Backend, Batch, BatchHandler, BatchTx, BoxError, Classify,
    DecodeError, DecodeErrorKind, Error, ErrorClass, ErrorClassExt, Handler, HandlerError,
    Isolation, Key, KeyError, Message, Metadata, Publish, PublishError, Reason, RetryPolicy, Tx,
};
/// Where a database's idem schema stands: for deploy checks (`idem doctor`).
pub use idem_core::{schema_status, SchemaStatus};

pub use idem_core::{ledger, outbox};

/// The sqlx version idem is built on, for the types handlers use.
pub use idem_core::sqlx;

/// PostgreSQL: a [`Backend`] for the ledger, and the database of a handler's [`Tx`].
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use idem_core::sqlx::Postgres;

/// SQLite: a [`Backend`] for the ledger, and the database of a handler's [`Tx`].
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use idem_core::sqlx::Sqlite;

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use idem_macros::{handler, Message, Publish};

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use idem_amqp as amqp;

/// The unit of work, for writing a transport adapter: what [`amqp`] is built on.
///
/// An adapter turns each delivery into a [`Delivery`](transport::Delivery), calls
/// [`process`](transport::process) (decode → BEGIN → claim → handler → COMMIT) and acts on the
/// [`Outcome`](transport::Outcome): acknowledge after `Applied` / `Duplicate`, publish a retry
/// or dead letter and acknowledge only once the broker confirmed it, hold and run again after
/// `Unavailable`. It never opens, commits or rolls back a transaction itself.
pub mod transport {
    pub use idem_core::{
        delivery_span, process, process_group, Delivery, LockOrder, Outcome, Policy, Processed,
    };
}

/// What the macros' generated code names. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use idem_core::__private::{
        decode_json, error_kind, handle_one, json_message_fingerprint, json_value_parses_as,
        JsonKeyField, JsonSpelling, KeyField, MessageKind, Serialize,
    };
    pub use idem_core::{
        async_trait, BatchHandler, BatchTx, DecodeError, Handler, HandlerError, Key, KeyError,
        Message, Publish, Tx,
    };
}

/// The README's code blocks, compiled as doctests so the quick start cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
