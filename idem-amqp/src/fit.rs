//! Making a republished message (a dead letter, a retry copy) fit in one AMQP frame.
//!
//! AMQP carries all of a message's properties, its headers table included, in ONE content-header
//! frame, and RabbitMQ closes the whole connection (`FRAME_ERROR`, `frame_too_large`) when a
//! frame is over the `frame_max` negotiated with it. A producer's message whose headers come
//! close to that limit arrives fine, but with idem's `x-idem-*` headers added its copy would not:
//! every publish of it would kill the connection and the message would come back, forever. So
//! before a copy goes out its frame is measured (exactly, with the encoding amq-protocol
//! writes), and when it does not fit: idem's error text is cut first (down to
//! [`ERROR_FLOOR`]), then the producer's headers are left out, largest first, until it fits, and
//! their names and bytes are recorded in [`headers::DROPPED_HEADERS`]. idem's bookkeeping is never
//! dropped.

use crate::headers::{self, Written, DROPPED_HEADERS, ERROR};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use std::collections::BTreeMap;

/// The bytes of a content-header frame besides its property list: frame type (1), channel (2),
/// payload size (4), class id (2), weight (2), body size (8), property flags (2: basic has 14
/// properties, one bit each), frame end (1). The AMQP spec counts all of them in `frame_max`,
/// and so does lapin when it receives a frame (a retry copy comes back to idem); RabbitMQ only
/// refuses a frame whose payload (without the 8 bytes of type, channel, size and end) is over
/// `frame_max`. idem keeps to the stricter rule.
const FRAME_OVERHEAD: usize = 22;

/// How much of the error text is kept, at least, before producer headers are dropped: enough to
/// say what went wrong.
pub(crate) const ERROR_FLOOR: usize = 256;

/// Longest list of dropped names kept in [`DROPPED_HEADERS`]; the byte count stays whole.
const MAX_DROPPED_NAMES: usize = 1024;

/// Marks a list of dropped names cut at [`MAX_DROPPED_NAMES`].
const CUT: &str = " …";

/// The size in bytes of the content-header frame that carries `properties`.
pub(crate) fn header_frame_size(properties: &BasicProperties) -> usize {
    let short = |text: Option<&ShortString>| text.map_or(0, |text| 1 + text.as_str().len());
    FRAME_OVERHEAD
        + short(properties.content_type().as_ref())
        + short(properties.content_encoding().as_ref())
        + properties.headers().as_ref().map_or(0, table_size)
        + properties.delivery_mode().map_or(0, |_| 1)
        + properties.priority().map_or(0, |_| 1)
        + short(properties.correlation_id().as_ref())
        + short(properties.reply_to().as_ref())
        + short(properties.expiration().as_ref())
        + short(properties.message_id().as_ref())
        + properties.timestamp().map_or(0, |_| 8)
        + short(properties.kind().as_ref())
        + short(properties.user_id().as_ref())
        + short(properties.app_id().as_ref())
        + short(properties.cluster_id().as_ref())
}

/// Encoded size of a field table: its 4-byte length, then each entry.
pub(crate) fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| entry_size(name.as_str(), value))
        .sum::<usize>()
}

/// Encoded size of one table entry: the name as a short string, the type tag, the value.
fn entry_size(name: &str, value: &AMQPValue) -> usize {
    1 + name.len() + 1 + value_size(value)
}

/// Encoded size of a long-string entry whose text is `len` bytes.
fn long_string_entry_size(name: &str, len: usize) -> usize {
    1 + name.len() + 1 + 4 + len
}

/// Encoded size of a value, without its type tag.
fn value_size(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(text) => 1 + text.as_str().len(),
        AMQPValue::LongString(text) => 4 + text.len(),
        AMQPValue::ByteArray(bytes) => 4 + bytes.len(),
        AMQPValue::FieldArray(values) => {
            4 + values
                .as_slice()
                .iter()
                .map(|value| 1 + value_size(value))
                .sum::<usize>()
        }
        AMQPValue::FieldTable(table) => table_size(table),
    }
}

/// A copy's headers, made to fit.
#[derive(Debug)]
pub(crate) struct Fitted {
    /// idem's headers and the producer's that were kept.
    pub headers: FieldTable,
    /// The producer's headers left out (largest first) and the bytes each took.
    pub dropped: Vec<(String, usize)>,
}

/// Even idem's bookkeeping alone does not fit: the frame is `needed` bytes at least.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DoesNotFit {
    pub needed: usize,
}

/// The headers of a copy of a message with `properties` (the producer's headers still in them)
/// plus `written` (idem's), in a frame of at most `limit` bytes: all of them when they fit;
/// otherwise the error text cut (to [`ERROR_FLOOR`] at first), and the producer's headers
/// dropped largest first (ties by name) until it fits, recorded in [`DROPPED_HEADERS`]. Once
/// enough is dropped the error gets the room left. Each header is dropped at most once: this
/// always ends.
pub(crate) fn fit(
    properties: &BasicProperties,
    written: Written<'_>,
    limit: usize,
) -> Result<Fitted, DoesNotFit> {
    let none = FieldTable::default();
    let original = properties.headers().as_ref().unwrap_or(&none);
    // Every property but the headers table, the table's length, idem's bookkeeping.
    let fixed = header_frame_size(properties) - properties.headers().as_ref().map_or(0, table_size)
        + 4
        + written
            .bookkeeping
            .iter()
            .map(|(name, value)| entry_size(name.as_str(), value))
            .sum::<usize>();
    let mut record = Record::carried(original.inner().get(DROPPED_HEADERS));
    // The producer's headers, largest first: the order they are dropped in.
    let mut producer: Vec<(usize, &ShortString, &AMQPValue)> = original
        .inner()
        .iter()
        .filter(|(name, _)| !written.rewrites(name.as_str()))
        .map(|(name, value)| (entry_size(name.as_str(), value), name, value))
        .collect();
    producer.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let mut kept_size: usize = producer.iter().map(|(size, ..)| size).sum();
    let floor = long_string_entry_size(ERROR, written.error.len().min(ERROR_FLOOR));
    let mut dropped = 0;
    while fixed + kept_size + record.entry_size() + floor > limit && dropped < producer.len() {
        let (size, name, _) = producer[dropped];
        record.add(name.as_str(), size);
        kept_size -= size;
        dropped += 1;
    }
    let used = fixed + kept_size + record.entry_size();
    let needed = used + long_string_entry_size(ERROR, 0);
    let Some(room) = limit.checked_sub(needed) else {
        return Err(DoesNotFit { needed });
    };
    let mut table: BTreeMap<ShortString, AMQPValue> = written.bookkeeping;
    for (_, name, value) in &producer[dropped..] {
        table.insert((*name).clone(), (*value).clone());
    }
    let error = headers::truncate(written.error, room);
    table.insert(ERROR.into(), headers::long_string(error));
    if let Some(text) = record.render() {
        table.insert(DROPPED_HEADERS.into(), headers::long_string(&text));
    }
    Ok(Fitted {
        headers: table.into(),
        dropped: producer[..dropped]
            .iter()
            .map(|(size, name, _)| (name.to_string(), *size))
            .collect(),
    })
}

/// The [`DROPPED_HEADERS`] value being built: `"<bytes> bytes: <names>"`, the drops an earlier
/// copy of the message recorded (a retry's) first.
struct Record {
    bytes: u64,
    names: String,
}

impl Record {
    /// Starts from the record the message carries, if any. One that does not parse (a
    /// producer's own) is kept as names.
    fn carried(value: Option<&AMQPValue>) -> Self {
        let text = match value {
            Some(AMQPValue::LongString(text)) => text.to_string(),
            Some(AMQPValue::ShortString(text)) => text.to_string(),
            _ => String::new(),
        };
        match text
            .split_once(" bytes: ")
            .map(|(n, names)| (n.parse(), names))
        {
            Some((Ok(bytes), names)) => Self {
                bytes,
                names: names.to_owned(),
            },
            _ => Self {
                bytes: 0,
                names: text,
            },
        }
    }

    fn add(&mut self, name: &str, size: usize) {
        if !self.names.is_empty() {
            self.names.push_str(", ");
        }
        self.names.push_str(name);
        self.bytes = self.bytes.saturating_add(size as u64);
    }

    /// The names as written: cut at [`MAX_DROPPED_NAMES`].
    fn shown_names(&self) -> (&str, &str) {
        if self.names.len() <= MAX_DROPPED_NAMES {
            (&self.names, "")
        } else {
            (headers::truncate(&self.names, MAX_DROPPED_NAMES), CUT)
        }
    }

    /// The header's text, or `None` when nothing was ever dropped.
    fn render(&self) -> Option<String> {
        if self.names.is_empty() {
            return None;
        }
        let (names, cut) = self.shown_names();
        Some(format!("{} bytes: {names}{cut}", self.bytes))
    }

    /// The header entry's encoded size (0 when there is nothing to record), computed without
    /// rendering it: [`fit`] asks after every drop.
    fn entry_size(&self) -> usize {
        if self.names.is_empty() {
            return 0;
        }
        let (names, cut) = self.shown_names();
        let digits = self
            .bytes
            .checked_ilog10()
            .map_or(1, |log| log as usize + 1);
        let len = digits + " bytes: ".len() + names.len() + cut.len();
        long_string_entry_size(DROPPED_HEADERS, len)
    }
}

#[cfg(test)]
mod tests;
