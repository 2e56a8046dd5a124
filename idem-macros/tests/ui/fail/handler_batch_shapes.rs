use idem::{BatchTx, Postgres, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

// A batch handler with the one-message handle: it cannot say whose message it publishes.
#[idem::handler(consumer = "payments", batch)]
async fn batch_with_tx(_tx: &mut Tx<'_, Postgres>, _msgs: Vec<Payment>) -> Result<(), sqlx::Error> {
    Ok(())
}

// A batch handler given one message.
#[idem::handler(consumer = "payments", batch)]
async fn batch_of_one(_tx: &mut BatchTx<'_, Postgres>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

// A batch handler borrowing a slice.
#[idem::handler(consumer = "payments", batch)]
async fn batch_slice(_tx: &mut BatchTx<'_, Postgres>, _msgs: &[Payment]) -> Result<(), sqlx::Error> {
    Ok(())
}

// The batch handle without `batch`.
#[idem::handler(consumer = "payments")]
async fn forgot_batch(_tx: &mut BatchTx<'_, Postgres>, _msgs: Vec<Payment>) -> Result<(), sqlx::Error> {
    Ok(())
}

// A Vec of messages without `batch`.
#[idem::handler(consumer = "payments")]
async fn vec_without_batch(_tx: &mut Tx<'_, Postgres>, _msgs: Vec<Payment>) -> Result<(), sqlx::Error> {
    Ok(())
}

// `batch` with a value.
#[idem::handler(consumer = "payments", batch = true)]
async fn batch_true(_tx: &mut BatchTx<'_, Postgres>, _msgs: Vec<Payment>) -> Result<(), sqlx::Error> {
    Ok(())
}

fn main() {}
