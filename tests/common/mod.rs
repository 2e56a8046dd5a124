//! Shared parts of the end-to-end tests: real RabbitMQ, real PostgreSQL, SQLite files.
//!
//! `scripts/test` starts the servers and exports `IDEM_TEST_AMQP_URL` and
//! `IDEM_TEST_DATABASE_URL`. Every test uses its own queue, consumer names and keys, so the tests
//! run in parallel against one broker and one database.
//!
//! Over 400 lines on purpose: the one fixture every test file uses (servers, stories, queue
//! helpers); process fleets live in `fleet.rs`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fleet;
pub mod proxy;
pub mod raw_amqp;

/// Runs each story (an async fn generic over [`TestDb`]) once per ledger backend.
#[allow(unused_macros)] // not every test binary runs stories on both backends
macro_rules! on_both_backends {
    ($($story:ident),* $(,)?) => {
        mod postgres {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $story() {
                super::$story::<idem::Postgres>().await
            }
        )*}
        mod sqlite {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $story() {
                super::$story::<idem::Sqlite>().await
            }
        )*}
    };
}

use futures_util::FutureExt;
use idem::amqp::lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::{BasicProperties, Connection};
use idem::amqp::{Consumer, ConsumerBuilder, ConsumerStats};
use idem::{async_trait, Backend, Handler, HandlerError, Postgres, RetryPolicy, Sqlite, Tx};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

pub fn amqp_url() -> String {
    std::env::var("IDEM_TEST_AMQP_URL")
        .expect("IDEM_TEST_AMQP_URL is not set: run the tests through scripts/test, which starts RabbitMQ and PostgreSQL")
}

pub fn pg_url() -> String {
    std::env::var("IDEM_TEST_DATABASE_URL")
        .expect("IDEM_TEST_DATABASE_URL is not set: run the tests through scripts/test, which starts RabbitMQ and PostgreSQL")
}

/// An example binary cargo built next to this test (`target/<profile>/examples/<name>`).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: a plain `cargo test` builds the examples first (with `--test <name>` \
         alone, run `cargo build --all-features --examples` before)",
        binary.display()
    );
    binary
}

/// Declares `queue` durable, without arguments, as a producer does before a consumer starts.
#[allow(dead_code)] // not every test binary declares queues itself
pub async fn declare_durable(connection: &Connection, queue: &str) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "declared".into()).await;
}

/// Sends SIGTERM to `child` (an example run as a service) and waits up to 30 s for it to exit;
/// its exit status.
#[allow(dead_code)] // not every test binary stops a child process
pub async fn terminate(child: &mut std::process::Child, name: &str) -> std::process::ExitStatus {
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success(), "kill -TERM {name}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `url` (a PostgreSQL URL) pointing at `database` instead, query string kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut url = format!("{}/{database}", &base[..path]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Creates (or re-creates, for a replayed seed) `database` on the test PostgreSQL server and
/// returns its URL: a run's rows never meet another run's.
pub async fn fresh_pg_database(database: &str) -> String {
    let admin = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        format!("CREATE DATABASE {database}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    with_database(&pg_url(), database)
}

pub async fn connection() -> Connection {
    idem::amqp::connect(&amqp_url())
        .await
        .expect("connect to the test RabbitMQ")
}

/// A queue name no other test uses.
pub fn fresh_queue(story: &str) -> String {
    format!("test-{story}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// The message the tests send: a transfer with a key, and a switch to make the handler fail.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
pub struct Transfer {
    #[idem(key)]
    pub id: Uuid,
    pub account: String,
    pub amount: i64,
    #[serde(default)]
    pub fail: bool,
}

pub fn transfer_body(id: Uuid, account: &str, amount: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "id": id, "account": account, "amount": amount }))
        .unwrap()
}

/// The tests' effect table, per backend, and how to read it back.
#[async_trait]
pub trait TestDb: Backend {
    async fn pool() -> sqlx::Pool<Self>;
    async fn insert_effect(
        conn: &mut Self::Connection,
        consumer: &str,
        transfer: &Transfer,
    ) -> Result<(), sqlx::Error>;
    /// How many effect rows `consumer` wrote for `key`.
    async fn effects(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> i64;
    /// Whether the ledger holds `(consumer, key)`.
    async fn claimed(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> bool;
    /// The amount of the (first) effect row `consumer` wrote for `key`.
    async fn amount(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> i64;
    /// Creates the effect table in `pool`'s database.
    async fn create_effects(pool: &sqlx::Pool<Self>);
    /// Outbox rows, and records of published ones (`idem_outbox_sent`).
    async fn outbox_rows(pool: &sqlx::Pool<Self>) -> i64;
    /// Keeps a copy of the outbox rows to `routing_key` as they are now, unpublished, for
    /// [`TestDb::forget_published`].
    async fn keep_unpublished(pool: &sqlx::Pool<Self>, routing_key: &str);
    /// Puts back the rows kept by [`TestDb::keep_unpublished`] and forgets their records: what a
    /// relay that died between the broker's confirm and its own mark leaves behind.
    async fn forget_published(pool: &sqlx::Pool<Self>, routing_key: &str);
    /// The last publish error recorded in the outbox.
    async fn last_outbox_error(pool: &sqlx::Pool<Self>) -> String;
    /// The message ids of the outbox rows caused by the inbound message `causation_id`.
    async fn outbox_ids(pool: &sqlx::Pool<Self>, causation_id: &str) -> Vec<String>;
    /// Deletes the outbox rows caused by the inbound messages `causation_ids`.
    async fn forget_outbox(pool: &sqlx::Pool<Self>, causation_ids: &[String]);
}

macro_rules! test_db {
    ($db:ty, $pool:expr, $id:literal, $lock:literal) => {
        #[async_trait]
        impl TestDb for $db {
            async fn pool() -> sqlx::Pool<Self> {
                let pool = <$db>::connect(&$pool, 16).await.expect("connect to the test database");
                <$db>::migrate(&pool).await.expect("idem migrations");
                let mut tx = pool.begin().await.unwrap();
                if !$lock.is_empty() {
                    sqlx::query($lock).execute(&mut *tx).await.unwrap();
                }
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS test_effects (id ", $id,
                    ", consumer TEXT NOT NULL, key TEXT NOT NULL, account TEXT NOT NULL, amount BIGINT NOT NULL)"
                ))
                .execute(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
                pool
            }
            async fn insert_effect(conn: &mut Self::Connection, consumer: &str, t: &Transfer) -> Result<(), sqlx::Error> {
                sqlx::query("INSERT INTO test_effects (consumer, key, account, amount) VALUES ($1, $2, $3, $4)")
                    .bind(consumer)
                    .bind(t.id.to_string())
                    .bind(&t.account)
                    .bind(t.amount)
                    .execute(conn)
                    .await
                    .map(|_| ())
            }
            async fn effects(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> i64 {
                sqlx::query_scalar("SELECT COUNT(*) FROM test_effects WHERE consumer = $1 AND key = $2")
                    .bind(consumer)
                    .bind(key)
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }
            async fn create_effects(pool: &sqlx::Pool<Self>) {
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS test_effects (id ", $id,
                    ", consumer TEXT NOT NULL, key TEXT NOT NULL, account TEXT NOT NULL, amount BIGINT NOT NULL)"
                ))
                .execute(pool)
                .await
                .unwrap();
            }
            async fn outbox_rows(pool: &sqlx::Pool<Self>) -> i64 {
                sqlx::query_scalar(
                    "SELECT (SELECT COUNT(*) FROM idem_outbox) + (SELECT COUNT(*) FROM idem_outbox_sent)",
                )
                .fetch_one(pool)
                .await
                .unwrap()
            }
            async fn keep_unpublished(pool: &sqlx::Pool<Self>, routing_key: &str) {
                sqlx::query("CREATE TABLE IF NOT EXISTS test_outbox_kept AS SELECT * FROM idem_outbox WHERE 1 = 0")
                    .execute(pool)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO test_outbox_kept SELECT * FROM idem_outbox WHERE routing_key = $1")
                    .bind(routing_key)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            async fn forget_published(pool: &sqlx::Pool<Self>, routing_key: &str) {
                let mut tx = pool.begin().await.unwrap();
                for statement in [
                    "DELETE FROM idem_outbox_sent WHERE routing_key = $1",
                    "INSERT INTO idem_outbox SELECT * FROM test_outbox_kept WHERE routing_key = $1",
                    "DELETE FROM test_outbox_kept WHERE routing_key = $1",
                ] {
                    sqlx::query(statement).bind(routing_key).execute(&mut *tx).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
            async fn last_outbox_error(pool: &sqlx::Pool<Self>) -> String {
                sqlx::query_scalar::<_, Option<String>>(
                    "SELECT last_error FROM idem_outbox WHERE last_error IS NOT NULL ORDER BY id DESC LIMIT 1",
                )
                .fetch_optional(pool)
                .await
                .unwrap()
                .flatten()
                .unwrap_or_default()
            }
            async fn outbox_ids(pool: &sqlx::Pool<Self>, causation_id: &str) -> Vec<String> {
                sqlx::query_scalar(
                    "SELECT CAST(message_id AS TEXT) FROM idem_outbox WHERE causation_id = $1 ORDER BY id",
                )
                .bind(causation_id)
                .fetch_all(pool)
                .await
                .unwrap()
            }
            async fn forget_outbox(pool: &sqlx::Pool<Self>, causation_ids: &[String]) {
                for id in causation_ids {
                    sqlx::query("DELETE FROM idem_outbox WHERE causation_id = $1")
                        .bind(id)
                        .execute(pool)
                        .await
                        .unwrap();
                }
            }
            async fn amount(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> i64 {
                sqlx::query_scalar("SELECT amount FROM test_effects WHERE consumer = $1 AND key = $2 ORDER BY id LIMIT 1")
                    .bind(consumer)
                    .bind(key)
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }
            async fn claimed(pool: &sqlx::Pool<Self>, consumer: &str, key: &str) -> bool {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idem_ledger WHERE consumer = $1 AND key = $2")
                    .bind(consumer)
                    .bind(key)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                n == 1
            }
        }
    };
}
test_db!(
    Postgres,
    pg_url(),
    "BIGSERIAL PRIMARY KEY",
    "SELECT pg_advisory_xact_lock(77001)"
);
test_db!(
    Sqlite,
    format!(
        "sqlite://{}/idem-test-{}.db",
        std::env::temp_dir().display(),
        Uuid::new_v4()
    ),
    "INTEGER PRIMARY KEY AUTOINCREMENT",
    ""
);

/// A hand-written handler (no macro) with instruments: how often its body ran, an optional
/// pause inside the transaction to hold two copies of one message in flight at once, and
/// failures to inject (after its write, so a rollback is what keeps it from counting).
pub struct Recorder<DB> {
    pub consumer: String,
    pub runs: Arc<AtomicUsize>,
    pub pause: Duration,
    /// Runs left that fail with an error of no particular class (so: transient).
    pub flaky: Arc<AtomicUsize>,
    /// Runs left that panic.
    pub panics: Arc<AtomicUsize>,
    pub _db: std::marker::PhantomData<fn() -> DB>,
}

impl<DB> Recorder<DB> {
    pub fn new(consumer: &str) -> Self {
        Self {
            consumer: consumer.to_owned(),
            runs: Arc::default(),
            pause: Duration::ZERO,
            flaky: Arc::default(),
            panics: Arc::default(),
            _db: Default::default(),
        }
    }
    pub fn pausing(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }
    /// The next `n` runs fail transiently (a deadlock, a timeout: something a retry cures).
    pub fn failing_transiently(self, n: usize) -> Self {
        self.flaky.store(n, Ordering::SeqCst);
        self
    }
    /// The next `n` runs panic.
    pub fn panicking(self, n: usize) -> Self {
        self.panics.store(n, Ordering::SeqCst);
        self
    }
}

/// Takes one from `left` if it is above zero.
fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for Recorder<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, transfer: Transfer) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        DB::insert_effect(tx.conn(), &self.consumer, &transfer).await?;
        tokio::time::sleep(self.pause).await;
        if transfer.fail {
            return Err(HandlerError::permanent(format!(
                "account {} is frozen",
                transfer.account
            )));
        }
        if take_one(&self.flaky) {
            return Err(
                format!("account {} is locked by another transfer", transfer.account).into(),
            );
        }
        if take_one(&self.panics) {
            panic!("the ledger service is in an impossible state");
        }
        Ok(())
    }
}

/// What every story starts with: a pool, a broker connection, and a queue and consumer name of
/// its own.
pub struct Story<DB: TestDb> {
    pub pool: sqlx::Pool<DB>,
    pub connection: Connection,
    pub queue: String,
    pub consumer: String,
    /// The retry policy of the consumers this story runs (fast: 4 attempts, 50 ms doubling).
    pub retry: RetryPolicy,
}

impl<DB: TestDb> Story<DB> {
    pub async fn begin(story: &str) -> Self {
        Self {
            pool: DB::pool().await,
            connection: connection().await,
            queue: fresh_queue(story),
            consumer: format!("{story}-{}", &Uuid::new_v4().simple().to_string()[..8]),
            retry: RetryPolicy::exponential(Duration::from_millis(50), Duration::from_millis(400))
                .max_attempts(4),
        }
    }

    /// Declares the story's queues (queue, dead-letter queue, delay queues), as a consumer does
    /// on start: for stories that publish before any consumer runs.
    pub async fn declare(&self) {
        Consumer::builder(self.pool.clone(), self.recorder())
            .queue(&self.queue)
            .retry(self.retry)
            .build()
            .unwrap()
            .declare(&self.connection)
            .await
            .unwrap();
    }

    /// A recorder handler for this story's consumer.
    pub fn recorder(&self) -> Recorder<DB> {
        Recorder::new(&self.consumer)
    }

    /// Starts `handler` on this story's queue with default settings.
    pub async fn run<H: Handler<DB>>(&self, handler: H) -> Running<DB, H> {
        self.run_with(handler, |builder| builder).await
    }

    /// Starts `handler` on this story's queue with settings changed by `configure`.
    pub async fn run_with<H: Handler<DB>>(
        &self,
        handler: H,
        configure: impl FnOnce(ConsumerBuilder<DB, H>) -> ConsumerBuilder<DB, H>,
    ) -> Running<DB, H> {
        let builder = Consumer::builder(self.pool.clone(), handler)
            .queue(&self.queue)
            .retry(self.retry);
        start(configure(in_test_mode(builder)).build().unwrap()).await
    }

    pub async fn publish(&self, body: &[u8], message_id: Option<&str>) {
        publish(&self.connection, &self.queue, body, message_id).await
    }

    /// Effect rows of this story's consumer for `key`.
    pub async fn effects(&self, key: &Uuid) -> i64 {
        DB::effects(&self.pool, &self.consumer, &key.to_string()).await
    }

    pub async fn end(self) {
        assert_eq!(
            ready_messages(&self.connection, &self.queue).await,
            0,
            "messages left in the queue"
        );
        for tier in self.retry.tiers() {
            let delay_queue = idem::amqp::retry_queue(&self.queue, tier);
            // Absent when this story's consumers ran on other queues.
            if let Some(left) = queue_depth(&self.connection, &delay_queue).await {
                assert_eq!(left, 0, "messages left in {delay_queue}");
            }
        }
        delete_queues(&self.connection, &self.queue, &self.retry).await;
    }
}

/// `IDEM_TEST_GROUP_COMMIT=<n>` (n > 1): the story's consumer commits in groups of up to n
/// messages (5 ms to fill), and each story must keep its outcomes (`scripts/test` runs the
/// consumer and retry stories both ways). Only the stories with several deliveries in flight at
/// once (copies, racing consumers, the reconnect story's 40 payments, the redelivered batch)
/// form real groups; a story of one message at a time takes the per-message path in group mode
/// too. Group mode's own stories are tests/group_*.rs.
pub fn in_test_mode<DB: Backend, H: Handler<DB>>(
    builder: ConsumerBuilder<DB, H>,
) -> ConsumerBuilder<DB, H> {
    match std::env::var("IDEM_TEST_GROUP_COMMIT")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) if n > 1 => builder.group_commit(n, Duration::from_millis(5)),
        _ => builder,
    }
}

/// A consumer running in the background until [`Running::stop`].
pub struct Running<DB: Backend, H> {
    pub consumer: Arc<Consumer<DB, H>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), idem::amqp::Error>>,
}

pub async fn start<DB: Backend, H: Handler<DB>>(consumer: Consumer<DB, H>) -> Running<DB, H> {
    let consumer = Arc::new(consumer);
    let connection = connection().await;
    consumer.declare(&connection).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = Arc::clone(&consumer);
    let task = tokio::spawn(async move { running.run(&connection, stopped.map(|_| ())).await });
    Running {
        consumer,
        stop: Some(stop),
        task,
    }
}

/// Runs `consumer` in the background the way a service does, `serve(url, …)` — its own
/// connection to `url` (which may list several nodes), reconnecting by itself — until
/// [`Running::stop`].
pub fn serve_on<DB: Backend, H: Handler<DB>>(
    consumer: Consumer<DB, H>,
    url: &str,
) -> Running<DB, H> {
    let consumer = Arc::new(consumer);
    let (stop, stopped) = oneshot::channel::<()>();
    let running = Arc::clone(&consumer);
    let url = url.to_owned();
    let task = tokio::spawn(async move { running.serve(&url, stopped.map(|_| ())).await });
    Running {
        consumer,
        stop: Some(stop),
        task,
    }
}

impl<DB: Backend, H: Handler<DB>> Running<DB, H> {
    /// Waits (30 s at most) until the consumer's counters satisfy `condition`.
    pub async fn wait_until(&self, what: &str, condition: impl Fn(ConsumerStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition(self.consumer.stats()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; the consumer's stats: {:?}, health: {:?}",
                self.consumer.stats(),
                self.consumer.health()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Ends the consumer the way a crash does: its task dropped mid-flight (open transactions
    /// roll back), its connection closed with nothing more acknowledged.
    pub async fn crash(self) -> ConsumerStats {
        self.task.abort();
        let _ = self.task.await;
        self.consumer.stats()
    }

    pub async fn stop(mut self) -> ConsumerStats {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
        self.consumer.stats()
    }
}

/// Publishes `body` persistently with publisher confirms.
pub async fn publish(connection: &Connection, queue: &str, body: &[u8], message_id: Option<&str>) {
    publish_with(connection, queue, body, message_id, |p| p).await
}

/// Publishes like [`publish`], with properties changed by `properties`.
pub async fn publish_with(
    connection: &Connection,
    queue: &str,
    body: &[u8],
    message_id: Option<&str>,
    properties: impl FnOnce(BasicProperties) -> BasicProperties,
) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut standard = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_correlation_id("test-correlation".into());
    if let Some(id) = message_id {
        standard = standard.with_message_id(id.into());
    }
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties(standard),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.is_ack(),
        "the broker did not confirm the test message"
    );
    let _ = channel.close(200, "published".into()).await;
}

/// Waits up to 30 s for `condition`, polling.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A dead letter as read back from `<queue>.dlq`.
#[derive(Debug)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: BTreeMap<String, String>,
}

impl DeadLetter {
    pub fn reason(&self) -> &str {
        self.headers
            .get("x-idem-reason")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// Takes every message out of `<queue>.dlq`.
pub async fn drain_dead_letters(connection: &Connection, queue: &str) -> Vec<DeadLetter> {
    let channel = connection.create_channel().await.unwrap();
    let dlq = idem::amqp::dead_letter_queue(queue);
    let mut letters = Vec::new();
    while let Some(message) = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let p = &message.delivery.properties;
        let headers = p
            .headers()
            .clone()
            .unwrap_or_else(FieldTable::default)
            .inner()
            .iter()
            .filter_map(|(k, v)| match v {
                AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
                AMQPValue::Timestamp(t) => Some((k.to_string(), t.to_string())),
                AMQPValue::LongLongInt(n) => Some((k.to_string(), n.to_string())),
                _ => None,
            })
            .collect();
        letters.push(DeadLetter {
            body: message.delivery.data.clone(),
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            headers,
        });
    }
    let _ = channel.close(200, "drained".into()).await;
    letters
}

/// How many messages are ready in `queue` (passive declare).
pub async fn ready_messages(connection: &Connection, queue: &str) -> u32 {
    queue_depth(connection, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// How many messages are ready in `queue`, or `None` if there is no such queue.
pub async fn queue_depth(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    // A failed passive declare closes the channel itself.
    let q = declared.ok()?;
    let _ = channel.close(200, "counted".into()).await;
    Some(q.message_count())
}

pub async fn delete_queues(connection: &Connection, queue: &str, retry: &RetryPolicy) {
    let channel = connection.create_channel().await.unwrap();
    let delay_queues = retry
        .tiers()
        .into_iter()
        .map(|tier| idem::amqp::retry_queue(queue, tier));
    let queues = [queue.to_owned(), idem::amqp::dead_letter_queue(queue)];
    for name in queues.into_iter().chain(delay_queues) {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel.close(200, "cleaned up".into()).await;
}

/// Transfers as they would arrive at `process_group`: bodies and their metadata (the message id
/// is the transfer id).
pub struct Arrivals {
    bodies: Vec<Vec<u8>>,
    metadata: Vec<idem::Metadata>,
}

impl Arrivals {
    pub fn of(transfers: &[(Uuid, &str, i64, bool)]) -> Self {
        let bodies = transfers
            .iter()
            .map(|(id, account, amount, fail)| {
                serde_json::to_vec(&serde_json::json!({
                    "id": id, "account": account, "amount": amount, "fail": fail
                }))
                .unwrap()
            })
            .collect();
        let metadata = transfers
            .iter()
            .map(|(id, ..)| idem::Metadata {
                message_id: Some(id.to_string()),
                ..idem::Metadata::default()
            })
            .collect();
        Self { bodies, metadata }
    }

    /// Runs them through `process_group` as one group: the fast retry policy, no lock order.
    pub async fn in_one_group<DB: Backend, H: Handler<DB>>(
        &self,
        pool: &sqlx::Pool<DB>,
        handler: &H,
    ) -> Vec<idem::transport::Processed> {
        idem::transport::process_group(pool, handler, &self.deliveries(), &fast_policy(), None)
            .await
    }

    pub fn deliveries(&self) -> Vec<idem::transport::Delivery<'_>> {
        self.bodies
            .iter()
            .zip(&self.metadata)
            .map(|(body, metadata)| idem::transport::Delivery {
                body,
                metadata,
                tries_in_place: 0,
                blame_if_unavailable: false,
            })
            .collect()
    }
}

/// The keys story of group commit and batch handlers: two payments applied before, then one
/// group holding the first again, a new one, the second's key reused for another amount, a
/// copy of the new one inside the same group, and another new one.
pub struct KeysStory {
    pub earlier: Uuid,
    pub reused: Uuid,
    pub copied: Uuid,
    pub fresh: Uuid,
    account: &'static str,
}

impl KeysStory {
    pub fn new(account: &'static str) -> Self {
        Self {
            earlier: Uuid::new_v4(),
            reused: Uuid::new_v4(),
            copied: Uuid::new_v4(),
            fresh: Uuid::new_v4(),
            account,
        }
    }

    /// The two payments applied before (amounts 7 and 8).
    pub fn before(&self) -> Arrivals {
        Arrivals::of(&[
            (self.earlier, self.account, 7, false),
            (self.reused, self.account, 8, false),
        ])
    }

    /// The group itself.
    pub fn group(&self) -> Arrivals {
        Arrivals::of(&[
            (self.earlier, self.account, 7, false), // the same payment again
            (self.copied, self.account, 9, false),
            (self.reused, self.account, 999, false), // the key reused for another amount
            (self.copied, self.account, 9, false),   // a second copy inside this very group
            (self.fresh, self.account, 1, false),
        ])
    }

    /// The group's outcomes, each as the message would get it alone: duplicate, applied, key
    /// conflict, duplicate (of the copy applied just before it), applied.
    pub fn assert_outcomes(processed: &[idem::transport::Processed]) {
        use idem::transport::Outcome;
        let outcomes: Vec<_> = processed.iter().map(|p| &p.outcome).collect();
        assert_eq!(*outcomes[0], Outcome::Duplicate);
        assert_eq!(*outcomes[1], Outcome::Applied);
        assert!(
            matches!(
                outcomes[2],
                Outcome::DeadLetter {
                    reason: idem::Reason::KeyConflict,
                    ..
                }
            ),
            "{outcomes:?}"
        );
        assert_eq!(*outcomes[3], Outcome::Duplicate);
        assert_eq!(*outcomes[4], Outcome::Applied);
    }

    /// Every key of the story.
    pub fn keys(&self) -> [Uuid; 4] {
        [self.earlier, self.reused, self.copied, self.fresh]
    }
}

/// Four attempts, 50 ms doubling to 400 ms.
pub fn fast_policy() -> idem::transport::Policy {
    let mut policy = idem::transport::Policy::default();
    policy.retry = RetryPolicy::exponential(Duration::from_millis(50), Duration::from_millis(400))
        .max_attempts(4);
    policy
}
