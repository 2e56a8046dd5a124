//! The transaction handle a handler receives.

use crate::backend::Backend;
use crate::delivery::Metadata;
use crate::key::Key;
use crate::message::Publish;
use crate::outbox::{handler_message_id, Outgoing, PublishError, Route};
use uuid::Uuid;

/// The W3C Trace Context headers (`traceparent`, `tracestate`) carried from a delivery onto
/// everything its handler publishes.
const TRACE_CONTEXT: [&str; 2] = ["traceparent", "tracestate"];

/// The handler's only door to the database: the open transaction in which idem has already
/// claimed this message's key.
///
/// It lends out the connection for queries ([`Tx::conn`]) but never the transaction itself or
/// the pool, so a handler cannot commit, roll back, or write outside the transaction: idem
/// commits the ledger claim and the handler's effect together, then acknowledges. (The
/// compile-fail tests of `idem-macros` prove that `tx.commit()` and a pool argument do not
/// compile.)
pub struct Tx<'t, DB: Backend> {
    conn: &'t mut DB::Connection,
    consumer: &'t str,
    key: &'t Key,
    metadata: &'t Metadata,
    /// Messages published so far: the ordinal in the next message id.
    published: u32,
}

impl<'t, DB: Backend> Tx<'t, DB> {
    pub(crate) fn new(
        conn: &'t mut DB::Connection,
        consumer: &'t str,
        key: &'t Key,
        metadata: &'t Metadata,
    ) -> Self {
        Self {
            conn,
            consumer,
            key,
            metadata,
            published: 0,
        }
    }

    /// Its parts, for a batch handler's handle of one message ([`BatchTx`](crate::BatchTx)):
    /// the published count is shared, so ids stay in sequence.
    pub(crate) fn parts(
        &mut self,
    ) -> (
        &mut DB::Connection,
        &'t str,
        &'t Key,
        &'t Metadata,
        &mut u32,
    ) {
        (
            self.conn,
            self.consumer,
            self.key,
            self.metadata,
            &mut self.published,
        )
    }

    /// A handle that goes on numbering the messages it publishes after `published`.
    pub(crate) fn resumed(mut self, published: u32) -> Self {
        self.published = published;
        self
    }

    /// How many messages this handle has published.
    pub(crate) fn published(&self) -> u32 {
        self.published
    }

    /// The connection inside the transaction, for `sqlx::query(..).execute(tx.conn())`.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.conn
    }

    /// The consumer this handler runs as (the ledger's scope).
    pub fn consumer(&self) -> &str {
        self.consumer
    }

    /// The idempotency key claimed for this message.
    pub fn key(&self) -> &Key {
        self.key
    }

    /// The delivery's transport metadata (message id, correlation id, headers, ...).
    pub fn metadata(&self) -> &Metadata {
        self.metadata
    }

    /// Publishes `message` (as JSON) to the queue named after its kind, through the outbox:
    /// the row is written in this transaction, so the message goes out if and only if the
    /// handler's effect commits. See [`Tx::publish_to`].
    ///
    /// # Errors
    ///
    /// [`PublishError`]: the message does not serialize, or the outbox row was not written.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use idem_core::{Publish, PublishError, Tx};
    /// #[derive(serde::Serialize)] // with idem: #[derive(serde::Serialize, idem::Publish)]
    /// struct StockReserved { order_id: String, quantity: i64 }
    /// # impl Publish for StockReserved { const KIND: &'static str = "inventory.reserved"; }
    ///
    /// async fn reserved(tx: &mut Tx<'_, sqlx::Postgres>) -> Result<(), PublishError> {
    ///     // Goes to the queue `inventory.reserved` once this transaction commits, never before.
    ///     tx.publish(&StockReserved { order_id: "o-1".into(), quantity: 3 }).await?;
    ///     Ok(())
    /// }
    /// ```
    pub async fn publish<M: Publish>(&mut self, message: &M) -> Result<Uuid, PublishError> {
        self.publish_to(Route::queue(M::KIND), message).await
    }

    /// Publishes `message` along `route` through the outbox, in this transaction.
    ///
    /// The message id is UUIDv5 of (consumer, inbound key, how many this handler published
    /// before): a run of the handler after a crash emits the same ids, and the next consumer
    /// deduplicates them. The correlation id is the inbound one (or, when the inbound message
    /// had none, its message id: the flow starts here); the causation id is the inbound message
    /// id. Returns the message id.
    ///
    /// The W3C trace context (`traceparent`, `tracestate`) is the inbound message's; with the
    /// feature `opentelemetry` and a `tracing-opentelemetry` layer installed, it is the current
    /// span's instead (the delivery span, or a span of yours inside it), so the next consumer's
    /// span is a child of this one. A header `route` sets itself wins.
    ///
    /// # Errors
    ///
    /// [`PublishError`]: the message does not serialize (permanent), or the outbox row was not
    /// written (what the database said decides). It converts into a
    /// [`HandlerError`](crate::HandlerError) with `?`, or into your own error with `#[from]`.
    pub async fn publish_to<M: Publish>(
        &mut self,
        route: Route,
        message: &M,
    ) -> Result<Uuid, PublishError> {
        let id = handler_message_id(self.consumer, self.key.as_str(), self.published);
        self.published += 1;
        let mut outgoing = Outgoing::json(message, id)
            .map_err(|source| PublishError::Serialize {
                kind: M::KIND,
                source,
            })?
            .route(route);
        let inbound = &self.metadata;
        outgoing.correlation_id = inbound
            .correlation_id
            .clone()
            .or_else(|| inbound.message_id.clone());
        outgoing.causation_id = inbound.message_id.clone();
        // W3C trace context: what the handler publishes continues the inbound message's trace
        // (a header the route sets itself wins). With OpenTelemetry, as a child of the span
        // publishing it (the delivery span or one inside it), so the next hop nests under this
        // one instead of beside it.
        #[cfg(feature = "opentelemetry")]
        let here = crate::otel::current_trace_context();
        #[cfg(not(feature = "opentelemetry"))]
        let here: Option<std::collections::BTreeMap<String, String>> = None;
        match here {
            Some(context) => {
                for (name, value) in context {
                    outgoing.route.headers.entry(name).or_insert(value);
                }
            }
            None => {
                for name in TRACE_CONTEXT {
                    if let Some(value) = inbound.headers.get(name) {
                        outgoing
                            .route
                            .headers
                            .entry(name.to_owned())
                            .or_insert_with(|| value.clone());
                    }
                }
            }
        }
        DB::enqueue(self.conn, &outgoing)
            .await
            .map_err(|source| PublishError::Outbox {
                kind: M::KIND,
                message_id: id,
                source,
            })?;
        Ok(id)
    }
}

impl<DB: Backend> std::fmt::Debug for Tx<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("backend", &DB::NAME)
            .field("consumer", &self.consumer)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
