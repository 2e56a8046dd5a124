//! The unit of work: decode → BEGIN → claim → handle → COMMIT. The one place that owns the order.
//!
//! The transport adapter acts on the returned [`Outcome`] (ack, dead-letter, deliver again); it
//! never opens, commits or rolls back a transaction itself.

use crate::backend::Backend;
use crate::envelope::{Delivery, Metadata};
use crate::handler::Handler;
use crate::key::{Key, KeyError};
use crate::message::{DecodeErrorKind, Message};
use crate::tx::Tx;
use futures_util::FutureExt;
use sha2::{Digest, Sha256};
use sqlx::Pool;
use std::panic::AssertUnwindSafe;

/// Why a message was dead-lettered; the `x-idem-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The body did not decode into the message type.
    Malformed,
    /// The message has no usable idempotency key.
    MissingKey,
    /// The handler returned an error (or panicked); everything was rolled back.
    Rejected,
}

impl Reason {
    /// The header value: `malformed`, `missing-key`, `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::MissingKey => "missing-key",
            Self::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one delivery, and so what the adapter must do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Ledger claim and effect committed together: acknowledge.
    Applied,
    /// The key was already in the ledger: the handler did not run; acknowledge.
    Duplicate,
    /// Nothing was applied and trying again cannot help: publish to the dead-letter queue, then
    /// acknowledge.
    DeadLetter {
        /// The `x-idem-reason`.
        reason: Reason,
        /// What went wrong, for the `x-idem-error` header.
        error: String,
    },
    /// Nothing is known to be applied and the cause is outside the message (database
    /// unreachable, commit outcome unknown): deliver it again later. The ledger makes a retry of
    /// something that did commit a no-op.
    Retry {
        /// What went wrong.
        error: String,
    },
}

/// The result of [`process`]: the outcome and, when the message got that far, its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// The idempotency key, once decoded.
    pub key: Option<Key>,
    /// What to do with the delivery.
    pub outcome: Outcome,
}

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
/// decode → BEGIN → claim `(consumer, key)` → handler → COMMIT. A key already claimed rolls back
/// without running the handler; a handler error or panic rolls back everything, the claim
/// included. The caller acknowledges only after this returns [`Outcome::Applied`] or
/// [`Outcome::Duplicate`] (or after the dead letter is confirmed).
pub async fn process<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    delivery: Delivery<'_>,
) -> Processed {
    let message = match H::Message::decode(delivery.body) {
        Ok(message) => message,
        Err(error) => {
            let reason = match error.kind {
                DecodeErrorKind::Malformed => Reason::Malformed,
                DecodeErrorKind::MissingKey => Reason::MissingKey,
            };
            return Processed {
                key: None,
                outcome: Outcome::DeadLetter {
                    reason,
                    error: error.detail,
                },
            };
        }
    };
    let key = match key_of(&message, delivery.metadata) {
        Ok(key) => key,
        Err(error) => {
            let outcome = Outcome::DeadLetter {
                reason: Reason::MissingKey,
                error: error.to_string(),
            };
            return Processed { key: None, outcome };
        }
    };
    tracing::Span::current().record("key", key.as_str());
    let outcome = run_transaction(pool, handler, &key, message, delivery).await;
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

async fn run_transaction<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    key: &Key,
    message: H::Message,
    delivery: Delivery<'_>,
) -> Outcome {
    let consumer = handler.consumer();
    let mut transaction = match DB::begin(pool).await {
        Ok(transaction) => transaction,
        Err(error) => {
            return Outcome::Retry {
                error: format!("cannot begin a transaction: {error}"),
            }
        }
    };
    let payload_hash = Sha256::digest(delivery.body);
    match DB::claim(&mut transaction, consumer, key.as_str(), &payload_hash).await {
        Ok(true) => {}
        Ok(false) => {
            rollback(transaction).await;
            return Outcome::Duplicate;
        }
        Err(error) => {
            rollback(transaction).await;
            return Outcome::Retry {
                error: format!("cannot claim the key in the ledger: {error}"),
            };
        }
    }
    let handled = {
        let mut tx = Tx::<DB>::new(&mut transaction, consumer, key, delivery.metadata);
        AssertUnwindSafe(handler.handle(&mut tx, message))
            .catch_unwind()
            .await
    };
    match handled {
        Ok(Ok(())) => match transaction.commit().await {
            Ok(()) => Outcome::Applied,
            // The commit may or may not have landed; redelivery will find the claim if it did.
            Err(error) => Outcome::Retry {
                error: format!("commit failed, outcome unknown: {error}"),
            },
        },
        Ok(Err(error)) => {
            rollback(transaction).await;
            if is_connection_failure(error.source_error()) {
                Outcome::Retry {
                    error: format!("the database connection failed in the handler: {error}"),
                }
            } else {
                Outcome::DeadLetter {
                    reason: Reason::Rejected,
                    error: error.to_string(),
                }
            }
        }
        Err(panic) => {
            rollback(transaction).await;
            Outcome::DeadLetter {
                reason: Reason::Rejected,
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

/// Errors that say the database is away, not that this message is bad.
fn is_connection_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        error.downcast_ref::<sqlx::Error>(),
        Some(
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_)
        )
    )
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-text panic payload)")
}
