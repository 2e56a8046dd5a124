//! A consumed message is not publishable by itself: publishing needs `idem::Publish` too, and
//! the error says so.
use idem::outbox::Outgoing;

#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
#[idem(kind = "payment.captured")]
struct PaymentCaptured {
    #[idem(key)]
    payment_id: uuid::Uuid,
}

fn main() {
    let id = uuid::Uuid::new_v4();
    let _ = Outgoing::json(&PaymentCaptured { payment_id: id }, id);
}
