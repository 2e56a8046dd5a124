//! The unit of work: decode → BEGIN → claim → handle → COMMIT. The one place that owns the order.
//!
//! The transport adapter acts on the returned [`Outcome`] (ack, dead-letter, deliver again); it
//! never opens, commits or rolls back a transaction itself.

use crate::backend::{Backend, Claim};
use crate::classify::is_unavailable;
use crate::delivery::{Delivery, Metadata};
use crate::handler::{ErrorClass, Handler};
use crate::key::{Key, KeyError};
use crate::message::{DecodeErrorKind, Message};
use crate::outcome::{Outcome, Processed, Reason};
use crate::policy::Policy;
use crate::tx::Tx;
use futures_util::FutureExt;
use sqlx::Pool;
use std::panic::AssertUnwindSafe;

/// A tracing span for one delivery, carrying consumer, message id, correlation id and the
/// redelivered flag; [`process`] records the key into it once decoded.
pub fn delivery_span(consumer: &str, metadata: &Metadata) -> tracing::Span {
    tracing::info_span!(
        "delivery",
        consumer = %consumer,
        key = tracing::field::Empty,
        message_id = metadata.message_id.as_deref().unwrap_or(""),
        correlation_id = metadata.correlation_id.as_deref().unwrap_or(""),
        redelivered = metadata.redelivered,
    )
}

/// Runs one delivery through `handler` as a single transaction.
///
/// check size and kind → decode → (redelivered: count it toward the crash-loop limit, in its own
/// transaction) → BEGIN → claim `(consumer, key)` → handler → COMMIT. A key already claimed with
/// the same payload rolls back without running the handler; with another payload it is a key
/// conflict. A handler error or panic rolls back everything, the claim included, and the error's
/// class and `policy` decide between a retry and the dead-letter queue. The caller acknowledges
/// only after [`Outcome::Applied`] or [`Outcome::Duplicate`], or once the dead letter or retry it
/// published is confirmed.
pub async fn process<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    delivery: Delivery<'_>,
    policy: &Policy,
) -> Processed {
    let metadata = delivery.metadata;
    let dead = |reason, error: String| Processed {
        key: None,
        outcome: Outcome::DeadLetter { reason, error },
    };
    if delivery.body.len() > policy.max_body_bytes {
        return dead(
            Reason::Malformed,
            format!(
                "the body is {} bytes, over the limit of {} (max_body_bytes)",
                delivery.body.len(),
                policy.max_body_bytes
            ),
        );
    }
    if let Some(kind) = metadata.kind.as_deref() {
        if kind != H::Message::KIND {
            return dead(
                Reason::Malformed,
                format!(
                    "the message kind (AMQP type) is {kind:?}, but consumer {:?} handles {:?}: it was published to the wrong queue",
                    handler.consumer(),
                    H::Message::KIND
                ),
            );
        }
    }
    let message = match H::Message::decode(delivery.body) {
        Ok(message) => message,
        Err(error) => {
            let reason = match error.kind {
                DecodeErrorKind::Malformed => Reason::Malformed,
                DecodeErrorKind::MissingKey => Reason::MissingKey,
            };
            return dead(reason, error.detail);
        }
    };
    let key = match key_of(&message, metadata) {
        Ok(key) => key,
        Err(error) => return dead(Reason::MissingKey, error.to_string()),
    };
    if delivery.tries_in_place == 0 {
        tracing::Span::current().record("key", key.as_str());
    }
    let outcome =
        match crash_loop_check::<DB>(pool, handler.consumer(), &key, delivery, policy).await {
            Ok(counted) => {
                let result = run_transaction(pool, handler, &key, message, delivery, counted).await;
                outcome_of(result, metadata, policy)
            }
            Err(outcome) => outcome,
        };
    Processed {
        key: Some(key),
        outcome,
    }
}

fn key_of<M: Message>(message: &M, metadata: &Metadata) -> Result<Key, KeyError> {
    match message.key()? {
        Some(key) => Ok(key),
        None => Key::new(metadata.message_id.as_deref().ok_or(KeyError::Missing)?),
    }
}

/// A redelivered message may be the one whose handling killed the process last time. Counting
/// it in a transaction of its own, before the handler runs, is what survives the next crash.
/// `Ok(true)`: counted (the unit of work clears the count when it gets through).
async fn crash_loop_check<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &str,
    key: &Key,
    delivery: Delivery<'_>,
    policy: &Policy,
) -> Result<bool, Outcome> {
    if !delivery.metadata.redelivered || delivery.tries_in_place > 0 {
        return Ok(false);
    }
    match DB::count_redelivery(pool, consumer, key.as_str()).await {
        Ok(count) if count > policy.crash_loop_limit => Err(Outcome::DeadLetter {
            reason: Reason::CrashLoop,
            error: format!(
                "redelivered {count} times after its handling was cut short (the process died or lost its connection mid-message), over the limit of {} (crash_loop_limit); the last run may have crashed the consumer",
                policy.crash_loop_limit
            ),
        }),
        Ok(_) => Ok(true),
        Err(error) => Err(Outcome::Unavailable {
            error: format!("cannot count the redelivery: {error}"),
        }),
    }
}

/// How the transaction ended, before the retry policy has its say.
enum Ended {
    Applied,
    Duplicate,
    Conflict(String),
    Unavailable(String),
    Failed { class: ErrorClass, error: String },
}

fn outcome_of(ended: Ended, metadata: &Metadata, policy: &Policy) -> Outcome {
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
        } => {
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
    }
}

async fn run_transaction<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    key: &Key,
    message: H::Message,
    delivery: Delivery<'_>,
    crash_counted: bool,
) -> Ended {
    let consumer = handler.consumer();
    let mut transaction = match DB::begin(pool).await {
        Ok(transaction) => transaction,
        Err(error) => {
            return Ended::Unavailable(format!("cannot begin a transaction: {error}"));
        }
    };
    // Errors in idem's own statements are never the message's fault: the database is away,
    // or not what idem expects; either way, wait for it rather than blame the message.
    let fingerprint = H::Message::fingerprint(delivery.body);
    let claim = match DB::claim(&mut transaction, consumer, key.as_str(), &fingerprint).await {
        Ok(claim) => claim,
        Err(error) => {
            rollback(transaction).await;
            return Ended::Unavailable(format!("cannot claim the key in the ledger: {error}"));
        }
    };
    if crash_counted {
        // In this transaction: if it commits, the message got through and the count goes with it.
        if let Err(error) = DB::forget_redeliveries(&mut transaction, consumer, key.as_str()).await
        {
            rollback(transaction).await;
            return Ended::Unavailable(format!("cannot clear the redelivery count: {error}"));
        }
    }
    if let Claim::Duplicate | Claim::Conflict { .. } = claim {
        return end_unclaimed(transaction, claim, key, &fingerprint, crash_counted).await;
    }
    let handled = {
        let mut tx = Tx::<DB>::new(&mut transaction, consumer, key, delivery.metadata);
        AssertUnwindSafe(handler.handle(&mut tx, message))
            .catch_unwind()
            .await
    };
    end_handled(transaction, handled).await
}

/// The key was applied before: the handler does not run. The transaction commits only to clear
/// a crash-loop count (the message got through after all); otherwise it rolls back.
async fn end_unclaimed<DB: Backend>(
    transaction: sqlx::Transaction<'static, DB>,
    claim: Claim,
    key: &Key,
    fingerprint: &[u8],
    crash_counted: bool,
) -> Ended {
    let committed = if crash_counted {
        transaction
            .commit()
            .await
            .map_err(|error| error.to_string())
    } else {
        rollback(transaction).await;
        Ok(())
    };
    if let Err(error) = committed {
        return Ended::Unavailable(format!("cannot clear the redelivery count: {error}"));
    }
    match claim {
        Claim::Conflict { stored } => Ended::Conflict(format!(
            "key {key} was already applied with a different payload (ledger fingerprint {}, this message {}); the first effect stands",
            hex(&stored),
            hex(fingerprint)
        )),
        _ => Ended::Duplicate,
    }
}

/// Commits after a handler that succeeded; rolls back after one that failed or panicked.
async fn end_handled<DB: Backend>(
    transaction: sqlx::Transaction<'static, DB>,
    handled: std::thread::Result<Result<(), crate::handler::HandlerError>>,
) -> Ended {
    match handled {
        Ok(Ok(())) => match transaction.commit().await {
            Ok(()) => Ended::Applied,
            // The commit may or may not have landed; the next run will find the claim if it did.
            Err(error) => Ended::Unavailable(format!("commit failed, outcome unknown: {error}")),
        },
        Ok(Err(error)) => {
            rollback(transaction).await;
            let text = error.to_string();
            if error.explicit_class().is_none() && is_unavailable(error.source_error()) {
                Ended::Unavailable(format!(
                    "the database connection failed in the handler: {text}"
                ))
            } else {
                Ended::Failed {
                    class: error.class(),
                    error: text,
                }
            }
        }
        Err(panic) => {
            rollback(transaction).await;
            // A panic is a bug or a broken assumption, not a verdict on the message: retry it,
            // and let the retry policy dead-letter it if it keeps panicking.
            Ended::Failed {
                class: ErrorClass::Transient,
                error: format!("the handler panicked: {}", panic_text(&*panic)),
            }
        }
    }
}

async fn rollback<DB: Backend>(transaction: sqlx::Transaction<'static, DB>) {
    // A failed rollback means the connection is gone, and the server discards the transaction
    // with it: nothing to do but note it.
    if let Err(error) = transaction.rollback().await {
        tracing::debug!(%error, "rollback failed; the connection is discarded");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + "…"
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-text panic payload)")
}
