//! The ack window: every delivery taken from the consume channel is settled through it, and it
//! acknowledges them with as few `basic.ack` frames as it can without ever covering one that is
//! not settled.
//!
//! `basic.ack(multiple)` acknowledges every unacknowledged delivery of the channel up to a tag.
//! That is safe only up to the highest tag below which every delivery is settled: a delivery
//! still in its unit of work, held while the database is away, or waiting for its retry's
//! confirm must stay unacknowledged, so that a crash hands it back. Settled deliveries above such
//! a gap wait [`HOLD`] for it to close (or less, when so many wait that the prefetch would run
//! dry), then are acknowledged one by one: a slow delivery never holds the others back for long.
//!
//! One task sends every ack and nack of the channel, in the order it decided them: a hand-back
//! (nack) is on the wire before any multiple ack that passes its tag, and no tag is acknowledged
//! twice (the broker closes the channel over an unknown delivery tag).

use super::stats::Counters;
use crate::telemetry::Settled;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a settled delivery above a gap waits for the gap to close before it is acknowledged
/// on its own: a few groups' commits (groups finish out of order, more so when they queue for
/// SQLite's one writer: at 20 ms a third of the acks there went alone), so that they still share
/// one ack; short enough not to matter to the prefetch (at most half of it waits).
const HOLD: Duration = Duration::from_millis(100);

/// How long, at the end of a run, the window gets to send what is left.
const LAST_SENDS: Duration = Duration::from_secs(5);

/// The window of one consume channel: hands out a [`Ticket`] per delivery and sends the acks.
pub(super) struct AckWindow {
    events: mpsc::UnboundedSender<Event>,
    sender: JoinHandle<()>,
}

impl AckWindow {
    /// Starts the window of `channel`. Stops sending once `lost` is cancelled (nothing can be
    /// acknowledged on a lost connection; the broker requeues it all). `prefetch` bounds how
    /// many settled deliveries may wait above a gap.
    pub fn open(
        channel: Channel,
        counters: Arc<Counters>,
        lost: CancellationToken,
        prefetch: u16,
    ) -> Self {
        let (events, received) = mpsc::unbounded_channel();
        // At most half the prefetch waits: the other half keeps deliveries coming.
        let most_waiting = (usize::from(prefetch) / 2).max(1);
        let sender = Sender {
            channel,
            counters,
            lost,
            window: Window::new(most_waiting),
            unsent_warned: false,
        };
        Self {
            events,
            sender: tokio::spawn(sender.run(received)),
        }
    }

    /// Registers a delivery just taken from the consumer stream (in the order taken, which is
    /// the order of its tags). Its ticket settles it.
    pub fn take(&self, tag: u64) -> Ticket {
        let _ = self.events.send(Event::Taken(tag));
        Ticket {
            tag,
            taken: Instant::now(),
            events: self.events.clone(),
            settled: AtomicBool::new(false),
        }
    }

    /// Once every ticket is settled or dropped: sends what is left and ends the window. Call
    /// before closing the channel.
    pub async fn close(self) {
        let Self { events, sender } = self;
        drop(events);
        let abort = sender.abort_handle();
        if tokio::time::timeout(LAST_SENDS, sender).await.is_err() {
            tracing::warn!(
                "the last acks were not sent within {LAST_SENDS:?}; the broker will redeliver those messages and the ledger will skip them"
            );
            abort.abort();
        }
    }
}

/// One delivery's right to be settled, once: acked (after its commit, or after the broker
/// confirmed its retry or dead letter) or handed back. Dropped unsettled (its task ended
/// abnormally), the delivery is handed back.
pub(super) struct Ticket {
    tag: u64,
    /// When the delivery was taken off the channel.
    taken: Instant,
    events: mpsc::UnboundedSender<Event>,
    settled: AtomicBool,
}

impl Ticket {
    /// When the delivery was taken off the channel.
    pub fn taken(&self) -> Instant {
        self.taken
    }

    /// Asks for the ack, counted as `settled` once the broker has it. `committed_at`: when the
    /// effect committed (for the commit-to-ack latency). False when it cannot be sent any more
    /// (the connection is gone, or the ticket was already used).
    pub fn ack(&self, settled: Settled, committed_at: Option<Instant>) -> bool {
        self.settle(Event::Ack {
            tag: self.tag,
            settle: Settle {
                settled,
                committed_at,
                at: Instant::now(),
            },
        })
    }

    /// Asks for a nack with requeue: the broker delivers the message again.
    pub fn hand_back(&self) -> bool {
        self.settle(Event::HandBack(self.tag))
    }

    fn settle(&self, event: Event) -> bool {
        !self.settled.swap(true, Ordering::AcqRel) && self.events.send(event).is_ok()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            let _ = self.events.send(Event::Abandoned(self.tag));
        }
    }
}

enum Event {
    Taken(u64),
    Ack { tag: u64, settle: Settle },
    HandBack(u64),
    Abandoned(u64),
}

/// A settled delivery's ack, waiting to be sent.
#[derive(Debug, Clone, Copy)]
struct Settle {
    settled: Settled,
    committed_at: Option<Instant>,
    /// When it was settled: it waits above a gap until `at + HOLD`.
    at: Instant,
}

/// What goes on the wire, in this order.
#[derive(Debug)]
enum Wire {
    /// `basic.ack` of `tag` (and, with `multiple`, of every unacknowledged tag below it): the
    /// acks of `covered`.
    Ack {
        tag: u64,
        multiple: bool,
        covered: Vec<Settle>,
    },
    /// `basic.nack` of `tag`, requeued.
    HandBack(u64),
}

impl Wire {
    /// The deliveries it acks.
    fn acks(&self) -> usize {
        match self {
            Wire::Ack { covered, .. } => covered.len(),
            Wire::HandBack(_) => 0,
        }
    }
}

/// The decisions, without the wire: which tags are taken, which settled, what to send.
#[derive(Debug)]
struct Window {
    /// Taken and not yet acknowledged nor handed back, by tag: `None` still open.
    taken: BTreeMap<u64, Option<Settle>>,
    /// Acks in the order they were asked for, to find the ones that waited [`HOLD`]; entries
    /// already sent are skipped when they come to the front.
    asked: VecDeque<(u64, Instant)>,
    /// Settled deliveries in `taken` (all above a gap, between two sends).
    waiting: usize,
    most_waiting: usize,
    /// Decided, not yet sent.
    out: Vec<Wire>,
}

impl Window {
    fn new(most_waiting: usize) -> Self {
        Self {
            taken: BTreeMap::new(),
            asked: VecDeque::new(),
            waiting: 0,
            most_waiting,
            out: Vec::new(),
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Taken(tag) => {
                self.taken.insert(tag, None);
            }
            Event::Ack { tag, settle } => {
                if let Some(slot @ None) = self.taken.get_mut(&tag) {
                    *slot = Some(settle);
                    self.waiting += 1;
                    self.asked.push_back((tag, settle.at));
                }
            }
            Event::HandBack(tag) => self.hand_back(tag),
            Event::Abandoned(tag) => {
                if let Some(None) = self.taken.get(&tag) {
                    tracing::warn!(
                        tag,
                        "a delivery's task ended without settling it; handing it back"
                    );
                    self.hand_back(tag);
                }
            }
        }
    }

    fn hand_back(&mut self, tag: u64) {
        if let Some(None) = self.taken.get(&tag) {
            self.taken.remove(&tag);
            self.out.push(Wire::HandBack(tag));
        }
    }

    /// Acks the settled prefix of the window with one frame, then whatever waited long enough
    /// above a gap (or all of it, when too many wait), one frame each.
    fn decide(&mut self, now: Instant) {
        let mut covered = Vec::new();
        let mut last = None;
        while let Some(entry) = self.taken.first_entry() {
            let Some(settle) = *entry.get() else { break };
            last = Some(*entry.key());
            covered.push(settle);
            entry.remove();
        }
        if let Some(tag) = last {
            self.waiting -= covered.len();
            self.out.push(Wire::Ack {
                tag,
                multiple: covered.len() > 1,
                covered,
            });
        }
        let flood = self.waiting > self.most_waiting;
        while let Some(&(tag, at)) = self.asked.front() {
            let still_waiting = matches!(self.taken.get(&tag), Some(Some(_)));
            if still_waiting && !flood && now.duration_since(at) < HOLD {
                break;
            }
            self.asked.pop_front();
            if still_waiting {
                self.ack_alone(tag);
            }
        }
    }

    fn ack_alone(&mut self, tag: u64) {
        if let Some(Some(settle)) = self.taken.remove(&tag) {
            self.waiting -= 1;
            self.out.push(Wire::Ack {
                tag,
                multiple: false,
                covered: vec![settle],
            });
        }
    }

    /// When the oldest waiting ack is due on its own.
    fn next_due(&self) -> Option<Instant> {
        (self.waiting > 0)
            .then(|| self.asked.front().map(|&(_, at)| at + HOLD))
            .flatten()
    }

    /// At the end: every settled delivery acked, as few frames as the gaps allow.
    fn finish(&mut self) {
        self.decide(Instant::now());
        let waiting: Vec<u64> = self
            .taken
            .iter()
            .filter(|(_, settle)| settle.is_some())
            .map(|(tag, _)| *tag)
            .collect();
        for tag in waiting {
            self.ack_alone(tag);
        }
        self.asked.clear();
    }
}

/// The task that owns the window and the channel's acks.
struct Sender {
    channel: Channel,
    counters: Arc<Counters>,
    lost: CancellationToken,
    window: Window,
    unsent_warned: bool,
}

impl Sender {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        loop {
            let due = self.window.next_due();
            tokio::select! {
                biased;
                () = self.lost.cancelled() => return self.unsent(0),
                event = events.recv() => match event {
                    Some(event) => {
                        self.window.apply(event);
                        // Everything already asked for, before deciding: a group's acks
                        // share one frame.
                        while let Ok(event) = events.try_recv() {
                            self.window.apply(event);
                        }
                    }
                    None => {
                        self.window.finish();
                        return self.send().await;
                    }
                },
                () = sleep_until(due) => {}
            }
            self.window.decide(Instant::now());
            self.send().await;
        }
    }

    /// Sends what the window decided, in order; counts each delivery once the broker has it.
    async fn send(&mut self) {
        let mut out = std::mem::take(&mut self.window.out).into_iter();
        while let Some(wire) = out.next() {
            if self.lost.is_cancelled() {
                let covered = out.as_slice().iter().map(Wire::acks).sum::<usize>() + wire.acks();
                return self.unsent(covered);
            }
            let counters = &self.counters;
            match wire {
                Wire::Ack {
                    tag,
                    multiple,
                    covered,
                } => match self
                    .channel
                    .basic_ack(tag, BasicAckOptions { multiple })
                    .await
                {
                    Ok(()) => {
                        counters.ack_frame();
                        for settle in covered {
                            if let Some(committed_at) = settle.committed_at {
                                counters.metrics.commit_to_ack(committed_at.elapsed());
                            }
                            counters.settled(settle.settled);
                        }
                    }
                    Err(error) => {
                        for _ in &covered {
                            counters.ack_failure();
                        }
                        tracing::error!(%error, tag, messages = covered.len(), "ack failed; the broker will redeliver and the ledger will skip them");
                    }
                },
                Wire::HandBack(tag) => {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    };
                    match self.channel.basic_nack(tag, requeue).await {
                        Ok(()) => counters.settled(Settled::HandedBack),
                        Err(error) => {
                            // The channel is gone: the broker requeues every unacked delivery.
                            counters.ack_failure();
                            tracing::warn!(%error, tag, "nack not sent; the broker will redeliver the message");
                        }
                    }
                }
            }
        }
    }

    /// The connection is lost: says (once) how many acks could not be sent.
    fn unsent(&mut self, decided: usize) {
        let unsent = self.window.waiting + decided;
        if unsent > 0 && !self.unsent_warned {
            self.unsent_warned = true;
            tracing::warn!(
                unsent,
                "the connection was lost before {unsent} ack(s) were sent; the broker will redeliver those messages and the ledger will skip them"
            );
        }
    }
}

/// Resolves at `due`; never without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::collections::{BTreeSet, HashMap};

    fn settle(at: Instant) -> Settle {
        Settle {
            settled: Settled::Applied,
            committed_at: None,
            at,
        }
    }

    fn ack(window: &mut Window, tag: u64, at: Instant) {
        window.apply(Event::Ack {
            tag,
            settle: settle(at),
        });
    }

    /// The frames decided so far, as `(tag, multiple, acks)` or `(tag, false, 0)` for a nack.
    fn sent(window: &mut Window) -> Vec<(u64, bool, usize)> {
        window
            .out
            .drain(..)
            .map(|wire| match wire {
                Wire::Ack {
                    tag,
                    multiple,
                    covered,
                } => (tag, multiple, covered.len()),
                Wire::HandBack(tag) => (tag, false, 0),
            })
            .collect()
    }

    #[test]
    fn a_group_settled_out_of_order_shares_one_frame() {
        let now = Instant::now();
        let mut window = Window::new(100);
        (1..=5).for_each(|tag| window.apply(Event::Taken(tag)));
        for tag in [3, 1, 2, 5, 4] {
            ack(&mut window, tag, now);
        }
        window.decide(now);
        assert_eq!(sent(&mut window), vec![(5, true, 5)]);
        assert_eq!(window.next_due(), None);
    }

    #[test]
    fn a_delivery_still_open_below_is_never_covered_and_holds_the_others_only_briefly() {
        let now = Instant::now();
        let mut window = Window::new(100);
        (1..=3).for_each(|tag| window.apply(Event::Taken(tag)));
        ack(&mut window, 2, now);
        ack(&mut window, 3, now);
        window.decide(now);
        assert_eq!(sent(&mut window), vec![], "tag 1 is still open");
        assert_eq!(window.next_due(), Some(now + HOLD));
        window.decide(now + HOLD);
        assert_eq!(sent(&mut window), vec![(2, false, 1), (3, false, 1)]);
        // When 1 settles at last, it goes alone: 2 and 3 are already acknowledged.
        ack(&mut window, 1, now + HOLD);
        window.decide(now + HOLD);
        assert_eq!(sent(&mut window), vec![(1, false, 1)]);
    }

    #[test]
    fn a_hand_back_is_sent_before_the_ack_that_passes_its_tag() {
        let now = Instant::now();
        let mut window = Window::new(100);
        (1..=3).for_each(|tag| window.apply(Event::Taken(tag)));
        ack(&mut window, 2, now);
        ack(&mut window, 3, now);
        window.apply(Event::HandBack(1));
        window.decide(now);
        assert_eq!(sent(&mut window), vec![(1, false, 0), (3, true, 2)]);
    }

    #[test]
    fn an_abandoned_delivery_is_handed_back_and_a_settled_one_is_not() {
        let now = Instant::now();
        let mut window = Window::new(100);
        (1..=2).for_each(|tag| window.apply(Event::Taken(tag)));
        ack(&mut window, 2, now);
        window.apply(Event::Abandoned(2));
        window.apply(Event::Abandoned(1));
        window.decide(now);
        assert_eq!(sent(&mut window), vec![(1, false, 0), (2, false, 1)]);
    }

    #[test]
    fn too_many_waiting_above_a_gap_go_at_once_so_the_prefetch_does_not_run_dry() {
        let now = Instant::now();
        let mut window = Window::new(2);
        (1..=5).for_each(|tag| window.apply(Event::Taken(tag)));
        (2..=5).for_each(|tag| ack(&mut window, tag, now));
        window.decide(now);
        assert_eq!(sent(&mut window).len(), 4);
        assert_eq!(window.waiting, 0);
    }

    /// What the broker keeps of a channel's deliveries, and what it would refuse.
    #[derive(Default)]
    struct Broker {
        unacked: BTreeSet<u64>,
        acked: BTreeSet<u64>,
        requeued: BTreeSet<u64>,
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Asked {
        Nothing,
        Ack,
        HandBack,
    }

    impl Broker {
        fn receive(&mut self, wire: Wire, asked: &HashMap<u64, Asked>) {
            match wire {
                Wire::Ack {
                    tag,
                    multiple,
                    covered,
                } => {
                    // RabbitMQ closes the channel over a tag it does not hold unacked.
                    assert!(self.unacked.contains(&tag), "unknown delivery tag {tag}");
                    let gone: Vec<u64> = if multiple {
                        self.unacked.range(..=tag).copied().collect()
                    } else {
                        vec![tag]
                    };
                    assert_eq!(gone.len(), covered.len(), "ack of {tag} covers {gone:?}");
                    for tag in gone {
                        assert_eq!(asked[&tag], Asked::Ack, "tag {tag} acked unasked");
                        self.unacked.remove(&tag);
                        self.acked.insert(tag);
                    }
                }
                Wire::HandBack(tag) => {
                    assert!(self.unacked.remove(&tag), "unknown delivery tag {tag}");
                    assert_eq!(asked[&tag], Asked::HandBack);
                    self.requeued.insert(tag);
                }
            }
        }
    }

    /// Thousands of deliveries taken, settled in random order (acks, hand-backs, tasks that
    /// die), with time passing at random: the broker never sees an unknown tag, an ack covering
    /// a delivery that asked for none, or a delivery acked twice; at the end every asked ack was
    /// sent, and in fewer frames than deliveries.
    #[test]
    fn random_settlements_never_ack_what_did_not_ask_and_send_every_ack_asked_for() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move |below: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % below
        };
        let mut now = Instant::now();
        let mut window = Window::new(16);
        let mut broker = Broker::default();
        let mut asked: HashMap<u64, Asked> = HashMap::new();
        let mut open: Vec<u64> = Vec::new();
        let mut frames = 0;
        for tag in 1..=5_000_u64 {
            window.apply(Event::Taken(tag));
            broker.unacked.insert(tag);
            asked.insert(tag, Asked::Nothing);
            open.push(tag);
            // Settle a few of the open ones, any of them.
            while !open.is_empty() && random(3) != 0 {
                let tag = open.swap_remove(random(open.len() as u64) as usize);
                match random(20) {
                    0 => {
                        asked.insert(tag, Asked::HandBack);
                        window.apply(Event::HandBack(tag));
                    }
                    1 => {
                        asked.insert(tag, Asked::HandBack);
                        window.apply(Event::Abandoned(tag));
                    }
                    _ => {
                        asked.insert(tag, Asked::Ack);
                        ack(&mut window, tag, now);
                    }
                }
            }
            now += Duration::from_millis(random(4));
            window.decide(now);
            for wire in window.out.drain(..) {
                frames += 1;
                broker.receive(wire, &asked);
            }
        }
        // The rest settle, then the window ends.
        for tag in open.drain(..) {
            asked.insert(tag, Asked::Ack);
            ack(&mut window, tag, now);
        }
        window.finish();
        for wire in window.out.drain(..) {
            frames += 1;
            broker.receive(wire, &asked);
        }
        assert!(broker.unacked.is_empty(), "{:?}", broker.unacked);
        let acks = asked.values().filter(|a| **a == Asked::Ack).count();
        assert_eq!(broker.acked.len(), acks);
        assert_eq!(broker.requeued.len(), 5_000 - acks);
        assert!(frames < 5_000, "{frames} frames");
    }
}
