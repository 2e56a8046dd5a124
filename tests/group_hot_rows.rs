//! Group commit on hot rows, on real RabbitMQ and PostgreSQL: two consumers, several groups in
//! flight each, every payment crediting one of four accounts. Groups that take the same account
//! rows in different orders deadlock (PostgreSQL breaks each after a second and a group runs
//! again); with `group_lock_order` by account every group takes them in one order. The story
//! counts what PostgreSQL itself counted: no deadlock in the service's database, no retry, no
//! dead letter, every payment applied once and every balance exact.
//!
//! The same with a batch handler doing set-based SQL: its batches lock the account rows in
//! account order (`SELECT … ORDER BY account FOR UPDATE`), the README's rule for batch handlers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::{async_trait, BatchTx, Handler, HandlerError, Postgres, Tx};
use std::time::Duration;
use uuid::Uuid;

/// A payment: a capture row and the account's balance, in the unit of work's transaction.
struct Credit;

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payment {
    #[idem(key)]
    id: Uuid,
    account: String,
    cents: i64,
}

#[async_trait]
impl Handler<Postgres> for Credit {
    type Message = Payment;
    fn consumer(&self) -> &str {
        "hot-payments"
    }
    async fn handle(
        &self,
        tx: &mut Tx<'_, Postgres>,
        payment: Payment,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO hot_captures (id, account, cents) VALUES ($1, $2, $3)")
            .bind(payment.id.to_string())
            .bind(&payment.account)
            .bind(payment.cents)
            .execute(tx.conn())
            .await?;
        sqlx::query("UPDATE hot_accounts SET balance = balance + $2 WHERE account = $1")
            .bind(&payment.account)
            .bind(payment.cents)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// The same effect for a whole batch, set-based, the account rows locked in account order first.
#[idem::handler(consumer = "hot-payments", batch)]
async fn credit_batch(
    tx: &mut BatchTx<'_, Postgres>,
    payments: Vec<Payment>,
) -> Result<(), sqlx::Error> {
    let ids: Vec<String> = payments.iter().map(|p| p.id.to_string()).collect();
    let accounts: Vec<&str> = payments.iter().map(|p| p.account.as_str()).collect();
    let cents: Vec<i64> = payments.iter().map(|p| p.cents).collect();
    sqlx::query("SELECT 1 FROM hot_accounts WHERE account = ANY($1) ORDER BY account FOR UPDATE")
        .bind(&accounts)
        .execute(tx.conn())
        .await?;
    sqlx::query(
        "INSERT INTO hot_captures (id, account, cents) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&cents)
    .execute(tx.conn())
    .await?;
    sqlx::query(
        "UPDATE hot_accounts SET balance = balance + s.cents
           FROM (SELECT account, SUM(cents)::bigint AS cents
                   FROM UNNEST($1::text[], $2::bigint[]) AS p(account, cents) GROUP BY account) s
          WHERE hot_accounts.account = s.account",
    )
    .bind(&accounts)
    .bind(&cents)
    .execute(tx.conn())
    .await?;
    Ok(())
}

const ACCOUNTS: [&str; 4] = ["acct-a", "acct-b", "acct-c", "acct-d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_groups_on_hot_accounts_never_deadlock_and_apply_each_payment_once() {
    hot_accounts("idem_group_hot", || Credit, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_locking_in_account_order_never_deadlock_and_apply_each_payment_once() {
    hot_accounts("idem_batch_hot", || credit_batch, false).await;
}

/// Two consumers of `handler`, several groups in flight each, 600 payments on four accounts.
async fn hot_accounts<H: Handler<Postgres, Message = Payment>>(
    database: &str,
    handler: impl Fn() -> H,
    lock_order: bool,
) {
    let url = fresh_pg_database(database).await;
    let pool = <Postgres as idem::Backend>::connect(&url, 10)
        .await
        .unwrap();
    <Postgres as idem::Backend>::migrate(&pool).await.unwrap();
    for statement in [
        "CREATE TABLE hot_accounts (account TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
        "CREATE TABLE hot_captures (id TEXT PRIMARY KEY, account TEXT NOT NULL, cents BIGINT NOT NULL)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    for account in ACCOUNTS {
        sqlx::query("INSERT INTO hot_accounts VALUES ($1, 0)")
            .bind(account)
            .execute(&pool)
            .await
            .unwrap();
    }
    let connection = connection().await;
    let queue = fresh_queue("group-hot");
    let consumer = || {
        let builder = idem::amqp::Consumer::builder(pool.clone(), handler())
            .queue(&queue)
            .prefetch(100)
            .concurrency(4)
            .group_commit(25, Duration::from_millis(10));
        let builder = if lock_order {
            builder.group_lock_order(|payment: &Payment| payment.account.clone())
        } else {
            builder
        };
        builder.build().unwrap()
    };
    // Published before the consumers start: every group fills up at once, as under a backlog.
    consumer().declare(&connection).await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for n in 0..600_i64 {
        let account = ACCOUNTS[(n * 7 % 4) as usize];
        let cents = 100 + n % 13;
        *expected.entry(account).or_insert(0) += cents;
        let body = serde_json::json!({ "id": Uuid::new_v4(), "account": account, "cents": cents });
        publish(
            &connection,
            &queue,
            &serde_json::to_vec(&body).unwrap(),
            None,
        )
        .await;
    }
    let (first, second) = (start(consumer()).await, start(consumer()).await);
    eventually("all 600 payments are applied", || {
        let applied = first.consumer.stats().applied + second.consumer.stats().applied;
        async move { applied == 600 }
    })
    .await;
    let (a, b) = (first.stop().await, second.stop().await);
    assert_eq!(a.retried + b.retried, 0, "{a:?} {b:?}");
    assert_eq!(a.dead_lettered + b.dead_lettered, 0, "{a:?} {b:?}");
    for (account, cents) in &expected {
        let balance: i64 =
            sqlx::query_scalar("SELECT balance FROM hot_accounts WHERE account = $1")
                .bind(account)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(balance, *cents, "{account}");
    }
    let captures: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM hot_captures")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(captures, 600);
    // The backends report their statistics when they exit.
    pool.close().await;
    let admin = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadlocks: i64 =
        sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = $1")
            .bind(database)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(
        deadlocks, 0,
        "PostgreSQL broke deadlocks between the groups"
    );
    admin.close().await;
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
}
