//! A type that is only published needs `Serialize` and a kind: no `Deserialize`, no key. It may
//! borrow and be generic. A derived `Message` that is `Serialize` is publishable under its kind;
//! a hand-written one implements `Publish` by hand.
#![deny(warnings)]

use idem::outbox::{Outgoing, Route};
use idem::{Message, Publish};

#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "inventory.reserved")]
struct InventoryReserved<'a> {
    order_id: uuid::Uuid,
    sku: &'a str,
    quantity: u32,
}

#[derive(serde::Serialize, idem::Publish)]
struct StockLow {
    sku: String,
}

/// Publishable for the parameters that make it `Serialize`.
#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "audit.recorded")]
struct Audited<T> {
    entry: T,
}

/// Shared by a publisher and a consumer: `Message` + `Serialize` is publishable as it is.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
#[idem(kind = "payment.captured")]
struct PaymentCaptured {
    #[idem(key)]
    payment_id: uuid::Uuid,
}

/// A hand-written message, published through a hand-written `Publish`.
#[derive(serde::Serialize)]
struct Ping {
    id: String,
}

impl Message for Ping {
    const KIND: &'static str = "ping";
    fn decode(_: &[u8]) -> Result<Self, idem::DecodeError> {
        Ok(Ping { id: String::new() })
    }
    fn key(&self) -> Result<Option<idem::Key>, idem::KeyError> {
        Ok(None)
    }
}

impl Publish for Ping {
    const KIND: &'static str = <Ping as Message>::KIND;
}

fn kind_of<M: Publish>(_: &M) -> &'static str {
    M::KIND
}

fn main() {
    let id = uuid::Uuid::new_v4();
    let sku = String::from("sku-1");
    let reserved = InventoryReserved { order_id: id, sku: &sku, quantity: 2 };
    let outgoing = Outgoing::json(&reserved, id).unwrap();
    assert_eq!(outgoing.kind, "inventory.reserved");
    assert_eq!(outgoing.route, Route::queue("inventory.reserved"));
    let body: serde_json::Value = serde_json::from_slice(&outgoing.body).unwrap();
    assert_eq!(body["sku"], "sku-1");

    assert_eq!(kind_of(&StockLow { sku: "s".into() }), "StockLow");
    assert_eq!(kind_of(&Audited { entry: 7 }), "audit.recorded");

    let captured = PaymentCaptured { payment_id: id };
    assert_eq!(kind_of(&captured), <PaymentCaptured as Message>::KIND);
    assert_eq!(captured.key().unwrap().unwrap().as_str(), id.to_string());
    assert_eq!(Outgoing::json(&captured, id).unwrap().kind, "payment.captured");
    assert_eq!(kind_of(&Ping { id: "p".into() }), "ping");
}
