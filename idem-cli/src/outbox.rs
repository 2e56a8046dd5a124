//! `idem outbox`: the relay's backlog and the messages it parked.

use crate::database::{self, with_pool};
use crate::output;
use crate::{Global, Verdict};
use clap::Subcommand;
use idem::sqlx::Pool;
use idem::Backend;
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Pending messages, the oldest one's age, and parked messages by destination with the
    /// broker's last answer.
    Status,
    /// Send parked messages again (once their cause is fixed). A dry run unless `--yes`.
    Retry {
        /// Every parked message.
        #[arg(long, required = true)]
        parked: bool,
        /// Do it.
        #[arg(long)]
        yes: bool,
    },
}

/// The outbox at a glance, as printed.
#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub pending: u64,
    pub oldest_pending_seconds: Option<u64>,
    pub parked: Vec<Parked>,
    pub relays: Vec<Relay>,
    /// PostgreSQL: pending messages in partitions no relay holds.
    pub unheld: Option<u64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Relay {
    pub relay: String,
    /// PostgreSQL: partitions of the outbox it publishes (0: standing by).
    pub partitions: Option<u32>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Parked {
    pub exchange: String,
    pub routing_key: String,
    pub rows: u64,
    pub since: String,
    pub last_error: Option<String>,
}

pub(crate) async fn status<DB: Backend>(pool: &Pool<DB>) -> anyhow::Result<Status> {
    let status = idem::outbox::status(pool).await?;
    Ok(Status {
        pending: status.pending,
        oldest_pending_seconds: status.oldest_pending.map(|d| d.as_secs()),
        parked: status
            .parked
            .into_iter()
            .map(|p| Parked {
                exchange: p.exchange,
                routing_key: p.routing_key,
                rows: p.rows,
                since: output::time(p.since),
                last_error: p.last_error,
            })
            .collect(),
        relays: status
            .relays
            .into_iter()
            .map(|r| Relay {
                relay: r.relay,
                partitions: r.partitions,
            })
            .collect(),
        unheld: status.unheld,
    })
}

/// The relays in one line: how many, and who publishes how much.
pub(crate) fn relays_line(status: &Status) -> String {
    if status.relays.is_empty() {
        return "relays: none running".into();
    }
    let each: Vec<String> = status
        .relays
        .iter()
        .map(|r| match r.partitions {
            Some(n) => format!("{} ({n}/{} partitions)", r.relay, idem::outbox::PARTITIONS),
            None => format!("{} (holds the lease)", r.relay),
        })
        .collect();
    format!("relays: {} — {}", status.relays.len(), each.join(", "))
}

pub(crate) async fn run(global: &Global, command: Command) -> anyhow::Result<Verdict> {
    let database = database::open(&global.database_url).await?;
    let verdict = with_pool!(&database, pool => run_on(global, pool, command).await);
    database.close().await;
    verdict
}

async fn run_on<DB: Backend>(
    global: &Global,
    pool: &Pool<DB>,
    command: Command,
) -> anyhow::Result<Verdict> {
    match command {
        Command::Status => {
            let status = status(pool).await?;
            let verdict = if status.parked.is_empty() {
                Verdict::Fine
            } else {
                Verdict::Attention
            };
            if global.json {
                output::json(&status)?;
                return Ok(verdict);
            }
            let oldest = status.oldest_pending_seconds.map_or("-".into(), |s| {
                output::duration(std::time::Duration::from_secs(s))
            });
            println!("pending: {} (oldest waiting {oldest})", status.pending);
            println!("{}", relays_line(&status));
            if let Some(unheld) = status.unheld.filter(|&n| n > 0) {
                println!(
                    "{unheld} of them wait in partitions no relay holds: start a relay (every \
                     instance of the service runs one), or see why the relays cannot reach the \
                     broker (their logs)"
                );
            }
            let parked: u64 = status.parked.iter().map(|p| p.rows).sum();
            println!("parked: {parked}");
            if !status.parked.is_empty() {
                output::table(
                    &["exchange", "routing key", "parked", "since", "last error"],
                    status
                        .parked
                        .into_iter()
                        .map(|p| {
                            vec![
                                if p.exchange.is_empty() {
                                    "(default)".into()
                                } else {
                                    p.exchange
                                },
                                p.routing_key,
                                p.rows.to_string(),
                                p.since,
                                p.last_error.unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect(),
                );
                println!("fix the cause, then `idem outbox retry --parked --yes`");
            }
            Ok(verdict)
        }
        Command::Retry { parked: _, yes } => {
            if !yes {
                let parked = idem::outbox::parked(pool).await?;
                if global.json {
                    output::json(&serde_json::json!({ "would_retry": parked, "dry_run": true }))?;
                } else {
                    println!("{parked} parked messages would be sent again; run again with --yes to do it");
                }
                return Ok(Verdict::Fine);
            }
            let retried = idem::outbox::unpark_all(pool).await?;
            if global.json {
                output::json(&serde_json::json!({ "retried": retried }))?;
            } else {
                println!(
                    "{retried} parked messages are due again: the relay publishes them on its next round"
                );
            }
            Ok(Verdict::Fine)
        }
    }
}
