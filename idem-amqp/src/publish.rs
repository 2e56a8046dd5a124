//! Publishing with publisher confirms: dead letters and retries (the original message, byte for
//! byte, republished with headers that say why, confirmed by the broker before the original is
//! acknowledged), and what a confirm means, for these and for the outbox relay.
//!
//! Every copy is made to fit in one frame first ([`crate::fit`]): a header frame over the
//! connection's `frame_max` would make the broker close the connection, and the message would
//! come back to fail the same way forever.

use crate::error::Error;
use crate::fit::{self, DoesNotFit};
use crate::headers::{self, DeadLetter, Written};
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

/// Where a consumer's dead letters and retry copies go out: a channel in confirm mode, and the
/// largest frame its connection takes (lapin does not say so on the channel).
#[derive(Clone)]
pub(crate) struct Publisher {
    pub channel: Channel,
    /// The `frame_max` negotiated on the connection: a copy's header frame must fit in it.
    pub frame_max: u32,
}

impl Publisher {
    /// Opens the confirm-mode channel on `connection`.
    pub(crate) async fn open(connection: &Connection) -> Result<Self, Error> {
        Ok(Self {
            channel: confirm_channel(connection, "dead-letter").await?,
            frame_max: connection.configuration().frame_max(),
        })
    }

    /// `properties` with idem's headers `written` and as many of the producer's as fit in a
    /// header frame of `frame_max` less `reserve` (see [`fit::fit`]); an error, rather than a
    /// publish that would cost the connection, when not even idem's alone fit.
    fn fitted(
        &self,
        queue: &str,
        properties: BasicProperties,
        written: Written<'_>,
        reserve: usize,
    ) -> Result<BasicProperties, Error> {
        let frame_max = usize::try_from(self.frame_max).unwrap_or(usize::MAX);
        match fit::fit(&properties, written, frame_max.saturating_sub(reserve)) {
            Ok(fitted) => {
                if !fitted.dropped.is_empty() {
                    let bytes: usize = fitted.dropped.iter().map(|(_, size)| size).sum();
                    let names: Vec<&str> = fitted.dropped.iter().map(|(n, _)| n.as_str()).collect();
                    tracing::warn!(queue, ?names, bytes, frame_max = self.frame_max, "the message's headers do not all fit in one frame with idem's: the largest were left out (see x-idem-dropped-headers)");
                }
                Ok(properties.with_headers(fitted.headers))
            }
            Err(DoesNotFit { needed }) => Err(Error::FrameTooLarge {
                queue: queue.to_owned(),
                needed: needed.saturating_add(reserve),
                frame_max: self.frame_max,
            }),
        }
    }
}

/// Publishes the message to the queue's DLQ with the dead-letter headers, and waits for the
/// broker's confirm. Only after this returns `Ok` may the original be acknowledged: otherwise a
/// crash in between would lose the message.
pub(crate) async fn dead_letter(
    publisher: &Publisher,
    body: &[u8],
    properties: &BasicProperties,
    metadata: &Metadata,
    letter: DeadLetter<'_>,
) -> Result<(), Error> {
    let queue = dead_letter_queue(letter.queue);
    let written = headers::dead_letter(properties, metadata, &letter);
    // The producer's TTL would make the dead letter vanish from the DLQ: it is kept in a header
    // instead. (A retry copy needs no such care: its expiration is the delay's.)
    // Persistent whatever the original was: a dead letter is the only copy left.
    let properties = republishable(properties).with_delivery_mode(PERSISTENT);
    // Nothing is added to a dead letter after this publish: the whole frame is its own.
    let properties = publisher.fitted(&queue, properties, written, 0)?;
    to_queue_confirmed(&publisher.channel, &queue, body, properties).await
}

/// Room kept in a retry copy's header frame for what RabbitMQ adds when the copy expires in its
/// delay queue and is dead-lettered back: an `x-death` entry (about 150 bytes plus the delay
/// queue's name twice) and the `x-first-death-*` (and, from 3.13, `x-last-death-*`) headers;
/// with queue names at their 255-byte maximum, under 1.5 KiB. The copy must still fit when it
/// comes back: lapin, receiving a frame over `frame_max`, closes the connection too.
const RETURN_RESERVE: usize = 4096;

/// AMQP `delivery_mode` 2: written to disk. The original is acked once its dead letter or retry
/// copy is confirmed, so that copy must survive a broker restart even if the original would not.
const PERSISTENT: u8 = 2;

/// `properties` without `expiration` and `user_id`: what idem's copy of a delivery (a dead
/// letter, a retry) may carry. RabbitMQ refuses a publish whose `user_id` is not the publishing
/// connection's user by closing the channel (406 PRECONDITION_FAILED), and a producer's
/// `user_id` is its own user, not idem's: kept, the copy could never be published and the
/// message would come back forever. The headers keep both ([`headers::ORIGINAL_USER_ID`],
/// [`headers::ORIGINAL_EXPIRATION`]). lapin cannot unset one property, so the rest is copied.
fn republishable(properties: &BasicProperties) -> BasicProperties {
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
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    kept
}

/// Publishes the message to the delay queue for `tier`, with `x-idem-attempts` counting this
/// attempt and a per-message expiration of `delay` (at most the queue's TTL, `tier`); when it
/// expires the broker routes it back to `queue`. Confirmed before the original may be
/// acknowledged. [`Error::FrameTooLarge`] when no copy fits the frame, not even with only
/// idem's headers: the caller dead-letters it instead.
pub(crate) async fn retry(
    publisher: &Publisher,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    metadata: &Metadata,
    error: &str,
    (delay, tier): (Duration, Duration),
) -> Result<(), Error> {
    let queue = retry_queue(queue, tier);
    let written = headers::failure(properties, metadata, error);
    let properties = republishable(properties)
        .with_delivery_mode(PERSISTENT)
        .with_expiration(delay.as_millis().max(1).to_string().into());
    let properties = publisher.fitted(&queue, properties, written, RETURN_RESERVE)?;
    to_queue_confirmed(&publisher.channel, &queue, body, properties).await
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
    use super::{confirmed, republishable};
    use lapin::message::{BasicReturnMessage, Delivery};
    use lapin::{BasicProperties, Confirmation};

    /// An unroutable publish is reported (and logged, by the relay) by where it went and the
    /// broker's reply: the returned message, body and headers, stays out of the error.
    #[test]
    fn an_unroutable_publish_names_its_destination_and_never_its_body() {
        let mut delivery = Delivery::mock(
            0,
            "".into(),
            "inventory.reserved".into(),
            false,
            br#"{"card":"4242 4242 4242 4242"}"#.to_vec(),
        );
        delivery.properties = BasicProperties::default().with_message_id("m-1".into());
        let returned = BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        };
        let error =
            confirmed(Confirmation::Ack(Some(returned)), "", "inventory.reserved").unwrap_err();
        let text = error.to_string();
        assert!(text.contains("NO_ROUTE"), "{text}");
        assert!(text.contains("\"inventory.reserved\""), "{text}");
        assert!(text.contains("RelayBuilder::declare_queue"), "{text}");
        assert!(!text.contains("4242"), "{text}");
        assert!(!format!("{error:?}").contains("4242"), "{error:?}");
    }

    #[test]
    fn a_copy_keeps_every_property_but_the_ttl_and_the_user_id() {
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_type("payment".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_timestamp(1_700_000_000)
            .with_content_type("application/json".into())
            .with_app_id("shop".into())
            .with_user_id("payments-api".into())
            .with_expiration("60000".into());
        let kept = republishable(&original);
        assert_eq!(*kept.expiration(), None);
        assert_eq!(*kept.user_id(), None);
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
