use idem::{Postgres, Tx};

#[derive(Debug, serde::Deserialize)]
struct Plain {
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
async fn capture(_tx: &mut Tx<'_, Postgres>, msg: Plain) -> Result<(), sqlx::Error> {
    let _ = msg.id;
    Ok(())
}

fn main() {}
