//! `idem`: the operator's tool for idem services — dead letters, the dedup ledger, the outbox,
//! the broker topology, and `idem doctor`, a deploy gate.
//!
//! ```text
//! idem doctor                                   # everything at once; exit 1 when something needs attention
//! idem dlq list                                 # dead letters per queue and reason
//! idem dlq show --reason rejected --limit 5
//! idem dlq replay --reason retries-exhausted    # dry run; add --yes to do it
//! idem ledger stats
//! idem ledger show --consumer payments 7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11
//! idem outbox status
//! idem topology check --queue payments
//! ```
//!
//! It reads `AMQP_URL`, `DATABASE_URL` and `IDEM_QUEUE` as the services do. Exit status: 0 all
//! is well (or done), 1 something needs attention or an operation failed, 2 a bad invocation.

mod database;
mod dlq;
mod doctor;
mod ledger;
mod outbox;
mod output;
mod topology;

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "idem",
    version,
    about = "Operate idem services: dead letters, the ledger, the outbox, topology, doctor"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Where the services' broker and database are, and how to answer.
#[derive(Debug, Args)]
struct Global {
    /// The broker, as the services reach it.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true,
        hide_env_values = true
    )]
    amqp_url: String,
    /// The services' database (`postgres://…` or `sqlite://path`), where the ledger and the
    /// outbox are.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://payments.db",
        global = true,
        hide_env_values = true
    )]
    database_url: String,
    /// The consumers' queues (repeat it, or a comma-separated list); the dead letters of each
    /// are in `<queue>.dlq`.
    #[arg(
        long = "queue",
        env = "IDEM_QUEUE",
        default_value = "payments",
        value_delimiter = ',',
        global = true
    )]
    queues: Vec<String>,
    /// The type the consumers declare their queues as (`ConsumerBuilder::queue_type`):
    /// `classic` or `quorum`.
    #[arg(
        long,
        env = "IDEM_QUEUE_TYPE",
        default_value = "classic",
        global = true
    )]
    queue_type: idem::amqp::QueueType,
    /// JSON on standard output instead of tables (one document per command).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dead letters: what is in `<queue>.dlq`, why, and sending it back.
    #[command(subcommand)]
    Dlq(dlq::Command),
    /// The dedup ledger: its size, one key's record, and purging old rows.
    #[command(subcommand)]
    Ledger(ledger::Command),
    /// The transactional outbox: its backlog and parked messages.
    #[command(subcommand)]
    Outbox(outbox::Command),
    /// The queues idem declares for a consumer, against what the broker has.
    #[command(subcommand)]
    Topology(topology::Command),
    /// Broker, database, migrations, topology, dead letters, outbox and ledger in one look; exit
    /// status 1 when something needs attention (a deploy gate).
    Doctor(doctor::Options),
}

/// How long the broker or the database may take to answer a connect.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A duration on the command line: `30d`, `12h`, `90s`, `1h 30m`.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("{error} (write e.g. 30d, 12h, 90s)"))
}

/// What a command found: whether it needs the operator's attention (exit status 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Done, or nothing to worry about.
    Fine,
    /// Something needs attention (or was refused): exit status 1.
    Attention,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("idem: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Verdict::Fine) => ExitCode::SUCCESS,
        Ok(Verdict::Attention) => ExitCode::from(1),
        Err(error) => {
            eprintln!("idem: {}", output::error(&error));
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Verdict> {
    let global = &cli.global;
    match cli.command {
        Command::Dlq(command) => dlq::run(global, command).await,
        Command::Ledger(command) => ledger::run(global, command).await,
        Command::Outbox(command) => outbox::run(global, command).await,
        Command::Topology(command) => topology::run(global, command).await,
        Command::Doctor(options) => doctor::run(global, options).await,
    }
}
