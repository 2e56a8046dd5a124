//! The transactional outbox: a message to publish is written in the same transaction as the
//! effect that caused it, and a relay publishes it after the commit. Either both the effect and
//! the message happen or neither does — no dual write.
//!
//! Two ways in:
//!
//! - inside a handler, [`Tx::publish`](crate::Tx::publish) / [`Tx::publish_to`](crate::Tx::publish_to):
//!   the message id is derived from (consumer, inbound key, ordinal), so a handler that runs
//!   again after a crash emits the same ids and the next consumer deduplicates them;
//! - from service code, [`enqueue`] on the caller's own sqlx transaction, with an id from
//!   [`stable_id`] of a business key, so a producer that restarts re-creates the same id and
//!   the outbox keeps one row.
//!
//! ```no_run
//! # async fn place(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use idem_core::outbox::{self, Outgoing, Route};
//! #[derive(serde::Serialize)] // with idem: #[derive(serde::Serialize, idem::Publish)]
//! struct PaymentRequested { order_id: String }
//! impl idem_core::Publish for PaymentRequested {
//!     const KIND: &'static str = "payment.requested";
//! }
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (order_id) VALUES ($1)").bind("o-1").execute(&mut *tx).await?;
//! let request = PaymentRequested { order_id: "o-1".into() };
//! let id = outbox::stable_id("orders", "o-1/payment");
//! outbox::enqueue::<sqlx::Postgres>(&mut tx, &Outgoing::json(&request, id)?.route(Route::queue("payments"))).await?;
//! tx.commit().await?; // the order and its payment request, together
//! # Ok(()) }
//! ```

use crate::backend::Backend;
use crate::message::Publish;
use std::collections::BTreeMap;
use uuid::Uuid;

#[doc(hidden)]
pub mod relay;

pub use relay::PARTITIONS;

/// The UUIDv5 namespace of idem's outbox message ids.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2b55_9a0c_4e7e_8d3a_3c1b_71e0_5a42);

/// A message id that is the same every time for the same `producer` and `business_key`
/// (UUIDv5): a producer that crashes after its commit and does the step again re-creates the
/// same id, which the outbox keeps once and the next consumer deduplicates.
pub fn stable_id(producer: &str, business_key: &str) -> Uuid {
    let mut name = Vec::with_capacity(producer.len() + 1 + business_key.len());
    name.extend_from_slice(producer.as_bytes());
    name.push(0);
    name.extend_from_slice(business_key.as_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

/// The id of the `ordinal`-th message a handler publishes while handling `key` as `consumer`.
pub(crate) fn handler_message_id(consumer: &str, key: &str, ordinal: u32) -> Uuid {
    stable_id(consumer, &format!("{key}\0{ordinal}"))
}

/// Where a message goes: an exchange and a routing key, plus extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The exchange; `""` is RabbitMQ's default exchange, which routes to the queue named by
    /// the routing key.
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// Application headers added to the message.
    pub headers: BTreeMap<String, String>,
}

impl Route {
    /// Straight to queue `queue` (default exchange).
    pub fn queue(queue: impl Into<String>) -> Self {
        Self::exchange("", queue)
    }

    /// To `exchange` with `routing_key`.
    pub fn exchange(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            headers: BTreeMap::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// A message for the outbox: what the relay will publish, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The AMQP message_id; unique in the outbox.
    pub message_id: Uuid,
    /// Where it goes.
    pub route: Route,
    /// The AMQP `type`: the message kind.
    pub kind: String,
    /// The body.
    pub body: Vec<u8>,
    /// The correlation id of the business flow.
    pub correlation_id: Option<String>,
    /// The id of the message whose handling produced this one (header `x-idem-causation-id`).
    pub causation_id: Option<String>,
}

impl Outgoing {
    /// `message` as JSON, of kind `M::KIND`, with id `message_id`; routed to the queue named
    /// after the kind unless [`Outgoing::route`] says otherwise.
    pub fn json<M: Publish>(message: &M, message_id: Uuid) -> Result<Self, serde_json::Error> {
        Ok(Self {
            message_id,
            route: Route::queue(M::KIND),
            kind: M::KIND.to_owned(),
            body: serde_json::to_vec(message)?,
            correlation_id: None,
            causation_id: None,
        })
    }

    /// Sends it along `route`.
    pub fn route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// The route's headers as the JSON text the outbox stores.
    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.route.headers).unwrap_or_else(|_| "{}".into())
    }
}

/// Why [`Tx::publish`](crate::Tx::publish) / [`Tx::publish_to`](crate::Tx::publish_to) did not
/// write the message into the outbox. Nothing was written; return it (with `?`) and idem rolls
/// back the handler's effect with it.
///
/// A typed [`std::error::Error`], so it fits in your own error enum with `#[from]`, where it
/// keeps its class ([`Classify`](crate::Classify): a message that does not serialize is
/// permanent; an outbox write that failed is what its database error says):
///
/// ```
/// #[derive(Debug, thiserror::Error)]
/// enum ShipError {
///     #[error("the order has no address")]
///     NoAddress,
///     #[error("announcing the shipment failed")]
///     Publish(#[from] idem_core::PublishError),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The message does not serialize to JSON (its `Serialize` impl failed, or a map with keys
    /// that are not strings): it fails the same way every time, so it is permanent.
    #[error("cannot publish the {kind} message: it does not serialize to JSON: {source}. Fix its Serialize impl or the data that fails it")]
    Serialize {
        /// The message kind.
        kind: &'static str,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// The database refused the outbox row or could not be reached; its error's class decides
    /// (a serialization failure or a lost connection: try again).
    #[error("cannot write the {kind} message {message_id} to the outbox: {source}")]
    Outbox {
        /// The message kind.
        kind: &'static str,
        /// The id the message would have had.
        message_id: Uuid,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A batch handler published for a message it was not given
    /// ([`BatchTx::publish_for`](crate::BatchTx::publish_for)): a bug in the handler, which
    /// fails the same way every time.
    #[error("cannot publish the {kind} message for message {index} of the batch: the batch holds {len} messages (index them as the Vec the handler received)")]
    NotInBatch {
        /// The message kind.
        kind: &'static str,
        /// The index given.
        index: usize,
        /// How many messages the batch holds.
        len: usize,
    },
}

impl crate::Classify for PublishError {
    fn class(&self) -> Option<crate::ErrorClass> {
        match self {
            Self::Serialize { .. } | Self::NotInBatch { .. } => Some(crate::ErrorClass::Permanent),
            // Its sqlx error, next in the chain, decides; so a lost database is waited for.
            Self::Outbox { .. } => None,
        }
    }
}

/// Writes `message` into the outbox on the caller's open transaction (`&mut *tx`): it is
/// published once that transaction commits, and never if it rolls back. `Ok(false)`: a row with
/// this message id is already there, or was published within the relay's retention (a producer
/// doing the same step again); nothing changed.
pub async fn enqueue<DB: Backend>(
    conn: &mut DB::Connection,
    message: &Outgoing,
) -> Result<bool, sqlx::Error> {
    DB::enqueue(conn, message).await
}

/// How many messages wait in the outbox to be published (due now or backing off after a failed
/// publish; [`parked`] ones left out): the relay's backlog, for a gauge or a health check.
pub async fn pending<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<i64, sqlx::Error> {
    DB::outbox_pending(pool).await
}

/// How long the oldest message waiting in the outbox has waited since its transaction wrote it
/// (`None`: nothing waits): a relay that is down or falling behind shows here first.
pub async fn oldest_pending<DB: Backend>(
    pool: &sqlx::Pool<DB>,
) -> Result<Option<std::time::Duration>, sqlx::Error> {
    let seconds = DB::outbox_oldest(pool).await?;
    // A clock step back could make it negative: then it is "just now".
    Ok(seconds.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
}

/// How many messages the relay has parked: the broker refused, returned or did not confirm each
/// of them on every attempt the relay's `park_after` allows (an exchange that does not exist,
/// one the user may not publish to, a queue nobody declared). A parked message is not published
/// again, no longer holds back the later messages of its destination (its place in their order
/// is given up), and is not purged: alert on a count above zero, read `last_error` in
/// `idem_outbox` (`parked_at` / `parked_ms` is set), fix the cause, then [`unpark`] it.
pub async fn parked<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<i64, sqlx::Error> {
    DB::outbox_parked(pool).await
}

/// Sends a [`parked`] message again: it is due at once, with its attempts reset, and the relay
/// publishes it on its next round (within its poll interval) — after the messages of its
/// destination that went out while it was parked. `Ok(false)`: no parked message has this id.
pub async fn unpark<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    message_id: Uuid,
) -> Result<bool, sqlx::Error> {
    DB::outbox_unpark(pool, &message_id.to_string()).await
}

/// Parked messages of one destination, for an operator: [`status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedDestination {
    /// The exchange (`""`: the default exchange, which routes by queue name).
    pub exchange: String,
    /// The routing key (with the default exchange: the queue).
    pub routing_key: String,
    /// Parked messages.
    pub rows: u64,
    /// When the first of them was parked.
    pub since: std::time::SystemTime,
    /// The broker's answer to the latest parked one: what to fix.
    pub last_error: Option<String>,
}

impl ParkedDestination {
    pub(crate) fn from_parts(
        (exchange, routing_key, rows, since_ms, last_error): (
            String,
            String,
            i64,
            i64,
            Option<String>,
        ),
    ) -> Self {
        let since = std::time::Duration::from_millis(u64::try_from(since_ms).unwrap_or(0));
        Self {
            exchange,
            routing_key,
            rows: u64::try_from(rows).unwrap_or(0),
            since: std::time::SystemTime::UNIX_EPOCH + since,
            last_error,
        }
    }
}

/// The outbox at a glance: [`status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Messages waiting to be published ([`pending`]).
    pub pending: u64,
    /// How long the oldest of them has waited ([`oldest_pending`]).
    pub oldest_pending: Option<std::time::Duration>,
    /// Parked messages by destination ([`parked`]).
    pub parked: Vec<ParkedDestination>,
    /// The relays of this outbox now: on PostgreSQL every relay's lease session (those standing
    /// by included), on SQLite the holder of the relay lease while it is current.
    pub relays: Vec<RelaySession>,
    /// PostgreSQL: messages waiting in partitions no relay holds — nothing publishes them until
    /// a relay runs, or gets its share. `None` on SQLite.
    pub unheld: Option<u64>,
}

/// A relay of this outbox, as the database sees it: [`status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelaySession {
    /// Which relay: on PostgreSQL where its lease session connects from and its backend pid
    /// (`10.0.0.5:51234 pid 4242`), on SQLite the lease holder's name (`<process id>-<random>`).
    pub relay: String,
    /// PostgreSQL: how many of the outbox's [`PARTITIONS`] it publishes (0: it stands by).
    /// `None` on SQLite, where one relay publishes the whole outbox.
    pub partitions: Option<u32>,
}

/// The backlog, its age, the parked messages by destination with the broker's last word on
/// each, and the relays publishing: what an operator reads when the relay falls behind.
pub async fn status<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<OutboxStatus, sqlx::Error> {
    let (relays, unheld) = DB::outbox_relays(pool).await?;
    Ok(OutboxStatus {
        pending: u64::try_from(pending(pool).await?).unwrap_or(0),
        oldest_pending: oldest_pending(pool).await?,
        parked: DB::outbox_parked_by_destination(pool).await?,
        relays,
        unheld,
    })
}

/// [`unpark`]s every parked message at once (after the cause is fixed: the destination now
/// exists, the permission is granted); returns how many.
pub async fn unpark_all<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<u64, sqlx::Error> {
    DB::outbox_unpark_all(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(stable_id("orders", "o-1"), stable_id("orders", "o-1"));
        assert_ne!(stable_id("orders", "o-1"), stable_id("orders", "o-2"));
        assert_ne!(stable_id("orders", "o-1"), stable_id("order", "so-1"));
        assert_eq!(
            handler_message_id("payments", "k", 0),
            handler_message_id("payments", "k", 0)
        );
        assert_ne!(
            handler_message_id("payments", "k", 0),
            handler_message_id("payments", "k", 1)
        );
        assert_eq!(stable_id("orders", "o-1").get_version_num(), 5);
    }
}
