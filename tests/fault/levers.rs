//! The levers `scripts/test` hands the suite (`IDEM_RABBITMQCTL`, `IDEM_PGCTL`), and looks at
//! the broker's queues that survive its faults.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use tokio::time::timeout;

/// The executables that operate the test servers.
pub struct Levers {
    /// rabbitmqctl of each node, tried in turn (on a cluster some node may be down).
    rabbitmqctl: Vec<PathBuf>,
    pgctl: PathBuf,
}

impl Levers {
    /// The levers, or the names of the variables that are not set.
    pub fn from_env() -> Result<Self, String> {
        let missing: Vec<&str> = [
            "IDEM_TEST_AMQP_URL",
            "IDEM_TEST_DATABASE_URL",
            "IDEM_RABBITMQCTL",
            "IDEM_PGCTL",
        ]
        .into_iter()
        .filter(|name| std::env::var_os(name).is_none_or(|v| v.is_empty()))
        .collect();
        if !missing.is_empty() {
            return Err(missing.join(", "));
        }
        let var = |name| PathBuf::from(std::env::var_os(name).unwrap_or_default());
        Ok(Self {
            rabbitmqctl: vec![var("IDEM_RABBITMQCTL")],
            pgctl: var("IDEM_PGCTL"),
        })
    }

    /// The levers of a run against `cluster`: its nodes' rabbitmqctl, the same PostgreSQL.
    pub fn on(mut self, cluster: &Cluster) -> Self {
        self.rabbitmqctl = (0..cluster.nodes.len())
            .map(|n| cluster.script(n, "rabbitmqctl"))
            .collect();
        self
    }

    /// rabbitmqctl on the first node that answers.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        let mut last = Err("no RabbitMQ node to ask".to_owned());
        for ctl in &self.rabbitmqctl {
            last = run(ctl, args).await;
            if last.is_ok() {
                break;
            }
        }
        last
    }

    pub async fn pgctl(&self, args: &[&str]) -> Result<String, String> {
        run(&self.pgctl, args).await
    }

    /// (name, ready, unacknowledged) of every queue named `queue` or `queue.…`.
    pub async fn queue_depths(&self, queue: &str) -> Result<Vec<(String, u64, u64)>, String> {
        let out = self
            .rabbitmqctl(&[
                "list_queues",
                "--silent",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ])
            .await?;
        let prefix = format!("{queue}.");
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let name = fields.next()?;
                let ready = fields.next()?.parse().ok()?;
                let unacked = fields.next()?.parse().ok()?;
                (name == queue || name.starts_with(&prefix))
                    .then(|| (name.to_owned(), ready, unacked))
            })
            .collect())
    }
}

/// The 3-node RabbitMQ cluster `scripts/test` starts for the cluster pass
/// (`idem_start_rabbitmq_cluster`): its nodes' URLs and the executables that kill, stop and
/// start each node.
pub struct Cluster {
    urls: Vec<String>,
    dir: PathBuf,
    /// Node names (`idem-c5680@localhost`), in URL order.
    pub nodes: Vec<String>,
}

impl Cluster {
    /// The cluster when the run asks for one (`IDEM_FAULT_CLUSTER=1`); panics, naming what is
    /// missing, when it asks and the cluster's variables are not set.
    pub fn from_env() -> Option<Self> {
        std::env::var("IDEM_FAULT_CLUSTER")
            .ok()
            .filter(|v| v == "1")?;
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("IDEM_FAULT_CLUSTER=1 needs {name} (scripts/test starts the cluster and sets it)")
            })
        };
        let urls: Vec<String> = var("IDEM_TEST_CLUSTER_AMQP_URLS")
            .split(',')
            .map(str::to_owned)
            .collect();
        let nodes: Vec<String> = var("IDEM_CLUSTER_NODES")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(urls.len(), nodes.len(), "one URL per cluster node");
        Some(Self {
            urls,
            dir: PathBuf::from(var("IDEM_CLUSTER_DIR")),
            nodes,
        })
    }

    /// Every node's URL, comma-separated, starting with node `first`: each process prefers
    /// its own node and fails over to the others.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.urls.len();
        (0..n)
            .map(|i| self.urls[(first + i) % n].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn script(&self, node: usize, name: &str) -> PathBuf {
        self.dir.join(format!("node{}", node + 1)).join(name)
    }

    /// The node (index) hosting the leader of quorum queue `queue`.
    pub async fn leader(&self, levers: &Levers, queue: &str) -> Result<usize, String> {
        let out = levers
            .rabbitmqctl(&["list_queues", "--silent", "name", "leader"])
            .await?;
        let leader = out
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next()? == queue).then(|| fields.next().map(str::to_owned))?
            })
            .next()
            .ok_or_else(|| format!("no leader listed for {queue}: {out}"))?;
        self.nodes
            .iter()
            .position(|node| *node == leader)
            .ok_or_else(|| format!("the leader {leader} is not a node of the cluster"))
    }

    /// SIGKILLs node `node` (returns once it is gone).
    pub async fn kill(&self, node: usize) -> Result<String, String> {
        run(&self.script(node, "kill"), &[]).await
    }

    /// `rabbitmqctl stop` on node `node` (returns once it is down).
    pub async fn stop(&self, node: usize) -> Result<String, String> {
        run(&self.script(node, "stop"), &[]).await
    }

    /// Boots node `node` again (returns once it runs in the cluster).
    pub async fn start(&self, node: usize) -> Result<String, String> {
        run(&self.script(node, "start"), &[]).await
    }
}

async fn run(program: &Path, args: &[&str]) -> Result<String, String> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let out = timeout(
        Duration::from_secs(120),
        Command::new(program).args(args).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| format!("{command}: no answer within 120 s"))?
    .map_err(|e| format!("{command}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{command}: {}: {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Counts messages and consumers of queues over AMQP (passive declare), reconnecting when the
/// connection is gone.
pub struct Probe {
    url: String,
    connection: Option<Connection>,
}

impl Probe {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            connection: None,
        }
    }

    /// (ready messages, consumers) of `queue`.
    pub async fn counts(&mut self, queue: &str) -> Result<(u32, u32), String> {
        let result = self.try_counts(queue).await;
        if result.is_err() {
            if let Some(connection) = self.connection.take() {
                let _ = timeout(
                    Duration::from_secs(2),
                    connection.close(200, "probe".into()),
                )
                .await;
            }
        }
        result
    }

    async fn try_counts(&mut self, queue: &str) -> Result<(u32, u32), String> {
        let connection = match self.connection.take() {
            Some(connection) if connection.status().connected() => connection,
            _ => {
                // idem's connect: the first node of a cluster's URL list that answers.
                timeout(Duration::from_secs(10), idem::amqp::connect(&self.url))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| format!("connect: {e}"))?
            }
        };
        let connection = self.connection.insert(connection);
        // A passive declare of a missing queue closes the channel: one channel per look.
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("open channel: {e}"))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await;
        let _ = channel.close(200, "counted".into()).await;
        let declared = declared.map_err(|e| format!("queue {queue}: {e}"))?;
        Ok((declared.message_count(), declared.consumer_count()))
    }

    pub async fn close(self) {
        if let Some(connection) = self.connection {
            let _ = timeout(Duration::from_secs(2), connection.close(200, "done".into())).await;
        }
    }

    pub fn connection(&self) -> Option<&Connection> {
        self.connection.as_ref()
    }
}
