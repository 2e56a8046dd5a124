//! Publishing one batch of taken rows: what the broker confirmed, what it refused, and what
//! stays due.
//!
//! Rows go out pipelined (publish all, then await the confirms: one round trip for the batch).
//! A row the broker returns (unroutable) or nacks is that row's failure. A row that makes the
//! broker close the channel (an exchange that does not exist, one the user may not publish
//! to, a body over the broker's size limit) is that row's failure too, not a lost broker: the
//! channel is reopened on the same connection and the other rows go on.
//!
//! Such a close must not catch other publishes in flight: the broker discards them and fails
//! their confirms, so the refused row would not be known, and lapin (4.12) may write a publish
//! it had queued on the channel after its `close-ok`, which the broker answers by closing the
//! whole connection. So a row goes out alone — the run before it confirmed, its own confirm
//! awaited before the next publish — when its exchange has not yet answered a publish on this
//! channel, or its body is over [`ALONE_ABOVE`]: the first row to each exchange per channel,
//! and big ones. Should a refusal still hit a pipelined run (an exchange deleted meanwhile),
//! the rows left without an answer are published again one at a time until the refused one is
//! found (those before it were likely delivered already: a second copy, same message id, for
//! the next consumer's ledger); and if the connection went down with it, the new connection
//! knows no exchange yet.
//!
//! Per-destination order: once a row of a destination (exchange + routing key) failed, the
//! later rows of that destination are not published in this round; they stay due, and the
//! next takes hold them back while the failed row backs off (`Store::outbox_take`). Rows of
//! other destinations go on. The one gap: rows already in flight behind the failed one — in
//! the same pipelined run, or in the next batch, published before this one's confirms came in
//! (`super::round`'s pipeline) — the broker answers those on their own, so a later row it
//! takes right after refusing an earlier one of the same destination (a nack, or a queue
//! declared between the two publishes) goes out first.
//!
//! A failed row backs off (1 s doubling to 5 min) and, at its `park_after`-th failure, is
//! parked instead: never taken again, no longer holding its destination back.

use super::link::{Link, Trouble};
use crate::publish;
use idem_core::outbox::relay::{OutboxRow, Settled};
use idem_core::Backoff;
use lapin::PublisherConfirm;
use std::collections::{HashSet, VecDeque};
use std::time::Duration;

/// Between two publish attempts of one row the broker did not take: 1 s doubling to 5 min.
const PUBLISH_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// A body larger than this goes out alone: a broker with a lower `max_message_size` closes the
/// channel over it.
const ALONE_ABOVE: usize = 1024 * 1024;

/// What became of a batch: how to settle each row that got an answer (the others stay due),
/// and whether the broker was lost on the way.
pub(super) struct Outcome {
    pub(super) settled: Vec<Settled>,
    /// Why the broker was given up: reconnect.
    pub(super) lost: Option<String>,
}

/// Where a row goes; order is kept per destination.
type Destination<'r> = (&'r str, &'r str);

fn destination(row: &OutboxRow) -> Destination<'_> {
    (&row.message.route.exchange, &row.message.route.routing_key)
}

/// Publishes `rows` (oldest first) on `link`, keeping order per destination; a row at its
/// `park_after`-th failure is parked.
pub(super) async fn publish(link: &mut Link, rows: &[OutboxRow], park_after: u32) -> Outcome {
    // Every wait on the broker in this round, in all: on PostgreSQL the batch's transaction
    // and row locks wait with it.
    let deadline = tokio::time::Instant::now() + link.timeout;
    let mut todo: VecDeque<&OutboxRow> = rows.iter().collect();
    // Destinations with a failed row in this round: their later rows wait.
    let mut held: HashSet<Destination<'_>> = HashSet::new();
    let mut settled = Vec::with_capacity(rows.len());
    // After a refusal among rows in flight together: one at a time until the refused one is found.
    let mut one_at_a_time = false;
    loop {
        let alone = |row: &OutboxRow| {
            row.message.body.len() > ALONE_ABOVE || !link.knows(&row.message.route.exchange)
        };
        let run = next_run(&mut todo, &held, one_at_a_time, alone);
        if run.is_empty() {
            return Outcome {
                settled,
                lost: None,
            };
        }
        let sent = publish_run(link, &run, deadline).await;
        for (row, answer) in sent.answered {
            link.learn(&row.message.route.exchange);
            match answer {
                Ok(()) => settled.push(Settled::Published(row.id)),
                Err(error) => {
                    held.insert(destination(row));
                    settled.push(failed(row, error.to_string(), park_after));
                }
            }
        }
        let refused = match sent.trouble {
            None => continue,
            Some(Trouble::Lost(why) | Trouble::ChannelClosed(why)) => {
                return Outcome {
                    settled,
                    lost: Some(why),
                }
            }
            Some(Trouble::Refused(refused)) => refused,
        };
        if let Err(why) = link.reopen(deadline).await {
            return Outcome {
                settled,
                lost: Some(why),
            };
        }
        if sent.unanswered.is_empty() {
            // The close came after every answer: no row to blame.
        } else if let [row] = sent.unanswered[..] {
            // Every other row got its answer: this is the one the broker refused.
            held.insert(destination(row));
            settled.push(failed(row, refused, park_after));
            one_at_a_time = false;
        } else {
            tracing::info!(
                unanswered = sent.unanswered.len(),
                "the broker refused one of the relay's publishes and closed the channel; \
                 publishing the unanswered rows one at a time to find it"
            );
            for row in sent.unanswered.into_iter().rev() {
                todo.push_front(row);
            }
            one_at_a_time = true;
        }
    }
}

/// Whether `rows` may go out as one run while the previous batch's confirms are still coming:
/// every exchange has answered a publish on this channel and no body is big enough to go alone.
/// Otherwise a refusal could close the channel under the other batch's publishes too.
pub(super) fn pipelines(link: &Link, rows: &[OutboxRow]) -> bool {
    rows.iter()
        .all(|row| row.message.body.len() <= ALONE_ABOVE && link.knows(&row.message.route.exchange))
}

/// The answers to a batch sent whole ([`send_run`] of all its `rows`): how to settle each row
/// that got one (rows without an answer stay due), and what went wrong. A refusal — the broker
/// closed the channel — comes back as such, not hunted down here: the caller reopens the
/// channel, which forgets every exchange, so the rounds after it publish to each exchange alone
/// again and find the refused row the way [`publish`] does.
pub(super) async fn land(
    link: &Link,
    rows: &[OutboxRow],
    sending: Sending,
    deadline: tokio::time::Instant,
    park_after: u32,
) -> (Vec<Settled>, Option<Trouble>) {
    let run: Vec<&OutboxRow> = rows.iter().collect();
    let sent = collect_run(link, &run, sending, deadline).await;
    let settled = sent
        .answered
        .into_iter()
        .map(|(row, answer)| match answer {
            Ok(()) => Settled::Published(row.id),
            Err(error) => failed(row, error.to_string(), park_after),
        })
        .collect();
    (settled, sent.trouble)
}

/// The next rows to publish together: all that are left (`one`: just the next), up to a row
/// that must go `alone`, which goes in a run of its own; the rows of held destinations are
/// left out (and so stay due).
fn next_run<'r>(
    todo: &mut VecDeque<&'r OutboxRow>,
    held: &HashSet<Destination<'r>>,
    one: bool,
    alone: impl Fn(&OutboxRow) -> bool,
) -> Vec<&'r OutboxRow> {
    let mut run = Vec::new();
    while let Some(row) = todo.pop_front() {
        if held.contains(&destination(row)) {
            continue;
        }
        if alone(row) && !run.is_empty() {
            todo.push_front(row);
            break;
        }
        run.push(row);
        if one || alone(row) {
            break;
        }
    }
    run
}

/// The answers to one run of publishes.
struct Sent<'r> {
    /// Rows the broker answered (confirmed, returned or nacked), in order.
    answered: Vec<(&'r OutboxRow, Result<(), crate::Error>)>,
    /// Rows without an answer (a confirm that failed or did not come, a publish not made), in
    /// order: they stay due.
    unanswered: Vec<&'r OutboxRow>,
    /// Why some rows got no answer.
    trouble: Option<Trouble>,
}

impl Sent<'_> {
    /// Keeps the gravest trouble of the run (the first of equals): a lost broker over a
    /// refusal, a refusal over the closed channel it leaves behind.
    fn note(&mut self, trouble: Trouble) {
        fn rank(trouble: &Trouble) -> u8 {
            match trouble {
                Trouble::ChannelClosed(_) => 0,
                Trouble::Refused(_) => 1,
                Trouble::Lost(_) => 2,
            }
        }
        if self
            .trouble
            .as_ref()
            .is_none_or(|t| rank(&trouble) > rank(t))
        {
            self.trouble = Some(trouble);
        }
    }
}

/// Publishes `run` in order, then awaits every confirm; all of it by `deadline`.
async fn publish_run<'r>(
    link: &Link,
    run: &[&'r OutboxRow],
    deadline: tokio::time::Instant,
) -> Sent<'r> {
    let sending = send_run(link, run, deadline).await;
    collect_run(link, run, sending, deadline).await
}

/// A run's publishes written, their confirms still to come.
pub(super) struct Sending {
    /// The confirm of each row published, by its place in the run.
    pending: Vec<(usize, PublisherConfirm)>,
    /// Where the run stopped short (a publish failed or timed out): that row and the rest were
    /// not published.
    unsent_from: Option<usize>,
    /// Why it stopped short.
    trouble: Option<Trouble>,
}

/// Publishes `run` in order by `deadline`, without waiting for the confirms.
pub(super) async fn send_run(
    link: &Link,
    run: &[&OutboxRow],
    deadline: tokio::time::Instant,
) -> Sending {
    let mut sending = Sending {
        pending: Vec::with_capacity(run.len()),
        unsent_from: None,
        trouble: None,
    };
    for (i, row) in run.iter().enumerate() {
        match tokio::time::timeout_at(deadline, link.publish(row)).await {
            Ok(Ok(confirm)) => sending.pending.push((i, confirm)),
            Ok(Err(error)) => {
                sending.trouble = Some(link.trouble(&error));
                sending.unsent_from = Some(i);
                break;
            }
            Err(_) => {
                sending.trouble = Some(timed_out(link));
                sending.unsent_from = Some(i);
                break;
            }
        }
    }
    sending
}

/// Awaits the confirms of a run `sending` published, by `deadline`.
async fn collect_run<'r>(
    link: &Link,
    run: &[&'r OutboxRow],
    sending: Sending,
    deadline: tokio::time::Instant,
) -> Sent<'r> {
    let mut sent = Sent {
        answered: Vec::with_capacity(run.len()),
        unanswered: Vec::new(),
        trouble: None,
    };
    let Sending {
        pending,
        unsent_from,
        trouble,
    } = sending;
    if let Some(trouble) = trouble {
        sent.note(trouble);
    }
    let unsent = unsent_from.map_or(&[][..], |from| &run[from..]);
    for (i, confirm) in pending {
        let row = run[i];
        // After a timeout this still collects the answers already in.
        match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(confirmation)) => {
                let (exchange, routing_key) = destination(row);
                let answer = publish::confirmed(confirmation, exchange, routing_key);
                sent.answered.push((row, answer));
            }
            Ok(Err(error)) => {
                sent.note(link.trouble(&error));
                sent.unanswered.push(row);
            }
            Err(_) => {
                sent.note(timed_out(link));
                sent.unanswered.push(row);
            }
        }
    }
    sent.unanswered.extend_from_slice(unsent);
    if let Some(Trouble::ChannelClosed(why)) = sent.trouble {
        // No refusal explains it: reconnect.
        sent.trouble = Some(Trouble::Lost(why));
    }
    sent
}

fn timed_out(link: &Link) -> Trouble {
    Trouble::Lost(format!(
        "the broker did not answer the round's publishes within {:?} (confirm_timeout)",
        link.timeout
    ))
}

/// How to settle a row the broker did not take: back off, or park it at its `park_after`-th
/// failure; logged either way.
fn failed(row: &OutboxRow, error: String, park_after: u32) -> Settled {
    let failures = u32::try_from(row.attempts).unwrap_or(0);
    let attempts = failures.saturating_add(1);
    let (exchange, routing_key) = destination(row);
    let message_id = row.message.message_id;
    if attempts >= park_after {
        tracing::warn!(
            %message_id, exchange, routing_key, attempts, last_error = %error,
            "outbox message parked after {attempts} failed publish attempts: no longer retried, \
             and no longer holding back its destination (idem::outbox::unpark sends it again)"
        );
        return Settled::Parked { id: row.id, error };
    }
    let retry_in = PUBLISH_BACKOFF.delay(failures);
    tracing::warn!(
        %message_id, exchange, routing_key, attempts, %error, ?retry_in,
        "outbox message not published; retrying later"
    );
    Settled::Failed {
        id: row.id,
        error,
        retry_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::outbox::{Outgoing, Route};

    fn row(id: i64, queue: &str, attempts: i32) -> OutboxRow {
        OutboxRow {
            id,
            message: Outgoing {
                message_id: idem_core::outbox::stable_id("test", &id.to_string()),
                route: Route::queue(queue),
                kind: "test".into(),
                body: Vec::new(),
                correlation_id: None,
                causation_id: None,
            },
            attempts,
        }
    }

    #[test]
    fn a_refused_row_waits_one_second_doubling_to_five_minutes() {
        let after = |attempts| PUBLISH_BACKOFF.delay(attempts);
        assert_eq!(after(0), Duration::from_secs(1));
        assert_eq!(after(8), Duration::from_secs(256));
        assert_eq!(after(9), Duration::from_secs(300));
        assert_eq!(after(u32::MAX), Duration::from_secs(300));
        assert_eq!(PUBLISH_BACKOFF.next_delay(3), Duration::from_secs(8));
    }

    #[test]
    fn a_lost_broker_outranks_a_refusal_which_outranks_the_closed_channel_it_leaves() {
        let mut sent = Sent {
            answered: Vec::new(),
            unanswered: Vec::new(),
            trouble: None,
        };
        sent.note(Trouble::ChannelClosed(
            "publish on a closing channel".into(),
        ));
        sent.note(Trouble::Refused("404".into()));
        sent.note(Trouble::ChannelClosed("another".into()));
        sent.note(Trouble::Refused("a second refusal".into()));
        assert_eq!(sent.trouble, Some(Trouble::Refused("404".into())));
        sent.note(Trouble::Lost("connection reset".into()));
        sent.note(Trouble::Refused("404".into()));
        assert_eq!(sent.trouble, Some(Trouble::Lost("connection reset".into())));
    }

    #[test]
    fn a_row_is_parked_at_its_park_after_th_failure() {
        let backs_off = failed(&row(1, "q", 0), "nope".into(), 2);
        assert_eq!(
            backs_off,
            Settled::Failed {
                id: 1,
                error: "nope".into(),
                retry_in: Duration::from_secs(1)
            }
        );
        let parked = failed(&row(1, "q", 1), "nope".into(), 2);
        assert_eq!(
            parked,
            Settled::Parked {
                id: 1,
                error: "nope".into()
            }
        );
        assert!(matches!(
            failed(&row(1, "q", 0), "nope".into(), 1),
            Settled::Parked { .. }
        ));
    }

    #[test]
    fn rows_of_a_held_destination_are_left_out_and_others_go_on() {
        let rows = [
            row(1, "x", 0),
            row(2, "y", 0),
            row(3, "x", 0),
            row(4, "y", 0),
        ];
        let held: HashSet<Destination<'_>> = [("", "x")].into_iter().collect();
        let mut todo: VecDeque<&OutboxRow> = rows.iter().collect();
        let ids = |run: Vec<&OutboxRow>| run.iter().map(|r| r.id).collect::<Vec<_>>();
        let never = |_: &OutboxRow| false;
        assert_eq!(ids(next_run(&mut todo, &held, true, never)), [2]);
        assert_eq!(ids(next_run(&mut todo, &held, false, never)), [4]);
        assert!(todo.is_empty());
        let mut todo: VecDeque<&OutboxRow> = rows.iter().collect();
        assert_eq!(
            ids(next_run(&mut todo, &HashSet::new(), false, never)),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn a_row_that_must_go_alone_ends_the_run_before_it_and_has_its_own() {
        let rows = [
            row(1, "x", 0),
            row(2, "y", 0),
            row(3, "x", 0),
            row(4, "y", 0),
        ];
        let mut todo: VecDeque<&OutboxRow> = rows.iter().collect();
        let ids = |run: Vec<&OutboxRow>| run.iter().map(|r| r.id).collect::<Vec<_>>();
        let third = |row: &OutboxRow| row.id == 3;
        let none = HashSet::new();
        assert_eq!(ids(next_run(&mut todo, &none, false, third)), [1, 2]);
        assert_eq!(ids(next_run(&mut todo, &none, false, third)), [3]);
        assert_eq!(ids(next_run(&mut todo, &none, false, third)), [4]);
        assert!(todo.is_empty());
    }
}
