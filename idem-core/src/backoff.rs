//! One backoff for everything that waits and tries again: retries of a failed message, a
//! delivery held while the database is away, reconnects to the broker, and the relay's
//! publishing and database waits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Doubling delays: `initial * 2^n` after `n` earlier failures, at most `max`, each shortened
/// at random by up to `jitter` of itself.
///
/// Jitter only ever shortens a delay, so `max` stays a true upper bound; it keeps processes or
/// messages that failed together from all coming back at the same instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// Doubling from `initial` up to `max`, without jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: 0.0,
        }
    }

    /// The same delays, each shortened at random by up to `fraction` (0 to below 1) of itself.
    pub const fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// The first delay.
    pub const fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay.
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// The share by which a delay may be shortened.
    pub const fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The delay after `failures` earlier failures (0: the first wait), before jitter:
    /// `min(initial * 2^failures, max)`.
    pub fn delay(&self, failures: u32) -> Duration {
        // Past 2^31 every sane `initial` is over any `max`: saturate rather than overflow.
        self.initial
            .saturating_mul(1u32 << failures.min(31))
            .min(self.max)
    }

    /// [`Backoff::delay`] shortened by `jitter * random` of itself; `random` is clamped to 0..=1.
    pub fn jittered(&self, failures: u32, random: f64) -> Duration {
        self.delay(failures)
            .mul_f64(1.0 - self.jitter * random.clamp(0.0, 1.0))
    }

    /// [`Backoff::jittered`] with a fresh random draw: the delay to sleep now.
    pub fn next_delay(&self, failures: u32) -> Duration {
        self.jittered(failures, rand::random::<f64>())
    }
}

/// Now, in whole seconds since the Unix epoch (AMQP timestamps); 0 on a clock before 1970.
pub fn unix_seconds() -> u64 {
    since_epoch().as_secs()
}

/// Now, in milliseconds since the Unix epoch (SQLite's outbox and lease times); 0 on a clock
/// before 1970.
pub fn unix_millis() -> i64 {
    i64::try_from(since_epoch().as_millis()).unwrap_or(i64::MAX)
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn doubles_up_to_the_maximum() {
        let backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let millis: Vec<u128> = (0..10).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(
            millis,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_only_shortens() {
        let backoff =
            Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).with_jitter(0.2);
        assert_eq!(backoff.jittered(2, 0.0), Duration::from_secs(4));
        assert_eq!(backoff.jittered(2, 1.0), Duration::from_millis(3200));
        assert_eq!(backoff.jittered(2, 7.0), Duration::from_millis(3200));
        for _ in 0..100 {
            let delay = backoff.next_delay(20);
            assert!(delay <= Duration::from_secs(300) && delay >= Duration::from_secs(240));
        }
    }

    #[test]
    fn a_huge_initial_delay_saturates() {
        let backoff = Backoff::new(Duration::MAX, Duration::from_secs(1));
        assert_eq!(backoff.delay(5), Duration::from_secs(1));
    }
}
