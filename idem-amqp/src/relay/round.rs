//! One round of the relay — lease, take a batch of due rows, publish them in order, wait for
//! every confirm, settle the batch — and the relay's other uses of the outbox table (wake-ups,
//! purge, lease hand-over). The only file of the relay that touches idem-core's outbox
//! plumbing.

use super::Relay;
use crate::{headers, publish};
use idem_core::backoff::unix_seconds;
use idem_core::outbox::relay::{OutboxBatch, OutboxRow, Settled};
use idem_core::{Backend, Backoff};
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, PublisherConfirm};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Between two publish attempts of one row the broker did not take: 1 s doubling to 5 min.
const PUBLISH_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

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
    /// Takes one batch, publishes it in order on `channel`, waits for every confirm, and
    /// settles it. Returns how many rows it took.
    pub(super) async fn round(&self, channel: &Channel) -> Result<usize, RoundError> {
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
        // Publish all, then await the confirms: one round trip for the batch, and the broker
        // keeps the order of one channel's messages to a queue.
        let (pending, mut broken) = publish_all(channel, &batch.rows).await;
        let settled = confirm_all(pending, &mut broken).await;
        let published = settled
            .iter()
            .filter(|s| matches!(s, Settled::Published(_)))
            .count() as u64;
        let failed = settled.len() as u64 - published;
        DB::outbox_settle(batch, &settled)
            .await
            .map_err(RoundError::Database)?;
        self.counters
            .published
            .fetch_add(published, Ordering::Relaxed);
        self.counters.failed.fetch_add(failed, Ordering::Relaxed);
        if published > 0 {
            tracing::debug!(published, failed, "outbox batch published");
        }
        match broken {
            Some(error) => Err(RoundError::Broker(error)),
            None => Ok(taken),
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

    /// Deletes rows published longer ago than the retention: every minute, or more often when
    /// the retention is shorter.
    pub(super) async fn purge_if_due(&self, last_purge: &mut Option<Instant>) {
        let purge_every = self
            .retention
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        if last_purge.is_none_or(|at| at.elapsed() >= purge_every) {
            *last_purge = Some(Instant::now());
            match DB::outbox_purge(&self.pool, self.retention).await {
                Ok(purged) => {
                    self.counters.purged.fetch_add(purged, Ordering::Relaxed);
                }
                Err(error) => tracing::warn!(%error, "relay cannot purge published rows"),
            }
        }
    }
}

/// Publishes `rows` in order, up to the first publish the channel refuses; returns the
/// confirms to wait for and, if a publish failed, why (the broker is then to be reconnected).
async fn publish_all<'r>(
    channel: &Channel,
    rows: &'r [OutboxRow],
) -> (Vec<(&'r OutboxRow, PublisherConfirm)>, Option<String>) {
    let mut pending = Vec::with_capacity(rows.len());
    for row in rows {
        match publish(channel, row).await {
            Ok(confirm) => pending.push((row, confirm)),
            Err(error) => return (pending, Some(error.to_string())),
        }
    }
    (pending, None)
}

/// Waits for each confirm and says how to settle its row: published, or failed with a backoff.
/// A confirm that cannot arrive (the channel broke) leaves its row unsettled, still due — the
/// broker may have it, and a second publish is deduplicated downstream — and sets `broken`.
async fn confirm_all(
    pending: Vec<(&OutboxRow, PublisherConfirm)>,
    broken: &mut Option<String>,
) -> Vec<Settled> {
    let mut settled = Vec::with_capacity(pending.len());
    for (row, confirm) in pending {
        let confirmation = match confirm.await {
            Ok(confirmation) => confirmation,
            Err(error) => {
                *broken = Some(error.to_string());
                continue;
            }
        };
        let route = &row.message.route;
        match publish::confirmed(confirmation, &route.exchange, &route.routing_key) {
            Ok(()) => settled.push(Settled::Published(row.id)),
            Err(error) => {
                let attempts = u32::try_from(row.attempts).unwrap_or(0);
                let retry_in = PUBLISH_BACKOFF.delay(attempts);
                tracing::warn!(message_id = %row.message.message_id, %error, ?retry_in, "outbox message not published; retrying later");
                settled.push(Settled::Failed {
                    id: row.id,
                    error: error.to_string(),
                    retry_in,
                });
            }
        }
    }
    settled
}

/// Publishes one row (mandatory: an unroutable message comes back instead of vanishing, and
/// the row stays due) with its message id, kind, correlation and causation ids and headers.
async fn publish(channel: &Channel, row: &OutboxRow) -> Result<PublisherConfirm, lapin::Error> {
    let message = &row.message;
    let mut headers = FieldTable::default();
    for (name, value) in &message.route.headers {
        headers.insert(name.as_str().into(), headers::long_string(value));
    }
    if let Some(causation) = &message.causation_id {
        headers::insert_causation_id(&mut headers, causation);
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message.message_id.to_string().into())
        .with_type(message.kind.as_str().into())
        .with_timestamp(unix_seconds())
        .with_headers(headers);
    if let Some(correlation) = &message.correlation_id {
        properties = properties.with_correlation_id(correlation.as_str().into());
    }
    channel
        .basic_publish(
            message.route.exchange.as_str().into(),
            message.route.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &message.body,
            properties,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::PUBLISH_BACKOFF;
    use std::time::Duration;

    #[test]
    fn a_refused_row_waits_one_second_doubling_to_five_minutes() {
        let after = |attempts| PUBLISH_BACKOFF.delay(attempts);
        assert_eq!(after(0), Duration::from_secs(1));
        assert_eq!(after(8), Duration::from_secs(256));
        assert_eq!(after(9), Duration::from_secs(300));
        assert_eq!(after(u32::MAX), Duration::from_secs(300));
        assert_eq!(PUBLISH_BACKOFF.next_delay(3), Duration::from_secs(8));
    }
}
