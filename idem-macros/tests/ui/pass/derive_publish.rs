//! A type that is only published needs `Serialize` and a kind: no `Deserialize`, no key. It may
//! borrow and be generic. A type both consumed and published derives both, under one kind.
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

/// Shared by a publisher and a consumer: both derives, one kind, the key is `Message`'s.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message, idem::Publish)]
#[idem(kind = "payment.captured")]
struct PaymentCaptured {
    #[idem(key)]
    payment_id: uuid::Uuid,
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
}
