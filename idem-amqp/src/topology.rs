//! The queues a consumer uses: its queue, the dead-letter queue `<queue>.dlq`, and one delay
//! queue `<queue>.retry.<delay>` per retry delay, whose TTL expires messages back into the
//! queue through the default exchange. Their names, declare arguments and declaration.

use crate::error::Error;
use idem_core::RetryPolicy;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
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

/// Every queue a consumer of `queue` uses, with its declare arguments: the queue, its
/// dead-letter queue, and one delay queue per retry delay.
pub(crate) fn queues(queue: &str, retry: &RetryPolicy) -> Vec<(String, FieldTable)> {
    let mut queues = vec![
        (queue.to_owned(), FieldTable::default()),
        (dead_letter_queue(queue), FieldTable::default()),
    ];
    for tier in retry.tiers() {
        queues.push((retry_queue(queue, tier), delay_arguments(queue, tier)));
    }
    queues
}

/// A delay queue's arguments: messages expire after `tier` (or their own, shorter expiration)
/// and are dead-lettered through the default exchange back to `queue`.
fn delay_arguments(queue: &str, tier: Duration) -> FieldTable {
    let mut arguments = FieldTable::default();
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

/// Declares every queue of [`queues`], durable, on `channel`. A queue that already exists
/// with other arguments is refused by the broker (and closes the channel).
pub(crate) async fn declare(
    channel: &Channel,
    queue: &str,
    retry: &RetryPolicy,
) -> Result<(), Error> {
    for (name, arguments) in queues(queue, retry) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
