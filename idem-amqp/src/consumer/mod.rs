//! The consumer: deliveries in, the unit of work, then ack / retry / dead-letter / deliver again.
//!
//! - [`builder`]: the settings and their checks;
//! - [`serve`]: the connection loop (reconnect; on one connection, consume and dispatch; drain
//!   on stop or loss);
//! - [`delivery`]: one delivery, from the unit of work to its ack or nack;
//! - [`acks`]: the ack window, which sends a channel's acks (several per frame where it safely
//!   can);
//! - [`metadata`]: AMQP properties as [`idem_core::Metadata`];
//! - [`stats`]: the counters.

mod acks;
mod builder;
mod delivery;
mod metadata;
mod serve;
mod stats;
mod unreadable;

pub use builder::ConsumerBuilder;
pub use stats::ConsumerStats;

use crate::error::Error;
use crate::health::{Health, HealthState};
use idem_core::{Backend, Backoff, Handler, Policy};
use lapin::Connection;
use sqlx::Pool;
use stats::Counters;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What every delivery task needs.
struct Shared<DB: Backend, H> {
    pool: Pool<DB>,
    handler: H,
    /// The order a group's handlers run in (group commit), over the handler's message type
    /// (erased here so that the structs need no `Handler` bound).
    lock_order: Option<ErasedLockOrder>,
    queue: String,
    /// The type of its queue, dead-letter queue and delay queues.
    queue_type: crate::QueueType,
    policy: Policy,
    /// While the database is away: a delivery's waits between tries in place.
    database_backoff: Backoff,
    /// Shared with the ack window, which counts deliveries as the broker takes their acks.
    counters: Arc<Counters>,
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
    ledger_purge_interval: Duration,
    dlq_alert_threshold: u32,
    dlq_poll_interval: Duration,
    group: Option<Group>,
}

/// A group lock order ([`ConsumerBuilder::group_lock_order`]) of the handler's message type,
/// behind `Any`.
struct ErasedLockOrder(Box<idem_core::LockOrder<'static, dyn std::any::Any>>);

impl std::fmt::Debug for ErasedLockOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ErasedLockOrder(..)")
    }
}

/// Group commit's settings ([`ConsumerBuilder::group_commit`]).
#[derive(Debug, Clone, Copy)]
struct Group {
    max_messages: usize,
    max_wait: Duration,
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
        ConsumerBuilder::new(pool, handler)
    }

    /// The queue this consumer reads.
    pub fn queue(&self) -> &str {
        &self.shared.queue
    }

    /// What the consumer has done so far.
    pub fn stats(&self) -> ConsumerStats {
        self.shared.counters.snapshot()
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
    ) -> Result<(), Error> {
        let stop = CancellationToken::new();
        self.shared.health.set_live(true);
        let serving = self.keeping_the_ledger(self.serve_until(amqp_url, &stop));
        let served = serve::stop_on(&stop, serving, shutdown).await;
        self.shared.health.set_live(false);
        served
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
    ) -> Result<(), Error> {
        let stop = CancellationToken::new();
        self.shared.health.set_live(true);
        let running = self.keeping_the_ledger(self.run_until(connection, &stop));
        let ran = serve::stop_on(&stop, running, shutdown).await;
        self.shared.health.set_live(false);
        ran
    }

    /// `work`, with the purge of the ledger and of stale crash-loop counts running beside it
    /// until `work` ends.
    async fn keeping_the_ledger<T>(&self, work: impl Future<Output = T>) -> T {
        let shared = &self.shared;
        let keeper = idem_core::ledger::keep_ledger(
            &shared.pool,
            shared.handler.consumer(),
            &shared.policy,
            self.ledger_purge_interval,
            |purged| shared.counters.purged(purged),
        );
        tokio::pin!(work, keeper);
        tokio::select! {
            biased;
            done = &mut work => done,
            // The keeper never ends; if it did, the work goes on alone.
            () = &mut keeper => work.await,
        }
    }

    /// Declares the queue, its dead-letter queue and its delay queues (all durable), on a
    /// channel of `connection`.
    pub async fn declare(&self, connection: &Connection) -> Result<(), Error> {
        let channel = connection
            .create_channel()
            .await
            .map_err(Error::broker("open a channel"))?;
        crate::topology::declare(
            &channel,
            &self.shared.queue,
            &self.shared.policy.retry,
            self.shared.queue_type,
        )
        .await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }
}
