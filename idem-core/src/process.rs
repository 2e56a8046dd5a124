//! The unit of work: decode → BEGIN → claim → handle → COMMIT. The one place that owns the order.
//!
//! The transport adapter acts on the returned [`Outcome`] (ack, dead-letter, deliver again); it
//! never opens, commits or rolls back a transaction itself. This file owns what happens before
//! and after the transaction (checks, decoding, the crash-loop count, the verdict);
//! `transaction.rs` owns the transaction.

use crate::backend::Backend;
use crate::delivery::{Delivery, Metadata};
use crate::handler::{ErrorClass, Handler};
use crate::key::{Key, KeyError};
use crate::message::{DecodeErrorKind, Message};
use crate::outcome::{Outcome, Processed, Reason};
use crate::policy::Policy;
use crate::transaction::{hex, panic_text, run_transaction, Ended};
use sqlx::Pool;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A tracing span for one delivery, carrying consumer, message id, correlation id, the
/// producer's W3C `traceparent` (when it sent one) and the redelivered flag; [`process`]
/// records the key into it once decoded.
///
/// With the feature `opentelemetry` and a `tracing-opentelemetry` layer installed, the span's
/// OpenTelemetry parent is the producer's span named by `traceparent` / `tracestate`; a missing
/// or invalid `traceparent` leaves it a new root.
pub fn delivery_span(consumer: &str, metadata: &Metadata) -> tracing::Span {
    let span = tracing::info_span!(
        "delivery",
        consumer = %consumer,
        key = tracing::field::Empty,
        message_id = metadata.message_id.as_deref().unwrap_or(""),
        correlation_id = metadata.correlation_id.as_deref().unwrap_or(""),
        traceparent = metadata.headers.get("traceparent").map_or("", String::as_str),
        redelivered = metadata.redelivered,
    );
    #[cfg(feature = "opentelemetry")]
    crate::otel::continue_producer_trace(&span, &metadata.headers);
    span
}

/// Runs one delivery through `handler` as a single transaction.
///
/// check size and kind → decode → (redelivered: count it toward the crash-loop limit, in its own
/// transaction) → BEGIN → claim `(consumer, key)` → handler → check the transaction is still
/// idem's → COMMIT. A key already claimed with the same payload rolls back without running the
/// handler; with another payload it is a key conflict. A handler error or panic rolls back
/// everything, the claim included, and the error's class and `policy` decide between a retry
/// and the dead-letter queue. A panic while decoding (say, in a serde hook) dead-letters the
/// message `malformed`. The caller acknowledges only after [`Outcome::Applied`] or
/// [`Outcome::Duplicate`], or once the dead letter or retry it published is confirmed.
pub async fn process<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    delivery: Delivery<'_>,
    policy: &Policy,
) -> Processed {
    let (message, key, fingerprint) =
        match decode::<H::Message>(handler.consumer(), delivery, policy) {
            Ok(decoded) => decoded,
            Err((reason, error)) => {
                return Processed {
                    key: None,
                    outcome: Outcome::DeadLetter { reason, error },
                }
            }
        };
    if delivery.tries_in_place == 0 {
        tracing::Span::current().record("key", key.as_str());
    }
    let consumer = handler.consumer();
    // A redelivered message carries a crash-loop count until a terminal outcome clears it
    // (unless the broker keeps the count: a quorum queue).
    let counted = delivery.metadata.redelivered && delivery.metadata.delivery_count.is_none();
    let outcome = match crash_loop_check(pool, consumer, &key, &fingerprint, delivery, policy).await
    {
        Err(outcome) => outcome,
        Ok(()) => {
            let ended =
                claim_until_settled(pool, handler, &key, message, &fingerprint, delivery, policy)
                    .await;
            let outcome = verdict(ended, delivery.metadata, policy);
            if counted && matches!(outcome, Outcome::DeadLetter { .. } | Outcome::Retry { .. }) {
                forget_redeliveries(pool, consumer, &key).await;
            }
            outcome
        }
    };
    let outcome = match outcome {
        Outcome::Unavailable { error } if delivery.blame_if_unavailable => transient(
            format!("the database keeps failing for this message while it serves others: {error}"),
            delivery.metadata,
            policy,
        ),
        outcome => outcome,
    };
    Processed {
        key: Some(key),
        outcome,
    }
}

/// Size and kind checks, decoding, the key and the fingerprint; a panic in any of them (a serde
/// hook, a hand-written `key()` or `fingerprint()`) is the message's fault, not the process's.
pub(crate) fn decode<M: Message>(
    consumer: &str,
    delivery: Delivery<'_>,
    policy: &Policy,
) -> Result<(M, Key, [u8; 32]), (Reason, String)> {
    let metadata = delivery.metadata;
    if delivery.body.len() > policy.max_body_bytes {
        return Err((
            Reason::Malformed,
            format!(
                "the body is {} bytes, over the limit of {} (max_body_bytes)",
                delivery.body.len(),
                policy.max_body_bytes
            ),
        ));
    }
    if let Some(kind) = metadata.kind.as_deref() {
        if kind != M::KIND {
            return Err((
                Reason::Malformed,
                format!(
                    "the message kind (AMQP type) is {kind:?}, but consumer {:?} handles {:?}: it was published to the wrong queue",
                    consumer,
                    M::KIND
                ),
            ));
        }
    }
    let guarded = catch_unwind(AssertUnwindSafe(|| {
        let message = M::decode(delivery.body).map_err(|error| {
            let reason = match error.kind {
                DecodeErrorKind::Malformed => Reason::Malformed,
                DecodeErrorKind::MissingKey => Reason::MissingKey,
            };
            (reason, error.detail)
        })?;
        let key =
            key_of(&message, metadata).map_err(|error| (Reason::MissingKey, error.to_string()))?;
        let fingerprint = M::fingerprint(delivery.body, &key);
        Ok((message, key, fingerprint))
    }));
    guarded.unwrap_or_else(|panic| {
        Err((
            Reason::Malformed,
            format!(
                "decoding the message panicked (in its Deserialize, key or fingerprint code): {}",
                panic_text(&*panic)
            ),
        ))
    })
}

fn key_of<M: Message>(message: &M, metadata: &Metadata) -> Result<Key, KeyError> {
    match message.key()? {
        Some(key) => Ok(key),
        None => Key::new(metadata.message_id.as_deref().ok_or(KeyError::Missing)?),
    }
}

/// How many times a claim that lost a race is run again at once before the message counts an
/// attempt: a race is over when the other transaction ends, so one more claim almost always
/// settles it (finding the duplicate).
const RACED_CLAIM_RERUNS: u32 = 5;

/// The transaction, run again at once (up to [`RACED_CLAIM_RERUNS`] times) while its claim
/// loses races with other copies of the message. A lost race is neither the message's fault
/// nor the database's absence: not an attempt, and not a hold that marks the consumer unready.
async fn claim_until_settled<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    key: &Key,
    mut message: H::Message,
    fingerprint: &[u8],
    delivery: Delivery<'_>,
    policy: &Policy,
) -> Ended {
    let mut reruns = 0;
    loop {
        let contended = match run_transaction(
            pool,
            handler,
            key,
            message,
            fingerprint,
            delivery,
            policy.isolation,
        )
        .await
        {
            Ok(ended) => return ended,
            Err(contended) => contended,
        };
        if reruns == RACED_CLAIM_RERUNS {
            return Ended::Failed {
                class: ErrorClass::Transient,
                error: format!(
                    "the ledger claim lost a race with another transaction {} times in a row: {}",
                    reruns + 1,
                    contended.error
                ),
            };
        }
        reruns += 1;
        tracing::debug!(error = %contended.error, rerun = reruns, "the ledger claim raced another transaction; claiming again");
        message = contended.message;
        // A moment for the other transaction to end; growing, in case it is a long one.
        tokio::time::sleep(std::time::Duration::from_millis(u64::from(reruns) * 2)).await;
    }
}

/// A redelivered message may be the one whose handling killed the process last time. Counting
/// it in a transaction of its own, before the handler runs, is what survives the next crash.
/// Only the first try of a delivery counts; a try in place (the database was away) does not.
/// Over the limit, a key the ledger already holds is what it is — a duplicate or a conflict —
/// before it is ever a crash loop; either way the count is cleared (a terminal outcome).
async fn crash_loop_check<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &str,
    key: &Key,
    fingerprint: &[u8],
    delivery: Delivery<'_>,
    policy: &Policy,
) -> Result<(), Outcome> {
    if !delivery.metadata.redelivered || delivery.tries_in_place > 0 {
        return Ok(());
    }
    let counted = match delivery.metadata.delivery_count {
        // A quorum queue counted it: no write of idem's own.
        Some(count) => Ok(count),
        None => DB::count_redelivery(pool, consumer, key.as_str()).await,
    };
    let count = match counted {
        Ok(count) if count > policy.crash_loop_limit => count,
        Ok(_) => return Ok(()),
        Err(error) => {
            return Err(Outcome::Unavailable {
                error: format!("cannot count the redelivery: {error}"),
            })
        }
    };
    let outcome = match DB::applied_fingerprint(pool, consumer, key.as_str()).await {
        Ok(Some(stored)) if stored == fingerprint => Outcome::Duplicate,
        Ok(Some(stored)) => Outcome::DeadLetter {
            reason: Reason::KeyConflict,
            error: format!(
                "key {key} was already applied with a different payload (ledger fingerprint {}, this message {}); the first effect stands",
                hex(&stored),
                hex(fingerprint)
            ),
        },
        Ok(None) => Outcome::DeadLetter {
            reason: Reason::CrashLoop,
            error: format!(
                "redelivered {count} times after its handling was cut short (the process died or lost its connection mid-message), over the limit of {} (crash_loop_limit); the last run may have crashed the consumer",
                policy.crash_loop_limit
            ),
        },
        Err(error) => {
            return Err(Outcome::Unavailable {
                error: format!("cannot read the ledger: {error}"),
            })
        }
    };
    if delivery.metadata.delivery_count.is_none() {
        forget_redeliveries(pool, consumer, key).await;
    }
    Err(outcome)
}

/// Clears a crash-loop count outside any transaction, after a terminal outcome that did not
/// commit one. A failure only leaves the count to the weekly purge.
async fn forget_redeliveries<DB: Backend>(pool: &Pool<DB>, consumer: &str, key: &Key) {
    let forgotten = match pool.acquire().await {
        Ok(mut conn) => DB::forget_redeliveries(&mut conn, consumer, key.as_str()).await,
        Err(error) => Err(error),
    };
    if let Err(error) = forgotten {
        tracing::warn!(%error, "cannot clear the crash-loop count; it expires within a week");
    }
}

/// What the retry policy makes of how the transaction ended.
pub(crate) fn verdict(ended: Ended, metadata: &Metadata, policy: &Policy) -> Outcome {
    match ended {
        Ended::Applied => Outcome::Applied,
        Ended::Duplicate => Outcome::Duplicate,
        Ended::Conflict(error) => Outcome::DeadLetter {
            reason: Reason::KeyConflict,
            error,
        },
        Ended::Unavailable(error) => Outcome::Unavailable { error },
        Ended::Failed {
            class: ErrorClass::Permanent,
            error,
        } => Outcome::DeadLetter {
            reason: Reason::Rejected,
            error,
        },
        Ended::Failed {
            class: ErrorClass::Transient,
            error,
        } => transient(error, metadata, policy),
    }
}

/// A transient failure: another attempt through a delay queue, or the last one.
fn transient(error: String, metadata: &Metadata, policy: &Policy) -> Outcome {
    let attempts = metadata.previous_attempts.saturating_add(1);
    let retry = &policy.retry;
    if attempts >= retry.attempts() {
        return Outcome::DeadLetter {
            reason: Reason::RetriesExhausted,
            error: format!("attempt {attempts} of {}: {error}", retry.attempts()),
        };
    }
    Outcome::Retry {
        error,
        attempts,
        delay: retry.jittered(attempts, rand::random::<f64>()),
        tier: retry.delay_after(attempts),
    }
}
