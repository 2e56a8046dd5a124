//! Throughput of idem against a hand-written lapin + sqlx consumer doing the same work, on
//! PostgreSQL or (`--sqlite`) SQLite.
//!
//! Each contestant consumes `--messages` persistent payment messages, each in one database
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
//!   `UNNEST` insert of the captures, one upsert of the accounts' sums in account order; on
//!   SQLite the same through `json_each`), with `group_commit(N, --group-wait-ms)`:
//!   `--concurrency` batches in flight, the prefetch raised to `--batch-prefetch` (default four
//!   batches' worth) so that several can fill.
//!
//! Both use the same pool size (`--concurrency` connections), prefetch and concurrency. A round
//! pre-publishes N messages (publisher confirms, delivery mode 2) into a fresh durable queue per
//! contestant, vacuums the bench tables and checkpoints PostgreSQL (so a checkpoint does not land
//! in one contestant's run only), then times from consumer start until all N are applied and
//! acked, and checks that `bench_captures` grew by exactly N. Rounds run idem/raw in interleaved
//! pairs, alternating which goes first; every round also measures consume + ack alone (the raw
//! loop without its transaction) as a ceiling. Each round's line also shows this process's CPU time
//! per message (all threads, user + system), which is less noisy than throughput on a shared
//! machine. The final lines give the median msgs/s of each contestant and, last, the median of
//! the per-round idem/raw ratios.
//!
//! Then the latency batching adds (`--latency-seconds`, 0 leaves it out): an open loop publishes
//! `--latency-rate` msgs/s into a fresh queue while per-message idem, then idem batch, consume
//! it, and the bench reports the p50 and p99 of each applied delivery's time from being taken off
//! the channel to its commit (idem's `idem_taken_to_commit_seconds`, caught by a metrics recorder
//! of the bench's own), and what batching adds at p99 (batch p99 − per-message p99) against the
//! target: at most the group's `max_wait` plus one commit (per-message idem's p50).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5440/idem_test \
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5680/%2f \
//!     cargo run --release --example bench -- --messages 20000 [--prefetch 200] [--concurrency 8] [--rounds 3] [--group 50]
//! cargo run --release --example bench -- --sqlite --messages 5000   # SQLite, a file in a temporary directory
//! ```
//!
//! With `--cluster-urls` (a RabbitMQ cluster's nodes, comma-separated) every round also runs
//! idem and idem group there on **quorum queues** (`QueueType::Quorum`, declared with
//! `x-queue-type: quorum`; publishing confirmed by a majority), beside the same contestants on
//! the classic queue of the node at `AMQP_URL`, same database: the cost of replication.
//! `scripts/bench --cluster` starts a 3-node cluster for it.
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
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::{BasicProperties, Confirmation, Connection};
use idem::amqp::{Consumer, QueueType};
use idem::{Backend, BatchTx, Handler, Postgres, Sqlite, Tx};
use serde::Deserialize;
use sqlx::Pool;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use uuid::Uuid;

#[derive(Debug, Clone, Parser)]
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
    /// PostgreSQL, e.g. postgres://postgres@127.0.0.1:5432/idem_bench (not needed with
    /// `--sqlite`).
    #[arg(long, env = "DATABASE_URL", required_unless_present = "sqlite")]
    database_url: Option<String>,
    /// Run on SQLite instead: a fresh database file in a temporary directory, removed at the
    /// end (DATABASE_URL is not read).
    #[arg(long)]
    sqlite: bool,
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
    /// The prefetch of `idem batch` [default: four batches' worth, at least `--prefetch`].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    batch_prefetch: Option<u16>,
    /// How long a group may wait to fill, in milliseconds.
    #[arg(long, default_value_t = 5)]
    group_wait_ms: u64,
    /// The latency runs' publish rate (an open loop, below what every contestant sustains).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    latency_rate: u64,
    /// How long each latency run publishes; 0 leaves the latency runs out.
    #[arg(long, default_value_t = 5)]
    latency_seconds: u64,
    /// A RabbitMQ cluster's AMQP URLs (its nodes, comma-separated): idem and idem group run
    /// there too, every round, on quorum queues.
    #[arg(long, env = "IDEM_BENCH_CLUSTER_URLS")]
    cluster_urls: Option<String>,
}

impl Config {
    fn batch_prefetch(&self) -> u16 {
        self.batch_prefetch.unwrap_or_else(|| {
            let four_batches = u16::try_from(self.batch.saturating_mul(4)).unwrap_or(u16::MAX);
            four_batches.max(self.prefetch)
        })
    }
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
        id           SERIAL_ID,
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

/// The idem contestant: the payments example's effect, on the bench tables; the same handler for
/// each database.
macro_rules! capture_handler {
    ($name:ident, $db:ty) => {
        #[idem::handler(consumer = "bench-idem")]
        async fn $name(tx: &mut Tx<'_, $db>, payment: PaymentRequested) -> Result<(), sqlx::Error> {
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
    };
}
capture_handler!(capture_pg, Postgres);
capture_handler!(capture_lite, Sqlite);

/// The same effect for a whole batch, set-based: every capture in one `UNNEST` insert, then one
/// upsert of each account's sum, in account order (the lock order every batch keeps, so that
/// batches in flight side by side never deadlock on an account row).
#[idem::handler(consumer = "bench-idem", batch)]
async fn capture_batch_pg(
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

/// The batch on SQLite: the payments as one JSON array, unpacked by `json_each` (SQLite has no
/// arrays to bind). One writer at a time, so no lock order to keep.
#[idem::handler(consumer = "bench-idem", batch)]
async fn capture_batch_lite(
    tx: &mut BatchTx<'_, Sqlite>,
    payments: Vec<PaymentRequested>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<serde_json::Value> = payments
        .iter()
        .map(|p| {
            serde_json::json!({
                "payment_id": p.payment_id.to_string(),
                "account_id": p.account_id,
                "amount_cents": p.amount_cents,
                "currency": p.currency,
            })
        })
        .collect();
    let rows = serde_json::Value::Array(rows).to_string();
    sqlx::query(
        "INSERT INTO bench_captures (payment_id, account_id, amount_cents, currency)
         SELECT json_extract(value, '$.payment_id'), json_extract(value, '$.account_id'),
                json_extract(value, '$.amount_cents'), json_extract(value, '$.currency')
           FROM json_each($1)",
    )
    .bind(&rows)
    .execute(tx.conn())
    .await?;
    // (The WHERE is SQLite's rule for an upsert from a SELECT.)
    sqlx::query(
        "INSERT INTO bench_accounts (account_id, balance_cents)
         SELECT json_extract(value, '$.account_id') AS account, SUM(json_extract(value, '$.amount_cents'))
           FROM json_each($1) WHERE true
          GROUP BY account ORDER BY account
         ON CONFLICT (account_id) DO UPDATE SET balance_cents = bench_accounts.balance_cents + excluded.balance_cents",
    )
    .bind(&rows)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// What differs between the databases: the handlers, the tables, the hand-written loop's
/// transaction and the housekeeping between runs.
trait BenchDb: Backend {
    /// Statements that empty the bench tables.
    const EMPTY_TABLES: &'static [&'static str];
    /// The per-message handler on this database.
    type Capture: Handler<Self, Message = PaymentRequested>;
    /// The batch handler on this database.
    type CaptureBatch: Handler<Self, Message = PaymentRequested>;
    fn capture() -> Self::Capture;
    fn capture_batch() -> Self::CaptureBatch;
    /// Creates the bench tables if missing and empties them.
    fn prepare_tables(pool: &Pool<Self>) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Removes what runs left: the bench tables' rows and the bench consumers' ledger rows.
    fn clear_bench_rows(pool: &Pool<Self>) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Same starting conditions for every timed run.
    fn settle(pool: &Pool<Self>) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Rows in `bench_captures`.
    fn captures(pool: &Pool<Self>) -> impl Future<Output = anyhow::Result<i64>> + Send;
    /// Writes `rows` ledger rows of the idem consumer applied 40 days ago: past the default
    /// retention, so the purge deletes them.
    fn age_ledger(
        pool: &Pool<Self>,
        round: u32,
        rows: u64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// One delivery of the hand-written loop: decode, BEGIN, claim, effect, COMMIT, ack.
    fn raw_handle(
        pool: &Pool<Self>,
        delivery: &AmqpDelivery,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What both databases do alike, inside each `impl BenchDb`: count the captures; drop the bench
/// consumers' ledger rows.
macro_rules! same_on_both {
    () => {
        async fn captures(pool: &Pool<Self>) -> anyhow::Result<i64> {
            sqlx::query_scalar("SELECT count(*) FROM bench_captures")
                .fetch_one(pool)
                .await
                .context("counting bench_captures")
        }

        async fn clear_bench_rows(pool: &Pool<Self>) -> anyhow::Result<()> {
            for &sql in Self::EMPTY_TABLES {
                sqlx::query(sql)
                    .execute(pool)
                    .await
                    .context("emptying the bench tables")?;
            }
            sqlx::query("DELETE FROM idem_ledger WHERE consumer IN ($1, $2)")
                .bind(IDEM_CONSUMER)
                .bind(RAW_CONSUMER)
                .execute(pool)
                .await
                .context("removing the bench consumers' ledger rows")?;
            Ok(())
        }
    };
}

/// The hand-written loop's transaction, the same on both databases once begun with `$begin`.
macro_rules! raw_handle {
    ($pool:ident, $delivery:ident, $begin:expr) => {{
        let payment: PaymentRequested =
            serde_json::from_slice(&$delivery.data).context("decoding the body")?;
        let key = payment.payment_id.to_string();
        let mut tx = $begin.await?;
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
        ack($delivery).await
    }};
}

impl BenchDb for Postgres {
    const EMPTY_TABLES: &'static [&'static str] = &["TRUNCATE bench_captures, bench_accounts"];
    type Capture = capture_pg;
    type CaptureBatch = capture_batch_pg;
    fn capture() -> Self::Capture {
        capture_pg
    }
    fn capture_batch() -> Self::CaptureBatch {
        capture_batch_pg
    }

    async fn prepare_tables(pool: &Pool<Self>) -> anyhow::Result<()> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(4931402250211919)")
            .execute(&mut *tx)
            .await?;
        for sql in CREATE_TABLES {
            let sql = sqlx::AssertSqlSafe(sql.replace("SERIAL_ID", "BIGSERIAL PRIMARY KEY"));
            sqlx::query(sql)
                .execute(&mut *tx)
                .await
                .context("creating the bench tables")?;
        }
        tx.commit().await?;
        Self::clear_bench_rows(pool).await
    }

    same_on_both!();

    /// Vacuums what the previous run churned (the account upserts leave dead rows), checkpoints
    /// so that no contestant pays for a checkpoint (and the full-page writes after it) that the
    /// other did not, then gives the broker a moment after the publish.
    async fn settle(pool: &Pool<Self>) -> anyhow::Result<()> {
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

    async fn age_ledger(pool: &Pool<Self>, round: u32, rows: u64) -> anyhow::Result<()> {
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

    async fn raw_handle(pool: &Pool<Self>, delivery: &AmqpDelivery) -> anyhow::Result<()> {
        raw_handle!(pool, delivery, pool.begin())
    }
}

impl BenchDb for Sqlite {
    const EMPTY_TABLES: &'static [&'static str] =
        &["DELETE FROM bench_captures", "DELETE FROM bench_accounts"];
    type Capture = capture_lite;
    type CaptureBatch = capture_batch_lite;
    fn capture() -> Self::Capture {
        capture_lite
    }
    fn capture_batch() -> Self::CaptureBatch {
        capture_batch_lite
    }

    async fn prepare_tables(pool: &Pool<Self>) -> anyhow::Result<()> {
        for sql in CREATE_TABLES {
            let sql =
                sqlx::AssertSqlSafe(sql.replace("SERIAL_ID", "INTEGER PRIMARY KEY AUTOINCREMENT"));
            sqlx::query(sql)
                .execute(pool)
                .await
                .context("creating the bench tables")?;
        }
        Self::clear_bench_rows(pool).await
    }

    same_on_both!();

    /// Folds the write-ahead log back into the database file, so that no contestant pays for a
    /// checkpoint the other did not, then gives the broker a moment after the publish.
    async fn settle(pool: &Pool<Self>) -> anyhow::Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(pool)
            .await
            .context("checkpointing SQLite")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    async fn age_ledger(_pool: &Pool<Self>, _round: u32, _rows: u64) -> anyhow::Result<()> {
        bail!("--ledger-rows runs on PostgreSQL only")
    }

    async fn raw_handle(pool: &Pool<Self>, delivery: &AmqpDelivery) -> anyhow::Result<()> {
        // What idem does on SQLite too: take the write lock up front, so that two transactions
        // never deadlock upgrading their read locks.
        raw_handle!(pool, delivery, pool.begin_with("BEGIN IMMEDIATE"))
    }
}

/// The bench's metrics recorder: keeps idem's `idem_taken_to_commit_seconds` samples while a
/// latency run records them, and nothing else.
#[derive(Default)]
struct Latencies {
    recording: AtomicBool,
    samples: Mutex<Vec<f64>>,
}

static LATENCIES: OnceLock<Arc<Latencies>> = OnceLock::new();

impl metrics::HistogramFn for Latencies {
    fn record(&self, value: f64) {
        if self.recording.load(Ordering::Relaxed) {
            if let Ok(mut samples) = self.samples.lock() {
                samples.push(value);
            }
        }
    }
}

/// The recorder installed as the global one: hands out [`Latencies`] for the one histogram.
struct LatencyRecorder(Arc<Latencies>);

impl metrics::Recorder for LatencyRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == "idem_taken_to_commit_seconds" {
            metrics::Histogram::from_arc(Arc::clone(&self.0))
        } else {
            metrics::Histogram::noop()
        }
    }
}

impl Latencies {
    fn install() -> anyhow::Result<()> {
        let latencies = Arc::new(Self::default());
        metrics::set_global_recorder(LatencyRecorder(Arc::clone(&latencies)))
            .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
        let _ = LATENCIES.set(latencies);
        Ok(())
    }

    /// Starts recording, empty.
    fn start() {
        if let Some(latencies) = LATENCIES.get() {
            if let Ok(mut samples) = latencies.samples.lock() {
                samples.clear();
            }
            latencies.recording.store(true, Ordering::Relaxed);
        }
    }

    /// Stops recording; the samples so far, in seconds, sorted.
    fn stop() -> Vec<f64> {
        let Some(latencies) = LATENCIES.get() else {
            return Vec::new();
        };
        latencies.recording.store(false, Ordering::Relaxed);
        let mut samples = latencies
            .samples
            .lock()
            .map(|mut samples| std::mem::take(&mut *samples))
            .unwrap_or_default();
        samples.sort_by(f64::total_cmp);
        samples
    }
}

/// The `q` quantile of sorted `samples` (nearest rank), in milliseconds.
fn quantile_ms(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1] * 1000.0
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // sqlx WARNs of every statement over 1 s: on SQLite, a BEGIN IMMEDIATE queued
                // behind other writers; the figures say what it costs.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error")),
        )
        .init();
    let config = Config::parse();
    if let Err(error) = Latencies::install() {
        eprintln!("bench: {error:#}");
        return ExitCode::FAILURE;
    }
    // The whole benchmark runs on a worker thread: `block_on` on the main thread is measurably
    // slower for this kind of loop.
    let spawned = if config.sqlite {
        tokio::spawn(bench::<Sqlite>(config))
    } else {
        tokio::spawn(bench::<Postgres>(config))
    };
    let result = match spawned.await {
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
struct Bench<DB: BenchDb> {
    config: Config,
    /// Publishing, declaring, deleting.
    admin: Connection,
    /// The contestants' consume channels.
    consume: Connection,
    pool: Pool<DB>,
    run_id: String,
    /// Every queue this run declared, deleted at the end whatever happens.
    queues: Mutex<Vec<String>>,
    /// The type of the queues this bench declares and its idem consumers declare.
    queue_type: QueueType,
    /// `--cluster-urls`: the same bench on the cluster's connections, with quorum queues.
    cluster: Option<Box<Bench<DB>>>,
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

async fn bench<DB: BenchDb>(config: Config) -> anyhow::Result<()> {
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    // SQLite: a fresh file of this run's own, removed at the end.
    let scratch = std::env::temp_dir().join(format!("idem-bench-{run_id}"));
    let url = if config.sqlite {
        if config.ledger_rows > 0 {
            bail!("--ledger-rows runs on PostgreSQL only; leave it out with --sqlite");
        }
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        format!("sqlite://{}", scratch.join("bench.db").display())
    } else {
        let url = config.database_url.clone().unwrap_or_default();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "DATABASE_URL {:?} is not a PostgreSQL URL: set it to e.g. postgres://postgres@127.0.0.1:5432/idem_bench, or pass --sqlite",
                idem::redact_url(&url)
            );
        }
        url
    };
    let ran = bench_on::<DB>(config, &url, run_id).await;
    if scratch.exists() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    ran
}

async fn bench_on<DB: BenchDb>(config: Config, url: &str, run_id: String) -> anyhow::Result<()> {
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
    let pool = DB::connect(url, config.concurrency)
        .await
        .with_context(|| format!("connecting to {}", DB::NAME))?;
    DB::migrate(&pool).await.context("creating idem's ledger")?;
    DB::prepare_tables(&pool).await?;
    warm_pool(&pool, config.concurrency).await?;
    let cluster = match config.cluster_urls.clone() {
        Some(urls) => {
            let connect = || async {
                idem::amqp::connect(&urls)
                    .await
                    .context("connecting to the RabbitMQ cluster (--cluster-urls)")
            };
            Some(Box::new(Bench {
                run_id: format!("{run_id}-quorum"),
                config: config.clone(),
                admin: connect().await?,
                consume: connect().await?,
                pool: pool.clone(),
                queues: Mutex::new(Vec::new()),
                queue_type: QueueType::Quorum,
                cluster: None,
            }))
        }
        None => None,
    };
    let bench = Bench {
        run_id,
        config,
        admin,
        consume,
        pool,
        queues: Mutex::new(Vec::new()),
        queue_type: QueueType::Classic,
        cluster,
    };
    println!(
        "idem bench: {} messages per contestant per round, prefetch {} (idem batch {}), concurrency {} (= pool connections), {} rounds, {}",
        bench.config.messages,
        bench.config.prefetch,
        bench.config.batch_prefetch(),
        bench.config.concurrency,
        bench.config.rounds,
        DB::NAME
    );
    let result = rounds(&bench).await;
    let mut cleanup = bench.delete_queues().await;
    if let Some(cluster) = &bench.cluster {
        cleanup = cleanup.and(cluster.delete_queues().await);
        let _ = cluster.admin.close(200, "bench done".into()).await;
        let _ = cluster.consume.close(200, "bench done".into()).await;
    }
    let cleared = DB::clear_bench_rows(&bench.pool).await;
    let _ = bench.admin.close(200, "bench done".into()).await;
    let _ = bench.consume.close(200, "bench done".into()).await;
    bench.pool.close().await;
    result?;
    cleanup?;
    cleared
}

async fn rounds<DB: BenchDb>(bench: &Bench<DB>) -> anyhow::Result<()> {
    let mut idem_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut purge_ratios = Vec::new();
    let mut group_rates = Vec::new();
    let mut group_ratios = Vec::new();
    let mut batch_rates = Vec::new();
    let mut batch_ratios = Vec::new();
    let mut ack_only_rates = Vec::new();
    // (contestant, msgs/s on the cluster's quorum queue, that / the same on one classic queue)
    let mut quorum_rates: Vec<(Contestant, f64, f64)> = Vec::new();
    for round in 1..=bench.config.rounds {
        let rate = bench
            .ack_only(round)
            .await
            .context("the ack-only ceiling")?;
        println!("round {round}: ack-only {rate:.0} msgs/s (consume + ack, no database)");
        ack_only_rates.push(rate);
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
        let mut quorum = Vec::new();
        if let Some(cluster) = &bench.cluster {
            for contestant in [Contestant::Idem, Contestant::IdemGroup] {
                if contestant == Contestant::IdemGroup && bench.config.group <= 1 {
                    continue;
                }
                let timed = cluster.contest(contestant, round).await.with_context(|| {
                    format!("round {round}, {} on the cluster", contestant.name())
                })?;
                let classic = match contestant {
                    Contestant::Idem => idem_rate,
                    _ => group_rate.unwrap_or(f64::NAN),
                };
                quorum_rates.push((contestant, timed.rate, timed.rate / classic));
                quorum.push(format!(
                    "{} (quorum/classic {:.2})",
                    timed.describe(contestant),
                    timed.rate / classic
                ));
            }
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
        if !quorum.is_empty() {
            println!(
                "round {round}: on quorum queues, 3-node cluster: {}",
                quorum.join(", ")
            );
        }
        purge_ratios.extend(purge_ratio);
        group_rates.extend(group_rate);
        group_ratios.extend(group_ratio);
        batch_rates.extend(batch_rate);
        batch_ratios.extend(batch_ratio);
        idem_rates.push(idem_rate);
        raw_rates.push(raw_rate);
        ratios.push(ratio);
    }
    let ack_only = Some(median(&mut ack_only_rates));
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
    for contestant in [Contestant::Idem, Contestant::IdemGroup] {
        let (mut rates, mut ratios): (Vec<f64>, Vec<f64>) = quorum_rates
            .iter()
            .filter(|(c, ..)| *c == contestant)
            .map(|&(_, rate, ratio)| (rate, ratio))
            .unzip();
        if !rates.is_empty() {
            println!(
                "{} on a quorum queue (3-node cluster): {:.0} msgs/s, {:.2}× the same on a classic queue (one node)",
                contestant.name(),
                median(&mut rates),
                median(&mut ratios)
            );
        }
    }
    if bench.config.latency_seconds > 0 {
        latency_report(bench).await?;
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

impl<DB: BenchDb> Bench<DB> {
    fn queue_name(&self, round: u32, what: &str) -> String {
        format!("bench-{}-r{round}-{what}", self.run_id)
    }

    /// Fills a fresh queue, lets the broker settle, then times one contestant on it.
    async fn contest(&self, contestant: Contestant, round: u32) -> anyhow::Result<Timed> {
        let queue = self.queue_name(round, contestant.slug());
        self.publish(&queue).await?;
        if contestant == Contestant::IdemPurging {
            DB::age_ledger(&self.pool, round, self.config.ledger_rows).await?;
        }
        DB::settle(&self.pool).await?;
        let before = DB::captures(&self.pool).await?;
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
        let applied = DB::captures(&self.pool).await? - before;
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
        let consumer = self.idem_consumer(queue, mode)?;
        self.time_consumer(&consumer, mode == IdemMode::Purging)
            .await
    }

    fn idem_consumer(
        &self,
        queue: &str,
        mode: IdemMode,
    ) -> anyhow::Result<Consumer<DB, DB::Capture>> {
        let retention = if mode == IdemMode::Purging {
            Duration::from_secs(30 * 86_400)
        } else {
            Duration::from_secs(100 * 365 * 86_400)
        };
        let mut builder = Consumer::builder(self.pool.clone(), DB::capture())
            .queue(queue)
            .queue_type(self.queue_type)
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
        builder.build().context("building the idem consumer")
    }

    /// The batch handler, `--batch` messages per group, `--concurrency` groups in flight.
    async fn time_batch(&self, queue: &str) -> anyhow::Result<Duration> {
        let consumer = self.batch_consumer(queue)?;
        self.time_consumer(&consumer, false).await
    }

    fn batch_consumer(&self, queue: &str) -> anyhow::Result<Consumer<DB, DB::CaptureBatch>> {
        Consumer::builder(self.pool.clone(), DB::capture_batch())
            .queue(queue)
            .queue_type(self.queue_type)
            .prefetch(self.config.batch_prefetch())
            .concurrency(self.config.concurrency as usize)
            .shutdown_deadline(Duration::from_secs(5))
            .ledger_retention(Duration::from_secs(100 * 365 * 86_400))
            .group_commit(
                self.config.batch,
                Duration::from_millis(self.config.group_wait_ms),
            )
            .build()
            .context("building the idem batch consumer")
    }

    /// Runs `consumer` until it has applied `--messages` deliveries.
    async fn time_consumer<H: Handler<DB>>(
        &self,
        consumer: &Consumer<DB, H>,
        purging: bool,
    ) -> anyhow::Result<Duration> {
        self.consume_all(consumer, self.config.messages, purging)
            .await
    }

    /// Runs `consumer` until it has applied `n` deliveries.
    async fn consume_all<H: Handler<DB>>(
        &self,
        consumer: &Consumer<DB, H>,
        n: u64,
        purging: bool,
    ) -> anyhow::Result<Duration> {
        let outcome = OnceLock::new();
        let started = Instant::now();
        let done = watch(n, started, &outcome, || {
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
    async fn ack_only(&self, round: u32) -> anyhow::Result<f64> {
        let queue = self.queue_name(round, "ack-only");
        self.publish(&queue).await?;
        DB::settle(&self.pool).await?;
        let state = Arc::new(RawState::<DB> {
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
        // As idem declares it: a quorum queue carries its type, a classic one no arguments.
        let mut arguments = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .with_context(|| format!("declaring {queue:?}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let n = self.config.messages;
        let mut pending = Vec::with_capacity(1000);
        for i in 0..n {
            let (body, properties) = payment(i)?;
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

    /// An open loop: publishes `n` payments into `queue` at `--latency-rate` msgs/s whatever the
    /// consumer does, then waits for every confirm.
    async fn publish_paced(&self, queue: &str, n: u64) -> anyhow::Result<()> {
        let channel = self.admin.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(
            1.0 / self.config.latency_rate as f64,
        ));
        // Late ticks are caught up: the rate holds on average.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut pending = Vec::with_capacity(usize::try_from(n)?);
        for i in 0..n {
            tick.tick().await;
            let (body, properties) = payment(i)?;
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
        }
        for confirm in pending {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => bail!("the broker did not take a message: {other:?}"),
            }
        }
        let _ = channel.close(200, "published".into()).await;
        Ok(())
    }

    /// One latency run: `contestant` consumes a queue that the open loop fills meanwhile;
    /// returns the taken → commit time of every applied delivery, sorted.
    async fn latency(&self, contestant: Contestant) -> anyhow::Result<Vec<f64>> {
        let queue = format!("bench-{}-latency-{}", self.run_id, contestant.slug());
        self.queues
            .lock()
            .map_err(|_| anyhow::anyhow!("the queue list lock is poisoned"))?
            .push(queue.clone());
        let n = self.config.latency_rate * self.config.latency_seconds;
        DB::settle(&self.pool).await?;
        let before = DB::captures(&self.pool).await?;
        Latencies::start();
        let published = match contestant {
            Contestant::IdemBatch => {
                let consumer = self.batch_consumer(&queue)?;
                consumer.declare(&self.admin).await?;
                let (timed, published) = tokio::join!(
                    self.consume_all(&consumer, n, false),
                    self.publish_paced(&queue, n)
                );
                timed?;
                published
            }
            _ => {
                let consumer = self.idem_consumer(&queue, IdemMode::Plain)?;
                consumer.declare(&self.admin).await?;
                let (timed, published) = tokio::join!(
                    self.consume_all(&consumer, n, false),
                    self.publish_paced(&queue, n)
                );
                timed?;
                published
            }
        };
        let samples = Latencies::stop();
        published?;
        let applied = DB::captures(&self.pool).await? - before;
        if applied != i64::try_from(n)? || samples.len() as u64 != n {
            bail!(
                "the latency run published {n} messages, bench_captures grew by {applied}, {} commit times recorded",
                samples.len()
            );
        }
        self.delete_queue(&queue).await?;
        Ok(samples)
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

/// Payment `i` of a run: its body and properties (persistent, its id as message id).
fn payment(i: u64) -> anyhow::Result<(Vec<u8>, BasicProperties)> {
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
    Ok((body, properties))
}

/// The latency runs, per-message idem then idem batch, and their report: p50 and p99 of taken →
/// commit, and what batching adds at p99 (the batch's p99 minus the per-message p99) against its
/// bound: `max_wait` + one commit (the per-message p50).
async fn latency_report<DB: BenchDb>(bench: &Bench<DB>) -> anyhow::Result<()> {
    let config = &bench.config;
    let alone = bench
        .latency(Contestant::Idem)
        .await
        .context("the per-message latency run")?;
    let (alone_p50, alone_p99) = (quantile_ms(&alone, 0.5), quantile_ms(&alone, 0.99));
    let mut line = format!(
        "latency at {} msgs/s (taken → commit, {} applied each): idem p50 {alone_p50:.1} ms, p99 {alone_p99:.1} ms",
        config.latency_rate,
        alone.len()
    );
    if config.batch > 1 {
        let batched = bench
            .latency(Contestant::IdemBatch)
            .await
            .context("the batch latency run")?;
        let (p50, p99) = (quantile_ms(&batched, 0.5), quantile_ms(&batched, 0.99));
        // What batching adds at the 99th percentile, against waiting for the group to fill
        // plus one more commit.
        let added = p99 - alone_p99;
        let bound = config.group_wait_ms as f64 + alone_p50;
        line += &format!(
            "; idem batch p50 {p50:.1} ms, p99 {p99:.1} ms; batching adds {added:.1} ms at p99 (bound: max wait {} ms + one commit {alone_p50:.1} ms = {bound:.1} ms: {})",
            config.group_wait_ms,
            if added <= bound { "within" } else { "OVER" }
        );
    }
    println!("{line}");
    Ok(())
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
struct RawState<DB: BenchDb> {
    /// `None`: ack only, no transaction (the ceiling run).
    pool: Option<Pool<DB>>,
    done: AtomicU64,
    failure: OnceLock<String>,
}

/// The hand-written baseline: lapin consume with prefetch, up to `concurrency` deliveries at
/// once (a semaphore, one spawned task each), each one transaction then an ack.
async fn raw_consume<DB: BenchDb>(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    concurrency: usize,
    state: &Arc<RawState<DB>>,
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
                Some(pool) => DB::raw_handle(pool, &delivery).await,
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

async fn ack(delivery: &AmqpDelivery) -> anyhow::Result<()> {
    if !delivery.acker.ack(BasicAckOptions::default()).await? {
        bail!("ack not sent: the channel is closed");
    }
    Ok(())
}

/// Opens every pool connection before timing anything.
async fn warm_pool<DB: BenchDb>(pool: &Pool<DB>, connections: u32) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..connections {
        held.push(pool.acquire().await.context("opening pool connections")?);
    }
    Ok(())
}
