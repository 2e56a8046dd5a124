//! The payments service: captures each `PaymentRequested` exactly once.
//!
//! ```text
//! cargo run --release --example payments            # consume until SIGTERM / Ctrl-C
//! cargo run --release --example payments -- --demo  # publish a batch with duplicates and garbage, consume it, verify
//! ```
//!
//! A payment that names an order (`"order_id": "…"`, as the orders example sends them) is also
//! announced as `payment.captured` to the orders queue, through the outbox, in the capture's
//! transaction; the outbox relay runs in this process (a spawned task) unless `IDEM_RELAY=off`.
//! Without `order_id` nothing is announced and no outbox row is written.
//!
//! Environment: `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), `DATABASE_URL`
//! (default `sqlite://payments.db` in the working directory; a `postgres://` URL selects
//! PostgreSQL), `IDEM_QUEUE` (default `payments`), `IDEM_PREFETCH` (default 200),
//! `IDEM_CONCURRENCY` (default 8), `IDEM_ORDERS_QUEUE` (default `orders`: where captures of
//! order payments are announced), `IDEM_RELAY` (default `on`; `off` when another process relays
//! this database's outbox — on SQLite only one relay may run per database), `IDEM_METRICS_ADDR`
//! (unset by default; e.g. `127.0.0.1:9464` serves Prometheus metrics at `/metrics`, liveness at
//! `/healthz` and readiness at `/readyz`: 200, or 503 while not ready), `IDEM_GROUP_COMMIT`
//! (unset or 0/1: one transaction per message; n: group commit of up to n messages),
//! `IDEM_GROUP_WAIT_MS` (default 5: how long a group may wait to fill) and `IDEM_BATCH_HANDLER`
//! (default `off`; `on`: the handler takes each group's payments in one call, a batch handler;
//! needs `IDEM_GROUP_COMMIT`), `IDEM_QUEUE_TYPE` (default `classic`; `quorum` on a RabbitMQ
//! cluster: the queues, dead letters and delay queues replicated). `AMQP_URL` may list the
//! nodes of a cluster, comma-separated: the first that answers is used, the others on loss.
//!
//! Over 400 lines on purpose: the contract the tests drive (configuration, consumer, relay, demo)
//! stays one example a user reads top to bottom.

#[path = "shared/logging.rs"]
mod logging;
#[path = "shared/observe.rs"]
mod observe;
#[path = "shared/payments.rs"]
mod service;

use clap::builder::BoolishValueParser;
use clap::Parser;
use idem::amqp::lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use idem::amqp::lapin::{BasicProperties, Connection};
use idem::amqp::{headers, Consumer, Relay, Shutdown, RELAY_POOL_CONNECTIONS};
use idem::{Backend, Batch, BatchHandler, Handler, Postgres, Sqlite};
use service::{Capture, PaymentRequested, PaymentsStore};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
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
    /// Group commit: up to this many messages per transaction (0 or 1: one per message).
    #[arg(long, env = "IDEM_GROUP_COMMIT", default_value_t = 0)]
    group_commit: usize,
    /// How long a group may wait to fill, in milliseconds.
    #[arg(long, env = "IDEM_GROUP_WAIT_MS", default_value_t = 5)]
    group_wait_ms: u64,
    /// The handler takes a group's payments in one call (`on`/`off`): a batch handler. Needs
    /// group commit.
    #[arg(long, env = "IDEM_BATCH_HANDLER", default_value = "off", value_parser = BoolishValueParser::new(), hide_possible_values = true, action = clap::ArgAction::Set)]
    batch_handler: bool,
    /// The type of the queues (`classic` or `quorum`), this process's and the orders queue it
    /// declares for the relay.
    #[arg(long, env = "IDEM_QUEUE_TYPE", default_value = "classic")]
    queue_type: idem::amqp::QueueType,
    /// The queue `payment.captured` goes to, for payments that name an order.
    #[arg(long, env = "IDEM_ORDERS_QUEUE", default_value = "orders")]
    orders_queue: String,
    /// Run the outbox relay in this process (`on`/`off`). Off when another process relays this
    /// database's outbox: on SQLite only one relay may run per database.
    #[arg(long, env = "IDEM_RELAY", default_value = "on", value_parser = BoolishValueParser::new(), hide_possible_values = true, action = clap::ArgAction::Set)]
    relay: bool,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this address, e.g.
    /// 127.0.0.1:9464.
    #[arg(long, env = "IDEM_METRICS_ADDR")]
    metrics_addr: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    // The demo prints a summary; per-delivery lines would bury it (RUST_LOG=info shows them).
    let default_filter = if config.demo { "warn" } else { "info" };
    if let Err(error) = logging::init(default_filter, false) {
        eprintln!("payments: {error}");
        return std::process::ExitCode::from(2);
    }
    let url = config.database_url.as_str();
    let result = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        run::<Postgres>(&config).await
    } else if url.starts_with("sqlite:") {
        run::<Sqlite>(&config).await
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
            eprintln!("payments: {error}{}", amqp_url_hint(&*error));
            std::process::ExitCode::FAILURE
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

async fn run<DB: PaymentsStore>(config: &Config) -> Result<(), AnyError>
where
    Capture: Handler<DB, Message = PaymentRequested>,
    Capture: BatchHandler<DB, Message = PaymentRequested>,
{
    if config.batch_handler && config.group_commit < 2 {
        return Err(format!(
            "IDEM_BATCH_HANDLER=on needs group commit, or every payment is a batch of one: set IDEM_GROUP_COMMIT (e.g. 100), or IDEM_BATCH_HANDLER=off (IDEM_GROUP_COMMIT is {})",
            config.group_commit
        )
        .into());
    }
    let capture = Capture::new(&config.orders_queue);
    if config.batch_handler {
        serve::<DB, _>(config, Batch(capture)).await
    } else {
        serve::<DB, _>(config, capture).await
    }
}

/// Runs `handler` as the payments consumer (and the relay beside it), or the demo.
async fn serve<DB: PaymentsStore, H: Handler<DB, Message = PaymentRequested>>(
    config: &Config,
    handler: H,
) -> Result<(), AnyError> {
    // Before the consumer exists: every series it records from its first delivery on is kept.
    let endpoint = match &config.metrics_addr {
        Some(addr) if !config.demo => Some(observe::install(addr).await?),
        _ => None,
    };
    let concurrency = config
        .concurrency
        .unwrap_or_else(|| 8.min(u32::from(config.prefetch)));
    let relay = config.relay && !config.demo;
    // The relay holds LISTEN's connection and, on PostgreSQL, one per batch in flight.
    let connections = concurrency + RELAY_POOL_CONNECTIONS * u32::from(relay);
    let pool = DB::connect(&config.database_url, connections)
        .await
        .map_err(|error| format!("{error} (the URL comes from DATABASE_URL or --database-url)"))?;
    DB::migrate(&pool).await?;
    DB::create_tables(&pool).await?;
    let mut builder = Consumer::builder(pool.clone(), handler)
        .queue(&config.queue)
        .queue_type(config.queue_type)
        .prefetch(config.prefetch)
        .concurrency(concurrency as usize);
    if config.group_commit > 1 {
        let wait = Duration::from_millis(config.group_wait_ms);
        // Payments of one account update its balance row: every group takes accounts in
        // one order, so groups in flight side by side never deadlock on a hot account.
        builder = builder
            .group_commit(config.group_commit, wait)
            .group_lock_order(|payment: &PaymentRequested| payment.account_id.0.clone());
    }
    let consumer = Arc::new(builder.build()?);
    if config.demo {
        // The demo's payments name no order: nothing goes through the outbox, no relay needed.
        let connection = idem::amqp::connect(&config.amqp_url).await?;
        consumer.declare(&connection).await?;
        return demo(config, &connection, &consumer, &pool).await;
    }
    // One stop for the whole process: SIGTERM / SIGINT, logged once, stops the consumer (which
    // finishes and acks what is in flight) and the relay (which settles its batch).
    let shutdown = Shutdown::on_signals()?;
    // Aborted when `run` returns: the endpoint lives as long as the service.
    let _endpoint = endpoint.map(|endpoint| {
        let consumer = Arc::clone(&consumer);
        endpoint.spawn(Some(Arc::new(move || consumer.health())))
    });
    if !relay {
        // Reconnects by itself after a broker restart; waits (without dead-lettering) while the
        // database is away; fails fast only on what a restart cannot fix.
        consumer
            .serve(&config.amqp_url, shutdown.requested())
            .await?;
        return Ok(());
    }
    let relay = Arc::new(
        Relay::builder(pool.clone())
            .poll_interval(relay_poll_interval::<DB>())
            // Where this outbox's messages go: `payment.captured` to the orders queue (before
            // the orders service ever ran, it would bounce), and the payment requests an orders
            // service writes into the same database, to this consumer's queue.
            .declare_queue(&config.orders_queue)
            .declare_queue(&config.queue)
            .queue_type(config.queue_type)
            .build()?,
    );
    // On its own task: the relay's publishing loop stays off the consumer's path. A relay that
    // fails stops the consumer too, rather than leave it capturing payments whose announcements
    // nobody sends.
    let relaying = tokio::spawn({
        let (relay, url, shutdown) = (
            Arc::clone(&relay),
            config.amqp_url.clone(),
            shutdown.clone(),
        );
        async move {
            let relayed = relay.serve(&url, shutdown.requested()).await;
            if relayed.is_err() {
                shutdown.request("the outbox relay failed");
            }
            relayed
        }
    });
    let consumed = consumer.serve(&config.amqp_url, shutdown.requested()).await;
    // However the consumer ended, the relay ends with it.
    shutdown.request(match consumed {
        Ok(()) => "the consumer stopped",
        Err(_) => "the consumer failed",
    });
    let relayed = relaying.await;
    consumed?;
    relayed??;
    Ok(())
}

/// How long the relay sleeps when it has no wake-up: on PostgreSQL LISTEN/NOTIFY wakes it right
/// after each commit and polling only covers a lost notification; SQLite has no notifications,
/// so a short poll keeps the captures' announcements prompt.
fn relay_poll_interval<DB: Backend>() -> Duration {
    if DB::NAME == "PostgreSQL" {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(100)
    }
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
            .and_then(|h| h.inner().get(headers::REASON).cloned())
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .unwrap_or_else(|| "(none)".into());
        *reasons.entry(reason).or_default() += 1;
    }
    let _ = channel.close(200, "dead letters counted".into()).await;
    Ok(reasons)
}
