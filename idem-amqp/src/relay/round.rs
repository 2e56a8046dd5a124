//! The relay's rounds — lease, take a batch of due rows, publish it ([`super::batch`]), settle
//! it — pipelined where the database allows, and the relay's other uses of the outbox table
//! (wake-ups, purge, lease hand-over). With [`super::batch`], the only files of the relay that
//! touch idem-core's outbox plumbing.
//!
//! **Pipelined rounds** (PostgreSQL): a round's confirms take the broker a few milliseconds,
//! and marking its rows takes the database as long; one after the other, each sits idle half
//! the time. So while one batch's confirms come in and its rows are marked, the next batch is
//! taken (its rows locked; the take leaves the unsettled batch's rows out by id) and published
//! on the same channel, behind it: at most two batches are unsettled at once (`IN_FLIGHT`),
//! rows are still marked only after their confirm, and per destination the broker gets them in
//! id order. A relay killed anywhere in between leaves the unmarked rows due (their locks die
//! with its transactions) and publishes them again, same message ids, for the next consumer's
//! ledger.
//! A batch that has a row to publish alone (an exchange that has not answered on this channel,
//! a big body) waits for the one in flight and goes the one-round-at-a-time way of
//! [`batch::publish`]; so does every batch on SQLite, whose takes lock nothing.

use super::batch::{self, Outcome, Sending};
use super::link::{Link, Trouble};
use super::Relay;
use idem_core::outbox::relay::{LeasedPartitions, OnPublish, OutboxBatch, Settled};
use idem_core::Backend;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Batches unsettled at once at most, the one being taken included: each holds its rows' locks
/// in a transaction (a pool connection) until its confirms are in and its rows marked. Three
/// measured no steadily faster than two in relay_bench (README "The relay": +16 % in one
/// sitting, +5 % and nothing in two others), so not worth a pool connection more.
pub(super) const IN_FLIGHT: usize = 2;

/// Why a round of publishing stopped.
pub(super) enum RoundError {
    /// The broker connection or channel broke: reconnect.
    Broker(String),
    /// The database failed: wait and try again.
    Database(sqlx::Error),
}

/// A signal per commit that wrote outbox rows, where the database sends one (PostgreSQL
/// LISTEN/NOTIFY); `None`: poll.
pub(super) type Wakeups = Option<tokio::sync::mpsc::Receiver<()>>;

/// Resolves on the next wake-up; never when there are none (or no more).
pub(super) async fn wakeup(wakeups: &mut Wakeups) {
    match wakeups.as_mut() {
        Some(wakeups) => {
            if wakeups.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// A batch published whole, its confirms still coming: its rows stay locked (its transaction
/// open) until it lands.
struct Flight<DB: Backend> {
    batch: OutboxBatch<DB>,
    sending: Sending,
    sent_at: Instant,
    /// Every wait on the broker for this batch ends by then.
    deadline: tokio::time::Instant,
}

/// What the take beside a landing brought.
enum Next<DB: Backend> {
    /// Nothing taken (nothing due, or on SQLite another relay holds the lease).
    Nothing,
    /// A full or partial batch, published whole and in flight.
    Flying(Flight<DB>, usize),
    /// A batch with a row that must go alone: published once the flight has landed.
    Alone(OutboxBatch<DB>, usize),
}

/// Gives a batch's rows back unsettled (they stay due): its transaction ends now, its row locks
/// with it; a database that is gone has ended it already.
async fn abandon<DB: Backend>(batch: OutboxBatch<DB>) {
    if let Err(error) = DB::outbox_settle(batch, &[], OnPublish::Mark).await {
        tracing::debug!(%error, "relay could not end an abandoned batch's transaction");
    }
}

/// Whether this relay may take a batch now ([`Relay::lease`]).
enum Turn {
    /// Other relays hold the outbox (PostgreSQL: every partition; SQLite: the lease).
    StandBy,
    /// Take; on PostgreSQL with the publish lease, only rows of these partitions, held by the
    /// batch until it is settled.
    Take {
        partitions: Option<LeasedPartitions>,
    },
}

/// How a flight landed.
enum Landing {
    Done,
    /// The broker closed the channel over one of its publishes: reopen it.
    Refused,
}

impl<DB: Backend> Relay<DB> {
    /// Publishes what is due: rounds until one takes less than a full batch, the next batch
    /// taken and published while the last one's confirms come in and its rows are marked
    /// (see the module docs). Every wait on the broker is bounded by the link's timeout.
    pub(super) async fn drain(&self, link: &mut Link) -> Result<(), RoundError> {
        let mut flights: VecDeque<Flight<DB>> = VecDeque::new();
        let drained = self.rounds(link, &mut flights).await;
        if drained.is_err() {
            // Batches still in flight when the broker or the database was lost: their rows stay
            // due. Their locks are given back here, before the batches let go of their
            // partitions — not later, when the pool gets round to rolling back — so that a
            // relay taking over one of those partitions does not skip past them.
            while let Some(flight) = flights.pop_front() {
                abandon(flight.batch).await;
            }
        }
        drained
    }

    /// [`Relay::drain`]'s rounds; batches taken and not settled are left in `flights` when it
    /// fails.
    async fn rounds(
        &self,
        link: &mut Link,
        flights: &mut VecDeque<Flight<DB>>,
    ) -> Result<(), RoundError> {
        let mut more = true;
        while more || !flights.is_empty() {
            let shared: &Link = link;
            // Every batch not yet settled, the one about to land included: the take leaves
            // their rows out (and waits for any other row of its partitions that is locked).
            let in_flight = flights
                .iter()
                .flat_map(|flight| [flight.batch.rows.first(), flight.batch.rows.last()])
                .flatten()
                .map(|row| row.id)
                .fold(None, |span: Option<(i64, i64)>, id| {
                    Some(span.map_or((id, id), |(lo, hi)| (lo.min(id), hi.max(id))))
                });
            let take_next = async {
                if more {
                    self.take_and_send(shared, in_flight).await
                } else {
                    Ok(Next::Nothing)
                }
            };
            // With room for another batch, it is taken at once; otherwise (or with nothing
            // left to take) the oldest lands, and the next take goes beside it.
            let landing = if more && flights.len() + 1 < IN_FLIGHT {
                None
            } else {
                flights.pop_front()
            };
            let (landed, next) = match landing {
                Some(flight) => {
                    let (landed, next) = tokio::join!(self.land(shared, flight), take_next);
                    (Some(landed), next)
                }
                None => (None, take_next.await),
            };
            let next = next?;
            let landed = match landed.transpose() {
                Ok(landed) => landed,
                Err(error) => {
                    match next {
                        Next::Nothing => {}
                        Next::Flying(flight, _) => flights.push_back(flight),
                        Next::Alone(batch, _) => abandon(batch).await,
                    }
                    return Err(error);
                }
            };
            let refused = matches!(landed, Some(Landing::Refused));
            if refused {
                self.after_refusal(link, flights).await?;
            }
            more = false;
            match next {
                Next::Nothing => {}
                Next::Flying(next, taken) => {
                    more = taken == usize::from(self.batch_size);
                    flights.push_back(next);
                    if refused {
                        self.after_refusal(link, flights).await?;
                    }
                }
                Next::Alone(batch, taken) => {
                    more = taken == usize::from(self.batch_size);
                    // What is in flight lands first: a refusal among this batch's publishes
                    // closes the channel under any publish still waiting for its confirm.
                    while let Some(flight) = flights.pop_front() {
                        match self.land(link, flight).await {
                            Ok(Landing::Done) => {}
                            Ok(Landing::Refused) => self.after_refusal(link, flights).await?,
                            Err(error) => {
                                abandon(batch).await;
                                return Err(error);
                            }
                        }
                    }
                    self.publish_alone(link, batch).await?;
                }
            }
        }
        Ok(())
    }

    /// After the broker closed the channel over a publish: a new channel, and every batch
    /// still in flight landed — published on the closed channel, what got no answer stays due
    /// (its failed confirms are that closed channel, not a lost broker; a broker really lost
    /// shows on the next publish). The rounds after it publish to each exchange alone again.
    async fn after_refusal(
        &self,
        link: &mut Link,
        flights: &mut VecDeque<Flight<DB>>,
    ) -> Result<(), RoundError> {
        let deadline = tokio::time::Instant::now() + link.timeout;
        link.reopen(deadline).await.map_err(RoundError::Broker)?;
        while let Some(flight) = flights.pop_front() {
            if let Err(RoundError::Database(error)) = self.land(link, flight).await {
                return Err(RoundError::Database(error));
            }
        }
        Ok(())
    }

    /// Takes the next batch and, when it can go out whole beside a batch in flight (PostgreSQL,
    /// every exchange known, no big body), publishes it without waiting for the confirms.
    async fn take_and_send(
        &self,
        link: &Link,
        in_flight: Option<(i64, i64)>,
    ) -> Result<Next<DB>, RoundError> {
        let Turn::Take { partitions } = self.lease().await? else {
            return Ok(Next::Nothing);
        };
        let batch: OutboxBatch<DB> = DB::outbox_take(
            &self.pool,
            i64::from(self.batch_size),
            partitions,
            in_flight,
        )
        .await
        .map_err(RoundError::Database)?;
        let taken = batch.rows.len();
        if taken == 0 {
            DB::outbox_settle(batch, &[], OnPublish::Mark)
                .await
                .map_err(RoundError::Database)?;
            return Ok(Next::Nothing);
        }
        if !(batch.holds_locks() && batch::pipelines(link, &batch.rows)) {
            return Ok(Next::Alone(batch, taken));
        }
        let sent_at = Instant::now();
        let deadline = tokio::time::Instant::now() + link.timeout;
        let run: Vec<_> = batch.rows.iter().collect();
        let sending = batch::send_run(link, &run, deadline).await;
        Ok(Next::Flying(
            Flight {
                batch,
                sending,
                sent_at,
                deadline,
            },
            taken,
        ))
    }

    /// Waits for a flight's confirms and settles its rows: confirmed ones published, refused
    /// ones backing off or parked, unanswered ones still due.
    async fn land(&self, link: &Link, flight: Flight<DB>) -> Result<Landing, RoundError> {
        let Flight {
            batch,
            sending,
            sent_at,
            deadline,
        } = flight;
        let (settled, trouble) =
            batch::land(link, &batch.rows, sending, deadline, self.park_after).await;
        crate::telemetry::relay_confirm_time(sent_at.elapsed());
        self.settle(batch, &settled).await?;
        match trouble {
            None => Ok(Landing::Done),
            Some(Trouble::Refused(_)) => Ok(Landing::Refused),
            Some(Trouble::Lost(why) | Trouble::ChannelClosed(why)) => Err(RoundError::Broker(why)),
        }
    }

    /// Publishes a batch the one-round-at-a-time way ([`batch::publish`]: runs up to each row
    /// that must go alone) and settles it. On PostgreSQL its row locks are held (a pool
    /// connection in a transaction) until the settle.
    async fn publish_alone(
        &self,
        link: &mut Link,
        batch: OutboxBatch<DB>,
    ) -> Result<(), RoundError> {
        let started = Instant::now();
        let Outcome { settled, lost } = batch::publish(link, &batch.rows, self.park_after).await;
        crate::telemetry::relay_confirm_time(started.elapsed());
        self.settle(batch, &settled).await?;
        match lost {
            Some(error) => Err(RoundError::Broker(error)),
            None => Ok(()),
        }
    }

    /// Marks what became of a batch's rows (one statement for all the published ones) and
    /// counts it. With a retention of zero the published rows are deleted in that statement
    /// (and counted as purged) rather than recorded for the purge to delete a moment later.
    async fn settle(&self, batch: OutboxBatch<DB>, settled: &[Settled]) -> Result<(), RoundError> {
        let on_publish = if self.retention.is_zero() {
            OnPublish::Delete
        } else {
            OnPublish::Mark
        };
        DB::outbox_settle(batch, settled, on_publish)
            .await
            .map_err(RoundError::Database)?;
        let published = self.count(settled);
        if on_publish == OnPublish::Delete && published > 0 {
            self.counters.purged.fetch_add(published, Ordering::Relaxed);
            crate::telemetry::outbox_purged(published);
        }
        Ok(())
    }

    /// Adds a settled batch to the counters; how many rows it published.
    fn count(&self, settled: &[Settled]) -> u64 {
        let (mut published, mut failed, mut parked) = (0, 0, 0);
        for s in settled {
            match s {
                Settled::Published(_) => published += 1,
                Settled::Failed { .. } => failed += 1,
                Settled::Parked { .. } => {
                    failed += 1;
                    parked += 1;
                }
            }
        }
        let c = &self.counters;
        c.published.fetch_add(published, Ordering::Relaxed);
        crate::telemetry::relay_published(published);
        c.failed.fetch_add(failed, Ordering::Relaxed);
        c.parked.fetch_add(parked, Ordering::Relaxed);
        if published > 0 {
            tracing::debug!(published, failed, parked, "outbox batch published");
        }
        published
    }

    /// Whether this relay publishes now, and what. PostgreSQL: the partitions its publish
    /// lease holds and does not give back (no query: the keeper's last word; the take checks
    /// the session again), or everything when the outbox is shared. SQLite: one relay at a
    /// time; the others stand by until its lease lapses (a relay killed mid-round is replaced
    /// within the lease time).
    async fn lease(&self) -> Result<Turn, RoundError> {
        // Read before any await: the slot's guard is not held across one.
        let claimed = self.publish_lease().as_ref().map(|lease| {
            crate::telemetry::relay_partitions(lease.partitions());
            lease.claim()
        });
        let turn = if self.share_outbox {
            Turn::Take { partitions: None }
        } else if let Some(claimed) = claimed {
            match claimed {
                Some(partitions) => Turn::Take {
                    partitions: Some(partitions),
                },
                None => Turn::StandBy,
            }
        } else {
            let ttl = (self.poll_interval * 3).max(Duration::from_secs(10));
            let leased = DB::outbox_lease(&self.pool, &self.holder, ttl)
                .await
                .map_err(RoundError::Database)?;
            if leased {
                Turn::Take { partitions: None }
            } else {
                Turn::StandBy
            }
        };
        let taking = matches!(turn, Turn::Take { .. });
        crate::telemetry::relay_publishing(taking);
        if self.standing_by.swap(!taking, Ordering::Relaxed) == taking {
            if taking {
                tracing::info!("relay publishing its share of the outbox");
            } else {
                tracing::warn!("other relays are publishing this outbox; standing by to take over");
            }
        }
        Ok(turn)
    }

    /// Hands the SQLite lease over at once rather than when it lapses (a no-op elsewhere, and
    /// for a relay that did not hold it).
    pub(super) async fn release_lease(&self) {
        let _ = DB::outbox_lease(&self.pool, &self.holder, Duration::ZERO).await;
    }

    /// `outbox_wakeups` of this relay's database.
    pub(super) async fn wakeups(&self) -> Wakeups {
        DB::outbox_wakeups(&self.pool).await
    }

    /// Samples the outbox gauges (pending, oldest waiting, parked): at most once a second, so
    /// a busy relay does not pay three more queries a round.
    pub(super) async fn sample_if_due(&self, last_sample: &mut Option<Instant>) {
        if last_sample.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last_sample = Some(Instant::now());
        let sampled = async {
            let pending = DB::outbox_pending(&self.pool).await?;
            let parked = DB::outbox_parked(&self.pool).await?;
            let oldest = idem_core::outbox::oldest_pending(&self.pool).await?;
            Ok::<_, sqlx::Error>((pending, parked, oldest))
        };
        match sampled.await {
            Ok((pending, parked, oldest)) => crate::telemetry::outbox(pending, parked, oldest),
            // The round that follows reports a database that is away; this is only a gauge.
            Err(error) => tracing::debug!(%error, "relay cannot sample the outbox gauges"),
        }
    }

    /// Deletes rows published longer ago than the retention, every minute (or more often when
    /// the retention is shorter), in bounded, paced batches ([`idem_core::purge`]) by one relay
    /// at a time; never returns. Runs beside the rounds, not between them: a purge of a big
    /// backlog paces itself for minutes, and the rounds must not wait for it.
    pub(super) async fn keep_outbox(&self) {
        let purge_every = self
            .retention
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        // Another relay purging, or (SQLite) the lease not ours yet — a relay just started
        // takes it on its first round: look again soon rather than in a minute.
        let not_ours_again = self
            .poll_interval
            .max(Duration::from_secs(1))
            .min(purge_every);
        loop {
            let purged = idem_core::purge::in_batches(
                || {
                    DB::outbox_purge(
                        &self.pool,
                        self.retention,
                        idem_core::purge::BATCH,
                        &self.holder,
                    )
                },
                |rows| {
                    self.counters.purged.fetch_add(rows, Ordering::Relaxed);
                    crate::telemetry::outbox_purged(rows);
                },
            )
            .await;
            let next = match purged {
                Ok(None) => not_ours_again,
                Ok(Some(0)) => purge_every,
                Ok(Some(rows)) => {
                    tracing::info!(rows, older_than = ?self.retention, "purged published outbox rows");
                    purge_every
                }
                Err(error) => {
                    tracing::warn!(%error, "relay cannot purge published rows; trying again later");
                    purge_every
                }
            };
            tokio::time::sleep(next).await;
        }
    }
}
