#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    payment_id: uuid::Uuid,
    #[idem(key)]
    order_id: String,
}

fn main() {}
