//! The payments service: captures each `PaymentRequested` exactly once.
//!
//! ```text
//! cargo run --release --example payments            # consume until SIGTERM / Ctrl-C
//! cargo run --release --example payments -- --demo  # publish a batch with duplicates and garbage, consume it, verify
//! ```
//!
//! Environment: `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), `DATABASE_URL`
//! (default `sqlite://payments.db` in the working directory; a `postgres://` URL selects
//! PostgreSQL), `IDEM_QUEUE` (default `payments`), `IDEM_PREFETCH` (default 200),
//! `IDEM_CONCURRENCY` (default 8).

use clap::Parser;
use idem::amqp::lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use idem::amqp::lapin::{BasicProperties, Connection};
use idem::amqp::{Consumer, REASON_HEADER};
use idem::{Backend, Handler, Postgres, Sqlite, Tx};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "idem payments example: capture each payment exactly once")]
struct Config {
    /// Publish a batch with duplicates and bad messages, consume it, print a summary and exit.
    #[arg(long)]
    demo: bool,
    /// Unique payments the demo publishes.
    #[arg(long, default_value_t = 40, requires = "demo")]
    demo_payments: usize,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The ledger and payments database: postgres://… or sqlite:… (created if missing).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://payments.db")]
    database_url: String,
    /// The queue to consume; its dead letters go to `<queue>.dlq`.
    #[arg(long, env = "IDEM_QUEUE", default_value = "payments")]
    queue: String,
    /// Unacknowledged deliveries the broker may push ahead.
    #[arg(long, env = "IDEM_PREFETCH", default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// Transactions in flight at once, and database connections [default: 8, or the prefetch
    /// if that is smaller].
    #[arg(long, env = "IDEM_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: Option<u32>,
}

/// A request to capture a payment. Every field is validated while decoding: anything else is
/// dead-lettered as `malformed` (or `missing-key`) before a transaction is even opened.
#[derive(Debug, Deserialize, idem::Message)]
#[idem(kind = "payment.requested")]
struct PaymentRequested {
    #[idem(key)]
    payment_id: Uuid,
    account_id: AccountId,
    amount_cents: PositiveCents,
    currency: Currency,
}

/// 1 to 64 characters.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct AccountId(String);

impl TryFrom<String> for AccountId {
    type Error = String;
    fn try_from(id: String) -> Result<Self, String> {
        match id.chars().count() {
            1..=64 => Ok(Self(id)),
            n => Err(format!("account_id must be 1 to 64 characters, got {n}")),
        }
    }
}

/// An amount in cents, greater than zero.
#[derive(Debug, Deserialize)]
#[serde(try_from = "i64")]
struct PositiveCents(i64);

impl TryFrom<i64> for PositiveCents {
    type Error = String;
    fn try_from(cents: i64) -> Result<Self, String> {
        if cents > 0 {
            Ok(Self(cents))
        } else {
            Err(format!("amount_cents must be greater than 0, got {cents}"))
        }
    }
}

/// An ISO 4217-shaped code: three capital letters.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct Currency(String);

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(code: String) -> Result<Self, String> {
        if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(code))
        } else {
            Err(format!(
                "currency must be three capital letters like \"EUR\", got {code:?}"
            ))
        }
    }
}

// `captures` deliberately has no unique constraint on payment_id: the ledger alone stops
// duplicates, and the tests count these rows to prove it.
const CREATE_TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS accounts (
        account_id    TEXT   PRIMARY KEY,
        balance_cents BIGINT NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS captures (
        id           INTEGER_ID,
        payment_id   TEXT   NOT NULL,
        account_id   TEXT   NOT NULL,
        amount_cents BIGINT NOT NULL,
        currency     TEXT   NOT NULL
    )",
];
const INSERT_CAPTURE: &str =
    "INSERT INTO captures (payment_id, account_id, amount_cents, currency) VALUES ($1, $2, $3, $4)";
const CREDIT_ACCOUNT: &str = "INSERT INTO accounts (account_id, balance_cents) VALUES ($1, $2)
     ON CONFLICT (account_id) DO UPDATE SET balance_cents = accounts.balance_cents + excluded.balance_cents";

// One handler body, stamped for both backends because this binary picks its database at run
// time from DATABASE_URL. A service with one database writes the `#[idem::handler]` fn once.
macro_rules! capture_handler {
    ($name:ident, $db:ty) => {
        /// Captures a payment: one `captures` row, and the amount credited to the account (the
        /// account row is created at 0 if missing). idem commits this with the ledger claim.
        #[idem::handler(consumer = "payments")]
        async fn $name(tx: &mut Tx<'_, $db>, payment: PaymentRequested) -> Result<(), sqlx::Error> {
            sqlx::query(INSERT_CAPTURE)
                .bind(payment.payment_id.to_string())
                .bind(&payment.account_id.0)
                .bind(payment.amount_cents.0)
                .bind(&payment.currency.0)
                .execute(tx.conn())
                .await?;
            sqlx::query(CREDIT_ACCOUNT)
                .bind(&payment.account_id.0)
                .bind(payment.amount_cents.0)
                .execute(tx.conn())
                .await?;
            Ok(())
        }
    };
}
capture_handler!(capture_on_postgres, Postgres);
capture_handler!(capture_on_sqlite, Sqlite);

/// The example's own tables and the demo's read-back queries, per backend.
trait PaymentsStore: Backend {
    async fn create_tables(pool: &sqlx::Pool<Self>) -> Result<(), sqlx::Error>;
    async fn balances(
        pool: &sqlx::Pool<Self>,
        prefix: &str,
    ) -> Result<HashMap<String, i64>, sqlx::Error>;
    async fn captures(
        pool: &sqlx::Pool<Self>,
        prefix: &str,
    ) -> Result<HashMap<String, i64>, sqlx::Error>;
}

macro_rules! payments_store {
    ($db:ty, $id_column:literal, $lock:literal) => {
        impl PaymentsStore for $db {
            async fn create_tables(pool: &sqlx::Pool<Self>) -> Result<(), sqlx::Error> {
                let mut tx = pool.begin().await?;
                // Two consumers starting at once must not race on CREATE TABLE.
                if !$lock.is_empty() {
                    sqlx::query($lock).execute(&mut *tx).await?;
                }
                for sql in CREATE_TABLES {
                    sqlx::query(&sql.replace("INTEGER_ID", $id_column)).execute(&mut *tx).await?;
                }
                tx.commit().await
            }
            async fn balances(pool: &sqlx::Pool<Self>, prefix: &str) -> Result<HashMap<String, i64>, sqlx::Error> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT account_id, balance_cents FROM accounts WHERE account_id LIKE $1")
                        .bind(format!("{prefix}%"))
                        .fetch_all(pool)
                        .await?;
                Ok(rows.into_iter().collect())
            }
            async fn captures(pool: &sqlx::Pool<Self>, prefix: &str) -> Result<HashMap<String, i64>, sqlx::Error> {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT payment_id, COUNT(*) FROM captures WHERE account_id LIKE $1 GROUP BY payment_id",
                )
                .bind(format!("{prefix}%"))
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().collect())
            }
        }
    };
}
payments_store!(
    Postgres,
    "BIGSERIAL PRIMARY KEY",
    "SELECT pg_advisory_xact_lock(4931402250211918)"
);
payments_store!(Sqlite, "INTEGER PRIMARY KEY AUTOINCREMENT", "");

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    // The demo prints a summary; per-delivery lines would bury it (RUST_LOG=info shows them).
    let default_filter = if config.demo { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let url = config.database_url.as_str();
    let result = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        run::<Postgres, _>(&config, capture_on_postgres).await
    } else if url.starts_with("sqlite:") {
        run::<Sqlite, _>(&config, capture_on_sqlite).await
    } else {
        Err(format!(
            "DATABASE_URL {:?} is neither postgres://… nor sqlite:…; set it to e.g. postgres://user@127.0.0.1/payments or sqlite://payments.db",
            idem::redact_url(url)
        )
        .into())
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("payments: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

async fn run<DB: PaymentsStore, H: Handler<DB, Message = PaymentRequested>>(
    config: &Config,
    handler: H,
) -> Result<(), AnyError> {
    let concurrency = config
        .concurrency
        .unwrap_or_else(|| 8.min(u32::from(config.prefetch)));
    let pool = DB::connect(&config.database_url, concurrency).await?;
    DB::migrate(&pool).await?;
    DB::create_tables(&pool).await?;
    let consumer = Consumer::builder(pool.clone(), handler)
        .queue(&config.queue)
        .prefetch(config.prefetch)
        .concurrency(concurrency as usize)
        .build()?;
    if !config.demo {
        // Reconnects by itself after a broker restart; waits (without dead-lettering) while the
        // database is away; fails fast only on what a restart cannot fix.
        consumer
            .serve(&config.amqp_url, idem::amqp::shutdown_signal())
            .await?;
        return Ok(());
    }
    let connection = idem::amqp::connect(&config.amqp_url).await?;
    consumer.declare(&connection).await?;
    demo(config, &connection, &consumer, &pool).await
}

/// What the demo sent, to check the database against.
struct Sent {
    run: String,
    published: usize,
    duplicates: usize,
    bad: usize,
    expected_balances: HashMap<String, i64>,
    payment_ids: Vec<String>,
}

async fn demo<DB: PaymentsStore, H: Handler<DB, Message = PaymentRequested>>(
    config: &Config,
    connection: &Connection,
    consumer: &Consumer<DB, H>,
    pool: &sqlx::Pool<DB>,
) -> Result<(), AnyError> {
    let sent = publish_demo_batch(config, connection).await?;
    println!(
        "published {} messages: {} unique payments, {} duplicates, {} bad",
        sent.published,
        sent.payment_ids.len(),
        sent.duplicates,
        sent.bad
    );
    let before = consumer.stats();
    let started = Instant::now();
    let done = async {
        // Stop once everything we sent has an outcome (or after a minute, and say so).
        loop {
            let now = consumer.stats();
            let handled = (now.applied + now.duplicates + now.dead_lettered)
                - (before.applied + before.duplicates + before.dead_lettered);
            if handled as usize >= sent.published || started.elapsed() > Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    consumer.run(connection, done).await?;
    let stats = consumer.stats();
    let dead_letters = read_dead_letters(connection, &config.queue, &sent.run).await?;
    let balances = DB::balances(pool, &sent.run).await?;
    let captures = DB::captures(pool, &sent.run).await?;
    let balances_ok = balances == sent.expected_balances;
    let captured_once = sent
        .payment_ids
        .iter()
        .all(|id| captures.get(id) == Some(&1))
        && captures.len() == sent.payment_ids.len();
    let dead_lettered: usize = dead_letters.values().sum();

    println!(
        "\nidem payments demo ({} on {})",
        DB::NAME,
        idem::redact_url(&config.database_url)
    );
    println!("  published            {}", sent.published);
    println!("  applied              {}", stats.applied - before.applied);
    println!(
        "  duplicates skipped   {}",
        stats.duplicates - before.duplicates
    );
    println!(
        "  dead-lettered        {} ({})",
        stats.dead_lettered - before.dead_lettered,
        dead_letters
            .iter()
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  captured exactly once {}",
        if captured_once { "yes" } else { "NO" }
    );
    println!(
        "  balances verified    {} ({} accounts)",
        if balances_ok { "yes" } else { "NO" },
        sent.expected_balances.len()
    );
    println!("  took                 {:.2?}", started.elapsed());
    if balances_ok && captured_once && dead_lettered == sent.bad {
        Ok(())
    } else {
        Err(format!(
            "verification failed: balances {balances:?} expected {:?}; captures {captures:?}; dead letters {dead_letters:?}",
            sent.expected_balances
        )
        .into())
    }
}

async fn publish_demo_batch(config: &Config, connection: &Connection) -> Result<Sent, AnyError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let run = format!("demo-{}-", &Uuid::new_v4().simple().to_string()[..8]);
    let mut sent = Sent {
        run: run.clone(),
        published: 0,
        duplicates: 0,
        bad: 0,
        expected_balances: HashMap::new(),
        payment_ids: Vec::new(),
    };
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..config.demo_payments {
        let payment_id = Uuid::new_v4();
        let account = format!("{run}acct-{}", i % 5);
        let amount = 100 + (i as i64 * 37) % 900;
        let body = serde_json::json!({
            "payment_id": payment_id, "account_id": account, "amount_cents": amount, "currency": "EUR"
        });
        let body = serde_json::to_vec(&body)?;
        *sent.expected_balances.entry(account).or_default() += amount;
        sent.payment_ids.push(payment_id.to_string());
        messages.push((payment_id.to_string(), body.clone()));
        // Every third payment is sent twice, every fifth three times: what a retrying producer does.
        for copy in 0..(usize::from(i % 3 == 0) + 2 * usize::from(i % 5 == 0)) {
            let _ = copy;
            messages.push((payment_id.to_string(), body.clone()));
            sent.duplicates += 1;
        }
    }
    let good_id = Uuid::new_v4();
    let bad: [&[u8]; 6] = [
        b"this is not json",
        b"",
        br#"{"account_id": "a", "amount_cents": 100, "currency": "EUR"}"#,
        br#"{"payment_id": "GOOD", "account_id": "a", "amount_cents": 0, "currency": "EUR"}"#,
        br#"{"payment_id": "GOOD", "account_id": "a", "amount_cents": 100, "currency": "usd"}"#,
        br#"{"payment_id": "GOOD", "account_id": "a", "amount_cents": "100", "currency": "EUR"}"#,
    ];
    for body in bad {
        let body = String::from_utf8_lossy(body)
            .replace("GOOD", &good_id.to_string())
            .into_bytes();
        messages.push((Uuid::new_v4().to_string(), body));
        sent.bad += 1;
    }
    for (message_id, body) in &messages {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.as_str().into())
            .with_correlation_id(run.as_str().into());
        channel
            .basic_publish(
                "".into(),
                config.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?;
    }
    channel.wait_for_confirms().await?;
    sent.published = messages.len();
    let _ = channel.close(200, "published".into()).await;
    Ok(sent)
}

/// Counts this run's dead letters by reason, leaving them in the DLQ (they are requeued when
/// the channel closes) for `rabbitmqctl list_queues` and a human to look at.
async fn read_dead_letters(
    connection: &Connection,
    queue: &str,
    run: &str,
) -> Result<BTreeMap<String, usize>, AnyError> {
    let channel = connection.create_channel().await?;
    let dlq = idem::amqp::dead_letter_queue(queue);
    let mut reasons = BTreeMap::new();
    while let Some(message) = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let properties = &message.delivery.properties;
        if properties.correlation_id().as_ref().map(|c| c.as_str()) != Some(run) {
            continue;
        }
        let reason = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(REASON_HEADER).cloned())
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .unwrap_or_else(|| "(none)".into());
        *reasons.entry(reason).or_default() += 1;
    }
    let _ = channel.close(200, "dead letters counted".into()).await;
    Ok(reasons)
}
