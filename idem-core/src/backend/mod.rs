//! The databases idem keeps its ledger in: one small trait, one impl per database.
//!
//! Everything above it (the unit of work, the adapter, the relay) is written once against
//! [`Backend`]. Users pick PostgreSQL or SQLite; they do not implement it.
//!
//! - `mod.rs`: the public [`Backend`] (connect, migrate) and the sealed [`Store`] (idem's own
//!   statements: claim, crash-loop counts, outbox).
//! - `migrations.rs` + `migrations/{postgres,sqlite}/*.sql`: idem's schema.
//! - `shared.rs`: the SQL both backends share; `postgres.rs`, `sqlite.rs`: the rest.

use crate::delivery::Metadata;
use crate::error::Error;
use crate::ledger::LedgerEntry;
use crate::outbox::relay::{LeasedPartitions, OnPublish, OutboxBatch, PublishLease, Settled};
use crate::outbox::Outgoing;
use crate::policy::Isolation;
use sqlx::Pool;
use std::time::Duration;

mod migrations;
#[cfg(feature = "postgres")]
mod postgres;
mod shared;
#[cfg(feature = "sqlite")]
mod sqlite;

pub(crate) use store::Store;

/// A database idem can keep its ledger in: [`sqlx::Postgres`] or [`sqlx::Sqlite`] (cargo
/// features `postgres`, `sqlite`).
///
/// Sealed: idem's statements (the ledger claim, crash-loop counts, the outbox) come with it and
/// are not for other code to call or to implement.
///
/// ```no_run
/// # async fn start() -> Result<(), idem_core::Error> {
/// use idem_core::Backend;
/// let pool = sqlx::Postgres::connect("postgres://app@127.0.0.1/payments", 8).await?;
/// sqlx::Postgres::migrate(&pool).await?; // creates or upgrades idem's tables
/// # Ok(()) }
/// ```
#[async_trait::async_trait]
pub trait Backend: sqlx::Database + Sized + Store {
    /// Opens a pool with settings fit for the ledger (see each impl).
    async fn connect(url: &str, max_connections: u32) -> Result<Pool<Self>, Error>;

    /// Creates or upgrades idem's tables; safe to run from several processes at once.
    async fn migrate(pool: &Pool<Self>) -> Result<(), Error>;
}

/// Where a database's idem schema stands against this build: [`schema_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchemaStatus {
    /// Versions applied in the database (empty: idem never ran against it).
    pub applied: Vec<i64>,
    /// The newest version this build of idem ships.
    pub known: i64,
}

impl SchemaStatus {
    /// Versions this build ships that the database lacks: a consumer or relay applies them on
    /// start ([`Backend::migrate`]).
    pub fn pending(&self) -> Vec<i64> {
        migrations::MIGRATIONS
            .iter()
            .map(|m| m.version)
            .filter(|v| !self.applied.contains(v))
            .collect()
    }

    /// Whether the database has a version newer than this build: an older idem is running
    /// against a schema a newer one upgraded (it refuses to start; upgrade it).
    pub fn too_new(&self) -> bool {
        self.applied.iter().any(|&v| v > self.known)
    }
}

/// idem's schema versions in the database behind `pool`, against those this build ships.
/// Changes nothing.
pub async fn schema_status<DB: Backend>(pool: &Pool<DB>) -> Result<SchemaStatus, Error> {
    let applied = DB::schema_versions(pool)
        .await
        .map_err(Error::database("reading idem_migrations"))?;
    Ok(SchemaStatus {
        applied: applied.unwrap_or_default(),
        known: migrations::latest_known(),
    })
}

mod store {
    use super::*;

    /// idem's own statements on a backend. In a private module, so [`Backend`] is sealed: no
    /// other crate can implement it, and these methods stay out of the public docs (the
    /// adapter's relay reaches the outbox ones through the `Backend` bound).
    #[async_trait::async_trait]
    pub trait Store: sqlx::Database + Sized {
        /// Whether an outbox take locks its rows until settled (PostgreSQL): then several
        /// relays can share one outbox. Without (SQLite) one relay publishes at a time.
        const OUTBOX_ROW_LOCKS: bool;

        /// Begins the transaction of one unit of work on a connection of `pool`, at `isolation`.
        async fn begin(pool: &Pool<Self>, isolation: Isolation) -> Result<Unit<Self>, sqlx::Error>;

        /// COMMIT, without checks (nothing of the handler's ran).
        async fn commit(unit: &mut Unit<Self>) -> Result<(), sqlx::Error>;

        /// Checks that `unit`'s transaction, which claimed `(consumer, key)` as `txid`, is still
        /// open and idem's — a handler may have ended it through `tx.conn()` (COMMIT, ROLLBACK,
        /// BEGIN) or, on PostgreSQL, left it aborted by ignoring a failed statement — and if so
        /// commits it. On PostgreSQL the check and the COMMIT travel in one round trip. `Err` is
        /// the COMMIT's own failure (or a lost connection); anything but `Ok(Committed)` leaves
        /// the unit to [`Store::rollback`].
        async fn commit_checked(
            unit: &mut Unit<Self>,
            txid: i64,
            consumer: &str,
            key: &str,
        ) -> Result<TxState, sqlx::Error>;

        /// ROLLBACK (harmless when the handler already ended the transaction).
        async fn rollback(unit: &mut Unit<Self>) -> Result<(), sqlx::Error>;

        /// Claims `(consumer, key)` in the ledger, remembering the payload's fingerprint. On
        /// PostgreSQL a concurrent claim of the same key waits here until the other transaction ends.
        async fn claim(
            conn: &mut Self::Connection,
            consumer: &str,
            key: &str,
            payload_hash: &[u8],
            origin: &Metadata,
        ) -> Result<Claim, sqlx::Error>;

        /// Claims every key of `claims` (distinct keys) for `consumer` on `conn` in one set-based
        /// statement, in key order — so that two batches sharing keys lock their ledger rows in
        /// the same order and cannot deadlock on them — and says, in the order given, what the
        /// ledger answered each. A key claimed by a transaction still open elsewhere waits here
        /// (PostgreSQL) until it ends, as [`Store::claim`] does.
        async fn claim_batch(
            conn: &mut Self::Connection,
            consumer: &str,
            claims: &[BatchClaim<'_>],
        ) -> Result<Vec<Claim>, sqlx::Error>;

        /// What the ledger holds for `(consumer, key)`.
        async fn ledger_entry(
            pool: &Pool<Self>,
            consumer: &str,
            key: &str,
        ) -> Result<Option<LedgerEntry>, sqlx::Error>;

        /// Deletes up to `batch` of `consumer`'s ledger rows applied more than `older_than`
        /// ago, oldest first, unless another instance is purging `consumer`'s ledger now
        /// (`Ok(None)`): a PostgreSQL advisory lock, a lease on SQLite held by `holder`.
        async fn ledger_purge(
            pool: &Pool<Self>,
            consumer: &str,
            older_than: Duration,
            batch: i64,
            holder: &str,
        ) -> Result<Option<u64>, sqlx::Error>;

        /// Per consumer: its ledger rows, the oldest and newest `processed_at` (ms since the
        /// epoch) and how many rows were applied more than `older_than` ago.
        async fn ledger_stats(
            pool: &Pool<Self>,
            older_than: Duration,
        ) -> Result<Vec<crate::ledger::LedgerStats>, sqlx::Error>;

        /// Bytes the ledger takes on disk, indexes included; `None` where the database
        /// cannot tell.
        async fn ledger_bytes(pool: &Pool<Self>) -> Result<Option<i64>, sqlx::Error>;

        /// idem's schema versions applied in this database; `None` when idem never migrated it.
        async fn schema_versions(pool: &Pool<Self>) -> Result<Option<Vec<i64>>, sqlx::Error>;

        /// Parked outbox rows per destination, with the last error of the latest parked one.
        async fn outbox_parked_by_destination(
            pool: &Pool<Self>,
        ) -> Result<Vec<crate::outbox::ParkedDestination>, sqlx::Error>;

        /// The relays of the outbox now, and (PostgreSQL) the messages waiting in partitions none
        /// of them holds.
        async fn outbox_relays(
            pool: &Pool<Self>,
        ) -> Result<(Vec<crate::outbox::RelaySession>, Option<u64>), sqlx::Error>;

        /// Makes every parked row due again with its attempts reset; returns how many.
        async fn outbox_unpark_all(pool: &Pool<Self>) -> Result<u64, sqlx::Error>;

        /// Deletes up to `batch` of `consumer`'s crash-loop counts that nothing touched for
        /// `older_than`, oldest first, under the same one-instance guard as
        /// [`Store::ledger_purge`] (`Ok(None)`: another instance holds it).
        async fn redeliveries_purge(
            pool: &Pool<Self>,
            consumer: &str,
            older_than: Duration,
            batch: i64,
            holder: &str,
        ) -> Result<Option<u64>, sqlx::Error>;

        /// The fingerprint the ledger holds for `(consumer, key)`, if the key was applied.
        async fn applied_fingerprint(
            pool: &Pool<Self>,
            consumer: &str,
            key: &str,
        ) -> Result<Option<Vec<u8>>, sqlx::Error>;

        /// Counts one more redelivery of `(consumer, key)` whose processing is starting, in its own
        /// short transaction (so the count survives the process dying during the handler), and
        /// returns the count so far.
        async fn count_redelivery(
            pool: &Pool<Self>,
            consumer: &str,
            key: &str,
        ) -> Result<u32, sqlx::Error>;

        /// Drops the redelivery count of `(consumer, key)`, inside the unit of work's transaction:
        /// the message got through.
        async fn forget_redeliveries(
            conn: &mut Self::Connection,
            consumer: &str,
            key: &str,
        ) -> Result<(), sqlx::Error>;

        /// Writes an outbox row on `conn`, inside the caller's transaction. `Ok(false)`: a row with
        /// this message id exists already.
        async fn enqueue(
            conn: &mut Self::Connection,
            message: &Outgoing,
        ) -> Result<bool, sqlx::Error>;

        /// Takes up to `limit` unpublished, unparked rows that are due, oldest first, leaving out
        /// every row that has an earlier row of the same destination (exchange and routing key)
        /// backing off after a failed publish: per-destination order. With `partitions`
        /// (PostgreSQL, [`PublishLease::claim`]) only rows of those partitions, and nothing
        /// unless the lease's session is alive, checked in the same statement; the batch holds
        /// them until it is settled. `in_flight`: the lowest and highest row id of this relay's
        /// batches not yet settled, left out of the take (with `partitions`, a row of them
        /// locked by anyone else is waited for, not skipped).
        async fn outbox_take(
            pool: &Pool<Self>,
            limit: i64,
            partitions: Option<LeasedPartitions>,
            in_flight: Option<(i64, i64)>,
        ) -> Result<OutboxBatch<Self>, sqlx::Error>;

        /// PostgreSQL: starts the task that holds, or keeps trying for, this relay's share of
        /// the outbox's partitions ([`PublishLease`]). `None` where the relay leases with
        /// [`Store::outbox_lease`] (SQLite).
        fn outbox_publish_lease(pool: &Pool<Self>) -> Option<PublishLease>;

        /// Marks what the broker confirmed as published (or deletes it: [`OnPublish`]),
        /// schedules failed rows for another try and parks those out of attempts.
        async fn outbox_settle(
            batch: OutboxBatch<Self>,
            settled: &[Settled],
            on_publish: OnPublish,
        ) -> Result<(), sqlx::Error>;

        /// Deletes up to `batch` rows published more than `older_than` ago, oldest first, unless
        /// another relay is purging (`Ok(None)`): a PostgreSQL advisory lock; on SQLite only
        /// the relay holding the relay lease as `holder` purges. Unpublished and parked rows
        /// are never deleted.
        async fn outbox_purge(
            pool: &Pool<Self>,
            older_than: Duration,
            batch: i64,
            holder: &str,
        ) -> Result<Option<u64>, sqlx::Error>;

        /// Rows waiting to be published (due or backing off; parked rows left out).
        async fn outbox_pending(pool: &Pool<Self>) -> Result<i64, sqlx::Error>;

        /// Seconds since the oldest row waiting to be published was written; `None` when none
        /// waits.
        async fn outbox_oldest(pool: &Pool<Self>) -> Result<Option<f64>, sqlx::Error>;

        /// Parked rows: out of attempts, no longer published.
        async fn outbox_parked(pool: &Pool<Self>) -> Result<i64, sqlx::Error>;

        /// Makes the parked row `message_id` due again with its attempts reset; `Ok(false)`: no
        /// parked row has that id.
        async fn outbox_unpark(pool: &Pool<Self>, message_id: &str) -> Result<bool, sqlx::Error>;

        /// A signal each time a transaction that wrote outbox rows commits, where the database can
        /// tell (PostgreSQL LISTEN/NOTIFY); `None` where the relay must poll.
        async fn outbox_wakeups(pool: &Pool<Self>) -> Option<tokio::sync::mpsc::Receiver<()>>;

        /// Takes or renews the right to relay this outbox for `ttl`, as `holder`. On SQLite, which
        /// has no row locks to share the outbox, one relay holds a lease and any other stands by
        /// until it expires; on PostgreSQL every relay may publish (`Ok(true)` always).
        async fn outbox_lease(
            pool: &Pool<Self>,
            holder: &str,
            ttl: Duration,
        ) -> Result<bool, sqlx::Error>;
    }
}

/// One message's part of a set-based claim ([`Store::claim_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchClaim<'a> {
    pub(crate) key: &'a str,
    pub(crate) payload_hash: &'a [u8],
    pub(crate) origin: &'a Metadata,
}

impl BatchClaim<'_> {
    /// The positions of `claims` in key order: the order the claim locks ledger rows in.
    pub(crate) fn key_order(claims: &[BatchClaim<'_>]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..claims.len()).collect();
        order.sort_by(|&a, &b| claims[a].key.cmp(claims[b].key));
        order
    }
}

/// What the ledger said to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First time for this key: go on with the handler.
    Claimed {
        /// Which transaction claimed it (PostgreSQL's transaction id; 0 on SQLite), to tell at
        /// the end that it is still the one that commits.
        txid: i64,
    },
    /// Already processed with the same payload: skip, acknowledge.
    Duplicate,
    /// Already processed with a different payload: the first effect stands, this one is
    /// dead-lettered `key-conflict`.
    Conflict {
        /// The fingerprint the ledger holds.
        stored: Vec<u8>,
    },
}

/// What became of idem's transaction while the handler held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    /// Still the transaction that claimed the key, and now committed with the effect.
    Committed,
    /// PostgreSQL aborted it (a statement failed and the handler went on): COMMIT would roll
    /// back.
    Aborted,
    /// The handler ended it (COMMIT, ROLLBACK or BEGIN through `tx.conn()`): what it ran
    /// afterwards was autocommitted, and idem's COMMIT would not cover the claim.
    Ended,
}

/// The transaction of one unit of work: a pooled connection between idem's own BEGIN and
/// COMMIT or ROLLBACK. idem runs them itself, rather than through `sqlx::Transaction`, so that
/// the check that the handler left the transaction alone and the COMMIT can share one round trip.
/// Dropped while still open (a cancelled task, a failed ROLLBACK), the connection is closed
/// instead of going back to the pool, and the server rolls the transaction back.
pub struct Unit<DB: sqlx::Database> {
    pub(crate) conn: sqlx::pool::PoolConnection<DB>,
    pub(crate) open: bool,
}

impl<DB: sqlx::Database> std::ops::Deref for Unit<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.conn
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for Unit<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

impl<DB: sqlx::Database> Drop for Unit<DB> {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}
