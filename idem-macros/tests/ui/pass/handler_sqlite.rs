//! A handler on SQLite, run through idem's unit of work on an in-memory database: applied once,
//! then a duplicate; a handler error rolls back and is retried, then dead-lettered with its text.
#![deny(warnings)]

use idem::sqlx;
use idem::transport::{process, Delivery, Outcome, Policy};
use idem::{Backend, Metadata, Reason, RetryPolicy, Sqlite, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Deposit {
    #[idem(key)]
    deposit_id: i64,
    cents: i64,
}

#[idem::handler(consumer = "deposits")]
async fn deposit(tx: &mut Tx<'_, Sqlite>, msg: Deposit) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE balance SET cents = cents + ?").bind(msg.cents).execute(tx.conn()).await?;
    Ok(())
}

#[idem::handler(consumer = "deposits-refused")]
async fn refuse(tx: &mut Tx<'_, Sqlite>, msg: Deposit) -> Result<(), String> {
    sqlx::query("UPDATE balance SET cents = cents + ?")
        .bind(msg.cents)
        .execute(tx.conn())
        .await
        .map_err(|error| error.to_string())?;
    Err(format!("deposit {} refused", tx.key()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let pool = Sqlite::connect("sqlite::memory:", 1).await.unwrap();
    Sqlite::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE balance (cents INTEGER NOT NULL)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO balance VALUES (0)").execute(&pool).await.unwrap();

    let metadata = Metadata::default();
    let delivery = Delivery { body: br#"{"deposit_id":1,"cents":5}"#, metadata: &metadata, tries_in_place: 0, blame_if_unavailable: false };
    let policy = Policy::default();
    assert_eq!(process(&pool, &deposit, delivery, &policy).await.outcome, Outcome::Applied);
    assert_eq!(process(&pool, &deposit, delivery, &policy).await.outcome, Outcome::Duplicate);
    // An error that does not say its class is retried...
    match process(&pool, &refuse, delivery, &policy).await.outcome {
        Outcome::Retry { attempts: 1, error, .. } => assert_eq!(error, "deposit 1 refused"),
        other => panic!("expected a retry, got {other:?}"),
    }
    // ...until the policy's attempts are used up.
    let mut once = Policy::default();
    once.retry = RetryPolicy::no_retries();
    match process(&pool, &refuse, delivery, &once).await.outcome {
        Outcome::DeadLetter { reason: Reason::RetriesExhausted, error } => {
            assert_eq!(error, "attempt 1 of 1: deposit 1 refused")
        }
        other => panic!("expected a dead letter, got {other:?}"),
    }
    let cents: i64 = sqlx::query_scalar("SELECT cents FROM balance").fetch_one(&pool).await.unwrap();
    assert_eq!(cents, 5, "applied once; the refused handler's write was rolled back");
}
