//! The consume loop: deliveries in, the unit of work, then ack / dead-letter / deliver again.

use crate::dead_letter::{self, dead_letter_queue, DeadLetter};
use crate::error::AmqpError;
use futures_util::StreamExt;
use idem_core::{delivery_span, process, Backend, Delivery, Handler, Metadata, Outcome};
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
use tracing::Instrument;

/// Longest queue name RabbitMQ accepts, less the `.dlq` suffix of its dead-letter queue.
const MAX_QUEUE_LEN: usize = 255 - ".dlq".len();

/// Counters of what a consumer did; read them with [`Consumer::stats`].
#[derive(Debug, Default)]
struct Counters {
    applied: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    redelivered_later: AtomicU64,
    ack_failures: AtomicU64,
}

/// A snapshot of a consumer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries whose effect was committed and acknowledged.
    pub applied: u64,
    /// Deliveries whose key was already in the ledger: acknowledged, handler not run.
    pub duplicates: u64,
    /// Deliveries published to the dead-letter queue (confirmed), then acknowledged.
    pub dead_lettered: u64,
    /// Deliveries handed back to the broker to try again (database unreachable, commit unknown).
    pub redelivered_later: u64,
    /// Acks (or nacks) the broker did not get: the message will come again and be deduplicated.
    pub ack_failures: u64,
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
    retry_delay: Duration,
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

    /// How long to hold a delivery before handing it back when the database is unreachable
    /// (default 1 s), so an outage does not become a hot redelivery loop.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
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
        if queue.is_empty() || queue.len() > MAX_QUEUE_LEN {
            return Err(AmqpError::Config(format!(
                "the queue name {queue:?} must be 1 to {MAX_QUEUE_LEN} bytes (RabbitMQ's 255 less `.dlq`)"
            )));
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
                retry_delay: self.retry_delay,
                counters: Counters::default(),
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
    retry_delay: Duration,
    counters: Counters,
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
            retry_delay: Duration::from_secs(1),
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
            redelivered_later: c.redelivered_later.load(Ordering::Relaxed),
            ack_failures: c.ack_failures.load(Ordering::Relaxed),
        }
    }

    /// Declares the queue and its dead-letter queue (durable), on a channel of `connection`.
    pub async fn declare(&self, connection: &Connection) -> Result<(), AmqpError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("open a channel"))?;
        declare_topology(&channel, &self.shared.queue).await?;
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
        let queue = self.shared.queue.as_str();
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("open the consume channel"))?;
        declare_topology(&channel, queue).await?;
        // Dead letters go out on their own channel in confirm mode: the confirm is what makes it
        // safe to ack the original.
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

        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = JoinSet::new();
        tokio::pin!(shutdown);
        let ended = loop {
            // Take a slot first, so at most `concurrency` deliveries are being processed.
            let slot = tokio::select! {
                () = &mut shutdown => break Ok(()),
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break Ok(()),
                },
            };
            let next = tokio::select! {
                () = &mut shutdown => break Ok(()),
                next = deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    break Err(AmqpError::ConsumerLost {
                        queue: queue.to_owned(),
                        reason: error.to_string(),
                    })
                }
                None => {
                    break Err(AmqpError::ConsumerLost {
                        queue: queue.to_owned(),
                        reason: "the broker cancelled the consumer".into(),
                    })
                }
            };
            let shared = Arc::clone(&self.shared);
            let publisher = publisher.clone();
            in_flight.spawn(async move {
                handle_delivery(&shared, &publisher, delivery).await;
                drop(slot);
            });
            // Reap finished tasks so the set does not grow with the message count.
            while in_flight.try_join_next().is_some() {}
        };

        // Stop the broker from pushing more, then let what is in flight finish and ack.
        if channel.status().connected() {
            if let Err(error) = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(%error, "basic.cancel failed; the channel close below stops the consumer");
            }
        }
        let drained = tokio::time::timeout(self.shutdown_deadline, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                unfinished = in_flight.len(),
                deadline = ?self.shutdown_deadline,
                "shutdown deadline passed; unfinished deliveries are left to redelivery"
            );
            in_flight.abort_all();
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

async fn declare_topology(channel: &Channel, queue: &str) -> Result<(), AmqpError> {
    let dlq = dead_letter_queue(queue);
    for name in [queue, dlq.as_str()] {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(AmqpError::broker(format!(
                "declare queue {name:?} (durable, no arguments)"
            )))?;
    }
    Ok(())
}

/// One delivery, start to finish, inside its tracing span.
async fn handle_delivery<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    publisher: &Channel,
    delivery: AmqpDelivery,
) {
    let metadata = metadata_of(&delivery);
    let span = delivery_span(shared.handler.consumer(), &metadata);
    async {
        let processed = process(&shared.pool, &shared.handler, Delivery { body: &delivery.data, metadata: &metadata }).await;
        let counters = &shared.counters;
        match processed.outcome {
            Outcome::Applied => {
                if ack(&delivery, counters).await {
                    counters.applied.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(outcome = "applied", "applied");
                }
            }
            Outcome::Duplicate => {
                if ack(&delivery, counters).await {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(outcome = "duplicate", "duplicate: already in the ledger, handler not run");
                }
            }
            Outcome::DeadLetter { reason, error } => {
                let letter = DeadLetter { reason, error: &error, consumer: shared.handler.consumer(), queue: &shared.queue };
                match dead_letter::publish(publisher, &delivery.data, &delivery.properties, letter).await {
                    Ok(()) => {
                        if ack(&delivery, counters).await {
                            counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(outcome = "dead-lettered", %reason, %error, "dead-lettered");
                        }
                    }
                    Err(publish_error) => {
                        // Not acked, so not lost: it comes back and is dead-lettered then.
                        tracing::error!(%reason, %error, %publish_error, "dead letter not confirmed; handing the message back");
                        redeliver_later(shared, &delivery).await;
                    }
                }
            }
            Outcome::Retry { error } => {
                tracing::warn!(outcome = "retry", %error, delay = ?shared.retry_delay, "not applied; handing the message back to try again");
                redeliver_later(shared, &delivery).await;
            }
        }
    }
    .instrument(span)
    .await;
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

/// Waits `retry_delay`, then nacks with requeue so the broker delivers the message again.
async fn redeliver_later<DB: Backend, H>(shared: &Shared<DB, H>, delivery: &AmqpDelivery) {
    tokio::time::sleep(shared.retry_delay).await;
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
            tracing::error!(
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
                _ => continue,
            };
            metadata.headers.insert(name.as_str().to_owned(), text);
        }
        metadata.causation_id = metadata.headers.get(CAUSATION_HEADER).cloned();
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
