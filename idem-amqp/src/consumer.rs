//! The consume loop: deliveries in, the unit of work, then ack / dead-letter / deliver again.

use crate::dead_letter::{
    self, dead_letter_queue, retry_queue, DeadLetter, ATTEMPTS_HEADER, FIRST_FAILURE_HEADER,
};
use crate::error::AmqpError;
use crate::health::{Health, HealthState};
use futures_util::StreamExt;
use idem_core::{
    delivery_span, process, Backend, Delivery, Handler, Metadata, Outcome, Policy, RetryPolicy,
};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use sqlx::Pool;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Longest queue name RabbitMQ accepts.
const MAX_QUEUE_NAME: usize = 255;
/// The longest wait between two tries of a delivery while the database is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Counters of what a consumer did; read them with [`Consumer::stats`].
#[derive(Debug, Default)]
struct Counters {
    applied: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    redelivered_later: AtomicU64,
    ack_failures: AtomicU64,
    reconnects: AtomicU64,
}

/// A snapshot of a consumer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
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
}

/// Builds a [`Consumer`]; see [`Consumer::builder`].
#[derive(Debug)]
#[must_use = "call .build() to get a Consumer"]
pub struct ConsumerBuilder<DB: Backend, H> {
    pool: Pool<DB>,
    handler: H,
    queue: Option<String>,
    prefetch: u16,
    /// `None`: the default, 8, lowered to the prefetch when that is smaller.
    concurrency: Option<usize>,
    policy: Policy,
    database_backoff: Duration,
    shutdown_deadline: Duration,
}

/// Transactions in flight at once unless configured.
const DEFAULT_CONCURRENCY: usize = 8;

impl<DB: Backend, H: Handler<DB>> ConsumerBuilder<DB, H> {
    /// The queue to consume (default: the handler's consumer name). Its dead-letter queue is
    /// `<queue>.dlq`; both are declared durable on start.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
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

    /// Checks the settings.
    pub fn build(self) -> Result<Consumer<DB, H>, AmqpError> {
        let queue = self
            .queue
            .unwrap_or_else(|| self.handler.consumer().to_owned());
        let consumer = self.handler.consumer();
        if consumer.is_empty() || consumer.len() > 200 {
            return Err(AmqpError::Config(format!(
                "the consumer name {consumer:?} must be 1 to 200 bytes: it scopes the ledger and names the consumer tag"
            )));
        }
        self.policy
            .validate()
            .map_err(|error| AmqpError::Config(error.to_string()))?;
        let longest = topology(&queue, &self.policy.retry)
            .into_iter()
            .map(|(name, _)| name)
            .max_by_key(String::len)
            .unwrap_or_default();
        if queue.is_empty() {
            return Err(AmqpError::Config(
                "the queue name is empty; name the queue (the default is the consumer name)".into(),
            ));
        }
        if longest.len() > MAX_QUEUE_NAME {
            return Err(AmqpError::Config(format!(
                "the queue name {queue:?} is too long: its delay queue {longest:?} would be {} bytes, over RabbitMQ's {MAX_QUEUE_NAME}",
                longest.len()
            )));
        }
        if self.database_backoff.is_zero() {
            return Err(AmqpError::Config(
                "database_backoff must be above zero, or an outage becomes a hot loop (default 1 s)".into(),
            ));
        }
        if queue.starts_with("amq.") {
            return Err(AmqpError::Config(format!(
                "the queue name {queue:?} starts with `amq.`, which RabbitMQ reserves"
            )));
        }
        if self.prefetch == 0 {
            return Err(AmqpError::Config(
                "prefetch must be at least 1 (0 means unlimited to RabbitMQ and lets one consumer hoard the queue); 200 is a good start".into(),
            ));
        }
        let concurrency = self
            .concurrency
            .unwrap_or_else(|| DEFAULT_CONCURRENCY.min(usize::from(self.prefetch)));
        if concurrency == 0 {
            return Err(AmqpError::Config("concurrency must be at least 1".into()));
        }
        if concurrency > usize::from(self.prefetch) {
            return Err(AmqpError::Config(format!(
                "concurrency {} exceeds prefetch {}: at most prefetch deliveries are ever in flight; raise prefetch or lower concurrency",
                concurrency, self.prefetch
            )));
        }
        Ok(Consumer {
            shared: Arc::new(Shared {
                pool: self.pool,
                handler: self.handler,
                queue,
                policy: self.policy,
                database_backoff: self.database_backoff,
                counters: Counters::default(),
                health: HealthState::default(),
                suspects_alone: tokio::sync::RwLock::new(()),
            }),
            prefetch: self.prefetch,
            concurrency,
            shutdown_deadline: self.shutdown_deadline,
        })
    }
}

/// What every delivery task needs.
struct Shared<DB: Backend, H> {
    pool: Pool<DB>,
    handler: H,
    queue: String,
    policy: Policy,
    database_backoff: Duration,
    counters: Counters,
    health: HealthState,
    /// Redelivered messages run alone (write lock), everything else side by side (read lock):
    /// after a crash, the message that caused it must not take innocent deliveries that happen
    /// to be in flight beside it over the crash-loop limit with it.
    suspects_alone: tokio::sync::RwLock<()>,
}

/// An effectively-once RabbitMQ consumer: each delivery runs through [`idem_core::process`] (one
/// transaction: ledger claim, handler, commit) and is acknowledged only after the commit.
pub struct Consumer<DB: Backend, H> {
    shared: Arc<Shared<DB, H>>,
    prefetch: u16,
    concurrency: usize,
    shutdown_deadline: Duration,
}

impl<DB: Backend, H> std::fmt::Debug for Consumer<DB, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.shared.queue)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend, H: Handler<DB>> Consumer<DB, H> {
    /// Starts building a consumer that runs `handler` against `pool`.
    pub fn builder(pool: Pool<DB>, handler: H) -> ConsumerBuilder<DB, H> {
        ConsumerBuilder {
            pool,
            handler,
            queue: None,
            prefetch: 200,
            concurrency: None,
            policy: Policy::default(),
            database_backoff: Duration::from_secs(1),
            shutdown_deadline: Duration::from_secs(30),
        }
    }

    /// The queue this consumer reads.
    pub fn queue(&self) -> &str {
        &self.shared.queue
    }

    /// What the consumer has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            applied: c.applied.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            redelivered_later: c.redelivered_later.load(Ordering::Relaxed),
            ack_failures: c.ack_failures.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Liveness and readiness: whether the consume loop is running, and whether it is
    /// consuming with the database reachable. Changes are also logged (`ready` / `not ready`).
    pub fn health(&self) -> Health {
        self.shared.health.snapshot()
    }

    /// Connects to the broker at `amqp_url` and consumes until `shutdown` resolves, reconnecting
    /// by itself (with backoff and jitter, up to 30 s apart) whenever the connection or channel
    /// is lost: a broker restart or a forced close is survived without help.
    ///
    /// Fails fast only at start — a bad URL, a broker that cannot be reached, a queue declared
    /// elsewhere with other arguments — with an error that says what to fix.
    pub async fn serve(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AmqpError> {
        let stop = CancellationToken::new();
        self.shared.health.set_live(true);
        let served = stop_on(&stop, self.serve_until(amqp_url, &stop), shutdown).await;
        self.shared.health.set_live(false);
        served
    }

    async fn serve_until(&self, amqp_url: &str, stop: &CancellationToken) -> Result<(), AmqpError> {
        let mut connection = crate::connect(amqp_url).await?;
        let mut first = true;
        loop {
            match self.run_until(&connection, stop).await {
                Ok(()) => return Ok(()),
                Err(error) if first && connection.status().connected() => {
                    // Refused on a healthy connection before it ever consumed: a configuration
                    // problem (say, a queue declared elsewhere with other arguments), which
                    // reconnecting would only repeat.
                    return Err(error);
                }
                Err(error) => tracing::warn!(%error, "lost the broker; reconnecting"),
            }
            first = false;
            if connection.status().connected() {
                let _ = connection.close(200, "idem reconnecting".into()).await;
            }
            connection = match crate::connect::reconnect(amqp_url, stop.cancelled()).await {
                Some(connection) => connection,
                None => return Ok(()),
            };
            self.shared
                .counters
                .reconnects
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Declares the queue, its dead-letter queue and its delay queues (all durable), on a
    /// channel of `connection`.
    pub async fn declare(&self, connection: &Connection) -> Result<(), AmqpError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("open a channel"))?;
        declare_topology(&channel, &self.shared.queue, &self.shared.policy.retry).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// Consumes until `shutdown` resolves, then stops taking deliveries, finishes (and acks) the
    /// ones in flight within the shutdown deadline and closes its channels.
    ///
    /// Returns an error when the channel or connection is lost; unacknowledged deliveries then
    /// go back to the queue and are deduplicated when they come again.
    pub async fn run(
        &self,
        connection: &Connection,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AmqpError> {
        let stop = CancellationToken::new();
        self.shared.health.set_live(true);
        let ran = stop_on(&stop, self.run_until(connection, &stop), shutdown).await;
        self.shared.health.set_live(false);
        ran
    }

    /// [`Consumer::run`] on one connection until `stop` is cancelled or the connection is lost.
    async fn run_until(
        &self,
        connection: &Connection,
        stop: &CancellationToken,
    ) -> Result<(), AmqpError> {
        let queue = self.shared.queue.as_str();
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("open the consume channel"))?;
        declare_topology(&channel, queue, &self.shared.policy.retry).await?;
        // Dead letters and retries go out on their own channel in confirm mode: the confirm is
        // what makes it safe to ack the original.
        let publisher = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("open the dead-letter channel"))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::broker("enable publisher confirms"))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(AmqpError::broker("set the prefetch (basic.qos)"))?;
        let tag = format!(
            "idem-{}-{}",
            self.shared.handler.consumer(),
            instance_suffix()
        );
        let mut deliveries = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(AmqpError::broker(format!("consume from {queue:?}")))?;
        tracing::info!(
            consumer = self.shared.handler.consumer(),
            queue,
            prefetch = self.prefetch,
            concurrency = self.concurrency,
            "consuming"
        );
        self.shared.health.set_broker(true);
        // Cancelled when the connection or a channel is found dead: every broker wait of a
        // delivery task gives up then (a confirm or ack that can no longer come must not hold a
        // slot), and nothing is acked.
        let lost = CancellationToken::new();
        let exits = Exits {
            stop: stop.clone(),
            lost: lost.clone(),
        };

        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = JoinSet::new();
        let lost_reason = |reason: String| AmqpError::ConsumerLost {
            queue: queue.to_owned(),
            reason,
        };
        // One watch for the whole run (not a new timer per delivery).
        let closed = channel_closed(&channel, &publisher);
        tokio::pin!(closed);
        let ended = loop {
            // Take a slot first, so at most `concurrency` deliveries are being processed.
            let slot = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                () = &mut closed => break Err(lost_reason("a channel closed".into())),
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break Ok(()),
                },
            };
            let next = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                () = &mut closed => break Err(lost_reason("a channel closed".into())),
                next = deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Err(lost_reason(error.to_string())),
                None => break Err(lost_reason("the broker cancelled the consumer".into())),
            };
            let shared = Arc::clone(&self.shared);
            let publisher = publisher.clone();
            let exits = exits.clone();
            in_flight.spawn(async move {
                handle_delivery(&shared, &publisher, delivery, &exits).await;
                drop(slot);
            });
            // Reap finished tasks so the set does not grow with the message count.
            while in_flight.try_join_next().is_some() {}
        };

        let deadline = if ended.is_ok() {
            // A requested stop, not an outage: say "stopped", not "broker connection down".
            self.shared.health.set_live(false);
            self.shared.health.set_broker(false);
            // Stop the broker from pushing more, then let what is in flight finish and ack.
            if let Err(error) = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(%error, "basic.cancel failed; the channel close below stops the consumer");
            }
            self.shutdown_deadline
        } else {
            self.shared.health.set_broker(false);
            lost.cancel();
            // Nothing can be acked any more: let transactions in flight end, briefly.
            LOST_GRACE
        };
        // Should the connection die while in-flight work drains, their broker waits end too.
        let watcher = {
            let (consume, publish, lost) = (channel.clone(), publisher.clone(), lost.clone());
            tokio::spawn(async move {
                channel_closed(&consume, &publish).await;
                lost.cancel();
            })
        };
        let drained = tokio::time::timeout(deadline, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        watcher.abort();
        if drained.is_err() {
            tracing::warn!(
                unfinished = in_flight.len(),
                ?deadline,
                "deliveries still in flight after the deadline are left to redelivery"
            );
            in_flight.abort_all();
            while in_flight.join_next().await.is_some() {}
        }
        // Deliveries prefetched but never started go back to the queue when the channel closes.
        for ch in [&channel, &publisher] {
            if ch.status().connected() {
                let _ = ch.close(200, "idem consumer stopped".into()).await;
            }
        }
        tracing::info!(queue, stats = ?self.stats(), "consumer stopped");
        ended
    }
}

/// How long deliveries in flight get to end after the connection was lost.
const LOST_GRACE: Duration = Duration::from_secs(5);

/// Why a delivery task may have to give up waiting.
#[derive(Clone)]
struct Exits {
    /// The consumer is stopping: stop waiting for the database (in-flight work still acks).
    stop: CancellationToken,
    /// The connection is gone: stop waiting for anything from the broker.
    lost: CancellationToken,
}

impl Exits {
    /// Resolves when the delivery should stop waiting for the database.
    async fn give_up(&self) {
        tokio::select! {
            () = self.stop.cancelled() => {}
            () = self.lost.cancelled() => {}
        }
    }
}

/// Resolves once either channel is no longer open (checked twice a second): a consumer stream
/// does not always end when the broker closes the connection under it.
async fn channel_closed(consume: &Channel, publish: &Channel) {
    loop {
        if !consume.status().connected() || !publish.status().connected() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `work` to its end; when `shutdown` resolves first, cancels `stop` (which `work` watches
/// to wind down gracefully) and still waits for `work`.
async fn stop_on<T>(
    stop: &CancellationToken,
    work: impl Future<Output = T>,
    shutdown: impl Future<Output = ()>,
) -> T {
    tokio::pin!(work, shutdown);
    tokio::select! {
        done = &mut work => done,
        () = &mut shutdown => {
            stop.cancel();
            work.await
        }
    }
}

/// Every queue a consumer of `queue` uses, with its declare arguments: the queue, its
/// dead-letter queue, and one delay queue per retry delay, whose TTL expires messages back into
/// `queue` through the default exchange.
fn topology(queue: &str, retry: &RetryPolicy) -> Vec<(String, FieldTable)> {
    let mut queues = vec![
        (queue.to_owned(), FieldTable::default()),
        (dead_letter_queue(queue), FieldTable::default()),
    ];
    for tier in retry.tiers() {
        let mut arguments = FieldTable::default();
        let ttl = u32::try_from(tier.as_millis()).unwrap_or(u32::MAX);
        arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        queues.push((retry_queue(queue, tier), arguments));
    }
    queues
}

async fn declare_topology(
    channel: &Channel,
    queue: &str,
    retry: &RetryPolicy,
) -> Result<(), AmqpError> {
    for (name, arguments) in topology(queue, retry) {
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .map_err(|source| AmqpError::Topology {
                queue: name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// One delivery, start to finish, inside its tracing span.
async fn handle_delivery<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    publisher: &Channel,
    delivery: AmqpDelivery,
    exits: &Exits,
) {
    let metadata = metadata_of(&delivery);
    let span = delivery_span(shared.handler.consumer(), &metadata);
    async {
        let (_alone, _beside) = if metadata.redelivered {
            (Some(shared.suspects_alone.write().await), None)
        } else {
            (None, Some(shared.suspects_alone.read().await))
        };
        let mut tries_in_place = 0;
        let outcome = loop {
            let unit = Delivery {
                body: &delivery.data,
                metadata: &metadata,
                tries_in_place,
            };
            let outcome = process(&shared.pool, &shared.handler, unit, &shared.policy)
                .await
                .outcome;
            let Outcome::Unavailable { error } = &outcome else {
                if !matches!(outcome, Outcome::DeadLetter { .. }) {
                    shared.health.set_database(true, None);
                }
                break outcome;
            };
            // Not the message's fault and not an attempt: hold it and try again in place.
            shared.health.set_database(false, Some(error));
            let wait = backoff(shared.database_backoff, tries_in_place);
            tracing::warn!(outcome = "unavailable", %error, retry_in = ?wait, "database unavailable; holding the delivery");
            tries_in_place += 1;
            tokio::select! {
                () = exits.give_up() => {
                    redeliver(shared, &delivery, exits).await;
                    return;
                }
                () = tokio::time::sleep(wait) => {}
            }
        };
        // Every wait on the broker from here on ends when the connection is found lost: then
        // nothing is acked and the broker redelivers.
        tokio::select! {
            () = settle(shared, publisher, &delivery, &metadata, outcome, exits) => {}
            () = exits.lost.cancelled() => {
                tracing::warn!("the connection was lost before the broker answered; the message will be redelivered");
            }
        }
    }
    .instrument(span)
    .await;
}

/// Acts on the outcome: ack, or publish the retry or dead letter and then ack.
async fn settle<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    publisher: &Channel,
    delivery: &AmqpDelivery,
    metadata: &Metadata,
    outcome: Outcome,
    exits: &Exits,
) {
    let counters = &shared.counters;
    match outcome {
        Outcome::Applied => {
            if ack(delivery, counters).await {
                counters.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(outcome = "applied", "applied");
            }
        }
        Outcome::Duplicate => {
            if ack(delivery, counters).await {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    outcome = "duplicate",
                    "duplicate: already in the ledger, handler not run"
                );
            }
        }
        Outcome::DeadLetter { reason, error } => {
            let letter = DeadLetter {
                reason,
                error: &error,
                consumer: shared.handler.consumer(),
                queue: &shared.queue,
            };
            let published = dead_letter::publish_dead_letter(
                publisher,
                &delivery.data,
                &delivery.properties,
                metadata,
                letter,
            )
            .await;
            match published {
                Ok(()) => {
                    if ack(delivery, counters).await {
                        counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(outcome = "dead-lettered", %reason, %error, "dead-lettered");
                    }
                }
                Err(publish_error) => {
                    // Not acked, so not lost: it comes back and is dead-lettered then.
                    tracing::error!(%reason, %error, %publish_error, "dead letter not confirmed; handing the message back");
                    redeliver_later(shared, delivery, exits).await;
                }
            }
        }
        Outcome::Retry {
            error,
            attempts,
            delay,
            tier,
        } => {
            let published = dead_letter::publish_retry(
                publisher,
                &shared.queue,
                &delivery.data,
                &delivery.properties,
                metadata,
                &error,
                (delay, tier),
            )
            .await;
            match published {
                Ok(()) => {
                    if ack(delivery, counters).await {
                        counters.retried.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(outcome = "retry", %error, attempts, retry_in = ?delay, "failed; retrying later");
                    }
                }
                Err(publish_error) => {
                    tracing::error!(%error, %publish_error, "retry not confirmed; handing the message back");
                    redeliver_later(shared, delivery, exits).await;
                }
            }
        }
        // Handled by the caller's loop.
        Outcome::Unavailable { .. } => {}
    }
}

/// `initial`, doubled per try, at most [`MAX_BACKOFF`].
fn backoff(initial: Duration, tries: u32) -> Duration {
    initial
        .saturating_mul(1u32 << tries.min(16))
        .min(MAX_BACKOFF)
}

/// Acks, and says whether the broker got it. A lost ack is never ignored: it is counted and
/// logged, and the redelivery it causes is absorbed by the ledger.
async fn ack(delivery: &AmqpDelivery, counters: &Counters) -> bool {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => true,
        Ok(false) => {
            counters.ack_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!("ack not sent: the channel is closed; the broker will redeliver and the ledger will skip it");
            false
        }
        Err(error) => {
            counters.ack_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "ack failed; the broker will redeliver and the ledger will skip it");
            false
        }
    }
}

/// Waits a little (so a broker-side problem does not become a hot loop), then hands the
/// delivery back.
async fn redeliver_later<DB: Backend, H>(
    shared: &Shared<DB, H>,
    delivery: &AmqpDelivery,
    exits: &Exits,
) {
    tokio::select! {
        () = exits.give_up() => {}
        () = tokio::time::sleep(shared.database_backoff) => {}
    }
    redeliver(shared, delivery, exits).await;
}

/// Nacks with requeue: the broker delivers the message again, to this consumer or another.
/// Once the connection is lost there is no one to tell: the broker requeues it by itself.
async fn redeliver<DB: Backend, H>(shared: &Shared<DB, H>, delivery: &AmqpDelivery, exits: &Exits) {
    if exits.lost.is_cancelled() {
        return;
    }
    match delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
    {
        Ok(true) => {
            shared
                .counters
                .redelivered_later
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) | Err(_) => {
            // The channel is gone: the broker requeues every unacked delivery by itself.
            shared.counters.ack_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "nack not sent: the channel is closed; the broker will redeliver the message"
            );
        }
    }
}

fn metadata_of(delivery: &AmqpDelivery) -> Metadata {
    let properties = &delivery.properties;
    let mut metadata = Metadata {
        message_id: properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        causation_id: None,
        redelivered: delivery.redelivered,
        kind: properties
            .kind()
            .as_ref()
            .map(|kind| kind.as_str().to_owned()),
        previous_attempts: 0,
        first_failure: None,
        headers: Default::default(),
    };
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::Boolean(b) => b.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::Timestamp(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::ShortShortInt(n) => n.to_string(),
                AMQPValue::ShortShortUInt(n) => n.to_string(),
                AMQPValue::ShortUInt(n) => n.to_string(),
                _ => continue,
            };
            metadata.headers.insert(name.as_str().to_owned(), text);
        }
        metadata.causation_id = metadata.headers.get(CAUSATION_HEADER).cloned();
        // idem's own retry bookkeeping; a value that does not parse counts as none.
        metadata.previous_attempts = metadata
            .headers
            .get(ATTEMPTS_HEADER)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        metadata.first_failure = metadata
            .headers
            .get(FIRST_FAILURE_HEADER)
            .and_then(|n| n.parse().ok());
    }
    metadata
}

/// Header carrying the id of the message whose handling produced this one.
pub const CAUSATION_HEADER: &str = "x-idem-causation-id";

/// A short random suffix for consumer tags (tags must be unique per channel, and operators
/// should tell two instances apart in `rabbitmqctl list_consumers`).
fn instance_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}
