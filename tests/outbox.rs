//! Failure stories of the transactional outbox and its relay, on real RabbitMQ and on both
//! ledgers: what a handler or a service commits is published, what it rolls back is not, a crash
//! between commit and publish delays a message but never loses it, a relay that dies between the
//! broker's confirm and its own mark causes one extra delivery that the next ledger absorbs, and
//! two relays on PostgreSQL publish each row once. The relay's stories against a broker that
//! will not take a row (refused, unroutable, silent) are in `outbox/refusals.rs`; a new
//! service's first run (a type it only publishes, destinations the relay declares, the log
//! line of an unroutable message) in `outbox/first_run.rs`; the purge of published rows past
//! the retention in `outbox/retention.rs`; several relays dividing a PostgreSQL outbox's
//! partitions, each destination in order, in `outbox/partitions.rs`; what a take beside the
//! batches in flight must still find in `outbox/pipeline.rs`.
//!
//! Over 400 lines on purpose: every outbox story, each on both ledgers, in one file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::amqp::lapin::options::BasicGetOptions;
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::{BasicProperties, Connection};
use idem::amqp::{Relay, RelayStats};
use idem::outbox::{self, Outgoing, Route};
use idem::{async_trait, Backend, Handler, HandlerError, Postgres, Tx};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[path = "outbox/refusals.rs"]
mod refusals;

#[path = "outbox/first_run.rs"]
mod first_run;

#[path = "outbox/retention.rs"]
mod retention;

#[path = "outbox/partitions.rs"]
mod partitions;

#[path = "outbox/pipeline.rs"]
mod pipeline;

on_both_backends!(
    what_a_handler_publishes_goes_out_after_its_commit_and_never_after_a_rollback,
    a_crash_after_the_business_commit_delays_the_message_but_does_not_lose_it,
    a_relay_that_dies_between_confirm_and_mark_causes_one_effect_downstream,
    an_unroutable_message_stays_in_the_outbox_until_its_queue_exists,
    published_rows_are_purged_after_the_retention,
);

/// What the forwarding handler publishes.
#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
#[idem(kind = "transfer.forwarded")]
struct Forwarded {
    #[idem(key)]
    id: Uuid,
    amount: i64,
}

/// Applies a transfer and tells the downstream queue about it, twice (to show the ordinals);
/// a transfer marked `fail` publishes first and then fails, so its rollback must take the
/// outbox rows with it.
struct Forwarder<DB> {
    consumer: String,
    downstream: String,
    _db: std::marker::PhantomData<fn() -> DB>,
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for Forwarder<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, t: Transfer) -> Result<(), HandlerError> {
        DB::insert_effect(tx.conn(), &self.consumer, &t).await?;
        for amount in [t.amount, -t.amount] {
            let forwarded = Forwarded { id: t.id, amount };
            tx.publish_to(Route::queue(&self.downstream), &forwarded)
                .await?;
        }
        if t.fail {
            return Err(HandlerError::permanent("the account is closed"));
        }
        Ok(())
    }
}

/// A relay running in the background until [`RunningRelay::stop`].
struct RunningRelay<DB: Backend> {
    relay: Arc<Relay<DB>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start_relay<DB: Backend>(relay: Relay<DB>) -> RunningRelay<DB> {
    start_relay_on(relay, amqp_url())
}

/// [`start_relay`] on the broker at `url` (through a proxy a test can cut, say).
fn start_relay_on<DB: Backend>(relay: Relay<DB>, url: String) -> RunningRelay<DB> {
    let relay = Arc::new(relay);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let relay = Arc::clone(&relay);
        tokio::spawn(async move {
            relay
                .serve(&url, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        })
    };
    RunningRelay { relay, stop, task }
}

impl<DB: Backend> RunningRelay<DB> {
    async fn until(&self, what: &str, condition: impl Fn(RelayStats) -> bool) {
        let relay = Arc::clone(&self.relay);
        eventually(what, || {
            let met = condition(relay.stats());
            async move { met }
        })
        .await;
    }

    async fn stop(self) -> RelayStats {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
        self.relay.stats()
    }
}

fn fast_relay<DB: Backend>(pool: &sqlx::Pool<DB>) -> Relay<DB> {
    Relay::builder(pool.clone())
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// A message as read back from a queue.
#[derive(Debug)]
struct Received {
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Received {
    fn message_id(&self) -> String {
        self.properties.message_id().as_ref().unwrap().to_string()
    }
    fn header(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        Some(headers.inner().get(name)?.as_long_string()?.to_string())
    }
}

/// Takes every message out of `queue`.
async fn drain(connection: &Connection, queue: &str) -> Vec<Received> {
    let channel = connection.create_channel().await.unwrap();
    let mut received = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        received.push(Received {
            body: message.delivery.data.clone(),
            properties: message.delivery.properties.clone(),
        });
    }
    let _ = channel.close(200, "drained".into()).await;
    received
}

/// Declares a plain durable queue named `name`.
async fn declare_queue(connection: &Connection, name: &str) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions::durable(),
            Default::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "declared".into()).await;
}

async fn delete_queue(connection: &Connection, name: &str) {
    let channel = connection.create_channel().await.unwrap();
    let _ = channel.queue_delete(name.into(), Default::default()).await;
    let _ = channel.close(200, "deleted".into()).await;
}

/// An outbox of its own: a fresh PostgreSQL database or SQLite file per test, so one test's
/// relay never publishes another test's rows.
async fn own_outbox<DB: TestDb>() -> sqlx::Pool<DB> {
    if DB::NAME != "PostgreSQL" {
        return DB::pool().await;
    }
    let url = fresh_pg_database(&format!("outbox_{}", Uuid::new_v4().simple())).await;
    let pool = DB::connect(&url, 8).await.unwrap();
    DB::migrate(&pool).await.unwrap();
    pool
}

/// The amounts of the `Forwarded` messages received, in arrival order.
fn amounts(received: &[Received]) -> Vec<i64> {
    received
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            body["amount"].as_i64().unwrap()
        })
        .collect()
}

/// An outbox row a service writes: a `Forwarded` of `amount` to `queue`, fresh ids.
fn forwarded_to(queue: &str, amount: i64) -> Outgoing {
    let forwarded = Forwarded {
        id: Uuid::new_v4(),
        amount,
    };
    Outgoing::json(&forwarded, Uuid::new_v4())
        .unwrap()
        .route(Route::queue(queue))
}

/// A burst: one outbox row per amount to `queue`, all in one commit.
async fn commit_burst(pool: &sqlx::PgPool, queue: &str, amounts: impl IntoIterator<Item = i64>) {
    let mut tx = pool.begin().await.unwrap();
    for amount in amounts {
        outbox::enqueue::<Postgres>(&mut *tx, &forwarded_to(queue, amount))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Service code: one business row (here: the tests' effect row) and one outbox row, one commit.
async fn place<DB: TestDb>(pool: &sqlx::Pool<DB>, downstream: &str, id: Uuid, amount: i64) {
    let mut tx = pool.begin().await.unwrap();
    let transfer = Transfer {
        id,
        account: "acct-o".into(),
        amount,
        fail: false,
    };
    DB::insert_effect(&mut *tx, "service", &transfer)
        .await
        .unwrap();
    let forwarded = Forwarded { id, amount };
    let message_id = outbox::stable_id("service", &id.to_string());
    let outgoing = Outgoing::json(&forwarded, message_id)
        .unwrap()
        .route(Route::queue(downstream))
        .correlation_id(format!("order-{id}"));
    assert!(outbox::enqueue::<DB>(&mut *tx, &outgoing).await.unwrap());
    // The same step again (a producer retrying after a lost reply): still one row.
    assert!(!outbox::enqueue::<DB>(&mut *tx, &outgoing).await.unwrap());
    tx.commit().await.unwrap();
}

async fn what_a_handler_publishes_goes_out_after_its_commit_and_never_after_a_rollback<
    DB: TestDb,
>() {
    let mut story = Story::<DB>::begin("outbox-handler").await;
    story.pool = own_outbox::<DB>().await;
    DB::create_effects(&story.pool).await;
    let downstream = fresh_queue("forwarded");
    declare_queue(&story.connection, &downstream).await;
    let handler = Forwarder::<DB> {
        consumer: story.consumer.clone(),
        downstream: downstream.clone(),
        _db: Default::default(),
    };
    let running = story.run(handler).await;
    let relay = start_relay(fast_relay(&story.pool));

    let (kept, rolled_back) = (Uuid::new_v4(), Uuid::new_v4());
    // The producer is traced (W3C Trace Context): what the handler publishes continues it.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    publish_with(
        &story.connection,
        &story.queue,
        &transfer_body(kept, "acct-o1", 70),
        Some("inbound-1"),
        |p| {
            let mut headers = FieldTable::default();
            for (name, value) in [("traceparent", traceparent), ("tracestate", "idem=t1")] {
                headers.insert(name.into(), AMQPValue::LongString(value.into()));
            }
            p.with_headers(headers)
        },
    )
    .await;
    let failing =
        serde_json::json!({ "id": rolled_back, "account": "acct-o1", "amount": 5, "fail": true });
    story
        .publish(&serde_json::to_vec(&failing).unwrap(), Some("inbound-2"))
        .await;
    running
        .wait_until("both are handled", |s| {
            s.applied == 1 && s.dead_lettered == 1
        })
        .await;
    relay
        .until("the committed messages are published", |s| s.published == 2)
        .await;
    running.stop().await;
    let stats = relay.stop().await;
    assert_eq!(stats.failed, 0, "{stats:?}");

    let received = drain(&story.connection, &downstream).await;
    assert_eq!(
        received.len(),
        2,
        "the rolled-back handler's messages went out"
    );
    let amounts: Vec<i64> = received
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["amount"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(amounts, [70, -70], "published out of order");
    for r in &received {
        assert_eq!(
            r.properties.kind().as_ref().unwrap().as_str(),
            "transfer.forwarded"
        );
        assert_eq!(
            r.properties.correlation_id().as_ref().unwrap().as_str(),
            "test-correlation",
            "the correlation id is carried over"
        );
        assert_eq!(
            r.header("x-idem-causation-id").as_deref(),
            Some("inbound-1")
        );
        assert_eq!(r.header("traceparent").as_deref(), Some(traceparent));
        assert_eq!(r.header("tracestate").as_deref(), Some("idem=t1"));
        assert_eq!(r.properties.delivery_mode(), &Some(2));
    }
    // Deterministic ids: (consumer, inbound key, ordinal).
    let ids: Vec<String> = received.iter().map(Received::message_id).collect();
    assert_ne!(ids[0], ids[1]);
    let expected_first = outbox::stable_id(&story.consumer, &format!("{kept}\0{}", 0));
    assert_eq!(ids[0], expected_first.to_string());
    assert_eq!(outbox::pending::<DB>(&story.pool).await.unwrap(), 0);
    drain_dead_letters(&story.connection, &story.queue).await;
    delete_queue(&story.connection, &downstream).await;
    story.end().await;
}

async fn a_crash_after_the_business_commit_delays_the_message_but_does_not_lose_it<DB: TestDb>() {
    let pool = own_outbox::<DB>().await;
    DB::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("after-crash");
    declare_queue(&connection, &downstream).await;

    // The service commits its order and the message, then dies before any relay ran.
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        place(&pool, &downstream, *id, i as i64 + 1).await;
    }
    assert_eq!(outbox::pending::<DB>(&pool).await.unwrap(), 5);
    assert!(drain(&connection, &downstream).await.is_empty());

    // Back up: the relay finds the committed rows and delivers them, in order.
    let relay = start_relay(fast_relay(&pool));
    relay
        .until("all five are published", |s| s.published == 5)
        .await;
    relay.stop().await;
    let received = drain(&connection, &downstream).await;
    let got: Vec<String> = received.iter().map(Received::message_id).collect();
    let sent: Vec<String> = ids
        .iter()
        .map(|id| outbox::stable_id("service", &id.to_string()).to_string())
        .collect();
    assert_eq!(got, sent);
    assert_eq!(
        received[0]
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        format!("order-{}", ids[0])
    );
    delete_queue(&connection, &downstream).await;
}

async fn a_relay_that_dies_between_confirm_and_mark_causes_one_effect_downstream<DB: TestDb>() {
    let mut story = Story::<DB>::begin("outbox-twice").await;
    story.pool = own_outbox::<DB>().await;
    DB::create_effects(&story.pool).await;
    // The downstream consumer reads the story's queue.
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let running = story.run(story.recorder()).await;
    for id in &ids {
        let mut tx = story.pool.begin().await.unwrap();
        let transfer = Transfer {
            id: *id,
            account: "acct-o3".into(),
            amount: 3,
            fail: false,
        };
        let outgoing = Outgoing::json(&transfer, outbox::stable_id("service", &id.to_string()))
            .unwrap()
            .route(Route::queue(&story.queue));
        outbox::enqueue::<DB>(&mut *tx, &outgoing).await.unwrap();
        tx.commit().await.unwrap();
    }
    DB::keep_unpublished(&story.pool, &story.queue).await;
    let relay = start_relay(fast_relay(&story.pool));
    relay
        .until("the first relay published", |s| s.published == 10)
        .await;
    relay.stop().await;
    running
        .wait_until("downstream applied them", |s| s.applied == 10)
        .await;

    // The relay died after the broker's confirm and before its mark: the rows are due again.
    DB::forget_published(&story.pool, &story.queue).await;
    let relay = start_relay(fast_relay(&story.pool));
    relay
        .until("the second relay published again", |s| s.published == 10)
        .await;
    relay.stop().await;
    running
        .wait_until("downstream saw the copies", |s| s.duplicates == 10)
        .await;
    let stats = running.stop().await;
    assert_eq!((stats.applied, stats.duplicates), (10, 10));
    for id in &ids {
        assert_eq!(story.effects(id).await, 1, "{id} applied twice downstream");
    }
    story.end().await;
}

async fn an_unroutable_message_stays_in_the_outbox_until_its_queue_exists<DB: TestDb>() {
    let pool = own_outbox::<DB>().await;
    DB::create_effects(&pool).await;
    let connection = connection().await;
    let missing = fresh_queue("not-yet");
    let id = Uuid::new_v4();
    place(&pool, &missing, id, 9).await;

    let relay = start_relay(fast_relay(&pool));
    relay
        .until("the broker returned it", |s| s.failed >= 1)
        .await;
    assert_eq!(
        outbox::pending::<DB>(&pool).await.unwrap(),
        1,
        "the row was given up"
    );
    let error = DB::last_outbox_error(&pool).await;
    assert!(error.contains("unroutable"), "{error}");
    assert!(error.contains(&missing), "{error}");

    // Someone declares the queue: the next attempt (after its backoff) delivers.
    declare_queue(&connection, &missing).await;
    relay.until("it is published", |s| s.published == 1).await;
    relay.stop().await;
    let received = drain(&connection, &missing).await;
    assert_eq!(received.len(), 1);
    delete_queue(&connection, &missing).await;
}

async fn published_rows_are_purged_after_the_retention<DB: TestDb>() {
    let pool = own_outbox::<DB>().await;
    DB::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("purged");
    declare_queue(&connection, &downstream).await;
    place(&pool, &downstream, Uuid::new_v4(), 1).await;

    let relay = Relay::builder(pool.clone())
        .poll_interval(Duration::from_millis(50))
        .retention(Duration::ZERO)
        .build()
        .unwrap();
    let relay = start_relay(relay);
    relay
        .until("published and purged", |s| {
            s.published == 1 && s.purged == 1
        })
        .await;
    relay.stop().await;
    assert_eq!(DB::outbox_rows(&pool).await, 0);
    delete_queue(&connection, &downstream).await;
}

/// Two relays sharing one PostgreSQL outbox (`share_outbox`): `FOR UPDATE SKIP LOCKED` hands
/// each row to one, and both publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_a_postgresql_outbox_publish_each_row_once() {
    let pool = own_outbox::<Postgres>().await;
    <Postgres as TestDb>::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("two-relays");
    declare_queue(&connection, &downstream).await;
    let shared = || {
        Relay::builder(pool.clone())
            .batch_size(20)
            .share_outbox(true)
            .build()
            .unwrap()
    };
    let (first, second) = (start_relay(shared()), start_relay(shared()));
    let ids: Vec<Uuid> = (0..600).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        place(&pool, &downstream, *id, i as i64).await;
    }
    let second_relay = Arc::clone(&second.relay);
    first
        .until("every row is published", |s| {
            s.published + second_relay.stats().published == 600
        })
        .await;
    let (a, b) = (first.stop().await, second.stop().await);
    assert!(
        a.published > 0 && b.published > 0,
        "one relay did all the work: {a:?} {b:?}"
    );
    let received = drain(&connection, &downstream).await;
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for r in &received {
        *copies.entry(r.message_id()).or_default() += 1;
    }
    assert_eq!(copies.len(), 600);
    assert!(
        copies.values().all(|&n| n == 1),
        "a row was published twice"
    );
    delete_queue(&connection, &downstream).await;
}

/// On PostgreSQL the relay wakes on the commit (LISTEN/NOTIFY), not on its poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_wakes_on_commit_not_on_its_poll() {
    let pool = own_outbox::<Postgres>().await;
    <Postgres as TestDb>::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("wake");
    declare_queue(&connection, &downstream).await;
    // A poll interval longer than the test may take: only the notification can wake it.
    let relay = start_relay(
        Relay::builder(pool.clone())
            .poll_interval(Duration::from_secs(600))
            .build()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // let it drain the empty outbox and listen
    place(&pool, &downstream, Uuid::new_v4(), 1).await;
    relay
        .until("the commit woke the relay", |s| s.published == 1)
        .await;
    relay.stop().await;
    assert_eq!(drain(&connection, &downstream).await.len(), 1);
    delete_queue(&connection, &downstream).await;
}

/// SQLite has no row locks to share an outbox: a second relay stands by while the first holds
/// the lease, so nothing is published twice, and takes over when the first is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_sqlite_stands_by_and_takes_over() {
    let pool = own_outbox::<idem::Sqlite>().await;
    <idem::Sqlite as TestDb>::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("sqlite-lease");
    declare_queue(&connection, &downstream).await;
    let first = start_relay(fast_relay(&pool));
    tokio::time::sleep(Duration::from_millis(200)).await; // the first takes the lease
    let second = start_relay(fast_relay(&pool));
    for i in 0..50 {
        place(&pool, &downstream, Uuid::new_v4(), i).await;
    }
    first
        .until("the lease holder publishes", |s| s.published == 50)
        .await;
    assert_eq!(
        second.relay.stats().published,
        0,
        "two relays published one SQLite outbox"
    );

    // The holder stops and hands the lease over; the stand-by takes over.
    first.stop().await;
    for i in 0..5 {
        place(&pool, &downstream, Uuid::new_v4(), i).await;
    }
    let second_relay = Arc::clone(&second.relay);
    eventually("the stand-by takes over", || {
        let published = second_relay.stats().published;
        async move { published == 5 }
    })
    .await;
    second.stop().await;
    let received = drain(&connection, &downstream).await;
    let ids: std::collections::BTreeSet<String> =
        received.iter().map(Received::message_id).collect();
    assert_eq!((received.len(), ids.len()), (55, 55));
    delete_queue(&connection, &downstream).await;
}
