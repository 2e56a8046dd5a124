//! Integer keys, plain and optional; a generic message.
#![deny(warnings)]

use idem::{DecodeErrorKind, Key, KeyError, Message};
use serde::de::DeserializeOwned;

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Invoice {
    #[idem(key)]
    invoice_no: i64,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Ticket {
    #[idem(key)]
    ticket: Option<::core::primitive::u64>,
}

/// A generic message: the struct's bounds make it `DeserializeOwned`, and `#[serde(bound = "")]`
/// keeps serde from adding a second, conflicting `T: Deserialize<'de>`.
#[derive(Debug, serde::Deserialize, idem::Message)]
#[serde(bound = "")]
struct Event<T: DeserializeOwned + Send + 'static> {
    #[idem(key)]
    event_id: u128,
    payload: T,
}

fn main() {
    let invoice = Invoice::decode(br#"{"invoice_no":-42}"#).unwrap();
    assert_eq!(invoice.key(), Ok(Some(Key::new("-42").unwrap())));
    assert_eq!(Invoice::decode(br#"{"invoice_no":"42"}"#).unwrap_err().kind, DecodeErrorKind::MissingKey);

    assert_eq!(Ticket::decode(br#"{"ticket":7}"#).unwrap().key(), Ok(Some(Key::new("7").unwrap())));
    // An optional key may be absent from the body; the message then has no key.
    assert_eq!(Ticket::decode(br#"{}"#).unwrap().key(), Err(KeyError::Missing));
    assert_eq!(Ticket::decode(br#"{"ticket":null}"#).unwrap().key(), Err(KeyError::Missing));

    assert_eq!(Event::<Vec<u8>>::KIND, "Event");
    let event = Event::<Vec<u8>>::decode(br#"{"event_id":9,"payload":[1,2]}"#).unwrap();
    assert_eq!((event.key(), event.payload), (Ok(Some(Key::new("9").unwrap())), vec![1, 2]));
}
