//! idem's own AMQP headers, `x-idem-*`: their names, how idem reads them off a delivery and
//! how it writes them onto a retry, a dead letter or an outbox message.
//!
//! A constant is named after its header: `x-idem-original-queue` is [`ORIGINAL_QUEUE`].

use idem_core::backoff::unix_seconds;
use idem_core::{Metadata, Reason};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::collections::BTreeMap;

/// Why the message was dead-lettered (`malformed`, `missing-key`, `rejected`,
/// `retries-exhausted`, `key-conflict`, `crash-loop`, `unreadable`).
pub const REASON: &str = "x-idem-reason";
/// The (last) error text, at most 4 KiB.
pub const ERROR: &str = "x-idem-error";
/// Attempts made at the message so far. idem's own count, carried from retry to retry; the
/// broker's redelivery flag plays no part in it.
pub const ATTEMPTS: &str = "x-idem-attempts";
/// Header of a dead letter: the idempotency key idem read from it (absent when it could not
/// read one: `malformed`, `missing-key`, `unreadable`). What `idem dlq show --key` matches.
pub const KEY: &str = "x-idem-key";
/// The consumer that gave up on it (the ledger's scope).
pub const CONSUMER: &str = "x-idem-consumer";
/// The queue it was consumed from.
pub const ORIGINAL_QUEUE: &str = "x-idem-original-queue";
/// When its first attempt failed (AMQP timestamp, seconds since the epoch).
pub const FIRST_FAILURE: &str = "x-idem-first-failure";
/// When its last attempt failed (AMQP timestamp, seconds since the epoch).
pub const LAST_FAILURE: &str = "x-idem-last-failure";
/// The id of the message whose handling produced this one (set by the outbox relay).
pub const CAUSATION_ID: &str = "x-idem-causation-id";
/// Header of a dead letter: the producer's `expiration` (per-message TTL, in ms) that the
/// original carried. A dead letter does not expire; this keeps the TTL for the record.
pub const ORIGINAL_EXPIRATION: &str = "x-idem-original-expiration";
/// Header of a dead letter or retry copy: the `user_id` the producer set (RabbitMQ checked it
/// against the producer's own connection). idem's copy cannot carry it, since the broker
/// refuses a publish whose `user_id` is not the publishing connection's user; it is kept here
/// for the record.
pub const ORIGINAL_USER_ID: &str = "x-idem-original-user-id";
/// Header of a dead letter or retry copy that would not fit in one AMQP frame with idem's
/// headers added: which of the producer's headers idem left out to make it fit, and the bytes
/// they took, as `"<bytes> bytes: <name>, <name>"` (largest first; earlier drops, carried from a
/// retry, before later ones; the names cut at 1 KiB). idem's own bookkeeping headers are never
/// dropped.
pub const DROPPED_HEADERS: &str = "x-idem-dropped-headers";

/// Longest error text kept in a header; a handler's error can embed a whole payload.
const MAX_ERROR_LEN: usize = 4096;

/// idem's headers as read from a delivery, whose headers are already rendered as text
/// ([`Metadata::headers`]).
pub(crate) struct Read {
    pub causation_id: Option<String>,
    /// Earlier attempts; a value that does not parse counts as none.
    pub previous_attempts: u32,
    /// When the first attempt failed; a value that does not parse counts as none.
    pub first_failure: Option<u64>,
}

/// Reads idem's retry bookkeeping and the causation id from a delivery's headers.
pub(crate) fn read(headers: &BTreeMap<String, String>) -> Read {
    Read {
        causation_id: headers.get(CAUSATION_ID).cloned(),
        previous_attempts: headers
            .get(ATTEMPTS)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        first_failure: headers.get(FIRST_FAILURE).and_then(|n| n.parse().ok()),
    }
}

/// Whether the broker's `x-death` says the message expired in one of `queue`'s delay queues
/// (`<queue>.retry.<delay>`) on its way back: only then is `x-idem-attempts` idem's own count.
pub(crate) fn came_back_from_delay_queue(headers: &FieldTable, queue: &str) -> bool {
    let Some((_, AMQPValue::FieldArray(deaths))) = headers
        .inner()
        .iter()
        .find(|(name, _)| name.as_str() == "x-death")
    else {
        return false;
    };
    let delay_queues = format!("{queue}.retry.");
    deaths.as_slice().iter().any(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return false;
        };
        let field = |name: &str| {
            death.inner().iter().find_map(|(key, value)| match value {
                AMQPValue::LongString(text) if key.as_str() == name => Some(text.to_string()),
                AMQPValue::ShortString(text) if key.as_str() == name => Some(text.to_string()),
                _ => None,
            })
        };
        field("reason").as_deref() == Some("expired")
            && field("queue").is_some_and(|dead_in| dead_in.starts_with(&delay_queues))
    })
}

/// The headers idem writes on a retry copy or a dead letter, kept apart from the producer's
/// until [`crate::fit`] has made them share one frame.
pub(crate) struct Written<'a> {
    /// idem's bookkeeping (attempts, failure times; on a dead letter also the reason, consumer,
    /// original queue and original expiration): never dropped.
    pub bookkeeping: BTreeMap<ShortString, AMQPValue>,
    /// The error text, at most 4 KiB; cut further when the frame is tight.
    pub error: &'a str,
}

impl Written<'_> {
    /// Whether idem writes header `name` itself: the producer's value of it is replaced, not
    /// kept.
    pub(crate) fn rewrites(&self, name: &str) -> bool {
        name == ERROR || name == DROPPED_HEADERS || self.bookkeeping.contains_key(name)
    }
}

/// The error, this attempt counted, the failure times and the producer's `user_id`: what idem
/// adds to a retry copy.
pub(crate) fn failure<'a>(
    properties: &BasicProperties,
    metadata: &Metadata,
    error: &'a str,
) -> Written<'a> {
    let now = unix_seconds();
    let mut bookkeeping = BTreeMap::new();
    bookkeeping.insert(
        ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(metadata.previous_attempts.saturating_add(1))),
    );
    bookkeeping.insert(
        FIRST_FAILURE.into(),
        AMQPValue::Timestamp(metadata.first_failure.unwrap_or(now)),
    );
    bookkeeping.insert(LAST_FAILURE.into(), AMQPValue::Timestamp(now));
    if let Some(user_id) = properties.user_id() {
        bookkeeping.insert(ORIGINAL_USER_ID.into(), long_string(user_id.as_str()));
    }
    Written {
        bookkeeping,
        error: truncate(error, MAX_ERROR_LEN),
    }
}

/// What a dead letter says about itself, on top of [`failure`].
pub(crate) struct DeadLetter<'a> {
    pub reason: Reason,
    pub error: &'a str,
    pub consumer: &'a str,
    pub queue: &'a str,
    /// The key idem read from the message, when it got that far.
    pub key: Option<&'a str>,
}

/// [`failure`] plus the reason, the consumer, the original queue and the producer's TTL: what
/// idem adds to a dead letter.
pub(crate) fn dead_letter<'a>(
    properties: &BasicProperties,
    metadata: &Metadata,
    letter: &DeadLetter<'a>,
) -> Written<'a> {
    let mut written = failure(properties, metadata, letter.error);
    let bookkeeping = &mut written.bookkeeping;
    bookkeeping.insert(REASON.into(), long_string(letter.reason.as_str()));
    bookkeeping.insert(CONSUMER.into(), long_string(letter.consumer));
    bookkeeping.insert(ORIGINAL_QUEUE.into(), long_string(letter.queue));
    if let Some(key) = letter.key {
        bookkeeping.insert(KEY.into(), long_string(key));
    }
    if let Some(expiration) = properties.expiration() {
        bookkeeping.insert(ORIGINAL_EXPIRATION.into(), long_string(expiration.as_str()));
    }
    written
}

/// Adds the causation id to an outgoing message's headers.
pub(crate) fn insert_causation_id(headers: &mut FieldTable, causation_id: &str) {
    headers.insert(CAUSATION_ID.into(), long_string(causation_id));
}

/// A header value as AMQP long string (bytes, no length limit worth mentioning).
pub(crate) fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
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
    use lapin::types::{AMQPValue, FieldArray, FieldTable};

    fn death(queue: &str, reason: &str) -> AMQPValue {
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString(queue.into()));
        death.insert("reason".into(), AMQPValue::LongString(reason.into()));
        AMQPValue::FieldTable(death)
    }

    fn with_deaths(deaths: Vec<AMQPValue>) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert("x-idem-attempts".into(), AMQPValue::LongString("7".into()));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(deaths)),
        );
        headers
    }

    #[test]
    fn attempts_count_only_after_idem_s_own_delay_queue() {
        let back = with_deaths(vec![death("payments.retry.4s", "expired")]);
        assert!(super::came_back_from_delay_queue(&back, "payments"));
        // A producer's own header, or a death elsewhere, proves nothing.
        let forged = with_deaths(vec![]);
        assert!(!super::came_back_from_delay_queue(&forged, "payments"));
        let elsewhere = with_deaths(vec![death("orders.retry.4s", "expired")]);
        assert!(!super::came_back_from_delay_queue(&elsewhere, "payments"));
        let rejected = with_deaths(vec![death("payments.retry.4s", "rejected")]);
        assert!(!super::came_back_from_delay_queue(&rejected, "payments"));
        let mut none = FieldTable::default();
        none.insert("x-idem-attempts".into(), AMQPValue::LongString("7".into()));
        assert!(!super::came_back_from_delay_queue(&none, "payments"));
    }

    use std::collections::BTreeMap;

    #[test]
    fn truncates_on_a_char_boundary() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("abc", 10), "abc");
    }

    #[test]
    fn unparsable_bookkeeping_counts_as_none() {
        let headers: BTreeMap<String, String> = [
            (super::ATTEMPTS.to_owned(), "three".to_owned()),
            (super::FIRST_FAILURE.to_owned(), "-1".to_owned()),
            (super::CAUSATION_ID.to_owned(), "m-1".to_owned()),
        ]
        .into();
        let read = super::read(&headers);
        assert_eq!(read.previous_attempts, 0);
        assert_eq!(read.first_failure, None);
        assert_eq!(read.causation_id.as_deref(), Some("m-1"));

        let headers: BTreeMap<String, String> = [
            (super::ATTEMPTS.to_owned(), "3".to_owned()),
            (super::FIRST_FAILURE.to_owned(), "1700000000".to_owned()),
        ]
        .into();
        let read = super::read(&headers);
        assert_eq!(read.previous_attempts, 3);
        assert_eq!(read.first_failure, Some(1_700_000_000));
        assert_eq!(read.causation_id, None);
    }
}
