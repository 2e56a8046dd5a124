//! What the unit of work does with failing, oversized and crashing deliveries.

use crate::backoff::Backoff;
use crate::error::Error;
use std::time::Duration;

/// When and how often a transiently failing message is tried again.
///
/// Attempt `n` (1-based) that fails transiently is tried again after
/// `min(initial_delay * 2^(n-1), max_delay)`, shortened by up to `jitter` of itself so that
/// messages that failed together do not come back together. After `max_attempts` attempts the
/// message is dead-lettered with reason `retries-exhausted`.
///
/// The transport keeps one delay queue per distinct delay ([`RetryPolicy::tiers`]): a message
/// waiting 1 s never queues behind one waiting a minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    max_delay: Duration,
    jitter: f64,
}

/// RabbitMQ's per-queue TTL is a 32-bit count of milliseconds.
const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);
/// Distinct delays (and so delay queues) a policy may use.
const MAX_TIERS: usize = 16;

impl Default for RetryPolicy {
    /// 8 attempts, 1 s doubling to at most 5 min (1, 2, 4 … 64 s: about two minutes in all),
    /// 20 % jitter.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Doubling delays from `initial` up to `max`; 8 attempts and 20 % jitter unless set.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            initial_delay: initial,
            max_delay: max,
            ..Self::default()
        }
    }

    /// No retries: the first transient failure dead-letters the message (`retries-exhausted`).
    pub fn no_retries() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Attempts in all, the first one included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The share (0 to < 1) by which each delay is randomly shortened.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Attempts in all, the first one included.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Checks the numbers; the error says what to change.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |what: String| Err(Error::Config(format!("retry policy: {what}")));
        if self.max_attempts == 0 {
            return fail("max_attempts must be at least 1 (1 means no retries)".into());
        }
        if self.initial_delay < Duration::from_millis(1) {
            return fail(format!(
                "the initial delay {:?} must be at least 1 ms",
                self.initial_delay
            ));
        }
        if self.max_delay < self.initial_delay {
            return fail(format!(
                "the maximum delay {:?} is below the initial delay {:?}",
                self.max_delay, self.initial_delay
            ));
        }
        if self.max_delay > MAX_DELAY {
            return fail(format!(
                "the maximum delay {:?} is over RabbitMQ's limit for a queue TTL, {MAX_DELAY:?}",
                self.max_delay
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return fail(format!(
                "jitter {} must be at least 0 and below 1 (0.2 shortens each delay by up to 20 %)",
                self.jitter
            ));
        }
        let tiers = self.tiers().len();
        if tiers > MAX_TIERS {
            return fail(format!(
                "{tiers} distinct delays need {tiers} delay queues; at most {MAX_TIERS}: lower max_attempts or the maximum delay"
            ));
        }
        Ok(())
    }

    /// The policy's delays as a [`Backoff`]: failure `n` (1-based) waits `backoff().delay(n - 1)`.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_delay, self.max_delay).with_jitter(self.jitter)
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        self.backoff().delay(attempt.saturating_sub(1))
    }

    /// The delays of every retry added up: how long after its first attempt a message may
    /// still be retried.
    pub fn schedule(&self) -> Duration {
        (1..self.attempts())
            .map(|attempt| self.delay_after(attempt))
            .fold(Duration::ZERO, Duration::saturating_add)
    }

    /// Every distinct delay the policy uses, shortest first: one delay queue each.
    pub fn tiers(&self) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = (1..self.max_attempts)
            .map(|attempt| self.delay_after(attempt))
            .collect();
        tiers.dedup();
        tiers
    }

    /// The delay after failed attempt `attempt`, jittered by `random` (0 to 1).
    pub(crate) fn jittered(&self, attempt: u32, random: f64) -> Duration {
        self.backoff().jittered(attempt.saturating_sub(1), random)
    }
}

/// The isolation level of idem's transaction, the one the handler's effects run in.
///
/// idem's own correctness does not depend on it: the claim is a unique insert, so a duplicate
/// is found at any level. Under REPEATABLE READ and SERIALIZABLE a claim that races another
/// copy of the same message fails with a serialization error instead of waiting and finding
/// the key; idem runs such a claim again at once, in a new transaction, where it finds the
/// duplicate (neither an attempt nor a sign that the database is unavailable).
///
/// SQLite runs every transaction SERIALIZABLE (one writer at a time), which satisfies any
/// level asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Isolation {
    /// The server's default: PostgreSQL's `default_transaction_isolation` (READ COMMITTED
    /// unless the database or role says otherwise).
    #[default]
    ServerDefault,
    /// READ COMMITTED: each statement sees what was committed before it began.
    ReadCommitted,
    /// REPEATABLE READ: the whole transaction sees one snapshot; a concurrent update of a row
    /// it updates fails it with a serialization error (transient: retried).
    RepeatableRead,
    /// SERIALIZABLE: as if transactions ran one at a time; what would break that fails with a
    /// serialization error (transient: retried). What a handler needs to rule out write skew
    /// (two reservations each seeing the last unit of stock).
    Serializable,
}

impl Isolation {
    /// The `BEGIN` that opens a PostgreSQL transaction at this level.
    #[cfg(feature = "postgres")]
    pub(crate) fn begin_statement(self) -> &'static str {
        match self {
            Self::ServerDefault => "BEGIN",
            Self::ReadCommitted => "BEGIN ISOLATION LEVEL READ COMMITTED",
            Self::RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            Self::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        }
    }
}

/// The limits the unit of work applies to every delivery of one consumer.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Policy {
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Bodies over this many bytes are dead-lettered `malformed` without being decoded
    /// (default 1 MiB).
    pub max_body_bytes: usize,
    /// How many times a message may come back redelivered after its handling was cut short
    /// (the process died, the connection dropped) before it is dead-lettered `crash-loop`
    /// (default 5).
    pub crash_loop_limit: u32,
    /// The isolation level of the transaction (default: the server's).
    pub isolation: Isolation,
    /// How long the ledger remembers an applied key (default 30 days). A copy of a message
    /// that arrives after its key was purged is applied again.
    pub ledger_retention: Duration,
    /// How long after its last attempt a message may still come back: a dead letter replayed
    /// by an operator, a copy a producer sends again (default 7 days). The retention must
    /// cover it, with the retry schedule and a day to spare.
    pub replay_window: Duration,
}

/// Room kept between the ledger retention and the latest a copy of a message may arrive.
const RETENTION_MARGIN: Duration = Duration::from_secs(86_400);

const DAY: Duration = Duration::from_secs(86_400);

impl Default for Policy {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            max_body_bytes: 1024 * 1024,
            crash_loop_limit: 5,
            isolation: Isolation::ServerDefault,
            ledger_retention: 30 * DAY,
            replay_window: 7 * DAY,
        }
    }
}

impl Policy {
    /// The latest a copy of a message may still arrive after its first attempt: the whole
    /// retry schedule, the replay window and a margin. The ledger must remember a key this
    /// long.
    pub fn redelivery_horizon(&self) -> Duration {
        self.retry
            .schedule()
            .saturating_add(self.replay_window)
            .saturating_add(RETENTION_MARGIN)
    }

    /// Checks every limit; the error says what to change.
    pub fn validate(&self) -> Result<(), Error> {
        self.retry.validate()?;
        if self.max_body_bytes == 0 {
            return Err(Error::Config(
                "max_body_bytes must be at least 1 (the default is 1 MiB)".into(),
            ));
        }
        if self.crash_loop_limit == 0 {
            return Err(Error::Config(
                "crash_loop_limit must be at least 1: it is how many cut-short redeliveries a message gets (default 5)".into(),
            ));
        }
        let horizon = self.redelivery_horizon();
        if self.ledger_retention < horizon {
            return Err(Error::Config(format!(
                "ledger_retention {} is shorter than the redelivery horizon {}: the retry schedule ({}) plus the replay window ({}) plus a margin of {}. A copy arriving after its key was purged would be applied twice: raise ledger_retention to at least {}, or shorten replay_window or the retry policy",
                days(self.ledger_retention),
                days(horizon),
                days(self.retry.schedule()),
                days(self.replay_window),
                days(RETENTION_MARGIN),
                days(horizon),
            )));
        }
        Ok(())
    }
}

/// A duration for an error text: in days (one decimal) from a day up, else as `Debug` does.
fn days(duration: Duration) -> String {
    if duration >= DAY {
        format!("{:.1} days", duration.as_secs_f64() / DAY.as_secs_f64())
    } else {
        format!("{duration:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retention_shorter_than_the_redelivery_horizon_is_refused_with_the_numbers() {
        assert!(Policy::default().validate().is_ok());
        // 8 attempts: 1+2+4+8+16+32+64 s of retries.
        assert_eq!(RetryPolicy::default().schedule(), Duration::from_secs(127));
        let policy = Policy {
            ledger_retention: 3 * DAY,
            ..Policy::default()
        };
        let error = policy.validate().unwrap_err().to_string();
        assert!(
            error.contains(
                "ledger_retention 3.0 days is shorter than the redelivery horizon 8.0 days"
            ),
            "{error}"
        );
        assert!(error.contains("replay window (7.0 days)"), "{error}");
        assert!(error.contains("retry schedule (127s)"), "{error}");
        let shorter_window = Policy {
            ledger_retention: 3 * DAY,
            replay_window: DAY,
            ..Policy::default()
        };
        assert!(shorter_window.validate().is_ok());
    }

    #[test]
    fn default_delays_double_and_each_has_a_tier() {
        let policy = RetryPolicy::default();
        let secs: Vec<u64> = policy.tiers().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64]);
        assert!(policy.validate().is_ok());
    }

    #[test]
    fn delays_stop_at_the_maximum() {
        let policy = RetryPolicy::exponential(Duration::from_secs(10), Duration::from_secs(30))
            .max_attempts(10);
        let secs: Vec<u64> = policy.tiers().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [10, 20, 30]);
        assert_eq!(policy.delay_after(9), Duration::from_secs(30));
    }

    #[test]
    fn jitter_only_shortens() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.jittered(3, 0.0), Duration::from_secs(4));
        assert_eq!(policy.jittered(3, 1.0), Duration::from_millis(3200));
    }

    #[test]
    fn bad_policies_say_what_to_fix() {
        let cases = [
            (RetryPolicy::default().max_attempts(0), "max_attempts"),
            (RetryPolicy::default().jitter(1.5), "jitter"),
            (
                RetryPolicy::exponential(Duration::from_secs(9), Duration::from_secs(1)),
                "below the initial delay",
            ),
            (
                RetryPolicy::exponential(Duration::ZERO, Duration::from_secs(1)),
                "at least 1 ms",
            ),
            (
                RetryPolicy::exponential(
                    Duration::from_millis(1),
                    Duration::from_secs(86_400 * 60),
                )
                .max_attempts(40),
                "RabbitMQ's limit",
            ),
            (
                RetryPolicy::exponential(Duration::from_millis(1), Duration::from_secs(86_400))
                    .max_attempts(40),
                "delay queues",
            ),
        ];
        for (policy, expected) in cases {
            let error = policy.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }
}
