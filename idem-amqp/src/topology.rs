//! The queues a consumer uses: its queue, the dead-letter queue `<queue>.dlq`, and one delay
//! queue `<queue>.retry.<delay>` per retry delay, whose TTL expires messages back into the
//! queue through the default exchange. Their names, declare arguments and declaration. And the
//! [`Destination`]s an outbox relay declares before it publishes.

use crate::error::Error;
use idem_core::RetryPolicy;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;

/// Longest queue name RabbitMQ accepts.
pub(crate) const MAX_QUEUE_NAME: usize = 255;

/// The name of `queue`'s dead-letter queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The name of `queue`'s delay queue for retries after `delay`: `<queue>.retry.<delay>`, the
/// delay written like `500ms`, `4s`, `2m` or `1h`.
pub fn retry_queue(queue: &str, delay: Duration) -> String {
    let ms = delay.as_millis();
    let label = if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms > 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    };
    format!("{queue}.retry.{label}")
}

/// The type of the queues idem declares for a consumer — its queue, its dead-letter queue and
/// its delay queues — and of the queues an outbox relay declares
/// ([`crate::RelayBuilder::queue_type`]). Every declaration of one queue must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// RabbitMQ's classic queue (the default): one node holds it; lost with that node's disk.
    /// Its dead-lettering — how a delay queue returns a retry to the queue — is at-most-once:
    /// a message expiring out of a delay queue while the queue it goes to is unavailable is
    /// dropped.
    #[default]
    Classic,
    /// A quorum queue: replicated over the cluster's nodes (Raft), a publisher confirm means a
    /// majority has it, and it survives a minority of nodes dying. idem declares the delay
    /// queues with `x-dead-letter-strategy: at-least-once` (and `x-overflow: reject-publish`,
    /// which that strategy requires): a retry stays in its delay queue until the queue it goes
    /// back to has confirmed it. And the broker counts deliveries (`x-delivery-count`), which
    /// the crash-loop guard reads instead of writing a count of its own.
    Quorum,
}

impl QueueType {
    /// `classic` or `quorum`, as `x-queue-type` and `IDEM_QUEUE_TYPE` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }

    /// The declare arguments every queue of this type carries: none for classic (as every
    /// earlier idem declared them, so existing queues still match).
    fn arguments(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self == Self::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            _ => Err(format!(
                "unknown queue type {text:?}: write `classic` (one node, the default) or `quorum` (replicated over a cluster)"
            )),
        }
    }
}

/// Every queue a consumer of `queue` uses, with its declare arguments: the queue, its
/// dead-letter queue, and one delay queue per retry delay.
pub(crate) fn queues(
    queue: &str,
    retry: &RetryPolicy,
    queue_type: QueueType,
) -> Vec<(String, FieldTable)> {
    let mut queues = vec![
        (queue.to_owned(), queue_type.arguments()),
        (dead_letter_queue(queue), queue_type.arguments()),
    ];
    for tier in retry.tiers() {
        queues.push((
            retry_queue(queue, tier),
            delay_arguments(queue, tier, queue_type),
        ));
    }
    queues
}

/// A delay queue's arguments: messages expire after `tier` (or their own, shorter expiration)
/// and are dead-lettered through the default exchange back to `queue` — on quorum queues
/// at-least-once.
fn delay_arguments(queue: &str, tier: Duration, queue_type: QueueType) -> FieldTable {
    let mut arguments = queue_type.arguments();
    if queue_type == QueueType::Quorum {
        // Without at-least-once, dead-lettering is fire-and-forget even on a quorum queue;
        // RabbitMQ accepts that strategy only with reject-publish overflow.
        arguments.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    let ttl = u32::try_from(tier.as_millis()).unwrap_or(u32::MAX);
    arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    arguments
}

/// A queue idem declares for a consumer, as idem declares it: durable, with these arguments.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueSpec {
    /// The queue's name.
    pub name: String,
    /// What the queue is for: `queue`, `dead letters` or `retry after 4s`.
    pub role: String,
    /// The declare arguments (a delay queue's TTL and where it expires to; none otherwise).
    pub arguments: FieldTable,
}

/// What the broker has where idem declares a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueState {
    /// It exists as idem declares it.
    Matches {
        /// Messages ready in it.
        messages: u32,
        /// Consumers on it.
        consumers: u32,
    },
    /// It does not exist: the consumer declares it on start (or `idem topology declare`).
    Missing,
    /// It exists with other settings; a consumer that declares it is refused at start. The
    /// broker's own words, which name the differing argument (`inequivalent arg 'x-message-ttl'
    /// … received the value '4000' … but current is '1000'`).
    Differs(String),
}

/// Every queue a consumer of `queue` with the retry policy `retry` declares, of `queue_type`:
/// the queue, its dead-letter queue and one delay queue per retry delay.
pub fn consumer_queues(queue: &str, retry: &RetryPolicy, queue_type: QueueType) -> Vec<QueueSpec> {
    let mut tiers = retry.tiers().into_iter();
    queues(queue, retry, queue_type)
        .into_iter()
        .enumerate()
        .map(|(i, (name, arguments))| {
            let role = match i {
                0 => "queue".to_owned(),
                1 => "dead letters".to_owned(),
                _ => tiers.next().map_or_else(
                    || "retry".to_owned(),
                    |tier| format!("retry after {tier:?}"),
                ),
            };
            QueueSpec {
                name,
                role,
                arguments,
            }
        })
        .collect()
}

/// Compares what the broker has with [`consumer_queues`], changing nothing: a queue that exists
/// is declared again with idem's settings, which the broker accepts only when they are the same
/// (and then leaves the queue as it is); a missing queue is not created.
pub async fn check_consumer_queues(
    connection: &Connection,
    queue: &str,
    retry: &RetryPolicy,
    queue_type: QueueType,
) -> Result<Vec<(QueueSpec, QueueState)>, Error> {
    let mut checked = Vec::new();
    for spec in consumer_queues(queue, retry, queue_type) {
        // The broker closes the channel over a refused declare: one channel per question.
        let open = || async {
            connection
                .create_channel()
                .await
                .map_err(Error::broker("open a channel to check the topology"))
        };
        let mut channel = open().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let state = match channel
            .queue_declare(spec.name.as_str().into(), passive, FieldTable::default())
            .await
        {
            Err(error) if refusal(&error).is_some_and(|(code, _)| code == NOT_FOUND) => {
                QueueState::Missing
            }
            Err(source) => {
                return Err(Error::Topology {
                    queue: spec.name.clone(),
                    source,
                })
            }
            Ok(_) => {
                if !channel.status().connected() {
                    channel = open().await?;
                }
                match channel
                    .queue_declare(
                        spec.name.as_str().into(),
                        QueueDeclareOptions::durable(),
                        spec.arguments.clone(),
                    )
                    .await
                {
                    Ok(found) => QueueState::Matches {
                        messages: found.message_count(),
                        consumers: found.consumer_count(),
                    },
                    Err(error) => match refusal(&error) {
                        Some((PRECONDITION_FAILED, text)) => QueueState::Differs(text),
                        _ => {
                            return Err(Error::Topology {
                                queue: spec.name.clone(),
                                source: error,
                            })
                        }
                    },
                }
            }
        };
        if channel.status().connected() {
            let _ = channel.close(200, "checked".into()).await;
        }
        checked.push((spec, state));
    }
    Ok(checked)
}

/// Declares every queue of [`consumer_queues`] as a consumer of `queue` does on start; a queue
/// that exists with other settings is refused ([`Error::Topology`], naming the argument).
pub async fn declare_consumer_queues(
    connection: &Connection,
    queue: &str,
    retry: &RetryPolicy,
    queue_type: QueueType,
) -> Result<(), Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(Error::broker("open a channel to declare the topology"))?;
    declare(&channel, queue, retry, queue_type).await?;
    if channel.status().connected() {
        let _ = channel.close(200, "declared".into()).await;
    }
    Ok(())
}

/// AMQP reply codes the checks tell apart.
const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;

/// The broker's refusal in `error` (reply code and text), if it was one.
fn refusal(error: &lapin::Error) -> Option<(u16, String)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            Some((amqp.get_id(), amqp.get_message().to_string()))
        }
        _ => None,
    }
}

/// Declares every queue of [`queues`], durable, on `channel`. A queue that already exists
/// with other arguments is refused by the broker (and closes the channel).
pub(crate) async fn declare(
    channel: &Channel,
    queue: &str,
    retry: &RetryPolicy,
    queue_type: QueueType,
) -> Result<(), Error> {
    for (name, arguments) in queues(queue, retry, queue_type) {
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .map_err(|source| Error::Topology {
                queue: name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Somewhere a service publishes to, which an outbox relay declares on every connection before
/// it publishes (`RelayBuilder::declare_queue`, `declare_exchange`, `bind_queue`): so that a
/// first run, before any consumer declared it, does not bounce every row as unroutable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// A durable exchange of this kind.
    Exchange { name: String, kind: ExchangeKind },
    /// A durable queue of this type: as an idem consumer declares its queue, so the two
    /// declarations agree.
    Queue(String, QueueType),
    /// `queue` bound to `exchange` with `routing_key`.
    Binding {
        queue: String,
        exchange: String,
        routing_key: String,
    },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exchange { name, kind } => {
                let kind = match kind {
                    ExchangeKind::Custom(custom) => custom.as_str(),
                    ExchangeKind::Direct => "direct",
                    ExchangeKind::Fanout => "fanout",
                    ExchangeKind::Headers => "headers",
                    ExchangeKind::Topic => "topic",
                };
                write!(f, "exchange {name:?} ({kind}, durable)")
            }
            Self::Queue(name, queue_type) => write!(f, "queue {name:?} (durable, {queue_type})"),
            Self::Binding {
                queue,
                exchange,
                routing_key,
            } => write!(
                f,
                "the binding of queue {queue:?} to exchange {exchange:?} with routing key {routing_key:?}"
            ),
        }
    }
}

impl Destination {
    /// What RabbitMQ would refuse, said at build time: `Err` names the fix.
    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            Self::Queue(name, _) => queue_name(name),
            Self::Exchange { name, .. } => {
                if name.is_empty() {
                    return Err(
                        "declare_exchange(\"\"): the default exchange always exists and cannot be \
                                declared; a message to a queue needs only declare_queue"
                            .into(),
                    );
                }
                if name.len() > MAX_QUEUE_NAME {
                    return Err(format!(
                        "the exchange name {name:?} is {} bytes, over RabbitMQ's {MAX_QUEUE_NAME}",
                        name.len()
                    ));
                }
                if name.starts_with("amq.") {
                    return Err(format!(
                        "the exchange {name:?} starts with `amq.`, which RabbitMQ reserves: its amq.* \
                         exchanges exist already; leave out declare_exchange (bind_queue to it works)"
                    ));
                }
                Ok(())
            }
            Self::Binding {
                queue, exchange, ..
            } => {
                queue_name(queue)?;
                if exchange.is_empty() {
                    return Err(format!(
                        "bind_queue({queue:?}, \"\", ..): the default exchange routes to the queue named by \
                         the routing key and takes no bindings; declare_queue({queue:?}) is all it needs"
                    ));
                }
                Ok(())
            }
        }
    }

    async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        match self {
            Self::Exchange { name, kind } => {
                let options = ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        kind.clone(),
                        options,
                        FieldTable::default(),
                    )
                    .await
            }
            Self::Queue(name, queue_type) => channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    queue_type.arguments(),
                )
                .await
                .map(drop),
            Self::Binding {
                queue,
                exchange,
                routing_key,
            } => {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            }
        }
    }
}

/// A queue name RabbitMQ takes for a declare.
fn queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(
            "declare_queue(\"\"): an empty name asks RabbitMQ for a server-named queue, which no \
             message of the outbox is addressed to; name the queue"
                .into(),
        );
    }
    if name.len() > MAX_QUEUE_NAME {
        return Err(format!(
            "the queue name {name:?} is {} bytes, over RabbitMQ's {MAX_QUEUE_NAME}",
            name.len()
        ));
    }
    if name.starts_with("amq.") {
        return Err(format!(
            "the queue name {name:?} starts with `amq.`, which RabbitMQ reserves"
        ));
    }
    Ok(())
}

/// Declares `destinations` (exchanges, then queues, then the bindings between them) on a channel
/// of its own on `connection`, each wait bounded by `timeout`. The first refusal is returned: the
/// broker closes the channel over it.
pub(crate) async fn declare_destinations(
    connection: &Connection,
    destinations: &[Destination],
    timeout: Duration,
) -> Result<(), Error> {
    if destinations.is_empty() {
        return Ok(());
    }
    let timed_out = |what: String| Error::Broker {
        operation: what,
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
        .into(),
    };
    let channel = tokio::time::timeout(timeout, connection.create_channel())
        .await
        .map_err(|_| timed_out("open the relay's declare channel".into()))?
        .map_err(Error::broker("open the relay's declare channel"))?;
    // Exchanges and queues before the bindings that need them.
    let rank = |destination: &&Destination| match destination {
        Destination::Exchange { .. } => 0,
        Destination::Queue(..) => 1,
        Destination::Binding { .. } => 2,
    };
    let mut ordered: Vec<&Destination> = destinations.iter().collect();
    ordered.sort_by_key(rank);
    for destination in ordered {
        tokio::time::timeout(timeout, destination.declare(&channel))
            .await
            .map_err(|_| timed_out(format!("declare {destination}")))?
            .map_err(|source| Error::Declare {
                destination: destination.to_string(),
                source,
            })?;
    }
    if channel.status().connected() {
        let _ = tokio::time::timeout(timeout, channel.close(200, "declared".into())).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Destination, QueueType};
    use lapin::types::AMQPValue;
    use lapin::ExchangeKind;
    use std::time::Duration;

    #[test]
    fn destinations_rabbitmq_would_refuse_are_refused_with_the_fix() {
        let queue = |name: &str| Destination::Queue(name.into(), QueueType::Classic).check();
        assert_eq!(queue("inventory.reserved"), Ok(()));
        assert!(queue("").unwrap_err().contains("name the queue"));
        assert!(queue("amq.x").unwrap_err().contains("reserves"));
        assert!(queue(&"q".repeat(256))
            .unwrap_err()
            .contains("over RabbitMQ's 255"));
        let exchange = |name: &str| {
            Destination::Exchange {
                name: name.into(),
                kind: ExchangeKind::Topic,
            }
            .check()
        };
        assert_eq!(exchange("inventory"), Ok(()));
        assert!(exchange("").unwrap_err().contains("default exchange"));
        assert!(exchange("amq.topic")
            .unwrap_err()
            .contains("bind_queue to it works"));
        let bind = |exchange: &str| {
            Destination::Binding {
                queue: "q".into(),
                exchange: exchange.into(),
                routing_key: "k".into(),
            }
            .check()
        };
        assert_eq!(bind("amq.topic"), Ok(()));
        assert!(bind("").unwrap_err().contains("takes no bindings"));
    }

    #[test]
    fn a_destination_says_what_it_is() {
        let exchange = Destination::Exchange {
            name: "inventory".into(),
            kind: ExchangeKind::Topic,
        };
        assert_eq!(
            exchange.to_string(),
            "exchange \"inventory\" (topic, durable)"
        );
        assert_eq!(
            Destination::Queue("q".into(), QueueType::Quorum).to_string(),
            "queue \"q\" (durable, quorum)"
        );
    }

    #[test]
    fn quorum_queues_return_retries_at_least_once_and_classic_ones_are_declared_as_before() {
        let retry =
            idem_core::RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(4));
        let text = |table: &lapin::types::FieldTable, key: &str| match table.inner().get(key) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        for (name, arguments) in super::queues("payments", &retry, QueueType::Quorum) {
            assert_eq!(
                text(&arguments, "x-queue-type").as_deref(),
                Some("quorum"),
                "{name}"
            );
            if name.contains(".retry.") {
                assert_eq!(
                    text(&arguments, "x-dead-letter-strategy").as_deref(),
                    Some("at-least-once")
                );
                assert_eq!(
                    text(&arguments, "x-overflow").as_deref(),
                    Some("reject-publish")
                );
                assert_eq!(
                    text(&arguments, "x-dead-letter-routing-key").as_deref(),
                    Some("payments")
                );
            }
        }
        let classic = super::queues("payments", &retry, QueueType::Classic);
        assert!(classic[0].1.inner().is_empty() && classic[1].1.inner().is_empty());
        assert!(classic[2..]
            .iter()
            .all(|(_, a)| !a.inner().contains_key("x-queue-type")
                && !a.inner().contains_key("x-overflow")));
        assert_eq!("Quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
        assert!("mirrored"
            .parse::<QueueType>()
            .unwrap_err()
            .contains("`classic`"));
    }

    #[test]
    fn delay_queues_are_named_by_their_delay() {
        let name = |ms| super::retry_queue("payments", Duration::from_millis(ms));
        assert_eq!(name(250), "payments.retry.250ms");
        assert_eq!(name(4_000), "payments.retry.4s");
        assert_eq!(name(64_000), "payments.retry.64s");
        assert_eq!(name(120_000), "payments.retry.2m");
        assert_eq!(name(7_200_000), "payments.retry.2h");
    }
}
