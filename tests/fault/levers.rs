//! The levers `scripts/test` hands the suite (`IDEM_RABBITMQCTL`, `IDEM_PGCTL`), and looks at
//! the broker's queues that survive its faults.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use tokio::time::timeout;

/// The executables that operate the test servers.
pub struct Levers {
    rabbitmqctl: PathBuf,
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
            rabbitmqctl: var("IDEM_RABBITMQCTL"),
            pgctl: var("IDEM_PGCTL"),
        })
    }

    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        run(&self.rabbitmqctl, args).await
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
                let properties =
                    ConnectionProperties::default().with_connection_name("fault-probe".into());
                timeout(
                    Duration::from_secs(10),
                    Connection::connect(&self.url, properties),
                )
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
