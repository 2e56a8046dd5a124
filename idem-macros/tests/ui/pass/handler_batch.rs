//! A batch handler on SQLite, run through group commit's unit of work on an in-memory database:
//! the claimed deposits in one call; a poison deposit among them found by splitting and
//! rejected alone; what each deposit announces published under its own key's ids.
#![deny(warnings)]

use idem::sqlx;
use idem::transport::{process_group, Delivery, Outcome, Policy};
use idem::{Backend, BatchTx, HandlerError, Metadata, Reason, Sqlite};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Deposit {
    #[idem(key)]
    deposit_id: i64,
    cents: i64,
}

#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "deposit.recorded")]
struct Recorded {
    deposit_id: i64,
}

#[idem::handler(consumer = "deposits", batch)]
async fn deposit(tx: &mut BatchTx<'_, Sqlite>, deposits: Vec<Deposit>) -> Result<(), HandlerError> {
    let total: i64 = deposits.iter().map(|d| d.cents).sum();
    sqlx::query("UPDATE balance SET cents = cents + ?").bind(total).execute(tx.conn()).await?;
    for (i, d) in deposits.iter().enumerate() {
        tx.publish_for(i, &Recorded { deposit_id: d.deposit_id }).await?;
    }
    if let Some(bad) = deposits.iter().find(|d| d.cents < 0) {
        return Err(HandlerError::permanent(format!("deposit {} is negative", bad.deposit_id)));
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let pool = Sqlite::connect("sqlite::memory:", 1).await.unwrap();
    Sqlite::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE balance (cents INTEGER NOT NULL)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO balance VALUES (0)").execute(&pool).await.unwrap();

    let bodies: Vec<Vec<u8>> = (1..=8)
        .map(|n| format!(r#"{{"deposit_id":{n},"cents":{}}}"#, if n == 6 { -1 } else { 10 }).into_bytes())
        .collect();
    let metadata = Metadata::default();
    let deliveries: Vec<Delivery<'_>> = bodies
        .iter()
        .map(|body| Delivery { body, metadata: &metadata, tries_in_place: 0, blame_if_unavailable: false })
        .collect();
    let processed = process_group(&pool, &deposit, &deliveries, &Policy::default(), None).await;
    for (n, p) in processed.iter().enumerate() {
        if n == 5 {
            match &p.outcome {
                Outcome::DeadLetter { reason: Reason::Rejected, error } => assert_eq!(error, "deposit 6 is negative"),
                other => panic!("the negative deposit: {other:?}"),
            }
        } else {
            assert_eq!(p.outcome, Outcome::Applied, "deposit {}", n + 1);
        }
    }
    let cents: i64 = sqlx::query_scalar("SELECT cents FROM balance").fetch_one(&pool).await.unwrap();
    assert_eq!(cents, 70, "seven deposits applied once; the negative one rolled back");
    let announced: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idem_outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(announced, 7);
}
