//! Deliveries the client library could read only lossily.
//!
//! RabbitMQ accepts AMQP short strings that are not valid UTF-8 (a message id, content type,
//! header name or routing key from a client in another language). idem reads them with each
//! invalid sequence replaced by U+FFFD (the patch in `patches/amq-protocol-types`) rather than
//! losing the connection over them; such a delivery cannot be processed as sent — its message id
//! may be its key, and two different ids could read the same — so it is dead-lettered
//! `unreadable`, and the queue behind it flows.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

const REPLACED: char = char::REPLACEMENT_CHARACTER;

/// Which part of `delivery` was not valid UTF-8, if any.
pub(super) fn unreadable_part(delivery: &Delivery) -> Option<String> {
    let properties = &delivery.properties;
    let short_strings = [
        ("the routing key", Some(delivery.routing_key.as_str())),
        ("the exchange", Some(delivery.exchange.as_str())),
        (
            "message_id",
            properties.message_id().as_ref().map(|s| s.as_str()),
        ),
        (
            "correlation_id",
            properties.correlation_id().as_ref().map(|s| s.as_str()),
        ),
        (
            "content_type",
            properties.content_type().as_ref().map(|s| s.as_str()),
        ),
        (
            "content_encoding",
            properties.content_encoding().as_ref().map(|s| s.as_str()),
        ),
        ("type", properties.kind().as_ref().map(|s| s.as_str())),
        (
            "reply_to",
            properties.reply_to().as_ref().map(|s| s.as_str()),
        ),
        (
            "expiration",
            properties.expiration().as_ref().map(|s| s.as_str()),
        ),
        ("user_id", properties.user_id().as_ref().map(|s| s.as_str())),
        ("app_id", properties.app_id().as_ref().map(|s| s.as_str())),
        (
            "cluster_id",
            properties.cluster_id().as_ref().map(|s| s.as_str()),
        ),
    ];
    for (part, text) in short_strings {
        if text.is_some_and(|text| text.contains(REPLACED)) {
            return Some(format!("the property {part}"));
        }
    }
    properties
        .headers()
        .as_ref()
        .and_then(|headers| in_table(headers, "headers"))
}

/// A header name, or a short-string value at any depth, that was not valid UTF-8.
fn in_table(table: &FieldTable, path: &str) -> Option<String> {
    // Runs on every delivery: a path is only written out for a name that is bad or a nested
    // table to descend into, never for the plain headers almost every message carries.
    for (name, value) in table.inner() {
        let name = name.as_str();
        if name.contains(REPLACED) {
            return Some(format!(
                "a header name in {path} ({:?})",
                format!("{path}.{name}")
            ));
        }
        match value {
            AMQPValue::ShortString(text) if text.as_str().contains(REPLACED) => {
                return Some(format!("the header value {path}.{name}"));
            }
            AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) => {
                if let Some(part) = in_value(value, &format!("{path}.{name}")) {
                    return Some(part);
                }
            }
            _ => {}
        }
    }
    None
}

fn in_value(value: &AMQPValue, path: &str) -> Option<String> {
    match value {
        AMQPValue::ShortString(text) if text.as_str().contains(REPLACED) => {
            Some(format!("the header value {path}"))
        }
        AMQPValue::FieldTable(table) => in_table(table, path),
        AMQPValue::FieldArray(items) => items
            .as_slice()
            .iter()
            .find_map(|item| in_value(item, path)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::parsing::parse_short_string;

    /// The patched parser: a short string with bytes that are not UTF-8 reads lossily instead of
    /// failing the frame (and with it the connection).
    #[test]
    fn a_short_string_that_is_not_utf8_is_read_lossily() {
        let frame: &[u8] = &[4, b'i', 0xff, 0xfe, b'd'];
        let (rest, text) = parse_short_string(frame).unwrap();
        assert!(rest.is_empty());
        assert_eq!(text.as_str(), "i\u{fffd}\u{fffd}d");
        let (_, text) = parse_short_string(&[2, b'o', b'k'][..]).unwrap();
        assert_eq!(text.as_str(), "ok");
    }
}
