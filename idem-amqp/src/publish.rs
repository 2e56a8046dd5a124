//! Publishing with publisher confirms: dead letters and retries (the original message, byte for
//! byte, republished with headers that say why, confirmed by the broker before the original is
//! acknowledged), and what a confirm means, for these and for the outbox relay.

use crate::error::Error;
use crate::headers::{self, DeadLetter};
use crate::topology::{dead_letter_queue, retry_queue};
use idem_core::Metadata;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::time::Duration;

/// Opens a channel on `connection` and puts it in confirm mode; `name` says which channel in
/// errors ("dead-letter", "relay").
pub(crate) async fn confirm_channel(connection: &Connection, name: &str) -> Result<Channel, Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(Error::broker(format!("open the {name} channel")))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(Error::broker(format!(
            "enable publisher confirms on the {name} channel"
        )))?;
    Ok(channel)
}

/// Publishes the message to the queue's DLQ with the dead-letter headers, and waits for the
/// broker's confirm. Only after this returns `Ok` may the original be acknowledged: otherwise a
/// crash in between would lose the message.
pub(crate) async fn dead_letter(
    channel: &Channel,
    body: &[u8],
    properties: &BasicProperties,
    metadata: &Metadata,
    letter: DeadLetter<'_>,
) -> Result<(), Error> {
    let headers = headers::dead_letter(properties, metadata, &letter);
    // The producer's TTL would make the dead letter vanish from the DLQ: it is kept in a header
    // instead. (A retry copy needs no such care: its expiration is the delay's.)
    // Persistent whatever the original was: a dead letter is the only copy left.
    let properties = without_expiration(properties)
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    to_queue_confirmed(channel, &dead_letter_queue(letter.queue), body, properties).await
}

/// AMQP `delivery_mode` 2: written to disk. The original is acked once its dead letter or retry
/// copy is confirmed, so that copy must survive a broker restart even if the original would not.
const PERSISTENT: u8 = 2;

/// `properties` without `expiration`. lapin cannot unset one property, so the rest is copied.
fn without_expiration(properties: &BasicProperties) -> BasicProperties {
    let mut kept = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {$(
            if let Some(value) = properties.$get() {
                kept = kept.$set(value.clone());
            }
        )*};
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    kept
}

/// Publishes the message to the delay queue for `tier`, with `x-idem-attempts` counting this
/// attempt and a per-message expiration of `delay` (at most the queue's TTL, `tier`); when it
/// expires the broker routes it back to `queue`. Confirmed before the original may be
/// acknowledged.
pub(crate) async fn retry(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    metadata: &Metadata,
    error: &str,
    (delay, tier): (Duration, Duration),
) -> Result<(), Error> {
    let headers = headers::failure(properties, metadata, error);
    let properties = properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT)
        .with_expiration(delay.as_millis().max(1).to_string().into());
    to_queue_confirmed(channel, &retry_queue(queue, tier), body, properties).await
}

/// Publishes to `queue` through the default exchange on a confirm-mode channel, and waits for
/// the broker to take responsibility for the message.
async fn to_queue_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), Error> {
    let confirmation = channel
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
        .map_err(Error::broker(format!("publish to {queue:?}")))?
        .await
        .map_err(Error::broker(format!(
            "confirm of the publish to {queue:?}"
        )))?;
    confirmed(confirmation, "", queue)
}

/// What the broker's answer to a mandatory publish to `exchange` with `routing_key` means:
/// `Ok` only when it took the message (acked, not returned).
pub(crate) fn confirmed(
    confirmation: Confirmation,
    exchange: &str,
    routing_key: &str,
) -> Result<(), Error> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(Error::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(None) => Err(Error::Nacked {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::NotRequested => Err(Error::Bug(
            "a publish that needs the broker's confirm went out on a channel not in confirm mode",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::without_expiration;
    use lapin::BasicProperties;

    #[test]
    fn a_dead_letter_keeps_every_property_but_the_ttl() {
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_type("payment".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_timestamp(1_700_000_000)
            .with_content_type("application/json".into())
            .with_app_id("shop".into())
            .with_expiration("60000".into());
        let kept = without_expiration(&original);
        assert_eq!(*kept.expiration(), None);
        // Everything else is the original's, byte for byte.
        let expected = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_type("payment".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_timestamp(1_700_000_000)
            .with_content_type("application/json".into())
            .with_app_id("shop".into());
        assert_eq!(kept, expected);
    }
}
