//! Messages: how a delivery's bytes become a typed value with an idempotency key.

pub use crate::fingerprint::{json_message_fingerprint, JsonSpelling};
use crate::key::{Key, KeyError};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// A message a handler consumes.
///
/// Usually derived: `#[derive(serde::Deserialize, idem::Message)]` decodes the body as JSON and
/// takes the key from the field marked `#[idem(key)]` (or, without one, from the AMQP
/// `message_id`). Implement it by hand for another encoding.
///
/// What a handler publishes needs [`Publish`] instead: serialize and a kind, no key. A derived
/// `Message` that is also `serde::Serialize` is publishable as it is.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idem message",
    label = "a handler's second argument must be a message type",
    note = "add #[derive(serde::Deserialize, idem::Message)] to `{Self}`, or implement idem::Message for it"
)]
pub trait Message: Sized + Send + 'static {
    /// The message kind, as it appears in logs and dead-letter headers.
    const KIND: &'static str;

    /// Decodes a delivery body. Errors are dead-lettered at once: redelivering bytes that do not
    /// decode cannot make them decode.
    fn decode(body: &[u8]) -> Result<Self, DecodeError>;

    /// The idempotency key carried in the message itself, or `Ok(None)` to use the transport's
    /// message id.
    fn key(&self) -> Result<Option<Key>, KeyError>;

    /// What the ledger remembers of a message to tell a duplicate (same key, same payload: a
    /// silent no-op) from a key conflict (same key, different payload: dead-lettered). Called
    /// after [`Message::decode`] and [`Message::key`] succeeded, with the body and the key in
    /// its normal form.
    ///
    /// The default hashes the bytes. `#[derive(Message)]` uses [`json_message_fingerprint`]:
    /// the payload as the message type reads it. The same JSON value is the same payload,
    /// whatever its key order, whitespace, escapes or spelling of numbers (`1`, `1.0`,
    /// `10e-1`); numbers are compared exactly (`18446744073709551616` is not
    /// `18446744073709551617`); the key counts in its normal form (an uppercase, braced or
    /// `urn:uuid:` UUID is the same key, so the same payload) and a field under a serde
    /// `alias` under its name.
    fn fingerprint(body: &[u8], key: &Key) -> [u8; 32] {
        let _ = key;
        Sha256::digest(body).into()
    }
}

/// A message type that can be published through the outbox ([`Tx::publish`](crate::Tx::publish),
/// [`Outgoing::json`](crate::outbox::Outgoing::json)): a JSON body (`serde::Serialize`) and a
/// kind, sent as the AMQP `type`.
///
/// Publishing needs less than consuming: no `Deserialize`, no idempotency key (the outbox gives
/// every message its own deterministic message id, which the next consumer dedups on). So a type
/// this service only publishes derives `serde::Serialize, idem::Publish` with
/// `#[idem(kind = "inventory.reserved")]`, or implements this by hand, which is one constant:
///
/// ```
/// #[derive(serde::Serialize)]
/// struct InventoryReserved<'a> {
///     order_id: uuid::Uuid,
///     sku: &'a str, // a published type may borrow: it is only serialized
///     quantity: u32,
/// }
///
/// impl idem_core::Publish for InventoryReserved<'_> {
///     const KIND: &'static str = "inventory.reserved";
/// }
/// ```
///
/// A type that derives `idem::Message` and `serde::Serialize` is publishable already, under
/// the kind its consumers expect: a contract shared by the publishing and the consuming service
/// derives `serde::Serialize, serde::Deserialize, idem::Message` (not `idem::Publish` too: the
/// two would conflict). A hand-written [`Message`] implements this by hand to be published.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be published: idem does not know its message kind",
    label = "a published message must implement idem::Publish",
    note = "add #[derive(serde::Serialize, idem::Publish)] and #[idem(kind = \"...\")] to `{Self}` (a type that derives idem::Message needs only serde::Serialize), or implement idem::Publish for it: one `const KIND`"
)]
pub trait Publish: serde::Serialize {
    /// The message kind: the AMQP `type` the relay sends it with (a consumer refuses a message
    /// of another kind), and the queue [`Tx::publish`](crate::Tx::publish) routes it to.
    const KIND: &'static str;
}

/// The kind the derives give a type: `#[derive(Message)]` and `#[derive(Publish)]` implement
/// this, and a `serde::Serialize` type with it is [`Publish`]. Not an API: implement
/// [`Publish`] by hand instead.
///
/// Why not `impl<M: Message + Serialize> Publish for M`: publishing a type that is neither
/// would then fail on `M: Message`, and rustc would show `Message`'s advice (derive
/// `Deserialize` and `Message`) for a type that is only published. This trait fails instead,
/// with the advice for publishing.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be published: idem does not know its message kind",
    label = "a published message must implement idem::Publish",
    note = "add #[derive(serde::Serialize, idem::Publish)] and #[idem(kind = \"...\")] to `{Self}` (a type that derives idem::Message needs only serde::Serialize), or implement idem::Publish for it: one `const KIND`"
)]
pub trait MessageKind {
    /// The `#[idem(kind = "...")]` of the type, or its name.
    const KIND: &'static str;
}

impl<M: MessageKind + serde::Serialize> Publish for M {
    const KIND: &'static str = <M as MessageKind>::KIND;
}

/// Why a body did not become a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct DecodeError {
    /// Which class of bad input this is; it becomes the dead letter's reason.
    pub kind: DecodeErrorKind,
    /// What exactly was wrong, for the dead letter's error text.
    pub detail: String,
}

/// The classes of undecodable input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The body is not a valid message (encoding, shape, types, values).
    Malformed,
    /// The body is otherwise readable, but its idempotency key is absent, null or not a valid key.
    MissingKey,
}

impl std::fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed",
            Self::MissingKey => "missing-key",
        })
    }
}

impl DecodeError {
    /// A malformed body.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self {
            kind: DecodeErrorKind::Malformed,
            detail: detail.into(),
        }
    }

    /// A body without a usable key.
    pub fn missing_key(detail: impl Into<String>) -> Self {
        Self {
            kind: DecodeErrorKind::MissingKey,
            detail: detail.into(),
        }
    }
}

/// Where a JSON message keeps its idempotency key; generated by `#[derive(Message)]`.
#[derive(Debug, Clone, Copy)]
pub struct JsonKeyField {
    /// The JSON field name.
    pub name: &'static str,
    /// Whether a JSON value would deserialize as the key field's type.
    pub parses: fn(&serde_json::Value) -> bool,
}

/// Whether `value` deserializes as `F`: the `parses` check of a [`JsonKeyField`].
pub fn json_value_parses_as<F: DeserializeOwned>(value: &serde_json::Value) -> bool {
    F::deserialize(value).is_ok()
}

/// The deepest JSON nesting of arrays and objects a message may have.
pub const MAX_JSON_DEPTH: usize = 64;

/// `Some(depth)` once the nesting of `[`/`{` outside strings passes `limit`.
fn nesting_over(body: &[u8], limit: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Decodes a JSON body into `T`; what `#[derive(Message)]` calls.
///
/// When decoding fails, the body is looked at once more (only on this error path) so that a
/// missing, null or mistyped key is reported as [`DecodeErrorKind::MissingKey`] rather than as a
/// generic shape error: the two go to the dead-letter queue with different reasons.
pub fn decode_json<T: DeserializeOwned>(
    body: &[u8],
    key: Option<JsonKeyField>,
) -> Result<T, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::malformed(
            "the body is empty; expected a JSON object",
        ));
    }
    // JSON is UTF-8 (RFC 8259 §8.1); serde_json checks only the strings it keeps, so invalid
    // bytes in a field the message ignores would otherwise pass.
    if let Err(error) = std::str::from_utf8(body) {
        return Err(DecodeError::malformed(format!(
            "the body is not valid UTF-8 (at byte {}), so it cannot be JSON",
            error.valid_up_to()
        )));
    }
    // serde accepts a struct written as a JSON array (`["…", "acct", 100]`): a message is an
    // object with named fields, and anything else is malformed, for every message type.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(DecodeError::malformed(
            "the body is not a JSON object; a message is an object with named fields",
        ));
    }
    // serde_json skips unknown fields without a depth limit; a message nested this deep is an
    // attack or a bug, not a payment.
    if let Some(depth) = nesting_over(body, MAX_JSON_DEPTH) {
        return Err(DecodeError::malformed(format!(
            "the JSON is nested more than {MAX_JSON_DEPTH} levels deep (at least {depth})"
        )));
    }
    let error = match serde_json::from_slice::<T>(body) {
        Ok(message) => return Ok(message),
        Err(error) => error,
    };
    if let (Some(key), Ok(serde_json::Value::Object(object))) =
        (key, serde_json::from_slice::<serde_json::Value>(body))
    {
        let field = key.name;
        match object.get(field) {
            None => {
                return Err(DecodeError::missing_key(format!(
                    "the key field `{field}` is absent"
                )))
            }
            Some(serde_json::Value::Null) => {
                return Err(DecodeError::missing_key(format!(
                    "the key field `{field}` is null"
                )))
            }
            Some(value) if !(key.parses)(value) => {
                return Err(DecodeError::missing_key(format!(
                    "the key field `{field}` is not valid: {error}"
                )))
            }
            Some(_) => {}
        }
    }
    Err(DecodeError::malformed(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Payment {
        #[allow(dead_code)]
        payment_id: uuid::Uuid,
        #[allow(dead_code)]
        amount_cents: i64,
    }

    const KEY: Option<JsonKeyField> = Some(JsonKeyField {
        name: "payment_id",
        parses: json_value_parses_as::<uuid::Uuid>,
    });

    fn kind(body: &str) -> Option<DecodeErrorKind> {
        decode_json::<Payment>(body.as_bytes(), KEY)
            .err()
            .map(|e| e.kind)
    }

    /// A derived struct refuses a repeated field of its own, so such a body is malformed before
    /// any fingerprint; a repeated key it ignores, or one in a map, counts with its last value,
    /// as in the fingerprint.
    #[test]
    fn a_body_that_is_not_a_json_object_is_malformed() {
        #[derive(Debug, serde::Deserialize)]
        struct Payment {
            #[allow(dead_code)]
            id: String,
            #[allow(dead_code)]
            amount: i64,
        }
        // serde would take the array as the struct's fields in order.
        for body in [
            &br#"["p-1", 100]"#[..],
            b"42",
            b"\"p-1\"",
            b"null",
            b" \n [1]",
        ] {
            let error = decode_json::<Payment>(body, None).unwrap_err();
            assert_eq!(error.kind, DecodeErrorKind::Malformed);
            assert!(error.detail.contains("not a JSON object"), "{error}");
        }
        assert!(decode_json::<Payment>(b" {\"id\":\"p-1\",\"amount\":1}", None).is_ok());
    }

    #[test]
    fn a_repeated_field_is_malformed_and_a_repeated_unknown_key_is_not() {
        let id = "7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11";
        assert_eq!(
            kind(&format!(
                r#"{{"payment_id":"{id}","amount_cents":5,"amount_cents":6}}"#
            )),
            Some(DecodeErrorKind::Malformed)
        );
        assert_eq!(
            kind(&format!(
                r#"{{"payment_id":"{id}","amount_cents":5,"note":1,"note":2}}"#
            )),
            None
        );
    }

    #[test]
    fn classifies_bad_bodies() {
        let id = "7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11";
        assert_eq!(
            kind(&format!(r#"{{"payment_id":"{id}","amount_cents":5}}"#)),
            None
        );
        assert_eq!(kind(""), Some(DecodeErrorKind::Malformed));
        assert_eq!(kind("not json"), Some(DecodeErrorKind::Malformed));
        assert_eq!(
            kind(r#"{"amount_cents":5}"#),
            Some(DecodeErrorKind::MissingKey)
        );
        assert_eq!(
            kind(r#"{"payment_id":null,"amount_cents":5}"#),
            Some(DecodeErrorKind::MissingKey)
        );
        assert_eq!(
            kind(r#"{"payment_id":"nope","amount_cents":5}"#),
            Some(DecodeErrorKind::MissingKey)
        );
        assert_eq!(
            kind(&format!(r#"{{"payment_id":"{id}","amount_cents":"5"}}"#)),
            Some(DecodeErrorKind::Malformed)
        );
        let deep = format!(
            r#"{{"payment_id":"{id}","amount_cents":5,"x":{}{}}}"#,
            "[".repeat(65),
            "]".repeat(65)
        );
        assert_eq!(kind(&deep), Some(DecodeErrorKind::Malformed));
        let brackets_in_strings = format!(
            r#"{{"payment_id":"{id}","amount_cents":5,"note":"{}\\\"{}"}}"#,
            "[".repeat(100),
            "{".repeat(100)
        );
        assert_eq!(kind(&brackets_in_strings), None);
        let invalid_utf8 = decode_json::<Payment>(&[0x7b, 0xff, 0xfe], KEY)
            .err()
            .map(|e| e.kind);
        assert_eq!(invalid_utf8, Some(DecodeErrorKind::Malformed));
        // serde_json checks UTF-8 only in the strings it keeps; JSON is UTF-8 throughout.
        let mut ignored =
            format!(r#"{{"payment_id":"{id}","amount_cents":5,"note":"x"}}"#).into_bytes();
        let x = ignored.len() - 3;
        ignored[x] = 0xff;
        let error = decode_json::<Payment>(&ignored, KEY).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::Malformed);
        assert!(error.detail.contains("not valid UTF-8 (at byte"), "{error}");
    }
}
