//! Deleting what is past its retention without getting in the way of the work: bounded
//! batches, paced, one instance at a time. One pacing for every purge idem runs: the ledger
//! and the crash-loop counts (the consumer's keeper, [`crate::ledger::keep_ledger`]) and the
//! published outbox rows (the relay).

use std::future::Future;
use std::time::Duration;

/// Rows deleted per transaction: short enough that a claim or a relay round waiting on one of
/// them waits milliseconds, large enough that a day of a busy service goes in seconds.
pub const BATCH: i64 = 5_000;

/// Between two batches the purge waits this many times as long as the batch took: it keeps
/// to about 5 % of one connection's time, so the service's own transactions keep the
/// database (measured in the bench: deleting flat out cost a third of the throughput on two
/// cores). At ~0.1 s a batch that is still ~2,500 rows/s, over 200 million a day.
const PAUSE_PER_BATCH_TIME: u32 = 19;

/// The least pause between two batches: at most 5,000 rows a second (430 million a day, five
/// times what a consumer at 1,000 messages/s writes) however fast the batches get. Measured:
/// once PostgreSQL deleted by TID, batches took a few ms, the relative pause alone let the purge
/// delete ~15,000 rows/s, and a round of the bench dropped to 0.71 of idem without the purge.
const BETWEEN_BATCHES: Duration = Duration::from_secs(1);

/// Runs `batch` — one bounded DELETE of at most [`BATCH`] rows in its own transaction;
/// `Ok(None)` when another instance holds this purge — until one deletes less than a full
/// batch (nothing left) or finds the purge taken, pausing between batches. Tells `purged`
/// each batch's count as it commits, and returns the whole; `Ok(None)` when the first batch
/// already found the purge taken. Dropped mid-batch, the batch's transaction rolls back. For
/// idem's own keepers; not a stable API.
#[doc(hidden)]
pub async fn in_batches<F, Fut>(
    mut batch: F,
    purged: impl Fn(u64),
) -> Result<Option<u64>, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<u64>, sqlx::Error>>,
{
    let full = u64::try_from(BATCH).unwrap_or(u64::MAX);
    let mut total: Option<u64> = None;
    loop {
        let started = tokio::time::Instant::now();
        let Some(deleted) = batch().await? else {
            return Ok(total);
        };
        let so_far = total.unwrap_or(0) + deleted;
        total = Some(so_far);
        if deleted > 0 {
            purged(deleted);
        }
        if deleted < full {
            return Ok(total);
        }
        let pause = started.elapsed().saturating_mul(PAUSE_PER_BATCH_TIME);
        tokio::time::sleep(pause.max(BETWEEN_BATCHES)).await;
    }
}
