//! `idem topology`: the queues idem declares for a consumer, against what the broker has.

use crate::output;
use crate::{Global, Verdict};
use anyhow::Context;
use clap::{Args, Subcommand};
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::Connection;
use idem::amqp::{QueueSpec, QueueState, QueueType};
use idem::RetryPolicy;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Compare, changing nothing: which queues are missing or declared with other arguments.
    Check(Retry),
    /// Declare what is missing, as a consumer does on start.
    Declare(Retry),
}

/// The consumer's retry policy (`ConsumerBuilder::retry`): its delays name the delay queues.
#[derive(Debug, Args, Clone)]
pub(crate) struct Retry {
    /// The first retry delay.
    #[arg(long, default_value = "1s", value_parser = crate::duration)]
    retry_initial: Duration,
    /// The longest retry delay.
    #[arg(long, default_value = "5m", value_parser = crate::duration)]
    retry_max: Duration,
    /// Attempts in all, the first included.
    #[arg(long, default_value_t = 8)]
    retry_attempts: u32,
}

impl Retry {
    pub(crate) fn policy(&self) -> anyhow::Result<RetryPolicy> {
        let policy = RetryPolicy::exponential(self.retry_initial, self.retry_max)
            .max_attempts(self.retry_attempts);
        policy
            .validate()
            .context("the retry options (--retry-initial, --retry-max, --retry-attempts)")?;
        Ok(policy)
    }
}

/// Connects to the broker, saying where the URL comes from when it fails; a broker that does
/// not answer within [`crate::CONNECT_TIMEOUT`] is an error, not a hung deploy gate.
pub(crate) async fn connect(url: &str) -> anyhow::Result<Connection> {
    let connected = tokio::time::timeout(crate::CONNECT_TIMEOUT, idem::amqp::connect(url)).await;
    let Ok(connected) = connected else {
        anyhow::bail!(
            "no answer from the broker at {} within {:?} (the broker is --amqp-url, or AMQP_URL)",
            idem::redact_url(url),
            crate::CONNECT_TIMEOUT
        );
    };
    connected.map_err(|error| anyhow::anyhow!("{error} (the broker is --amqp-url, or AMQP_URL)"))
}

/// The broker's reply code in `error`, if the broker refused something.
pub(crate) fn reply_code(error: &idem::amqp::lapin::Error) -> Option<u16> {
    match error.kind() {
        idem::amqp::lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// One queue's row of a check.
#[derive(Debug, Serialize)]
pub(crate) struct Checked {
    pub queue: String,
    pub role: String,
    /// `ok`, `missing` or `differs`.
    pub state: &'static str,
    /// The arguments idem declares it with.
    pub arguments: String,
    /// What differs, in the broker's words; or the queue's depth.
    pub detail: String,
}

/// Checks the queues of each of `queues`.
pub(crate) async fn check(
    connection: &Connection,
    queues: &[String],
    retry: &RetryPolicy,
    queue_type: QueueType,
) -> anyhow::Result<Vec<Checked>> {
    let mut rows = Vec::new();
    for queue in queues {
        let found = idem::amqp::check_consumer_queues(connection, queue, retry, queue_type)
            .await
            .with_context(|| format!("cannot check the queues of {queue:?}"))?;
        rows.extend(found.into_iter().map(|(spec, state)| checked(spec, state)));
    }
    Ok(rows)
}

fn checked(spec: QueueSpec, state: QueueState) -> Checked {
    let (state, detail) = match state {
        QueueState::Matches {
            messages,
            consumers,
        } => ("ok", format!("{messages} messages, {consumers} consumers")),
        QueueState::Missing => (
            "missing",
            "declared by the consumer on start, or `idem topology declare`".into(),
        ),
        QueueState::Differs(words) => ("differs", words),
        _ => ("unknown", String::new()),
    };
    Checked {
        queue: spec.name,
        role: spec.role,
        state,
        arguments: arguments(&spec.arguments),
        detail,
    }
}

/// `durable, x-message-ttl=4000, …`.
fn arguments(table: &FieldTable) -> String {
    let mut parts = vec!["durable".to_owned()];
    for (name, value) in table.inner() {
        let value = match value {
            AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
            AMQPValue::LongUInt(n) => n.to_string(),
            AMQPValue::LongInt(n) => n.to_string(),
            AMQPValue::LongLongInt(n) => n.to_string(),
            other => format!("{other:?}"),
        };
        parts.push(format!("{name}={value}"));
    }
    parts.join(", ")
}

pub(crate) async fn run(global: &Global, command: Command) -> anyhow::Result<Verdict> {
    let connection = connect(&global.amqp_url).await?;
    let verdict = match command {
        Command::Check(retry) => {
            let rows = check(
                &connection,
                &global.queues,
                &retry.policy()?,
                global.queue_type,
            )
            .await?;
            let verdict = if rows.iter().all(|row| row.state == "ok") {
                Verdict::Fine
            } else {
                Verdict::Attention
            };
            if global.json {
                output::json(&rows)?;
            } else {
                output::table(
                    &["queue", "role", "state", "idem declares", "detail"],
                    rows.into_iter()
                        .map(|r| vec![r.queue, r.role, r.state.into(), r.arguments, r.detail])
                        .collect(),
                );
            }
            verdict
        }
        Command::Declare(retry) => {
            let policy = retry.policy()?;
            for queue in &global.queues {
                idem::amqp::declare_consumer_queues(&connection, queue, &policy, global.queue_type)
                    .await
                    .with_context(|| format!("cannot declare the queues of {queue:?}"))?;
                let declared = idem::amqp::consumer_queues(queue, &policy, global.queue_type);
                if !global.json {
                    for spec in &declared {
                        println!("declared {} ({})", spec.name, spec.role);
                    }
                }
            }
            if global.json {
                output::json(&serde_json::json!({ "declared": global.queues }))?;
            }
            Verdict::Fine
        }
    };
    let _ = connection.close(200, "done".into()).await;
    Ok(verdict)
}
