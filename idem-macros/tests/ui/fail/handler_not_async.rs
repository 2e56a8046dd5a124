use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
fn capture(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

fn main() {}
