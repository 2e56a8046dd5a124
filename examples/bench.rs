//! Throughput of idem against a hand-written lapin + sqlx consumer doing the same work.
//!
//! Each contestant consumes `--messages` persistent payment messages, each in one PostgreSQL
//! transaction (ledger insert `ON CONFLICT DO NOTHING`, a `bench_captures` insert, a
//! `bench_accounts` upsert), then acks:
//!
//! - **idem**: a `#[idem::handler]` run by `idem::amqp::Consumer`;
//! - **raw**: lapin `basic_consume` with the same prefetch, a semaphore of `--concurrency` slots
//!   and one `tokio::spawn` per delivery doing `serde_json` decode, `pool.begin()`, the same three
//!   statements, `commit`, `ack`.
//!
//! - **idem group** (`--group N`, default 50; 0 leaves it out): the same handler with
//!   `group_commit(N, --group-wait-ms)` and the accounts as lock order.
//! - **idem batch** (`--batch N`, default 100; 0 leaves it out): a batch handler
//!   (`#[idem::handler(…, batch)]`) doing the same effect with set-based statements (one
//!   `UNNEST` insert of the captures, one upsert of the accounts' sums in account order), with
//!   `group_commit(N, --group-wait-ms)`: `--concurrency` batches in flight.
//!
//! Both use the same pool size (`--concurrency` connections), prefetch and concurrency. A round
//! pre-publishes N messages (publisher confirms, delivery mode 2) into a fresh durable queue per
//! contestant, vacuums the bench tables and checkpoints PostgreSQL (so a checkpoint does not land
//! in one contestant's run only), then times from consumer start until all N are applied and
//! acked, and checks that `bench_captures` grew by exactly N. Rounds run idem/raw in interleaved
//! pairs, alternating which goes first; round 1 also measures consume + ack alone (the raw loop
//! without its transaction) as a ceiling. Each round's line also shows this process's CPU time
//! per message (all threads, user + system), which is less noisy than throughput on a shared
//! machine. The final lines give the median msgs/s of each contestant and, last, the median of
//! the per-round idem/raw ratios.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5440/idem_test \
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5680/%2f \
//!     cargo run --release --example bench -- --messages 20000 [--prefetch 200] [--concurrency 8] [--rounds 3] [--group 50]
//! ```
//!
//! Logging defaults to `warn` (idem logs one INFO line per delivery); `RUST_LOG` overrides it,
//! and logs go to stderr so the figures on stdout stay readable.
//!
//! Over 400 lines on purpose: a benchmark reads best as one program: setup, both contestants and
//! the report side by side.

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::StreamExt;
use idem::amqp::lapin::message::Delivery as AmqpDelivery;
use idem::amqp::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use idem::amqp::lapin::types::FieldTable;
use idem::amqp::lapin::{BasicProperties, Confirmation, Connection};
use idem::amqp::Consumer;
use idem::{Backend, BatchTx, Postgres, Tx};
use serde::Deserialize;
use sqlx::PgPool;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "idem vs a hand-written lapin + sqlx loop: same workload, interleaved rounds")]
struct Config {
    /// Messages per contestant per round.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// basic.qos prefetch, for both contestants.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// Deliveries processed at once, and the database pool size, for both contestants.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Interleaved idem/raw pairs; the final ratio is the median of the per-round ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// PostgreSQL only, e.g. postgres://postgres@127.0.0.1:5432/idem_bench.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// With M > 0, a third contestant: before its run, M ledger rows of the idem consumer
    /// aged past the ledger retention (40 days) are written, and idem's background purge
    /// deletes them while it consumes. Plain idem keeps its ledger (a retention of a century):
    /// the two side by side give the purge's cost.
    #[arg(long, default_value_t = 0)]
    ledger_rows: u64,
    /// Another contestant, `idem group`: the same handler with group commit of up to this many
    /// messages per transaction (ordered by account); 0 leaves it out.
    #[arg(long, default_value_t = 50)]
    group: usize,
    /// Another contestant, `idem batch`: a batch handler with set-based SQL, groups of up to
    /// this many messages; 0 leaves it out.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// How long a group may wait to fill, in milliseconds.
    #[arg(long, default_value_t = 5)]
    group_wait_ms: u64,
}

/// The message both contestants decode (with serde_json) and apply.
#[derive(Debug, Deserialize, idem::Message)]
struct PaymentRequested {
    #[idem(key)]
    payment_id: Uuid,
    account_id: String,
    amount_cents: i64,
    currency: String,
}

/// Must match the `#[idem::handler(consumer = ..)]` below (the macro takes a literal).
const IDEM_CONSUMER: &str = "bench-idem";
const RAW_CONSUMER: &str = "bench-raw";

const CREATE_TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS bench_accounts (
        account_id    TEXT   PRIMARY KEY,
        balance_cents BIGINT NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS bench_captures (
        id           BIGSERIAL PRIMARY KEY,
        payment_id   TEXT   NOT NULL,
        account_id   TEXT   NOT NULL,
        amount_cents BIGINT NOT NULL,
        currency     TEXT   NOT NULL
    )",
];
/// The same statement idem's PostgreSQL ledger claim runs.
const CLAIM: &str = "INSERT INTO idem_ledger (consumer, key, payload_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const INSERT_CAPTURE: &str = "INSERT INTO bench_captures (payment_id, account_id, amount_cents, currency) VALUES ($1, $2, $3, $4)";
const CREDIT_ACCOUNT: &str = "INSERT INTO bench_accounts (account_id, balance_cents) VALUES ($1, $2)
     ON CONFLICT (account_id) DO UPDATE SET balance_cents = bench_accounts.balance_cents + excluded.balance_cents";

/// The idem contestant: the payments example's effect, on the bench tables.
#[idem::handler(consumer = "bench-idem")]
async fn capture(tx: &mut Tx<'_, Postgres>, payment: PaymentRequested) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_CAPTURE)
        .bind(payment.payment_id.to_string())
        .bind(&payment.account_id)
        .bind(payment.amount_cents)
        .bind(&payment.currency)
        .execute(tx.conn())
        .await?;
    sqlx::query(CREDIT_ACCOUNT)
        .bind(&payment.account_id)
        .bind(payment.amount_cents)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// The same effect for a whole batch, set-based: every capture in one `UNNEST` insert, then one
/// upsert of each account's sum, in account order (the lock order every batch keeps, so that
/// batches in flight side by side never deadlock on an account row).
#[idem::handler(consumer = "bench-idem", batch)]
async fn capture_batch(
    tx: &mut BatchTx<'_, Postgres>,
    payments: Vec<PaymentRequested>,
) -> Result<(), sqlx::Error> {
    let ids: Vec<String> = payments.iter().map(|p| p.payment_id.to_string()).collect();
    let accounts: Vec<&str> = payments.iter().map(|p| p.account_id.as_str()).collect();
    let amounts: Vec<i64> = payments.iter().map(|p| p.amount_cents).collect();
    let currencies: Vec<&str> = payments.iter().map(|p| p.currency.as_str()).collect();
    sqlx::query(
        "INSERT INTO bench_captures (payment_id, account_id, amount_cents, currency)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[])",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&amounts)
    .bind(&currencies)
    .execute(tx.conn())
    .await?;
    sqlx::query(
        "INSERT INTO bench_accounts (account_id, balance_cents)
         SELECT account_id, SUM(amount_cents)::bigint
           FROM UNNEST($1::text[], $2::bigint[]) AS p(account_id, amount_cents)
          GROUP BY account_id ORDER BY account_id
         ON CONFLICT (account_id) DO UPDATE SET balance_cents = bench_accounts.balance_cents + excluded.balance_cents",
    )
    .bind(&accounts)
    .bind(&amounts)
    .execute(tx.conn())
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let config = Config::parse();
    // The whole benchmark runs on a worker thread: `block_on` on the main thread is measurably
    // slower for this kind of loop.
    let result = match tokio::spawn(bench(config)).await {
        Ok(result) => result,
        Err(join_error) => Err(anyhow::anyhow!("the benchmark task failed: {join_error}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the whole run needs.
struct Bench {
    config: Config,
    /// Publishing, declaring, deleting.
    admin: Connection,
    /// The contestants' consume channels.
    consume: Connection,
    pool: PgPool,
    run_id: String,
    /// Every queue this run declared, deleted at the end whatever happens.
    queues: Mutex<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contestant {
    Idem,
    Raw,
    /// idem with its ledger purge deleting `--ledger-rows` aged rows meanwhile.
    IdemPurging,
    /// idem with group commit (`--group` messages per transaction).
    IdemGroup,
    /// idem with a batch handler (`--batch` messages per call).
    IdemBatch,
}

impl Contestant {
    fn name(self) -> &'static str {
        match self {
            Self::Idem => "idem",
            Self::Raw => "raw",
            Self::IdemPurging => "idem+purge",
            Self::IdemGroup => "idem group",
            Self::IdemBatch => "idem batch",
        }
    }

    /// The name as a queue name part.
    fn slug(self) -> &'static str {
        match self {
            Self::IdemGroup => "idem-group",
            Self::IdemBatch => "idem-batch",
            other => other.name(),
        }
    }
}

async fn bench(config: Config) -> anyhow::Result<()> {
    let url = config.database_url.as_str();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!(
            "DATABASE_URL {:?} is not a PostgreSQL URL: this benchmark compares idem with a hand-written \
             PostgreSQL loop and runs on PostgreSQL only; set it to e.g. postgres://postgres@127.0.0.1:5432/idem_bench",
            idem::redact_url(url)
        );
    }
    if config.concurrency > u32::from(config.prefetch) {
        bail!(
            "--concurrency {} exceeds --prefetch {}: at most prefetch deliveries are ever in flight",
            config.concurrency,
            config.prefetch
        );
    }
    let admin = idem::amqp::connect(&config.amqp_url)
        .await
        .context("connecting to RabbitMQ (AMQP_URL)")?;
    let consume = idem::amqp::connect(&config.amqp_url)
        .await
        .context("connecting to RabbitMQ (AMQP_URL)")?;
    let pool = Postgres::connect(url, config.concurrency)
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")?;
    Postgres::migrate(&pool)
        .await
        .context("creating idem's ledger")?;
    prepare_tables(&pool).await?;
    warm_pool(&pool, config.concurrency).await?;
    let bench = Bench {
        run_id: Uuid::new_v4().simple().to_string()[..8].to_owned(),
        config,
        admin,
        consume,
        pool,
        queues: Mutex::new(Vec::new()),
    };
    println!(
        "idem bench: {} messages per contestant per round, prefetch {}, concurrency {} (= pool connections), {} rounds, PostgreSQL",
        bench.config.messages, bench.config.prefetch, bench.config.concurrency, bench.config.rounds
    );
    let result = rounds(&bench).await;
    let cleanup = bench.delete_queues().await;
    let cleared = clear_bench_rows(&bench.pool).await;
    let _ = bench.admin.close(200, "bench done".into()).await;
    let _ = bench.consume.close(200, "bench done".into()).await;
    result?;
    cleanup?;
    cleared
}

async fn rounds(bench: &Bench) -> anyhow::Result<()> {
    let mut idem_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut purge_ratios = Vec::new();
    let mut group_rates = Vec::new();
    let mut group_ratios = Vec::new();
    let mut batch_rates = Vec::new();
    let mut batch_ratios = Vec::new();
    let mut ack_only = None;
    for round in 1..=bench.config.rounds {
        if round == 1 {
            let rate = bench.ack_only().await.context("the ack-only ceiling")?;
            println!("round 1: ack-only {rate:.0} msgs/s (consume + ack, no database)");
            ack_only = Some(rate);
        }
        let mut order = if round % 2 == 1 {
            vec![Contestant::Idem, Contestant::Raw]
        } else {
            vec![Contestant::Raw, Contestant::Idem]
        };
        if bench.config.ledger_rows > 0 {
            // Next to plain idem, on alternating sides.
            let at = order
                .iter()
                .position(|c| *c == Contestant::Idem)
                .unwrap_or(0);
            order.insert(at + usize::from(round % 2 == 1), Contestant::IdemPurging);
        }
        if bench.config.group > 1 {
            // First in odd rounds, last in even ones.
            if round % 2 == 1 {
                order.insert(0, Contestant::IdemGroup);
            } else {
                order.push(Contestant::IdemGroup);
            }
        }
        if bench.config.batch > 1 {
            // Last in odd rounds, first in even ones.
            if round % 2 == 1 {
                order.push(Contestant::IdemBatch);
            } else {
                order.insert(0, Contestant::IdemBatch);
            }
        }
        let mut idem_rate = 0.0;
        let mut raw_rate = 0.0;
        let mut purging_rate = None;
        let mut group_rate = None;
        let mut batch_rate = None;
        let mut line = Vec::new();
        for &contestant in &order {
            let timed = bench
                .contest(contestant, round)
                .await
                .with_context(|| format!("round {round}, {}", contestant.name()))?;
            match contestant {
                Contestant::Idem => idem_rate = timed.rate,
                Contestant::Raw => raw_rate = timed.rate,
                Contestant::IdemPurging => purging_rate = Some(timed.rate),
                Contestant::IdemGroup => group_rate = Some(timed.rate),
                Contestant::IdemBatch => batch_rate = Some(timed.rate),
            }
            line.push(timed.describe(contestant));
        }
        let ratio = idem_rate / raw_rate;
        let purge_ratio = purging_rate.map(|rate| rate / idem_rate);
        let group_ratio = group_rate.map(|rate| rate / idem_rate);
        let batch_ratio = batch_rate.map(|rate| rate / idem_rate);
        let purge_note = purge_ratio
            .map(|r| format!(", idem+purge/idem {r:.2}"))
            .unwrap_or_default()
            + &group_ratio
                .map(|r| format!(", idem group/idem {r:.2}"))
                .unwrap_or_default()
            + &batch_ratio
                .map(|r| format!(", idem batch/idem {r:.2}"))
                .unwrap_or_default();
        println!(
            "round {round}/{} ({} first): {}, idem/raw {ratio:.2}{purge_note}",
            bench.config.rounds,
            order[0].name(),
            line.join(", ")
        );
        purge_ratios.extend(purge_ratio);
        group_rates.extend(group_rate);
        group_ratios.extend(group_ratio);
        batch_rates.extend(batch_rate);
        batch_ratios.extend(batch_ratio);
        idem_rates.push(idem_rate);
        raw_rates.push(raw_rate);
        ratios.push(ratio);
    }
    if let Some(rate) = ack_only {
        println!("ack-only: {rate:.0} msgs/s");
    }
    println!("idem: {:.0} msgs/s", median(&mut idem_rates));
    println!("raw: {:.0} msgs/s", median(&mut raw_rates));
    let of_ack_only = |rate: f64| {
        ack_only
            .map(|ceiling| format!(", {:.2}× ack-only", rate / ceiling))
            .unwrap_or_default()
    };
    if !group_rates.is_empty() {
        let rate = median(&mut group_rates);
        println!(
            "idem group: {rate:.0} msgs/s (groups of up to {}, {:.2}× per-message idem{})",
            bench.config.group,
            median(&mut group_ratios),
            of_ack_only(rate)
        );
    }
    if !batch_rates.is_empty() {
        let rate = median(&mut batch_rates);
        println!(
            "idem batch: {rate:.0} msgs/s (batches of up to {}, {:.2}× per-message idem{})",
            bench.config.batch,
            median(&mut batch_ratios),
            of_ack_only(rate)
        );
    }
    if !purge_ratios.is_empty() {
        println!(
            "idem+purge/idem throughput ratio: {:.2} (the purge deleting {} aged ledger rows meanwhile)",
            median(&mut purge_ratios),
            bench.config.ledger_rows
        );
    }
    println!("idem/raw throughput ratio: {:.2}", median(&mut ratios));
    Ok(())
}

/// How the idem consumer of a contestant is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdemMode {
    Plain,
    Purging,
    Group,
}

/// One contestant's timed run.
struct Timed {
    rate: f64,
    took: Duration,
    /// This process's CPU time (all threads) per message, in µs, when /proc tells it.
    cpu_per_message: Option<f64>,
}

impl Timed {
    fn describe(&self, contestant: Contestant) -> String {
        let cpu = match self.cpu_per_message {
            Some(us) => format!(", client CPU {us:.0} µs/msg"),
            None => String::new(),
        };
        format!(
            "{} {:.0} msgs/s ({:.2?}{cpu})",
            contestant.name(),
            self.rate,
            self.took
        )
    }
}

/// User + system CPU time of this process so far (Linux: /proc/self/stat, 100 Hz ticks).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is [0], utime [11], stime [12].
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Bench {
    fn queue_name(&self, round: u32, what: &str) -> String {
        format!("bench-{}-r{round}-{what}", self.run_id)
    }

    /// Fills a fresh queue, lets the broker settle, then times one contestant on it.
    async fn contest(&self, contestant: Contestant, round: u32) -> anyhow::Result<Timed> {
        let queue = self.queue_name(round, contestant.slug());
        self.publish(&queue).await?;
        if contestant == Contestant::IdemPurging {
            age_ledger(&self.pool, round, self.config.ledger_rows).await?;
        }
        settle(&self.pool).await?;
        let before = captures(&self.pool).await?;
        tracing::info!(round, contestant = contestant.name(), %queue, "timing starts");
        let cpu_before = process_cpu();
        let took = match contestant {
            Contestant::Idem => self.time_idem(&queue, IdemMode::Plain).await?,
            Contestant::Raw => self.time_raw(&queue).await?,
            Contestant::IdemPurging => self.time_idem(&queue, IdemMode::Purging).await?,
            Contestant::IdemGroup => self.time_idem(&queue, IdemMode::Group).await?,
            Contestant::IdemBatch => self.time_batch(&queue).await?,
        };
        let cpu = process_cpu()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        tracing::info!(round, contestant = contestant.name(), ?took, "timing ends");
        let applied = captures(&self.pool).await? - before;
        if applied != i64::try_from(self.config.messages)? {
            bail!(
                "{} messages were consumed but bench_captures grew by {applied}",
                self.config.messages
            );
        }
        self.delete_queue(&queue).await?;
        let n = self.config.messages as f64;
        Ok(Timed {
            rate: n / took.as_secs_f64(),
            took,
            cpu_per_message: cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / n),
        })
    }

    /// `Purging`: with the default ledger retention, so that the purge deletes the aged rows;
    /// otherwise with a century's, so that it deletes nothing. `Group`: group commit.
    async fn time_idem(&self, queue: &str, mode: IdemMode) -> anyhow::Result<Duration> {
        let purging = mode == IdemMode::Purging;
        let retention = if purging {
            Duration::from_secs(30 * 86_400)
        } else {
            Duration::from_secs(100 * 365 * 86_400)
        };
        let mut builder = Consumer::builder(self.pool.clone(), capture)
            .queue(queue)
            .prefetch(self.config.prefetch)
            .concurrency(self.config.concurrency as usize)
            .shutdown_deadline(Duration::from_secs(5))
            .ledger_retention(retention);
        if mode == IdemMode::Group {
            builder = builder
                .group_commit(
                    self.config.group,
                    Duration::from_millis(self.config.group_wait_ms),
                )
                .group_lock_order(|payment: &PaymentRequested| payment.account_id.clone());
        }
        let consumer = builder.build().context("building the idem consumer")?;
        self.time_consumer(&consumer, purging).await
    }

    /// The batch handler, `--batch` messages per group, `--concurrency` groups in flight.
    async fn time_batch(&self, queue: &str) -> anyhow::Result<Duration> {
        let consumer = Consumer::builder(self.pool.clone(), capture_batch)
            .queue(queue)
            .prefetch(self.config.prefetch)
            .concurrency(self.config.concurrency as usize)
            .shutdown_deadline(Duration::from_secs(5))
            .ledger_retention(Duration::from_secs(100 * 365 * 86_400))
            .group_commit(
                self.config.batch,
                Duration::from_millis(self.config.group_wait_ms),
            )
            .build()
            .context("building the idem batch consumer")?;
        self.time_consumer(&consumer, false).await
    }

    /// Runs `consumer` until it has applied `--messages` deliveries.
    async fn time_consumer<H: idem::Handler<Postgres>>(
        &self,
        consumer: &Consumer<Postgres, H>,
        purging: bool,
    ) -> anyhow::Result<Duration> {
        let outcome = OnceLock::new();
        let started = Instant::now();
        let done = watch(self.config.messages, started, &outcome, || {
            let stats = consumer.stats();
            let failed = stats.dead_lettered + stats.redelivered_later + stats.ack_failures;
            if failed > 0 {
                Err(format!("idem did not apply every delivery: {stats:?}"))
            } else {
                Ok(stats.applied + stats.duplicates)
            }
        });
        consumer
            .run(&self.consume, done)
            .await
            .context("the idem consumer stopped")?;
        if purging {
            tracing::warn!(
                purged = consumer.stats().ledger_purged,
                "aged ledger rows the purge deleted during the run"
            );
        }
        finished(&outcome)
    }

    async fn time_raw(&self, queue: &str) -> anyhow::Result<Duration> {
        let state = Arc::new(RawState {
            pool: Some(self.pool.clone()),
            done: AtomicU64::new(0),
            failure: OnceLock::new(),
        });
        let outcome = OnceLock::new();
        let started = Instant::now();
        let done = watch(self.config.messages, started, &outcome, || {
            match state.failure.get() {
                Some(error) => Err(error.clone()),
                None => Ok(state.done.load(Ordering::Relaxed)),
            }
        });
        raw_consume(
            &self.consume,
            queue,
            self.config.prefetch,
            self.config.concurrency as usize,
            &state,
            done,
        )
        .await
        .context("the raw consumer stopped")?;
        finished(&outcome)
    }

    /// Consume + ack with nothing else (the raw loop without its transaction): the ceiling the
    /// broker, the client and the task hand-offs allow here.
    async fn ack_only(&self) -> anyhow::Result<f64> {
        let queue = self.queue_name(1, "ack-only");
        self.publish(&queue).await?;
        settle(&self.pool).await?;
        let state = Arc::new(RawState {
            pool: None,
            done: AtomicU64::new(0),
            failure: OnceLock::new(),
        });
        let outcome = OnceLock::new();
        let started = Instant::now();
        let done = watch(self.config.messages, started, &outcome, || {
            match state.failure.get() {
                Some(error) => Err(error.clone()),
                None => Ok(state.done.load(Ordering::Relaxed)),
            }
        });
        raw_consume(
            &self.consume,
            &queue,
            self.config.prefetch,
            self.config.concurrency as usize,
            &state,
            done,
        )
        .await
        .context("the ack-only consumer stopped")?;
        let took = finished(&outcome)?;
        self.delete_queue(&queue).await?;
        Ok(self.config.messages as f64 / took.as_secs_f64())
    }

    /// Declares `queue` (durable, no arguments: what idem declares too) and publishes
    /// `--messages` persistent payments into it with publisher confirms.
    async fn publish(&self, queue: &str) -> anyhow::Result<()> {
        self.queues
            .lock()
            .map_err(|_| anyhow::anyhow!("the queue list lock is poisoned"))?
            .push(queue.to_owned());
        let channel = self.admin.create_channel().await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring {queue:?}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let n = self.config.messages;
        let mut pending = Vec::with_capacity(1000);
        for i in 0..n {
            let payment_id = Uuid::new_v4();
            let body = serde_json::to_vec(&serde_json::json!({
                "payment_id": payment_id,
                "account_id": format!("bench-acct-{}", i % 100),
                "amount_cents": 100 + (i * 37) % 900,
                "currency": "EUR",
            }))?;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(payment_id.to_string().into());
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .with_context(|| format!("publishing to {queue:?}"))?;
            pending.push(confirm);
            if pending.len() == 1000 || i + 1 == n {
                for confirm in pending.drain(..) {
                    match confirm.await? {
                        Confirmation::Ack(None) => {}
                        other => bail!("the broker did not take a message: {other:?}"),
                    }
                }
            }
        }
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        if u64::from(declared.message_count()) != n {
            bail!(
                "{queue:?} holds {} messages after publishing {n}",
                declared.message_count()
            );
        }
        let _ = channel.close(200, "published".into()).await;
        Ok(())
    }

    async fn delete_queue(&self, queue: &str) -> anyhow::Result<()> {
        let channel = self.admin.create_channel().await?;
        for name in [queue.to_owned(), idem::amqp::dead_letter_queue(queue)] {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .with_context(|| format!("deleting queue {name:?}"))?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        if let Ok(mut queues) = self.queues.lock() {
            queues.retain(|q| q != queue);
        }
        Ok(())
    }

    async fn delete_queues(&self) -> anyhow::Result<()> {
        let left: Vec<String> = match self.queues.lock() {
            Ok(queues) => queues.clone(),
            Err(_) => bail!("the queue list lock is poisoned"),
        };
        for queue in left {
            self.delete_queue(&queue).await?;
        }
        Ok(())
    }
}

/// The shutdown future of one timed run: resolves once `progress` reaches `n` (recording the
/// time since `started`), when it reports a failure, or when nothing moves for a minute.
async fn watch(
    n: u64,
    started: Instant,
    outcome: &OnceLock<Result<Duration, String>>,
    progress: impl Fn() -> Result<u64, String>,
) {
    let mut last = (0, Instant::now());
    let result = loop {
        match progress() {
            Ok(done) if done >= n => break Ok(started.elapsed()),
            Ok(done) if done != last.0 => last = (done, Instant::now()),
            Ok(done) if last.1.elapsed() > Duration::from_secs(60) => {
                break Err(format!("stuck at {done} of {n} messages for a minute"))
            }
            Ok(_) => {}
            Err(error) => break Err(error),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let _ = outcome.set(result);
}

fn finished(outcome: &OnceLock<Result<Duration, String>>) -> anyhow::Result<Duration> {
    match outcome.get() {
        Some(Ok(took)) => Ok(*took),
        Some(Err(error)) => Err(anyhow::anyhow!(error.clone())),
        None => bail!("the consumer stopped before all messages were handled"),
    }
}

/// What the hand-written loop's delivery tasks share.
struct RawState {
    /// `None`: ack only, no transaction (the ceiling run).
    pool: Option<PgPool>,
    done: AtomicU64,
    failure: OnceLock<String>,
}

/// The hand-written baseline: lapin consume with prefetch, up to `concurrency` deliveries at
/// once (a semaphore, one spawned task each), each one transaction then an ack.
async fn raw_consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    concurrency: usize,
    state: &Arc<RawState>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            RAW_CONSUMER.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming {queue:?}"))?;
    let slots = Arc::new(Semaphore::new(concurrency));
    tokio::pin!(shutdown);
    let ended = loop {
        let slot = tokio::select! {
            () = &mut shutdown => break Ok(()),
            slot = Arc::clone(&slots).acquire_owned() => slot?,
        };
        let delivery = tokio::select! {
            () = &mut shutdown => break Ok(()),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Err(anyhow::Error::new(error).context("the raw consumer failed")),
                None => break Err(anyhow::anyhow!("the broker cancelled the raw consumer")),
            },
        };
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let handled = match &state.pool {
                Some(pool) => raw_handle(pool, &delivery).await,
                None => ack(&delivery).await,
            };
            match handled {
                Ok(()) => {
                    state.done.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    let _ = state.failure.set(format!("{error:#}"));
                }
            }
            drop(slot);
        });
    };
    let _ = channel
        .basic_cancel(RAW_CONSUMER.into(), BasicCancelOptions::default())
        .await;
    // Every slot back means every spawned delivery finished.
    let drained = tokio::time::timeout(
        Duration::from_secs(5),
        slots.acquire_many(u32::try_from(concurrency)?),
    )
    .await;
    let _ = channel.close(200, "raw done".into()).await;
    if drained.is_err() {
        bail!("in-flight deliveries did not finish within 5 s");
    }
    ended
}

/// One delivery of the hand-written loop: decode, BEGIN, claim, effect, COMMIT, ack.
async fn raw_handle(pool: &PgPool, delivery: &AmqpDelivery) -> anyhow::Result<()> {
    let payment: PaymentRequested =
        serde_json::from_slice(&delivery.data).context("decoding the body")?;
    let key = payment.payment_id.to_string();
    let mut tx = pool.begin().await?;
    // idem stores a SHA-256 of the body; this loop stores 32 bytes too, without hashing.
    let claimed = sqlx::query(CLAIM)
        .bind(RAW_CONSUMER)
        .bind(&key)
        .bind(&[0u8; 32][..])
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if claimed {
        sqlx::query(INSERT_CAPTURE)
            .bind(&key)
            .bind(&payment.account_id)
            .bind(payment.amount_cents)
            .bind(&payment.currency)
            .execute(&mut *tx)
            .await?;
        sqlx::query(CREDIT_ACCOUNT)
            .bind(&payment.account_id)
            .bind(payment.amount_cents)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    ack(delivery).await
}

async fn ack(delivery: &AmqpDelivery) -> anyhow::Result<()> {
    if !delivery.acker.ack(BasicAckOptions::default()).await? {
        bail!("ack not sent: the channel is closed");
    }
    Ok(())
}

async fn prepare_tables(pool: &PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(4931402250211919)")
        .execute(&mut *tx)
        .await?;
    for sql in CREATE_TABLES {
        sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .context("creating the bench tables")?;
    }
    tx.commit().await?;
    clear_bench_rows(pool).await
}

/// Removes what earlier runs left: the bench tables' rows and the bench consumers' ledger rows.
async fn clear_bench_rows(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE bench_captures, bench_accounts")
        .execute(pool)
        .await
        .context("emptying the bench tables")?;
    sqlx::query("DELETE FROM idem_ledger WHERE consumer IN ($1, $2)")
        .bind(IDEM_CONSUMER)
        .bind(RAW_CONSUMER)
        .execute(pool)
        .await
        .context("removing the bench consumers' ledger rows")?;
    Ok(())
}

/// Opens every pool connection before timing anything.
async fn warm_pool(pool: &PgPool, connections: u32) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..connections {
        held.push(pool.acquire().await.context("opening pool connections")?);
    }
    Ok(())
}

/// Same starting conditions for every timed run: vacuum what the previous run churned (the
/// account upserts leave dead rows), checkpoint so that no contestant pays for a checkpoint (and
/// the full-page writes after it) that the other did not, then give the broker a moment after
/// the publish.
/// Writes `rows` ledger rows of the idem consumer applied 40 days ago: past the default
/// retention, so the purge deletes them.
async fn age_ledger(pool: &PgPool, round: u32, rows: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO idem_ledger (consumer, key, payload_hash, processed_at)
         SELECT $1, 'aged-' || $2 || '-' || n, '\\x00', now() - interval '40 days'
         FROM generate_series(1, $3) n",
    )
    .bind(IDEM_CONSUMER)
    .bind(i64::from(round))
    .bind(i64::try_from(rows)?)
    .execute(pool)
    .await
    .context("writing aged ledger rows")?;
    Ok(())
}

async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("VACUUM bench_accounts, bench_captures, idem_ledger")
        .execute(pool)
        .await
        .context("vacuuming the bench tables")?;
    // Needs superuser or pg_checkpoint; without it the figures are just noisier.
    static CHECKPOINT_REFUSED: std::sync::Once = std::sync::Once::new();
    if let Err(error) = sqlx::query("CHECKPOINT").execute(pool).await {
        CHECKPOINT_REFUSED.call_once(
            || tracing::warn!(%error, "CHECKPOINT refused; checkpoints may land in a timed run"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

async fn captures(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM bench_captures")
        .fetch_one(pool)
        .await
        .context("counting bench_captures")
}
