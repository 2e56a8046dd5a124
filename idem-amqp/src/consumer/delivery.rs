//! One delivery, start to finish: the unit of work (held in place while the database is away),
//! then what its outcome asks of the broker — ack; or publish the retry or dead letter, wait for
//! the confirm, then ack; or hand the delivery back (nack with requeue).
//!
//! Nothing is acked before the broker confirmed what had to be published first, and nothing is
//! acked or nacked once the connection is known lost: the broker requeues it by itself. Acks and
//! nacks go through the channel's [`AckWindow`](super::acks::AckWindow), which sends them.

use super::acks::Ticket;
use super::metadata::metadata_of;
use super::unreadable::unreadable_part;
use super::Shared;
use crate::error::Error;
use crate::headers::DeadLetter;
use crate::publish::{self, Publisher};
use crate::telemetry::Settled;
use idem_core::{
    delivery_span, process, process_group, Backend, Delivery, Handler, Key, Metadata, Outcome,
    Processed, Reason,
};
use lapin::message::Delivery as AmqpDelivery;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Tries in place (the database unavailable for this delivery) before one more counts as the
/// message's own failure — provided other deliveries got through meanwhile. With the default
/// database backoff that is about half a minute of holding.
const HOLDS_BEFORE_BLAME: u32 = 5;

/// Why a delivery task may have to give up waiting.
#[derive(Clone)]
pub(super) struct Exits {
    /// The consumer is stopping: stop waiting for the database (in-flight work still acks).
    pub stop: CancellationToken,
    /// The connection is gone: stop waiting for anything from the broker.
    pub lost: CancellationToken,
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

/// One delivery, start to finish, inside its tracing span.
pub(super) async fn handle<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    publisher: &Publisher,
    (delivery, ticket): (AmqpDelivery, Ticket),
    exits: &Exits,
) {
    let metadata = metadata_of(&delivery, &shared.queue, shared.queue_type);
    let span = delivery_span(shared.handler.consumer(), &metadata);
    let task = Task {
        shared,
        publisher,
        delivery: &delivery,
        ticket: &ticket,
        metadata: &metadata,
        exits,
    };
    let _in_flight = shared.counters.metrics.in_flight();
    async {
        let Processed { key, outcome } = match unreadable_part(&delivery) {
            Some(part) => Processed {
                key: None,
                outcome: Outcome::DeadLetter {
                    reason: Reason::Unreadable,
                    error: format!(
                        "{part} is not valid UTF-8 (read with U+FFFD in place of the bad bytes): the message cannot be processed as it was sent"
                    ),
                },
            },
            None => match task.process().await {
                Some(processed) => processed,
                None => return,
            },
        };
        let committed_at = Instant::now();
        if matches!(outcome, Outcome::Applied) {
            task.applied(committed_at);
        }
        // Every wait on the broker from here on ends when the connection is found lost: then
        // nothing is acked and the broker redelivers.
        tokio::select! {
            () = task.settle(outcome, key.as_ref(), committed_at) => {}
            () = exits.lost.cancelled() => {
                tracing::warn!("the connection was lost before the broker answered; the message will be redelivered");
            }
        }
    }
    .instrument(span)
    .await;
}

/// A group of deliveries (group commit): the first-time ones through
/// [`idem_core::process_group`], in one transaction where it can; each is then settled as it
/// would be alone. Redelivered or unreadable deliveries, and any the database could not take
/// (held, then tried again), go the per-message way, after the group.
pub(super) async fn handle_group<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    publisher: &Publisher,
    deliveries: Vec<(AmqpDelivery, Ticket)>,
    exits: &Exits,
) {
    let (grouped, alone): (Vec<_>, Vec<_>) = deliveries
        .into_iter()
        .partition(|(d, _)| !d.redelivered && unreadable_part(d).is_none());
    let metadata: Vec<Metadata> = grouped
        .iter()
        .map(|(d, _)| metadata_of(d, &shared.queue, shared.queue_type))
        .collect();
    let units: Vec<Delivery<'_>> = grouped
        .iter()
        .zip(&metadata)
        .map(|((d, _), metadata)| Delivery {
            body: &d.data,
            metadata,
            tries_in_place: 0,
            blame_if_unavailable: false,
        })
        .collect();
    let in_flight: Vec<_> = units
        .iter()
        .map(|_| shared.counters.metrics.in_flight())
        .collect();
    let processed = if units.is_empty() {
        Vec::new()
    } else {
        // Beside other groups and deliveries; never beside a redelivered message running alone.
        let _beside = shared.suspects_alone.read().await;
        let started = Instant::now();
        let lock_order = shared
            .lock_order
            .as_ref()
            .map(|erased| move |message: &H::Message| (erased.0)(message));
        let processed = process_group(
            &shared.pool,
            &shared.handler,
            &units,
            &shared.policy,
            lock_order
                .as_ref()
                .map(|order| order as &idem_core::LockOrder<'_, H::Message>),
        )
            .instrument(tracing::info_span!("group", consumer = %shared.handler.consumer(), messages = units.len()))
            .await;
        shared.counters.metrics.handler_time(started.elapsed());
        processed
    };
    let committed_at = Instant::now();
    let mut again = Vec::new();
    for (at, (((delivery, ticket), metadata), processed)) in
        grouped.iter().zip(&metadata).zip(processed).enumerate()
    {
        let Processed { key, outcome } = processed;
        if matches!(outcome, Outcome::Unavailable { .. }) {
            again.push(at);
            continue;
        }
        if !matches!(outcome, Outcome::DeadLetter { .. }) {
            shared.health.set_database(true, None);
        }
        let task = Task {
            shared,
            publisher,
            delivery,
            ticket,
            metadata,
            exits,
        };
        if matches!(outcome, Outcome::Applied) {
            task.applied(committed_at);
        }
        let span = delivery_span(shared.handler.consumer(), metadata);
        if let Some(key) = &key {
            span.record("key", key.as_str());
        }
        tokio::select! {
            () = task.settle(outcome, key.as_ref(), committed_at).instrument(span) => {}
            () = exits.lost.cancelled() => {
                tracing::warn!("the connection was lost before the broker answered; the group's messages will be redelivered");
                return;
            }
        }
    }
    drop(in_flight);
    // The per-message way: held while the database is away, run alone when redelivered.
    let again: Vec<_> = grouped
        .into_iter()
        .enumerate()
        .filter(|(at, _)| again.contains(at))
        .map(|(_, delivery)| delivery)
        .collect();
    for delivery in alone.into_iter().chain(again) {
        handle(shared, publisher, delivery, exits).await;
    }
}

/// A delivery in flight and what handling it needs.
struct Task<'a, DB: Backend, H> {
    shared: &'a Shared<DB, H>,
    publisher: &'a Publisher,
    delivery: &'a AmqpDelivery,
    ticket: &'a Ticket,
    metadata: &'a Metadata,
    exits: &'a Exits,
}

impl<DB: Backend, H: Handler<DB>> Task<'_, DB, H> {
    /// Runs the unit of work; while the database is unavailable, holds the delivery and runs
    /// it again in place with backoff (not an attempt: the message is not to blame). `None`
    /// when the consumer stopped or lost its connection meanwhile: the delivery was handed back.
    async fn process(&self) -> Option<Processed> {
        let shared = self.shared;
        let mut tries_in_place = 0;
        let answered_before = shared.counters.database_answers();
        loop {
            // Held this long while other deliveries get through: the database is not away, this
            // message is the trouble; the next "unavailable" counts as its own failed attempt.
            let blame_if_unavailable = tries_in_place >= HOLDS_BEFORE_BLAME
                && shared.counters.database_answers() > answered_before;
            let unit = Delivery {
                body: &self.delivery.data,
                metadata: self.metadata,
                tries_in_place,
                blame_if_unavailable,
            };
            let outcome = {
                // A redelivered message may be the one that crashed the process: it runs alone
                // (write lock), so that deliveries beside it are not blamed for its next crash.
                // Only while it runs: held between tries it cannot crash anything, and must not
                // stop the consumer.
                let _alone;
                let _beside;
                if self.metadata.redelivered {
                    _alone = shared.suspects_alone.write().await;
                } else {
                    _beside = shared.suspects_alone.read().await;
                }
                let started = Instant::now();
                let processed = process(&shared.pool, &shared.handler, unit, &shared.policy).await;
                shared.counters.metrics.handler_time(started.elapsed());
                processed
            };
            let Outcome::Unavailable { error } = &outcome.outcome else {
                if !matches!(outcome.outcome, Outcome::DeadLetter { .. }) {
                    shared.health.set_database(true, None);
                }
                return Some(outcome);
            };
            shared.health.set_database(false, Some(error));
            let wait = shared.database_backoff.delay(tries_in_place);
            tracing::warn!(outcome = "unavailable", %error, retry_in = ?wait, "database unavailable; holding the delivery");
            tries_in_place += 1;
            tokio::select! {
                () = self.exits.give_up() => {
                    self.redeliver();
                    return None;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Records an applied delivery's latencies: from being taken off the channel to its commit
    /// (`committed_at`), and from the producer's stamp (the AMQP `timestamp` property, whole
    /// seconds), when it set one: the latency a user of the service sees.
    fn applied(&self, committed_at: Instant) {
        let taken_to_commit = committed_at.saturating_duration_since(self.ticket.taken());
        self.shared
            .counters
            .metrics
            .taken_to_commit(taken_to_commit);
        let Some(&stamped) = self.delivery.properties.timestamp().as_ref() else {
            return;
        };
        let stamped = UNIX_EPOCH + Duration::from_secs(stamped);
        // A producer clock ahead of ours would make it negative: not recorded.
        if let Ok(took) = SystemTime::now().duration_since(stamped) {
            self.shared.counters.metrics.end_to_end(took);
        }
    }

    /// Acts on the outcome: ack, or publish the retry or dead letter and then ack.
    /// `committed_at`: when the unit of work ended.
    async fn settle(&self, outcome: Outcome, key: Option<&Key>, committed_at: Instant) {
        match outcome {
            Outcome::Applied => {
                if self.ack(Settled::Applied, Some(committed_at)) {
                    tracing::info!(outcome = "applied", "applied");
                }
            }
            Outcome::Duplicate => {
                if self.ack(Settled::Duplicate, None) {
                    tracing::info!(
                        outcome = "duplicate",
                        "duplicate: already in the ledger, handler not run"
                    );
                }
            }
            Outcome::DeadLetter { reason, error } => {
                self.dead_letter(reason, &error, key.map(Key::as_str)).await
            }
            Outcome::Retry {
                error,
                attempts,
                delay,
                tier,
            } => {
                self.retry(&error, attempts, (delay, tier), key.map(Key::as_str))
                    .await
            }
            // Handled by `process`.
            Outcome::Unavailable { .. } => {}
        }
    }

    /// Publishes the dead letter and, once the broker confirmed it, acks the original.
    async fn dead_letter(&self, reason: Reason, error: &str, key: Option<&str>) {
        let shared = self.shared;
        let letter = DeadLetter {
            reason,
            error,
            consumer: shared.handler.consumer(),
            queue: &shared.queue,
            key,
        };
        let published = publish::dead_letter(
            self.publisher,
            &self.delivery.data,
            &self.delivery.properties,
            self.metadata,
            letter,
        )
        .await;
        match published {
            Ok(()) => {
                if self.ack(Settled::DeadLettered(reason), None) {
                    tracing::warn!(outcome = "dead-lettered", %reason, %error, "dead-lettered");
                }
            }
            Err(publish_error) => {
                // Not acked, so not lost: it comes back and is dead-lettered then.
                tracing::error!(%reason, %error, %publish_error, "dead letter not confirmed; handing the message back");
                self.redeliver_later().await;
            }
        }
    }

    /// Publishes the retry to the delay queue of `tier` (expiring after `delay`) and, once the
    /// broker confirmed it, acks the original.
    async fn retry(
        &self,
        error: &str,
        attempts: u32,
        (delay, tier): (Duration, Duration),
        key: Option<&str>,
    ) {
        let published = publish::retry(
            self.publisher,
            &self.shared.queue,
            &self.delivery.data,
            &self.delivery.properties,
            self.metadata,
            error,
            (delay, tier),
        )
        .await;
        match published {
            Ok(()) => {
                if self.ack(Settled::Retried, None) {
                    tracing::warn!(outcome = "retry", %error, attempts, retry_in = ?delay, "failed; retrying later");
                }
            }
            Err(publish_error @ Error::FrameTooLarge { .. }) => {
                // No retry copy fits in a frame, so none can go out without costing the
                // connection: this attempt is the last, and the message is parked instead.
                let most = self.shared.policy.retry.attempts();
                let error =
                    format!("attempt {attempts} of {most}: {error}; not retried: {publish_error}");
                self.dead_letter(Reason::RetriesExhausted, &error, key)
                    .await;
            }
            Err(publish_error) => {
                tracing::error!(%error, %publish_error, "retry not confirmed; handing the message back");
                self.redeliver_later().await;
            }
        }
    }

    /// Asks the ack window for the ack (counted as `settled` once the broker has it), and says
    /// whether it could. A lost ack is never ignored: it is counted and logged, and the
    /// redelivery it causes is absorbed by the ledger.
    fn ack(&self, settled: Settled, committed_at: Option<Instant>) -> bool {
        if self.ticket.ack(settled, committed_at) {
            return true;
        }
        self.shared.counters.ack_failure();
        tracing::error!("ack not sent: the connection is gone; the broker will redeliver and the ledger will skip it");
        false
    }

    /// Waits a little (the first database backoff, so a broker-side problem does not become a
    /// hot loop), then hands the delivery back.
    async fn redeliver_later(&self) {
        tokio::select! {
            () = self.exits.give_up() => {}
            () = tokio::time::sleep(self.shared.database_backoff.initial()) => {}
        }
        self.redeliver();
    }

    /// Nacks with requeue: the broker delivers the message again, to this consumer or another.
    /// Once the connection is lost there is no one to tell: the broker requeues it by itself.
    fn redeliver(&self) {
        if self.exits.lost.is_cancelled() {
            return;
        }
        if !self.ticket.hand_back() {
            // The connection is gone: the broker requeues every unacked delivery by itself.
            self.shared.counters.ack_failure();
            tracing::warn!(
                "nack not sent: the connection is gone; the broker will redeliver the message"
            );
        }
    }
}
