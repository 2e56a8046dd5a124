//! The outbox relay: publishes committed outbox rows with publisher confirms, and marks a row
//! published (moves it out of the outbox, to `idem_outbox_sent`) only after the broker confirmed
//! it.
//!
//! At-least-once by construction: a relay that dies after the confirm and before the mark
//! publishes the row again on its next run, with the same message id, and the consumer's ledger
//! deduplicates it. Under normal operation nothing is published twice: on PostgreSQL a batch is
//! taken with `FOR UPDATE SKIP LOCKED` and its locks are held until it is settled; the relays of
//! an outbox divide its partitions (the publish lease: session advisory locks) and each takes
//! rows of its own partitions only, so a destination, which always falls in one partition,
//! reaches the broker in order while they all publish (`RelayBuilder::share_outbox` lets any
//! relay take any row, each row once, order between them lost); on SQLite one relay holds a
//! lease (`idem_relay_lease`, renewed every round) and any other stands by until it lapses.
//!
//! Before it publishes, on every connection, it declares the queues, exchanges and bindings it
//! was given ([`RelayBuilder::declare_queue`], `declare_exchange`, `bind_queue`): a service's
//! first run publishes to queues that no consumer has declared yet.
//!
//! A row the broker will not take — returned unroutable, nacked, or refused with a channel
//! close (an exchange that does not exist, one the user may not publish to) — is that row's
//! failure: it backs off, the later rows of its destination wait behind it, every other
//! destination goes on, and after `park_after` attempts it is parked. Only a lost connection,
//! or a broker that does not answer within `confirm_timeout`, makes the relay reconnect.
//!
//! Here: the builder, the stats and the serve loop (reconnect, drain, wait; the purge beside
//! it); [`round`]: the rounds against the outbox (pipelined on PostgreSQL), and the purge; [`batch`]: publishing a round's
//! rows in order per destination; [`link`]: the connection and channel, bounded waits, refusal
//! or lost broker.

mod batch;
mod link;
mod round;

use crate::error::Error;
use crate::topology::{self, Destination, QueueType};
use idem_core::outbox::relay::PublishLease;
use idem_core::{Backend, Backoff};
use lapin::{Connection, ExchangeKind};
use link::Link;
use round::{RoundError, Wakeups};
use sqlx::Pool;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Connections a relay holds from its pool at most, on PostgreSQL: `LISTEN idem_outbox`'s, and
/// one per batch not yet settled (two: see [`Relay`], "Database connections"). Size a pool the
/// relay shares with a consumer `concurrency` + this. Its publish lease's session is opened
/// outside the pool.
pub const RELAY_POOL_CONNECTIONS: u32 = 1 + round::IN_FLIGHT as u32;

/// While the outbox cannot be reached: 0.25 s doubling to 30 s between tries.
const DATABASE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// Counters of what a relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows published and confirmed.
    pub published: u64,
    /// Publish attempts the broker did not take — returned unroutable, nacked, or refused with
    /// a channel close — each recorded in its row (`attempts`, `last_error`); the row is tried
    /// again later, or parked.
    pub failed: u64,
    /// Rows parked: out of attempts (`RelayBuilder::park_after`), no longer published. A
    /// count above zero needs an operator: see [`idem_core::outbox::parked`].
    pub parked: u64,
    /// Published rows deleted after the retention.
    pub purged: u64,
    /// Times the relay reconnected to the broker.
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    failed: AtomicU64,
    parked: AtomicU64,
    purged: AtomicU64,
    reconnects: AtomicU64,
}

/// Builds a [`Relay`]; see [`Relay::builder`].
#[derive(Debug)]
#[must_use = "call .build() to get a Relay"]
pub struct RelayBuilder<DB: Backend> {
    pool: Pool<DB>,
    batch_size: u16,
    poll_interval: Duration,
    retention: Duration,
    park_after: u32,
    confirm_timeout: Duration,
    destinations: Vec<Destination>,
    share_outbox: bool,
    queue_type: QueueType,
}

impl<DB: Backend> RelayBuilder<DB> {
    /// Declares queue `queue` — durable, of [`RelayBuilder::queue_type`], as an idem consumer declares its
    /// queue — on every connection, before the relay publishes: so that a first run, before the
    /// consumer ever started, delivers to it rather than having the broker return every message
    /// unroutable (`NO_ROUTE`) until the row is parked. For each queue the service publishes to
    /// by name (`Tx::publish` sends a message to the queue named after its kind;
    /// `Route::queue(name)`).
    ///
    /// A queue that exists with other arguments (another type, a TTL…) is refused by the
    /// broker: `serve` then fails at start with [`Error::Declare`]; leave such a queue to its
    /// owner and drop this call.
    pub fn declare_queue(mut self, queue: impl Into<String>) -> Self {
        self.destinations
            .push(Destination::Queue(queue.into(), QueueType::Classic));
        self
    }

    /// The type of the queues [`RelayBuilder::declare_queue`] declares (default
    /// [`QueueType::Classic`]): the type their consumers declare them as
    /// (`ConsumerBuilder::queue_type`), or the broker refuses one of the two declarations.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Declares exchange `exchange` of `kind`, durable, on every connection before the relay
    /// publishes: for messages routed through it (`Route::exchange`). An exchange routes only to
    /// the queues bound to it: [`RelayBuilder::bind_queue`] the ones that must get the messages
    /// from the first run on.
    pub fn declare_exchange(mut self, exchange: impl Into<String>, kind: ExchangeKind) -> Self {
        self.destinations.push(Destination::Exchange {
            name: exchange.into(),
            kind,
        });
        self
    }

    /// Binds `queue` to `exchange` with `routing_key` (a pattern, on a topic exchange) on every
    /// connection, after declaring the queues and exchanges: both must exist, declared here or
    /// by their owners.
    pub fn bind_queue(
        mut self,
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.destinations.push(Destination::Binding {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        });
        self
    }

    /// Rows taken and published per round (default 500). On PostgreSQL two batches are in
    /// flight at once (see [`Relay`]), so up to twice this many messages wait for their
    /// confirms: 1,000 by default, the window a plain publisher with confirms would use. A
    /// relay killed mid-flight publishes those again (same message ids). Fewer rows per batch
    /// cost throughput (measured: 100 rows ~0.6× the broker's confirmed-publish rate, 500
    /// ~0.85×).
    pub fn batch_size(mut self, rows: u16) -> Self {
        self.batch_size = rows;
        self
    }

    /// How often to look for rows without a wake-up (default 1 s). On PostgreSQL the relay
    /// wakes on `LISTEN idem_outbox` right after each commit; polling covers a lost
    /// notification. On SQLite polling is all there is: lower it for lower latency.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long the record of a published row is kept before it is deleted (default 7 days):
    /// long enough to answer "was it sent, where, and when", and for `enqueue` of the same
    /// message id to stay a no-op. A published row leaves the outbox at once: its message id,
    /// destination and time go to `idem_outbox_sent`, its body and headers are not kept. The
    /// purge runs beside the rounds every minute (more often when the retention is shorter), in
    /// batches of 5,000 paced to about 5 % of one connection's time, by one relay at a time;
    /// unpublished and parked rows are never purged. Zero keeps nothing: a row is deleted in
    /// the statement that would record it (counted in [`RelayStats::purged`]), which costs the
    /// database less still; `enqueue` of the same message id after that publishes it again.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Failed publish attempts after which a row is parked (default 10: with the backoff of
    /// 1 s doubling to 5 min, about 8½ minutes of failures). A parked row is never published
    /// again unless [`idem_core::outbox::unpark`]ed, is not purged, is counted in
    /// [`RelayStats::parked`] and [`idem_core::outbox::parked`], and is logged once at WARN
    /// with its message id, destination, attempts and last error. Parking gives up on that
    /// row's place in its destination's order: the later rows it held back go out. Every
    /// failure counts: returned unroutable, nacked, refused with a channel close.
    pub fn park_after(mut self, attempts: u32) -> Self {
        self.park_after = attempts;
        self
    }

    /// How long one round may wait on the broker in all — its publishes to be written, their
    /// confirms, a channel reopened after a refusal — before the relay gives the connection up
    /// as lost and reconnects (default 10 s; a healthy broker answers a batch in
    /// milliseconds). The rows without a confirm stay due and are published again, never
    /// marked published; on PostgreSQL this also bounds how long a batch's transaction (and
    /// its row locks) waits on the broker. Opening and closing a connection's channel are
    /// bounded by it too.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// PostgreSQL: lets every relay of this outbox take any row (default `false`: each takes
    /// rows of its share of the outbox's partitions only).
    ///
    /// By default the relays of one outbox share a publish lease: the outbox has
    /// [`PARTITIONS`](idem_core::outbox::PARTITIONS) partitions, a destination (exchange and
    /// routing key) always falls in the same one, and each relay holds its fair share of them
    /// (session advisory locks on a connection of its own). They all publish, each destination
    /// by one relay at a time, so every destination's rows reach the broker in id order. A
    /// relay joining gets its share as the others give partitions back — each once no batch of
    /// it is unsettled —, and the partitions of a relay killed, stopped or cut off from the
    /// database are taken by the others within half a second. Shared, `FOR UPDATE SKIP LOCKED`
    /// still hands each row to one relay, but relay B can publish a destination's later rows
    /// while relay A's earlier ones wait for their confirms: order between them is lost. Share
    /// only an outbox whose consumers do not depend on order and whose rows go to a few
    /// destinations (one destination is one relay's work by default).
    ///
    /// SQLite cannot share (no row locks): `build` refuses it there.
    pub fn share_outbox(mut self, share: bool) -> Self {
        self.share_outbox = share;
        self
    }

    /// Checks the settings.
    pub fn build(mut self) -> Result<Relay<DB>, Error> {
        if self.batch_size == 0 {
            return Err(Error::Config(
                "the relay's batch_size must be at least 1 (default 100)".into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config(
                "the relay's poll_interval must be above zero (default 1 s)".into(),
            ));
        }
        if self.park_after == 0 {
            return Err(Error::Config(
                "the relay's park_after must be at least 1 attempt (default 10)".into(),
            ));
        }
        if self.confirm_timeout.is_zero() {
            return Err(Error::Config(
                "the relay's confirm_timeout must be above zero (default 10 s)".into(),
            ));
        }
        for destination in &mut self.destinations {
            destination.check().map_err(Error::Config)?;
            if let Destination::Queue(_, queue_type) = destination {
                *queue_type = self.queue_type;
            }
        }
        if self.share_outbox && !DB::OUTBOX_ROW_LOCKS {
            return Err(Error::Config(format!(
                "share_outbox(true) needs PostgreSQL: {} has no row locks for relays to share \
                 an outbox with; drop the call (one relay publishes, the others stand by)",
                DB::NAME
            )));
        }
        Ok(Relay {
            pool: self.pool,
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            retention: self.retention,
            park_after: self.park_after,
            confirm_timeout: self.confirm_timeout,
            destinations: self.destinations,
            counters: Counters::default(),
            holder: format!("{}-{}", std::process::id(), rand::random::<u64>()),
            standing_by: AtomicBool::new(false),
            share_outbox: self.share_outbox,
            publish_lease: std::sync::Mutex::new(None),
        })
    }
}

/// Publishes the outbox: due rows in id order, with publisher confirms, each marked published
/// only after the broker confirmed it. At-least-once — a relay killed between the confirm and
/// the mark publishes the row again, with the same message id, and the next consumer's ledger
/// absorbs it. Several relays on one PostgreSQL outbox divide its partitions and publish at
/// once, each destination by one relay at a time and in order, and take over the partitions of
/// a relay whose session ends within half a second ([`RelayBuilder::share_outbox`] lets any
/// relay take any row: each row once, a destination's order between relays lost); on SQLite
/// one relay publishes and the others stand by (a lease row that lapses after 10 s).
///
/// On PostgreSQL the rounds are pipelined: while one batch's confirms come in and its rows are
/// marked (one statement moves all the confirmed ones out of the outbox), the next batch is taken and published
/// behind it on the same channel, so the broker and the database work at the same time. Two
/// batches at most are unconfirmed; per destination the broker still gets the rows in id order.
///
/// On every connection, before it publishes, it declares the destinations it was given
/// ([`RelayBuilder::declare_queue`], [`RelayBuilder::declare_exchange`],
/// [`RelayBuilder::bind_queue`]): a service's first run delivers to queues that no consumer
/// has declared yet.
///
/// A row the broker will not take (unroutable, nacked, or refused with a channel close: an
/// exchange that does not exist, one the user may not publish to) records the attempt and
/// the broker's reason in its row and backs off (1 s doubling to 5 min); the later rows of its
/// destination (exchange and routing key) wait behind it, other destinations go on, and after
/// [`RelayBuilder::park_after`] attempts it is parked. A lost connection, or a broker that
/// does not answer within [`RelayBuilder::confirm_timeout`], makes it reconnect.
///
/// # Database connections
///
/// The relay draws on the pool it is given. On PostgreSQL it holds up to
/// [`RELAY_POOL_CONNECTIONS`] (3) of its connections while it serves: one for
/// `LISTEN idem_outbox` (kept for as long as `serve` runs), and one for each batch's
/// transaction, which holds the batch's row locks while the batch is taken, published,
/// confirmed (at most `confirm_timeout`) and marked; with two batches unsettled at once, two
/// such transactions; the purge beside the rounds borrows one for a short batch now and then.
/// Give a pool that a consumer shares with the relay its `concurrency` + 3 connections, or
/// give the relay a pool of its own with 3. Unless the outbox is shared, the relay also
/// opens one connection of its own with the pool's settings, outside the pool, for the
/// publish lease (a session lock must not go back to a pool). With a smaller pool a take waits
/// for a connection (with 2, the rounds take turns); with 1 the relay does not LISTEN and only
/// polls. On SQLite it uses one connection at a time.
#[derive(Debug)]
pub struct Relay<DB: Backend> {
    pool: Pool<DB>,
    batch_size: u16,
    poll_interval: Duration,
    retention: Duration,
    /// Failed attempts after which a row is parked.
    park_after: u32,
    /// The bound of every wait on the broker.
    confirm_timeout: Duration,
    /// Declared on every connection before publishing.
    destinations: Vec<Destination>,
    counters: Counters,
    /// This relay's name in the SQLite lease.
    holder: String,
    /// Whether another relay holds the lease (logged on change).
    standing_by: AtomicBool,
    /// [`RelayBuilder::share_outbox`].
    share_outbox: bool,
    /// PostgreSQL, unless shared: the publish lease's keeper, while `serve` runs.
    publish_lease: std::sync::Mutex<Option<PublishLease>>,
}

/// Drops the publish lease in its slot when `serve` ends, however it ends.
struct HandOver<'a>(&'a std::sync::Mutex<Option<PublishLease>>);

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// What the serve loop carries from one connection to the next.
#[derive(Default)]
struct Pace {
    /// When the outbox gauges were last sampled.
    last_sample: Option<Instant>,
    /// Database failures in a row, for [`DATABASE_BACKOFF`].
    database_failures: u32,
}

impl<DB: Backend> Relay<DB> {
    /// Starts building a relay of the outbox in `pool`'s database.
    pub fn builder(pool: Pool<DB>) -> RelayBuilder<DB> {
        RelayBuilder {
            pool,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            park_after: 10,
            confirm_timeout: Duration::from_secs(10),
            destinations: Vec::new(),
            share_outbox: false,
            queue_type: QueueType::Classic,
        }
    }

    /// What the relay has done so far.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            published: c.published.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            purged: c.purged.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Publishes until `shutdown` resolves, reconnecting to the broker by itself; on every
    /// connection it first declares the destinations it was given
    /// ([`RelayBuilder::declare_queue`]).
    ///
    /// Fails fast only at start: a broker that cannot be reached, or a destination it refuses
    /// to declare ([`Error::Declare`]: say, a queue declared elsewhere with other arguments).
    pub async fn serve(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        // Returned or dropped (a task aborted), `serve` hands the publish lease over: its
        // session closes and the other relays take its partitions.
        let _hand_over = HandOver(&self.publish_lease);
        let serving = self.serve_until(amqp_url, shutdown);
        let keeper = self.keep_outbox();
        tokio::pin!(serving, keeper);
        tokio::select! {
            biased;
            done = &mut serving => done,
            // The keeper never ends; if it did, the relay goes on alone.
            () = &mut keeper => serving.await,
        }
    }

    /// PostgreSQL, unless the outbox is shared: how many of the outbox's
    /// [`PARTITIONS`](idem_core::outbox::PARTITIONS) this relay publishes now (0: it
    /// stands by). `None` on SQLite, with [`RelayBuilder::share_outbox`], while it does not
    /// serve, and while it reconnects to the broker (it gives its partitions back meanwhile).
    pub fn partitions(&self) -> Option<u32> {
        self.publish_lease().as_ref().map(PublishLease::partitions)
    }

    /// The publish lease's slot (a poisoned lock only means a panic elsewhere held it).
    fn publish_lease(&self) -> std::sync::MutexGuard<'_, Option<PublishLease>> {
        self.publish_lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Relay::serve`] without the purge beside it.
    async fn serve_until(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let mut connection = crate::connect(amqp_url).await?;
        let mut wakeups = self.wakeups().await;
        tokio::pin!(shutdown);
        let mut pace = Pace::default();
        let mut first = true;
        loop {
            let timeout = self.confirm_timeout;
            let declared =
                topology::declare_destinations(&connection, &self.destinations, timeout).await;
            let lost = match declared {
                Err(error) if first && connection.status().connected() => {
                    // Refused on a healthy connection before it published anything: a
                    // configuration problem, which reconnecting would only repeat.
                    link::close_connection(&connection, timeout, "relay stopped").await;
                    return Err(error);
                }
                Err(error) => {
                    link::close_connection(&connection, timeout, "relay reconnecting").await;
                    format!("cannot declare its destinations: {error}")
                }
                Ok(()) => match Link::open(connection, timeout).await {
                    Ok(mut link) => {
                        self.join_outbox();
                        let lost = self
                            .relay_on(&mut link, &mut wakeups, &mut shutdown, &mut pace)
                            .await;
                        let Some(error) = lost else {
                            self.stop(link).await;
                            return Ok(());
                        };
                        self.leave_outbox().await;
                        link.close("relay reconnecting").await;
                        error
                    }
                    Err(error) => format!("cannot open its channel: {error}"),
                },
            };
            first = false;
            tracing::warn!(error = %lost, "relay lost the broker; reconnecting");
            connection = match self.reconnect(amqp_url, &mut shutdown).await {
                Some(connection) => connection,
                None => return Ok(()),
            };
        }
    }

    /// On one link: drains what is due, samples the gauges now and then, and waits for a
    /// wake-up or the poll interval; again and again until `shutdown` resolves (`None`) or the
    /// broker is lost (`Some`, why).
    async fn relay_on<S: Future<Output = ()>>(
        &self,
        link: &mut Link,
        wakeups: &mut Wakeups,
        shutdown: &mut Pin<&mut S>,
        pace: &mut Pace,
    ) -> Option<String> {
        tracing::info!(
            backend = DB::NAME,
            listening = wakeups.is_some(),
            "outbox relay publishing"
        );
        let mut lease = self.publish_lease().as_ref().map(PublishLease::watch);
        if let Some(lease) = lease.as_mut() {
            // Not yet answered for (its keeper just connected): a moment for it, so that a
            // relay alone does not start by announcing that it stands by.
            lease.borrow_and_update();
            if self.partitions() == Some(0) {
                let _ = tokio::time::timeout(Duration::from_secs(1), lease.changed()).await;
            }
        }
        loop {
            match self.drain(link).await {
                Ok(()) => pace.database_failures = 0,
                Err(RoundError::Broker(error)) => return Some(error),
                Err(RoundError::Database(error)) => {
                    let retry_in = DATABASE_BACKOFF.delay(pace.database_failures);
                    if idem_core::outbox::relay::locked_by_another(&error) {
                        tracing::warn!(
                            %error,
                            ?retry_in,
                            "a row of this relay's outbox partitions is locked by another \
                             session (a relay going away, or an open transaction): waiting \
                             for it, to keep its destination in order"
                        );
                    } else {
                        tracing::warn!(%error, ?retry_in, "relay cannot reach the outbox");
                    }
                    tokio::select! {
                        () = shutdown.as_mut() => return None,
                        () = tokio::time::sleep(retry_in) => {}
                    }
                    pace.database_failures = pace.database_failures.saturating_add(1);
                    continue;
                }
            }
            self.sample_if_due(&mut pace.last_sample).await;
            let lease_changed = async {
                let changed = match lease.as_mut() {
                    Some(lease) => lease.changed().await.is_ok(),
                    None => false,
                };
                // No lease (shared outbox, SQLite), or its keeper is gone: never.
                if !changed {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = shutdown.as_mut() => return None,
                () = round::wakeup(wakeups) => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                () = lease_changed => {}
            }
        }
    }

    /// With a broker to publish to: holds a share of the outbox's partitions (PostgreSQL,
    /// unless shared).
    fn join_outbox(&self) {
        if !self.share_outbox {
            let mut lease = self.publish_lease();
            if lease.is_none() {
                *lease = DB::outbox_publish_lease(&self.pool);
            }
        }
    }

    /// The broker lost: gives the outbox back while reconnecting — the partitions (PostgreSQL)
    /// or the lease (SQLite) — so that relays that can publish take them within half a second
    /// rather than its destinations waiting for this one's broker. Joins again once connected.
    async fn leave_outbox(&self) {
        let held = self.publish_lease().take().map(|lease| lease.partitions());
        if let Some(partitions) = held.filter(|&n| n > 0) {
            tracing::info!(
                partitions,
                "relay gives its outbox partitions back while it reconnects"
            );
        }
        if held.is_some() {
            crate::telemetry::relay_partitions(0);
        }
        crate::telemetry::relay_publishing(false);
        self.release_lease().await;
    }

    /// [`crate::connect::reconnect`], counted.
    async fn reconnect<S: Future<Output = ()>>(
        &self,
        amqp_url: &str,
        shutdown: &mut Pin<&mut S>,
    ) -> Option<Connection> {
        let connection = crate::connect::reconnect(amqp_url, shutdown.as_mut()).await?;
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        Some(connection)
    }

    /// A requested stop: hands the SQLite lease over, closes the channel and the connection.
    async fn stop(&self, link: Link) {
        self.release_lease().await;
        self.publish_lease().take();
        link.close("relay stopped").await;
        tracing::info!(stats = ?self.stats(), "outbox relay stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::DATABASE_BACKOFF;
    use std::time::Duration;

    #[test]
    fn an_unreachable_outbox_is_retried_from_a_quarter_second_to_thirty() {
        assert_eq!(DATABASE_BACKOFF.delay(0), Duration::from_millis(250));
        assert_eq!(DATABASE_BACKOFF.delay(6), Duration::from_secs(16));
        assert_eq!(DATABASE_BACKOFF.delay(7), Duration::from_secs(30));
        assert_eq!(DATABASE_BACKOFF.next_delay(2), Duration::from_secs(1));
    }
}
