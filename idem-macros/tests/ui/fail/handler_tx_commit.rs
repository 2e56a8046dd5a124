// The handler cannot end the transaction: idem commits the ledger claim and the effect together.
use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
async fn capture(tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    tx.commit().await?;
    Ok(())
}

fn main() {}
