use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
async fn only_message(_msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

#[idem::handler(consumer = "payments")]
async fn too_many(_tx: &mut Tx<'_, Postgres>, _msg: Payment, _extra: u32) -> Result<(), sqlx::Error> {
    Ok(())
}

fn main() {}
