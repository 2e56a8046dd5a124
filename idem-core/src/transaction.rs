//! The transaction of one unit of work: BEGIN → claim → handler → check → COMMIT, and how each
//! way it can end is told apart.
//!
//! The handler is hostile by assumption. It may ignore a failed statement (PostgreSQL then
//! aborts the transaction and answers COMMIT with ROLLBACK, no error), end the transaction
//! itself through `tx.conn()` (after which its statements autocommit), panic, or fail in a way
//! that looks like a lost database. None of that may ever make idem call a delivery applied
//! whose claim did not commit with its effect.

use crate::backend::{Backend, Claim, TxState, Unit};
use crate::classify::{cause_in, cause_of, class_of_sqlx, Cause};
use crate::delivery::Delivery;
use crate::handler::{ErrorClass, Handler, HandlerError};
use crate::key::Key;
use crate::policy::Isolation;
use crate::tx::Tx;
use futures_util::FutureExt;
use sqlx::Pool;
use std::panic::AssertUnwindSafe;

/// The claim lost a race with another transaction (a serialization failure under REPEATABLE
/// READ or SERIALIZABLE, a deadlock, a lock or statement timeout) before the handler ran:
/// nothing was done, and the message is handed back to be claimed again in a new transaction.
pub(crate) struct Contended<M> {
    pub(crate) error: String,
    pub(crate) message: M,
}

/// How the transaction ended, before the retry policy has its say.
pub(crate) enum Ended {
    Applied,
    Duplicate,
    Conflict(String),
    Unavailable(String),
    Failed { class: ErrorClass, error: String },
}

pub(crate) async fn run_transaction<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    key: &Key,
    message: H::Message,
    fingerprint: &[u8],
    delivery: Delivery<'_>,
    isolation: Isolation,
) -> Result<Ended, Contended<H::Message>> {
    let consumer = handler.consumer();
    // A redelivered message carries a crash-loop count (process.rs) until a terminal outcome.
    let crash_counted = delivery.metadata.redelivered && delivery.metadata.delivery_count.is_none();
    let mut transaction = match DB::begin(pool, isolation).await {
        Ok(transaction) => transaction,
        Err(error) => {
            return Ok(Ended::Unavailable(format!(
                "cannot begin a transaction: {error}"
            )));
        }
    };
    // Errors in idem's own statements are never the message's fault. A claim that lost a race
    // (another copy of this message committed first, under an isolation level that reports
    // that as an error) is claimed again; anything else means the database is away, or not
    // what idem expects: wait for it rather than blame the message.
    let claim = match DB::claim(
        &mut transaction,
        consumer,
        key.as_str(),
        fingerprint,
        delivery.metadata,
    )
    .await
    {
        Ok(claim) => claim,
        Err(error) => {
            rollback(transaction).await;
            let raced = cause_of(&error) == Cause::Statement
                && class_of_sqlx(&error) == ErrorClass::Transient;
            if raced {
                return Err(Contended {
                    error: error.to_string(),
                    message,
                });
            }
            return Ok(Ended::Unavailable(format!(
                "cannot claim the key in the ledger: {error}"
            )));
        }
    };
    if crash_counted {
        // In this transaction: if it commits, the message got through and the count goes with it.
        if let Err(error) = DB::forget_redeliveries(&mut transaction, consumer, key.as_str()).await
        {
            rollback(transaction).await;
            return Ok(Ended::Unavailable(format!(
                "cannot clear the redelivery count: {error}"
            )));
        }
    }
    let txid = match claim {
        Claim::Claimed { txid } => txid,
        unclaimed => {
            return Ok(end_unclaimed(transaction, unclaimed, key, fingerprint, crash_counted).await)
        }
    };
    let handled = {
        let mut tx = Tx::<DB>::new(&mut transaction, consumer, key, delivery.metadata);
        AssertUnwindSafe(handler.handle(&mut tx, message))
            .catch_unwind()
            .await
    };
    Ok(match handled {
        Ok(Ok(())) => commit(transaction, txid, consumer, key).await,
        Ok(Err(error)) => end_failed(transaction, error).await,
        Err(panic) => {
            rollback(transaction).await;
            // A panic is a bug or a broken assumption, not a verdict on the message: retry it,
            // and let the retry policy dead-letter it if it keeps panicking.
            Ended::Failed {
                class: ErrorClass::Transient,
                error: format!("the handler panicked: {}", panic_text(&*panic)),
            }
        }
    })
}

/// The key was applied before: the handler does not run. The transaction commits only to clear
/// a crash-loop count (the message got through after all); otherwise it rolls back.
async fn end_unclaimed<DB: Backend>(
    mut transaction: Unit<DB>,
    claim: Claim,
    key: &Key,
    fingerprint: &[u8],
    crash_counted: bool,
) -> Ended {
    let committed = if crash_counted {
        let committed = DB::commit(&mut transaction)
            .await
            .map_err(|error| error.to_string());
        if committed.is_err() {
            rollback(transaction).await;
        }
        committed
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

/// The handler returned `Ok`: check that the transaction is still the one that claimed the key
/// and can commit, then COMMIT. Only a COMMIT whose answer was lost is "outcome unknown"; a
/// COMMIT the server refused (a deferred constraint, a serialization failure) rolled back for
/// sure, and its error's class decides.
async fn commit<DB: Backend>(
    mut transaction: Unit<DB>,
    txid: i64,
    consumer: &str,
    key: &Key,
) -> Ended {
    let checked = DB::commit_checked(&mut transaction, txid, consumer, key.as_str()).await;
    if !matches!(checked, Ok(TxState::Committed)) {
        rollback(transaction).await;
    }
    match checked {
        Ok(TxState::Committed) => Ended::Applied,
        Ok(TxState::Aborted) => Ended::Failed {
            class: ErrorClass::Transient,
            error: "a statement inside the handler failed and the handler went on as if it had not (say, `let _ = query.execute(tx.conn()).await`): PostgreSQL aborted the transaction, so nothing of it was applied. Return the error with `?`, or run a statement that may fail inside a SAVEPOINT".into(),
        },
        Ok(TxState::Ended) => Ended::Failed {
            class: ErrorClass::Permanent,
            error: "the handler ended idem's transaction itself (COMMIT, ROLLBACK or BEGIN through tx.conn()): what it ran after that was committed on its own and cannot be undone by idem, and the ledger claim did not commit with the effect, so the message is not recorded as applied. A handler must never end the transaction: return Ok to commit, an error to roll back".into(),
        },
        // The COMMIT may or may not have landed; the next run finds the claim if it did.
        Err(error) if cause_of(&error) == Cause::Connection => {
            Ended::Unavailable(format!("COMMIT failed, outcome unknown: {error}"))
        }
        Err(error) if cause_of(&error) == Cause::ServerUnavailable => Ended::Unavailable(format!(
            "the database refused the COMMIT, nothing was applied: {error}"
        )),
        Err(error) => Ended::Failed {
            class: class_of_sqlx(&error),
            error: format!("COMMIT failed, nothing was applied: {error}"),
        },
    }
}

/// The handler returned an error: roll back, then tell "the database is away" (not an attempt)
/// from the handler's own failure. A connection-level error on a connection that still rolls
/// back was the statement's fault (say, more bind parameters than the protocol carries).
pub(crate) async fn end_failed<DB: Backend>(transaction: Unit<DB>, error: HandlerError) -> Ended {
    let alive = rollback(transaction).await;
    let text = error.to_string();
    if error.explicit_class().is_none() {
        match cause_in(error.source_error()) {
            Cause::ServerUnavailable => {
                return Ended::Unavailable(format!(
                    "the database cannot serve the handler now: {text}"
                ))
            }
            Cause::Connection if !alive => {
                return Ended::Unavailable(format!(
                    "the database connection failed in the handler: {text}"
                ))
            }
            _ => {}
        }
    }
    Ended::Failed {
        class: error.class(),
        error: text,
    }
}

/// Rolls back; `false` when the connection did not answer (then the server discards the
/// transaction with the connection).
pub(crate) async fn rollback<DB: Backend>(mut transaction: Unit<DB>) -> bool {
    match DB::rollback(&mut transaction).await {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(%error, "rollback failed; the connection is discarded");
            false
        }
    }
}

/// The first bytes of a fingerprint, for error texts.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + "…"
}

pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-text panic payload)")
}
