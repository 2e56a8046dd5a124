//! A consumed message is publishable once it is `Serialize`; without it, publishing says so.
use idem::outbox::Outgoing;

#[derive(Debug, serde::Deserialize, idem::Message)]
#[idem(kind = "payment.captured")]
struct PaymentCaptured {
    #[idem(key)]
    payment_id: uuid::Uuid,
}

fn main() {
    let id = uuid::Uuid::new_v4();
    let _ = Outgoing::json(&PaymentCaptured { payment_id: id }, id);
}
