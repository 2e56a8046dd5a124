//! What the unit of work learns about a delivery: its AMQP properties, the broker's redelivery
//! flag and its headers, as [`idem_core::Metadata`].

use crate::headers;
use idem_core::Metadata;
use lapin::message::Delivery as AmqpDelivery;
use lapin::types::AMQPValue;

/// The delivery's metadata: ids, kind, redelivery flag, the headers whose values are text or
/// numbers (rendered as text), and idem's own retry bookkeeping read from them — trusted only on
/// a message that came back through one of `queue`'s delay queues (the broker's `x-death` says
/// so): a producer that sets `x-idem-attempts` itself must not spend the message's retries.
///
/// The broker's delivery count (`x-delivery-count`) is read only on a redelivery from a quorum
/// queue: there the broker writes it; on a first delivery, or on a classic queue, the header is
/// whatever the producer sent, and a producer must not be able to hide a crash loop.
pub(super) fn metadata_of(
    delivery: &AmqpDelivery,
    queue: &str,
    queue_type: crate::QueueType,
) -> Metadata {
    let properties = &delivery.properties;
    let mut metadata = Metadata {
        message_id: properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        causation_id: None,
        redelivered: delivery.redelivered,
        kind: properties
            .kind()
            .as_ref()
            .map(|kind| kind.as_str().to_owned()),
        previous_attempts: 0,
        first_failure: None,
        headers: Default::default(),
        delivery_count: None,
    };
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            if let Some(text) = header_text(value) {
                metadata.headers.insert(name.as_str().to_owned(), text);
            }
        }
        let idem = headers::read(&metadata.headers);
        metadata.causation_id = idem.causation_id;
        if delivery.redelivered && queue_type == crate::QueueType::Quorum {
            metadata.delivery_count = headers
                .inner()
                .get("x-delivery-count")
                .and_then(delivery_count);
        }
        if headers::came_back_from_delay_queue(headers, queue) {
            metadata.previous_attempts = idem.previous_attempts;
            metadata.first_failure = idem.first_failure;
        }
    }
    metadata
}

/// A count the broker wrote, as whichever integer type it chose.
fn delivery_count(value: &AMQPValue) -> Option<u32> {
    match value {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    }
}

/// A header value as text, when it is text, a boolean, a number or a timestamp.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        _ => return None,
    })
}
