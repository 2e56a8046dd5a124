//! The dead-letter queue at 3 a.m.: see what is in it and why, then send it back once fixed.
//!
//! ```text
//! cargo run --example dlq -- peek                      # every dead letter of `payments`, oldest first
//! cargo run --example dlq -- peek --reason rejected --limit 5
//! cargo run --example dlq -- replay --reason retries-exhausted --yes
//! ```
//!
//! `peek` reads without taking: each message goes back to the DLQ, in order, when it is done.
//! `replay` republishes to the original queue with idem's failure headers removed (so the retry
//! policy starts over), waits for the broker's confirm, and only then removes the dead letter:
//! a crash midway duplicates at most one message, which the ledger absorbs. Replaying a
//! `key-conflict` or `malformed` letter unchanged just parks it again; those need a fixed
//! producer, not a replay.
//!
//! Environment: `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), `IDEM_QUEUE`
//! (default `payments`).

use clap::{Parser, Subcommand};
use idem::amqp::headers as idem_headers;
use idem::amqp::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use idem::amqp::lapin::types::{AMQPValue, FieldTable, ShortString};
use idem::amqp::lapin::Channel;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(about = "Inspect and replay idem dead letters")]
struct Cli {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    amqp_url: String,
    /// The consumer's queue; its dead letters are in `<queue>.dlq`.
    #[arg(long, env = "IDEM_QUEUE", default_value = "payments", global = true)]
    queue: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print dead letters: reason, error, attempts, times, ids and the body.
    Peek {
        /// Only letters with this `x-idem-reason`.
        #[arg(long)]
        reason: Option<String>,
        /// Print at most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Send dead letters back to the original queue.
    Replay {
        /// Only letters with this `x-idem-reason`.
        #[arg(long)]
        reason: Option<String>,
        /// Replay at most this many.
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
        /// Without it, only say what would be replayed.
        #[arg(long)]
        yes: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlq: {error}{}", amqp_url_hint(&*error));
            ExitCode::FAILURE
        }
    }
}

/// idem's broker errors say what to check about the URL; where the URL comes from is ours to say.
fn amqp_url_hint(error: &(dyn std::error::Error + 'static)) -> &'static str {
    match error.downcast_ref::<idem::amqp::Error>() {
        Some(idem::amqp::Error::InvalidUrl { .. } | idem::amqp::Error::Connect { .. }) => {
            " (the URL is --amqp-url, or AMQP_URL)"
        }
        _ => "",
    }
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

async fn run(cli: Cli) -> Result<(), AnyError> {
    let connection = idem::amqp::connect(&cli.amqp_url).await?;
    let channel = connection.create_channel().await?;
    let dlq = idem::amqp::dead_letter_queue(&cli.queue);
    match cli.command {
        Command::Peek { reason, limit } => peek(&channel, &dlq, reason.as_deref(), limit).await?,
        Command::Replay { reason, limit, yes } => {
            replay(&channel, &cli.queue, &dlq, reason.as_deref(), limit, yes).await?
        }
    }
    // Whatever was read and not acked goes back to the DLQ, in its place.
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A header as text, whatever AMQP type it came in.
fn header(headers: &FieldTable, name: &str) -> Option<String> {
    Some(match headers.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Timestamp(t) => format_time(*t),
        other => format!("{other:?}"),
    })
}

/// Seconds since the epoch as `YYYY-MM-DD hh:mm:ss UTC`.
fn format_time(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), to avoid a date crate for one line.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn peek(
    channel: &Channel,
    dlq: &str,
    reason: Option<&str>,
    limit: usize,
) -> Result<(), AnyError> {
    let (mut seen, mut shown) = (0usize, 0usize);
    while shown < limit {
        let Some(message) = channel
            .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        seen += 1;
        let properties = &message.delivery.properties;
        let headers = properties.headers().clone().unwrap_or_default();
        let why = header(&headers, idem_headers::REASON).unwrap_or_else(|| "(no reason)".into());
        if reason.is_some_and(|wanted| wanted != why) {
            continue;
        }
        shown += 1;
        let field = |name| header(&headers, name).unwrap_or_else(|| "-".into());
        let body = &message.delivery.data;
        println!("── dead letter {shown} ─────────────────────────────");
        println!("reason:         {why}");
        println!("error:          {}", field(idem_headers::ERROR));
        println!("attempts:       {}", field(idem_headers::ATTEMPTS));
        println!("first failure:  {}", field(idem_headers::FIRST_FAILURE));
        println!("last failure:   {}", field(idem_headers::LAST_FAILURE));
        println!("consumer:       {}", field(idem_headers::CONSUMER));
        println!("original queue: {}", field(idem_headers::ORIGINAL_QUEUE));
        let id = |v: &Option<ShortString>| v.as_ref().map_or("-".to_owned(), |s| s.to_string());
        println!("message id:     {}", id(properties.message_id()));
        println!("correlation id: {}", id(properties.correlation_id()));
        println!("kind:           {}", id(properties.kind()));
        let text = String::from_utf8_lossy(&body[..body.len().min(2048)]);
        let more = if body.len() > 2048 { " …" } else { "" };
        println!("body ({} bytes): {text}{more}", body.len());
    }
    println!(
        "{shown} shown of {seen} read from {dlq}; all of them are still there (peek takes nothing)"
    );
    Ok(())
}

/// Headers idem adds on failure: removed on replay so the message starts over.
const FAILURE_HEADERS: [&str; 7] = [
    idem_headers::REASON,
    idem_headers::ERROR,
    idem_headers::ATTEMPTS,
    idem_headers::FIRST_FAILURE,
    idem_headers::LAST_FAILURE,
    idem_headers::CONSUMER,
    idem_headers::ORIGINAL_QUEUE,
];

async fn replay(
    channel: &Channel,
    queue: &str,
    dlq: &str,
    reason: Option<&str>,
    limit: usize,
    yes: bool,
) -> Result<(), AnyError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (mut replayed, mut skipped) = (0usize, 0usize);
    while replayed < limit {
        let Some(message) = channel
            .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let why = header(&headers, idem_headers::REASON).unwrap_or_default();
        let target =
            header(&headers, idem_headers::ORIGINAL_QUEUE).unwrap_or_else(|| queue.to_owned());
        // Whatever is skipped stays unacked: it returns to the DLQ when the channel closes.
        if reason.is_some_and(|wanted| wanted != why) {
            skipped += 1;
            continue;
        }
        if !yes {
            replayed += 1;
            let id = delivery.properties.message_id().as_ref();
            let id = id.map_or("-", |s| s.as_str());
            println!("would replay {id} ({why}) to {target}");
            continue;
        }
        let mut cleaned = FieldTable::default();
        for (name, value) in headers.inner() {
            if !FAILURE_HEADERS.contains(&name.as_str()) {
                cleaned.insert(name.clone(), value.clone());
            }
        }
        headers = cleaned;
        let properties = delivery.properties.clone().with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                target.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() || confirm.take_message().is_some() {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?;
            return Err(format!(
                "the broker did not take the replay to {target:?} (does the queue exist?); the dead letter stays in {dlq}"
            )
            .into());
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed += 1;
    }
    if yes {
        println!("replayed {replayed} dead letters; {skipped} with other reasons left in {dlq}");
    } else {
        println!("{replayed} would be replayed; run again with --yes to do it");
    }
    Ok(())
}
