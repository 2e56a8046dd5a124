//! The key's JSON name follows `#[serde(rename)]` and `#[serde(rename_all)]`.
#![deny(warnings)]

use idem::{DecodeErrorKind, Key, Message};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct OrderPlaced {
    #[serde(rename = "orderRef")]
    #[idem(key)]
    order_ref: String,
    #[serde(default)]
    note: String,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
#[serde(rename_all = "camelCase")]
#[idem(kind = "refunds.requested")]
struct RefundRequested {
    #[idem(key)]
    refund_id: String,
    #[serde(rename(deserialize = "amt"))]
    amount_cents: i64,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Raw {
    #[idem(key)]
    r#type: String,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
#[serde(rename_all = "UPPERCASE")]
struct Directional {
    #[idem(key)]
    #[serde(rename(serialize = "out", deserialize = "in"), alias = "other")]
    id: String,
}

fn main() {
    let order = OrderPlaced::decode(br#"{"orderRef":"o-1"}"#).unwrap();
    assert_eq!(order.key().unwrap(), Some(Key::new("o-1").unwrap()));
    assert!(order.note.is_empty());
    // The key is looked up under its JSON name: absent, null and mistyped are all `missing-key`.
    for body in [&br#"{"order_ref":"o-1"}"#[..], br#"{"orderRef":null}"#, br#"{"orderRef":7}"#] {
        assert_eq!(OrderPlaced::decode(body).unwrap_err().kind, DecodeErrorKind::MissingKey);
    }
    // An empty string decodes but is no key.
    assert!(OrderPlaced::decode(br#"{"orderRef":""}"#).unwrap().key().is_err());

    assert_eq!(RefundRequested::KIND, "refunds.requested");
    let refund = RefundRequested::decode(br#"{"refundId":"r-1","amt":3}"#).unwrap();
    assert_eq!((refund.refund_id.as_str(), refund.amount_cents), ("r-1", 3));
    let missing = RefundRequested::decode(br#"{"refund_id":"r-1","amt":3}"#).unwrap_err();
    assert_eq!(missing.kind, DecodeErrorKind::MissingKey);

    // serde strips `r#` from raw identifiers, and so does the key lookup.
    assert_eq!(Raw::KIND, "Raw");
    assert_eq!(Raw::decode(br#"{"type":"t"}"#).unwrap().r#type, "t");
    assert_eq!(Raw::decode(br#"{"r#type":"t"}"#).unwrap_err().kind, DecodeErrorKind::MissingKey);

    // A field's own rename wins over rename_all; the deserialize side is what counts.
    assert_eq!(Directional::decode(br#"{"in":"i"}"#).unwrap().id, "i");
    assert_eq!(Directional::decode(br#"{"out":"i"}"#).unwrap_err().kind, DecodeErrorKind::MissingKey);
}
