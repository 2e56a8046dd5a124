//! Liveness and readiness, for a probe endpoint or an operator's log search.

use crate::telemetry::ConsumerMetrics;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A consumer's health; see [`crate::Consumer::health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The consume loop is running (consuming, or reconnecting to the broker). False before
    /// start and after it has returned: restart the process.
    pub live: bool,
    /// Consuming, and the database answered the last time a delivery needed it: messages are
    /// being applied. False while the broker or the database is away; nothing is lost meanwhile.
    pub ready: bool,
    /// A channel is open and consuming.
    pub broker_connected: bool,
    /// The last delivery that needed the database got it.
    pub database_reachable: bool,
}

/// The atomics behind [`Health`]; every change of readiness is logged once.
#[derive(Debug)]
pub(crate) struct HealthState {
    live: AtomicBool,
    broker: AtomicBool,
    database: AtomicBool,
    /// What was last logged: 0 nothing yet, 1 ready, 2 not ready.
    logged: AtomicU8,
    /// `idem_ready`, set on every change.
    metrics: ConsumerMetrics,
}

impl HealthState {
    pub(crate) fn new(metrics: ConsumerMetrics) -> Self {
        Self {
            metrics,
            live: AtomicBool::new(false),
            broker: AtomicBool::new(false),
            // Innocent until a delivery finds otherwise: the pool connected at start.
            database: AtomicBool::new(true),
            logged: AtomicU8::new(0),
        }
    }

    pub(crate) fn snapshot(&self) -> Health {
        let live = self.live.load(Ordering::Relaxed);
        let broker = self.broker.load(Ordering::Relaxed);
        let database = self.database.load(Ordering::Relaxed);
        Health {
            live,
            ready: live && broker && database,
            broker_connected: broker,
            database_reachable: database,
        }
    }

    pub(crate) fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Relaxed);
        self.log_change(None);
    }

    pub(crate) fn set_broker(&self, connected: bool) {
        self.broker.store(connected, Ordering::Relaxed);
        self.log_change(None);
    }

    pub(crate) fn set_database(&self, reachable: bool, error: Option<&str>) {
        if self.database.swap(reachable, Ordering::Relaxed) != reachable {
            self.log_change(error);
        }
    }

    fn log_change(&self, error: Option<&str>) {
        let health = self.snapshot();
        // The gauge follows every change, the start-up "not ready" included.
        self.metrics.ready(health.ready);
        let state = if health.ready { 1 } else { 2 };
        // Starting up is not an outage: the first line is "ready".
        if state == 2 && self.logged.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.logged.swap(state, Ordering::Relaxed) == state {
            return;
        }
        if health.ready {
            tracing::info!(health = "ready", "ready: consuming, database reachable");
        } else if !health.live {
            // A requested stop is not a warning.
            tracing::info!(health = "not ready", why = "stopped", "not ready: stopped");
        } else {
            let why = match (
                health.live,
                health.broker_connected,
                health.database_reachable,
            ) {
                (false, _, _) => "stopped",
                (_, false, _) => "broker connection down",
                _ => "database unreachable",
            };
            tracing::warn!(
                health = "not ready",
                why,
                error = error.unwrap_or(""),
                "not ready: {why}"
            );
        }
    }
}
