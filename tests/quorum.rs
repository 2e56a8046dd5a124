//! Quorum queues (`ConsumerBuilder::queue_type(QueueType::Quorum)`) on the test broker: the
//! queue, its dead letters and its delay queues are declared quorum, a retry comes back from a
//! quorum delay queue (at-least-once dead-lettering) and applies once, a queue of the other
//! type is refused at start with the argument named, and the crash-loop guard takes the broker's
//! `x-delivery-count` instead of writing a count of its own — without trusting a producer's.
//! A quorum queue runs on one node too; the cluster story (node loss) is tests/cluster.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::StreamExt;
use idem::amqp::lapin::options::{BasicConsumeOptions, BasicQosOptions};
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::{check_consumer_queues, Consumer, QueueState, QueueType, Relay};
use idem::outbox::{self, Outgoing, Route};
use idem::Postgres;
use std::sync::atomic::Ordering;
use std::time::Duration;
use uuid::Uuid;

/// The story's queues, declared quorum as its consumer does on start.
async fn declare_quorum(story: &Story<Postgres>) {
    Consumer::builder(story.pool.clone(), story.recorder())
        .queue(&story.queue)
        .retry(story.retry)
        .queue_type(QueueType::Quorum)
        .build()
        .unwrap()
        .declare(&story.connection)
        .await
        .unwrap();
}

/// idem's crash-loop counts written for the story's consumer.
async fn counts_written(story: &Story<Postgres>) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM idem_redeliveries WHERE consumer = $1")
        .bind(&story.consumer)
        .fetch_one(&story.pool)
        .await
        .unwrap()
}

/// A consumer that takes the queue's next message and dies before acking it (its connection
/// closed): the broker returns the message and counts the delivery.
async fn take_and_die(queue: &str) {
    let connection = connection().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "dies-mid-message".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("no delivery within 10 s")
        .unwrap()
        .unwrap();
    drop(delivery);
    let _ = connection.close(320, "died mid-message".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_consumer_declares_quorum_queues_and_a_retry_comes_back_through_one_once() {
    let story = Story::<Postgres>::begin("quorum-retry").await;
    // A lock timeout, twice: the third attempt gets through, after two trips through the
    // quorum delay queues.
    let handler = story.recorder().failing_transiently(2);
    let runs = handler.runs.clone();
    let running = story
        .run_with(handler, |b| b.queue_type(QueueType::Quorum))
        .await;
    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-q1", 250), Some(&id.to_string()))
        .await;
    running
        .wait_until("the third attempt is applied", |s| s.applied == 1)
        .await;
    let stats = running.stop().await;
    assert_eq!((stats.retried, stats.dead_lettered), (2, 0), "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(story.effects(&id).await, 1);

    // Every queue of the topology is what a quorum consumer declares, and not what a classic
    // one would: the broker refuses that declaration, naming the argument.
    let as_quorum = check_consumer_queues(
        &story.connection,
        &story.queue,
        &story.retry,
        QueueType::Quorum,
    )
    .await
    .unwrap();
    assert!(as_quorum.len() >= 3, "{as_quorum:?}");
    for (spec, state) in &as_quorum {
        assert!(
            matches!(state, QueueState::Matches { .. }),
            "{}: {state:?}",
            spec.name
        );
    }
    let as_classic = check_consumer_queues(
        &story.connection,
        &story.queue,
        &story.retry,
        QueueType::Classic,
    )
    .await
    .unwrap();
    match &as_classic[0].1 {
        QueueState::Differs(words) => assert!(words.contains("x-queue-type"), "{words}"),
        other => panic!("a quorum queue checked as classic: {other:?}"),
    }
    story.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_is_not_taken_for_a_quorum_one_the_consumer_fails_at_start() {
    let story = Story::<Postgres>::begin("quorum-over-classic").await;
    story.declare().await; // classic, as every earlier idem declared it
    let consumer = Consumer::builder(story.pool.clone(), story.recorder())
        .queue(&story.queue)
        .retry(story.retry)
        .queue_type(QueueType::Quorum)
        .build()
        .unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.serve(&amqp_url(), std::future::pending::<()>()),
    )
    .await
    .expect("the consumer started on a queue of the other type")
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains(&story.queue) && refused.contains("x-queue-type"),
        "{refused}"
    );
    story.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_quorum_queue_the_crash_loop_guard_takes_the_brokers_count_and_writes_none() {
    const LIMIT: u32 = 2;
    let story = Story::<Postgres>::begin("quorum-crashloop").await;
    declare_quorum(&story).await;

    // A message whose consumers died on it three times (over the limit of 2)...
    let doomed = Uuid::new_v4();
    story
        .publish(
            &transfer_body(doomed, "acct-q2", 1),
            Some(&doomed.to_string()),
        )
        .await;
    for _ in 0..=LIMIT {
        take_and_die(&story.queue).await;
    }
    let running = story
        .run_with(story.recorder(), |b| {
            b.queue_type(QueueType::Quorum).crash_loop_limit(LIMIT)
        })
        .await;
    running
        .wait_until("the doomed message is dead-lettered", |s| {
            s.dead_lettered == 1
        })
        .await;
    running.stop().await;
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id.as_deref(), Some(&*doomed.to_string()));
    assert_eq!(
        letters[0].reason(),
        "crash-loop",
        "{:?}",
        letters[0].headers
    );
    assert_eq!(story.effects(&doomed).await, 0);

    // A message whose consumer died on it once (within the limit) is applied; so is one whose
    // producer wrote the broker's header itself (99) on a first delivery: not trusted.
    let returned_once = Uuid::new_v4();
    story
        .publish(
            &transfer_body(returned_once, "acct-q2", 2),
            Some(&returned_once.to_string()),
        )
        .await;
    take_and_die(&story.queue).await;
    let forged = Uuid::new_v4();
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(99));
    publish_with(
        &story.connection,
        &story.queue,
        &transfer_body(forged, "acct-q2", 3),
        Some(&forged.to_string()),
        |p| p.with_headers(headers),
    )
    .await;
    let running = story
        .run_with(story.recorder(), |b| {
            b.queue_type(QueueType::Quorum).crash_loop_limit(LIMIT)
        })
        .await;
    running
        .wait_until("both are applied", |s| s.applied == 2)
        .await;
    let stats = running.stop().await;
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(story.effects(&returned_once).await, 1);
    assert_eq!(story.effects(&forged).await, 1);

    // Every redelivery was counted by the broker: idem wrote no count of its own.
    assert_eq!(counts_written(&story).await, 0);
    story.end().await;
}

/// The relay on quorum queues: it declares the queue quorum (as the consumer does: the two
/// declarations agree), publishes with confirms, and the quorum consumer applies each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_publishes_to_a_quorum_queue_that_it_declares_as_its_consumer_does() {
    let mut story = Story::<Postgres>::begin("quorum-relay").await;
    // An outbox of its own: this relay must not publish another test's rows.
    let url = fresh_pg_database(&format!("quorum_{}", Uuid::new_v4().simple())).await;
    story.pool = <Postgres as idem::Backend>::connect(&url, 8).await.unwrap();
    <Postgres as idem::Backend>::migrate(&story.pool)
        .await
        .unwrap();
    <Postgres as TestDb>::create_effects(&story.pool).await;

    let relay = std::sync::Arc::new(
        Relay::builder(story.pool.clone())
            .declare_queue(&story.queue)
            .queue_type(QueueType::Quorum)
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relaying = tokio::spawn({
        let relay = std::sync::Arc::clone(&relay);
        async move {
            relay
                .serve(&amqp_url(), async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        let transfer = Transfer {
            id: *id,
            account: "acct-q3".into(),
            amount: i as i64,
            fail: false,
        };
        let outgoing = Outgoing::json(&transfer, Uuid::new_v4())
            .unwrap()
            .route(Route::queue(&story.queue));
        let mut tx = story.pool.begin().await.unwrap();
        assert!(outbox::enqueue::<Postgres>(&mut *tx, &outgoing)
            .await
            .unwrap());
        tx.commit().await.unwrap();
    }
    let running = story
        .run_with(story.recorder(), |b| b.queue_type(QueueType::Quorum))
        .await;
    running
        .wait_until("every relayed transfer is applied", |s| s.applied == 20)
        .await;
    running.stop().await;
    stop.send(()).unwrap();
    relaying.await.unwrap().unwrap();
    assert_eq!(relay.stats().published, 20);
    for id in &ids {
        assert_eq!(story.effects(id).await, 1);
    }
    story.end().await;
}

/// The story's recording consumer on its queue, as a service builds it (classic queues).
fn recording_consumer(story: &Story<Postgres>) -> Consumer<Postgres, Recorder<Postgres>> {
    Consumer::builder(story.pool.clone(), story.recorder())
        .queue(&story.queue)
        .retry(story.retry)
        .build()
        .unwrap()
}

/// `AMQP_URL` listing several nodes: the first does not answer (nothing listens there), the
/// consumer takes the next and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_several_nodes_a_consumer_connects_to_the_first_that_answers() {
    let story = Story::<Postgres>::begin("failover").await;
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", amqp_url());
    let running = serve_on(recording_consumer(&story), &nodes);
    eventually("the consumer is subscribed", || {
        let connection = &story.connection;
        let queue = story.queue.clone();
        async move { queue_depth(connection, &queue).await.is_some() }
    })
    .await;
    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-q4", 5), Some(&id.to_string()))
        .await;
    running
        .wait_until("the transfer is applied", |s| s.applied == 1)
        .await;
    running.stop().await;
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

/// A node that accepts the TCP connection and then says nothing (a hung broker, a load balancer
/// in front of a dead one): the consumer gives it 10 s, then takes the next node in the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_accepts_and_never_answers_is_given_up_for_the_next() {
    let story = Story::<Postgres>::begin("silent-node").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    // Accepts every connection and holds it open without a byte of AMQP.
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let nodes = format!(
        "amqp://guest:guest@127.0.0.1:{silent_port}/%2f,{}",
        amqp_url()
    );
    let started = std::time::Instant::now();
    let running = serve_on(recording_consumer(&story), &nodes);
    let id = Uuid::new_v4();
    story.declare().await;
    story
        .publish(&transfer_body(id, "acct-q5", 5), Some(&id.to_string()))
        .await;
    running
        .wait_until("the transfer is applied through the second node", |s| {
            s.applied == 1
        })
        .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "the silent node was not tried first ({waited:?})"
    );
    running.stop().await;
    holding.abort();
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}
