//! Group commit: several deliveries in one transaction, each with the guarantee it has alone.
//!
//! BEGIN → one set-based claim for the group → each claimed message's handler in turn → one
//! COMMIT. Optimistic: no savepoint per message. When a handler fails, the group is rolled
//! back, the failing message gets the verdict it would have had alone (its attempt counts: a
//! retry, or a dead letter), and the others run again as a group. A failure that may be the
//! group's doing — the database refusing a statement because of other transactions (a
//! deadlock, a serialization failure) — is not the message's: it runs again alone, through
//! [`process`]. What
//! cannot be pinned on one message (a COMMIT the database refused, a handler that ended or
//! aborted the transaction without saying so) sends every message of the group down the
//! per-message path. Redelivered messages, deliveries tried in place (the database was away)
//! and a second copy of a key inside the same group never join a group: they run alone, the
//! copies after the group committed, so they find their key in the ledger.

use crate::backend::{Backend, BatchClaim, Claim, TxState, Unit};
use crate::classify::{cause_of, class_of_sqlx, contention_in, Cause};
use crate::delivery::Delivery;
use crate::handler::{ErrorClass, Handler};
use crate::key::Key;
use crate::outcome::{Outcome, Processed};
use crate::policy::Policy;
use crate::process::{decode, process, verdict};
use crate::transaction::{end_failed, hex, panic_text, rollback, Ended};
use crate::tx::Tx;
use futures_util::FutureExt;
use sqlx::Pool;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;

/// A message of the group: its place in the deliveries, what decoding it gave.
pub(crate) struct Member<M> {
    pub(crate) at: usize,
    pub(crate) key: Key,
    pub(crate) fingerprint: [u8; 32],
    /// Taken by the handler; decoded again when the group runs again.
    pub(crate) message: Option<M>,
}

impl<M> Member<M> {
    /// Its key is in the ledger with another payload's fingerprint.
    pub(crate) fn conflict(&self, stored: &[u8]) -> Ended {
        Ended::Conflict(format!(
            "key {} was already applied with a different payload (ledger fingerprint {}, this message {}); the first effect stands",
            self.key,
            hex(stored),
            hex(&self.fingerprint)
        ))
    }
}

/// Why BEGIN and the set-based claim did not give an open transaction with its claims.
pub(crate) enum ClaimFailed {
    /// The claim lost a race with another transaction (a copy of a message committing first).
    Raced(String),
    /// The database is away.
    Unavailable(String),
}

/// Each member's part of the set-based claim, in member order.
pub(crate) fn claims_of<'a, M>(
    members: &'a [Member<M>],
    deliveries: &[Delivery<'a>],
) -> Vec<BatchClaim<'a>> {
    members
        .iter()
        .map(|m| BatchClaim {
            key: m.key.as_str(),
            payload_hash: &m.fingerprint,
            origin: deliveries[m.at].metadata,
        })
        .collect()
}

/// BEGIN and one set-based claim of every key in `claims` ([`claims_of`]): the open
/// transaction and each one's answer, in order.
pub(crate) async fn begin_and_claim<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &str,
    claims: &[BatchClaim<'_>],
    policy: &Policy,
) -> Result<(Unit<DB>, Vec<Claim>), ClaimFailed> {
    let mut unit = DB::begin(pool, policy.isolation).await.map_err(|error| {
        ClaimFailed::Unavailable(format!("cannot begin a transaction: {error}"))
    })?;
    match DB::claim_batch(&mut unit, consumer, claims).await {
        Ok(answers) => Ok((unit, answers)),
        Err(error) => {
            rollback(unit).await;
            let raced = cause_of(&error) == Cause::Statement
                && class_of_sqlx(&error) == ErrorClass::Transient;
            Err(if raced {
                ClaimFailed::Raced(format!("the claim raced another transaction: {error}"))
            } else {
                ClaimFailed::Unavailable(format!("cannot claim the keys in the ledger: {error}"))
            })
        }
    }
}

/// How one run of the group ended.
pub(crate) enum GroupEnd {
    /// Committed: each member's ending, in member order.
    Committed(Vec<Ended>),
    /// The member at this position failed; the group rolled back. `Some`: how its attempt
    /// ended, exactly as it would alone; `None`: the failure may be the group's doing (it met
    /// the other transactions: a deadlock, a serialization failure), so it runs again alone.
    Culprit(usize, Option<Ended>),
    /// Rolled back for a reason no one member can be blamed for: each runs alone.
    Unsettled(String),
    /// The database is away: every member is held, as it would be alone.
    Unavailable(String),
}

/// Names the rows a message writes, for the order of a group's handlers ([`process_group`]).
pub type LockOrder<'a, M> = dyn Fn(&M) -> String + Send + Sync + 'a;

/// Runs `deliveries` through `handler` with one transaction for all of them where it can, and
/// returns each delivery's [`Processed`] in the order given.
///
/// `lock_order` names the rows a message writes (say, its account id): a group's handlers run
/// in ascending order of it (stable: one key keeps delivery order). Groups that run side by
/// side and write the same rows must lock them in one order, or they deadlock; without it,
/// handlers run in delivery order. A handler that handles whole batches ([`Handler::batch`],
/// [`BatchHandler`](crate::BatchHandler)) gets every claimed message of the group in one call,
/// in that order; when it fails, the group is split in halves until the message to blame is
/// alone. Every delivery gets the outcome it
/// would get from [`process`] on its own — applied, duplicate, dead-lettered with the same
/// reason, retried, held — and a failing message never takes another's effect with it.
pub async fn process_group<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    deliveries: &[Delivery<'_>],
    policy: &Policy,
    lock_order: Option<&LockOrder<'_, H::Message>>,
) -> Vec<Processed> {
    let consumer = handler.consumer();
    let mut processed: Vec<Option<Processed>> = vec![None; deliveries.len()];
    let mut alone = Vec::new();
    let mut after = Vec::new();
    let mut members = Vec::new();
    let mut keys = HashSet::new();
    for (at, delivery) in deliveries.iter().enumerate() {
        if delivery.metadata.redelivered || delivery.tries_in_place > 0 {
            alone.push(at);
            continue;
        }
        match decode::<H::Message>(consumer, *delivery, policy) {
            Err((reason, error)) => {
                processed[at] = Some(Processed {
                    key: None,
                    outcome: Outcome::DeadLetter { reason, error },
                });
            }
            Ok((message, key, fingerprint)) => {
                if !keys.insert(key.as_str().to_owned()) {
                    after.push(at);
                    continue;
                }
                members.push(Member {
                    at,
                    key,
                    fingerprint,
                    message: Some(message),
                });
            }
        }
    }
    if let Some(lock_key) = lock_order {
        // Stable: messages with one lock key keep their delivery order.
        members.sort_by_cached_key(|m| m.message.as_ref().map(lock_key).unwrap_or_default());
    }
    if let Some(batch) = handler.batch() {
        let members = std::mem::take(&mut members);
        crate::batch::run_batches(
            pool,
            batch,
            members,
            deliveries,
            policy,
            &mut processed,
            &mut alone,
        )
        .await;
    }
    let ordered = lock_order.is_some();
    while members.len() > 1 {
        match run_group(pool, handler, &mut members, deliveries, policy, ordered).await {
            GroupEnd::Committed(endings) => {
                for (member, ended) in members.drain(..).zip(endings) {
                    let metadata = deliveries[member.at].metadata;
                    processed[member.at] = Some(Processed {
                        key: Some(member.key),
                        outcome: verdict(ended, metadata, policy),
                    });
                }
            }
            GroupEnd::Culprit(position, ended) => {
                let culprit = members.remove(position);
                match ended {
                    Some(ended) => {
                        let metadata = deliveries[culprit.at].metadata;
                        processed[culprit.at] = Some(Processed {
                            key: Some(culprit.key),
                            outcome: verdict(ended, metadata, policy),
                        });
                    }
                    None => alone.push(culprit.at),
                }
            }
            GroupEnd::Unsettled(why) => {
                tracing::debug!(%why, members = members.len(), "group rolled back; each message runs alone");
                alone.extend(members.drain(..).map(|m| m.at));
            }
            GroupEnd::Unavailable(error) => {
                for member in members.drain(..) {
                    processed[member.at] = Some(Processed {
                        key: Some(member.key),
                        outcome: Outcome::Unavailable {
                            error: error.clone(),
                        },
                    });
                }
            }
        }
    }
    // One member left is one message: the per-message path.
    alone.extend(members.drain(..).map(|m| m.at));
    alone.sort_unstable();
    for at in alone.into_iter().chain(after) {
        processed[at] = Some(process(pool, handler, deliveries[at], policy).await);
    }
    processed
        .into_iter()
        .map(|done| {
            done.unwrap_or_else(|| Processed {
                key: None,
                outcome: Outcome::Unavailable {
                    error: "not processed (a bug in idem's group commit)".into(),
                },
            })
        })
        .collect()
}

/// Says, at most once a minute, that groups in flight side by side met on the same rows (a
/// deadlock, a serialization failure): each costs a re-run, and `fix` says how to avoid it.
pub(crate) fn warn_contention(fix: &str) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(60)) {
        return;
    }
    *last = Some(std::time::Instant::now());
    tracing::warn!(
        fix,
        "groups in flight side by side deadlocked or failed to serialize on the same rows; each time costs a re-run (PostgreSQL breaks a deadlock after deadlock_timeout, 1 s by default)"
    );
}

/// One run of the group: BEGIN, the set-based claim, each claimed member's handler, COMMIT.
async fn run_group<DB: Backend, H: Handler<DB>>(
    pool: &Pool<DB>,
    handler: &H,
    members: &mut [Member<H::Message>],
    deliveries: &[Delivery<'_>],
    policy: &Policy,
    ordered: bool,
) -> GroupEnd {
    let consumer = handler.consumer();
    let claims = claims_of(members, deliveries);
    let claimed = begin_and_claim(pool, consumer, &claims, policy).await;
    drop(claims);
    let (mut unit, answers) = match claimed {
        Ok(claimed) => claimed,
        // A lost race (another copy's transaction committed first) is settled by the
        // per-message path, which claims again.
        Err(ClaimFailed::Raced(why)) => return GroupEnd::Unsettled(why),
        Err(ClaimFailed::Unavailable(why)) => return GroupEnd::Unavailable(why),
    };
    let mut endings = Vec::with_capacity(members.len());
    let mut claimed: Option<(i64, usize)> = None;
    for (position, answer) in answers.into_iter().enumerate() {
        let member = &mut members[position];
        let txid = match answer {
            Claim::Claimed { txid } => txid,
            Claim::Duplicate => {
                endings.push(Ended::Duplicate);
                continue;
            }
            Claim::Conflict { stored } => {
                endings.push(member.conflict(&stored));
                continue;
            }
        };
        claimed.get_or_insert((txid, position));
        let delivery = deliveries[member.at];
        let message = match member.message.take() {
            Some(message) => message,
            // Decoded before, so decoding again gives the same; if it does not, it is this
            // message's trouble.
            None => match decode::<H::Message>(consumer, delivery, policy) {
                Ok((message, _, _)) => message,
                Err(_) => {
                    rollback(unit).await;
                    return GroupEnd::Culprit(position, None);
                }
            },
        };
        let handled = {
            let mut tx = Tx::<DB>::new(&mut unit, consumer, &member.key, delivery.metadata);
            AssertUnwindSafe(handler.handle(&mut tx, message))
                .catch_unwind()
                .await
        };
        match handled {
            Ok(Ok(())) => endings.push(Ended::Applied),
            Ok(Err(error)) => {
                // The database refused it because of other transactions, or because an earlier
                // handler of this group left the transaction aborted: not this message's doing.
                let contention =
                    error.explicit_class().is_none() && contention_in(error.source_error());
                return match end_failed(unit, error).await {
                    Ended::Unavailable(error) => GroupEnd::Unavailable(error),
                    _ if contention => {
                        warn_contention(if ordered {
                            "a handler writes several shared rows: lock them in one order inside it (SELECT … ORDER BY … FOR UPDATE)"
                        } else {
                            "name the rows a message writes with ConsumerBuilder::group_lock_order, so that every group takes them in one order"
                        });
                        GroupEnd::Culprit(position, None)
                    }
                    // Its own failure: the attempt counts, as it would alone.
                    ended => GroupEnd::Culprit(position, Some(ended)),
                };
            }
            Err(panic) => {
                rollback(unit).await;
                // Perhaps over a transaction an earlier handler of the group left aborted: it
                // runs again alone, where a panic of its own is retried as usual.
                tracing::debug!(panic = panic_text(&*panic), "a handler panicked in a group");
                return GroupEnd::Culprit(position, None);
            }
        }
    }
    let Some((txid, first)) = claimed else {
        // Nothing claimed: nothing to commit.
        rollback(unit).await;
        return GroupEnd::Committed(endings);
    };
    commit_group(unit, txid, consumer, &members[first].key, endings).await
}

/// The group's COMMIT, after the check that the transaction is still the one that claimed.
pub(crate) async fn commit_group<DB: Backend>(
    mut unit: Unit<DB>,
    txid: i64,
    consumer: &str,
    key: &Key,
    endings: Vec<Ended>,
) -> GroupEnd {
    let checked = DB::commit_checked(&mut unit, txid, consumer, key.as_str()).await;
    if !matches!(checked, Ok(TxState::Committed)) {
        rollback(unit).await;
    }
    match checked {
        Ok(TxState::Committed) => GroupEnd::Committed(endings),
        Ok(TxState::Aborted) => GroupEnd::Unsettled(
            "a handler went on after a failed statement and PostgreSQL aborted the group's transaction".into(),
        ),
        Ok(TxState::Ended) => GroupEnd::Unsettled(
            "a handler ended the group's transaction itself".into(),
        ),
        // Landed or not: each message, tried again in place, finds its claim if it did.
        Err(error) if cause_of(&error) == Cause::Connection => {
            GroupEnd::Unavailable(format!("COMMIT failed, outcome unknown: {error}"))
        }
        Err(error) if cause_of(&error) == Cause::ServerUnavailable => GroupEnd::Unavailable(
            format!("the database refused the COMMIT, nothing was applied: {error}"),
        ),
        // Refused (a deferred constraint, a serialization failure): whose fault is not known.
        Err(error) => GroupEnd::Unsettled(format!("the group's COMMIT failed: {error}")),
    }
}
