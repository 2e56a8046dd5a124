//! [`ConsumerBuilder`]: the settings of a consumer, and the checks that refuse an impossible
//! one at start with the fix in the message.

use super::stats::Counters;
use super::{Consumer, Shared};
use crate::error::Error;
use crate::health::HealthState;
use crate::telemetry::ConsumerMetrics;
use crate::topology::{self, QueueType, MAX_QUEUE_NAME};
use idem_core::{Backend, Backoff, Handler, Isolation, Policy, RetryPolicy};
use sqlx::Pool;
use std::sync::Arc;
use std::time::Duration;

/// Transactions in flight at once unless configured.
const DEFAULT_CONCURRENCY: usize = 8;
/// The longest wait between two tries of a delivery while the database is unreachable.
const MAX_DATABASE_WAIT: Duration = Duration::from_secs(30);

/// Builds a [`Consumer`]; see [`Consumer::builder`].
#[derive(Debug)]
#[must_use = "call .build() to get a Consumer"]
pub struct ConsumerBuilder<DB: Backend, H> {
    pool: Pool<DB>,
    handler: H,
    queue: Option<String>,
    queue_type: QueueType,
    prefetch: u16,
    /// `None`: the default, 8, lowered to the prefetch when that is smaller.
    concurrency: Option<usize>,
    policy: Policy,
    database_backoff: Duration,
    shutdown_deadline: Duration,
    ledger_purge_interval: Duration,
    dlq_alert_threshold: u32,
    dlq_poll_interval: Duration,
    /// `None`: one transaction per message.
    group: Option<super::Group>,
    lock_order: Option<super::ErasedLockOrder>,
}

/// The longest a group may wait to fill: the latency every message of it may gain.
const MAX_GROUP_WAIT: Duration = Duration::from_secs(1);

impl<DB: Backend, H: Handler<DB>> ConsumerBuilder<DB, H> {
    /// The defaults; see [`Consumer::builder`].
    pub(super) fn new(pool: Pool<DB>, handler: H) -> Self {
        Self {
            pool,
            handler,
            queue: None,
            queue_type: QueueType::Classic,
            prefetch: 200,
            concurrency: None,
            policy: Policy::default(),
            database_backoff: Duration::from_secs(1),
            shutdown_deadline: Duration::from_secs(30),
            ledger_purge_interval: Duration::from_secs(300),
            dlq_alert_threshold: 1,
            dlq_poll_interval: Duration::from_secs(5),
            group: None,
            lock_order: None,
        }
    }

    /// With group commit: the rows a message writes, named by a key (say, its account id), so
    /// that every group runs its handlers in ascending key order. Groups in flight side by side
    /// (several consumers, `concurrency` above 1) that write the same hot rows in any other
    /// order deadlock; PostgreSQL breaks each deadlock after a second (`deadlock_timeout`),
    /// which costs a group a re-run. Messages that write several such rows need them in one
    /// order inside the handler too (lock them `ORDER BY`).
    pub fn group_lock_order(
        mut self,
        lock_key: impl Fn(&H::Message) -> String + Send + Sync + 'static,
    ) -> Self {
        self.lock_order = Some(super::ErasedLockOrder(Box::new(
            move |message: &dyn std::any::Any| {
                // Always the handler's message type: the consumer erases nothing else.
                message
                    .downcast_ref::<H::Message>()
                    .map(&lock_key)
                    .unwrap_or_default()
            },
        )));
        self
    }

    /// Group commit: up to `max_messages` deliveries run in one transaction (one set-based
    /// ledger claim, each handler in turn, one COMMIT, then the acks, one `basic.ack(multiple)`
    /// where the tags allow), waiting at most `max_wait` for a group to fill. A group starts
    /// without waiting when no other group is in flight (waiting would only add latency; under
    /// load groups are in flight and the wait fills them). Each message keeps the guarantee it
    /// has alone: one that fails is taken out and runs alone (its retry or dead letter as in
    /// per-message mode), the others commit without it; a redelivered message always runs alone.
    /// `concurrency` groups are in flight at once. `max_messages` 1 is one transaction per
    /// message (the default).
    pub fn group_commit(mut self, max_messages: usize, max_wait: Duration) -> Self {
        self.group = Some(super::Group {
            max_messages,
            max_wait,
        });
        self
    }

    /// The queue to consume (default: the handler's consumer name). Its dead-letter queue is
    /// `<queue>.dlq`; both are declared durable on start.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// The type of the queue, its dead-letter queue and its delay queues (default
    /// [`QueueType::Classic`]). [`QueueType::Quorum`] on a RabbitMQ cluster: replicated, a
    /// retry returns from its delay queue at-least-once, and the crash-loop guard takes the
    /// broker's delivery count. A queue that exists as another type (or with other arguments)
    /// is refused at start with the broker's words naming the argument: a queue's type cannot
    /// change in place (move its messages to a new queue, or delete it when empty).
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// How many unacknowledged deliveries the broker may push ahead (default 200; 100–300 is the
    /// sweet spot, 1 is an order of magnitude slower).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// How many deliveries are processed at once, each in its own transaction (default 8, or
    /// the prefetch if that is smaller). The pool should have at least this many connections.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Retries of transient handler failures: attempts and backoff (default: 8 attempts, 1 s
    /// doubling, 20 % jitter). Each distinct delay gets a delay queue `<queue>.retry.<delay>`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy.retry = policy;
        self
    }

    /// The isolation level of the transaction the handler runs in (default: the server's,
    /// READ COMMITTED unless configured otherwise). A handler that must rule out write skew
    /// (two reservations each seeing the last unit of stock) asks for
    /// [`Isolation::Serializable`]; its serialization failures are transient and retried.
    /// A claim that races another copy of the message at these levels is claimed again at
    /// once: not an attempt, and the consumer stays ready. SQLite is always serializable.
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.policy.isolation = isolation;
        self
    }

    /// How long the ledger remembers an applied key (default 30 days). A copy of a message
    /// that arrives after its key was purged would be applied again, so the build refuses a
    /// retention shorter than the retry schedule plus the replay window plus a day.
    pub fn ledger_retention(mut self, retention: Duration) -> Self {
        self.policy.ledger_retention = retention;
        self
    }

    /// How long after its last attempt a copy of a message may still come (default 7 days): a
    /// dead letter replayed by an operator, a producer sending again. The ledger retention
    /// must cover it.
    pub fn replay_window(mut self, window: Duration) -> Self {
        self.policy.replay_window = window;
        self
    }

    /// How often the ledger purge runs (default every 5 minutes). Each run deletes rows past
    /// the retention in batches of 5,000, on one instance at a time per consumer.
    pub fn ledger_purge_interval(mut self, interval: Duration) -> Self {
        self.ledger_purge_interval = interval;
        self
    }

    /// Bodies over this many bytes are dead-lettered `malformed` unread (default 1 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.policy.max_body_bytes = bytes;
        self
    }

    /// How many times a message may come back redelivered after its handling was cut short
    /// (process killed, connection lost) before it is dead-lettered `crash-loop` (default 5).
    pub fn crash_loop_limit(mut self, limit: u32) -> Self {
        self.policy.crash_loop_limit = limit;
        self
    }

    /// The first wait before a delivery is tried again while the database is unreachable
    /// (default 1 s; it doubles up to 30 s). Such waits are not attempts: an outage never
    /// dead-letters a message.
    pub fn database_backoff(mut self, delay: Duration) -> Self {
        self.database_backoff = delay;
        self
    }

    /// How long a stop waits for in-flight deliveries (default 30 s); what is not finished then
    /// is left to redelivery.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// How many messages in the dead-letter queue make the consumer log a warning (default 1:
    /// any dead letter needs a look). One WARN when the depth reaches it, one INFO when it is
    /// back under, however many polls in between; the depth itself is the
    /// `idem_dlq_messages{consumer, queue}` gauge and [`ConsumerStats::dlq_messages`](super::ConsumerStats::dlq_messages).
    pub fn dlq_alert_threshold(mut self, messages: u32) -> Self {
        self.dlq_alert_threshold = messages;
        self
    }

    /// How often the consumer looks at its dead-letter queue's depth (default 5 s; a passive
    /// declare on a channel of its own, so the check costs the broker next to nothing).
    pub fn dlq_poll_interval(mut self, interval: Duration) -> Self {
        self.dlq_poll_interval = interval;
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<Consumer<DB, H>, Error> {
        let queue = self
            .queue
            .clone()
            .unwrap_or_else(|| self.handler.consumer().to_owned());
        self.check(&queue)?;
        let concurrency = self.checked_concurrency()?;
        let consumer = self.handler.consumer();
        // Groups of one are one transaction per message.
        let group = self.group.filter(|group| group.max_messages > 1);
        if self.handler.batch().is_some() && group.is_none() {
            // It works (each message is a batch of one), but it is surely not what was meant.
            tracing::warn!(
                consumer,
                "the handler takes whole batches, but group commit is off: each message is a batch of one; call .group_commit(max_messages, max_wait) on the consumer builder"
            );
        }
        let (counters, health) = (
            Arc::new(Counters::new(consumer)),
            HealthState::new(ConsumerMetrics::new(consumer)),
        );
        Ok(Consumer {
            shared: Arc::new(Shared {
                pool: self.pool,
                handler: self.handler,
                lock_order: self.lock_order,
                queue,
                queue_type: self.queue_type,
                policy: self.policy,
                database_backoff: Backoff::new(self.database_backoff, MAX_DATABASE_WAIT),
                counters,
                health,
                suspects_alone: tokio::sync::RwLock::new(()),
            }),
            prefetch: self.prefetch,
            concurrency,
            shutdown_deadline: self.shutdown_deadline,
            ledger_purge_interval: self.ledger_purge_interval,
            dlq_alert_threshold: self.dlq_alert_threshold,
            dlq_poll_interval: self.dlq_poll_interval,
            group,
        })
    }

    /// Everything but the concurrency, in the order a user meets the problems: the consumer
    /// name, the policy, the queue names, the database backoff, the prefetch.
    fn check(&self, queue: &str) -> Result<(), Error> {
        let consumer = self.handler.consumer();
        if consumer.is_empty() || consumer.len() > 200 {
            return Err(Error::Config(format!(
                "the consumer name {consumer:?} must be 1 to 200 bytes: it scopes the ledger and names the consumer tag"
            )));
        }
        self.policy.validate()?;
        let longest = topology::queues(queue, &self.policy.retry, self.queue_type)
            .into_iter()
            .map(|(name, _)| name)
            .max_by_key(String::len)
            .unwrap_or_default();
        if queue.is_empty() {
            return Err(Error::Config(
                "the queue name is empty; name the queue (the default is the consumer name)".into(),
            ));
        }
        if longest.len() > MAX_QUEUE_NAME {
            return Err(Error::Config(format!(
                "the queue name {queue:?} is too long: its delay queue {longest:?} would be {} bytes, over RabbitMQ's {MAX_QUEUE_NAME}",
                longest.len()
            )));
        }
        if self.ledger_purge_interval.is_zero() {
            return Err(Error::Config(
                "ledger_purge_interval must be above zero (default 5 minutes)".into(),
            ));
        }
        if self.dlq_poll_interval.is_zero() || self.dlq_alert_threshold == 0 {
            return Err(Error::Config(
                "dlq_poll_interval and dlq_alert_threshold must be above zero (defaults 5 s and 1 message)".into(),
            ));
        }
        if self.database_backoff.is_zero() {
            return Err(Error::Config(
                "database_backoff must be above zero, or an outage becomes a hot loop (default 1 s)".into(),
            ));
        }
        if queue.starts_with("amq.") {
            return Err(Error::Config(format!(
                "the queue name {queue:?} starts with `amq.`, which RabbitMQ reserves"
            )));
        }
        if let Some(group) = self.group {
            if group.max_messages == 0 {
                return Err(Error::Config(
                    "group_commit max_messages must be at least 1 (1: one transaction per message)"
                        .into(),
                ));
            }
            if group.max_messages > usize::from(self.prefetch) {
                return Err(Error::Config(format!(
                    "group_commit max_messages {} exceeds prefetch {}: a group never gets more than the broker pushes ahead; raise prefetch (a few groups' worth) or lower max_messages",
                    group.max_messages, self.prefetch
                )));
            }
            if group.max_wait.is_zero() || group.max_wait > MAX_GROUP_WAIT {
                return Err(Error::Config(format!(
                    "group_commit max_wait {:?} must be above zero and at most {MAX_GROUP_WAIT:?}: every message of a group may wait that long (a few ms is typical)",
                    group.max_wait
                )));
            }
        }
        if self.prefetch == 0 {
            return Err(Error::Config(
                "prefetch must be at least 1 (0 means unlimited to RabbitMQ and lets one consumer hoard the queue); 200 is a good start".into(),
            ));
        }
        Ok(())
    }

    /// The concurrency: as set, or the default lowered to the prefetch; at least 1 and at most
    /// the prefetch.
    fn checked_concurrency(&self) -> Result<usize, Error> {
        let concurrency = self
            .concurrency
            .unwrap_or_else(|| DEFAULT_CONCURRENCY.min(usize::from(self.prefetch)));
        if concurrency == 0 {
            return Err(Error::Config("concurrency must be at least 1".into()));
        }
        if concurrency > usize::from(self.prefetch) {
            return Err(Error::Config(format!(
                "concurrency {} exceeds prefetch {}: at most prefetch deliveries are ever in flight; raise prefetch or lower concurrency",
                concurrency, self.prefetch
            )));
        }
        Ok(concurrency)
    }
}
