//! `idem ledger`: how big the dedup ledger is, what it says about a key, and purging old rows.

use crate::database::{self, with_pool};
use crate::output;
use crate::{Global, Verdict};
use anyhow::{bail, Context};
use clap::Subcommand;
use idem::sqlx::Pool;
use idem::Backend;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Rows per consumer, the oldest and newest, rows past the retention, size on disk.
    Stats {
        /// The consumers' ledger retention: rows older than it are counted apart.
        #[arg(long, env = "IDEM_LEDGER_RETENTION", default_value = "30d", value_parser = crate::duration)]
        ledger_retention: Duration,
    },
    /// When a key was applied, from which message, with which payload fingerprint.
    Show {
        /// The consumer (the ledger's scope; by default the queue's name).
        #[arg(long)]
        consumer: String,
        /// The idempotency key.
        key: String,
    },
    /// Delete rows applied more than `--older-than` ago, in short batches, oldest first. A dry
    /// run unless `--yes`.
    Purge {
        /// How old a row must be to go (`30d`). A key purged is forgotten: a copy of its
        /// message arriving later is applied again.
        #[arg(long, value_parser = crate::duration)]
        older_than: Duration,
        /// Only this consumer's rows (default: every consumer's).
        #[arg(long)]
        consumer: Option<String>,
        /// Do it.
        #[arg(long)]
        yes: bool,
        /// Allow `--older-than` below 8 days (idem's default replay window and a day's margin).
        #[arg(long)]
        force: bool,
        /// Rows per transaction.
        #[arg(long, default_value_t = 5_000)]
        batch: u32,
    },
}

/// Below this, a purge may forget keys whose copies can still come (idem's default replay
/// window of 7 days plus a day): refused without `--force`.
const SHORTEST_SAFE: Duration = Duration::from_secs(8 * 86_400);

pub(crate) async fn run(global: &Global, command: Command) -> anyhow::Result<Verdict> {
    let database = database::open(&global.database_url).await?;
    let verdict = with_pool!(&database, pool => run_on(global, pool, command).await);
    database.close().await;
    verdict
}

/// One consumer's row of `idem ledger stats`.
#[derive(Debug, Serialize)]
pub(crate) struct Stats {
    pub consumer: String,
    pub rows: u64,
    pub oldest: String,
    pub newest: String,
    /// Rows older than the retention: the purge's backlog.
    pub past_retention: u64,
}

/// The ledger per consumer and its size on disk.
pub(crate) async fn stats<DB: Backend>(
    pool: &Pool<DB>,
    retention: Duration,
) -> anyhow::Result<(Vec<Stats>, Option<u64>)> {
    let stats = idem::ledger::stats(pool, retention).await?;
    let bytes = idem::ledger::size_on_disk(pool).await?;
    let rows = stats
        .into_iter()
        .map(|s| Stats {
            consumer: s.consumer,
            rows: s.rows,
            oldest: output::time(s.oldest),
            newest: output::time(s.newest),
            past_retention: s.older,
        })
        .collect();
    Ok((rows, bytes))
}

async fn run_on<DB: Backend>(
    global: &Global,
    pool: &Pool<DB>,
    command: Command,
) -> anyhow::Result<Verdict> {
    match command {
        Command::Stats { ledger_retention } => {
            let (rows, bytes) = stats(pool, ledger_retention).await?;
            if global.json {
                output::json(&serde_json::json!({ "consumers": rows, "bytes_on_disk": bytes }))?;
                return Ok(Verdict::Fine);
            }
            let retention = output::duration(ledger_retention);
            output::table(
                &[
                    "consumer",
                    "rows",
                    "oldest",
                    "newest",
                    &format!("older than {retention}"),
                ],
                rows.into_iter()
                    .map(|s| {
                        vec![
                            s.consumer,
                            s.rows.to_string(),
                            s.oldest,
                            s.newest,
                            s.past_retention.to_string(),
                        ]
                    })
                    .collect(),
            );
            match bytes {
                Some(bytes) => println!("on disk: {} (indexes included)", output::bytes(bytes)),
                None => println!("on disk: unknown (this SQLite has no dbstat)"),
            }
            Ok(Verdict::Fine)
        }
        Command::Show { consumer, key } => show(global, pool, &consumer, &key).await,
        Command::Purge {
            older_than,
            consumer,
            yes,
            force,
            batch,
        } => {
            if older_than < SHORTEST_SAFE && !force {
                bail!(
                    "--older-than {} is under 8 days: idem's default replay window (7 days) plus a day. \
                     A key purged is forgotten, and a copy of its message replayed or redelivered later \
                     is applied again. Keep to the consumers' ledger retention, or add --force",
                    output::duration(older_than)
                );
            }
            if batch == 0 {
                bail!("--batch 0 deletes nothing: give the rows per transaction, e.g. 5000");
            }
            purge(global, pool, older_than, consumer.as_deref(), yes, batch).await
        }
    }
}

async fn show<DB: Backend>(
    global: &Global,
    pool: &Pool<DB>,
    consumer: &str,
    key: &str,
) -> anyhow::Result<Verdict> {
    let Some(entry) = idem::ledger::lookup(pool, consumer, key).await? else {
        if global.json {
            output::json(&serde_json::Value::Null)?;
        } else {
            println!(
                "{consumer:?} has no record of key {key:?}: never applied, or purged after the ledger retention"
            );
        }
        return Ok(Verdict::Attention);
    };
    let fingerprint: String = entry
        .fingerprint
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let applied = serde_json::json!({
        "consumer": entry.consumer,
        "key": entry.key,
        "applied_at": output::time(entry.processed_at),
        "message_id": entry.message_id,
        "correlation_id": entry.correlation_id,
        "fingerprint": fingerprint,
    });
    if global.json {
        output::json(&applied)?;
    } else {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        output::table(
            &["", "ledger"],
            vec![
                vec!["consumer".into(), entry.consumer.clone()],
                vec!["key".into(), entry.key.clone()],
                vec![
                    "applied at".into(),
                    format!(
                        "{} ({} ago)",
                        output::time(entry.processed_at),
                        output::age(entry.processed_at)
                    ),
                ],
                vec!["message id".into(), dash(&entry.message_id)],
                vec!["correlation id".into(), dash(&entry.correlation_id)],
                vec!["payload fingerprint".into(), fingerprint],
            ],
        );
    }
    Ok(Verdict::Fine)
}

async fn purge<DB: Backend>(
    global: &Global,
    pool: &Pool<DB>,
    older_than: Duration,
    consumer: Option<&str>,
    yes: bool,
    batch: u32,
) -> anyhow::Result<Verdict> {
    let stats = idem::ledger::stats(pool, older_than).await?;
    let chosen: Vec<_> = stats
        .into_iter()
        .filter(|s| consumer.is_none_or(|c| c == s.consumer))
        .collect();
    let total: u64 = chosen.iter().map(|s| s.older).sum();
    if !yes {
        if global.json {
            output::json(&serde_json::json!({ "would_delete": total, "dry_run": true }))?;
        } else {
            for s in &chosen {
                println!("{}: {} rows would be deleted", s.consumer, s.older);
            }
            println!("{total} rows in all; run again with --yes to delete them");
        }
        return Ok(Verdict::Fine);
    }
    let bar = if global.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "purging {bar:40} {pos}/{len} rows ({per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    let mut deleted = 0_u64;
    for s in &chosen {
        loop {
            let started = Instant::now();
            let done = idem::ledger::purge_batch(pool, &s.consumer, older_than, batch)
                .await
                .with_context(|| format!("{deleted} rows deleted before this"))?;
            let Some(done) = done else {
                bail!(
                    "another instance is purging {:?}'s ledger now (its consumer's background purge): \
                     {deleted} rows deleted; try again later",
                    s.consumer
                );
            };
            deleted += done;
            bar.inc(done);
            if done < u64::from(batch) {
                break;
            }
            // As long again as the batch took: the consumers keep half of this connection's
            // share of the database while the purge runs.
            tokio::time::sleep(started.elapsed()).await;
        }
    }
    bar.finish_and_clear();
    if global.json {
        output::json(&serde_json::json!({ "deleted": deleted }))?;
    } else {
        println!(
            "deleted {deleted} ledger rows applied more than {} ago",
            output::duration(older_than)
        );
    }
    Ok(Verdict::Fine)
}
