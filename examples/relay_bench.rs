//! The outbox relay, measured: how fast it publishes, and how long a message takes from the
//! producer's commit to the downstream consumer's transaction.
//!
//! 1. **Throughput**: `--messages` rows are committed to the outbox (1 000 per transaction)
//!    while no relay runs; then one relay starts and the clock runs until every row is published
//!    and confirmed by the broker and marked in the database.
//! 2. **Latency**: `--latency-messages` orders are placed one transaction each (a business row
//!    plus an outbox row) at `--rate` per second, with the relay (woken by LISTEN/NOTIFY) and an
//!    idem consumer downstream running. For each message: the time from the producer's COMMIT
//!    returning to the downstream handler running inside its transaction (its COMMIT follows
//!    within one round trip). Printed as p50 / p99 / max.
//!
//! ```text
//! scripts/bench relay                  # throw-away servers, then the line below
//! DATABASE_URL=postgres://… AMQP_URL=amqp://… cargo run --release --example relay_bench
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use idem::amqp::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use idem::amqp::lapin::types::FieldTable;
use idem::amqp::{Consumer, Relay};
use idem::outbox::{self, Outgoing, Route};
use idem::{async_trait, Backend, Handler, HandlerError, Postgres, Tx};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "Outbox relay throughput and commit-to-downstream latency, on PostgreSQL")]
struct Config {
    /// Rows for the throughput run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Messages for the latency run.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    latency_messages: u64,
    /// Orders per second placed during the latency run.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rate: u32,
    /// Rows the relay takes per round trip.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// PostgreSQL, e.g. postgres://postgres@127.0.0.1:5432/idem_bench.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
}

/// What the producer publishes and the downstream consumer applies.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
#[idem(kind = "bench.order-placed")]
struct OrderPlaced {
    #[idem(key)]
    order_id: Uuid,
}

/// The downstream consumer: notes when each order reached it, inside its transaction.
struct Downstream {
    arrived: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

#[async_trait]
impl Handler<Postgres> for Downstream {
    type Message = OrderPlaced;
    fn consumer(&self) -> &str {
        "bench-downstream"
    }
    async fn handle(
        &self,
        tx: &mut Tx<'_, Postgres>,
        order: OrderPlaced,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO bench_shipments (order_id) VALUES ($1)")
            .bind(order.order_id.to_string())
            .execute(tx.conn())
            .await?;
        if let Ok(mut arrived) = self.arrived.lock() {
            arrived.insert(order.order_id, Instant::now());
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Config::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relay_bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if !config.database_url.starts_with("postgres") {
        bail!("DATABASE_URL must be a postgres:// URL: the relay benchmark measures PostgreSQL");
    }
    let pool = Postgres::connect(&config.database_url, 10).await?;
    Postgres::migrate(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_orders (order_id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_shipments (order_id TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    if outbox::pending::<Postgres>(&pool).await? > 0 {
        bail!("the outbox already has unpublished rows; point DATABASE_URL at a bench database");
    }
    let connection = idem::amqp::connect(&config.amqp_url)
        .await
        .context("connecting to RabbitMQ (AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    let run = &Uuid::new_v4().simple().to_string()[..8];
    println!(
        "idem relay bench: PostgreSQL, batch {} rows, {} rows for throughput, {} at {}/s for latency",
        config.batch_size, config.messages, config.latency_messages, config.rate
    );

    // 1. Throughput: a backlog, then one relay.
    let sink = format!("bench-relay-sink-{run}");
    channel
        .queue_declare(
            sink.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    let mut placed = 0u64;
    while placed < config.messages {
        let mut tx = pool.begin().await?;
        for _ in 0..1000.min(config.messages - placed) {
            let order = OrderPlaced {
                order_id: Uuid::new_v4(),
            };
            let message = Outgoing::json(&order, Uuid::new_v4())?.route(Route::queue(&sink));
            outbox::enqueue::<Postgres>(&mut tx, &message).await?;
            placed += 1;
        }
        tx.commit().await?;
    }
    let relay = Arc::new(
        Relay::builder(pool.clone())
            .batch_size(config.batch_size)
            .build()?,
    );
    let (stop_relay, relay_task) = spawn_relay(&relay, &config.amqp_url);
    let started = Instant::now();
    wait_until("the backlog is published", Duration::from_secs(600), || {
        relay.stats().published >= config.messages
    })
    .await?;
    let took = started.elapsed();
    println!(
        "relay: {:.0} msgs/s published and confirmed ({} rows in {took:.2?}, failed publishes: {})",
        config.messages as f64 / took.as_secs_f64(),
        config.messages,
        relay.stats().failed
    );
    channel
        .queue_delete(sink.as_str().into(), QueueDeleteOptions::default())
        .await?;

    // 2. Latency: paced orders through outbox, relay and a downstream idem consumer.
    let queue = format!("bench-relay-orders-{run}");
    let arrived = Arc::new(Mutex::new(HashMap::new()));
    let consumer = Arc::new(
        Consumer::builder(
            pool.clone(),
            Downstream {
                arrived: Arc::clone(&arrived),
            },
        )
        .queue(&queue)
        .build()?,
    );
    consumer.declare(&connection).await?;
    let (stop_consumer, consumer_task) = {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let consumer = Arc::clone(&consumer);
        let url = config.amqp_url.clone();
        let task = tokio::spawn(async move {
            consumer
                .serve(&url, async {
                    let _ = stopped.await;
                })
                .await
        });
        (stop, task)
    };
    let mut committed = HashMap::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(config.rate));
    let mut next = Instant::now();
    for _ in 0..config.latency_messages {
        tokio::time::sleep_until(next.into()).await;
        next += gap;
        let order = OrderPlaced {
            order_id: Uuid::new_v4(),
        };
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO bench_orders (order_id) VALUES ($1)")
            .bind(order.order_id.to_string())
            .execute(&mut *tx)
            .await?;
        let id = outbox::stable_id("bench-orders", &order.order_id.to_string());
        let message = Outgoing::json(&order, id)?.route(Route::queue(&queue));
        outbox::enqueue::<Postgres>(&mut tx, &message).await?;
        tx.commit().await?;
        committed.insert(order.order_id, Instant::now());
    }
    let expected = committed.len();
    wait_until(
        "every order reached the downstream consumer",
        Duration::from_secs(120),
        || arrived.lock().map(|a| a.len() >= expected).unwrap_or(false),
    )
    .await?;
    let _ = stop_consumer.send(());
    consumer_task.await??;
    let _ = stop_relay.send(());
    relay_task.await??;
    let arrived = arrived
        .lock()
        .map_err(|_| anyhow::anyhow!("a handler panicked"))?
        .clone();
    let mut latencies: Vec<Duration> = committed
        .iter()
        .map(|(id, at)| {
            arrived
                .get(id)
                .map(|seen| seen.saturating_duration_since(*at))
                .context("an order never arrived")
        })
        .collect::<anyhow::Result<_>>()?;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "latency commit -> downstream transaction: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} orders at {}/s)",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
        latencies.len(),
        config.rate
    );
    let stats = consumer.stats();
    if stats.applied != expected as u64 {
        bail!(
            "the downstream consumer applied {} of {expected}",
            stats.applied
        );
    }
    for name in [queue.clone(), idem::amqp::dead_letter_queue(&queue)] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    Ok(())
}

type RelayTask = tokio::task::JoinHandle<Result<(), idem::amqp::Error>>;

fn spawn_relay(
    relay: &Arc<Relay<Postgres>>,
    url: &str,
) -> (tokio::sync::oneshot::Sender<()>, RelayTask) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = Arc::clone(relay);
    let url = url.to_owned();
    let task = tokio::spawn(async move {
        relay
            .serve(&url, async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
