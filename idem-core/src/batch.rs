//! Batch handlers: one call with every claimed message of a group, for set-based SQL.
//!
//! A group runs as with group commit (one transaction, one set-based claim, one COMMIT), but the
//! handler gets the claimed messages together. When it fails, idem cannot tell which message
//! was to blame, so it splits the group in halves and runs each half as its own transaction:
//! the halves without the poison message commit, the one with it splits again, until the
//! message is alone and takes the per-message path — its retry or dead letter exactly as in
//! per-message mode. A bad message among 100 costs about 2·log2(100) ≈ 14 extra transactions.

use crate::backend::{Backend, Claim, Unit};
use crate::classify::contention_in;
use crate::delivery::{Delivery, Metadata};
use crate::group::{begin_and_claim, claims_of, commit_group, ClaimFailed, GroupEnd, Member};
use crate::handler::{Handler, HandlerError};
use crate::key::Key;
use crate::message::{Message, Publish};
use crate::outbox::{PublishError, Route};
use crate::outcome::{Outcome, Processed};
use crate::policy::Policy;
use crate::process::{decode, verdict};
use crate::transaction::{end_failed, panic_text, rollback, Ended};
use crate::tx::Tx;
use futures_util::FutureExt;
use sqlx::Pool;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use uuid::Uuid;

/// A handler of whole batches: the claimed (first-time) messages of a group in one call, in one
/// transaction, for set-based SQL (`INSERT … SELECT * FROM UNNEST($1, $2)`).
///
/// `#[idem::handler(consumer = "…", batch)]` writes this impl (and [`Handler`]) for an
/// `async fn f(tx: &mut BatchTx<'_, DB>, msgs: Vec<M>)`; by hand, implement it and give the
/// consumer [`Batch`]`(your_handler)`.
///
/// Returning an error rolls back the whole batch; idem then finds the message to blame by
/// splitting the batch ([the module docs](crate::BatchHandler) say what that costs). So the
/// handler must treat its messages independently: the same message must succeed or fail
/// whatever else is in the batch. Groups that run side by side (several consumers, several
/// groups in flight) must lock shared rows in one order — lock them first with
/// `SELECT … WHERE id = ANY($1) ORDER BY id FOR UPDATE` — or they deadlock; a deadlock costs
/// the batch one re-run, then it is split.
///
/// ```
/// use idem_core::{async_trait, Batch, BatchHandler, BatchTx, HandlerError};
/// # #[derive(Debug, serde::Deserialize)] struct Ping { id: i64 }
/// # impl idem_core::Message for Ping {
/// #     const KIND: &'static str = "Ping";
/// #     fn decode(b: &[u8]) -> Result<Self, idem_core::DecodeError> { serde_json::from_slice(b).map_err(|e| idem_core::DecodeError::malformed(e.to_string())) }
/// #     fn key(&self) -> Result<Option<idem_core::Key>, idem_core::KeyError> { Ok(None) }
/// # }
/// struct RecordPings;
///
/// #[async_trait]
/// impl BatchHandler<sqlx::Postgres> for RecordPings {
///     type Message = Ping;
///     fn consumer(&self) -> &str { "pings" }
///     async fn handle_batch(&self, tx: &mut BatchTx<'_, sqlx::Postgres>, pings: Vec<Ping>) -> Result<(), HandlerError> {
///         let ids: Vec<i64> = pings.iter().map(|p| p.id).collect();
///         sqlx::query("INSERT INTO pings (id) SELECT * FROM UNNEST($1::bigint[])")
///             .bind(&ids)
///             .execute(tx.conn())
///             .await?;
///         Ok(())
///     }
/// }
/// // The consumer takes it as a handler: `Consumer::builder(pool, Batch(RecordPings))`.
/// # fn handler() -> impl idem_core::Handler<sqlx::Postgres> { Batch(RecordPings) }
/// ```
#[async_trait::async_trait]
pub trait BatchHandler<DB: Backend>: Send + Sync + 'static {
    /// The message this handler consumes.
    type Message: Message;

    /// The consumer name: the ledger's scope, as [`Handler::consumer`].
    fn consumer(&self) -> &str;

    /// Applies the effect of every message in `messages` through `tx`; messages whose key the
    /// ledger already holds are not among them. `messages` come in the group's lock order
    /// ([`process_group`](crate::process_group)), else in delivery order.
    async fn handle_batch(
        &self,
        tx: &mut BatchTx<'_, DB>,
        messages: Vec<Self::Message>,
    ) -> Result<(), HandlerError>;
}

/// A [`BatchHandler`] as a [`Handler`]: what a consumer takes. A message that runs alone (a
/// redelivery, one left over from a failed batch, group commit off) is a batch of one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Batch<H>(pub H);

#[async_trait::async_trait]
impl<DB: Backend, H: BatchHandler<DB>> Handler<DB> for Batch<H> {
    type Message = H::Message;

    fn consumer(&self) -> &str {
        self.0.consumer()
    }

    async fn handle(
        &self,
        tx: &mut Tx<'_, DB>,
        message: Self::Message,
    ) -> Result<(), HandlerError> {
        handle_one(&self.0, tx, message).await
    }

    fn batch(&self) -> Option<&dyn BatchHandler<DB, Message = Self::Message>> {
        Some(&self.0)
    }
}

/// One message through a batch handler, as a batch of one: [`Batch`]'s `handle`, and what
/// `#[idem::handler(…, batch)]` generates.
pub async fn handle_one<DB: Backend, H: BatchHandler<DB> + ?Sized>(
    handler: &H,
    tx: &mut Tx<'_, DB>,
    message: H::Message,
) -> Result<(), HandlerError> {
    let (conn, consumer, key, metadata, published) = tx.parts();
    let mut batch = BatchTx {
        conn,
        consumer,
        messages: vec![Entry {
            key,
            metadata,
            published: *published,
        }],
    };
    let handled = handler.handle_batch(&mut batch, vec![message]).await;
    *published = batch.messages[0].published;
    handled
}

/// A claimed message's part of a [`BatchTx`].
struct Entry<'t> {
    key: &'t Key,
    metadata: &'t Metadata,
    /// Messages published for it so far: the ordinal in the next message id.
    published: u32,
}

/// A batch handler's door to the database: the open transaction in which idem has claimed the
/// key of every message the handler was given.
///
/// Like [`Tx`], it lends out the connection but never the transaction or the pool. What the
/// handler publishes belongs to one message of the batch ([`BatchTx::publish_for`]): its id
/// comes from that message's key, so it is the same whichever batch the message lands in.
pub struct BatchTx<'t, DB: Backend> {
    conn: &'t mut DB::Connection,
    consumer: &'t str,
    /// In the order of the handler's `Vec`.
    messages: Vec<Entry<'t>>,
}

impl<'t, DB: Backend> BatchTx<'t, DB> {
    /// The connection inside the transaction, for `sqlx::query(..).execute(tx.conn())`.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.conn
    }

    /// The consumer this handler runs as (the ledger's scope).
    pub fn consumer(&self) -> &str {
        self.consumer
    }

    /// How many messages the handler was given.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether the handler was given no message (never, from idem).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The idempotency key claimed for message `index` of the handler's `Vec`.
    pub fn key(&self, index: usize) -> Option<&Key> {
        self.messages.get(index).map(|entry| entry.key)
    }

    /// The transport metadata of message `index` of the handler's `Vec`.
    pub fn metadata(&self, index: usize) -> Option<&Metadata> {
        self.messages.get(index).map(|entry| entry.metadata)
    }

    /// Publishes `message` through the outbox on behalf of message `index` of the handler's
    /// `Vec`, to the queue named after its kind: as [`Tx::publish`] for that message alone (its
    /// id from that message's key and how many were published for it before, its correlation
    /// and trace context).
    ///
    /// # Errors
    ///
    /// [`PublishError`]: `index` is not in the batch, the message does not serialize, or the
    /// outbox row was not written.
    pub async fn publish_for<M: Publish>(
        &mut self,
        index: usize,
        message: &M,
    ) -> Result<Uuid, PublishError> {
        self.publish_to_for(index, Route::queue(M::KIND), message)
            .await
    }

    /// Publishes `message` along `route` on behalf of message `index`: [`Tx::publish_to`] for
    /// that message.
    ///
    /// # Errors
    ///
    /// As [`BatchTx::publish_for`].
    pub async fn publish_to_for<M: Publish>(
        &mut self,
        index: usize,
        route: Route,
        message: &M,
    ) -> Result<Uuid, PublishError> {
        let len = self.messages.len();
        let Some(entry) = self.messages.get_mut(index) else {
            return Err(PublishError::NotInBatch {
                kind: M::KIND,
                index,
                len,
            });
        };
        let mut tx = Tx::<DB>::new(&mut *self.conn, self.consumer, entry.key, entry.metadata)
            .resumed(entry.published);
        let published = tx.publish_to(route, message).await;
        entry.published = tx.published();
        published
    }
}

impl<DB: Backend> std::fmt::Debug for BatchTx<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchTx")
            .field("backend", &DB::NAME)
            .field("consumer", &self.consumer)
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

/// How one run of a batch ended.
enum BatchEnd {
    /// Committed: each member's ending, in member order.
    Committed(Vec<Ended>),
    /// The handler failed, panicked, or left the transaction unfit to commit: someone in the
    /// batch is to blame. Split it.
    Failed(String),
    /// The database refused a statement because of other transactions (a deadlock, a
    /// serialization failure, a lost claim race): nobody's fault. Run it again.
    Contended(String),
    /// The database is away: every member is held, as it would be alone.
    Unavailable(String),
}

/// Runs `members` through `batch`, splitting on failure. Settled members go into `processed`;
/// members that end up alone go into `alone`, for the per-message path.
pub(crate) async fn run_batches<DB: Backend, M: Message>(
    pool: &Pool<DB>,
    batch: &dyn BatchHandler<DB, Message = M>,
    members: Vec<Member<M>>,
    deliveries: &[Delivery<'_>],
    policy: &Policy,
    processed: &mut [Option<Processed>],
    alone: &mut Vec<usize>,
) {
    // (members, whether this set already met contention once)
    let mut sets = VecDeque::from([(members, false)]);
    while let Some((mut set, contended)) = sets.pop_front() {
        if set.len() <= 1 {
            alone.extend(set.iter().map(|m| m.at));
            continue;
        }
        match run_batch(pool, batch, &mut set, deliveries, policy).await {
            BatchEnd::Committed(endings) => {
                for (member, ended) in set.into_iter().zip(endings) {
                    let metadata = deliveries[member.at].metadata;
                    processed[member.at] = Some(Processed {
                        key: Some(member.key),
                        outcome: verdict(ended, metadata, policy),
                    });
                }
            }
            BatchEnd::Contended(why) if !contended => {
                crate::group::warn_contention(
                    "lock the rows a batch shares with others in one order before writing them (SELECT … WHERE id = ANY($1) ORDER BY id FOR UPDATE)",
                );
                // One re-run: the other transaction has usually ended by now.
                tracing::debug!(%why, members = set.len(), "a batch met another transaction; running it again");
                tokio::time::sleep(std::time::Duration::from_millis(
                    rand::random::<u64>() % 20 + 1,
                ))
                .await;
                sets.push_front((set, true));
            }
            BatchEnd::Contended(why) | BatchEnd::Failed(why) => {
                tracing::debug!(%why, members = set.len(), "a batch failed; splitting it to find the message to blame");
                let second = set.split_off(set.len() / 2);
                sets.push_front((second, contended));
                sets.push_front((set, contended));
            }
            BatchEnd::Unavailable(error) => {
                for member in set {
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
}

/// One run of a batch: BEGIN, the set-based claim, the handler with the claimed messages, COMMIT.
async fn run_batch<DB: Backend, M: Message>(
    pool: &Pool<DB>,
    batch: &dyn BatchHandler<DB, Message = M>,
    members: &mut [Member<M>],
    deliveries: &[Delivery<'_>],
    policy: &Policy,
) -> BatchEnd {
    let consumer = batch.consumer();
    let claims = claims_of(members, deliveries);
    let claimed = begin_and_claim(pool, consumer, &claims, policy).await;
    drop(claims);
    let (mut unit, answers) = match claimed {
        Ok(claimed) => claimed,
        Err(ClaimFailed::Raced(why)) => return BatchEnd::Contended(why),
        Err(ClaimFailed::Unavailable(why)) => return BatchEnd::Unavailable(why),
    };
    let mut endings = Vec::with_capacity(members.len());
    let mut claimed = Vec::new();
    let mut txid = None;
    for (position, answer) in answers.into_iter().enumerate() {
        let member = &members[position];
        match answer {
            Claim::Claimed { txid: id } => {
                txid.get_or_insert(id);
                claimed.push(position);
                endings.push(Ended::Applied);
            }
            Claim::Duplicate => endings.push(Ended::Duplicate),
            Claim::Conflict { stored } => endings.push(member.conflict(&stored)),
        }
    }
    let (Some(txid), Some(&first)) = (txid, claimed.first()) else {
        rollback(unit).await;
        return BatchEnd::Committed(endings);
    };
    let mut messages = Vec::with_capacity(claimed.len());
    for &position in &claimed {
        let member = &mut members[position];
        match member.message.take() {
            Some(message) => messages.push(message),
            // Decoded before, so decoding again gives the same; if not, split and let it show.
            None => match decode::<M>(consumer, deliveries[member.at], policy) {
                Ok((message, _, _)) => messages.push(message),
                Err((_, error)) => {
                    rollback(unit).await;
                    return BatchEnd::Failed(format!("decoding a message again failed: {error}"));
                }
            },
        }
    }
    let handled = {
        let mut tx = BatchTx::<DB> {
            conn: &mut unit,
            consumer,
            messages: claimed
                .iter()
                .map(|&position| Entry {
                    key: &members[position].key,
                    metadata: deliveries[members[position].at].metadata,
                    published: 0,
                })
                .collect(),
        };
        AssertUnwindSafe(batch.handle_batch(&mut tx, messages))
            .catch_unwind()
            .await
    };
    match handled {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return failed(unit, error).await,
        Err(panic) => {
            rollback(unit).await;
            return BatchEnd::Failed(format!(
                "the batch handler panicked: {}",
                panic_text(&*panic)
            ));
        }
    }
    let key = members[first].key.clone();
    match commit_group(unit, txid, consumer, &key, endings).await {
        GroupEnd::Committed(endings) => BatchEnd::Committed(endings),
        GroupEnd::Unavailable(error) => BatchEnd::Unavailable(error),
        // Refused, or the handler ended or spoiled the transaction: someone is to blame.
        GroupEnd::Unsettled(why) => BatchEnd::Failed(why),
        // (The COMMIT never names a culprit.)
        GroupEnd::Culprit(..) => BatchEnd::Failed("the batch's COMMIT failed".into()),
    }
}

/// The handler's error: contention, the database away, or the batch's own failure.
async fn failed<DB: Backend>(unit: Unit<DB>, error: HandlerError) -> BatchEnd {
    let contention = error.explicit_class().is_none() && contention_in(error.source_error());
    let text = error.to_string();
    match end_failed(unit, error).await {
        Ended::Unavailable(error) => BatchEnd::Unavailable(error),
        _ if contention => BatchEnd::Contended(text),
        _ => BatchEnd::Failed(text),
    }
}
