//! One round of the relay — lease, take a batch of due rows, publish it ([`super::batch`]),
//! settle it — and the relay's other uses of the outbox table (wake-ups, purge, lease
//! hand-over). With [`super::batch`], the only files of the relay that touch idem-core's
//! outbox plumbing.

use super::batch::{self, Outcome};
use super::link::Link;
use super::Relay;
use idem_core::outbox::relay::{OutboxBatch, Settled};
use idem_core::Backend;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Why a round of publishing stopped.
pub(super) enum RoundError {
    /// The broker connection or channel broke: reconnect.
    Broker(String),
    /// The database failed: wait and try again.
    Database(sqlx::Error),
}

/// A signal per commit that wrote outbox rows, where the database sends one (PostgreSQL
/// LISTEN/NOTIFY); `None`: poll.
pub(super) type Wakeups = Option<tokio::sync::mpsc::Receiver<()>>;

/// Resolves on the next wake-up; never when there are none (or no more).
pub(super) async fn wakeup(wakeups: &mut Wakeups) {
    match wakeups.as_mut() {
        Some(wakeups) => {
            if wakeups.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

impl<DB: Backend> Relay<DB> {
    /// Takes one batch, publishes it on `link` and settles it: confirmed rows published,
    /// refused ones backing off or parked, unanswered ones still due. Returns how many rows it
    /// took. On PostgreSQL the batch's row locks are held (a pool connection in a transaction)
    /// until the settle; every wait on the broker in between is bounded by the link's timeout.
    pub(super) async fn round(&self, link: &mut Link) -> Result<usize, RoundError> {
        if !self.lease().await? {
            return Ok(0);
        }
        let batch: OutboxBatch<DB> = DB::outbox_take(&self.pool, i64::from(self.batch_size))
            .await
            .map_err(RoundError::Database)?;
        let taken = batch.rows.len();
        if taken == 0 {
            DB::outbox_settle(batch, &[])
                .await
                .map_err(RoundError::Database)?;
            return Ok(0);
        }
        let started = Instant::now();
        let Outcome { settled, lost } = batch::publish(link, &batch.rows, self.park_after).await;
        crate::telemetry::relay_confirm_time(started.elapsed());
        DB::outbox_settle(batch, &settled)
            .await
            .map_err(RoundError::Database)?;
        self.count(&settled);
        match lost {
            Some(error) => Err(RoundError::Broker(error)),
            None => Ok(taken),
        }
    }

    /// Adds a settled batch to the counters.
    fn count(&self, settled: &[Settled]) {
        let (mut published, mut failed, mut parked) = (0, 0, 0);
        for s in settled {
            match s {
                Settled::Published(_) => published += 1,
                Settled::Failed { .. } => failed += 1,
                Settled::Parked { .. } => {
                    failed += 1;
                    parked += 1;
                }
            }
        }
        let c = &self.counters;
        c.published.fetch_add(published, Ordering::Relaxed);
        crate::telemetry::relay_published(published);
        c.failed.fetch_add(failed, Ordering::Relaxed);
        c.parked.fetch_add(parked, Ordering::Relaxed);
        if published > 0 {
            tracing::debug!(published, failed, parked, "outbox batch published");
        }
    }

    /// SQLite: one relay at a time; the others stand by until its lease lapses (a relay
    /// killed mid-round is replaced within the lease time). Elsewhere always `true`.
    async fn lease(&self) -> Result<bool, RoundError> {
        let ttl = (self.poll_interval * 3).max(Duration::from_secs(10));
        let leased = DB::outbox_lease(&self.pool, &self.holder, ttl)
            .await
            .map_err(RoundError::Database)?;
        if self.standing_by.swap(!leased, Ordering::Relaxed) == leased {
            if leased {
                tracing::info!("relay took over the outbox lease");
            } else {
                tracing::warn!("another relay is publishing this SQLite outbox; standing by");
            }
        }
        Ok(leased)
    }

    /// Hands the SQLite lease over at once rather than when it lapses (a no-op elsewhere, and
    /// for a relay that did not hold it).
    pub(super) async fn release_lease(&self) {
        let _ = DB::outbox_lease(&self.pool, &self.holder, Duration::ZERO).await;
    }

    /// `outbox_wakeups` of this relay's database.
    pub(super) async fn wakeups(&self) -> Wakeups {
        DB::outbox_wakeups(&self.pool).await
    }

    /// Samples the outbox gauges (pending, oldest waiting, parked): at most once a second, so
    /// a busy relay does not pay three more queries a round.
    pub(super) async fn sample_if_due(&self, last_sample: &mut Option<Instant>) {
        if last_sample.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last_sample = Some(Instant::now());
        let sampled = async {
            let pending = DB::outbox_pending(&self.pool).await?;
            let parked = DB::outbox_parked(&self.pool).await?;
            let oldest = idem_core::outbox::oldest_pending(&self.pool).await?;
            Ok::<_, sqlx::Error>((pending, parked, oldest))
        };
        match sampled.await {
            Ok((pending, parked, oldest)) => crate::telemetry::outbox(pending, parked, oldest),
            // The round that follows reports a database that is away; this is only a gauge.
            Err(error) => tracing::debug!(%error, "relay cannot sample the outbox gauges"),
        }
    }

    /// Deletes rows published longer ago than the retention, every minute (or more often when
    /// the retention is shorter), in bounded, paced batches ([`idem_core::purge`]) by one relay
    /// at a time; never returns. Runs beside the rounds, not between them: a purge of a big
    /// backlog paces itself for minutes, and the rounds must not wait for it.
    pub(super) async fn keep_outbox(&self) {
        let purge_every = self
            .retention
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        // Another relay purging, or (SQLite) the lease not ours yet — a relay just started
        // takes it on its first round: look again soon rather than in a minute.
        let not_ours_again = self
            .poll_interval
            .max(Duration::from_secs(1))
            .min(purge_every);
        loop {
            let purged = idem_core::purge::in_batches(
                || {
                    DB::outbox_purge(
                        &self.pool,
                        self.retention,
                        idem_core::purge::BATCH,
                        &self.holder,
                    )
                },
                |rows| {
                    self.counters.purged.fetch_add(rows, Ordering::Relaxed);
                    crate::telemetry::outbox_purged(rows);
                },
            )
            .await;
            let next = match purged {
                Ok(None) => not_ours_again,
                Ok(Some(0)) => purge_every,
                Ok(Some(rows)) => {
                    tracing::info!(rows, older_than = ?self.retention, "purged published outbox rows");
                    purge_every
                }
                Err(error) => {
                    tracing::warn!(%error, "relay cannot purge published rows; trying again later");
                    purge_every
                }
            };
            tokio::time::sleep(next).await;
        }
    }
}
