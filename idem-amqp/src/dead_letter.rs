//! Dead letters: the original message, byte for byte, plus headers that say why.

use crate::error::AmqpError;
use idem_core::Reason;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::time::{SystemTime, UNIX_EPOCH};

/// Header: why the message was dead-lettered (`malformed`, `missing-key`, `rejected`).
pub const REASON_HEADER: &str = "x-idem-reason";
/// Header: the error text.
pub const ERROR_HEADER: &str = "x-idem-error";
/// Header: the consumer that gave up on it.
pub const CONSUMER_HEADER: &str = "x-idem-consumer";
/// Header: the queue it was consumed from.
pub const QUEUE_HEADER: &str = "x-idem-original-queue";
/// Header: when it was dead-lettered (AMQP timestamp, seconds since the epoch).
pub const FAILED_AT_HEADER: &str = "x-idem-failed-at";

/// Longest error text kept in a header; a handler's error can embed a whole payload.
const MAX_ERROR_LEN: usize = 4096;

/// The name of `queue`'s dead-letter queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// What a dead letter says about itself.
pub(crate) struct DeadLetter<'a> {
    pub reason: Reason,
    pub error: &'a str,
    pub consumer: &'a str,
    pub queue: &'a str,
}

/// Publishes `body` with its original `properties` and the dead-letter headers to the queue's
/// DLQ, and waits for the broker's confirm. Only after this returns `Ok` may the original be
/// acknowledged: otherwise a crash in between would lose the message.
pub(crate) async fn publish(
    channel: &Channel,
    body: &[u8],
    properties: &BasicProperties,
    letter: DeadLetter<'_>,
) -> Result<(), AmqpError> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(REASON_HEADER.into(), long_string(letter.reason.as_str()));
    headers.insert(
        ERROR_HEADER.into(),
        long_string(truncate(letter.error, MAX_ERROR_LEN)),
    );
    headers.insert(CONSUMER_HEADER.into(), long_string(letter.consumer));
    headers.insert(QUEUE_HEADER.into(), long_string(letter.queue));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    headers.insert(FAILED_AT_HEADER.into(), AMQPValue::Timestamp(now));
    let properties = properties
        .clone()
        .with_headers(FieldTable::from(headers.inner().clone()));
    let dlq = dead_letter_queue(letter.queue);
    let confirm = channel
        // mandatory: if the DLQ is gone the broker returns the message instead of dropping it.
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(AmqpError::broker(format!(
            "publish to dead-letter queue {dlq:?}"
        )))?
        .await
        .map_err(AmqpError::broker(format!(
            "confirm of the publish to {dlq:?}"
        )))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(AmqpError::Config(format!(
            "the broker returned the dead letter unroutable ({}): declare the queue {dlq:?}",
            returned.reply_text
        ))),
        Confirmation::Nack(None) => Err(AmqpError::Config(format!(
            "the broker refused (nack) the dead letter for {dlq:?}; check the broker's disk and memory alarms"
        ))),
        Confirmation::NotRequested => Err(AmqpError::Config(
            "dead letters must go through a channel in confirm mode; this is a bug in idem".into(),
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
    #[test]
    fn truncates_on_a_char_boundary() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("abc", 10), "abc");
    }
}
