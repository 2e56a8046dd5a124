//! Metric names and the calls that record them, through the [`metrics`] facade: idem records,
//! the service installs whichever exporter (Prometheus, StatsD…) it wants. Without a recorder
//! installed every call here is close to free.
//!
//! The names follow Prometheus conventions (`_total` counters, `_seconds` histograms, base
//! units); every series carries the `consumer` label (the relay's carry none: one outbox per
//! database). Calls resolve the series each time rather than caching handles, so a recorder
//! installed after the consumer was built still sees everything.

use idem_core::Reason;
use metrics::{counter, gauge, histogram, SharedString};
use std::sync::Arc;
use std::time::Duration;

/// `idem_deliveries_total{consumer, outcome}`: settled deliveries by outcome.
pub(crate) const DELIVERIES: &str = "idem_deliveries_total";
/// `idem_dead_letters_total{consumer, reason}`: confirmed dead letters by reason.
pub(crate) const DEAD_LETTERS: &str = "idem_dead_letters_total";
/// `idem_key_conflicts_total{consumer}`: same key, different payload.
pub(crate) const KEY_CONFLICTS: &str = "idem_key_conflicts_total";
/// `idem_crash_loops_total{consumer}`: messages dead-lettered for crashing the process again
/// and again.
pub(crate) const CRASH_LOOPS: &str = "idem_crash_loops_total";
/// `idem_ack_failures_total{consumer}`: acks or nacks the broker did not get.
pub(crate) const ACK_FAILURES: &str = "idem_ack_failures_total";
/// `idem_ack_frames_total{consumer}`: `basic.ack` frames sent; fewer than the deliveries acked
/// when one ack covers several (`multiple`).
pub(crate) const ACK_FRAMES: &str = "idem_ack_frames_total";
/// `idem_reconnects_total{consumer}`: reconnections after a lost broker connection.
pub(crate) const RECONNECTS: &str = "idem_reconnects_total";
/// `idem_handler_seconds{consumer}`: the unit of work (begin, claim, handler, commit).
pub(crate) const HANDLER_SECONDS: &str = "idem_handler_seconds";
/// `idem_end_to_end_seconds{consumer}`: the producer's AMQP timestamp to the commit.
pub(crate) const END_TO_END_SECONDS: &str = "idem_end_to_end_seconds";
/// `idem_taken_to_commit_seconds{consumer}`: a delivery taken off the channel → its effect
/// committed (applied deliveries): with group commit, the wait for the group to fill and the
/// group's whole transaction; what batching adds to a message's latency shows here.
pub(crate) const TAKEN_TO_COMMIT_SECONDS: &str = "idem_taken_to_commit_seconds";
/// `idem_commit_to_ack_seconds{consumer}`: the commit to the broker taking the ack.
pub(crate) const COMMIT_TO_ACK_SECONDS: &str = "idem_commit_to_ack_seconds";
/// `idem_in_flight{consumer}`: deliveries being handled now.
pub(crate) const IN_FLIGHT: &str = "idem_in_flight";
/// `idem_ready{consumer}`: 1 when consuming with the database reachable, else 0.
pub(crate) const READY: &str = "idem_ready";
/// `idem_ledger_purged_total{consumer}`: ledger rows deleted past the retention.
pub(crate) const LEDGER_PURGED: &str = "idem_ledger_purged_total";
/// `idem_redelivery_counts_purged_total{consumer}`: crash-loop counts deleted once stale
/// (untouched for longer than the redelivery horizon).
pub(crate) const REDELIVERY_COUNTS_PURGED: &str = "idem_redelivery_counts_purged_total";
/// `idem_dlq_messages{consumer, queue}`: messages in the dead-letter queue, last seen.
pub(crate) const DLQ_MESSAGES: &str = "idem_dlq_messages";
/// `idem_outbox_pending`: outbox rows not yet published (nor parked).
pub(crate) const OUTBOX_PENDING: &str = "idem_outbox_pending";
/// `idem_outbox_oldest_seconds`: age of the oldest row waiting to be published (0: none).
pub(crate) const OUTBOX_OLDEST_SECONDS: &str = "idem_outbox_oldest_seconds";
/// `idem_outbox_parked`: outbox rows parked (out of attempts), waiting for an operator.
pub(crate) const OUTBOX_PARKED: &str = "idem_outbox_parked";
/// `idem_relay_published_total`: outbox rows published and confirmed.
pub(crate) const RELAY_PUBLISHED: &str = "idem_relay_published_total";
/// `idem_outbox_purged_total`: published outbox rows deleted after the relay's retention.
pub(crate) const OUTBOX_PURGED: &str = "idem_outbox_purged_total";
/// `idem_relay_confirm_seconds`: publishing one batch until the broker confirmed all of it.
pub(crate) const RELAY_CONFIRM_SECONDS: &str = "idem_relay_confirm_seconds";
/// `idem_relay_publishing`: 1 while this relay publishes (some of) its outbox, 0 while it
/// stands by (other relays hold every partition, or on SQLite the lease).
pub(crate) const RELAY_PUBLISHING: &str = "idem_relay_publishing";

/// `idem_relay_partitions`: how many of the outbox's partitions this relay holds (PostgreSQL).
pub(crate) const RELAY_PARTITIONS: &str = "idem_relay_partitions";

/// How a delivery was settled, as the `outcome` label says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settled {
    Applied,
    Duplicate,
    DeadLettered(Reason),
    Retried,
    /// Nacked with requeue: the broker delivers it again.
    HandedBack,
}

/// One consumer's series: its name, labelled on each.
#[derive(Debug)]
pub(crate) struct ConsumerMetrics {
    /// Shared, not owned: a label per call on the hot path costs a reference count, not an
    /// allocation.
    consumer: SharedString,
}

impl ConsumerMetrics {
    pub(crate) fn new(consumer: &str) -> Self {
        Self {
            consumer: SharedString::from(Arc::<str>::from(consumer)),
        }
    }

    fn label(&self) -> SharedString {
        self.consumer.clone()
    }

    pub(crate) fn settled(&self, settled: Settled) {
        let outcome = match settled {
            Settled::Applied => "applied",
            Settled::Duplicate => "duplicate",
            Settled::DeadLettered(reason) => {
                counter!(DEAD_LETTERS, "consumer" => self.label(), "reason" => reason.as_str())
                    .increment(1);
                match reason {
                    Reason::KeyConflict => {
                        counter!(KEY_CONFLICTS, "consumer" => self.label()).increment(1);
                    }
                    Reason::CrashLoop => {
                        counter!(CRASH_LOOPS, "consumer" => self.label()).increment(1);
                    }
                    _ => {}
                }
                "dead_lettered"
            }
            Settled::Retried => "retried",
            Settled::HandedBack => "handed_back",
        };
        counter!(DELIVERIES, "consumer" => self.label(), "outcome" => outcome).increment(1);
    }

    pub(crate) fn ack_failure(&self) {
        counter!(ACK_FAILURES, "consumer" => self.label()).increment(1);
    }

    pub(crate) fn ack_frame(&self) {
        counter!(ACK_FRAMES, "consumer" => self.label()).increment(1);
    }

    pub(crate) fn reconnect(&self) {
        counter!(RECONNECTS, "consumer" => self.label()).increment(1);
    }

    pub(crate) fn ledger_purged(&self, rows: u64) {
        counter!(LEDGER_PURGED, "consumer" => self.label()).increment(rows);
    }

    pub(crate) fn redelivery_counts_purged(&self, rows: u64) {
        counter!(REDELIVERY_COUNTS_PURGED, "consumer" => self.label()).increment(rows);
    }

    pub(crate) fn handler_time(&self, took: Duration) {
        histogram!(HANDLER_SECONDS, "consumer" => self.label()).record(took.as_secs_f64());
    }

    pub(crate) fn taken_to_commit(&self, took: Duration) {
        histogram!(TAKEN_TO_COMMIT_SECONDS, "consumer" => self.label()).record(took.as_secs_f64());
    }

    pub(crate) fn end_to_end(&self, took: Duration) {
        histogram!(END_TO_END_SECONDS, "consumer" => self.label()).record(took.as_secs_f64());
    }

    pub(crate) fn commit_to_ack(&self, took: Duration) {
        histogram!(COMMIT_TO_ACK_SECONDS, "consumer" => self.label()).record(took.as_secs_f64());
    }

    /// One more delivery in flight, until the returned guard drops.
    pub(crate) fn in_flight(&self) -> InFlight {
        let gauge = gauge!(IN_FLIGHT, "consumer" => self.label());
        gauge.increment(1.0);
        InFlight(gauge)
    }

    pub(crate) fn ready(&self, ready: bool) {
        gauge!(READY, "consumer" => self.label()).set(if ready { 1.0 } else { 0.0 });
    }

    pub(crate) fn dlq_messages(&self, queue: &str, messages: u32) {
        gauge!(DLQ_MESSAGES, "consumer" => self.label(), "queue" => queue.to_owned())
            .set(f64::from(messages));
    }
}

/// Counts a delivery in `idem_in_flight` while it lives (a panicking or aborted task included).
pub(crate) struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The relay's series.
pub(crate) fn relay_published(rows: u64) {
    counter!(RELAY_PUBLISHED).increment(rows);
}

pub(crate) fn outbox_purged(rows: u64) {
    counter!(OUTBOX_PURGED).increment(rows);
}

pub(crate) fn relay_confirm_time(took: Duration) {
    histogram!(RELAY_CONFIRM_SECONDS).record(took.as_secs_f64());
}

pub(crate) fn relay_publishing(publishing: bool) {
    gauge!(RELAY_PUBLISHING).set(if publishing { 1.0 } else { 0.0 });
}

/// The partitions this relay's publish lease holds.
pub(crate) fn relay_partitions(partitions: u32) {
    gauge!(RELAY_PARTITIONS).set(f64::from(partitions));
}

/// The outbox as the relay last sampled it.
pub(crate) fn outbox(pending: i64, parked: i64, oldest: Option<Duration>) {
    // Row counts fit an f64 exactly far beyond any real outbox.
    #[allow(clippy::cast_precision_loss)]
    {
        gauge!(OUTBOX_PENDING).set(pending as f64);
        gauge!(OUTBOX_PARKED).set(parked as f64);
    }
    gauge!(OUTBOX_OLDEST_SECONDS).set(oldest.map_or(0.0, |d| d.as_secs_f64()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::MetricKind;

    /// One series as recorded: kind, name, sorted labels, value.
    type Seen = (MetricKind, String, Vec<(String, String)>, DebugValue);

    /// Every series the recorder saw while `f` ran.
    fn recorded(f: impl FnOnce()) -> Vec<Seen> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, f);
        let mut all: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (kind, key) = (key.kind(), key.key());
                let mut labels: Vec<_> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                (kind, key.name().to_owned(), labels, value)
            })
            .collect();
        all.sort_by(|a, b| (a.1.as_str(), &a.2).cmp(&(b.1.as_str(), &b.2)));
        all
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_key_conflict_is_a_dead_letter_a_conflict_and_a_delivery_outcome() {
        let seen = recorded(|| {
            let m = ConsumerMetrics::new("payments");
            m.settled(Settled::Applied);
            m.settled(Settled::Applied);
            m.settled(Settled::DeadLettered(Reason::KeyConflict));
        });
        let counters: Vec<_> = seen
            .into_iter()
            .map(|(kind, name, labels, value)| {
                assert_eq!(kind, MetricKind::Counter, "{name}");
                (name, labels, value)
            })
            .collect();
        assert_eq!(
            counters,
            vec![
                (
                    DEAD_LETTERS.to_owned(),
                    labels(&[("consumer", "payments"), ("reason", "key-conflict")]),
                    DebugValue::Counter(1)
                ),
                (
                    DELIVERIES.to_owned(),
                    labels(&[("consumer", "payments"), ("outcome", "applied")]),
                    DebugValue::Counter(2)
                ),
                (
                    DELIVERIES.to_owned(),
                    labels(&[("consumer", "payments"), ("outcome", "dead_lettered")]),
                    DebugValue::Counter(1)
                ),
                (
                    KEY_CONFLICTS.to_owned(),
                    labels(&[("consumer", "payments")]),
                    DebugValue::Counter(1)
                ),
            ]
        );
    }

    #[test]
    fn in_flight_goes_back_down_when_the_delivery_ends_however_it_ends() {
        let seen = recorded(|| {
            let m = ConsumerMetrics::new("payments");
            let first = m.in_flight();
            let second = m.in_flight();
            drop(first);
            // A panicking task drops its guard while unwinding.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _held = second;
                panic!("handler panicked");
            }));
            m.ready(true);
        });
        let gauges: Vec<_> = seen.into_iter().map(|(_, n, _, v)| (n, v)).collect();
        assert_eq!(
            gauges,
            vec![
                (IN_FLIGHT.to_owned(), DebugValue::Gauge(0.0.into())),
                (READY.to_owned(), DebugValue::Gauge(1.0.into())),
            ]
        );
    }

    #[test]
    fn every_name_is_a_prometheus_name_with_its_unit() {
        for name in [
            DELIVERIES,
            DEAD_LETTERS,
            KEY_CONFLICTS,
            CRASH_LOOPS,
            ACK_FAILURES,
            ACK_FRAMES,
            RECONNECTS,
            LEDGER_PURGED,
            REDELIVERY_COUNTS_PURGED,
            OUTBOX_PURGED,
            RELAY_PUBLISHED,
        ] {
            assert!(
                name.starts_with("idem_") && name.ends_with("_total"),
                "{name}"
            );
        }
        for name in [
            HANDLER_SECONDS,
            END_TO_END_SECONDS,
            TAKEN_TO_COMMIT_SECONDS,
            COMMIT_TO_ACK_SECONDS,
            OUTBOX_OLDEST_SECONDS,
            RELAY_CONFIRM_SECONDS,
        ] {
            assert!(
                name.starts_with("idem_") && name.ends_with("_seconds"),
                "{name}"
            );
        }
    }
}
