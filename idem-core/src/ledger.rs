//! The dedup ledger after the claim: what it says about an applied key, and how long it
//! remembers one.
//!
//! A key is remembered for the consumer's ledger retention (30 days by default). Past it, the
//! row is purged and a copy of the message that arrives later would be applied again: the
//! retention must outlast every way a copy can still come — the whole retry schedule, and the
//! window in which an operator may replay dead letters — which [`Policy::validate`] checks.
//!
//! [`Policy::validate`]: crate::Policy::validate

use crate::backend::Backend;
use crate::error::Error;
use crate::policy::Policy;
use crate::purge;
use sqlx::Pool;
use std::time::{Duration, SystemTime};

/// What the ledger remembers of one applied key: when, from which message, with which payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LedgerEntry {
    /// The consumer that applied it (the ledger's scope).
    pub consumer: String,
    /// The idempotency key.
    pub key: String,
    /// The payload fingerprint (SHA-256) a later copy must match to be a duplicate.
    pub fingerprint: Vec<u8>,
    /// When the transaction that applied it committed (the database's clock).
    pub processed_at: SystemTime,
    /// The AMQP message id of the delivery that applied it, if it had one.
    pub message_id: Option<String>,
    /// The AMQP correlation id of that delivery, if it had one.
    pub correlation_id: Option<String>,
}

impl LedgerEntry {
    pub(crate) fn from_parts(
        consumer: &str,
        key: &str,
        (fingerprint, processed_ms, message_id, correlation_id): (
            Vec<u8>,
            i64,
            Option<String>,
            Option<String>,
        ),
    ) -> Self {
        let since_epoch = Duration::from_millis(u64::try_from(processed_ms).unwrap_or(0));
        Self {
            consumer: consumer.to_owned(),
            key: key.to_owned(),
            fingerprint,
            processed_at: SystemTime::UNIX_EPOCH + since_epoch,
            message_id,
            correlation_id,
        }
    }
}

/// What the ledger holds for `key` of `consumer`: when, from which message and with which
/// payload fingerprint it was applied; `None` when it was never applied (or was purged).
///
/// # Examples
///
/// ```no_run
/// # async fn at_3am(pool: sqlx::SqlitePool) -> Result<(), idem_core::Error> {
/// match idem_core::ledger::lookup(&pool, "payments", "7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11").await? {
///     Some(entry) => println!(
///         "applied at {:?} from message {:?} (correlation {:?})",
///         entry.processed_at, entry.message_id, entry.correlation_id
///     ),
///     None => println!("never applied, or purged after the ledger retention"),
/// }
/// # Ok(()) }
/// ```
pub async fn lookup<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &str,
    key: &str,
) -> Result<Option<LedgerEntry>, Error> {
    DB::ledger_entry(pool, consumer, key)
        .await
        .map_err(Error::database("reading the ledger"))
}

/// One consumer's share of the ledger, for an operator: [`stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LedgerStats {
    /// The consumer (the ledger's scope).
    pub consumer: String,
    /// Keys it remembers.
    pub rows: u64,
    /// When the oldest of them was applied.
    pub oldest: SystemTime,
    /// When the newest of them was applied.
    pub newest: SystemTime,
    /// How many were applied before the cut-off [`stats`] was asked about: what a purge
    /// would delete.
    pub older: u64,
}

impl LedgerStats {
    pub(crate) fn from_parts(
        (consumer, rows, oldest_ms, newest_ms, older): (String, i64, i64, i64, i64),
    ) -> Self {
        Self {
            consumer,
            rows: u64::try_from(rows).unwrap_or(0),
            oldest: from_millis(oldest_ms),
            newest: from_millis(newest_ms),
            older: u64::try_from(older).unwrap_or(0),
        }
    }
}

/// Milliseconds since the epoch as a time (a negative count as the epoch).
fn from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Each consumer's ledger: rows, oldest, newest, and how many were applied more than
/// `older_than` ago. Counts every row (through the `(consumer, processed_at)` index): on a
/// ledger of hundreds of millions of rows it takes a while; it changes nothing.
pub async fn stats<DB: Backend>(
    pool: &Pool<DB>,
    older_than: Duration,
) -> Result<Vec<LedgerStats>, Error> {
    DB::ledger_stats(pool, older_than)
        .await
        .map_err(Error::database("counting the ledger"))
}

/// Bytes the ledger takes on disk, indexes included; `None` where the database cannot tell (a
/// system SQLite built without `dbstat`).
pub async fn size_on_disk<DB: Backend>(pool: &Pool<DB>) -> Result<Option<u64>, Error> {
    let bytes = DB::ledger_bytes(pool)
        .await
        .map_err(Error::database("measuring the ledger"))?;
    Ok(bytes.map(|b| u64::try_from(b).unwrap_or(0)))
}

/// Deletes up to `batch` of `consumer`'s rows applied more than `older_than` ago, oldest first,
/// in one short transaction, and returns how many; `Ok(None)` when another instance is purging
/// that consumer's ledger right now (its consumer's background purge, say): try again later.
///
/// A key purged from the ledger is forgotten: a copy of its message that arrives afterwards is
/// applied again. Never go below the consumer's ledger retention.
pub async fn purge_batch<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &str,
    older_than: Duration,
    batch: u32,
) -> Result<Option<u64>, Error> {
    DB::ledger_purge(
        pool,
        consumer,
        older_than,
        i64::from(batch),
        &purge_holder(),
    )
    .await
    .map_err(Error::database("purging the ledger"))
}

/// Who holds SQLite's purge lease for [`purge_batch`]: this process, so that its batches follow
/// each other under one lease. (Each background purge has a holder of its own.)
fn purge_holder() -> String {
    static HOLDER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOLDER
        .get_or_init(|| format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()))
        .clone()
}

/// What one batch of the consumer's keeper deleted.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purged {
    /// Ledger rows past the ledger retention.
    Ledger(u64),
    /// Crash-loop counts (`idem_redeliveries`) that nothing touched for longer than the
    /// redelivery horizon.
    RedeliveryCounts(u64),
}

/// Every `interval`, deletes `consumer`'s ledger rows older than the policy's ledger retention,
/// then its crash-loop counts untouched for longer than the policy's redelivery horizon: in
/// bounded, paced batches ([`crate::purge`]), on one instance of the consumer at a time. Never
/// returns (the caller drops it to stop it; a batch cut short rolls back). Tells `purged` what
/// each batch deleted. For transport adapters: the AMQP consumer runs it beside its consume
/// loop.
///
/// A count is cleared on every terminal outcome of its message, so one left behind belongs
/// to a message that vanished (a queue an operator purged, a copy that never came back). Past
/// the redelivery horizon no copy of that message can come any more (the retry schedule, the
/// replay window and a day), so the count can only be stale; while a copy still may come, the
/// count stays and keeps the crash-loop limit honest.
#[doc(hidden)]
pub async fn keep_ledger<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &str,
    policy: &Policy,
    interval: Duration,
    purged: impl Fn(Purged),
) {
    let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let (retention, horizon) = (policy.ledger_retention, policy.redelivery_horizon());
    loop {
        let ledger = purge::in_batches(
            || DB::ledger_purge(pool, consumer, retention, purge::BATCH, &holder),
            |rows| purged(Purged::Ledger(rows)),
        )
        .await;
        match ledger {
            Ok(None | Some(0)) => {}
            Ok(Some(rows)) => {
                tracing::info!(%consumer, rows, older_than = ?retention, "purged the ledger");
            }
            Err(error) => {
                tracing::warn!(%consumer, %error, "cannot purge the ledger; trying again later");
            }
        }
        let counts = purge::in_batches(
            || DB::redeliveries_purge(pool, consumer, horizon, purge::BATCH, &holder),
            |rows| purged(Purged::RedeliveryCounts(rows)),
        )
        .await;
        match counts {
            Ok(None | Some(0)) => {}
            Ok(Some(rows)) => tracing::info!(
                %consumer, rows, older_than = ?horizon, "purged stale crash-loop counts"
            ),
            Err(error) => tracing::warn!(
                %consumer, %error, "cannot purge stale crash-loop counts; trying again later"
            ),
        }
        tokio::time::sleep(interval).await;
    }
}
