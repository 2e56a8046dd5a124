// Handing the handler the pool would let it write outside the transaction (and commit).

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: uuid::Uuid,
}

#[idem::handler(consumer = "payments")]
async fn capture(pool: &sqlx::PgPool, _msg: Payment) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE accounts SET n = n + 1").execute(pool).await?;
    Ok(())
}

#[idem::handler(consumer = "payments")]
async fn shared(_tx: &idem::Tx<'_, idem::Sqlite>, _msg: Payment) -> Result<(), sqlx::Error> {
    Ok(())
}

fn main() {}
