//! What a consumer did: counters bumped by the delivery tasks and the serve loop, and the
//! snapshot [`Consumer::stats`](super::Consumer::stats) returns.

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
    /// Times the consumer reconnected to the broker after losing its connection.
    pub reconnects: u64,
    /// Connections lost within seconds of being made: each makes the next reconnect wait longer.
    /// A rising count means the broker keeps closing the connection over something on it; its
    /// log says what.
    pub quick_losses: u64,
    /// Ledger rows this instance purged past the ledger retention.
    pub ledger_purged: u64,
}

/// The live counters behind [`ConsumerStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retried: AtomicU64,
    pub redelivered_later: AtomicU64,
    pub ack_failures: AtomicU64,
    pub reconnects: AtomicU64,
    pub quick_losses: AtomicU64,
    pub ledger_purged: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
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
            reconnects: self.reconnects.load(Ordering::Relaxed),
            quick_losses: self.quick_losses.load(Ordering::Relaxed),
            ledger_purged: self.ledger_purged.load(Ordering::Relaxed),
        }
    }
}
