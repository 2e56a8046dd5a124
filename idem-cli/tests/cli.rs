//! The `idem` binary at 3 a.m., driven as an operator drives it, against the real RabbitMQ and
//! PostgreSQL that `scripts/test` starts (and SQLite files).
//!
//! - Dead letters: a payout service rejects transfers to frozen accounts; the operator lists
//!   and reads the dead letters, dry-runs a replay (nothing moves), unfreezes the account,
//!   replays — each transfer is applied exactly once — and purges the malformed one.
//! - A dead letter older than the ledger retention is refused (the ledger may have forgotten
//!   its key), left where it is, and replayed only with `--force`.
//! - The ledger: stats per consumer, a key's record (which message applied it), a purge that
//!   is a dry run first, refuses a horizon under 8 days, then deletes in batches only what is
//!   old.
//! - The outbox: parked messages per destination with the broker's last error; retry; the relays
//!   publishing it (PostgreSQL: partitions each) and what waits where no relay publishes.
//! - Topology and doctor: a queue declared with other arguments is named with the argument;
//!   doctor passes on a healthy service (exit 0) and fails the deploy (exit 1) on dead letters,
//!   parked messages or a wrong database path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../../tests/common/mod.rs"]
mod common;

use common::*;
use idem::amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::BasicProperties;
use idem::{async_trait, Handler, HandlerError, Postgres, Sqlite, Tx};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

on_both_backends!(
    an_operator_reads_fixes_and_replays_dead_letters,
    the_ledger_is_counted_shown_and_purged_in_batches,
    parked_outbox_messages_are_shown_by_destination_and_sent_again,
);

/// What one run of the binary said.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| {
            panic!(
                "not JSON ({error}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    #[track_caller]
    fn succeeded(self) -> Self {
        assert_eq!(self.code, 0, "idem failed: {self:#?}");
        self
    }
}

/// Runs `idem <args>` against the test broker and `database_url`, as an operator's shell would.
async fn idem(database_url: &str, args: &[&str]) -> Ran {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", database_url)
        .env_remove("IDEM_QUEUE")
        .env_remove("IDEM_LEDGER_RETENTION")
        .output()
        .await
        .unwrap();
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// What the stories write behind the binary's back, as a consumer or relay would have, and
/// how the binary is pointed at the database (a test knows idem's schema).
trait Operated: TestDb {
    /// The database URL an operator would export.
    fn url(pool: &sqlx::Pool<Self>) -> String;
    /// Ledger rows for `keys`, applied `days_ago`.
    async fn applied(pool: &sqlx::Pool<Self>, consumer: &str, keys: &[String], days_ago: u32);
    async fn ledger_rows(pool: &sqlx::Pool<Self>, consumer: &str) -> i64;
    /// An outbox row the relay parked after the broker refused it.
    async fn park(pool: &sqlx::Pool<Self>, exchange: &str, routing_key: &str, error: &str);
    async fn parked_rows(pool: &sqlx::Pool<Self>, exchange: &str) -> i64;
}

impl Operated for Postgres {
    fn url(_: &sqlx::Pool<Self>) -> String {
        pg_url()
    }
    async fn applied(pool: &sqlx::Pool<Self>, consumer: &str, keys: &[String], days_ago: u32) {
        sqlx::query(
            "INSERT INTO idem_ledger (consumer, key, payload_hash, processed_at)
             SELECT $1, key, '\\x00'::bytea, now() - $3 * interval '1 day' FROM UNNEST($2::text[]) AS key",
        )
        .bind(consumer)
        .bind(keys)
        .bind(f64::from(days_ago))
        .execute(pool)
        .await
        .unwrap();
    }
    async fn ledger_rows(pool: &sqlx::Pool<Self>, consumer: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_ledger WHERE consumer = $1")
            .bind(consumer)
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn park(pool: &sqlx::Pool<Self>, exchange: &str, routing_key: &str, error: &str) {
        sqlx::query(
            "INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, body, attempts, last_error, parked_at)
             VALUES ($1, $2, $3, 'test', '\\x7b7d'::bytea, 10, $4, now())",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(exchange)
        .bind(routing_key)
        .bind(error)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn parked_rows(pool: &sqlx::Pool<Self>, exchange: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM idem_outbox WHERE exchange = $1 AND parked_at IS NOT NULL",
        )
        .bind(exchange)
        .fetch_one(pool)
        .await
        .unwrap()
    }
}

impl Operated for Sqlite {
    fn url(pool: &sqlx::Pool<Self>) -> String {
        format!(
            "sqlite://{}",
            pool.connect_options().get_filename().display()
        )
    }
    async fn applied(pool: &sqlx::Pool<Self>, consumer: &str, keys: &[String], days_ago: u32) {
        for key in keys {
            sqlx::query(
                "INSERT INTO idem_ledger (consumer, key, payload_hash, processed_at)
                 VALUES ($1, $2, x'00', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $3 || ' days'))",
            )
            .bind(consumer)
            .bind(key)
            .bind(days_ago)
            .execute(pool)
            .await
            .unwrap();
        }
    }
    async fn ledger_rows(pool: &sqlx::Pool<Self>, consumer: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_ledger WHERE consumer = $1")
            .bind(consumer)
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn park(pool: &sqlx::Pool<Self>, exchange: &str, routing_key: &str, error: &str) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        sqlx::query(
            "INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, body, attempts, last_error, parked_ms)
             VALUES ($1, $2, $3, 'test', x'7b7d', 10, $4, $5)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(exchange)
        .bind(routing_key)
        .bind(error)
        .bind(now_ms)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn parked_rows(pool: &sqlx::Pool<Self>, exchange: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM idem_outbox WHERE exchange = $1 AND parked_ms IS NOT NULL",
        )
        .bind(exchange)
        .fetch_one(pool)
        .await
        .unwrap()
    }
}

/// A payout service: a transfer to a frozen account is refused for good (`rejected`) until the
/// account is unfrozen; anything else is written once.
struct Payouts<DB> {
    consumer: String,
    frozen: Arc<Mutex<BTreeSet<String>>>,
    _db: std::marker::PhantomData<fn() -> DB>,
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for Payouts<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, transfer: Transfer) -> Result<(), HandlerError> {
        if self.frozen.lock().unwrap().contains(&transfer.account) {
            return Err(HandlerError::permanent(format!(
                "account {} is frozen",
                transfer.account
            )));
        }
        DB::insert_effect(tx.conn(), &self.consumer, &transfer).await?;
        Ok(())
    }
}

async fn an_operator_reads_fixes_and_replays_dead_letters<DB: Operated>() {
    let story = Story::<DB>::begin("cli-dlq").await;
    let url = DB::url(&story.pool);
    let queue = story.queue.as_str();
    let dlq = idem::amqp::dead_letter_queue(queue);
    let frozen = Arc::new(Mutex::new(BTreeSet::from(["acc-frozen".to_owned()])));
    let running = story
        .run(Payouts {
            consumer: story.consumer.clone(),
            frozen: Arc::clone(&frozen),
            _db: Default::default(),
        })
        .await;

    // Two transfers to the frozen account, one that goes through, one that is not JSON.
    let (first, second, fine) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    story
        .publish(&transfer_body(first, "acc-frozen", 100), Some("msg-first"))
        .await;
    story
        .publish(&transfer_body(second, "acc-frozen", 200), None)
        .await;
    story
        .publish(&transfer_body(fine, "acc-open", 300), None)
        .await;
    story.publish(b"{\"id\": ", Some("msg-broken")).await;
    running
        .wait_until("one applied, three dead-lettered", |s| {
            s.applied == 1 && s.dead_lettered == 3
        })
        .await;

    // The list counts per reason; reading takes nothing.
    let listed = idem(&url, &["dlq", "list", "--queue", queue, "--json"])
        .await
        .succeeded()
        .json();
    let reasons: Vec<(String, u64)> = listed[0]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap().to_owned(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [("malformed".to_owned(), 1), ("rejected".to_owned(), 2)]
    );
    assert_eq!(ready_messages(&story.connection, &dlq).await, 3);

    // One letter by its idempotency key (idem wrote it on the letter): why, and what.
    let shown = idem(
        &url,
        &[
            "dlq",
            "show",
            "--queue",
            queue,
            "--key",
            &second.to_string(),
            "--json",
        ],
    )
    .await
    .succeeded()
    .json();
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["reason"], "rejected");
    assert_eq!(shown[0]["key"], second.to_string());
    assert_eq!(shown[0]["error"], "account acc-frozen is frozen");
    assert!(shown[0]["body"]
        .as_str()
        .unwrap()
        .contains("\"amount\":200"));
    // The human form is a table with the same facts.
    let table = idem(
        &url,
        &["dlq", "show", "--queue", queue, "--key", "msg-first"],
    )
    .await
    .succeeded();
    assert!(
        table.stdout.contains("account acc-frozen is frozen"),
        "{table:?}"
    );
    assert!(table.stdout.contains("msg-first"), "{table:?}");
    assert_eq!(ready_messages(&story.connection, &dlq).await, 3);

    // A replay is a dry run until --yes: nothing moves.
    let dry = idem(
        &url,
        &["dlq", "replay", "--queue", queue, "--reason", "rejected"],
    )
    .await
    .succeeded();
    assert!(dry.stdout.contains("2 would be replayed"), "{dry:?}");
    assert_eq!(ready_messages(&story.connection, &dlq).await, 3);
    assert_eq!(running.consumer.stats().applied, 1);

    // The cause is fixed; the rejected transfers go back and are applied, once each.
    frozen.lock().unwrap().clear();
    let replayed = idem(
        &url,
        &[
            "dlq", "replay", "--queue", queue, "--reason", "rejected", "--yes", "--json",
        ],
    )
    .await
    .succeeded()
    .json();
    assert_eq!(replayed["replayed"].as_array().unwrap().len(), 2);
    running
        .wait_until("the replayed transfers are applied", |s| s.applied == 3)
        .await;
    for key in [first, second, fine] {
        assert_eq!(story.effects(&key).await, 1, "transfer {key}");
    }
    // The ledger knows which message applied the first transfer.
    let record = idem(
        &url,
        &[
            "ledger",
            "show",
            "--consumer",
            &story.consumer,
            &first.to_string(),
            "--json",
        ],
    )
    .await
    .succeeded()
    .json();
    assert_eq!(record["message_id"], "msg-first");
    assert_eq!(record["correlation_id"], "test-correlation");
    assert_eq!(record["fingerprint"].as_str().unwrap().len(), 64);

    // Only the malformed letter is left; purging it is a dry run first.
    assert_eq!(ready_messages(&story.connection, &dlq).await, 1);
    idem(&url, &["dlq", "purge", "--queue", queue])
        .await
        .succeeded();
    assert_eq!(ready_messages(&story.connection, &dlq).await, 1);
    let purged = idem(
        &url,
        &[
            "dlq",
            "purge",
            "--queue",
            queue,
            "--reason",
            "malformed",
            "--yes",
            "--json",
        ],
    )
    .await
    .succeeded()
    .json();
    assert_eq!(purged[0]["deleted"], 1);
    assert_eq!(ready_messages(&story.connection, &dlq).await, 0);
    let stats = running.stop().await;
    assert_eq!(stats.applied, 3);
    story.end().await;
}

/// A dead letter as idem writes one, first failed `days_ago`.
fn letter_properties(queue: &str, days_ago: u64, key: &str) -> BasicProperties {
    let first_failure = idem::amqp::lapin::types::Timestamp::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - days_ago * 86_400,
    );
    let mut headers = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    headers.insert("x-idem-reason".into(), text("retries-exhausted"));
    headers.insert("x-idem-error".into(), text("the bank did not answer"));
    headers.insert("x-idem-attempts".into(), AMQPValue::LongLongInt(8));
    headers.insert(
        "x-idem-first-failure".into(),
        AMQPValue::Timestamp(first_failure),
    );
    headers.insert(
        "x-idem-last-failure".into(),
        AMQPValue::Timestamp(first_failure),
    );
    headers.insert("x-idem-consumer".into(), text("payouts"));
    headers.insert("x-idem-original-queue".into(), text(queue));
    headers.insert("x-idem-key".into(), text(key));
    BasicProperties::default().with_headers(headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_older_than_the_ledger_retention_is_replayed_only_with_force() {
    let connection = connection().await;
    let queue = fresh_queue("cli-old-letter");
    let dlq = idem::amqp::dead_letter_queue(&queue);
    declare_durable(&connection, &queue).await;
    declare_durable(&connection, &dlq).await;
    let (old, recent) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    for (key, days) in [(&old, 40), (&recent, 2)] {
        publish_with(&connection, &dlq, b"{}", Some(key), |_| {
            letter_properties(&queue, days, key)
        })
        .await;
    }
    let url = pg_url();

    // Without --force the old one stays: exit 1, and it says why and what to do.
    let refused = idem(&url, &["dlq", "replay", "--queue", &queue, "--yes"]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stdout.contains("replayed 1 dead letters"),
        "{refused:?}"
    );
    assert!(
        refused
            .stdout
            .contains("older than the ledger retention (30days)")
            && refused.stdout.contains("--force"),
        "{refused:?}"
    );
    assert_eq!(ready_messages(&connection, &queue).await, 1);
    assert_eq!(ready_messages(&connection, &dlq).await, 1);
    let left = idem(&url, &["dlq", "show", "--queue", &queue, "--json"]).await;
    assert_eq!(left.json()[0]["key"], old.as_str());

    // A team with a longer retention says so, or the operator forces it.
    let forced = idem(
        &url,
        &["dlq", "replay", "--queue", &queue, "--yes", "--force"],
    )
    .await
    .succeeded();
    assert!(
        forced.stdout.contains("replayed 1 dead letters"),
        "{forced:?}"
    );
    assert_eq!(ready_messages(&connection, &queue).await, 2);
    assert_eq!(ready_messages(&connection, &dlq).await, 0);

    // The copies start over: no failure headers from their dead-letter days.
    let channel = connection.create_channel().await.unwrap();
    while let Some(copy) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = copy
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        assert!(
            !headers
                .inner()
                .keys()
                .any(|name| name.as_str().starts_with("x-idem-")),
            "{headers:?}"
        );
    }
    delete(&connection, &[&queue, &dlq]).await;
}

async fn delete(connection: &idem::amqp::lapin::Connection, queues: &[&str]) {
    let channel = connection.create_channel().await.unwrap();
    for queue in queues {
        let _ = channel
            .queue_delete((*queue).into(), Default::default())
            .await;
    }
    let _ = channel.close(200, "deleted".into()).await;
}

async fn the_ledger_is_counted_shown_and_purged_in_batches<DB: Operated>() {
    let story = Story::<DB>::begin("cli-ledger").await;
    story.declare().await;
    let url = DB::url(&story.pool);
    let consumer = story.consumer.as_str();
    let keys = |n: usize| -> Vec<String> { (0..n).map(|_| Uuid::new_v4().to_string()).collect() };
    let (ancient, recent) = (keys(23), keys(5));
    DB::applied(&story.pool, consumer, &ancient, 40).await;
    DB::applied(&story.pool, consumer, &recent, 3).await;

    let stats = idem(&url, &["ledger", "stats", "--json"])
        .await
        .succeeded()
        .json();
    let mine = stats["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == consumer)
        .unwrap()
        .clone();
    assert_eq!(mine["rows"], 28);
    assert_eq!(mine["past_retention"], 23);
    assert!(stats["bytes_on_disk"].as_u64().unwrap() > 0, "{stats}");

    // A dry run counts; a horizon under the replay window is refused with the reason.
    let dry = idem(
        &url,
        &[
            "ledger",
            "purge",
            "--older-than",
            "30d",
            "--consumer",
            consumer,
        ],
    )
    .await
    .succeeded();
    assert!(dry.stdout.contains("23 rows would be deleted"), "{dry:?}");
    assert_eq!(DB::ledger_rows(&story.pool, consumer).await, 28);
    let too_short = idem(
        &url,
        &[
            "ledger",
            "purge",
            "--older-than",
            "2d",
            "--consumer",
            consumer,
            "--yes",
        ],
    )
    .await;
    assert_eq!(too_short.code, 1);
    assert!(too_short.stderr.contains("under 8 days"), "{too_short:?}");
    assert_eq!(DB::ledger_rows(&story.pool, consumer).await, 28);

    // In batches of 7: four transactions, and only the old rows go.
    let purged = idem(
        &url,
        &[
            "ledger",
            "purge",
            "--older-than",
            "30d",
            "--consumer",
            consumer,
            "--yes",
            "--batch",
            "7",
            "--json",
        ],
    )
    .await
    .succeeded()
    .json();
    assert_eq!(purged["deleted"], 23);
    assert_eq!(DB::ledger_rows(&story.pool, consumer).await, 5);
    let record = idem(
        &url,
        &[
            "ledger",
            "show",
            "--consumer",
            consumer,
            &recent[0],
            "--json",
        ],
    )
    .await
    .succeeded()
    .json();
    assert_eq!(record["key"], recent[0].as_str());
    let forgotten = idem(
        &url,
        &["ledger", "show", "--consumer", consumer, &ancient[0]],
    )
    .await;
    assert_eq!(forgotten.code, 1);
    assert!(forgotten.stdout.contains("no record"), "{forgotten:?}");
    story.end().await;
}

async fn parked_outbox_messages_are_shown_by_destination_and_sent_again<DB: Operated>() {
    let story = Story::<DB>::begin("cli-outbox").await;
    story.declare().await;
    let url = DB::url(&story.pool);
    // An exchange nobody declared, as the relay parks it after its attempts.
    let exchange = format!("missing-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let refusal = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
    for _ in 0..3 {
        DB::park(&story.pool, &exchange, "payment.captured", &refusal).await;
    }

    let status = idem(&url, &["outbox", "status", "--json"]).await;
    assert_eq!(status.code, 1, "parked messages need attention: {status:?}");
    let status = status.json();
    let parked = status["parked"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["exchange"] == exchange.as_str())
        .unwrap()
        .clone();
    assert_eq!(parked["rows"], 3);
    assert_eq!(parked["routing_key"], "payment.captured");
    assert_eq!(parked["last_error"], refusal.as_str());
    let table = idem(&url, &["outbox", "status"]).await;
    assert!(table.stdout.contains(&refusal), "{table:?}");

    // Fixed (the exchange now exists): a dry run, then the parked rows are due again.
    idem(&url, &["outbox", "retry", "--parked"])
        .await
        .succeeded();
    assert_eq!(DB::parked_rows(&story.pool, &exchange).await, 3);
    let retried = idem(&url, &["outbox", "retry", "--parked", "--yes", "--json"])
        .await
        .succeeded()
        .json();
    assert!(retried["retried"].as_u64().unwrap() >= 3);
    assert_eq!(DB::parked_rows(&story.pool, &exchange).await, 0);
    story.end().await;
}

/// `idem outbox status` on PostgreSQL names the relays of the outbox and how many of its
/// partitions each publishes, and counts the messages waiting where no relay publishes: none
/// while a relay runs, the one written after it stopped once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_names_the_relays_and_what_no_relay_publishes() {
    use idem::Backend;
    let url = fresh_pg_database(&format!("cli_relays_{}", Uuid::new_v4().simple())).await;
    let pool = Postgres::connect(&url, 4).await.unwrap();
    Postgres::migrate(&pool).await.unwrap();
    let relay = Arc::new(idem::amqp::Relay::builder(pool.clone()).build().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = {
        let relay = Arc::clone(&relay);
        tokio::spawn(async move {
            relay
                .serve(&amqp_url(), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        })
    };
    let running = Arc::clone(&relay);
    eventually("the relay holds every partition", || {
        let held = running.partitions();
        async move { held == Some(idem::outbox::PARTITIONS) }
    })
    .await;
    let status = idem(&url, &["outbox", "status", "--json"])
        .await
        .succeeded()
        .json();
    let relays = status["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1, "{status}");
    assert_eq!(relays[0]["partitions"], 32, "{status}");
    assert!(
        relays[0]["relay"].as_str().unwrap().contains("pid "),
        "{status}"
    );
    assert_eq!(status["unheld"], 0, "{status}");
    let table = idem(&url, &["outbox", "status"]).await.succeeded();
    assert!(
        table.stdout.contains("relays: 1") && table.stdout.contains("(32/32 partitions)"),
        "{table:?}"
    );

    // The relay stops; a message is written after it: nothing publishes it, and it says so.
    stop.send(()).unwrap();
    serving.await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let transfer = Transfer {
        id: Uuid::new_v4(),
        account: "acct-cli".into(),
        amount: 1,
        fail: false,
    };
    let message = idem::outbox::Outgoing::json(&transfer, Uuid::new_v4())
        .unwrap()
        .route(idem::outbox::Route::queue(fresh_queue("cli-unheld")));
    idem::outbox::enqueue::<Postgres>(&mut tx, &message)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let status = idem(&url, &["outbox", "status", "--json"])
        .await
        .succeeded()
        .json();
    assert_eq!(status["relays"].as_array().unwrap().len(), 0, "{status}");
    assert_eq!(
        (status["pending"].as_u64(), status["unheld"].as_u64()),
        (Some(1), Some(1))
    );
    let table = idem(&url, &["outbox", "status"]).await.succeeded();
    assert!(
        table.stdout.contains("relays: none running")
            && table
                .stdout
                .contains("1 of them wait in partitions no relay holds"),
        "{table:?}"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_check_names_the_argument_that_differs() {
    let connection = connection().await;
    let queue = fresh_queue("cli-topology");
    let url = pg_url();

    // Nothing declared yet: every queue is missing, and check creates none of them.
    let missing = idem(&url, &["topology", "check", "--queue", &queue, "--json"]).await;
    assert_eq!(missing.code, 1);
    let rows = missing.json();
    assert!(rows
        .as_array()
        .unwrap()
        .iter()
        .all(|row| row["state"] == "missing"));
    assert_eq!(queue_depth(&connection, &queue).await, None);

    // Declared as a consumer would: all match.
    idem(&url, &["topology", "declare", "--queue", &queue])
        .await
        .succeeded();
    idem(&url, &["topology", "check", "--queue", &queue])
        .await
        .succeeded();

    // Someone redeclares the dead-letter queue by hand with a length limit.
    let dlq = idem::amqp::dead_letter_queue(&queue);
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(dlq.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut limited = FieldTable::default();
    limited.insert("x-max-length".into(), AMQPValue::LongLongInt(1000));
    channel
        .queue_declare(dlq.as_str().into(), QueueDeclareOptions::durable(), limited)
        .await
        .unwrap();
    let differs = idem(&url, &["topology", "check", "--queue", &queue, "--json"]).await;
    assert_eq!(differs.code, 1);
    let row = differs
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["queue"] == dlq.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["state"], "differs");
    assert!(
        row["detail"].as_str().unwrap().contains("x-max-length"),
        "{row}"
    );
    // The check changed nothing: the hand-made queue keeps its limit.
    let again = idem(&url, &["topology", "check", "--queue", &queue, "--json"]).await;
    assert_eq!(again.code, 1);
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;

    // Quorum: declared with --queue-type quorum, checked the same way it matches, and checked
    // as classic (the default) the type is what differs.
    let quorum = fresh_queue("cli-quorum");
    idem(
        &url,
        &[
            "topology",
            "declare",
            "--queue",
            &quorum,
            "--queue-type",
            "quorum",
        ],
    )
    .await
    .succeeded();
    idem(
        &url,
        &[
            "topology",
            "check",
            "--queue",
            &quorum,
            "--queue-type",
            "quorum",
        ],
    )
    .await
    .succeeded();
    let as_classic = idem(&url, &["topology", "check", "--queue", &quorum, "--json"]).await;
    assert_eq!(as_classic.code, 1);
    let row = as_classic.json()[0].clone();
    assert_eq!(row["state"], "differs");
    assert!(
        row["detail"].as_str().unwrap().contains("x-queue-type"),
        "{row}"
    );
    let bad = idem(
        &url,
        &[
            "topology",
            "check",
            "--queue",
            &quorum,
            "--queue-type",
            "mirrored",
        ],
    )
    .await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("`quorum`"), "{}", bad.stderr);
    delete_queues(&connection, &quorum, &idem::RetryPolicy::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_healthy_service_and_fails_the_deploy_on_trouble() {
    let connection = connection().await;
    let queue = fresh_queue("cli-doctor");
    // A service's own database, migrated as its consumer does on start.
    let url = fresh_pg_database("idem_cli_doctor").await;
    let pool = <Postgres as idem::Backend>::connect(&url, 2).await.unwrap();
    <Postgres as idem::Backend>::migrate(&pool).await.unwrap();
    idem(&url, &["topology", "declare", "--queue", &queue])
        .await
        .succeeded();

    let healthy = idem(&url, &["doctor", "--queue", &queue, "--json"]).await;
    assert_eq!(healthy.code, 0, "{healthy:?}");
    let report = healthy.json();
    assert_eq!(report["healthy"], true);
    let checks: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for check in ["broker", "database", "migrations", "outbox", "ledger"] {
        assert!(checks.contains(&check), "{checks:?}");
    }

    // A dead letter fails the gate, and the report says where to look.
    let dlq = idem::amqp::dead_letter_queue(&queue);
    publish_with(&connection, &dlq, b"{}", Some("m-1"), |_| {
        letter_properties(&queue, 0, "k-1")
    })
    .await;
    let troubled = idem(&url, &["doctor", "--queue", &queue]).await;
    assert_eq!(troubled.code, 1, "{troubled:?}");
    assert!(
        troubled.stdout.contains("1 messages (over 0)"),
        "{troubled:?}"
    );
    // Unless the team allows some.
    idem(&url, &["doctor", "--queue", &queue, "--dlq-max", "5"])
        .await
        .succeeded();

    // A parked outbox message fails it too.
    Postgres::park(&pool, "nowhere", "x", "NOT_FOUND - no exchange 'nowhere'").await;
    let parked = idem(&url, &["doctor", "--queue", &queue, "--dlq-max", "5"]).await;
    assert_eq!(parked.code, 1, "{parked:?}");
    assert!(parked.stdout.contains("1 parked"), "{parked:?}");

    // A mistyped SQLite path is not a new, empty, healthy database.
    let nowhere = std::env::temp_dir().join(format!("idem-cli-{}.db", Uuid::new_v4()));
    let wrong = idem(
        &format!("sqlite://{}", nowhere.display()),
        &["doctor", "--queue", &queue, "--dlq-max", "5"],
    )
    .await;
    assert_eq!(wrong.code, 1);
    assert!(wrong.stdout.contains("no SQLite database at"), "{wrong:?}");
    assert!(!nowhere.exists());
    pool.close().await;
    delete_queues(&connection, &queue, &idem::RetryPolicy::default()).await;
}
