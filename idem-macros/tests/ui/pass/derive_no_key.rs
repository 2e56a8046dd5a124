//! Without a key field the transport's message id is the key: `key()` is `Ok(None)`.
#![deny(warnings)]

use idem::{DecodeErrorKind, Message};

#[derive(Debug, serde::Deserialize, idem::Message)]
#[idem(kind = "audit.event")]
struct AuditEvent {
    text: String,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Empty {}

fn main() {
    assert_eq!(AuditEvent::KIND, "audit.event");
    let event = AuditEvent::decode(br#"{"text":"hi"}"#).unwrap();
    assert_eq!(event.text, "hi");
    assert_eq!(event.key(), Ok(None));
    assert_eq!(AuditEvent::decode(b"").unwrap_err().kind, DecodeErrorKind::Malformed);
    assert_eq!(AuditEvent::decode(br#"{}"#).unwrap_err().kind, DecodeErrorKind::Malformed);
    assert_eq!(Empty::decode(b"{}").unwrap().key(), Ok(None));
}
