//! `idem doctor`: everything an operator checks before (or after) a deploy, in one look.

use crate::database::{self, with_pool, Database};
use crate::output;
use crate::topology::Retry;
use crate::{Global, Verdict};
use clap::Args;
use idem::amqp::lapin::Connection;
use idem::sqlx::Pool;
use idem::Backend;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct Options {
    /// Dead letters a queue may hold before it needs attention.
    #[arg(long, default_value_t = 0)]
    dlq_max: u32,
    /// How long the oldest pending outbox message may wait before it needs attention.
    #[arg(long, default_value = "60s", value_parser = crate::duration)]
    outbox_max_age: Duration,
    /// The consumers' ledger retention: rows a day older than it mean the purge is not running.
    #[arg(long, env = "IDEM_LEDGER_RETENTION", default_value = "30d", value_parser = crate::duration)]
    ledger_retention: Duration,
    #[command(flatten)]
    retry: Retry,
}

/// One line of the report.
#[derive(Debug, Serialize)]
struct Check {
    check: String,
    /// `ok` or `attention`.
    status: &'static str,
    detail: String,
}

/// The report being written.
#[derive(Default)]
struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn ok(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.push(check, true, detail);
    }

    fn attention(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.push(check, false, detail);
    }

    fn push(&mut self, check: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            check: check.into(),
            status: if ok { "ok" } else { "attention" },
            detail: detail.into(),
        });
    }
}

pub(crate) async fn run(global: &Global, options: Options) -> anyhow::Result<Verdict> {
    let mut report = Report::default();
    let policy = options.retry.policy()?;
    match crate::topology::connect(&global.amqp_url).await {
        Ok(connection) => {
            report.ok("broker", idem::redact_url(&global.amqp_url));
            broker(&mut report, &connection, global, &policy, options.dlq_max).await;
            let _ = connection.close(200, "checked".into()).await;
        }
        Err(error) => {
            report.attention("broker", output::error(&error));
            report.attention("topology", "not checked: no broker");
            report.attention("dead letters", "not checked: no broker");
        }
    }
    match database::open(&global.database_url).await {
        Ok(database) => {
            let backend = match &database {
                Database::Postgres(_) => "PostgreSQL",
                Database::Sqlite(_) => "SQLite",
            };
            report.ok(
                "database",
                format!("{} ({backend})", idem::redact_url(&global.database_url)),
            );
            with_pool!(&database, pool => store(&mut report, pool, &options).await);
            database.close().await;
        }
        Err(error) => {
            report.attention("database", output::error(&error));
            for check in ["migrations", "outbox", "ledger"] {
                report.attention(check, "not checked: no database");
            }
        }
    }
    let healthy = report.checks.iter().all(|c| c.status == "ok");
    if global.json {
        output::json(&serde_json::json!({ "healthy": healthy, "checks": report.checks }))?;
    } else {
        output::table(
            &["check", "status", "detail"],
            report
                .checks
                .iter()
                .map(|c| vec![c.check.clone(), c.status.into(), c.detail.clone()])
                .collect(),
        );
        let attention = report.checks.iter().filter(|c| c.status != "ok").count();
        if healthy {
            println!("all {} checks ok", report.checks.len());
        } else {
            println!(
                "{attention} of {} checks need attention",
                report.checks.len()
            );
        }
    }
    Ok(if healthy {
        Verdict::Fine
    } else {
        Verdict::Attention
    })
}

/// Topology and dead letters of each queue.
async fn broker(
    report: &mut Report,
    connection: &Connection,
    global: &Global,
    policy: &idem::RetryPolicy,
    dlq_max: u32,
) {
    for queue in &global.queues {
        let name = format!("topology {queue}");
        let checked = crate::topology::check(
            connection,
            std::slice::from_ref(queue),
            policy,
            global.queue_type,
        );
        match checked.await {
            Ok(rows) => {
                let wrong: Vec<String> = rows
                    .iter()
                    .filter(|row| row.state != "ok")
                    .map(|row| format!("{} {}: {}", row.queue, row.state, row.detail))
                    .collect();
                if wrong.is_empty() {
                    report.ok(name, format!("{} queues as idem declares them", rows.len()));
                } else {
                    report.attention(name, wrong.join("; "));
                }
            }
            Err(error) => report.attention(name, output::error(&error)),
        }
        let dlq = idem::amqp::dead_letter_queue(queue);
        let name = format!("dead letters {dlq}");
        match crate::dlq::depth(connection, &dlq).await {
            Ok(Some(depth)) if depth <= dlq_max => report.ok(name, format!("{depth} messages")),
            Ok(Some(depth)) => report.attention(
                name,
                format!("{depth} messages (over {dlq_max}): `idem dlq list`"),
            ),
            Ok(None) => report.attention(name, "no such queue"),
            Err(error) => report.attention(name, output::error(&error)),
        }
    }
}

/// Migrations, outbox and ledger.
async fn store<DB: Backend>(report: &mut Report, pool: &Pool<DB>, options: &Options) {
    match idem::schema_status(pool).await {
        Ok(schema) if schema.too_new() => report.attention(
            "migrations",
            format!(
                "the database has idem schema versions up to {}, this idem knows {}: run the newer idem",
                schema.applied.iter().max().copied().unwrap_or(0),
                schema.known
            ),
        ),
        Ok(schema) if schema.applied.is_empty() => report.attention(
            "migrations",
            "no idem schema: no consumer or relay has started on this database (they migrate on start)",
        ),
        Ok(schema) if !schema.pending().is_empty() => report.attention(
            "migrations",
            format!(
                "versions {:?} of {} not applied: a consumer or relay of this idem applies them on start",
                schema.pending(),
                schema.known
            ),
        ),
        Ok(schema) => report.ok("migrations", format!("version {} (current)", schema.known)),
        Err(error) => report.attention("migrations", error.to_string()),
    }
    match crate::outbox::status(pool).await {
        Ok(status) => {
            let parked: u64 = status.parked.iter().map(|p| p.rows).sum();
            let oldest = status.oldest_pending_seconds.unwrap_or(0);
            let waited = match status.oldest_pending_seconds {
                Some(seconds) => format!(
                    ", oldest {}",
                    output::duration(Duration::from_secs(seconds))
                ),
                None => String::new(),
            };
            let relays = match status.relays.len() {
                0 => "no relay running".to_string(),
                1 => "1 relay".to_string(),
                n => format!("{n} relays"),
            };
            let detail = format!(
                "{} pending{waited}, {parked} parked, {relays}",
                status.pending
            );
            if parked > 0 {
                report.attention("outbox", format!("{detail}: `idem outbox status`"));
            } else if Duration::from_secs(oldest) > options.outbox_max_age {
                report.attention(
                    "outbox",
                    format!(
                        "{detail}: over {}; is a relay running?",
                        output::duration(options.outbox_max_age)
                    ),
                );
            } else {
                report.ok("outbox", detail);
            }
        }
        Err(error) => report.attention("outbox", output::error(&error)),
    }
    // A day past the retention: the background purge runs hourly, so anything older means it
    // is not running (no consumer up, or it fails: see the consumers' logs).
    let overdue = options.ledger_retention + Duration::from_secs(86_400);
    match crate::ledger::stats(pool, overdue).await {
        Ok((consumers, bytes)) => {
            let rows: u64 = consumers.iter().map(|c| c.rows).sum();
            let late: u64 = consumers.iter().map(|c| c.past_retention).sum();
            let size = bytes.map_or("size unknown".into(), output::bytes);
            let detail = format!(
                "{rows} rows of {} consumer(s), {size} on disk",
                consumers.len()
            );
            if late > 0 {
                report.attention(
                    "ledger",
                    format!(
                        "{detail}; {late} rows older than the retention ({}) and a day: is the purge running?",
                        output::duration(options.ledger_retention)
                    ),
                );
            } else {
                report.ok("ledger", detail);
            }
        }
        Err(error) => report.attention("ledger", output::error(&error)),
    }
}
