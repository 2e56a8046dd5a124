//! An external producer that survives the broker: it publishes with publisher confirms and, on
//! any error (connection closed by the broker, broker restarting, confirm missing), reconnects
//! with a short backoff and re-publishes whatever was not confirmed. Re-publishing is what a
//! real producer does, and it is safe: the consumer deduplicates by key.

use super::workload::Msg;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// How long one batch may take to get confirmed, reconnects included.
const BATCH_DEADLINE: Duration = Duration::from_secs(120);
/// How long a single confirm may take before the connection is presumed dead.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// What a publisher did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublisherStats {
    /// basic.publish calls, re-publishes included.
    pub published: usize,
    /// Messages published again because their first publish was not confirmed.
    pub republished: usize,
    /// Connections opened after the first.
    pub reconnects: usize,
}

pub struct Publisher {
    url: String,
    queue: String,
    name: String,
    link: Option<(Connection, Channel)>,
    connected_once: bool,
    pub stats: PublisherStats,
}

impl Publisher {
    pub fn new(url: &str, queue: &str, name: &str) -> Self {
        Self {
            url: url.to_owned(),
            queue: queue.to_owned(),
            name: name.to_owned(),
            link: None,
            connected_once: false,
            stats: PublisherStats::default(),
        }
    }

    /// Returns once the broker has confirmed every message of `batch` (panics after
    /// [`BATCH_DEADLINE`], naming the last error).
    pub async fn send(&mut self, batch: &[Arc<Msg>]) {
        let deadline = Instant::now() + BATCH_DEADLINE;
        let mut pending = batch.to_vec();
        let mut backoff = Duration::from_millis(100);
        let mut published_before = false;
        while !pending.is_empty() {
            let error = match self.channel().await {
                Ok(channel) => {
                    self.stats.published += pending.len();
                    if published_before {
                        self.stats.republished += pending.len();
                    }
                    published_before = true;
                    match publish_confirmed(&channel, &self.queue, &pending).await {
                        Ok(()) => return,
                        Err((unconfirmed, error)) => {
                            pending = unconfirmed;
                            error
                        }
                    }
                }
                Err(error) => error,
            };
            println!(
                "publisher {}: {error}; re-publishing {} unconfirmed after {backoff:?}",
                self.name,
                pending.len()
            );
            self.disconnect().await;
            assert!(
                Instant::now() < deadline,
                "publisher {}: {} messages still unconfirmed after {BATCH_DEADLINE:?}; last error: {error}",
                self.name,
                pending.len()
            );
            tokio::time::sleep(backoff).await; // reconnect backoff, not a poll
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub async fn close(mut self) -> PublisherStats {
        if let Some((connection, _)) = self.link.take() {
            let _ = timeout(Duration::from_secs(5), connection.close(200, "done".into())).await;
        }
        self.stats
    }

    async fn channel(&mut self) -> Result<Channel, String> {
        if let Some((connection, channel)) = &self.link {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        self.disconnect().await;
        // A cluster's nodes, comma-separated: the first that answers.
        let mut connected = Err("no URL".to_owned());
        for url in self.url.split(',') {
            let properties =
                ConnectionProperties::default().with_connection_name(self.name.as_str().into());
            connected = timeout(
                Duration::from_secs(10),
                Connection::connect(url, properties),
            )
            .await
            .map_err(|_| format!("connect to {url} timed out"))
            .and_then(|c| c.map_err(|e| format!("connect to {url}: {e}")));
            if connected.is_ok() {
                break;
            }
        }
        let connection = connected?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("open channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("confirm.select: {e}"))?;
        if self.connected_once {
            self.stats.reconnects += 1;
        }
        self.connected_once = true;
        self.link = Some((connection, channel.clone()));
        Ok(channel)
    }

    async fn disconnect(&mut self) {
        if let Some((connection, _)) = self.link.take() {
            let _ = timeout(
                Duration::from_secs(2),
                connection.close(200, "reconnecting".into()),
            )
            .await;
        }
    }
}

/// Publishes `messages` (persistent, mandatory so an unroutable one comes back instead of being
/// dropped) and waits for their confirms. On failure: the messages not confirmed, and why.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    messages: &[Arc<Msg>],
) -> Result<(), (Vec<Arc<Msg>>, String)> {
    let mut confirms = Vec::with_capacity(messages.len());
    let mut unconfirmed = Vec::new();
    let mut error = None;
    for (i, message) in messages.iter().enumerate() {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.message_id.as_str().into());
        if let Some(kind) = message.kind {
            properties = properties.with_type(kind.into());
        }
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        match channel
            .basic_publish("".into(), queue.into(), options, &message.body, properties)
            .await
        {
            Ok(confirm) => confirms.push((message, confirm)),
            Err(e) => {
                error = Some(format!("basic.publish: {e}"));
                unconfirmed.extend(messages[i..].iter().cloned());
                break;
            }
        }
    }
    for (message, confirm) in confirms {
        let failure = match timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => continue,
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                format!("returned unroutable: {}", returned.reply_text)
            }
            Ok(Ok(Confirmation::Nack(_))) => "nacked by the broker".to_owned(),
            Ok(Ok(Confirmation::NotRequested)) => "the channel is not in confirm mode".to_owned(),
            Ok(Err(e)) => format!("confirm: {e}"),
            Err(_) => format!("no confirm within {CONFIRM_TIMEOUT:?}"),
        };
        error.get_or_insert(failure);
        unconfirmed.push(Arc::clone(message));
    }
    match error {
        None => Ok(()),
        Some(error) => Err((unconfirmed, error)),
    }
}
