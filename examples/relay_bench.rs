//! The outbox relay, measured: how fast it publishes, and how long a message takes from the
//! producer's commit to the downstream consumer's transaction.
//!
//! 1. **Throughput**, in `--rounds` rounds: first the broker's own pace — a plain lapin
//!    publisher with confirms (a window of 1,000 unconfirmed) sends `--messages` persistent
//!    messages of the relay's size and properties to a queue; then `--messages` rows are
//!    committed to the outbox (1,000 per transaction) while no relay runs, `--relays` relays
//!    start and the clock runs until every row is published, confirmed by the broker and
//!    marked in the database. Each round prints both rates and their ratio.
//! 2. **Latency**, at each of `--rates` orders per second: `--latency-messages` orders are placed
//!    one transaction each (a business row plus an outbox row; each order on its own task, so a
//!    slow commit does not hold back the next), with one relay (woken by LISTEN/NOTIFY) and an
//!    idem consumer downstream running. For each message: the time from the producer's COMMIT
//!    returning to the downstream handler running inside its transaction (its COMMIT follows
//!    within one round trip). Printed as p50 / p99 / max.
//!
//! The last line is the median of the rounds' relay/publish ratios (target ≥ 0.8).
//!
//! ```text
//! scripts/bench relay                  # throw-away servers, then the line below
//! DATABASE_URL=postgres://… AMQP_URL=amqp://… cargo run --release --example relay_bench [-- --relays 2]
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use idem::amqp::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use idem::amqp::lapin::types::FieldTable;
use idem::amqp::lapin::{BasicProperties, Channel, Confirmation, Connection};
use idem::amqp::{Consumer, Relay};
use idem::outbox::{self, Outgoing, Route};
use idem::{async_trait, Backend, Handler, HandlerError, Postgres, Tx};
use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "Outbox relay throughput and commit-to-downstream latency, on PostgreSQL")]
struct Config {
    /// Rows (and plain publishes) per throughput round.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Throughput rounds; the last line is the median of their relay/publish ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Relays draining the backlog side by side, as a service's instances run them: each
    /// publishes its share of the outbox's partitions (a destination's order kept), or with
    /// `--share-outbox` every relay takes any row (order between relays lost).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    relays: u32,
    /// Run the relays sharing the outbox, without the publish lease: one relay this way against
    /// the default measures the lease's cost.
    #[arg(long)]
    share_outbox: bool,
    /// Queues the backlog (and the plain publisher) spread over, round robin: a destination is
    /// published by one relay at a time, so several relays need several destinations.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    destinations: u32,
    /// Messages per latency run.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    latency_messages: u64,
    /// The latency runs: orders per second placed, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [200, 2000])]
    rates: Vec<u32>,
    /// With M > 0, every round also drains the backlog with M published rows aged past the
    /// retention (8 days old) in the outbox: the relays' purge deletes them meanwhile, and the
    /// round prints `relay+purge` and its ratio to the plain relay run.
    #[arg(long, default_value_t = 0)]
    aged_rows: u64,
    /// Relays with a retention of zero: published rows deleted as they are published rather
    /// than marked and kept (the default keeps them 7 days).
    #[arg(long)]
    retention_zero: bool,
    /// Rows the relay takes per round (the relay's default: 500).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..))]
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
                // sqlx WARNs of every statement over 1 s (the aged rows' insert).
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error")),
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
    // The producers placing orders, the downstream consumer (8) and the relays (2 each) all
    // draw on it: none of them may wait for a connection.
    let pool = Postgres::connect(&config.database_url, 40).await?;
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
        "idem relay bench: PostgreSQL, batch {} rows, {} relay(s){}{}, {} destination(s), {} rounds of {} rows for throughput, {} orders for latency at {:?}/s",
        config.batch_size,
        config.relays,
        if config.share_outbox {
            " sharing the outbox"
        } else {
            " (publish lease: partitions)"
        },
        if config.retention_zero {
            ", retention 0 (published rows deleted)"
        } else {
            ""
        },
        config.destinations,
        config.rounds,
        config.messages,
        config.latency_messages,
        config.rates
    );

    // 1. Throughput: the broker's pace with a plain publisher, then a backlog and the relays.
    let sinks: Vec<String> = (0..config.destinations)
        .map(|d| format!("bench-relay-sink-{run}-{d}"))
        .collect();
    for sink in &sinks {
        channel
            .queue_declare(
                sink.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
    }
    let purge = || async {
        for sink in &sinks {
            channel
                .queue_purge(sink.as_str().into(), QueuePurgeOptions::default())
                .await?;
        }
        anyhow::Ok(())
    };
    let mut publish_rates = Vec::new();
    let mut relay_rates = Vec::new();
    let mut ratios = Vec::new();
    for round in 1..=config.rounds {
        let publish_rate = plain_publish(&connection, &sinks, config.messages).await?;
        purge().await?;
        let (relay_rate, shares) = relay_backlog(&config, &pool, &sinks).await?;
        purge().await?;
        let purging = if config.aged_rows > 0 {
            age_published_rows(&pool, config.aged_rows).await?;
            let (rate, _) = relay_backlog(&config, &pool, &sinks).await?;
            purge().await?;
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM idem_outbox_sent WHERE published_at < now() - interval '7 days'",
            )
            .fetch_one(&pool)
            .await?;
            format!(
                ", relay+purge {rate:.0} msgs/s (relay+purge/relay {:.2}, {} aged rows purged meanwhile)",
                rate / relay_rate,
                i64::try_from(config.aged_rows)? - left
            )
        } else {
            String::new()
        };
        let ratio = relay_rate / publish_rate;
        println!(
            "round {round}/{}: publish {publish_rate:.0} msgs/s, relay {relay_rate:.0} msgs/s ({} relay{}{shares}), relay/publish {ratio:.2}{purging}",
            config.rounds,
            config.relays,
            if config.relays == 1 { "" } else { "s" }
        );
        publish_rates.push(publish_rate);
        relay_rates.push(relay_rate);
        ratios.push(ratio);
    }
    for sink in &sinks {
        channel
            .queue_delete(sink.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    println!("publish: {:.0} msgs/s", median(&mut publish_rates));
    println!("relay: {:.0} msgs/s", median(&mut relay_rates));

    // 2. Latency at each rate: paced orders through outbox, relay and a downstream consumer.
    // Without aged rows left for a purge to delete meanwhile.
    sqlx::query("DELETE FROM idem_outbox_sent WHERE published_at < now() - interval '7 days'")
        .execute(&pool)
        .await?;
    for &rate in &config.rates {
        latency(&config, &pool, &connection, &channel, run, rate).await?;
    }
    println!("relay/publish throughput ratio: {:.2}", median(&mut ratios));
    Ok(())
}

/// The broker's pace: `n` persistent messages of the relay's size and properties, published with
/// confirms to `queues` in turn, at most 1,000 unconfirmed; msgs/s.
async fn plain_publish(connection: &Connection, queues: &[String], n: u64) -> anyhow::Result<f64> {
    let channel: Channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let mut window = VecDeque::with_capacity(1000);
    for (queue, _) in queues.iter().cycle().zip(0..n) {
        let order = OrderPlaced {
            order_id: Uuid::new_v4(),
        };
        let body = serde_json::to_vec(&order)?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_type("bench.order-placed".into())
            .with_timestamp(0)
            .with_headers(FieldTable::default());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?;
        window.push_back(confirm);
        if window.len() == 1000 {
            if let Some(oldest) = window.pop_front() {
                confirmed(oldest.await?)?;
            }
        }
    }
    for confirm in window {
        confirmed(confirm.await?)?;
    }
    let took = started.elapsed();
    let _ = channel.close(200, "published".into()).await;
    Ok(n as f64 / took.as_secs_f64())
}

fn confirmed(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("the broker did not take a message: {other:?}"),
    }
}

/// `--relays` relays started on an empty outbox (each holding its share of the partitions, when
/// they hold a lease), then `--messages` rows committed to it in one transaction, spread over
/// the `sinks`; msgs/s from the commit until every row is marked published, and what each
/// relay published.
async fn relay_backlog(
    config: &Config,
    pool: &sqlx::PgPool,
    sinks: &[String],
) -> anyhow::Result<(f64, String)> {
    let relays: Vec<Arc<Relay<Postgres>>> = (0..config.relays)
        .map(|_| bench_relay(config, pool).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let running: Vec<_> = relays
        .iter()
        .map(|relay| spawn_relay(relay, &config.amqp_url))
        .collect();
    if !config.share_outbox {
        // Measured once every relay publishes its share, not while they divide the outbox.
        let share = outbox::PARTITIONS.div_ceil(config.relays);
        wait_until(
            "the relays share the outbox",
            Duration::from_secs(30),
            || {
                let held: Vec<u32> = relays.iter().filter_map(|r| r.partitions()).collect();
                held.iter().sum::<u32>() == outbox::PARTITIONS
                    && held.iter().all(|&n| n + 1 >= share && n <= share)
            },
        )
        .await?;
    }
    let mut tx = pool.begin().await?;
    for (sink, _) in sinks.iter().cycle().zip(0..config.messages) {
        let order = OrderPlaced {
            order_id: Uuid::new_v4(),
        };
        let message = Outgoing::json(&order, Uuid::new_v4())?.route(Route::queue(sink));
        outbox::enqueue::<Postgres>(&mut tx, &message).await?;
    }
    tx.commit().await?;
    let started = Instant::now();
    let published = || relays.iter().map(|r| r.stats().published).sum::<u64>();
    wait_until("the backlog is published", Duration::from_secs(600), || {
        published() >= config.messages
    })
    .await?;
    let took = started.elapsed();
    let shares = if config.relays > 1 {
        let each: Vec<String> = relays
            .iter()
            .map(|r| r.stats().published.to_string())
            .collect();
        format!(": {} rows each", each.join("/"))
    } else {
        String::new()
    };
    for (stop, task) in running {
        let _ = stop.send(());
        task.await??;
    }
    let failed: u64 = relays.iter().map(|r| r.stats().failed).sum();
    if published() != config.messages || failed > 0 {
        bail!(
            "the relays published {} rows of {} ({failed} failed publishes): a row went out twice or not at all",
            published(),
            config.messages
        );
    }
    Ok((config.messages as f64 / took.as_secs_f64(), shares))
}

/// Writes the records of `rows` outbox rows published 8 days ago: past the default retention, so the relays'
/// purge deletes them (5,000 per batch, paced) while they publish.
async fn age_published_rows(pool: &sqlx::PgPool, rows: u64) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM idem_outbox_sent WHERE published_at < now() - interval '7 days'")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO idem_outbox_sent (message_id, exchange, routing_key, published_at)
         SELECT gen_random_uuid()::text, '', 'aged', now() - interval '8 days'
         FROM generate_series(1, $1)",
    )
    .bind(i64::try_from(rows)?)
    .execute(pool)
    .await
    .context("writing aged published rows")?;
    Ok(())
}

/// A relay as the bench runs it: `--batch-size`, `--share-outbox`, and with `--retention-zero`
/// a retention of zero (otherwise the relay's default).
fn bench_relay(config: &Config, pool: &sqlx::PgPool) -> anyhow::Result<Relay<Postgres>> {
    let builder = Relay::builder(pool.clone())
        .batch_size(config.batch_size)
        .share_outbox(config.share_outbox);
    let builder = if config.retention_zero {
        builder.retention(Duration::ZERO)
    } else {
        builder
    };
    Ok(builder.build()?)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One latency run at `rate` orders/s: each order one transaction (a business row and its
/// outbox row) on a task of its own, the relay and a downstream consumer running.
async fn latency(
    config: &Config,
    pool: &sqlx::PgPool,
    connection: &Connection,
    channel: &Channel,
    run: &str,
    rate: u32,
) -> anyhow::Result<()> {
    let relay = Arc::new(bench_relay(config, pool)?);
    let (stop_relay, relay_task) = spawn_relay(&relay, &config.amqp_url);
    let queue = format!("bench-relay-orders-{run}-{rate}");
    let arrived = Arc::new(Mutex::new(HashMap::new()));
    let consumer = Arc::new(
        Consumer::builder(
            pool.clone(),
            Downstream {
                arrived: Arc::clone(&arrived),
            },
        )
        .queue(&queue)
        // Group commit, so that the consumer is not the slowest hop at 2k orders/s on two
        // cores (one transaction per message tops out near there); a group starts at once
        // when none is in flight, so at low rates this is per-message latency.
        .group_commit(50, Duration::from_millis(2))
        .build()?,
    );
    consumer.declare(connection).await?;
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
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut next = Instant::now();
    let mut placing = tokio::task::JoinSet::new();
    for _ in 0..config.latency_messages {
        tokio::time::sleep_until(next.into()).await;
        next += gap;
        let (pool, queue) = (pool.clone(), queue.clone());
        placing.spawn(async move {
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
            Ok::<_, anyhow::Error>((order.order_id, Instant::now()))
        });
    }
    let mut committed = HashMap::new();
    while let Some(placed) = placing.join_next().await {
        let (order_id, at) = placed??;
        committed.insert(order_id, at);
    }
    let behind = Instant::now().saturating_duration_since(next);
    if behind > Duration::from_millis(100) {
        tracing::warn!(?behind, "the producers fell behind the rate");
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
        rate
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
