//! Dead letters and retries: the original message, byte for byte, republished with headers that
//! say why, and confirmed by the broker before the original is acknowledged.

use crate::error::AmqpError;
use idem_core::{Metadata, Reason};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Header: why the message was dead-lettered (`malformed`, `missing-key`, `rejected`,
/// `retries-exhausted`, `key-conflict`, `crash-loop`).
pub const REASON_HEADER: &str = "x-idem-reason";
/// Header: the (last) error text.
pub const ERROR_HEADER: &str = "x-idem-error";
/// Header: attempts made at the message so far. idem's own count, carried from retry to retry;
/// the broker's redelivery flag plays no part in it.
pub const ATTEMPTS_HEADER: &str = "x-idem-attempts";
/// Header: the consumer that gave up on it.
pub const CONSUMER_HEADER: &str = "x-idem-consumer";
/// Header: the queue it was consumed from.
pub const QUEUE_HEADER: &str = "x-idem-original-queue";
/// Header: when its first attempt failed (AMQP timestamp, seconds since the epoch).
pub const FIRST_FAILURE_HEADER: &str = "x-idem-first-failure";
/// Header: when its last attempt failed (AMQP timestamp, seconds since the epoch).
pub const LAST_FAILURE_HEADER: &str = "x-idem-last-failure";

/// Longest error text kept in a header; a handler's error can embed a whole payload.
const MAX_ERROR_LEN: usize = 4096;

/// The name of `queue`'s dead-letter queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The name of `queue`'s delay queue for retries after `delay`: `<queue>.retry.<delay>`, the
/// delay written like `500ms`, `4s`, `2m` or `1h`.
pub fn retry_queue(queue: &str, delay: Duration) -> String {
    let ms = delay.as_millis();
    let label = if ms > 0 && ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms > 0 && ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    };
    format!("{queue}.retry.{label}")
}

/// What a dead letter says about itself.
pub(crate) struct DeadLetter<'a> {
    pub reason: Reason,
    pub error: &'a str,
    pub consumer: &'a str,
    pub queue: &'a str,
}

/// Publishes the message to the queue's DLQ with the dead-letter headers, and waits for the
/// broker's confirm. Only after this returns `Ok` may the original be acknowledged: otherwise a
/// crash in between would lose the message.
pub(crate) async fn publish_dead_letter(
    channel: &Channel,
    body: &[u8],
    properties: &BasicProperties,
    metadata: &Metadata,
    letter: DeadLetter<'_>,
) -> Result<(), AmqpError> {
    let mut headers = failure_headers(properties, metadata, letter.error);
    headers.insert(REASON_HEADER.into(), long_string(letter.reason.as_str()));
    headers.insert(CONSUMER_HEADER.into(), long_string(letter.consumer));
    headers.insert(QUEUE_HEADER.into(), long_string(letter.queue));
    let properties = properties.clone().with_headers(headers);
    publish_confirmed(channel, &dead_letter_queue(letter.queue), body, properties).await
}

/// Publishes the message to the delay queue for `tier`, with `x-idem-attempts` counting this
/// attempt and a per-message expiration of `delay` (at most the queue's TTL, `tier`); when it
/// expires the broker routes it back to `queue`. Confirmed before the original may be
/// acknowledged.
pub(crate) async fn publish_retry(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    metadata: &Metadata,
    error: &str,
    (delay, tier): (Duration, Duration),
) -> Result<(), AmqpError> {
    let headers = failure_headers(properties, metadata, error);
    let properties = properties
        .clone()
        .with_headers(headers)
        .with_expiration(delay.as_millis().max(1).to_string().into());
    publish_confirmed(channel, &retry_queue(queue, tier), body, properties).await
}

/// The original headers plus the error, attempts and failure times.
fn failure_headers(properties: &BasicProperties, metadata: &Metadata, error: &str) -> FieldTable {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    headers.insert(
        ERROR_HEADER.into(),
        long_string(truncate(error, MAX_ERROR_LEN)),
    );
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(metadata.previous_attempts.saturating_add(1))),
    );
    headers.insert(
        FIRST_FAILURE_HEADER.into(),
        AMQPValue::Timestamp(metadata.first_failure.unwrap_or(now)),
    );
    headers.insert(LAST_FAILURE_HEADER.into(), AMQPValue::Timestamp(now));
    headers
}

/// Publishes to `queue` through the default exchange on a confirm-mode channel, and waits for
/// the broker to take responsibility for the message.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    let confirm = channel
        // mandatory: if the queue is gone the broker returns the message instead of dropping it.
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(AmqpError::broker(format!("publish to {queue:?}")))?
        .await
        .map_err(AmqpError::broker(format!(
            "confirm of the publish to {queue:?}"
        )))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(AmqpError::Config(format!(
                "the broker returned the message unroutable ({}): declare the queue {queue:?}",
                returned.reply_text
            )))
        }
        Confirmation::Nack(None) => Err(AmqpError::Config(format!(
            "the broker refused (nack) the publish to {queue:?}; check the broker's disk and memory alarms"
        ))),
        Confirmation::NotRequested => Err(AmqpError::Config(
            "dead letters and retries must go through a channel in confirm mode; this is a bug in idem".into(),
        )),
    }
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn truncates_on_a_char_boundary() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("abc", 10), "abc");
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
