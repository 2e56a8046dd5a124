//! The orders service: an order asks the payments service for its payment through the outbox,
//! and is marked paid when `payment.captured` comes back — each step exactly once, through
//! process crashes, relay restarts and redeliveries.
//!
//! ```text
//! cargo run --release --example orders -- demo --orders 20     # everything in one process, verified
//!
//! cargo run --release --example orders -- consume              # mark orders paid, until SIGTERM
//! cargo run --release --example payments                       # capture payments (and relay), until SIGTERM
//! cargo run --release --example orders -- relay                # (optional) more outbox relays, until SIGTERM
//! cargo run --release --example orders -- place --orders 100   # place orders, then exit
//! ```
//!
//! The chain: `place` writes each order and its `payment.requested` (addressed to the payments
//! queue) in one transaction; a relay publishes the request; the payments consumer captures it
//! and, in the same transaction, writes `payment.captured` to the outbox; a relay publishes it;
//! the orders consumer sets the order's status to `paid` and adds one to its `paid_count` —
//! deliberately not idempotent by itself: the ledger is what keeps it at 1.
//!
//! Environment, as for the payments example: `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), `DATABASE_URL` (default `sqlite://orders.db` in the
//! working directory; `postgres://…` selects PostgreSQL), `IDEM_ORDERS_QUEUE` (default
//! `orders`), `IDEM_PAYMENTS_QUEUE` (default `payments`), `IDEM_PREFETCH` (default 200),
//! `IDEM_CONCURRENCY` (default 8, or the prefetch if smaller), `IDEM_METRICS_ADDR` (unset by
//! default; for `consume` and `relay`, e.g. `127.0.0.1:9465` serves Prometheus metrics at
//! `/metrics`, liveness at `/healthz` and readiness at `/readyz`; give each process its own
//! address), `IDEM_QUEUE_TYPE` (default `classic`; `quorum` on a cluster; `AMQP_URL` may list
//! its nodes, comma-separated). The orders and the payments
//! processes must share one database (the same `DATABASE_URL`), and the payments example's
//! `IDEM_QUEUE` must be this `IDEM_PAYMENTS_QUEUE`. Every process declares the queues it
//! consumes or publishes to: a consumer its own, a relay the ones its messages go to
//! (`RelayBuilder::declare_queue`). Every long-running command stops on one SIGTERM / SIGINT
//! (`Shutdown::on_signals`), the demo's relay and both consumers together. Relays: run as many as you like (the payments process runs
//! one): on PostgreSQL they divide the outbox's partitions, each destination published by one
//! of them in order; on SQLite one publishes and the others stand by (a lease), and the lease of a
//! relay that died lapses only after 10 s, so with `orders relay` on SQLite run payments with
//! `IDEM_RELAY=off`.
//!
//! Over 400 lines on purpose: the whole service (commands, handlers for both backends, relay, demo)
//! is one example a user reads top to bottom.

#[path = "shared/logging.rs"]
mod logging;
#[path = "shared/observe.rs"]
mod observe;
#[path = "shared/payments.rs"]
mod payments;

use clap::{Parser, Subcommand};
use idem::amqp::{Consumer, Relay, Shutdown, RELAY_POOL_CONNECTIONS};
use idem::outbox::{self, Outgoing, Route};
use idem::{Backend, Handler, HandlerError, Postgres, Sqlite, Tx};
use payments::{
    AccountId, Capture, Currency, PaymentCaptured, PaymentRequested, PaymentsStore, PositiveCents,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "idem orders example: order → payment → order, each step exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The broker.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The orders (and payments) database: postgres://… or sqlite:… (created if missing).
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "sqlite://orders.db"
    )]
    database_url: String,
    /// The queue the orders consumer reads `payment.captured` from.
    #[arg(
        long,
        global = true,
        env = "IDEM_ORDERS_QUEUE",
        default_value = "orders"
    )]
    orders_queue: String,
    /// The queue of the payments consumer, where payment requests go.
    #[arg(
        long,
        global = true,
        env = "IDEM_PAYMENTS_QUEUE",
        default_value = "payments"
    )]
    payments_queue: String,
    /// The type of the queues (`classic` or `quorum`), as the payments process declares them.
    #[arg(
        long,
        global = true,
        env = "IDEM_QUEUE_TYPE",
        default_value = "classic"
    )]
    queue_type: idem::amqp::QueueType,
    /// Unacknowledged deliveries the broker may push ahead, per consumer.
    #[arg(long, global = true, env = "IDEM_PREFETCH", default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// Transactions in flight at once, per consumer [default: 8, or the prefetch if that is
    /// smaller; 4 in the demo].
    #[arg(long, global = true, env = "IDEM_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: Option<u32>,
    /// `consume` and `relay`: serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this
    /// address, e.g. 127.0.0.1:9465 (a relay alone answers both probes 200 while it runs).
    #[arg(long, global = true, env = "IDEM_METRICS_ADDR")]
    metrics_addr: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place orders, each with its payment request in the same transaction, then exit.
    Place {
        /// How many orders.
        #[arg(long, default_value_t = 10)]
        orders: u64,
        /// Order ids `<PREFIX>-<n>` (n from --first, zero-padded) and accounts
        /// `<PREFIX>-acct-<k>`, so that placing the same orders again changes nothing; without
        /// it, every order gets a fresh UUIDv4 id.
        #[arg(long)]
        prefix: Option<String>,
        /// The first order number.
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Orders are spread over this many accounts.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        accounts: u64,
    },
    /// Publish the outbox (payment requests and captures) until SIGTERM / Ctrl-C.
    Relay {
        /// How often to look for new rows without a wake-up [default: 1000 on PostgreSQL, which
        /// wakes on LISTEN/NOTIFY; 100 on SQLite, which has only polling].
        #[arg(long, env = "IDEM_RELAY_POLL_MS", value_parser = clap::value_parser!(u64).range(1..))]
        poll_ms: Option<u64>,
    },
    /// Mark orders paid on `payment.captured` until SIGTERM / Ctrl-C.
    Consume,
    /// Place orders and run the orders consumer, the payments consumer and one relay in this
    /// process until every order is paid; print a summary; exit 0 only if each order was paid
    /// exactly once and each payment captured exactly once.
    Demo {
        /// How many orders.
        #[arg(long, default_value_t = 20)]
        orders: u64,
        /// Give up (and fail) after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

/// The consumer name of the orders service: the scope of its ledger rows.
const CONSUMER: &str = "orders";

const CREATE_ORDERS: &str = "CREATE TABLE IF NOT EXISTS orders (
    order_id     TEXT    PRIMARY KEY,
    account_id   TEXT    NOT NULL,
    amount_cents BIGINT  NOT NULL,
    currency     TEXT    NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'pending',
    paid_count   INTEGER NOT NULL DEFAULT 0
)";
// A second `place` of the same order changes nothing (and neither does its outbox row).
const INSERT_ORDER: &str =
    "INSERT INTO orders (order_id, account_id, amount_cents, currency, status, paid_count)
     VALUES ($1, $2, $3, $4, 'pending', 0) ON CONFLICT (order_id) DO NOTHING";
// `paid_count + 1` is deliberately not idempotent: a second run for the same capture would
// show as 2. The amount and currency must match the order: a capture of something else is a bug
// upstream, not a payment of this order.
const MARK_PAID: &str = "UPDATE orders SET status = 'paid', paid_count = paid_count + 1
     WHERE order_id = $1 AND amount_cents = $2 AND currency = $3";

// One handler body, stamped for both backends (DATABASE_URL picks one at run time).
macro_rules! mark_paid_handler {
    ($name:ident, $db:ty) => {
        /// Marks the order of a captured payment paid. idem claims the payment id in the
        /// ledger first, so a capture announced twice (a relay that died before marking its
        /// row published, a redelivery) counts once.
        #[idem::handler(consumer = "orders")]
        async fn $name(
            tx: &mut Tx<'_, $db>,
            captured: PaymentCaptured,
        ) -> Result<(), HandlerError> {
            let done = sqlx::query(MARK_PAID)
                .bind(&captured.order_id)
                .bind(captured.amount_cents)
                .bind(&captured.currency)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() == 1 {
                Ok(())
            } else {
                // No retry can make the order appear: dead-letter it for a human.
                Err(HandlerError::permanent(format!(
                    "no order {:?} of {} {} (payment {})",
                    captured.order_id,
                    captured.amount_cents,
                    captured.currency,
                    captured.payment_id
                )))
            }
        }
    };
}
mark_paid_handler!(mark_paid_on_postgres, Postgres);
mark_paid_handler!(mark_paid_on_sqlite, Sqlite);

/// One order as `place` writes it.
struct Order {
    order_id: String,
    account_id: String,
    amount_cents: i64,
}

/// The orders table and the demo's read-back queries, per backend.
trait OrdersStore: PaymentsStore {
    async fn create_orders_table(pool: &sqlx::Pool<Self>) -> Result<(), sqlx::Error>;
    /// Inserts the order on the caller's transaction; `false` if it was there already.
    async fn insert_order(conn: &mut Self::Connection, order: &Order) -> Result<bool, sqlx::Error>;
    /// (order_id, status, paid_count) of the orders whose id starts with `prefix`.
    async fn order_states(
        pool: &sqlx::Pool<Self>,
        prefix: &str,
    ) -> Result<Vec<(String, String, i32)>, sqlx::Error>;
    /// How many orders whose id starts with `prefix` are paid.
    async fn paid_orders(pool: &sqlx::Pool<Self>, prefix: &str) -> Result<i64, sqlx::Error>;
}

macro_rules! orders_store {
    ($db:ty, $lock:literal) => {
        impl OrdersStore for $db {
            async fn create_orders_table(pool: &sqlx::Pool<Self>) -> Result<(), sqlx::Error> {
                let mut tx = pool.begin().await?;
                // Processes starting at once must not race on CREATE TABLE.
                if !$lock.is_empty() {
                    sqlx::query($lock).execute(&mut *tx).await?;
                }
                sqlx::query(CREATE_ORDERS).execute(&mut *tx).await?;
                tx.commit().await
            }
            async fn insert_order(
                conn: &mut Self::Connection,
                order: &Order,
            ) -> Result<bool, sqlx::Error> {
                let done = sqlx::query(INSERT_ORDER)
                    .bind(&order.order_id)
                    .bind(&order.account_id)
                    .bind(order.amount_cents)
                    .bind(CURRENCY)
                    .execute(&mut *conn)
                    .await?;
                Ok(done.rows_affected() == 1)
            }
            async fn order_states(
                pool: &sqlx::Pool<Self>,
                prefix: &str,
            ) -> Result<Vec<(String, String, i32)>, sqlx::Error> {
                sqlx::query_as(
                    "SELECT order_id, status, paid_count FROM orders WHERE order_id LIKE $1",
                )
                .bind(format!("{prefix}%"))
                .fetch_all(pool)
                .await
            }
            async fn paid_orders(
                pool: &sqlx::Pool<Self>,
                prefix: &str,
            ) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM orders WHERE order_id LIKE $1 AND status = 'paid'",
                )
                .bind(format!("{prefix}%"))
                .fetch_one(pool)
                .await
            }
        }
    };
}
orders_store!(Postgres, "SELECT pg_advisory_xact_lock(4931402250211919)");
orders_store!(Sqlite, "");

/// Every order of the example is in euros.
const CURRENCY: &str = "EUR";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints a summary; per-delivery lines would bury it (RUST_LOG=info shows them).
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    if let Err(error) = logging::init(default_filter, true) {
        eprintln!("orders: {error}");
        return std::process::ExitCode::from(2);
    }
    let url = cli.database_url.as_str();
    let result = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        run::<Postgres, _>(&cli, mark_paid_on_postgres).await
    } else if url.starts_with("sqlite:") {
        run::<Sqlite, _>(&cli, mark_paid_on_sqlite).await
    } else {
        Err(format!(
            "DATABASE_URL {:?} is neither postgres://… nor sqlite:…; set it to e.g. postgres://user@127.0.0.1/shop or sqlite://orders.db",
            idem::redact_url(url)
        )
        .into())
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("orders: {error}{}", amqp_url_hint(&*error));
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

async fn run<DB, M>(cli: &Cli, mark_paid: M) -> Result<(), AnyError>
where
    DB: OrdersStore,
    M: Handler<DB, Message = PaymentCaptured>,
    Capture: Handler<DB, Message = PaymentRequested>,
{
    let concurrency = cli
        .concurrency
        .unwrap_or_else(|| 8.min(u32::from(cli.prefetch)));
    match cli.command {
        Command::Place {
            orders,
            ref prefix,
            first,
            accounts,
        } => {
            let pool = DB::connect(&cli.database_url, 2).await?;
            DB::migrate(&pool).await?;
            DB::create_orders_table(&pool).await?;
            // No queue to declare first: every relay declares the queues it publishes to.
            let placed = place(cli, &pool, orders, prefix.as_deref(), first, accounts).await?;
            println!(
                "placed {} orders ({} new, {} already placed) with their payment requests",
                placed.orders.len(),
                placed.new,
                placed.orders.len() - placed.new
            );
            Ok(())
        }
        Command::Relay { poll_ms } => {
            // Before the relay records anything; it has no health of its own to report.
            let _endpoint = match &cli.metrics_addr {
                Some(addr) => Some(observe::install(addr).await?.spawn(None)),
                None => None,
            };
            let shutdown = Shutdown::on_signals()?;
            // LISTEN's connection, and one per batch in flight (two on PostgreSQL).
            let pool = DB::connect(&cli.database_url, RELAY_POOL_CONNECTIONS).await?;
            DB::migrate(&pool).await?;
            relay(cli, pool, poll_ms.map(Duration::from_millis))?
                .serve(&cli.amqp_url, shutdown.requested())
                .await?;
            Ok(())
        }
        Command::Consume => {
            // Before the consumer exists: every series it records is kept.
            let endpoint = match &cli.metrics_addr {
                Some(addr) => Some(observe::install(addr).await?),
                None => None,
            };
            let shutdown = Shutdown::on_signals()?;
            let pool = DB::connect(&cli.database_url, concurrency).await?;
            DB::migrate(&pool).await?;
            DB::create_orders_table(&pool).await?;
            let consumer = Arc::new(orders_consumer(cli, &pool, mark_paid, concurrency)?);
            // Aborted when the command returns: the endpoint lives as long as the consumer.
            let _endpoint = endpoint.map(|endpoint| {
                let consumer = Arc::clone(&consumer);
                endpoint.spawn(Some(Arc::new(move || consumer.health())))
            });
            // Reconnects by itself after a broker restart; waits (without dead-lettering) while
            // the database is away; fails fast only on what a restart cannot fix.
            consumer.serve(&cli.amqp_url, shutdown.requested()).await?;
            Ok(())
        }
        Command::Demo {
            orders,
            timeout_secs,
        } => demo(cli, mark_paid, orders, Duration::from_secs(timeout_secs)).await,
    }
}

fn orders_consumer<DB: Backend, M: Handler<DB, Message = PaymentCaptured>>(
    cli: &Cli,
    pool: &sqlx::Pool<DB>,
    mark_paid: M,
    concurrency: u32,
) -> Result<Consumer<DB, M>, AnyError> {
    Ok(Consumer::builder(pool.clone(), mark_paid)
        .queue(&cli.orders_queue)
        .queue_type(cli.queue_type)
        .prefetch(cli.prefetch)
        .concurrency(concurrency as usize)
        .build()?)
}

fn payments_consumer<DB: Backend>(
    cli: &Cli,
    pool: &sqlx::Pool<DB>,
    concurrency: u32,
) -> Result<Consumer<DB, Capture>, AnyError>
where
    Capture: Handler<DB, Message = PaymentRequested>,
{
    Ok(
        Consumer::builder(pool.clone(), Capture::new(&cli.orders_queue))
            .queue(&cli.payments_queue)
            .queue_type(cli.queue_type)
            .prefetch(cli.prefetch)
            .concurrency(concurrency as usize)
            .build()?,
    )
}

/// A relay of this database's outbox: payment requests go to the payments queue, captures to
/// the orders queue. It declares both on every connection (as their consumers do), so a row
/// committed before either consumer ever ran is delivered, not bounced as unroutable.
fn relay<DB: Backend>(
    cli: &Cli,
    pool: sqlx::Pool<DB>,
    poll_interval: Option<Duration>,
) -> Result<Relay<DB>, AnyError> {
    Ok(Relay::builder(pool)
        .poll_interval(poll_interval.unwrap_or_else(relay_poll_interval::<DB>))
        .declare_queue(&cli.payments_queue)
        .declare_queue(&cli.orders_queue)
        .queue_type(cli.queue_type)
        .build()?)
}

/// How long a relay sleeps without a wake-up: on PostgreSQL LISTEN/NOTIFY wakes it right after
/// each commit and polling only covers a lost notification; SQLite has no notifications.
fn relay_poll_interval<DB: Backend>() -> Duration {
    if DB::NAME == "PostgreSQL" {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(100)
    }
}

/// What `place` wrote.
struct Placed {
    orders: Vec<Order>,
    /// Orders that were not there before.
    new: usize,
}

/// The payment id of an order: derived from the order id, so placing the same order again
/// re-creates the same request, which the outbox keeps once (and the payments ledger would
/// deduplicate anyway).
fn payment_id(order_id: &str) -> Uuid {
    outbox::stable_id(CONSUMER, &format!("{order_id}/payment"))
}

/// Places `count` orders, one transaction each: the order row and its `payment.requested`
/// outbox row commit together or not at all.
async fn place<DB: OrdersStore>(
    cli: &Cli,
    pool: &sqlx::Pool<DB>,
    count: u64,
    prefix: Option<&str>,
    first: u64,
    accounts: u64,
) -> Result<Placed, AnyError> {
    let mut placed = Placed {
        orders: Vec::new(),
        new: 0,
    };
    let accounts = accounts.max(1);
    for n in first..first.saturating_add(count) {
        let (order_id, account_id) = match prefix {
            Some(prefix) => (
                format!("{prefix}-{n:06}"),
                format!("{prefix}-acct-{}", n % accounts),
            ),
            None => (Uuid::new_v4().to_string(), format!("acct-{}", n % accounts)),
        };
        let order = Order {
            amount_cents: 100 + (n % 900 * 37 % 900) as i64,
            order_id,
            account_id,
        };
        let payment_id = payment_id(&order.order_id);
        // Validated like the payments consumer will: a bad order fails here, not downstream.
        let request = PaymentRequested {
            payment_id,
            account_id: AccountId::try_from(order.account_id.clone())?,
            amount_cents: PositiveCents::try_from(order.amount_cents)?,
            currency: Currency::try_from(CURRENCY.to_owned())?,
            order_id: Some(order.order_id.clone()),
        };
        let message = Outgoing::json(&request, payment_id)?
            .route(Route::queue(&cli.payments_queue))
            .correlation_id(order.order_id.clone());
        let mut tx = pool.begin().await?;
        let new = DB::insert_order(&mut *tx, &order).await?;
        outbox::enqueue::<DB>(&mut *tx, &message).await?;
        tx.commit().await?;
        placed.new += usize::from(new);
        placed.orders.push(order);
    }
    Ok(placed)
}

/// Everything in one process: place, relay, capture, mark paid; then verify.
async fn demo<DB, M>(cli: &Cli, mark_paid: M, count: u64, timeout: Duration) -> Result<(), AnyError>
where
    DB: OrdersStore,
    M: Handler<DB, Message = PaymentCaptured>,
    Capture: Handler<DB, Message = PaymentRequested>,
{
    let started = Instant::now();
    let concurrency = cli.concurrency.unwrap_or(4).min(u32::from(cli.prefetch));
    // Both consumers, the relay, and the demo's own queries.
    let pool = DB::connect(&cli.database_url, 2 * concurrency + RELAY_POOL_CONNECTIONS).await?;
    DB::migrate(&pool).await?;
    DB::create_tables(&pool).await?;
    DB::create_orders_table(&pool).await?;
    let orders = orders_consumer(cli, &pool, mark_paid, concurrency)?;
    let payments = payments_consumer(cli, &pool, concurrency)?;
    // The consumers share one connection (each opens its own channels); the relay has its own.
    let connection = idem::amqp::connect(&cli.amqp_url).await?;
    orders.declare(&connection).await?;
    payments.declare(&connection).await?;

    let run = format!("demo-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let placed = place(cli, &pool, count, Some(&run), 0, 5).await?;

    // One relay: on SQLite there must be only one per database.
    let relay = relay(
        cli,
        pool.clone(),
        Some(relay_poll_interval::<DB>().min(Duration::from_millis(100))),
    )?;
    // One stop for the relay, both consumers and the watch below: SIGTERM / SIGINT, or the
    // watch once every order is paid (or it gave up).
    let shutdown = Shutdown::on_signals()?;
    let watch = async {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let paid = DB::paid_orders(&pool, &run).await.unwrap_or(0);
            if paid >= count as i64 {
                break;
            }
            tokio::select! {
                () = shutdown.requested() => break,
                () = &mut deadline => {
                    tracing::warn!(paid, count, ?timeout, "not every order is paid: giving up");
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // The last captures are consumed; give the relay a moment to mark them published.
        let settle = Instant::now() + Duration::from_secs(2);
        while outbox::pending::<DB>(&pool).await.unwrap_or(0) > 0 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.request("the demo is done");
    };
    let (relayed, captured, marked, ()) = tokio::join!(
        relay.serve(&cli.amqp_url, shutdown.requested()),
        payments.run(&connection, shutdown.requested()),
        orders.run(&connection, shutdown.requested()),
        watch,
    );
    let _ = connection.close(200, "demo done".into()).await;
    relayed?;
    captured?;
    marked?;

    // Verify against what was placed, with everything stopped.
    let states = DB::order_states(&pool, &run).await?;
    let captures = DB::captures(&pool, &run).await?;
    let balances = DB::balances(&pool, &run).await?;
    let unpublished = outbox::pending::<DB>(&pool).await?;
    let mut expected_balances: HashMap<String, i64> = HashMap::new();
    for order in &placed.orders {
        *expected_balances
            .entry(order.account_id.clone())
            .or_default() += order.amount_cents;
    }
    let paid = states
        .iter()
        .filter(|(_, status, _)| status == "paid")
        .count();
    let paid_once = states.len() == placed.orders.len()
        && states
            .iter()
            .all(|(_, status, paid_count)| status == "paid" && *paid_count == 1);
    let captured_once = captures.len() == placed.orders.len()
        && placed
            .orders
            .iter()
            .all(|order| captures.get(&payment_id(&order.order_id).to_string()) == Some(&1));
    let balances_ok = balances == expected_balances;
    let (relay_stats, payments_stats, orders_stats) =
        (relay.stats(), payments.stats(), orders.stats());
    let yes = |ok: bool| if ok { "yes" } else { "NO" };
    println!(
        "orders demo ({} on {}): {} orders placed, {paid} paid, paid_count 1 for all: {}, one \
         capture each: {}, balances: {} ({} accounts), relay published {} ({} failed), outbox \
         unpublished {unpublished}, duplicates skipped {}, took {:.2?}",
        DB::NAME,
        idem::redact_url(&cli.database_url),
        placed.orders.len(),
        yes(paid_once),
        yes(captured_once),
        yes(balances_ok),
        expected_balances.len(),
        relay_stats.published,
        relay_stats.failed,
        payments_stats.duplicates + orders_stats.duplicates,
        started.elapsed(),
    );
    if paid_once && captured_once && balances_ok {
        Ok(())
    } else {
        let not_paid_once: Vec<_> = states
            .iter()
            .filter(|(_, status, paid_count)| status != "paid" || *paid_count != 1)
            .take(10)
            .collect();
        Err(format!(
            "verification failed: {} of {} orders paid; orders not paid exactly once (first 10): \
             {not_paid_once:?}; captures per payment {captures:?}; balances {balances:?} \
             expected {expected_balances:?}; payments consumer {payments_stats:?}; orders \
             consumer {orders_stats:?}; relay {relay_stats:?}",
            paid,
            placed.orders.len()
        )
        .into())
    }
}
