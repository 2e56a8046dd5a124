//! A consumed message that is `Serialize` is publishable already: deriving `Publish` as well is
//! refused.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message, idem::Publish)]
#[idem(kind = "payment.captured")]
struct PaymentCaptured {
    payment_id: uuid::Uuid,
}

fn main() {}
