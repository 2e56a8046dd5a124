//! The consumer processes: the payments example binary, run as a user would, each writing to its
//! own log file, killed and restarted on demand, and watched for exits nobody asked for.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long after an unrequested exit a consumer is started again (so a consumer that cannot
/// start at all does not become a fork loop).
const RESTART_DELAY: Duration = Duration::from_millis(500);

pub struct Fleet {
    binary: PathBuf,
    env: Vec<(String, String)>,
    t0: Instant,
    slots: Vec<Slot>,
    last_start: Instant,
    /// SIGKILLs sent.
    pub kills: usize,
    /// Exits nobody asked for: when, which, and how.
    pub self_exits: Vec<String>,
}

struct Slot {
    child: Option<Child>,
    log: PathBuf,
    starts: usize,
    restart_at: Option<Instant>,
}

impl Fleet {
    /// Starts `n` consumers at once, as a deployment would.
    pub fn start(
        n: usize,
        binary: PathBuf,
        env: Vec<(String, String)>,
        dir: &Path,
        t0: Instant,
    ) -> Self {
        let slots = (0..n)
            .map(|i| Slot {
                child: None,
                log: dir.join(format!("consumer-{i}.log")),
                starts: 0,
                restart_at: None,
            })
            .collect();
        let mut fleet = Self {
            binary,
            env,
            t0,
            slots,
            last_start: t0,
            kills: 0,
            self_exits: Vec::new(),
        };
        for i in 0..n {
            fleet.spawn(i, "first start");
        }
        fleet
    }

    fn spawn(&mut self, i: usize, why: &str) {
        let at = self.t0.elapsed();
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
            "=== t={:.2}s: start #{} of consumer {i} ({why}) ===",
            at.as_secs_f64(),
            slot.starts
        )
        .unwrap();
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        slot.child = Some(child);
        slot.restart_at = None;
    }

    /// When a consumer was last started.
    pub fn last_start(&self) -> Instant {
        self.last_start
    }

    /// Indexes of the consumers running now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].child.is_some())
            .collect()
    }

    /// SIGKILL consumer `i` — no shutdown, no acks, no rollbacks — and start it again.
    pub async fn kill_and_restart(&mut self, i: usize) {
        self.reap();
        if let Some(mut child) = self.slots[i].child.take() {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
            self.kills += 1;
            self.spawn(i, "restart after SIGKILL");
        }
    }

    /// Notices consumers that exited by themselves (recorded in `self_exits`) and starts them
    /// again once [`RESTART_DELAY`] has passed.
    pub fn reap(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(child) = &mut slot.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.self_exits.push(format!(
                        "t={:.2}s: consumer {i} (start #{}) exited by itself: {status} (log {})",
                        self.t0.elapsed().as_secs_f64(),
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

    /// Starts every consumer that is not running, now.
    pub fn ensure_running(&mut self) {
        self.reap();
        for i in 0..self.slots.len() {
            if self.slots[i].child.is_none() {
                self.spawn(i, "restart after it exited by itself");
            }
        }
    }

    /// SIGTERM to every consumer; each must exit 0 within `deadline`. Returns what went wrong.
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
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(mut child) = slot.child.take() else {
                problems.push(format!("consumer {i} was not running when SIGTERM was due"));
                continue;
            };
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!(
                    "consumer {i} exited with {status} after SIGTERM (log {})",
                    slot.log.display()
                )),
                Ok(Err(e)) => problems.push(format!("consumer {i}: wait failed: {e}")),
                Err(_) => {
                    problems.push(format!(
                        "consumer {i} did not exit within {deadline:?} of SIGTERM (log {})",
                        slot.log.display()
                    ));
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
        problems
    }

    pub fn logs(&self) -> Vec<&Path> {
        self.slots.iter().map(|s| s.log.as_path()).collect()
    }

    /// Lines of all consumer logs that contain `needle`.
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

    /// The last `lines` lines of every consumer's log.
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
