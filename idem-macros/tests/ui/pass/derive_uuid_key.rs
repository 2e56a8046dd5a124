//! A Uuid key: decoded from the body, rendered hyphenated.
#![deny(warnings, missing_docs, unused_qualifications)]

use idem::{DecodeErrorKind, Key, Message};
use uuid::Uuid;

/// A payment to capture.
#[derive(Debug, serde::Deserialize, idem::Message)]
pub struct PaymentRequested {
    /// The key.
    #[idem(key)]
    pub payment_id: Uuid,
    /// The amount.
    pub amount_cents: i64,
}

fn main() {
    assert_eq!(PaymentRequested::KIND, "PaymentRequested");
    let body = br#"{"payment_id":"7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11","amount_cents":5}"#;
    let message = PaymentRequested::decode(body).unwrap();
    assert_eq!(message.amount_cents, 5);
    assert_eq!(message.key().unwrap(), Some(Key::new("7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11").unwrap()));

    let missing = PaymentRequested::decode(br#"{"amount_cents":5}"#).unwrap_err();
    assert_eq!(missing.kind, DecodeErrorKind::MissingKey);
    let not_a_uuid = PaymentRequested::decode(br#"{"payment_id":"nope","amount_cents":5}"#).unwrap_err();
    assert_eq!(not_a_uuid.kind, DecodeErrorKind::MissingKey);
    let bad_amount =
        PaymentRequested::decode(br#"{"payment_id":"7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11","amount_cents":"5"}"#);
    assert_eq!(bad_amount.unwrap_err().kind, DecodeErrorKind::Malformed);
}
