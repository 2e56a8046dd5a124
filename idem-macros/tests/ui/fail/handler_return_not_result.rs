use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
async fn unit(_tx: &mut Tx<'_, Postgres>, _msg: Payment) {}

#[idem::handler(consumer = "payments")]
async fn boolean(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> bool {
    true
}

fn main() {}
