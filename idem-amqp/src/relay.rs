//! The outbox relay: publishes committed outbox rows with publisher confirms, and marks a row
//! published only after the broker confirmed it.
//!
//! At-least-once by construction: a relay that dies after the confirm and before the mark
//! publishes the row again on its next run, with the same message id, and the consumer's ledger
//! deduplicates it. Under normal operation nothing is published twice: on PostgreSQL a batch is
//! taken with `FOR UPDATE SKIP LOCKED` and its locks are held until it is settled, so several
//! relays can share one outbox; on SQLite one relay holds a lease (`idem_relay_lease`, renewed
//! every round) and any other stands by until it lapses.

use crate::consumer::CAUSATION_HEADER;
use crate::error::AmqpError;
use idem_core::outbox::relay::{OutboxBatch, OutboxRow, Settled};
use idem_core::Backend;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use sqlx::Pool;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest backoff between two publish attempts of one row.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Counters of what a relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows published and confirmed.
    pub published: u64,
    /// Publish attempts the broker did not confirm (the row is tried again later).
    pub failed: u64,
    /// Published rows deleted after the retention.
    pub purged: u64,
    /// Times the relay reconnected to the broker.
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    failed: AtomicU64,
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
}

impl<DB: Backend> RelayBuilder<DB> {
    /// Rows taken and published per round trip (default 100).
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

    /// How long published rows are kept before they are deleted (default 7 days): long enough
    /// to answer "was it sent, and when".
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<Relay<DB>, AmqpError> {
        if self.batch_size == 0 {
            return Err(AmqpError::Config(
                "the relay's batch_size must be at least 1 (default 100)".into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(AmqpError::Config(
                "the relay's poll_interval must be above zero (default 1 s)".into(),
            ));
        }
        Ok(Relay {
            pool: self.pool,
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            retention: self.retention,
            counters: Counters::default(),
            holder: format!("{}-{}", std::process::id(), rand::random::<u64>()),
            standing_by: AtomicBool::new(false),
        })
    }
}

/// Publishes the outbox; see the [module docs](self).
#[derive(Debug)]
pub struct Relay<DB: Backend> {
    pool: Pool<DB>,
    batch_size: u16,
    poll_interval: Duration,
    retention: Duration,
    counters: Counters,
    /// This relay's name in the SQLite lease.
    holder: String,
    /// Whether another relay holds the lease (logged on change).
    standing_by: AtomicBool,
}

/// Why a round of publishing stopped.
enum RoundError {
    /// The broker connection or channel broke: reconnect.
    Broker(String),
    /// The database failed: wait and try again.
    Database(sqlx::Error),
}

impl<DB: Backend> Relay<DB> {
    /// Starts building a relay of the outbox in `pool`'s database.
    pub fn builder(pool: Pool<DB>) -> RelayBuilder<DB> {
        RelayBuilder {
            pool,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// What the relay has done so far.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            published: c.published.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            purged: c.purged.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Publishes until `shutdown` resolves, reconnecting to the broker by itself. Fails fast
    /// only at start, when the broker cannot be reached.
    pub async fn run(
        &self,
        amqp_url: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AmqpError> {
        let mut connection = crate::connect(amqp_url).await?;
        let mut wakeups = DB::outbox_wakeups(&self.pool).await;
        tokio::pin!(shutdown);
        let mut last_purge: Option<Instant> = None;
        let mut db_backoff = Duration::from_millis(250);
        // Kept out here so the stop can close it before the connection (lapin logs an error
        // for a channel still open when its connection closes).
        let mut open_channel: Option<Channel> = None;
        'connected: loop {
            let channel = match confirm_channel(&connection).await {
                Ok(channel) => open_channel.insert(channel).clone(),
                Err(error) => {
                    tracing::warn!(%error, "relay cannot open its channel; reconnecting");
                    connection = match self.reconnect(amqp_url, &mut shutdown).await {
                        Some(connection) => connection,
                        None => return Ok(()),
                    };
                    continue 'connected;
                }
            };
            tracing::info!(
                backend = DB::NAME,
                listening = wakeups.is_some(),
                "outbox relay publishing"
            );
            loop {
                // Drain what is due, a batch at a time.
                let drained = loop {
                    match self.round(&channel).await {
                        Ok(taken) if taken < usize::from(self.batch_size) => break Ok(()),
                        Ok(_) => continue,
                        Err(error) => break Err(error),
                    }
                };
                match drained {
                    Ok(()) => db_backoff = Duration::from_millis(250),
                    Err(RoundError::Broker(error)) => {
                        tracing::warn!(%error, "relay lost the broker; reconnecting");
                        let _ = connection.close(200, "relay reconnecting".into()).await;
                        connection = match self.reconnect(amqp_url, &mut shutdown).await {
                            Some(connection) => connection,
                            None => return Ok(()),
                        };
                        continue 'connected;
                    }
                    Err(RoundError::Database(error)) => {
                        tracing::warn!(%error, retry_in = ?db_backoff, "relay cannot reach the outbox");
                        tokio::select! {
                            () = &mut shutdown => break 'connected,
                            () = tokio::time::sleep(db_backoff) => {}
                        }
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
                // Every minute, or more often when the retention is shorter.
                let purge_every = self
                    .retention
                    .clamp(Duration::from_secs(1), Duration::from_secs(60));
                if last_purge.is_none_or(|at| at.elapsed() >= purge_every) {
                    last_purge = Some(Instant::now());
                    match DB::outbox_purge(&self.pool, self.retention).await {
                        Ok(purged) => {
                            self.counters.purged.fetch_add(purged, Ordering::Relaxed);
                        }
                        Err(error) => tracing::warn!(%error, "relay cannot purge published rows"),
                    }
                }
                let wakeup = async {
                    match wakeups.as_mut() {
                        Some(wakeups) => {
                            if wakeups.recv().await.is_none() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    () = &mut shutdown => break 'connected,
                    () = wakeup => {}
                    () = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
        // Hand the SQLite lease over at once rather than when it lapses (a no-op elsewhere,
        // and for a relay that did not hold it).
        let _ = DB::outbox_lease(&self.pool, &self.holder, Duration::ZERO).await;
        if let Some(channel) = open_channel.filter(|c| c.status().connected()) {
            let _ = channel.close(200, "relay stopped".into()).await;
        }
        let _ = connection.close(200, "relay stopped".into()).await;
        tracing::info!(stats = ?self.stats(), "outbox relay stopped");
        Ok(())
    }

    /// [`crate::connect::reconnect`], counted.
    async fn reconnect(
        &self,
        amqp_url: &str,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Connection> {
        let connection = crate::connect::reconnect(amqp_url, shutdown.as_mut()).await?;
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        Some(connection)
    }

    /// Takes one batch, publishes it in order on `channel`, waits for every confirm, and
    /// settles it. Returns how many rows it took.
    async fn round(&self, channel: &Channel) -> Result<usize, RoundError> {
        // SQLite: one relay at a time; the others stand by until its lease lapses (a relay
        // killed mid-round is replaced within the lease time).
        let ttl = (self.poll_interval * 3).max(Duration::from_secs(10));
        let leased = DB::outbox_lease(&self.pool, &self.holder, ttl)
            .await
            .map_err(RoundError::Database)?;
        if self.standing_by.swap(!leased, Ordering::Relaxed) == leased {
            if leased {
                tracing::info!("relay took over the outbox lease");
            } else {
                tracing::warn!("another relay is publishing this SQLite outbox; standing by");
            }
        }
        if !leased {
            return Ok(0);
        }
        let batch: OutboxBatch<DB> = DB::outbox_take(&self.pool, i64::from(self.batch_size))
            .await
            .map_err(RoundError::Database)?;
        let taken = batch.rows.len();
        if taken == 0 {
            DB::outbox_settle(batch, &[])
                .await
                .map_err(RoundError::Database)?;
            return Ok(0);
        }
        // Publish all, then await the confirms: one round trip for the batch, and the broker
        // keeps the order of one channel's messages to a queue.
        let mut pending = Vec::with_capacity(taken);
        let mut broken = None;
        for row in &batch.rows {
            if broken.is_some() {
                break;
            }
            match publish(channel, row).await {
                Ok(confirm) => pending.push((row, confirm)),
                Err(error) => broken = Some(error.to_string()),
            }
        }
        let mut settled = Vec::with_capacity(taken);
        for (row, confirm) in pending {
            let outcome = match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
                    Err(format!(
                        "unroutable ({}): nothing is bound to exchange {:?} with routing key {:?}; declare the queue (its consumer does on start)",
                        returned.reply_text, row.message.route.exchange, row.message.route.routing_key
                    ))
                }
                Ok(Confirmation::Nack(None)) => Err(
                    "the broker refused it (nack); check its disk and memory alarms".to_owned(),
                ),
                Ok(Confirmation::NotRequested) => {
                    Err("the relay channel is not in confirm mode; a bug in idem".to_owned())
                }
                Err(error) => {
                    // Unknown: the broker may have it. Leave the row due; a second publish is
                    // deduplicated downstream.
                    broken = Some(error.to_string());
                    continue;
                }
            };
            match outcome {
                Ok(()) => settled.push(Settled::Published(row.id)),
                Err(error) => {
                    let retry_in = backoff(row.attempts);
                    tracing::warn!(message_id = %row.message.message_id, %error, ?retry_in, "outbox message not published; retrying later");
                    settled.push(Settled::Failed {
                        id: row.id,
                        error,
                        retry_in,
                    });
                }
            }
        }
        let published = settled
            .iter()
            .filter(|s| matches!(s, Settled::Published(_)))
            .count() as u64;
        let failed = settled.len() as u64 - published;
        DB::outbox_settle(batch, &settled)
            .await
            .map_err(RoundError::Database)?;
        self.counters
            .published
            .fetch_add(published, Ordering::Relaxed);
        self.counters.failed.fetch_add(failed, Ordering::Relaxed);
        if published > 0 {
            tracing::debug!(published, failed, "outbox batch published");
        }
        match broken {
            Some(error) => Err(RoundError::Broker(error)),
            None => Ok(taken),
        }
    }
}

/// `1 s * 2^attempts`, at most 5 min.
fn backoff(attempts: i32) -> Duration {
    let doublings = u32::try_from(attempts).unwrap_or(0).min(16);
    Duration::from_secs(1)
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::broker("open the relay channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(AmqpError::broker(
            "enable publisher confirms on the relay channel",
        ))?;
    Ok(channel)
}

async fn publish(
    channel: &Channel,
    row: &OutboxRow,
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    let message = &row.message;
    let mut headers = FieldTable::default();
    for (name, value) in &message.route.headers {
        headers.insert(
            name.as_str().into(),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    }
    if let Some(causation) = &message.causation_id {
        headers.insert(
            CAUSATION_HEADER.into(),
            AMQPValue::LongString(LongString::from(causation.as_bytes().to_vec())),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message.message_id.to_string().into())
        .with_type(message.kind.as_str().into())
        .with_timestamp(now)
        .with_headers(headers);
    if let Some(correlation) = &message.correlation_id {
        properties = properties.with_correlation_id(correlation.as_str().into());
    }
    channel
        .basic_publish(
            message.route.exchange.as_str().into(),
            message.route.routing_key.as_str().into(),
            BasicPublishOptions {
                // An unroutable message comes back instead of vanishing: the row stays due.
                mandatory: true,
                ..Default::default()
            },
            &message.body,
            properties,
        )
        .await
}
