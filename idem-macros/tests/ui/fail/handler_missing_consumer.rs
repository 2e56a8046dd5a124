use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler]
async fn bare(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

#[idem::handler(consumer = "")]
async fn empty(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

#[idem::handler(consumer = "payments", retries = 3)]
async fn unknown_option(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

#[idem::handler(consumer = payments)]
async fn not_a_string(_tx: &mut Tx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

fn main() {}
