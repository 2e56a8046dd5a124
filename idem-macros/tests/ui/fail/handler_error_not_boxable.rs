use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[derive(Debug)]
struct NotAnError;

#[idem::handler(consumer = "payments")]
async fn capture(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), NotAnError> {
    Ok(())
}

fn main() {}
