//! Fault injection: effectively-once under fire.
//!
//! An external producer sends thousands of payments — with byte-identical duplicates back to
//! back, late, and at the same moment from a second connection — and every class of bad
//! message, to several processes of the payments example. Meanwhile the suite SIGKILLs consumers
//! at random moments and restarts them, closes every broker connection, restarts RabbitMQ once
//! and PostgreSQL once. Afterwards the database must show every unique valid payment applied
//! exactly once (capture rows and balances), the DLQ every bad message with its reason, and the
//! main and retry queues nothing.
//!
//! With `IDEM_TEST_GROUP_COMMIT=<n>` the consumers commit in groups of up to n messages (the
//! second pass of `scripts/test` runs it so), and the second consumer takes each group in one
//! call (a batch handler, `IDEM_BATCH_HANDLER`) beside the others' per-message handlers:
//! SIGKILLs then land in the middle of groups and of batches, and the same checks hold.
//!
//! With `IDEM_FAULT_CLUSTER=1` (scripts/test's cluster pass) the same story runs on a 3-node
//! RabbitMQ cluster with quorum queues (`IDEM_QUEUE_TYPE=quorum`): each consumer and producer
//! prefers its own node and lists the others (`AMQP_URL`, comma-separated); instead of the
//! broker faults, the node hosting the queue's leader is SIGKILLed under load (the pause until
//! captures resume is measured), restarted later, and then every node is restarted in turn (a
//! rolling restart). The consumers' SIGKILLs go on throughout, and the same checks hold.
//!
//! Every random choice comes from one seed, printed first: `IDEM_FAULT_SEED=<n>` replays the
//! same workload and fault schedule (the interleaving with the processes differs, of course).
//! It needs what `scripts/test` exports — IDEM_TEST_AMQP_URL, IDEM_TEST_DATABASE_URL,
//! IDEM_RABBITMQCTL, IDEM_PGCTL — and skips, saying so, without them. It restarts the servers it
//! is given, so it runs alone in its own test binary.
//!
//! Over 400 lines on purpose: one story; the workload, the fault schedule and the final checks are
//! read together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fault;

use common::fleet::{seed, Fleet, Process, Scratch};
use fault::levers::{Cluster, Levers, Probe};
use fault::publisher::{Publisher, PublisherStats};
use fault::workload::{Bad, Msg, Sizes, Workload};
use lapin::options::QueueDeleteOptions;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Consumer processes of the payments example.
const CONSUMERS: usize = 3;
/// While there is a backlog each consumer holds this many unacknowledged deliveries, and a
/// SIGKILL cuts all of them short. Small, so that the backlog stays in the queue, spread over
/// the consumers, rather than in one consumer's buffer.
const PREFETCH: &str = "20";
/// Three debug-build consumers capture about 1 000 payments a second on this 2-core machine:
/// 20 000 keep them busy for about 20 s besides the outages, long enough for every fault to
/// land amid traffic (3 000 would be gone in 4 s).
const SIZES: Sizes = Sizes {
    payments: 20_000,
    accounts: 20,
    back_to_back: 0.10,
    concurrent: 0.05,
    late: 300,
    conflicts: 10,
};
/// The main publisher sends batches of `BATCH` while fewer than `BACKLOG` messages are ready,
/// so that every consumer always holds a full prefetch: each SIGKILL, connection close and
/// restart cuts `PREFETCH` deliveries short per consumer. Publishing then lasts as long as the
/// consumers take, and the server faults are planned along its progress.
const BATCH: usize = 50;
const BACKLOG: u32 = 300;
/// SIGKILLs come every 1 to 4 s while the producers publish.
const KILL_INTERVAL_SECS: std::ops::Range<f64> = 1.0..4.0;
/// A server fault waits until the last consumer (re)started this long ago: a consumer in the
/// middle of its start treats an unreachable server as a configuration error, by design.
const STARTUP_GRACE: Duration = Duration::from_secs(2);
/// Bounds: how long the producers may take, how long the system may take to settle after the
/// last fault, how long a consumer may take to stop on SIGTERM.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(90);
const SETTLE_DEADLINE: Duration = Duration::from_secs(120);
const SIGTERM_DEADLINE: Duration = Duration::from_secs(30);
/// Cluster: after the leader's node is SIGKILLed, no consumer is for this long, so that the
/// redeliveries logged meanwhile are the node loss's.
const NODE_LOSS_QUIET: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payment_is_applied_exactly_once_through_kills_disconnects_and_server_restarts() {
    let levers = match Levers::from_env() {
        Ok(levers) => levers,
        Err(missing) => {
            eprintln!(
                "skipping the fault-injection suite: {missing} not set (scripts/test starts \
                 RabbitMQ and PostgreSQL and exports them)"
            );
            return;
        }
    };
    let cluster = Cluster::from_env().map(Arc::new);
    let levers = match &cluster {
        Some(cluster) => levers.on(cluster),
        None => levers,
    };
    let seed = seed("IDEM_FAULT_SEED");
    println!("fault-injection seed: {seed} (replay with IDEM_FAULT_SEED={seed})");
    if let Some(cluster) = &cluster {
        println!(
            "on a RabbitMQ cluster of {} nodes, quorum queues",
            cluster.nodes.len()
        );
    }
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let workload = Arc::new(Workload::generate(&mut rng, SIZES));
    let run = Run::create(seed, cluster).await;
    let mut fleet = Fleet::new(&run.scratch.dir, t0);
    let payments = common::example_binary("payments");
    for i in 0..CONSUMERS {
        fleet.start(Process::new("consumer", i, &payments).env(run.consumer_env(i)));
    }
    let mut story = Story {
        fleet,
        probe: Probe::new(&run.url(0)),
        problems: Vec::new(),
        run,
        levers,
        seed,
        t0,
    };

    // The consumers migrate the database, declare their queues and subscribe; only then does
    // the producer start, so nothing it sends can land before the queue exists.
    if let Err(e) = story.subscribed(Duration::from_secs(60)).await {
        story.fail(&format!("the consumers did not start: {e}"));
    }
    let publishers = Publishers::start(&story.run, &workload);
    let faults = story
        .inject_faults(&mut rng, &publishers, workload.stream.len())
        .await;
    let sent = publishers.finish(&mut story.problems).await;
    story.fleet.ensure_running();
    let settled = story.settle(&workload, sent.conflicts).await;
    let dead_letters = story.verify(&workload, sent.conflicts).await;
    // Every consumer must be back on the broker by itself, none left running but disconnected.
    if let Err(e) = story.subscribed(Duration::from_secs(30)).await {
        story.problems.push(format!(
            "a consumer did not reconnect after the faults: {e}"
        ));
    }
    let stop_problems = story.fleet.terminate(SIGTERM_DEADLINE).await;
    story.problems.extend(stop_problems);
    for exit in story.fleet.self_exits() {
        story.problems.push(format!(
            "a consumer exited without being asked to (it must reconnect or wait): {exit}"
        ));
    }

    let duplicates = workload.back_to_back + workload.concurrent.len() + workload.late.len();
    if let Some(cluster) = &story.run.cluster {
        println!(
            "cluster: leader node {} SIGKILLed, 50 more captures {:.1} s later, {} deliveries \
             logged redelivered in the {NODE_LOSS_QUIET:?} after it; restarted in {:.1} s; \
             rolling restart of {} nodes in {:.1} s",
            faults.leader_killed.as_deref().unwrap_or("(none)"),
            faults.node_loss_pause.as_secs_f64(),
            faults.node_loss_redeliveries,
            faults.node_restart.as_secs_f64(),
            cluster.nodes.len(),
            faults.rolling_restart.as_secs_f64(),
        );
    }
    println!(
        "fault-injection summary: seed {seed}; {} publishes ({} unique payments, \
         {duplicates} duplicates [{} back to back, {} concurrent, {} late], {} bad [{} key \
         conflicts], {} re-published after broker errors, {} publisher reconnects); faults: {} \
         SIGKILLs, {} connection closes, broker restart (down {:.1} s), PostgreSQL restart (down \
         {:.1} s), {} unrequested consumer exits; {} deliveries logged as redelivered; {} dead \
         letters ({} extra copies); settled {:.1} s after the last fault; elapsed {:.1} s",
        sent.stats.published,
        workload.payments.len(),
        workload.back_to_back,
        workload.concurrent.len(),
        workload.late.len(),
        workload.bad.len() + sent.conflicts,
        sent.conflicts,
        sent.stats.republished,
        sent.stats.reconnects,
        story.fleet.kills(),
        faults.connection_closes,
        faults.broker_down.as_secs_f64(),
        faults.postgres_down.as_secs_f64(),
        story.fleet.self_exits().len(),
        story.fleet.count_in_logs("redelivered=true"),
        dead_letters.total,
        dead_letters.extra_copies,
        settled.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
    );
    story.finish().await;
}

/// What one run owns: a database of its own (the example creates `accounts` and `captures` in
/// whatever database it is given), a directory for the consumers' logs, and a queue of its own,
/// named by the run's tag.
struct Run {
    scratch: Scratch,
    queue: String,
    /// The cluster pass's cluster; `None`: the single test broker.
    cluster: Option<Arc<Cluster>>,
}

impl Run {
    async fn create(seed: u64, cluster: Option<Arc<Cluster>>) -> Self {
        let name = if cluster.is_some() {
            "cluster"
        } else {
            "fault"
        };
        let scratch = Scratch::create(&format!("{name}_{seed}"), &format!("{name}-{seed}")).await;
        Self {
            queue: scratch.tag.clone(),
            scratch,
            cluster,
        }
    }

    /// The broker URL of the `i`th process of a role: on a cluster, every node's, starting
    /// with one of its own.
    fn url(&self, i: usize) -> String {
        match &self.cluster {
            Some(cluster) => cluster.urls_from(i),
            None => common::amqp_url(),
        }
    }

    /// With `IDEM_TEST_GROUP_COMMIT=<n>` (scripts/test's second pass) the consumers commit in
    /// groups of up to n (`IDEM_GROUP_COMMIT`), and consumer 1 with a batch handler
    /// (`IDEM_BATCH_HANDLER`): the kills then land mid-group and mid-batch.
    fn consumer_env(&self, consumer: usize) -> Vec<(String, String)> {
        let group = std::env::var("IDEM_TEST_GROUP_COMMIT").unwrap_or_else(|_| "0".into());
        let grouped = group.parse::<usize>().is_ok_and(|n| n > 1);
        let batch = if grouped && consumer == 1 {
            "on"
        } else {
            "off"
        };
        let url = self.url(consumer);
        let queue_type = if self.cluster.is_some() {
            "quorum"
        } else {
            "classic"
        };
        self.scratch.env(&[
            ("IDEM_QUEUE", &self.queue),
            ("IDEM_PREFETCH", PREFETCH),
            ("IDEM_GROUP_COMMIT", &group),
            ("IDEM_BATCH_HANDLER", batch),
            // After the scratch's own AMQP_URL: the later one counts.
            ("AMQP_URL", &url),
            ("IDEM_QUEUE_TYPE", queue_type),
        ])
    }
}

/// Captures so far (0 while the table or the database is away).
async fn captures(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM captures")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// How many of `payment_ids` have a capture; `None` while the table or the database is away.
async fn applied(pool: &PgPool, payment_ids: &[String]) -> Option<usize> {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(DISTINCT payment_id) FROM captures WHERE payment_id = ANY($1)",
    )
    .bind(payment_ids)
    .fetch_one(pool)
    .await
    .ok()
    .map(|n| n as usize)
}

/// The three producers: the main stream, the second connection that sends copies at the same
/// moment as the originals, and the late one that sends copies and key conflicts of payments
/// already applied.
struct Publishers {
    /// How far the main stream got (messages handed to the broker, or about to be).
    progress: watch::Receiver<usize>,
    main: JoinHandle<PublisherStats>,
    concurrent: JoinHandle<PublisherStats>,
    late: JoinHandle<Result<PublisherStats, (PublisherStats, String)>>,
}

/// What the producers got confirmed.
struct Sent {
    stats: PublisherStats,
    /// Key conflicts published (all of them, unless the late phase gave up).
    conflicts: usize,
}

impl Publishers {
    fn start(run: &Run, workload: &Arc<Workload>) -> Self {
        let (progress, reached) = watch::channel(0);
        Self {
            progress: reached.clone(),
            main: tokio::spawn(publish_stream(
                Publisher::new(&run.url(0), &run.queue, "fault-publisher-main"),
                Probe::new(&run.url(0)),
                Arc::clone(workload),
                progress,
            )),
            concurrent: tokio::spawn(publish_concurrently(
                Publisher::new(&run.url(1), &run.queue, "fault-publisher-second"),
                Arc::clone(workload),
                reached,
            )),
            late: tokio::spawn(publish_late(
                Publisher::new(&run.url(2), &run.queue, "fault-publisher-late"),
                Arc::clone(workload),
                run.scratch.pool.clone(),
            )),
        }
    }

    fn done(&self) -> bool {
        self.main.is_finished() && self.concurrent.is_finished() && self.late.is_finished()
    }

    async fn finish(self, problems: &mut Vec<String>) -> Sent {
        let mut stats = Vec::new();
        for (name, handle) in [("main", self.main), ("second", self.concurrent)] {
            match finished(handle).await {
                Ok(s) => stats.push(s),
                Err(e) => problems.push(format!("the {name} publisher failed: {e}")),
            }
        }
        let mut conflicts = 0;
        match finished(self.late).await {
            Ok(Ok(s)) => {
                stats.push(s);
                conflicts = SIZES.conflicts;
            }
            Ok(Err((s, e))) => {
                stats.push(s);
                problems.push(e);
            }
            Err(e) => problems.push(format!("the late publisher failed: {e}")),
        }
        let stats = stats
            .iter()
            .fold(PublisherStats::default(), |a, s| PublisherStats {
                published: a.published + s.published,
                republished: a.republished + s.republished,
                reconnects: a.reconnects + s.reconnects,
            });
        Sent { stats, conflicts }
    }
}

/// Awaits a publisher task — done by now, unless it was still at work [`PUBLISH_DEADLINE`]
/// after the first publish, when the faults stopped: then it is aborted.
async fn finished<T>(handle: JoinHandle<T>) -> Result<T, String> {
    let abort = handle.abort_handle();
    match tokio::time::timeout(Duration::from_secs(10), handle).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(panic_text(e)),
        Err(_) => {
            abort.abort();
            Err(format!(
                "still publishing {PUBLISH_DEADLINE:?} after the first publish"
            ))
        }
    }
}

fn panic_text(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

/// The main stream — payments, back-to-back copies, bad messages — kept just ahead of the
/// consumers ([`BACKLOG`]). Before each batch it tells the second connection and the fault
/// injector how far it got.
async fn publish_stream(
    mut publisher: Publisher,
    mut probe: Probe,
    workload: Arc<Workload>,
    progress: watch::Sender<usize>,
) -> PublisherStats {
    for (n, batch) in workload.stream.chunks(BATCH).enumerate() {
        // Bounded: consumers that stopped consuming are the verdict's business, not ours.
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until
            && probe
                .counts(publisher.queue())
                .await
                .is_ok_and(|(ready, _)| ready >= BACKLOG)
        {
            tokio::time::sleep(Duration::from_millis(20)).await; // poll
        }
        progress.send_replace(n * BATCH + batch.len());
        publisher.send(batch).await;
    }
    progress.send_replace(usize::MAX);
    probe.close().await;
    publisher.close().await
}

/// Copies from a second connection, each sent as soon as the main stream reaches its original:
/// two copies of one payment in flight at once, likely at two consumers.
async fn publish_concurrently(
    mut publisher: Publisher,
    workload: Arc<Workload>,
    mut reached: watch::Receiver<usize>,
) -> PublisherStats {
    let mut copies = &workload.concurrent[..];
    while let Some(&(next, _)) = copies.first() {
        let Ok(progress) = reached.wait_for(|&p| p > next).await.map(|p| *p) else {
            break; // the main publisher is gone; it reports why
        };
        let n = copies.iter().take_while(|(at, _)| *at < progress).count();
        let batch: Vec<Arc<Msg>> = copies[..n].iter().map(|(_, m)| Arc::clone(m)).collect();
        publisher.send(&batch).await;
        copies = &copies[n..];
    }
    publisher.close().await
}

/// Late copies and key conflicts, sent only once their originals are applied (so that a key
/// conflict finds the first payload in the ledger, and the first effect must stand).
async fn publish_late(
    mut publisher: Publisher,
    workload: Arc<Workload>,
    pool: PgPool,
) -> Result<PublisherStats, (PublisherStats, String)> {
    let originals: Vec<String> = workload
        .late
        .iter()
        .chain(workload.conflicts.iter().map(|(i, _)| i))
        .map(|&i| workload.payments[i].id.clone())
        .collect();
    let deadline = Instant::now() + PUBLISH_DEADLINE;
    loop {
        let applied = applied(&pool, &originals).await;
        if applied == Some(originals.len()) {
            break;
        }
        if Instant::now() > deadline {
            let stats = publisher.close().await;
            return Err((
                stats,
                format!(
                    "late phase: only {applied:?} of the {} early payments it waits for were applied; \
                     no late copies or key conflicts were sent",
                    originals.len()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await; // poll
    }
    for batch in workload.late_stream.chunks(20) {
        publisher.send(batch).await;
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing
    }
    Ok(publisher.close().await)
}

/// A fault the suite injects at a planned moment.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `rabbitmqctl close_all_connections`: every client connection is closed by the broker.
    CloseConnections,
    /// `rabbitmqctl stop_app`, `down`, `start_app`: the broker goes away and comes back with its
    /// durable queues and persistent messages.
    RestartBroker { down: Duration },
    /// `pg_ctl stop -m fast` (open transactions are cut), `down`, `pg_ctl start`.
    RestartPostgres { down: Duration },
    /// Cluster: SIGKILL of the node hosting the queue's leader (a new leader is elected; the
    /// processes connected to it fail over to the other nodes).
    KillLeader,
    /// Cluster: the killed node booted again; it rejoins and its replica catches up.
    RestartKilled,
    /// Cluster: every node stopped and started again, one at a time.
    RollingRestart,
}

/// When each server fault happens — at a share of the main stream, so that it lands amid the
/// traffic however fast this machine is — and how long each outage lasts, drawn from the seed.
fn plan(rng: &mut StdRng, cluster: bool) -> Vec<(f64, Fault)> {
    if cluster {
        let mut share = |range: std::ops::Range<f64>| rng.random_range(range);
        return vec![
            (share(0.20..0.30), Fault::KillLeader),
            (share(0.45..0.55), Fault::RestartKilled),
            (share(0.65..0.75), Fault::RollingRestart),
        ];
    }
    let mut secs = |range: std::ops::Range<f64>| Duration::from_secs_f64(rng.random_range(range));
    let down = [secs(1.0..3.0), secs(1.0..3.0)];
    let mut share = |range: std::ops::Range<f64>| rng.random_range(range);
    vec![
        (share(0.05..0.15), Fault::CloseConnections),
        (share(0.25..0.35), Fault::RestartBroker { down: down[0] }),
        (share(0.50..0.60), Fault::RestartPostgres { down: down[1] }),
        (share(0.75..0.85), Fault::CloseConnections),
    ]
}

#[derive(Debug, Default)]
struct FaultsDone {
    connection_closes: usize,
    broker_down: Duration,
    postgres_down: Duration,
    /// Cluster: the node SIGKILLed (its index and name).
    killed: Option<usize>,
    leader_killed: Option<String>,
    /// From the SIGKILL until 50 more payments were captured.
    node_loss_pause: Duration,
    /// Deliveries the consumers logged as redelivered in the 10 s after the SIGKILL, when no
    /// consumer is SIGKILLed: what the node loss handed out again.
    node_loss_redeliveries: usize,
    node_restart: Duration,
    rolling_restart: Duration,
}

struct Story {
    run: Run,
    fleet: Fleet,
    probe: Probe,
    levers: Levers,
    problems: Vec<String>,
    seed: u64,
    t0: Instant,
}

/// What the DLQ held.
struct DeadLetters {
    total: usize,
    /// Copies beyond the first of one message: a dead letter is published (confirmed) before
    /// the original is acked, so a crash or a lost ack in between dead-letters it again; the
    /// producer's re-publishes of an unconfirmed bad message do the same.
    extra_copies: usize,
}

impl Story {
    /// Waits (bounded) until all consumers are subscribed to the queue.
    async fn subscribed(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            self.fleet.reap();
            let counts = self.probe.counts(&self.run.queue).await;
            if matches!(counts, Ok((_, consumers)) if consumers as usize == CONSUMERS) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{counts:?} (ready, consumers) on {} after {within:?}, expected {CONSUMERS} consumers",
                    self.run.queue
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // poll
        }
    }

    /// The faults, while the producers publish: a SIGKILL of a random consumer every 1–4 s
    /// (restarted at once), and along the main stream two closes of every broker connection,
    /// one broker restart and one PostgreSQL restart. A consumer that exits by itself is noted
    /// and restarted. Goes on until the producers are done and every planned fault happened.
    async fn inject_faults(
        &mut self,
        rng: &mut StdRng,
        publishers: &Publishers,
        stream_len: usize,
    ) -> FaultsDone {
        let start = Instant::now();
        let mut planned = plan(rng, self.run.cluster.is_some()).into_iter().peekable();
        let mut next_kill = Duration::from_secs_f64(rng.random_range(KILL_INTERVAL_SECS));
        let mut done = FaultsDone::default();
        loop {
            self.fleet.reap();
            let now = start.elapsed();
            if planned.peek().is_none() && publishers.done() {
                return done;
            }
            if now >= PUBLISH_DEADLINE {
                // The producers report what held them up.
                self.problems.push(format!(
                    "faults still pending {PUBLISH_DEADLINE:?} after the first publish: {:?}",
                    planned.collect::<Vec<_>>()
                ));
                return done;
            }
            let progress = *publishers.progress.borrow();
            if let Some(&(share, fault)) = planned.peek() {
                if progress as f64 >= share * stream_len as f64
                    && self.fleet.last_start().elapsed() >= STARTUP_GRACE
                {
                    planned.next();
                    self.inject(fault, &mut done).await;
                    continue;
                }
            }
            if now >= next_kill && !publishers.done() {
                if let Some(&victim) = self.fleet.running().choose(rng) {
                    self.fleet.kill_and_restart(victim, "").await;
                }
                next_kill = now + Duration::from_secs_f64(rng.random_range(KILL_INTERVAL_SECS));
                continue;
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // tick: exits, next fault
        }
    }

    async fn inject(&mut self, fault: Fault, done: &mut FaultsDone) {
        let at = self.t0.elapsed().as_secs_f64();
        println!("t={at:.1}s: {fault:?}");
        let result = match fault {
            Fault::CloseConnections => {
                done.connection_closes += 1;
                self.levers
                    .rabbitmqctl(&["close_all_connections", "fault injection"])
                    .await
            }
            Fault::RestartBroker { down } => {
                let stopped = Instant::now();
                let result = self.levers.rabbitmqctl(&["stop_app"]).await;
                tokio::time::sleep(down).await; // the outage
                let started = self.levers.rabbitmqctl(&["start_app"]).await;
                done.broker_down = stopped.elapsed();
                result.and(started)
            }
            Fault::RestartPostgres { down } => {
                let stopped = Instant::now();
                let result = self.levers.pgctl(&["stop"]).await;
                tokio::time::sleep(down).await; // the outage
                let started = self.levers.pgctl(&["start"]).await;
                done.postgres_down = stopped.elapsed();
                result.and(started)
            }
            Fault::KillLeader | Fault::RestartKilled | Fault::RollingRestart => {
                self.inject_on_cluster(fault, done).await
            }
        };
        if let Err(e) = result {
            self.fail(&format!("injecting {fault:?} failed: {e}"));
        }
    }

    /// The cluster's faults; see [`Fault`].
    async fn inject_on_cluster(
        &mut self,
        fault: Fault,
        done: &mut FaultsDone,
    ) -> Result<String, String> {
        let cluster = Arc::clone(self.run.cluster.as_ref().ok_or("not on a cluster")?);
        match fault {
            Fault::KillLeader => {
                let leader = cluster.leader(&self.levers, &self.run.queue).await?;
                let before = captures(&self.run.scratch.pool).await;
                let redelivered_before = self.fleet.count_in_logs("redelivered=true");
                let killed_at = Instant::now();
                let out = cluster.kill(leader).await?;
                println!(
                    "  killed {} (the leader of {})",
                    cluster.nodes[leader], self.run.queue
                );
                done.killed = Some(leader);
                done.leader_killed = Some(cluster.nodes[leader].clone());
                // The cost of a node loss: until captures flow again (50 more than at the kill).
                while killed_at.elapsed() < Duration::from_secs(60) {
                    self.fleet.reap();
                    if captures(&self.run.scratch.pool).await >= before + 50 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await; // poll
                }
                done.node_loss_pause = killed_at.elapsed();
                let quiet = NODE_LOSS_QUIET.saturating_sub(killed_at.elapsed());
                tokio::time::sleep(quiet).await; // the consumers' SIGKILLs wait meanwhile
                done.node_loss_redeliveries = self
                    .fleet
                    .count_in_logs("redelivered=true")
                    .saturating_sub(redelivered_before);
                Ok(out)
            }
            Fault::RestartKilled => {
                let node = done.killed.ok_or("no node was killed")?;
                let started = Instant::now();
                let out = cluster.start(node).await;
                done.node_restart = started.elapsed();
                out
            }
            _ => {
                let started = Instant::now();
                for node in 0..cluster.nodes.len() {
                    println!("  restarting {}", cluster.nodes[node]);
                    cluster.stop(node).await?;
                    cluster.start(node).await?;
                }
                done.rolling_restart = started.elapsed();
                Ok(String::new())
            }
        }
    }

    /// After the last fault, bounded: wait until every unique payment is captured, the main
    /// queue and every retry queue hold nothing (ready or unacknowledged), and the DLQ holds at
    /// least one copy of every bad message. Queues that stay empty while the counts fall short
    /// mean nothing more will happen: then the verdict says what is missing. Returns how long
    /// that took.
    async fn settle(&mut self, workload: &Workload, conflicts: usize) -> Duration {
        let start = Instant::now();
        let ids: Vec<String> = workload.payments.iter().map(|p| p.id.clone()).collect();
        let bad = (workload.bad.len() + conflicts) as u32;
        let dlq = idem::amqp::dead_letter_queue(&self.run.queue);
        let mut state = String::new();
        let mut last_listed: Option<Instant> = None;
        let mut empty_listings = 0;
        while start.elapsed() < SETTLE_DEADLINE {
            self.fleet.reap();
            let captured = applied(&self.run.scratch.pool, &ids).await;
            let main = self.probe.counts(&self.run.queue).await;
            let dead = self.probe.counts(&dlq).await;
            state = format!(
                "captured {captured:?} of {}; main queue (ready, consumers) {main:?}; DLQ {dead:?} of {bad}",
                ids.len()
            );
            let counted = captured == Some(ids.len()) && matches!(dead, Ok((n, _)) if n >= bad);
            // rabbitmqctl costs a second of CPU: ask it only when the main queue looks empty.
            let every = Duration::from_secs(if counted { 1 } else { 3 });
            if matches!(main, Ok((0, _))) && last_listed.is_none_or(|at| at.elapsed() > every) {
                last_listed = Some(Instant::now());
                match self.levers.queue_depths(&self.run.queue).await {
                    Ok(depths) => {
                        let busy: Vec<_> = depths
                            .iter()
                            .filter(|(name, ready, unacked)| {
                                *name != dlq && (*ready > 0 || *unacked > 0)
                            })
                            .collect();
                        if busy.is_empty() {
                            empty_listings += 1;
                            if counted || empty_listings >= 3 {
                                return start.elapsed();
                            }
                        } else {
                            empty_listings = 0;
                            state.push_str(&format!("; not empty (ready, unacked): {busy:?}"));
                        }
                    }
                    Err(e) => state.push_str(&format!("; list_queues: {e}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await; // poll
        }
        self.problems.push(format!(
            "not settled {SETTLE_DEADLINE:?} after the last fault: {state}"
        ));
        start.elapsed()
    }

    /// The verdict, from the database and the DLQ: every unique valid payment captured exactly
    /// once with the amount first sent, every balance the sum of its unique payments, every bad
    /// message dead-lettered with its reason — none missing, none unexpected.
    async fn verify(&mut self, workload: &Workload, conflicts: usize) -> DeadLetters {
        let pool = &self.run.scratch.pool;
        let twice: Vec<(String, i64)> = sqlx::query_as(
            "SELECT payment_id, count(*) FROM captures GROUP BY payment_id HAVING count(*) <> 1",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        if !twice.is_empty() {
            self.problems.push(format!(
                "{} payments captured more than once (payment_id, captures): {}",
                twice.len(),
                examples(&twice)
            ));
        }

        let rows: Vec<(String, String, i64, String)> =
            sqlx::query_as("SELECT payment_id, account_id, amount_cents, currency FROM captures")
                .fetch_all(pool)
                .await
                .unwrap();
        let expected: HashMap<&str, _> = workload
            .payments
            .iter()
            .map(|p| (p.id.as_str(), p))
            .collect();
        let captured: HashMap<&str, _> = rows.iter().map(|r| (r.0.as_str(), r)).collect();
        let missing: Vec<&str> = workload
            .payments
            .iter()
            .map(|p| p.id.as_str())
            .filter(|id| !captured.contains_key(id))
            .collect();
        let unexpected: Vec<_> = rows
            .iter()
            .filter(|r| !expected.contains_key(r.0.as_str()))
            .collect();
        let altered: Vec<_> = rows
            .iter()
            .filter(|r| {
                expected.get(r.0.as_str()).is_some_and(|p| {
                    (r.1.as_str(), r.2, r.3.as_str()) != (p.account.as_str(), p.cents, "EUR")
                })
            })
            .collect();
        for (what, list) in [
            ("unique valid payments never captured", examples(&missing)),
            (
                "captures of payments never sent as valid",
                examples(&unexpected),
            ),
            (
                "captures whose account, amount or currency is not the first one sent",
                examples(&altered),
            ),
        ] {
            if !list.is_empty() {
                self.problems.push(format!("{what}: {list}"));
            }
        }

        let mut owed: BTreeMap<String, i64> = BTreeMap::new();
        for p in &workload.payments {
            *owed.entry(p.account.clone()).or_default() += p.cents;
        }
        let balances: BTreeMap<String, i64> =
            sqlx::query_as("SELECT account_id, balance_cents FROM accounts")
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        if balances != owed {
            let wrong: Vec<_> = owed
                .iter()
                .filter(|(a, cents)| balances.get(*a) != Some(cents))
                .map(|(a, cents)| (a, cents, balances.get(a)))
                .collect();
            self.problems.push(format!(
                "balances differ from the sums of the unique payments (account, expected, actual): {} (and {} accounts never sent)",
                examples(&wrong),
                balances.keys().filter(|a| !owed.contains_key(*a)).count()
            ));
        }

        self.check_dead_letters(workload, conflicts).await
    }

    async fn check_dead_letters(&mut self, workload: &Workload, conflicts: usize) -> DeadLetters {
        let sent_bad: Vec<&Bad> = workload
            .bad
            .iter()
            .chain(workload.conflicts.iter().take(conflicts).map(|(_, b)| b))
            .collect();
        let expected: HashMap<&str, &Bad> = sent_bad
            .iter()
            .map(|b| (b.message.message_id.as_str(), *b))
            .collect();
        // Make sure the probe's connection is open, then read the DLQ empty through it.
        let _ = self.probe.counts(&self.run.queue).await;
        let Some(connection) = self.probe.connection() else {
            self.fail("no broker connection to read the DLQ with");
        };
        let letters = common::drain_dead_letters(connection, &self.run.queue).await;
        let mut copies: HashMap<&str, usize> = HashMap::new();
        for letter in &letters {
            let id = letter.message_id.as_deref().unwrap_or("(no message_id)");
            let error = letter
                .headers
                .get("x-idem-error")
                .map_or("", String::as_str);
            match expected.get(id) {
                Some(bad) if letter.reason() == bad.reason => {
                    *copies.entry(bad.message.message_id.as_str()).or_default() += 1;
                }
                Some(bad) => self.problems.push(format!(
                    "{} (message_id {id}) was dead-lettered as {:?}, expected {:?}; error: {error}",
                    bad.what,
                    letter.reason(),
                    bad.reason
                )),
                None => self.problems.push(format!(
                    "unexpected dead letter: message_id {id}, reason {:?}, error: {error}; body: {}",
                    letter.reason(),
                    String::from_utf8_lossy(&letter.body[..letter.body.len().min(200)])
                )),
            }
        }
        for bad in &sent_bad {
            if !copies.contains_key(bad.message.message_id.as_str()) {
                self.problems.push(format!(
                    "never dead-lettered as {:?}: {} (message_id {})",
                    bad.reason, bad.what, bad.message.message_id
                ));
            }
        }
        DeadLetters {
            total: letters.len(),
            extra_copies: copies.values().map(|n| n - 1).sum(),
        }
    }

    /// Fails now, with everything needed to understand and replay the failure.
    fn fail(&self, what: &str) -> ! {
        let mut problems = self.problems.clone();
        problems.push(what.to_owned());
        panic!("{}", self.failure_report(&problems));
    }

    fn failure_report(&self, problems: &[String]) -> String {
        format!(
            "fault injection failed (seed {seed}; replay with IDEM_FAULT_SEED={seed}):\n- {}\n\n\
             Left for inspection: database {} ({}), queue {} and its DLQ, consumer logs:\n  {}\n\n{}",
            problems.join("\n- "),
            self.run.scratch.database,
            self.run.scratch.url,
            self.run.queue,
            self.fleet
                .logs()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
            self.fleet.tails(25),
            seed = self.seed,
        )
    }

    /// Passes and cleans up, or fails with every problem at once.
    async fn finish(mut self) {
        if !self.problems.is_empty() {
            let problems = std::mem::take(&mut self.problems);
            panic!("{}", self.failure_report(&problems));
        }
        let mut queues = vec![
            self.run.queue.clone(),
            idem::amqp::dead_letter_queue(&self.run.queue),
        ];
        if let Ok(depths) = self.levers.queue_depths(&self.run.queue).await {
            queues.extend(depths.into_iter().map(|(name, _, _)| name));
        }
        queues.sort();
        queues.dedup();
        let _ = self.probe.counts(&self.run.queue).await;
        if let Some(connection) = self.probe.connection() {
            let channel = connection.create_channel().await.unwrap();
            for queue in &queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        self.run.scratch.remove().await;
    }
}

/// Up to ten items and how many there were.
fn examples<T: Debug>(items: &[T]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = items.iter().take(10).map(|i| format!("{i:?}")).collect();
    format!("{} in all, e.g. {}", items.len(), shown.join(", "))
}
