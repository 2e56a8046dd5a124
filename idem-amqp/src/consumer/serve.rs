//! The connection loop: connect, run on one connection, reconnect when it is lost. On one
//! connection a run has three steps: [`Consumer::open`] (channels, topology, prefetch, consume),
//! [`Consumer::dispatch`] (a delivery per free slot, each on its own task) and
//! [`Consumer::drain`] (on a stop, finish and ack what is in flight; on a loss, ack nothing).

use super::acks::AckWindow;
use super::delivery::{self, Exits};
use super::Consumer;
use crate::error::Error;
use crate::publish::Publisher;
use futures_util::{FutureExt, StreamExt};
use idem_core::{Backend, Handler};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A connection lost sooner than this after it was made counts toward backing off.
const QUICK_LOSS: Duration = Duration::from_secs(10);

/// How long deliveries in flight get to end after the connection was lost.
const LOST_GRACE: Duration = Duration::from_secs(5);

/// A consumer's channels on one connection, consuming.
///
/// (Fields drop in this order: the consumer stream, then the channels.)
struct Session {
    deliveries: lapin::Consumer,
    /// The consumer tag, to cancel it on a stop.
    tag: String,
    /// Dead letters and retries go out on their own channel in confirm mode: the confirm is
    /// what makes it safe to ack the original.
    publisher: Publisher,
    /// The channel deliveries come on (and are acked on).
    channel: Channel,
}

impl<DB: Backend, H: Handler<DB>> Consumer<DB, H> {
    /// [`Consumer::serve`] until `stop` is cancelled: runs on a connection and reconnects when it
    /// is lost. An error on the first connection, while it is still up, is returned.
    pub(super) async fn serve_until(
        &self,
        amqp_url: &str,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let mut connection = crate::connect(amqp_url).await?;
        let mut first = true;
        // Losses that come right after connecting, in a row: a broker that closes the connection
        // over something on it (a delivery the client cannot read, a refused publish) would
        // otherwise be reconnected to several times a second, forever.
        let mut quick_losses = 0_u32;
        loop {
            let connected_at = Instant::now();
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
            if connected_at.elapsed() < QUICK_LOSS {
                quick_losses = quick_losses.saturating_add(1);
                self.shared.counters.quick_loss();
                tracing::warn!(
                    quick_losses,
                    "lost the broker {quick_losses} time(s) in a row within {QUICK_LOSS:?} of connecting; backing off before reconnecting (the broker log says why it closed the connection)"
                );
            } else {
                quick_losses = 0;
            }
            if connection.status().connected() {
                let _ = connection.close(200, "idem reconnecting".into()).await;
            }
            let reconnected =
                crate::connect::reconnect_after(amqp_url, stop.cancelled(), quick_losses).await;
            connection = match reconnected {
                Some(connection) => connection,
                None => return Ok(()),
            };
            self.shared.counters.reconnect();
        }
    }

    /// [`Consumer::run`] on one connection until `stop` is cancelled or the connection is lost.
    pub(super) async fn run_until(
        &self,
        connection: &Connection,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let mut session = self.open(connection).await?;
        self.shared.health.set_broker(true);
        // Cancelled when the connection or a channel is found dead: every broker wait of a
        // delivery task gives up then (a confirm or ack that can no longer come must not hold a
        // slot), and nothing is acked.
        let exits = Exits {
            stop: stop.clone(),
            lost: CancellationToken::new(),
        };
        let mut in_flight = JoinSet::new();
        let acks = AckWindow::open(
            session.channel.clone(),
            Arc::clone(&self.shared.counters),
            exits.lost.clone(),
            self.prefetch,
        );
        // The dead-letter watch lives exactly as long as the dispatch on this connection.
        let watch_channel = connection.create_channel().await.ok();
        let ended = {
            let dispatch = self.dispatch(&mut session, &acks, &exits, &mut in_flight);
            let watch = self.watch_dead_letters(watch_channel.as_ref());
            tokio::pin!(dispatch, watch);
            tokio::select! {
                biased;
                ended = &mut dispatch => ended,
                // The watch never ends by itself; if it did, the dispatch goes on alone.
                () = &mut watch => dispatch.await,
            }
        };
        if let Some(channel) = watch_channel.filter(|c| c.status().connected()) {
            let _ = channel.close(200, "idem consumer stopped".into()).await;
        }
        self.drain(&session, &ended, &exits.lost, in_flight, acks)
            .await;
        ended
    }

    /// Opens the consume channel and declares the topology on it, opens the confirm-mode
    /// channel for dead letters and retries, sets the prefetch and starts consuming.
    async fn open(&self, connection: &Connection) -> Result<Session, Error> {
        let queue = self.shared.queue.as_str();
        let channel = connection
            .create_channel()
            .await
            .map_err(Error::broker("open the consume channel"))?;
        crate::topology::declare(
            &channel,
            queue,
            &self.shared.policy.retry,
            self.shared.queue_type,
        )
        .await?;
        let publisher = Publisher::open(connection).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(Error::broker("set the prefetch (basic.qos)"))?;
        let tag = format!(
            "idem-{}-{}",
            self.shared.handler.consumer(),
            instance_suffix()
        );
        let deliveries = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker(format!("consume from {queue:?}")))?;
        tracing::info!(
            consumer = self.shared.handler.consumer(),
            queue,
            prefetch = self.prefetch,
            concurrency = self.concurrency,
            "consuming"
        );
        Ok(Session {
            deliveries,
            tag,
            publisher,
            channel,
        })
    }

    /// Every `dlq_poll_interval`, reads the dead-letter queue's depth (a passive declare on
    /// `channel`, its own, so a refusal cannot close the consume channel), records it and logs
    /// once when it reaches the alert threshold and once when it is back under. Never returns;
    /// stops looking when there is no channel or the queue cannot be read.
    async fn watch_dead_letters(&self, channel: Option<&Channel>) {
        let Some(channel) = channel else {
            tracing::warn!("cannot open a channel to watch the dead-letter queue; its depth is not watched on this connection");
            return std::future::pending().await;
        };
        let dlq = crate::topology::dead_letter_queue(&self.shared.queue);
        let threshold = self.dlq_alert_threshold;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        loop {
            let declared = channel
                .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
                .await;
            let messages = match declared {
                Ok(queue) => queue.message_count(),
                Err(error) => {
                    // The consume loop declared the queue; this is the connection going away.
                    tracing::debug!(%error, queue = dlq.as_str(), "cannot read the dead-letter queue's depth");
                    return std::future::pending().await;
                }
            };
            match self.shared.counters.dlq_depth(&dlq, messages, threshold) {
                Some(true) => tracing::warn!(
                    queue = dlq.as_str(),
                    messages,
                    threshold,
                    "the dead-letter queue holds {messages} message(s), at or over the alert threshold of {threshold}: inspect them (idem dlq) and replay or discard"
                ),
                Some(false) => tracing::info!(
                    queue = dlq.as_str(),
                    messages,
                    threshold,
                    "the dead-letter queue is back under the alert threshold of {threshold}"
                ),
                None => {}
            }
            tokio::time::sleep(self.dlq_poll_interval).await;
        }
    }

    /// Takes a free slot, then the next delivery (its ticket from `acks`, in the order taken),
    /// and hands it to a task of `in_flight`; until `exits.stop` is cancelled (`Ok`) or a channel
    /// or the consumer stream ends (`Err`).
    async fn dispatch(
        &self,
        session: &mut Session,
        acks: &AckWindow,
        exits: &Exits,
        in_flight: &mut JoinSet<()>,
    ) -> Result<(), Error> {
        let stop = &exits.stop;
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let lost = |reason: String| {
            Err(Error::ConsumerLost {
                queue: self.shared.queue.clone(),
                reason,
            })
        };
        // One watch for the whole run (not a new timer per delivery).
        let closed = channel_closed(&session.channel, &session.publisher.channel);
        tokio::pin!(closed);
        loop {
            // Take a slot first, so at most `concurrency` deliveries are being processed.
            let slot = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = &mut closed => return lost("a channel closed".into()),
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return Ok(()),
                },
            };
            let next = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = &mut closed => return lost("a channel closed".into()),
                next = session.deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => {
                    let ticket = acks.take(delivery.delivery_tag);
                    (delivery, ticket)
                }
                Some(Err(error)) => return lost(error.to_string()),
                None => return lost("the broker cancelled the consumer".into()),
            };
            let shared = Arc::clone(&self.shared);
            let publisher = session.publisher.clone();
            let task_exits = exits.clone();
            let Some(group) = self.group else {
                in_flight.spawn(async move {
                    delivery::handle(&shared, &publisher, delivery, &task_exits).await;
                    drop(slot);
                });
                while in_flight.try_join_next().is_some() {}
                continue;
            };
            // Group commit: more deliveries, until the group is full or `max_wait` is up. What
            // was taken is processed whatever happens next (on a loss its acks fail, and the
            // broker delivers it again).
            let mut deliveries = vec![delivery];
            let deadline = tokio::time::Instant::now() + group.max_wait;
            let mut ended = None;
            while deliveries.len() < group.max_messages {
                // What has already arrived joins at once. When nothing more has, and no other
                // group is in flight, waiting would only add latency: the group starts now, and
                // the deliveries that come meanwhile fill the next one (under load, groups are
                // in flight and the wait fills them).
                let next = match session.deliveries.next().now_or_never() {
                    Some(next) => next,
                    None if slots.available_permits() + 1 >= self.concurrency => break,
                    None => tokio::select! {
                        () = stop.cancelled() => { ended = Some(Ok(())); break; }
                        () = &mut closed => { ended = Some(lost("a channel closed".into())); break; }
                        () = tokio::time::sleep_until(deadline) => break,
                        next = session.deliveries.next() => next,
                    },
                };
                match next {
                    Some(Ok(delivery)) => {
                        let ticket = acks.take(delivery.delivery_tag);
                        deliveries.push((delivery, ticket));
                    }
                    Some(Err(error)) => {
                        ended = Some(lost(error.to_string()));
                        break;
                    }
                    None => {
                        ended = Some(lost("the broker cancelled the consumer".into()));
                        break;
                    }
                }
            }
            in_flight.spawn(async move {
                delivery::handle_group(&shared, &publisher, deliveries, &task_exits).await;
                drop(slot);
            });
            // Reap finished tasks so the set does not grow with the message count.
            while in_flight.try_join_next().is_some() {}
            if let Some(ended) = ended {
                return ended;
            }
        }
    }

    /// After the dispatch `ended`: on a stop, cancels the consumer and lets the deliveries in
    /// flight finish and ack within the shutdown deadline; on a loss, cancels `lost` (nothing
    /// can be acked any more) and gives them a short grace. Then lets `acks` send what is left
    /// and closes the channels.
    async fn drain(
        &self,
        session: &Session,
        ended: &Result<(), Error>,
        lost: &CancellationToken,
        mut in_flight: JoinSet<()>,
        acks: AckWindow,
    ) {
        let Session {
            channel,
            publisher,
            tag,
            ..
        } = session;
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
            let (consume, publish, lost) =
                (channel.clone(), publisher.channel.clone(), lost.clone());
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
        acks.close().await;
        // Deliveries prefetched but never started go back to the queue when the channel closes.
        for ch in [channel, &publisher.channel] {
            if ch.status().connected() {
                let _ = ch.close(200, "idem consumer stopped".into()).await;
            }
        }
        tracing::info!(queue = self.shared.queue.as_str(), stats = ?self.stats(), "consumer stopped");
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
pub(super) async fn stop_on<T>(
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

/// A short random suffix for consumer tags (tags must be unique per channel, and operators
/// should tell two instances apart in `rabbitmqctl list_consumers`).
fn instance_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}
