//! Failure stories of hostile code and hostile input around the unit of work, on real RabbitMQ
//! and on both ledgers: a handler that swallows a failed statement or ends idem's transaction
//! itself, a COMMIT the server refuses, a message the database keeps failing while it serves
//! others, a redelivered message held while the consumer must go on, a crash-loop count that
//! outlives its message, a panic while decoding, a producer's TTL on a dead letter, and a
//! producer's `user_id` that idem's connection may not publish. Each
//! story is one way to break "acked only after the effect committed; applied once; nothing
//! lost", and each failed before the fix it proves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use futures_util::StreamExt;
use idem::amqp::lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicQosOptions};
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::{BasicProperties, Connection, ConnectionProperties};
use idem::amqp::Consumer;
use idem::{async_trait, Handler, HandlerError, Isolation, Postgres, RetryPolicy, Sqlite, Tx};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

on_both_backends!(
    a_swallowed_failed_statement_is_never_acked_as_applied,
    a_handler_that_rolls_back_idem_s_transaction_is_dead_lettered_not_applied,
    a_handler_that_commits_by_itself_is_dead_lettered_and_its_copy_is_a_duplicate,
    a_commit_refused_by_a_deferred_constraint_is_rejected_not_held_forever,
    a_redelivered_applied_message_over_the_crash_loop_limit_is_a_duplicate,
    every_terminal_outcome_clears_the_crash_loop_count,
    a_panic_while_decoding_dead_letters_the_message_and_the_consumer_goes_on,
);

/// Plain SQL without arguments, per backend (the tests' generic code cannot name an executor).
#[async_trait]
trait Exec: TestDb {
    async fn exec(conn: &mut Self::Connection, sql: &str) -> Result<(), sqlx::Error>;
    async fn exec_pool(pool: &sqlx::Pool<Self>, sql: &str);
    /// The crash-loop count of `(consumer, key)`, if there is one.
    async fn redelivery_count(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> Option<i64>;
}

macro_rules! exec {
    ($db:ty) => {
        #[async_trait]
        impl Exec for $db {
            async fn exec(conn: &mut Self::Connection, sql: &str) -> Result<(), sqlx::Error> {
                // The tests' own statements.
                let sql = sqlx::AssertSqlSafe(sql.to_owned());
                sqlx::query(sql).execute(conn).await.map(|_| ())
            }
            async fn exec_pool(pool: &sqlx::Pool<Self>, sql: &str) {
                let sql = sqlx::AssertSqlSafe(sql.to_owned());
                sqlx::query(sql).execute(pool).await.unwrap();
            }
            async fn redelivery_count(
                pool: &sqlx::Pool<Self>,
                consumer: &str,
                key: &str,
            ) -> Option<i64> {
                sqlx::query_scalar(
                    "SELECT CAST(count AS BIGINT) FROM idem_redeliveries WHERE consumer = $1 AND key = $2",
                )
                .bind(consumer)
                .bind(key)
                .fetch_optional(pool)
                .await
                .unwrap()
            }
        }
    };
}
exec!(Postgres);
exec!(Sqlite);

fn is_postgres<DB: sqlx::Database>() -> bool {
    DB::NAME == "PostgreSQL"
}

/// What a hostile handler does after writing its effect.
#[derive(Clone, Copy)]
enum Misdeed {
    /// The first run ignores a statement that fails (`let _ = ...`), then returns Ok.
    SwallowOnce,
    /// Runs ROLLBACK, then writes its effect again (autocommitted now), then returns Ok.
    RollBack,
    /// Runs COMMIT, then returns Ok.
    Commit,
    /// Writes what a deferred constraint refuses only at COMMIT.
    BreakDeferredConstraint,
    /// PostgreSQL: fails with SQLSTATE 53100 (disk full), "database unavailable", when the
    /// transfer's account is "poison".
    DiskFullOnPoison,
}

struct Hostile<DB> {
    consumer: String,
    misdeed: Misdeed,
    runs: Arc<AtomicUsize>,
    swallowed: Arc<AtomicBool>,
    _db: std::marker::PhantomData<fn() -> DB>,
}

impl<DB: Exec> Hostile<DB> {
    fn new(story: &Story<DB>, misdeed: Misdeed) -> Self {
        Self {
            consumer: story.consumer.clone(),
            misdeed,
            runs: Arc::default(),
            swallowed: Arc::default(),
            _db: Default::default(),
        }
    }
}

#[async_trait]
impl<DB: Exec> Handler<DB> for Hostile<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, transfer: Transfer) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        DB::insert_effect(tx.conn(), &self.consumer, &transfer).await?;
        match self.misdeed {
            Misdeed::SwallowOnce => {
                if !self.swallowed.swap(true, Ordering::SeqCst) {
                    // "Ignore a unique violation": the common idiom that aborts a PostgreSQL
                    // transaction.
                    let _ = DB::exec(tx.conn(), "INSERT INTO no_such_table VALUES (1)").await;
                }
            }
            Misdeed::RollBack => {
                DB::exec(tx.conn(), "ROLLBACK").await?;
                DB::insert_effect(tx.conn(), &self.consumer, &transfer).await?;
            }
            Misdeed::Commit => DB::exec(tx.conn(), "COMMIT").await?,
            Misdeed::BreakDeferredConstraint => {
                let sql = if is_postgres::<DB>() {
                    format!(
                        "INSERT INTO hostile_deferred (id) VALUES ('{0}'), ('{0}')",
                        transfer.id
                    )
                } else {
                    format!(
                        "INSERT INTO hostile_child (parent) VALUES ('{}')",
                        transfer.id
                    )
                };
                DB::exec(tx.conn(), &sql).await?;
            }
            Misdeed::DiskFullOnPoison => {
                if transfer.account == "poison" {
                    DB::exec(
                        tx.conn(),
                        "DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$",
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// Delivers the next message of `queue` on a channel that then closes without an ack: the
/// broker puts it back flagged `redelivered`, as after a crash mid-message.
async fn deliver_and_drop(story: &Story<impl TestDb>) {
    let channel = story.connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = channel
        .basic_consume(
            story.queue.as_str().into(),
            "crashes".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    deliveries.next().await.unwrap().unwrap();
    channel
        .close(200, "crash mid-message".into())
        .await
        .unwrap();
}

async fn a_swallowed_failed_statement_is_never_acked_as_applied<DB: Exec>() {
    let story = Story::<DB>::begin("swallow").await;
    let handler = Hostile::new(&story, Misdeed::SwallowOnce);
    let runs = handler.runs.clone();
    let running = story.run(handler).await;

    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-h1", 100), Some(&id.to_string()))
        .await;
    running
        .wait_until("the transfer is applied", |s| s.applied == 1)
        .await;
    let stats = running.stop().await;

    // Either way the effect is there exactly once and the ledger has the key.
    assert_eq!(story.effects(&id).await, 1, "{stats:?}");
    assert!(DB::claimed(&story.pool, &story.consumer, &id.to_string()).await);
    if is_postgres::<DB>() {
        // PostgreSQL aborted the first transaction and answered its COMMIT with ROLLBACK: that
        // attempt was a failure, retried, and the second one applied.
        assert_eq!(stats.retried, 1, "{stats:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    } else {
        // SQLite keeps the transaction after a failed statement: the first run applied.
        assert_eq!(stats.retried, 0, "{stats:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
    story.end().await;
}

async fn a_handler_that_rolls_back_idem_s_transaction_is_dead_lettered_not_applied<DB: Exec>() {
    let story = Story::<DB>::begin("rollback").await;
    let running = story.run(Hostile::new(&story, Misdeed::RollBack)).await;

    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-h2", 100), Some(&id.to_string()))
        .await;
    running
        .wait_until("the message is dead-lettered", |s| s.dead_lettered == 1)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.applied, 0, "acked as applied: {stats:?}");
    assert!(
        !DB::claimed(&story.pool, &story.consumer, &id.to_string()).await,
        "the ledger claims a message whose claim the handler rolled back"
    );
    // What ran after the ROLLBACK autocommitted: idem cannot undo it, and says so.
    assert_eq!(story.effects(&id).await, 1);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "rejected");
    assert!(
        letters[0].headers["x-idem-error"].contains("ended idem's transaction"),
        "{:?}",
        letters[0].headers
    );
    story.end().await;
}

async fn a_handler_that_commits_by_itself_is_dead_lettered_and_its_copy_is_a_duplicate<DB: Exec>() {
    let story = Story::<DB>::begin("selfcommit").await;
    let running = story.run(Hostile::new(&story, Misdeed::Commit)).await;

    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-h3", 100);
    story.publish(&body, Some(&id.to_string())).await;
    running
        .wait_until("the message is dead-lettered", |s| s.dead_lettered == 1)
        .await;
    // The handler's COMMIT took the claim with it: a second copy must not apply again.
    story.publish(&body, Some(&id.to_string())).await;
    running
        .wait_until("the copy is a duplicate", |s| s.duplicates == 1)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.applied, 0, "{stats:?}");
    assert_eq!(story.effects(&id).await, 1);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "rejected");
    story.end().await;
}

async fn a_commit_refused_by_a_deferred_constraint_is_rejected_not_held_forever<DB: Exec>() {
    let story = Story::<DB>::begin("deferred").await;
    if is_postgres::<DB>() {
        DB::exec_pool(
            &story.pool,
            "CREATE TABLE IF NOT EXISTS hostile_deferred (id TEXT,
             CONSTRAINT hostile_deferred_once UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .await;
    } else {
        DB::exec_pool(
            &story.pool,
            "CREATE TABLE IF NOT EXISTS hostile_parent (id TEXT PRIMARY KEY)",
        )
        .await;
        DB::exec_pool(
            &story.pool,
            "CREATE TABLE IF NOT EXISTS hostile_child (parent TEXT
             REFERENCES hostile_parent (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .await;
    }
    let running = story
        .run_with(
            Hostile::new(&story, Misdeed::BreakDeferredConstraint),
            |builder| builder.database_backoff(Duration::from_millis(20)),
        )
        .await;

    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-h4", 100), Some(&id.to_string()))
        .await;
    running
        .wait_until("the refused commit is dead-lettered", |s| {
            s.dead_lettered == 1
        })
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.applied, 0, "{stats:?}");
    assert_eq!(story.effects(&id).await, 0);
    assert!(!DB::claimed(&story.pool, &story.consumer, &id.to_string()).await);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters[0].reason(), "rejected");
    assert!(
        letters[0].headers["x-idem-error"].contains("COMMIT failed"),
        "{:?}",
        letters[0].headers
    );
    story.end().await;
}

async fn a_redelivered_applied_message_over_the_crash_loop_limit_is_a_duplicate<DB: Exec>() {
    let story = Story::<DB>::begin("staleloop").await;
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-h5", 100);
    // Applied once (say, a replay of a crash-loop dead letter)...
    let running = story.run(story.recorder()).await;
    story.publish(&body, Some(&id.to_string())).await;
    running
        .wait_until("the transfer is applied", |s| s.applied == 1)
        .await;
    running.stop().await;
    // ...with a crash-loop count at the limit left from its earlier life, and then one lost ack
    // brings a copy back redelivered.
    DB::exec_pool(
        &story.pool,
        &format!(
            "INSERT INTO idem_redeliveries (consumer, key, count) VALUES ('{}', '{id}', 5)",
            story.consumer
        ),
    )
    .await;
    story.publish(&body, Some(&id.to_string())).await;
    deliver_and_drop(&story).await;

    let running = story.run(story.recorder()).await;
    running
        .wait_until("the redelivered copy is settled", |s| {
            s.duplicates + s.dead_lettered == 1
        })
        .await;
    let stats = running.stop().await;

    assert_eq!(
        stats.duplicates, 1,
        "dead-lettered as a crash loop: {stats:?}"
    );
    assert!(drain_dead_letters(&story.connection, &story.queue)
        .await
        .is_empty());
    assert_eq!(redelivery_count(&story, &id).await, None);
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

async fn every_terminal_outcome_clears_the_crash_loop_count<DB: Exec>() {
    let story = Story::<DB>::begin("countclear").await;
    story.declare().await;
    // A redelivered message that the handler rejects for good: the count goes with it.
    let rejected = Uuid::new_v4();
    let body = serde_json::to_vec(&serde_json::json!({
        "id": rejected, "account": "acct-h6", "amount": 1, "fail": true
    }))
    .unwrap();
    story.publish(&body, Some(&rejected.to_string())).await;
    deliver_and_drop(&story).await;
    let running = story.run(story.recorder()).await;
    running
        .wait_until("the rejected message is dead-lettered", |s| {
            s.dead_lettered == 1
        })
        .await;
    running.stop().await;
    assert_eq!(redelivery_count(&story, &rejected).await, None);

    // A crash-loop dead letter clears its count, so that a replay starts afresh.
    let looping = Uuid::new_v4();
    DB::exec_pool(
        &story.pool,
        &format!(
            "INSERT INTO idem_redeliveries (consumer, key, count) VALUES ('{}', '{looping}', 5)",
            story.consumer
        ),
    )
    .await;
    story
        .publish(
            &transfer_body(looping, "acct-h7", 1),
            Some(&looping.to_string()),
        )
        .await;
    deliver_and_drop(&story).await;
    let running = story.run(story.recorder()).await;
    running
        .wait_until("the looping message is dead-lettered", |s| {
            s.dead_lettered == 1
        })
        .await;
    running.stop().await;
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    let reasons: Vec<&str> = letters.iter().map(DeadLetter::reason).collect();
    assert_eq!(reasons, ["rejected", "crash-loop"]);
    assert_eq!(redelivery_count(&story, &looping).await, None);
    story.end().await;
}

async fn redelivery_count<DB: Exec>(story: &Story<DB>, key: &Uuid) -> Option<i64> {
    DB::redelivery_count(&story.pool, &story.consumer, &key.to_string()).await
}

/// A message whose `Deserialize` panics on one value: a serde hook a producer can trip.
#[derive(Debug, serde::Deserialize, idem::Message)]
struct Touchy {
    #[idem(key)]
    id: Uuid,
    #[serde(deserialize_with = "refuse_thirteen")]
    amount: i64,
}

fn refuse_thirteen<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let amount = <i64 as serde::Deserialize>::deserialize(deserializer)?;
    assert_ne!(amount, 13, "13 is unlucky");
    Ok(amount)
}

struct TouchyHandler<DB> {
    consumer: String,
    applied: Arc<AtomicUsize>,
    _db: std::marker::PhantomData<fn() -> DB>,
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for TouchyHandler<DB> {
    type Message = Touchy;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, _tx: &mut Tx<'_, DB>, touchy: Touchy) -> Result<(), HandlerError> {
        assert_ne!(touchy.amount, 13);
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn a_panic_while_decoding_dead_letters_the_message_and_the_consumer_goes_on<DB: TestDb>() {
    let story = Story::<DB>::begin("serdepanic").await;
    let handler = TouchyHandler::<DB> {
        consumer: story.consumer.clone(),
        applied: Arc::default(),
        _db: Default::default(),
    };
    let applied = handler.applied.clone();
    let running = story.run(handler).await;

    let (unlucky, fine) = (Uuid::new_v4(), Uuid::new_v4());
    let body = |id: Uuid, amount: i64| {
        serde_json::to_vec(&serde_json::json!({ "id": id, "amount": amount })).unwrap()
    };
    story.publish(&body(unlucky, 13), None).await;
    story.publish(&body(fine, 14), None).await;
    running
        .wait_until("both messages are settled", |s| {
            s.dead_lettered == 1 && s.applied == 1
        })
        .await;
    running.stop().await;

    assert_eq!(applied.load(Ordering::SeqCst), 1);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "malformed");
    assert!(
        letters[0].headers["x-idem-error"].contains("13 is unlucky"),
        "{:?}",
        letters[0].headers
    );
    story.end().await;
}

/// PostgreSQL only: SQLSTATE 53100 is what a full disk answers, and a handler can raise it at
/// will. One message that the database keeps failing while it serves every other one is held
/// a little, then counts as that message's failed attempts, through the retry policy — it is
/// never held forever. And while it is held redelivered (it may be the one that crashed the
/// process), the messages behind it still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_database_fails_while_serving_others_is_not_held_forever() {
    let story = Story::<Postgres>::begin("heldpoison").await;
    story.declare().await;
    let poison = Uuid::new_v4();
    story
        .publish(
            &transfer_body(poison, "poison", 1),
            Some(&poison.to_string()),
        )
        .await;
    // Make it a redelivered message, as after a crash: it runs alone while it runs.
    deliver_and_drop(&story).await;
    let running = story
        .run_with(Hostile::new(&story, Misdeed::DiskFullOnPoison), |builder| {
            builder.database_backoff(Duration::from_millis(100))
        })
        .await;
    // Good transfers keep flowing the whole time: the database is serving, this message is not.
    let publishing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (connection, queue, publishing) = (
            connection().await,
            story.queue.clone(),
            Arc::clone(&publishing),
        );
        tokio::spawn(async move {
            let mut good = Vec::new();
            while publishing.load(Ordering::SeqCst) && good.len() < 400 {
                let id = Uuid::new_v4();
                publish(
                    &connection,
                    &queue,
                    &transfer_body(id, "acct-h8", 5),
                    Some(&id.to_string()),
                )
                .await;
                good.push(id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            good
        })
    };
    running
        .wait_until("the poison's attempts run out", |s| s.dead_lettered == 1)
        .await;
    publishing.store(false, Ordering::SeqCst);
    let good = producer.await.unwrap();
    let sent = good.len() as u64;
    running
        .wait_until("every good transfer is applied", |s| s.applied == sent)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.retried, 3, "4 attempts = 3 retries: {stats:?}");
    for id in &good {
        assert_eq!(story.effects(id).await, 1);
    }
    assert_eq!(story.effects(&poison).await, 0);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "retries-exhausted");
    assert!(
        letters[0].headers["x-idem-error"].contains("keeps failing for this message"),
        "{:?}",
        letters[0].headers
    );
    story.end().await;
}

/// A producer's per-message TTL must not make a dead letter vanish from `<queue>.dlq`: the dead
/// letter carries no expiration, and the original one is kept in a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_does_not_expire_with_the_producer_s_ttl() {
    let story = Story::<Sqlite>::begin("ttl").await;
    let running = story
        .run_with(story.recorder(), |builder| {
            builder.retry(RetryPolicy::no_retries())
        })
        .await;
    publish_with(
        &story.connection,
        &story.queue,
        b"{not json",
        Some("ttl-1"),
        |p| p.with_expiration("1500".into()),
    )
    .await;
    running
        .wait_until("the message is dead-lettered", |s| s.dead_lettered == 1)
        .await;
    running.stop().await;
    // Longer than the producer's TTL.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let channel = story.connection.create_channel().await.unwrap();
    let dlq = idem::amqp::dead_letter_queue(&story.queue);
    let letter = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the dead letter expired with the producer's TTL");
    let properties = &letter.delivery.properties;
    assert_eq!(*properties.expiration(), None);
    let headers = properties.headers().clone().unwrap_or_default();
    let original = headers
        .inner()
        .iter()
        .find(|(name, _)| name.as_str() == "x-idem-original-expiration")
        .map(|(_, value)| match value {
            AMQPValue::LongString(text) => text.to_string(),
            other => format!("{other:?}"),
        });
    assert_eq!(original.as_deref(), Some("1500"));
    story.end().await;
}

/// A server whose default isolation is SERIALIZABLE (a team's choice for its own effects):
/// two consumers racing on the same keys still apply each exactly once, without dead letters.
/// A claim that loses the race under SERIALIZABLE fails with a serialization error instead of
/// waiting and finding the key; idem claims again at once and finds the duplicate, and the
/// consumers stay ready throughout (a lost race is not a database outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stay_correct_when_the_server_default_isolation_is_serializable() {
    let url = fresh_pg_database("idem_serializable").await;
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "ALTER DATABASE idem_serializable SET default_transaction_isolation = 'serializable'",
    )
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let pool = <Postgres as idem::Backend>::connect(&url, 16)
        .await
        .unwrap();
    let isolation: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(isolation, "serializable");
    <Postgres as idem::Backend>::migrate(&pool).await.unwrap();
    Postgres::create_effects(&pool).await;
    let mut story = Story::<Postgres>::begin("serializable").await;
    story.pool = pool;
    two_consumers_race_on_every_key(story, Isolation::ServerDefault).await;
}

/// The same race, with the consumer asking for REPEATABLE READ itself (`.isolation(..)`) on a
/// server left at READ COMMITTED: a duplicate racing its original is found, never applied
/// twice, never dead-lettered, and never flips the consumer to "database unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_racing_its_original_under_repeatable_read_keeps_the_consumer_ready() {
    let story = Story::<Postgres>::begin("repeatable-read").await;
    two_consumers_race_on_every_key(story, Isolation::RepeatableRead).await;
}

async fn two_consumers_race_on_every_key(mut story: Story<Postgres>, isolation: Isolation) {
    story.retry = RetryPolicy::exponential(Duration::from_millis(20), Duration::from_millis(200))
        .max_attempts(10);
    let pause = Duration::from_millis(30);
    // The default database backoff (1 s): a race mistaken for an outage would hold a delivery,
    // and mark its consumer unready, for a whole second.
    let racer = |handler| {
        Consumer::builder(story.pool.clone(), handler)
            .queue(&story.queue)
            .retry(story.retry)
            .prefetch(2)
            .concurrency(2)
            .isolation(isolation)
            .build()
            .unwrap()
    };
    let running_a = start(racer(story.recorder().pausing(pause))).await;
    let running_b = start(racer(story.recorder().pausing(pause))).await;
    let (a, b) = (running_a.consumer.clone(), running_b.consumer.clone());
    let unready = Arc::new(AtomicUsize::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (unready, watching) = (Arc::clone(&unready), Arc::clone(&watching));
        async move {
            while watching.load(Ordering::SeqCst) {
                if !a.health().database_reachable || !b.health().database_reachable {
                    unready.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });

    let ids: Vec<Uuid> = (0..16).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        let body = transfer_body(*id, "acct-h9", 100);
        story.publish(&body, Some(&id.to_string())).await;
        story.publish(&body, Some(&id.to_string())).await;
    }
    let b = running_b.consumer.clone();
    running_a
        .wait_until("both copies of every key are settled", |sa| {
            let sb = b.stats();
            sa.applied + sa.duplicates + sb.applied + sb.duplicates == 32
        })
        .await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();
    let (sa, sb) = (running_a.stop().await, running_b.stop().await);

    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "key {id}: {sa:?} {sb:?}");
    }
    assert_eq!(sa.applied + sb.applied, 16, "{sa:?} {sb:?}");
    assert_eq!(sa.dead_lettered + sb.dead_lettered, 0, "{sa:?} {sb:?}");
    assert!(
        sa.applied + sa.duplicates > 0 && sb.applied + sb.duplicates > 0,
        "one consumer got every copy: the race was not exercised: {sa:?} {sb:?}"
    );
    assert_eq!(
        unready.load(Ordering::SeqCst),
        0,
        "a lost claim race was taken for an unreachable database"
    );
    assert!(drain_dead_letters(&story.connection, &story.queue)
        .await
        .is_empty());
    story.end().await;
}

/// A producer sets `user_id` (RabbitMQ lets it: it is the producer's own user) on messages to
/// a queue idem consumes as another user. The broker refuses any publish whose `user_id` is not
/// the publishing connection's user by closing the channel, so a dead letter or retry copy that
/// kept it could never be published: the message would come back forever and block the queue.
/// idem's copies carry it in `x-idem-original-user-id` instead, and each message goes where it
/// should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_s_user_id_never_makes_its_dead_letter_or_retry_unpublishable() {
    let rabbitmqctl = std::env::var("IDEM_RABBITMQCTL")
        .expect("IDEM_RABBITMQCTL is not set: run the tests through scripts/test");
    let ctl = |args: &[&str]| {
        let output = std::process::Command::new(&rabbitmqctl)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let user = format!("producer-{}", Uuid::new_v4().simple());
    ctl(&["add_user", &user, "secret"]);
    ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let producer_url = amqp_url().replacen("guest:guest@", &format!("{user}:secret@"), 1);
    assert_ne!(
        producer_url,
        amqp_url(),
        "the test URL has no guest credentials"
    );
    let producer = Connection::connect(&producer_url, ConnectionProperties::default())
        .await
        .unwrap();

    let mut story = Story::<Sqlite>::begin("user-id").await;
    story.retry = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1))
        .max_attempts(3)
        .jitter(0.0);
    let running = story.run(story.recorder().failing_transiently(1)).await;
    let as_the_producer = |p: BasicProperties| p.with_user_id(user.as_str().into());
    let id = Uuid::new_v4();
    publish_with(
        &producer,
        &story.queue,
        b"{not json",
        Some("uid-1"),
        as_the_producer,
    )
    .await;
    publish_with(
        &producer,
        &story.queue,
        &transfer_body(id, "acct-uid", 5),
        None,
        as_the_producer,
    )
    .await;
    running
        .wait_until(
            "the bad message is dead-lettered and the good one applied after a retry",
            |s| s.dead_lettered == 1 && s.applied == 1,
        )
        .await;
    let stats = running.stop().await;
    assert_eq!(
        (stats.retried, stats.applied, stats.dead_lettered),
        (1, 1, 1),
        "{stats:?}"
    );
    assert_eq!(story.effects(&id).await, 1);

    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason(), "malformed");
    assert_eq!(
        letters[0]
            .headers
            .get("x-idem-original-user-id")
            .map(String::as_str),
        Some(user.as_str())
    );
    producer.close(0, "done".into()).await.unwrap();
    ctl(&["delete_user", &user]);
    story.end().await;
}
