//! `idem dlq`: the dead letters of each queue — what, why, and sending them back.
//!
//! Reading takes nothing: letters are fetched unacknowledged and go back to the DLQ, in their
//! places, when the channel closes. Replay publishes a copy to the original queue without
//! idem's failure headers (so the retry policy starts over), waits for the broker's confirm, and
//! only then removes the letter: a crash midway leaves at most one message in both places, and
//! the ledger absorbs the second copy.

use crate::output;
use crate::{Global, Verdict};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use idem::amqp::headers as idem_headers;
use idem::amqp::lapin::message::Delivery;
use idem::amqp::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use idem::amqp::lapin::types::{AMQPValue, FieldTable, ShortString};
use idem::amqp::lapin::{Channel, Connection};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Dead letters per queue and reason: how many, the oldest and the newest.
    List {
        /// Read at most this many letters per queue (the count of the rest is the broker's).
        #[arg(long, default_value_t = 100_000)]
        scan: usize,
    },
    /// Each dead letter: reason, error, attempts, times, ids, key and body.
    Show {
        #[command(flatten)]
        filter: Filter,
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Send dead letters back to their original queue. A dry run unless `--yes`.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Do it (without: only say what would go back).
        #[arg(long)]
        yes: bool,
        /// Replay letters older than the ledger retention too. The ledger has forgotten keys
        /// applied before then: if a copy of such a letter was applied, it is applied again.
        #[arg(long)]
        force: bool,
        /// The consumers' ledger retention (`ConsumerBuilder::ledger_retention`).
        #[arg(long, env = "IDEM_LEDGER_RETENTION", default_value = "30d", value_parser = crate::duration)]
        ledger_retention: Duration,
    },
    /// Delete dead letters for good. A dry run unless `--yes`.
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Do it (without: only say what would be deleted).
        #[arg(long)]
        yes: bool,
    },
}

/// Which letters a command is about.
#[derive(Debug, Args)]
pub(crate) struct Filter {
    /// Only letters with this reason (`rejected`, `retries-exhausted`, `malformed`,
    /// `key-conflict`, `crash-loop`, `missing-key`, `unreadable`).
    #[arg(long)]
    reason: Option<String>,
    /// Only the letter(s) of this idempotency key (or AMQP message id).
    #[arg(long)]
    key: Option<String>,
}

impl Filter {
    fn matches(&self, letter: &Letter) -> bool {
        let reason = self
            .reason
            .as_ref()
            .is_none_or(|wanted| letter.reason.as_deref() == Some(wanted.as_str()));
        let key = self.key.as_ref().is_none_or(|wanted| {
            letter.key.as_deref() == Some(wanted.as_str())
                || letter.message_id.as_deref() == Some(wanted.as_str())
        });
        reason && key
    }
}

/// A dead letter as an operator reads it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Letter {
    /// The DLQ it is in.
    dlq: String,
    reason: Option<String>,
    error: Option<String>,
    key: Option<String>,
    attempts: Option<String>,
    first_failure: Option<String>,
    last_failure: Option<String>,
    consumer: Option<String>,
    original_queue: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    kind: Option<String>,
    /// The producer's AMQP timestamp.
    sent: Option<String>,
    body_bytes: usize,
    /// The body as text (bad UTF-8 shown as U+FFFD), at most 2 KiB.
    body: String,
    /// The earliest time the letter tells of (sent, or first failure), seconds since the epoch.
    #[serde(skip)]
    since: Option<u64>,
    /// Its last failure, seconds since the epoch.
    #[serde(skip)]
    last: Option<u64>,
}

impl Letter {
    fn read(dlq: &str, delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        let headers = properties.headers().clone().unwrap_or_default();
        let text = |name| header(&headers, name);
        let seconds = |name| timestamp(&headers, name);
        let short = |value: &Option<ShortString>| value.as_ref().map(|s| s.to_string());
        let body = &delivery.data;
        let mut shown = String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned();
        if body.len() > 2048 {
            shown.push_str(" …");
        }
        let sent = *properties.timestamp();
        let first_failure = seconds(idem_headers::FIRST_FAILURE);
        let last = seconds(idem_headers::LAST_FAILURE);
        Self {
            dlq: dlq.to_owned(),
            reason: text(idem_headers::REASON),
            error: text(idem_headers::ERROR),
            key: text(idem_headers::KEY),
            attempts: text(idem_headers::ATTEMPTS),
            first_failure: first_failure.map(output::unix_time),
            last_failure: last.map(output::unix_time),
            consumer: text(idem_headers::CONSUMER),
            original_queue: text(idem_headers::ORIGINAL_QUEUE),
            message_id: short(properties.message_id()),
            correlation_id: short(properties.correlation_id()),
            kind: short(properties.kind()),
            sent: sent.map(output::unix_time),
            body_bytes: body.len(),
            body: shown,
            since: [sent, first_failure].into_iter().flatten().min(),
            last: last.or(first_failure).or(sent),
        }
    }

    /// How long ago the message was first seen (sent or first failed), if it says.
    fn age(&self) -> Option<Duration> {
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(self.since?);
        Some(SystemTime::now().duration_since(since).unwrap_or_default())
    }
}

/// A header as text, whatever AMQP type it came in.
fn header(headers: &FieldTable, name: &str) -> Option<String> {
    Some(match headers.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Timestamp(t) => output::unix_time(*t),
        other => format!("{other:?}"),
    })
}

/// A header holding a time (AMQP timestamp, or a number of seconds).
fn timestamp(headers: &FieldTable, name: &str) -> Option<u64> {
    match headers.inner().get(name)? {
        AMQPValue::Timestamp(t) => Some(*t),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
        _ => None,
    }
}

/// Reasons that lie in the message itself: a replay of the same bytes fails the same way.
const UNCHANGED_COMES_BACK: [&str; 4] = ["malformed", "missing-key", "unreadable", "key-conflict"];

/// Headers idem adds on failure: removed on replay so the message starts over.
const FAILURE_HEADERS: [&str; 8] = [
    idem_headers::REASON,
    idem_headers::ERROR,
    idem_headers::ATTEMPTS,
    idem_headers::FIRST_FAILURE,
    idem_headers::LAST_FAILURE,
    idem_headers::CONSUMER,
    idem_headers::ORIGINAL_QUEUE,
    idem_headers::KEY,
];

pub(crate) async fn run(global: &Global, command: Command) -> anyhow::Result<Verdict> {
    let connection = crate::topology::connect(&global.amqp_url).await?;
    let verdict = match command {
        Command::List { scan } => list(global, &connection, scan).await,
        Command::Show { filter, limit } => show(global, &connection, &filter, limit).await,
        Command::Replay {
            filter,
            limit,
            yes,
            force,
            ledger_retention,
        } => {
            let replay = Replay {
                limit: limit.unwrap_or(usize::MAX),
                yes,
                force,
                retention: ledger_retention,
            };
            replay.run(global, &connection, &filter).await
        }
        Command::Purge { filter, yes } => purge(global, &connection, &filter, yes).await,
    };
    let _ = connection.close(200, "done".into()).await;
    verdict
}

/// The dead-letter queue of each of the global `--queue`s.
fn dead_letter_queues(global: &Global) -> Vec<String> {
    global
        .queues
        .iter()
        .map(|queue| idem::amqp::dead_letter_queue(queue))
        .collect()
}

/// Messages ready in `queue`; `None` when it does not exist.
pub(crate) async fn depth(connection: &Connection, queue: &str) -> anyhow::Result<Option<u32>> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    match found {
        Ok(found) => {
            let _ = channel.close(200, "counted".into()).await;
            Ok(Some(found.message_count()))
        }
        // The broker closed the channel: 404, no such queue.
        Err(error) if crate::topology::reply_code(&error) == Some(404) => Ok(None),
        Err(error) => Err(error).with_context(|| format!("cannot look at queue {queue:?}")),
    }
}

/// Takes letters from `dlq` unacknowledged (they go back when `channel` closes) until it is
/// empty, `scan` were read, or `enough` says so.
async fn read(
    channel: &Channel,
    dlq: &str,
    scan: usize,
    mut enough: impl FnMut(&Letter) -> bool,
) -> anyhow::Result<Vec<(Letter, Delivery)>> {
    let mut letters = Vec::new();
    while letters.len() < scan {
        let got = channel
            .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("cannot read {dlq:?}"))?;
        let Some(message) = got else { break };
        let letter = Letter::read(dlq, &message.delivery);
        let stop = enough(&letter);
        letters.push((letter, message.delivery));
        if stop {
            break;
        }
    }
    Ok(letters)
}

#[derive(Debug, Serialize)]
struct ReasonRow {
    dlq: String,
    reason: String,
    count: usize,
    oldest: Option<String>,
    newest: Option<String>,
}

async fn list(global: &Global, connection: &Connection, scan: usize) -> anyhow::Result<Verdict> {
    #[derive(Serialize)]
    struct Queue {
        dlq: String,
        exists: bool,
        messages: u32,
        read: usize,
        reasons: Vec<ReasonRow>,
    }
    let mut queues = Vec::new();
    for dlq in dead_letter_queues(global) {
        let Some(messages) = depth(connection, &dlq).await? else {
            queues.push(Queue {
                dlq,
                exists: false,
                messages: 0,
                read: 0,
                reasons: Vec::new(),
            });
            continue;
        };
        let channel = connection.create_channel().await?;
        let letters = read(&channel, &dlq, scan, |_| false).await?;
        let _ = channel.close(200, "listed".into()).await;
        // reason → (count, oldest, newest) by last failure.
        let mut by_reason: BTreeMap<String, (usize, Option<u64>, Option<u64>)> = BTreeMap::new();
        for (letter, _) in &letters {
            let reason = letter.reason.clone().unwrap_or_else(|| "(none)".into());
            let entry = by_reason.entry(reason).or_insert((0, None, None));
            entry.0 += 1;
            if let Some(at) = letter.last {
                entry.1 = Some(entry.1.map_or(at, |t| t.min(at)));
                entry.2 = Some(entry.2.map_or(at, |t| t.max(at)));
            }
        }
        let reasons = by_reason
            .into_iter()
            .map(|(reason, (count, oldest, newest))| ReasonRow {
                dlq: dlq.clone(),
                reason,
                count,
                oldest: oldest.map(output::unix_time),
                newest: newest.map(output::unix_time),
            })
            .collect();
        queues.push(Queue {
            dlq,
            exists: true,
            messages,
            read: letters.len(),
            reasons,
        });
    }
    if global.json {
        output::json(&queues)?;
        return Ok(Verdict::Fine);
    }
    let mut rows = Vec::new();
    for queue in &queues {
        if !queue.exists {
            rows.push(vec![
                queue.dlq.clone(),
                "(no such queue)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        } else if queue.reasons.is_empty() {
            rows.push(vec![
                queue.dlq.clone(),
                "(empty)".into(),
                "0".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for reason in &queue.reasons {
            rows.push(vec![
                reason.dlq.clone(),
                reason.reason.clone(),
                reason.count.to_string(),
                reason.oldest.clone().unwrap_or_else(|| "-".into()),
                reason.newest.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    output::table(&["dlq", "reason", "count", "oldest", "newest"], rows);
    for queue in queues.iter().filter(|q| q.read < q.messages as usize) {
        println!(
            "{}: {} messages, the first {} read (--scan)",
            queue.dlq, queue.messages, queue.read
        );
    }
    Ok(Verdict::Fine)
}

async fn show(
    global: &Global,
    connection: &Connection,
    filter: &Filter,
    limit: usize,
) -> anyhow::Result<Verdict> {
    let mut shown = Vec::new();
    for dlq in dead_letter_queues(global) {
        if shown.len() >= limit || depth(connection, &dlq).await?.is_none() {
            continue;
        }
        let channel = connection.create_channel().await?;
        let mut wanted = limit - shown.len();
        let letters = read(&channel, &dlq, usize::MAX, |letter| {
            if filter.matches(letter) {
                wanted -= 1;
            }
            wanted == 0
        })
        .await?;
        let _ = channel.close(200, "shown".into()).await;
        shown.extend(
            letters
                .into_iter()
                .map(|(letter, _)| letter)
                .filter(|letter| filter.matches(letter)),
        );
    }
    if global.json {
        output::json(&shown)?;
        return Ok(Verdict::Fine);
    }
    let dash = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    for (n, letter) in shown.iter().enumerate() {
        let rows = vec![
            vec!["dlq".into(), letter.dlq.clone()],
            vec!["reason".into(), dash(&letter.reason)],
            vec!["error".into(), dash(&letter.error)],
            vec!["key".into(), dash(&letter.key)],
            vec!["attempts".into(), dash(&letter.attempts)],
            vec!["first failure".into(), dash(&letter.first_failure)],
            vec!["last failure".into(), dash(&letter.last_failure)],
            vec!["consumer".into(), dash(&letter.consumer)],
            vec!["original queue".into(), dash(&letter.original_queue)],
            vec!["message id".into(), dash(&letter.message_id)],
            vec!["correlation id".into(), dash(&letter.correlation_id)],
            vec!["kind".into(), dash(&letter.kind)],
            vec!["sent".into(), dash(&letter.sent)],
            vec![
                format!("body ({} bytes)", letter.body_bytes),
                letter.body.clone(),
            ],
        ];
        output::table(&[&format!("dead letter {}", n + 1), ""], rows);
    }
    println!(
        "{} shown; nothing was taken from the queue (show only reads)",
        shown.len()
    );
    Ok(Verdict::Fine)
}

/// What `idem dlq replay` was asked to do.
struct Replay {
    limit: usize,
    yes: bool,
    force: bool,
    retention: Duration,
}

#[derive(Debug, Default, Serialize)]
struct Replayed {
    /// Sent back (or, in a dry run, would be).
    replayed: Vec<Sent>,
    /// Left in the DLQ: older than the ledger retention.
    refused: Vec<Sent>,
    dry_run: bool,
}

#[derive(Debug, Serialize)]
struct Sent {
    dlq: String,
    key: Option<String>,
    message_id: Option<String>,
    reason: Option<String>,
    to: String,
    age: Option<String>,
}

impl Replay {
    async fn run(
        &self,
        global: &Global,
        connection: &Connection,
        filter: &Filter,
    ) -> anyhow::Result<Verdict> {
        let mut done = Replayed {
            dry_run: !self.yes,
            ..Replayed::default()
        };
        for (dlq, queue) in dead_letter_queues(global).iter().zip(&global.queues) {
            if done.replayed.len() >= self.limit || depth(connection, dlq).await?.is_none() {
                continue;
            }
            self.queue(connection, dlq, queue, filter, &mut done, global.json)
                .await?;
        }
        let verdict = if done.refused.is_empty() {
            Verdict::Fine
        } else {
            Verdict::Attention
        };
        if global.json {
            output::json(&done)?;
            return Ok(verdict);
        }
        let row = |sent: &Sent| {
            vec![
                sent.dlq.clone(),
                sent.key
                    .clone()
                    .or_else(|| sent.message_id.clone())
                    .unwrap_or_else(|| "-".into()),
                sent.reason.clone().unwrap_or_else(|| "-".into()),
                sent.age.clone().unwrap_or_else(|| "unknown".into()),
                sent.to.clone(),
            ]
        };
        if !self.yes && !done.replayed.is_empty() {
            output::table(
                &["dlq", "key", "reason", "age", "would go to"],
                done.replayed.iter().map(row).collect(),
            );
        }
        let hopeless = done
            .replayed
            .iter()
            .filter(|sent| {
                sent.reason
                    .as_deref()
                    .is_some_and(|reason| UNCHANGED_COMES_BACK.contains(&reason))
            })
            .count();
        if hopeless > 0 {
            println!(
                "note: {hopeless} of them failed on what they carry (malformed, missing key, unreadable, \
                 key conflict): sent back unchanged they come straight back; they need a fixed producer"
            );
        }
        if self.yes {
            println!("replayed {} dead letters", done.replayed.len());
        } else {
            println!(
                "{} would be replayed; run again with --yes to do it",
                done.replayed.len()
            );
        }
        if !done.refused.is_empty() {
            output::table(
                &["dlq", "key", "reason", "age", "refused"],
                done.refused.iter().map(row).collect(),
            );
            println!(
                "{} left in the DLQ: older than the ledger retention ({}), or of unknown age. The ledger \
                 may have forgotten their keys, so a copy applied back then would be applied again. \
                 Check each key (idem ledger show), then --force to replay them anyway.",
                done.refused.len(),
                output::duration(self.retention)
            );
        }
        Ok(verdict)
    }

    /// Replays the matching letters of one DLQ; the others go back when the channel closes.
    async fn queue(
        &self,
        connection: &Connection,
        dlq: &str,
        queue: &str,
        filter: &Filter,
        done: &mut Replayed,
        json: bool,
    ) -> anyhow::Result<()> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut wanted = self.limit - done.replayed.len();
        let letters = read(&channel, dlq, usize::MAX, |letter| {
            if filter.matches(letter) && self.replayable(letter) {
                wanted -= 1;
            }
            wanted == 0
        })
        .await?;
        let mut chosen = Vec::new();
        for (letter, delivery) in letters {
            if !filter.matches(&letter) {
                continue;
            }
            let sent = Sent {
                dlq: dlq.to_owned(),
                key: letter.key.clone(),
                message_id: letter.message_id.clone(),
                reason: letter.reason.clone(),
                to: letter
                    .original_queue
                    .clone()
                    .unwrap_or_else(|| queue.to_owned()),
                age: letter.age().map(output::duration),
            };
            if self.replayable(&letter) {
                chosen.push((sent, delivery));
            } else {
                done.refused.push(sent);
            }
        }
        if !self.yes {
            done.replayed
                .extend(chosen.into_iter().map(|(sent, _)| sent));
            let _ = channel.close(200, "dry run".into()).await;
            return Ok(());
        }
        let progress = progress(chosen.len(), json, "replaying");
        for (sent, delivery) in chosen {
            republish(&channel, &sent.to, &delivery)
                .await
                .with_context(|| {
                    format!(
                        "the dead letter stays in {dlq}; {} were replayed before it",
                        done.replayed.len()
                    )
                })?;
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .with_context(|| {
                    format!(
                        "replayed to {}, but could not remove it from {dlq}: it is in both; the ledger \
                         absorbs the second copy",
                        sent.to
                    )
                })?;
            done.replayed.push(sent);
            progress.inc(1);
        }
        progress.finish_and_clear();
        let _ = channel.close(200, "replayed".into()).await;
        Ok(())
    }

    /// Whether `letter` may be replayed: young enough for the ledger to remember its key.
    fn replayable(&self, letter: &Letter) -> bool {
        self.force || letter.age().is_some_and(|age| age < self.retention)
    }
}

/// Publishes `delivery` to `queue` without idem's failure headers and waits for the broker to
/// confirm it was routed and stored.
async fn republish(channel: &Channel, queue: &str, delivery: &Delivery) -> anyhow::Result<()> {
    let mut cleaned = FieldTable::default();
    if let Some(headers) = delivery.properties.headers() {
        for (name, value) in headers.inner() {
            if !FAILURE_HEADERS.contains(&name.as_str()) {
                cleaned.insert(name.clone(), value.clone());
            }
        }
    }
    let properties = delivery.properties.clone().with_headers(cleaned);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        bail!("the broker refused the replay to {queue:?}");
    }
    if confirm.take_message().is_some() {
        bail!("no queue {queue:?} took the replay (does it exist?)");
    }
    Ok(())
}

/// A progress bar on standard error (drawn only on a terminal).
fn progress(length: usize, json: bool, what: &'static str) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(length as u64).with_message(what);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({per_sec}, {eta})")
    {
        bar.set_style(style);
    }
    bar
}

async fn purge(
    global: &Global,
    connection: &Connection,
    filter: &Filter,
    yes: bool,
) -> anyhow::Result<Verdict> {
    #[derive(Serialize)]
    struct Purged {
        dlq: String,
        deleted: usize,
        dry_run: bool,
    }
    let mut purged = Vec::new();
    for dlq in dead_letter_queues(global) {
        if depth(connection, &dlq).await?.is_none() {
            continue;
        }
        let channel = connection.create_channel().await?;
        let letters = read(&channel, &dlq, usize::MAX, |_| false).await?;
        let chosen: Vec<_> = letters
            .into_iter()
            .filter(|(letter, _)| filter.matches(letter))
            .collect();
        let mut deleted = 0;
        if yes {
            let progress = progress(chosen.len(), global.json, "deleting");
            for (_, delivery) in &chosen {
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .with_context(|| format!("{deleted} deleted from {dlq}, then"))?;
                deleted += 1;
                progress.inc(1);
            }
            progress.finish_and_clear();
        }
        let _ = channel.close(200, "purged".into()).await;
        purged.push(Purged {
            dlq,
            deleted: if yes { deleted } else { chosen.len() },
            dry_run: !yes,
        });
    }
    if global.json {
        output::json(&purged)?;
        return Ok(Verdict::Fine);
    }
    for queue in &purged {
        if yes {
            println!("deleted {} dead letters from {}", queue.deleted, queue.dlq);
        } else {
            println!(
                "{} dead letters in {} would be deleted; run again with --yes to do it",
                queue.deleted, queue.dlq
            );
        }
    }
    Ok(Verdict::Fine)
}
