//! The relay's side of the outbox: rows taken to publish, and what became of each.
//!
//! Plumbing between idem-core's backends and idem-amqp's relay, hidden from the docs: not an
//! API, it changes without notice.

use sqlx::Pool;

/// A row the relay took from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The row id (publish order).
    pub id: i64,
    /// The message.
    pub message: super::Outgoing,
    /// Publish attempts that failed so far.
    pub attempts: i32,
}

/// What the settle does with the rows the broker confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPublish {
    /// Marked published: moved out of the outbox to `idem_outbox_sent` (message id,
    /// destination, when), kept there for the retention — what "was it sent, where, and when"
    /// reads, and what makes `enqueue` of the same message id a no-op meanwhile.
    Mark,
    /// Deleted and recorded nowhere: a retention of zero. Cheaper still than marking (no
    /// insert, no index entries); the purge would delete the record within a second anyway.
    Delete,
}

/// What happened to one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The broker confirmed it: mark it published.
    Published(i64),
    /// Not confirmed: try again after `retry_in`.
    Failed {
        /// The row.
        id: i64,
        /// Why.
        error: String,
        /// The backoff before the next attempt.
        retry_in: std::time::Duration,
    },
    /// Not confirmed, and out of attempts: count the attempt, keep `error`, and park the row
    /// (never taken again, never purged; `outbox::unpark` sends it again).
    Parked {
        /// The row.
        id: i64,
        /// Why the last attempt failed.
        error: String,
    },
}

/// Rows the relay took from the outbox, to publish and then settle with
/// `Store::outbox_settle`. On PostgreSQL it holds their row locks (in an open transaction)
/// until settled, so another relay skips them; dropping it unsettled releases them.
pub struct OutboxBatch<DB: sqlx::Database> {
    /// The rows, oldest first.
    pub rows: Vec<OutboxRow>,
    /// PostgreSQL: the transaction holding the rows' locks.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) locks: Option<sqlx::Transaction<'static, DB>>,
    /// Where to settle when there are no locks.
    pub(crate) pool: Pool<DB>,
    /// PostgreSQL with the publish lease: the partitions the batch was taken from, held until
    /// it is settled (and dropped after its transaction ends).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) partitions: Option<LeasedPartitions>,
    /// PostgreSQL: where each row is (its `ctid`, as text) in `rows` order, for the settle to
    /// reach them without looking each up by id. Stable while the batch's transaction holds
    /// the rows locked: nothing else can update or move them.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) places: Vec<String>,
}

impl<DB: sqlx::Database> OutboxBatch<DB> {
    /// Whether the batch holds its rows' locks until settled (PostgreSQL): then another take
    /// skips its rows, and the next batch can be taken and published before this one is
    /// settled. Without locks (SQLite) a take would find them again: one batch at a time.
    pub fn holds_locks(&self) -> bool {
        self.locks.is_some()
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for OutboxBatch<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBatch")
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

/// Whether a take failed because a row of the relay's own partitions stays locked by another
/// session (PostgreSQL `lock_not_available`, after the take's second of retries): a relay going
/// away, or an open transaction on the outbox — waited for, to keep its destination in order.
pub fn locked_by_another(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03"))
}

/// Partitions of an outbox on PostgreSQL. A destination's rows (exchange, routing key) all fall in
/// one ([`PARTITION_OF_ROW`]), and one relay at a time publishes a partition: so several relays
/// publish one outbox at once and every destination's rows still reach the broker in id order.
/// Up to this many relays of one outbox publish; more stand by.
pub const PARTITIONS: u32 = 32;

/// The partition of an `idem_outbox` row `o`, in SQL: the same on every relay of one database
/// (the server computes it), fixed for a destination.
pub const PARTITION_OF_ROW: &str = "(hashtext(o.exchange || '/' || o.routing_key) & 31)";

// The SQL masks with `& 31`, the masks here are `u32`: both hold for 32 partitions only.
const _: () = assert!(PARTITIONS == 32, "PARTITION_OF_ROW masks with & 31");

/// All partitions, as a mask (bit `p` = partition `p`).
const ALL: u32 = u32::MAX >> (32 - PARTITIONS);

/// The right to publish partitions of an outbox, on PostgreSQL: session-level advisory locks
/// held on a database connection of the relay's own by a task, its keeper. Every relay of the
/// outbox is a member (a shared lock) and holds about its fair share of the [`PARTITIONS`]
/// (an exclusive lock each): the keeper takes free ones up to its share and gives back what is
/// above it — a partition only once no batch of it is unsettled ([`LeasedPartitions`]), so the
/// next holder never takes a row behind one still in flight. A relay killed, or whose session
/// is lost, lets its locks go with its connection, and the others take its partitions within
/// [`PublishLease::CHECK_EVERY`]. Dropping the lease ends the task and closes its connection.
#[derive(Debug)]
pub struct PublishLease {
    pub(crate) shared: std::sync::Arc<LeaseState>,
    pub(crate) changes: tokio::sync::watch::Receiver<()>,
}

/// What a relay's keeper and its rounds share.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    ownership: std::sync::Mutex<Ownership>,
    /// A batch of a partition being given back settled: the keeper may let it go now.
    pub(crate) settled: tokio::sync::Notify,
}

/// Which partitions a relay holds, gives back and has batches of in flight.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ownership {
    /// The backend process id of the keeper's session while it is a member of the outbox.
    pub(crate) session: Option<i32>,
    /// Partitions whose lock the session holds.
    pub(crate) owned: u32,
    /// Owned partitions being given back: taken no more, unlocked once none is in flight.
    pub(crate) releasing: u32,
    /// Batches taken and not yet settled, per partition they may hold rows of.
    in_flight: [u32; PARTITIONS as usize],
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))] // the keeper is PostgreSQL's
impl Ownership {
    /// Partitions with a batch taken and not yet settled.
    fn busy(&self) -> u32 {
        self.in_flight
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .fold(0, |mask, (p, _)| mask | 1 << p)
    }
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))] // the keeper is PostgreSQL's
impl LeaseState {
    /// The ownership, whoever panicked while holding it (every change to it is one assignment).
    pub(crate) fn ownership(&self) -> std::sync::MutexGuard<'_, Ownership> {
        self.ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Partitions being given back that no unsettled batch may hold rows of: safe to unlock.
    pub(crate) fn releasable(&self) -> u32 {
        let ownership = self.ownership();
        ownership.releasing & !ownership.busy()
    }

    /// After their locks are gone: no longer owned.
    pub(crate) fn released(&self, partitions: u32) {
        let mut ownership = self.ownership();
        ownership.owned &= !partitions;
        ownership.releasing &= !partitions;
    }

    /// The session is gone, and every lock with it.
    pub(crate) fn lost(&self) {
        let mut ownership = self.ownership();
        ownership.session = None;
        ownership.owned = 0;
        ownership.releasing = 0;
    }

    /// A session that is a member now, holding no partition yet.
    pub(crate) fn joined(&self, session: i32) {
        self.ownership().session = Some(session);
    }

    /// Partitions just locked.
    pub(crate) fn acquired(&self, partitions: u32) {
        let mut ownership = self.ownership();
        ownership.owned |= partitions;
        ownership.releasing &= !partitions;
    }

    /// Applies a [`Rebalance`]: partitions to give back, or to keep after all.
    pub(crate) fn rebalance(&self, give_back: u32, keep: u32) {
        let mut ownership = self.ownership();
        ownership.releasing = (ownership.releasing | give_back) & !keep & ownership.owned;
    }

    /// A copy, for the keeper's decisions.
    pub(crate) fn snapshot(&self) -> Ownership {
        *self.ownership()
    }
}

/// What a keeper does after looking at which partitions every member holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))] // the keeper is PostgreSQL's
pub(crate) struct Rebalance {
    /// Owned partitions to give back (above the fair share).
    pub(crate) give_back: u32,
    /// Partitions being given back to keep after all (a member left: the share grew).
    pub(crate) keep: u32,
    /// How many free partitions to try for.
    pub(crate) want: u32,
    /// Free partitions: held by no member.
    pub(crate) free: u32,
}

/// The fair share of `members` relays: [`PARTITIONS`] divided among them, rounded up, so that
/// every partition has a taker; what a relay holding `owned` (of which `releasing` are being
/// given back) does when `elsewhere` are held by the other members.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))] // the keeper is PostgreSQL's
pub(crate) fn rebalance(owned: u32, releasing: u32, elsewhere: u32, members: u32) -> Rebalance {
    let share = PARTITIONS.div_ceil(members.max(1));
    let kept = owned & !releasing;
    let mut give_back = 0;
    let mut keep = 0;
    if kept.count_ones() > share {
        // The highest first: any fixed choice will do.
        let mut extra = kept.count_ones() - share;
        for p in (0..PARTITIONS).rev() {
            if extra > 0 && kept & (1 << p) != 0 {
                give_back |= 1 << p;
                extra -= 1;
            }
        }
    } else if kept.count_ones() < share && releasing != 0 {
        let mut missing = share - kept.count_ones();
        for p in 0..PARTITIONS {
            if missing > 0 && releasing & (1 << p) != 0 {
                keep |= 1 << p;
                missing -= 1;
            }
        }
    }
    let holding = (owned & !give_back).count_ones();
    Rebalance {
        give_back,
        keep,
        want: share.saturating_sub(holding),
        free: ALL & !owned & !elsewhere,
    }
}

/// Partitions of a mask, lowest first.
pub fn partitions_of(mask: u32) -> impl Iterator<Item = u32> {
    (0..PARTITIONS).filter(move |p| mask & (1 << p) != 0)
}

impl PublishLease {
    /// How often a keeper looks at the outbox's members and partitions, and checks its session
    /// (more often while a partition it should hold is being given back to it).
    pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

    /// The partitions this relay may take rows of now, held until the batch taken with them is
    /// settled; `None` while it holds none (standing by). Pass it to the take, which checks in
    /// the same statement that the lease's session is alive.
    pub fn claim(&self) -> Option<LeasedPartitions> {
        let mut ownership = self.shared.ownership();
        let session = ownership.session?;
        let partitions = ownership.owned & !ownership.releasing;
        if partitions == 0 {
            return None;
        }
        for p in partitions_of(partitions) {
            ownership.in_flight[p as usize] += 1;
        }
        Some(LeasedPartitions {
            session,
            partitions,
            shared: std::sync::Arc::clone(&self.shared),
        })
    }

    /// How many partitions this relay holds now (those being given back included).
    pub fn partitions(&self) -> u32 {
        self.shared.ownership().owned.count_ones()
    }

    /// Resolves (`changed()`) whenever the partitions held change; an error once the keeper is
    /// gone. A relay standing by publishes as soon as it holds a partition, and one giving a
    /// partition back settles what it has in flight rather than wait for its next poll.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.clone()
    }
}

/// Partitions a take may publish, claimed from the [`PublishLease`] and held with the batch
/// until it is settled (dropped): while any batch holds a partition, the keeper does not give
/// it back.
#[derive(Debug)]
pub struct LeasedPartitions {
    session: i32,
    partitions: u32,
    shared: std::sync::Arc<LeaseState>,
}

impl LeasedPartitions {
    /// The backend process id of the session holding the locks.
    pub fn session(&self) -> i32 {
        self.session
    }

    /// The partitions, as a mask (bit `p` = partition `p`).
    pub fn mask(&self) -> u32 {
        self.partitions
    }

    /// Whether these are all the partitions there are (the take need not filter).
    pub fn all(&self) -> bool {
        self.partitions == ALL
    }
}

impl Drop for LeasedPartitions {
    fn drop(&mut self) {
        let releasing = {
            let mut ownership = self.shared.ownership();
            for p in partitions_of(self.partitions) {
                let n = &mut ownership.in_flight[p as usize];
                *n = n.saturating_sub(1);
            }
            ownership.releasing & self.partitions
        };
        if releasing != 0 {
            self.shared.settled.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_alone_takes_every_partition() {
        let r = rebalance(0, 0, 0, 1);
        assert_eq!((r.want, r.free, r.give_back), (32, ALL, 0));
    }

    #[test]
    fn a_second_member_makes_the_first_give_back_half() {
        let r = rebalance(ALL, 0, 0, 2);
        assert_eq!(r.give_back.count_ones(), 16);
        assert_eq!(r.give_back, 0xFFFF_0000, "the highest sixteen");
        assert_eq!(r.want, 0);
        // The newcomer wants its half, and finds only what is not held.
        let newcomer = rebalance(0, 0, ALL, 2);
        assert_eq!((newcomer.want, newcomer.free), (16, 0));
        let newcomer = rebalance(0, 0, 0x0000_FFFF, 2);
        assert_eq!((newcomer.want, newcomer.free), (16, 0xFFFF_0000));
    }

    #[test]
    fn what_is_being_given_back_is_not_given_back_twice_nor_counted_as_wanted() {
        let r = rebalance(ALL, 0xFFFF_0000, 0, 2);
        assert_eq!((r.give_back, r.keep, r.want), (0, 0, 0));
    }

    #[test]
    fn a_member_leaving_makes_the_others_keep_what_they_were_giving_back() {
        // Three members: 11 each at most (32 / 3 rounded up); one leaves while this one
        // gives back 5 of its 16: with two, it keeps them after all.
        let r = rebalance(0x0000_FFFF, 0x0000_F800, 0x0FFF_0000, 2);
        assert_eq!(r.keep, 0x0000_F800);
        assert_eq!(r.want, 0);
        let r = rebalance(0x0000_07FF, 0, 0x0FFF_0000, 2);
        assert_eq!((r.want, r.free), (5, 0xF000_F800));
    }

    #[test]
    fn three_members_share_every_partition() {
        let share = rebalance(0, 0, 0, 3).want;
        assert_eq!(share, 11);
        assert!(share * 3 >= PARTITIONS);
    }

    #[test]
    fn a_partition_with_a_batch_in_flight_is_not_released_until_it_settles() {
        let state = std::sync::Arc::new(LeaseState::default());
        let (_sender, changes) = tokio::sync::watch::channel(());
        let lease = PublishLease {
            shared: std::sync::Arc::clone(&state),
            changes,
        };
        assert!(lease.claim().is_none(), "no session: standing by");
        state.joined(7);
        assert!(lease.claim().is_none(), "no partition: standing by");
        state.acquired(0b1111);
        let batch = lease.claim().unwrap();
        assert_eq!((batch.session(), batch.mask()), (7, 0b1111));
        state.rebalance(0b1100, 0);
        assert_eq!(state.releasable(), 0, "a batch of 2 and 3 is in flight");
        let next = lease.claim().unwrap();
        assert_eq!(next.mask(), 0b0011, "what is given back is taken no more");
        drop(batch);
        assert_eq!(state.releasable(), 0b1100);
        state.released(0b1100);
        assert_eq!(lease.partitions(), 2);
        drop(next);
        state.lost();
        assert!(lease.claim().is_none());
    }
}
