use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
async fn generic<DB: idem::Backend>(_tx: &mut Tx<'_, DB>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

#[idem::handler(consumer = "payments")]
async fn by_reference(_tx: &mut Tx<'_, Postgres>, msg: &Payment) -> Result<(), sqlx::Error> {
    let _ = msg;
    Ok(())
}

#[idem::handler(consumer = "payments")]
async fn owned_tx(_tx: Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

#[idem::handler(consumer = "payments")]
struct NotAFunction;

fn main() {}
