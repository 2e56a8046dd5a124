//! What a consumer did: counters bumped by the delivery tasks and the serve loop, and the
//! snapshot [`Consumer::stats`](super::Consumer::stats) returns.

use crate::telemetry::{ConsumerMetrics, Settled};
use idem_core::ledger::Purged;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a consumer's counters; see [`Consumer::stats`](super::Consumer::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Deliveries whose effect was committed and acknowledged.
    pub applied: u64,
    /// Deliveries whose key was already in the ledger: acknowledged, handler not run.
    pub duplicates: u64,
    /// Deliveries published to the dead-letter queue (confirmed), then acknowledged.
    pub dead_lettered: u64,
    /// Deliveries that failed transiently and were published to a delay queue (confirmed), then
    /// acknowledged: they come back after the backoff.
    pub retried: u64,
    /// Deliveries handed back to the broker unprocessed (a dead letter or retry publish was not
    /// confirmed, or the consumer stopped while the database was away).
    pub redelivered_later: u64,
    /// Acks (or nacks) the broker did not get: the message will come again and be deduplicated.
    pub ack_failures: u64,
    /// `basic.ack` frames sent. Fewer than the deliveries acknowledged when acks cover several
    /// at once (`multiple`, only up to the highest delivery below which all are settled).
    pub ack_frames: u64,
    /// Times the consumer reconnected to the broker after losing its connection.
    pub reconnects: u64,
    /// Connections lost within seconds of being made: each makes the next reconnect wait longer.
    /// A rising count means the broker keeps closing the connection over something on it; its
    /// log says what.
    pub quick_losses: u64,
    /// Ledger rows this instance purged past the ledger retention.
    pub ledger_purged: u64,
    /// Crash-loop counts this instance purged: counts of messages that vanished, untouched for
    /// longer than the redelivery horizon.
    pub redelivery_counts_purged: u64,
    /// Messages in the dead-letter queue when last looked at (every
    /// [`ConsumerBuilder::dlq_poll_interval`](super::ConsumerBuilder::dlq_poll_interval)).
    pub dlq_messages: u64,
    /// Times the dead-letter queue grew to the alert threshold
    /// ([`ConsumerBuilder::dlq_alert_threshold`](super::ConsumerBuilder::dlq_alert_threshold)):
    /// one per crossing, however long it stays above.
    pub dlq_alerts: u64,
}

/// The live counters behind [`ConsumerStats`]; each change is also recorded as a metric
/// ([`crate::telemetry`]), here and nowhere else, so the two never disagree.
#[derive(Debug)]
pub(super) struct Counters {
    pub metrics: ConsumerMetrics,
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retried: AtomicU64,
    pub redelivered_later: AtomicU64,
    pub ack_failures: AtomicU64,
    pub ack_frames: AtomicU64,
    pub reconnects: AtomicU64,
    pub quick_losses: AtomicU64,
    pub ledger_purged: AtomicU64,
    pub redelivery_counts_purged: AtomicU64,
    pub dlq_messages: AtomicU64,
    pub dlq_alerts: AtomicU64,
}

impl Counters {
    pub fn new(consumer: &str) -> Self {
        Self {
            metrics: ConsumerMetrics::new(consumer),
            applied: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            retried: AtomicU64::default(),
            redelivered_later: AtomicU64::default(),
            ack_failures: AtomicU64::default(),
            ack_frames: AtomicU64::default(),
            reconnects: AtomicU64::default(),
            quick_losses: AtomicU64::default(),
            ledger_purged: AtomicU64::default(),
            redelivery_counts_purged: AtomicU64::default(),
            dlq_messages: AtomicU64::default(),
            dlq_alerts: AtomicU64::default(),
        }
    }

    /// Counts a settled delivery.
    pub fn settled(&self, settled: Settled) {
        let counter = match settled {
            Settled::Applied => &self.applied,
            Settled::Duplicate => &self.duplicates,
            Settled::DeadLettered(_) => &self.dead_lettered,
            Settled::Retried => &self.retried,
            Settled::HandedBack => &self.redelivered_later,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.metrics.settled(settled);
    }

    pub fn ack_failure(&self) {
        self.ack_failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.ack_failure();
    }

    pub fn ack_frame(&self) {
        self.ack_frames.fetch_add(1, Ordering::Relaxed);
        self.metrics.ack_frame();
    }

    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        self.metrics.reconnect();
    }

    pub fn quick_loss(&self) {
        self.quick_losses.fetch_add(1, Ordering::Relaxed);
    }

    pub fn purged(&self, purged: Purged) {
        match purged {
            Purged::Ledger(rows) => {
                self.ledger_purged.fetch_add(rows, Ordering::Relaxed);
                self.metrics.ledger_purged(rows);
            }
            Purged::RedeliveryCounts(rows) => {
                self.redelivery_counts_purged
                    .fetch_add(rows, Ordering::Relaxed);
                self.metrics.redelivery_counts_purged(rows);
            }
        }
    }

    /// Records the dead-letter queue's depth; says whether it just crossed `threshold` upwards
    /// (`Some(true)`), just went back under (`Some(false)`), or neither.
    pub fn dlq_depth(&self, queue: &str, messages: u32, threshold: u32) -> Option<bool> {
        let before = self
            .dlq_messages
            .swap(u64::from(messages), Ordering::Relaxed);
        self.metrics.dlq_messages(queue, messages);
        let threshold = u64::from(threshold);
        let (was, is) = (before >= threshold, u64::from(messages) >= threshold);
        if is && !was {
            self.dlq_alerts.fetch_add(1, Ordering::Relaxed);
        }
        (was != is).then_some(is)
    }

    /// Deliveries the database served (applied or found duplicate): rising while a delivery is
    /// held means the database answers others, and the held one is the problem.
    pub fn database_answers(&self) -> u64 {
        self.applied.load(Ordering::Relaxed) + self.duplicates.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            applied: self.applied.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            redelivered_later: self.redelivered_later.load(Ordering::Relaxed),
            ack_failures: self.ack_failures.load(Ordering::Relaxed),
            ack_frames: self.ack_frames.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            quick_losses: self.quick_losses.load(Ordering::Relaxed),
            ledger_purged: self.ledger_purged.load(Ordering::Relaxed),
            redelivery_counts_purged: self.redelivery_counts_purged.load(Ordering::Relaxed),
            dlq_messages: self.dlq_messages.load(Ordering::Relaxed),
            dlq_alerts: self.dlq_alerts.load(Ordering::Relaxed),
        }
    }
}
