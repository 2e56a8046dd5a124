//! The relay's side of the outbox: rows taken to publish, and what became of each.
//!
//! Plumbing between idem-core's backends and idem-amqp's relay, hidden from the docs: not an
//! API, it changes without notice.

use sqlx::Pool;

/// A row the relay took from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The row id (publish order).
    pub id: i64,
    /// The message.
    pub message: super::Outgoing,
    /// Publish attempts that failed so far.
    pub attempts: i32,
}

/// What happened to one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The broker confirmed it: mark it published.
    Published(i64),
    /// Not confirmed: try again after `retry_in`.
    Failed {
        /// The row.
        id: i64,
        /// Why.
        error: String,
        /// The backoff before the next attempt.
        retry_in: std::time::Duration,
    },
    /// Not confirmed, and out of attempts: count the attempt, keep `error`, and park the row
    /// (never taken again, never purged; `outbox::unpark` sends it again).
    Parked {
        /// The row.
        id: i64,
        /// Why the last attempt failed.
        error: String,
    },
}

/// Rows the relay took from the outbox, to publish and then settle with
/// `Store::outbox_settle`. On PostgreSQL it holds their row locks (in an open transaction)
/// until settled, so another relay skips them; dropping it unsettled releases them.
pub struct OutboxBatch<DB: sqlx::Database> {
    /// The rows, oldest first.
    pub rows: Vec<OutboxRow>,
    /// PostgreSQL: the transaction holding the rows' locks.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) locks: Option<sqlx::Transaction<'static, DB>>,
    /// Where to settle when there are no locks.
    pub(crate) pool: Pool<DB>,
}

impl<DB: sqlx::Database> OutboxBatch<DB> {
    /// Whether the batch holds its rows' locks until settled (PostgreSQL): then another take
    /// skips its rows, and the next batch can be taken and published before this one is
    /// settled. Without locks (SQLite) a take would find them again: one batch at a time.
    pub fn holds_locks(&self) -> bool {
        self.locks.is_some()
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for OutboxBatch<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBatch")
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

/// The right to publish an outbox alone, on PostgreSQL: a session-level advisory lock held on a
/// database connection of its own by a task that keeps trying for it (a stand-by relay) or
/// keeps checking it (the holder). Two relays publishing one outbox at once would each keep
/// their own batches in order but not a destination's rows between them; with the lease one
/// publishes and the others stand by. A relay killed, or whose session is lost, lets the lock
/// go with its connection, and a stand-by takes over within [`PublishLease::CHECK_EVERY`].
/// Dropping it ends the task and closes its connection (the lock goes with it).
#[derive(Debug)]
pub struct PublishLease {
    pub(crate) held: tokio::sync::watch::Receiver<Option<i32>>,
}

impl PublishLease {
    /// How often a stand-by tries for the lease and the holder checks its session.
    pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

    /// The backend process id of the session holding the lock while this relay holds the lease
    /// (`None`: another relay does, or the session is being re-established). Pass it to the
    /// take, which checks in the same statement that the session still holds the lock.
    pub fn session(&self) -> Option<i32> {
        *self.held.borrow()
    }

    /// The lease's state as it changes (`changed()` resolves when it is taken or lost; an
    /// error once its keeper is gone): a stand-by relay publishes as soon as it holds the
    /// lease, not on its next poll.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Option<i32>> {
        self.held.clone()
    }
}
