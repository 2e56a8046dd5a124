//! The orders example end to end: order → payment request (outbox) → capture → payment.captured
//! (outbox, same transaction) → order paid, run as separate processes of the example binaries
//! exactly as a user would, on real RabbitMQ and PostgreSQL, while consumers and relays are
//! SIGKILLed and restarted. Every order must end paid exactly once (`paid_count` 1, which the
//! orders consumer increments without any guard of its own) and every payment captured exactly
//! once; the outbox fully published; the queues empty.
//!
//! The kill schedule comes from one seed, printed first: `IDEM_CHAIN_SEED=<n>` replays it (the
//! interleaving with the processes differs, of course). Needs IDEM_TEST_AMQP_URL and
//! IDEM_TEST_DATABASE_URL (scripts/test exports them) and the example binaries, which a plain
//! `cargo test` builds first.
//!
//! Over 400 lines on purpose: one story; the chain, its faults and its checks are read together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fleet::{seed, Fleet, Process, Scratch};
use idem::amqp::lapin::options::QueueDeclareOptions;
use idem::amqp::lapin::types::FieldTable;
use idem::amqp::lapin::Connection;
use idem::RetryPolicy;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use uuid::Uuid;

/// Orders placed, in chunks of [`CHUNK`], one `orders place` process per chunk. `place` writes
/// about 1 500 orders a second and the chain (six debug-build processes on two cores) pays about
/// 250 a second: the chunks build a backlog that keeps every process busy for the kills to land
/// in, rather than a trickle that leaves them idle between orders.
const ORDERS: u64 = 2000;
const CHUNK: u64 = 250;
/// Each consumer holds this many unacknowledged deliveries; a SIGKILL cuts them all short.
const PREFETCH: &str = "20";
/// A SIGKILL every 0.5 to 2 s, while the chain has work: until every order is placed and
/// [`KILLS_UNTIL_PAID`] of them are paid, and every role (orders consumer, payments consumer
/// with its relay, relay) was hit at least once; at most [`KILL_WINDOW_MAX`].
const KILL_INTERVAL_SECS: std::ops::Range<f64> = 0.5..2.0;
const KILLS_UNTIL_PAID: f64 = 0.9;
const KILL_WINDOW_MAX: Duration = Duration::from_secs(35);
/// How long the chain may take to settle after the last kill, and a process to stop on SIGTERM.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
const SIGTERM_DEADLINE: Duration = Duration::from_secs(20);
/// How long the first start of the processes may take (migrations, tables, queues).
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// The payment id the orders example gives an order (`stable_id("orders", "<order>/payment")`).
fn payment_id(order_id: &str) -> String {
    idem::outbox::stable_id("orders", &format!("{order_id}/payment")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_is_paid_once_and_every_payment_captured_once_through_consumer_and_relay_kills()
{
    let seed = seed("IDEM_CHAIN_SEED");
    println!("orders chain seed: {seed} (replay with IDEM_CHAIN_SEED={seed})");
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let run = Run::create(seed).await;
    let connection = common::connection().await;
    let (orders_bin, payments_bin) = (
        common::example_binary("orders"),
        common::example_binary("payments"),
    );

    // Two of each: orders consumers, payments consumers (each with its relay in-process), and
    // stand-alone relays — four relays on one PostgreSQL outbox.
    let mut fleet = Fleet::new(&run.scratch.dir, t0);
    for i in 0..2 {
        let env = run.env();
        fleet.start(
            Process::new("orders consumer", i, &orders_bin)
                .args(&["consume"])
                .env(env.clone()),
        );
        fleet.start(Process::new("payments consumer", i, &payments_bin).env(env.clone()));
        fleet.start(
            Process::new("orders relay", i, &orders_bin)
                .args(&["relay"])
                .env(env),
        );
    }
    let mut problems = Vec::new();
    // Consumers migrate, create their tables and declare their queues; wait until they consume
    // so that placing starts on a running chain.
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        let orders = consumers(&connection, &run.orders_queue).await;
        let payments = consumers(&connection, &run.payments_queue).await;
        if orders == Some(2) && payments == Some(2) {
            break;
        }
        fleet.reap();
        if Instant::now() > deadline {
            let what = format!(
                "the consumers did not start within {STARTUP_DEADLINE:?} (consumers on the orders queue: \
                 {orders:?}, on the payments queue: {payments:?})"
            );
            fail(&fleet, &what);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "t={:.1}s: {} processes running",
        t0.elapsed().as_secs_f64(),
        fleet.len()
    );

    // Chunks of orders, one `place` process each, while the kills go on; the first chunk is
    // placed a second time at the end: the same ids, so nothing new.
    let mut chunks: Vec<(u64, Duration)> = (0..ORDERS / CHUNK)
        .map(|i| {
            (
                i * CHUNK,
                Duration::from_secs_f64(rng.random_range(0.2..1.0)),
            )
        })
        .collect();
    chunks.push((0, Duration::from_millis(200)));
    let placing = tokio::spawn(place_chunks(
        orders_bin.clone(),
        run.env(),
        format!("chain{seed}"),
        chunks,
    ));

    // The kills: a random process every 0.5–2 s, restarted at once, while the chain has work.
    let kills_from = Instant::now();
    loop {
        let pause = Duration::from_secs_f64(rng.random_range(KILL_INTERVAL_SECS));
        let wake = Instant::now() + pause;
        while Instant::now() < wake {
            fleet.reap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let paid = scalar(
            &run.scratch.pool,
            "SELECT COUNT(*) FROM orders WHERE status = 'paid'",
        )
        .await
        .unwrap_or(0);
        let busy = !placing.is_finished() || (paid as f64) < KILLS_UNTIL_PAID * ORDERS as f64;
        if (!busy && fleet.every_role_killed()) || kills_from.elapsed() > KILL_WINDOW_MAX {
            break;
        }
        let running = fleet.running();
        if let Some(&victim) = running.choose(&mut rng) {
            fleet
                .kill_and_restart(victim, &format!("{paid} of {ORDERS} orders paid"))
                .await;
        }
    }
    let placed = match placing.await {
        Ok(Ok(placed)) => placed,
        Ok(Err(e)) => fail(&fleet, &format!("placing the orders failed: {e}")),
        Err(e) => fail(&fleet, &format!("the placing task failed: {e}")),
    };
    // Every chunk new; the repeated first chunk nothing new.
    let (repeat, chunks) = placed.split_last().unwrap();
    let fresh = format!("({CHUNK} new, 0 already placed)");
    if chunks.iter().any(|line| !line.contains(&fresh)) {
        problems.push(format!(
            "`place` did not place every chunk anew: {chunks:?}"
        ));
    }
    if !repeat.contains(&format!("(0 new, {CHUNK} already placed)")) {
        problems.push(format!(
            "placing the first chunk again changed something: {repeat}"
        ));
    }
    fleet.ensure_running();
    println!(
        "t={:.1}s: kills over ({}); waiting for the chain to settle",
        t0.elapsed().as_secs_f64(),
        fleet.kill_counts()
    );

    // Settle: every order paid, the outbox published, the queues drained.
    let settle_from = Instant::now();
    let (settled, last) = loop {
        fleet.reap();
        let paid = scalar(
            &run.scratch.pool,
            "SELECT COUNT(*) FROM orders WHERE status = 'paid'",
        )
        .await;
        let pending = scalar(
            &run.scratch.pool,
            "SELECT COUNT(*) FROM idem_outbox WHERE published_at IS NULL",
        )
        .await;
        let orders_ready = common::queue_depth(&connection, &run.orders_queue).await;
        let payments_ready = common::queue_depth(&connection, &run.payments_queue).await;
        let last = format!(
            "paid {paid:?} of {ORDERS}, outbox unpublished {pending:?}, ready in the orders \
             queue {orders_ready:?}, in the payments queue {payments_ready:?}"
        );
        if paid == Some(ORDERS as i64)
            && pending == Some(0)
            && orders_ready == Some(0)
            && payments_ready == Some(0)
        {
            break (Some(settle_from.elapsed()), last);
        }
        if settle_from.elapsed() > SETTLE_DEADLINE {
            break (None, last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if settled.is_none() {
        problems.push(format!(
            "the chain did not settle within {SETTLE_DEADLINE:?} of the last kill: {last}"
        ));
    }

    // SIGTERM: every process stops by itself and exits 0.
    problems.extend(fleet.terminate(SIGTERM_DEADLINE).await);
    problems.extend(fleet.self_exits().iter().map(|exit| {
        format!("a process exited without being asked to (it must reconnect or wait): {exit}")
    }));

    problems.extend(verify(&run, &connection).await);
    let redelivered = fleet.count_in_logs("redelivered=true");
    let duplicates = fleet.count_in_logs("duplicate: already in the ledger");
    println!(
        "orders chain summary: seed {seed}; {ORDERS} orders in {} `place` runs (+1 repeated); \
         SIGKILLs: {}; {redelivered} deliveries logged as redelivered, {duplicates} duplicates \
         skipped by the ledgers; settled {} after the last kill; elapsed {:.1} s",
        ORDERS / CHUNK,
        fleet.kill_counts(),
        settled.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        t0.elapsed().as_secs_f64()
    );
    if !problems.is_empty() {
        fail(&fleet, &problems.join("\n  "));
    }
    run.clean_up(&connection).await;
}

/// What the database and the broker must show once everything stopped.
async fn verify(run: &Run, connection: &Connection) -> Vec<String> {
    let mut problems = Vec::new();
    let orders: Vec<(String, String, String, i64, i32)> = sqlx::query_as(
        "SELECT order_id, account_id, status, amount_cents, paid_count FROM orders ORDER BY order_id",
    )
    .fetch_all(&run.scratch.pool)
    .await
    .unwrap();
    if orders.len() as u64 != ORDERS {
        problems.push(format!("{} orders, expected {ORDERS}", orders.len()));
    }
    let not_paid_once: Vec<_> = orders
        .iter()
        .filter(|(_, _, status, _, paid_count)| status != "paid" || *paid_count != 1)
        .map(|(id, _, status, _, paid_count)| (id, status, paid_count))
        .collect();
    if !not_paid_once.is_empty() {
        problems.push(format!(
            "orders not paid exactly once: {}",
            examples(&not_paid_once)
        ));
    }

    let captures: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT payment_id, COUNT(*) FROM captures GROUP BY 1")
            .fetch_all(&run.scratch.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: Vec<String> = orders.iter().map(|o| payment_id(&o.0)).collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter(|id| captures.get(*id) != Some(&1))
        .map(|id| (id, captures.get(id).copied().unwrap_or(0)))
        .collect();
    if !wrong.is_empty() || captures.len() != expected.len() {
        problems.push(format!(
            "payments not captured exactly once ({} payment ids captured, {} expected): {}",
            captures.len(),
            expected.len(),
            examples(&wrong)
        ));
    }

    let mut expected_balances: BTreeMap<String, i64> = BTreeMap::new();
    for (_, account, _, amount, _) in &orders {
        *expected_balances.entry(account.clone()).or_default() += amount;
    }
    let balances: BTreeMap<String, i64> =
        sqlx::query_as("SELECT account_id, balance_cents FROM accounts")
            .fetch_all(&run.scratch.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    if balances != expected_balances {
        problems.push(format!(
            "balances {balances:?}, expected {expected_balances:?}"
        ));
    }

    // Deterministic ids: a handler run again after a kill, or an order placed again, writes the
    // same outbox row, never a second one.
    let (rows, unpublished): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM idem_outbox_sent) + (SELECT COUNT(*) FROM idem_outbox),
                (SELECT COUNT(*) FROM idem_outbox)",
    )
    .fetch_one(&run.scratch.pool)
    .await
    .unwrap();
    if rows as u64 != 2 * ORDERS || unpublished != 0 {
        problems.push(format!(
            "idem_outbox holds {rows} rows ({unpublished} unpublished); expected {} requests and \
             captures, all published",
            2 * ORDERS
        ));
    }
    let ledger: BTreeMap<String, i64> =
        sqlx::query_as("SELECT consumer, COUNT(*) FROM idem_ledger GROUP BY 1")
            .fetch_all(&run.scratch.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected_ledger: BTreeMap<String, i64> = [("orders", ORDERS), ("payments", ORDERS)]
        .into_iter()
        .map(|(c, n)| (c.to_owned(), n as i64))
        .collect();
    if ledger != expected_ledger {
        problems.push(format!(
            "ledger rows per consumer {ledger:?}, expected {expected_ledger:?}"
        ));
    }

    // With every process stopped, unacknowledged messages are back to ready: all must be 0.
    for queue in run.queues() {
        match common::queue_depth(connection, &queue).await {
            Some(0) => {}
            Some(n) => problems.push(format!("{n} messages left in {queue}")),
            None => problems.push(format!("queue {queue} is missing")),
        }
    }
    problems
}

/// Runs `orders place` once per chunk (first order number, pause before it); returns each run's
/// output line.
async fn place_chunks(
    binary: PathBuf,
    env: Vec<(String, String)>,
    prefix: String,
    chunks: Vec<(u64, Duration)>,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for (first, pause) in chunks {
        tokio::time::sleep(pause).await;
        let (orders, first) = (CHUNK.to_string(), first.to_string());
        let args = [
            "place", "--orders", &orders, "--prefix", &prefix, "--first", &first,
        ];
        let output = tokio::time::timeout(
            Duration::from_secs(15),
            Command::new(&binary)
                .args(args)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| format!("`orders {}` took over 15 s", args.join(" ")))?
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() {
            return Err(format!(
                "`orders {}` exited with {}: {stdout}\n{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        lines.push(stdout);
    }
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_pays_twenty_orders_exactly_once_on_sqlite_and_prints_its_summary() {
    let connection = common::connection().await;
    let (orders_queue, payments_queue) = (
        common::fresh_queue("demo-orders"),
        common::fresh_queue("demo-payments"),
    );
    let db = std::env::temp_dir().join(format!("idem-orders-demo-{}.db", Uuid::new_v4()));
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(common::example_binary("orders"))
            .args(["demo", "--orders", "20", "--timeout-secs", "60"])
            .env("AMQP_URL", common::amqp_url())
            .env("DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("IDEM_ORDERS_QUEUE", &orders_queue)
            .env("IDEM_PAYMENTS_QUEUE", &payments_queue)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("orders demo did not finish within 90 s")
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "orders demo exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains(
            "20 orders placed, 20 paid, paid_count 1 for all: yes, one capture each: yes, balances: yes"
        ),
        "unexpected summary:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");
    for queue in [&orders_queue, &payments_queue] {
        assert_eq!(common::ready_messages(&connection, queue).await, 0);
        common::delete_queues(&connection, queue, &RetryPolicy::default()).await;
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// What one run owns: a database (the examples create their tables in whatever database they
/// are given), a directory for the processes' logs, and two queues named by the run's tag.
struct Run {
    scratch: Scratch,
    orders_queue: String,
    payments_queue: String,
}

impl Run {
    async fn create(seed: u64) -> Self {
        let scratch =
            Scratch::create(&format!("orders_chain_{seed}"), &format!("chain-{seed}")).await;
        Self {
            orders_queue: format!("{}-orders", scratch.tag),
            payments_queue: format!("{}-payments", scratch.tag),
            scratch,
        }
    }

    /// The environment of every process: both examples read their own names from it.
    fn env(&self) -> Vec<(String, String)> {
        self.scratch.env(&[
            ("IDEM_QUEUE", &self.payments_queue),
            ("IDEM_PAYMENTS_QUEUE", &self.payments_queue),
            ("IDEM_ORDERS_QUEUE", &self.orders_queue),
            ("IDEM_PREFETCH", PREFETCH),
        ])
    }

    /// Both queues with their dead-letter and delay queues.
    fn queues(&self) -> Vec<String> {
        let mut queues = Vec::new();
        for queue in [&self.orders_queue, &self.payments_queue] {
            queues.push(queue.clone());
            queues.push(idem::amqp::dead_letter_queue(queue));
            for tier in RetryPolicy::default().tiers() {
                queues.push(idem::amqp::retry_queue(queue, tier));
            }
        }
        queues
    }

    async fn clean_up(self, connection: &Connection) {
        for queue in [&self.orders_queue, &self.payments_queue] {
            common::delete_queues(connection, queue, &RetryPolicy::default()).await;
        }
        self.scratch.remove().await;
    }
}

/// A single number from the database; `None` while a table is not there yet.
async fn scalar(pool: &PgPool, sql: &'static str) -> Option<i64> {
    sqlx::query_scalar(sql).fetch_one(pool).await.ok()
}

/// Consumers subscribed to `queue`; `None` while it does not exist.
async fn consumers(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    // A failed passive declare closes the channel itself.
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()?;
    let _ = channel.close(200, "counted".into()).await;
    Some(declared.consumer_count())
}

/// Up to ten items and how many there were.
fn examples<T: std::fmt::Debug>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(10).map(|i| format!("{i:?}")).collect();
    format!("{} in all, e.g. {}", items.len(), shown.join(", "))
}

/// Fails the test with `what`, the log paths and the last lines of every log.
fn fail(fleet: &Fleet, what: &str) -> ! {
    let mut report = format!("orders chain failed:\n  {what}\nprocess logs:\n");
    for log in fleet.logs() {
        let _ = writeln!(report, "  {}", log.display());
    }
    report.push_str(&fleet.tails(15));
    panic!("{report}");
}
