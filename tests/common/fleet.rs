//! Processes of the example binaries, run as a user would run them, for the end-to-end tests
//! that kill and restart them (`tests/fault_injection.rs`, `tests/orders_example.rs`): each
//! process writes to its own log file, is SIGKILLed and started again on demand, is watched for
//! exits nobody asked for, and is stopped with SIGTERM at the end. Also what one such run owns
//! ([`Scratch`]): a database, a tag for its queues and a directory for the logs; and the seed
//! its random choices come from ([`seed`]).
//!
//! Over 400 lines on purpose: the process fleet is one unit (start, kill, restart, watch, stop).

use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// How long after an unrequested exit a process is started again (so that a process that
/// cannot start at all does not become a fork loop).
pub const RESTART_DELAY: Duration = Duration::from_millis(500);

/// What one slot of a [`Fleet`] runs: the `index`th process of a `role` ("consumer",
/// "orders relay"), named "<role> <index>" ("consumer 0", "orders relay 1") in reports and
/// logging to `<role-with-dashes>-<index>.log` in the fleet's directory.
pub struct Process {
    role: String,
    index: usize,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Process {
    pub fn new(role: &str, index: usize, binary: &Path) -> Self {
        Self {
            role: role.to_owned(),
            index,
            binary: binary.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// The process's environment, on top of the test's own.
    pub fn env(mut self, env: Vec<(String, String)>) -> Self {
        self.env = env;
        self
    }
}

/// The processes of one run.
pub struct Fleet {
    dir: PathBuf,
    t0: Instant,
    slots: Vec<Slot>,
    last_start: Instant,
    /// Exits nobody asked for: when, which, and how.
    self_exits: Vec<String>,
}

struct Slot {
    role: String,
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
    /// SIGKILLs sent.
    kills: usize,
    restart_at: Option<Instant>,
}

impl Fleet {
    /// An empty fleet whose processes log into `dir`; times in logs and reports count from `t0`.
    pub fn new(dir: &Path, t0: Instant) -> Self {
        Self {
            dir: dir.to_owned(),
            t0,
            slots: Vec::new(),
            last_start: t0,
            self_exits: Vec::new(),
        }
    }

    /// Starts `process` in a new slot; returns the slot's index.
    pub fn start(&mut self, process: Process) -> usize {
        let name = format!("{} {}", process.role, process.index);
        let log = self.dir.join(format!(
            "{}-{}.log",
            process.role.replace(' ', "-"),
            process.index
        ));
        self.slots.push(Slot {
            role: process.role,
            name,
            binary: process.binary,
            args: process.args,
            env: process.env,
            log,
            child: None,
            starts: 0,
            kills: 0,
            restart_at: None,
        });
        let i = self.slots.len() - 1;
        self.spawn(i, "first start");
        i
    }

    fn spawn(&mut self, i: usize, why: &str) {
        let at = self.t0.elapsed().as_secs_f64();
        self.last_start = Instant::now();
        let slot = &mut self.slots[i];
        slot.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.log)
            .unwrap();
        writeln!(
            log,
            "=== t={at:.2}s: start #{} of {} ({why}) ===",
            slot.starts, slot.name
        )
        .unwrap();
        let child = Command::new(&slot.binary)
            .args(&slot.args)
            .envs(slot.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", slot.binary.display()));
        slot.child = Some(child);
        slot.restart_at = None;
    }

    /// How many slots there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// When a process was last started.
    pub fn last_start(&self) -> Instant {
        self.last_start
    }

    /// Indexes of the processes running now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].child.is_some())
            .collect()
    }

    /// SIGKILL process `i` — no shutdown, no acks, no rollbacks, no relay bookkeeping — and
    /// start it again; says so on stdout, with `context` (e.g. the progress at that moment) in
    /// parentheses unless it is empty. Does nothing if it is not running.
    pub async fn kill_and_restart(&mut self, i: usize, context: &str) {
        self.reap();
        if let Some(mut child) = self.slots[i].child.take() {
            let context = if context.is_empty() {
                String::new()
            } else {
                format!(" ({context})")
            };
            println!(
                "t={:.1}s: SIGKILL {}{context}",
                self.t0.elapsed().as_secs_f64(),
                self.slots[i].name
            );
            child.start_kill().unwrap();
            child.wait().await.unwrap();
            self.slots[i].kills += 1;
            self.spawn(i, "restart after SIGKILL");
        }
    }

    /// SIGKILLs sent, in all.
    pub fn kills(&self) -> usize {
        self.slots.iter().map(|slot| slot.kills).sum()
    }

    /// SIGKILLs sent per role, the roles in the order they were first started.
    pub fn kills_by_role(&self) -> Vec<(&str, usize)> {
        let mut by_role: Vec<(&str, usize)> = Vec::new();
        for slot in &self.slots {
            match by_role.iter_mut().find(|(role, _)| *role == slot.role) {
                Some((_, n)) => *n += slot.kills,
                None => by_role.push((&slot.role, slot.kills)),
            }
        }
        by_role
    }

    /// Whether every role had at least one of its processes SIGKILLed.
    pub fn every_role_killed(&self) -> bool {
        self.kills_by_role().iter().all(|&(_, n)| n > 0)
    }

    /// "<total> [<role> <n>, …]", the roles hit so far.
    pub fn kill_counts(&self) -> String {
        let each: Vec<String> = self
            .kills_by_role()
            .iter()
            .filter(|&&(_, n)| n > 0)
            .map(|(role, n)| format!("{role} {n}"))
            .collect();
        format!("{} [{}]", self.kills(), each.join(", "))
    }

    /// Exits nobody asked for, noticed by [`Fleet::reap`]: when, which, and how.
    pub fn self_exits(&self) -> &[String] {
        &self.self_exits
    }

    /// Notices processes that exited by themselves (recorded in [`Fleet::self_exits`]) and
    /// starts them again once [`RESTART_DELAY`] has passed.
    pub fn reap(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(child) = &mut slot.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.self_exits.push(format!(
                        "t={:.2}s: {} (start #{}) exited by itself: {status} (log {})",
                        self.t0.elapsed().as_secs_f64(),
                        slot.name,
                        slot.starts,
                        slot.log.display()
                    ));
                    slot.child = None;
                    slot.restart_at = Some(now + RESTART_DELAY);
                }
            } else if slot.restart_at.is_some_and(|at| at <= now) {
                self.spawn(i, "restart after it exited by itself");
            }
        }
    }

    /// Starts every process that is not running, now.
    pub fn ensure_running(&mut self) {
        self.reap();
        for i in 0..self.slots.len() {
            if self.slots[i].child.is_none() {
                self.spawn(i, "restart after it exited by itself");
            }
        }
    }

    /// SIGTERM to every process; each must exit 0 within `deadline`. Returns what went wrong.
    pub async fn terminate(&mut self, deadline: Duration) -> Vec<String> {
        self.reap();
        let mut problems = Vec::new();
        for slot in &self.slots {
            if let Some(pid) = slot.child.as_ref().and_then(Child::id) {
                let sent = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(sent.success(), "kill -TERM {pid} failed");
            }
        }
        let until = Instant::now() + deadline;
        for slot in &mut self.slots {
            let Some(mut child) = slot.child.take() else {
                problems.push(format!(
                    "{} was not running when SIGTERM was due",
                    slot.name
                ));
                continue;
            };
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!(
                    "{} exited with {status} after SIGTERM (log {})",
                    slot.name,
                    slot.log.display()
                )),
                Ok(Err(e)) => problems.push(format!("{}: wait failed: {e}", slot.name)),
                Err(_) => {
                    problems.push(format!(
                        "{} did not exit within {deadline:?} of SIGTERM (log {})",
                        slot.name,
                        slot.log.display()
                    ));
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
        problems
    }

    /// Every process's log file.
    pub fn logs(&self) -> Vec<&Path> {
        self.slots.iter().map(|s| s.log.as_path()).collect()
    }

    /// Lines of all logs that contain `needle`.
    pub fn count_in_logs(&self, needle: &str) -> usize {
        self.slots
            .iter()
            .map(|slot| {
                std::fs::read_to_string(&slot.log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| line.contains(needle))
                    .count()
            })
            .sum()
    }

    /// The last `lines` lines of every log.
    pub fn tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for slot in &self.slots {
            let text = std::fs::read_to_string(&slot.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let _ = writeln!(
                out,
                "---- last {lines} lines of {} ----",
                slot.log.display()
            );
            for line in &all[all.len().saturating_sub(lines)..] {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

/// The seed of a run's random choices: `var` from the environment (a replay), or else a new one.
pub fn seed(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(seed) if !seed.trim().is_empty() => seed
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{var} must be an unsigned integer: {e:?}")),
        _ => rand::rng().random_range(1..=u64::from(u32::MAX)),
    }
}

/// What one run of processes owns: a database of its own (the examples create their tables in
/// whatever database they are given), a tag to name its queues after, a directory for the
/// processes' logs, and a pool on the database for the test's own queries.
pub struct Scratch {
    pub database: String,
    pub url: String,
    /// `<prefix>-<8 random hex digits>`: no other run's.
    pub tag: String,
    pub dir: PathBuf,
    pub pool: PgPool,
}

impl Scratch {
    /// Creates `database` afresh (a replay of the same seed starts from scratch) and the log
    /// directory `idem-<tag>` in the temporary directory.
    pub async fn create(database: &str, prefix: &str) -> Self {
        let url = super::fresh_pg_database(database).await;
        let tag = format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let dir = std::env::temp_dir().join(format!("idem-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&url)
            .unwrap();
        Self {
            database: database.to_owned(),
            url,
            tag,
            dir,
            pool,
        }
    }

    /// The environment of the run's processes: the broker, the run's database, info logs
    /// without colours and with backtraces, and `more` (queue names, prefetch, …).
    pub fn env(&self, more: &[(&str, &str)]) -> Vec<(String, String)> {
        [
            ("AMQP_URL", super::amqp_url().as_str()),
            ("DATABASE_URL", &self.url),
            ("RUST_LOG", "info"),
            ("RUST_BACKTRACE", "1"),
            ("NO_COLOR", "1"),
        ]
        .iter()
        .chain(more)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Drops the database and removes the log directory (the queues are the test's business).
    pub async fn remove(self) {
        self.pool.close().await;
        let admin = PgPool::connect(&super::pg_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        )))
        .execute(&admin)
        .await
        .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
