//! Failure stories of the consumer, each proven by counting rows afterwards, on real RabbitMQ
//! and on both ledgers (PostgreSQL and SQLite).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::StreamExt;
use idem::amqp::lapin::options::{BasicConsumeOptions, BasicQosOptions};
use idem::amqp::lapin::types::FieldTable;
use idem::amqp::Consumer;
use idem::{Delivery, Metadata, Outcome};
use std::sync::atomic::Ordering;
use std::time::Duration;
use uuid::Uuid;

/// Runs each story once per ledger backend.
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

on_both_backends!(
    the_same_message_published_three_times_applies_once,
    a_crash_between_commit_and_ack_redelivers_and_applies_once,
    two_consumers_receiving_the_same_key_at_once_apply_it_once,
    a_handler_error_rolls_back_everything_including_the_claim,
    every_malformed_input_class_lands_in_the_dlq_with_its_reason,
    the_ledger_is_scoped_by_consumer,
);

fn consumer_name(story: &str) -> String {
    format!("{story}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

async fn the_same_message_published_three_times_applies_once<DB: TestDb>() {
    let (pool, connection, queue, name) = (
        DB::pool().await,
        connection().await,
        fresh_queue("thrice"),
        consumer_name("thrice"),
    );
    let handler = Recorder::<DB>::new(&name);
    let runs = handler.runs.clone();
    let running = start(
        Consumer::builder(pool.clone(), handler)
            .queue(&queue)
            .build()
            .unwrap(),
    )
    .await;

    // A producer that did not get its confirm publishes again, twice.
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-1", 500);
    for _ in 0..3 {
        publish(&connection, &queue, &body, Some(&id.to_string())).await;
    }
    let consumer = running.consumer.clone();
    eventually("all three copies are handled", || {
        let s = consumer.stats();
        async move { s.applied + s.duplicates == 3 }
    })
    .await;
    let stats = running.stop().await;

    assert_eq!((stats.applied, stats.duplicates), (1, 2));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler body ran for a duplicate"
    );
    assert_eq!(DB::effects(&pool, &name, &id.to_string()).await, 1);
    assert_eq!(ready_messages(&connection, &queue).await, 0);
    delete_queues(&connection, &queue).await;
}

async fn a_crash_between_commit_and_ack_redelivers_and_applies_once<DB: TestDb>() {
    let (pool, connection, queue, name) = (
        DB::pool().await,
        connection().await,
        fresh_queue("crash"),
        consumer_name("crash"),
    );
    let first_life = Recorder::<DB>::new(&name);
    Consumer::builder(pool.clone(), Recorder::<DB>::new(&name))
        .queue(&queue)
        .build()
        .unwrap()
        .declare(&connection)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-2", 700);
    publish(&connection, &queue, &body, Some(&id.to_string())).await;

    // First life: the delivery is processed and committed, then the channel dies before the ack.
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = deliveries.next().await.unwrap().unwrap();
    let metadata = Metadata {
        message_id: Some(id.to_string()),
        ..Metadata::default()
    };
    let processed = idem::process(
        &pool,
        &first_life,
        Delivery {
            body: &delivery.data,
            metadata: &metadata,
        },
    )
    .await;
    assert_eq!(processed.outcome, Outcome::Applied);
    channel
        .close(200, "crash after commit, before ack".into())
        .await
        .unwrap();

    // Second life: the broker redelivers; the ledger has the key; ack without running the handler.
    let second_life = Recorder::<DB>::new(&name);
    let runs = second_life.runs.clone();
    let running = start(
        Consumer::builder(pool.clone(), second_life)
            .queue(&queue)
            .build()
            .unwrap(),
    )
    .await;
    let consumer = running.consumer.clone();
    eventually("the redelivery is handled", || {
        let s = consumer.stats();
        async move { s.duplicates == 1 }
    })
    .await;
    let stats = running.stop().await;

    assert_eq!(stats.applied, 0);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler ran again after the commit"
    );
    assert_eq!(DB::effects(&pool, &name, &id.to_string()).await, 1);
    assert_eq!(
        ready_messages(&connection, &queue).await,
        0,
        "the redelivery was not acked"
    );
    delete_queues(&connection, &queue).await;
}

async fn two_consumers_receiving_the_same_key_at_once_apply_it_once<DB: TestDb>() {
    let (pool, connection, queue, name) = (
        DB::pool().await,
        connection().await,
        fresh_queue("race"),
        consumer_name("race"),
    );
    // Each handler holds its transaction open for a while, so both copies are in flight together.
    let a = Recorder::<DB>::new(&name).pausing(Duration::from_millis(100));
    let b = Recorder::<DB>::new(&name).pausing(Duration::from_millis(100));
    let (runs_a, runs_b) = (a.runs.clone(), b.runs.clone());
    // Prefetch 1 each: the broker hands the two copies of a key to the two consumers in turn.
    let running_a = start(
        Consumer::builder(pool.clone(), a)
            .queue(&queue)
            .prefetch(1)
            .concurrency(1)
            .build()
            .unwrap(),
    )
    .await;
    let running_b = start(
        Consumer::builder(pool.clone(), b)
            .queue(&queue)
            .prefetch(1)
            .concurrency(1)
            .build()
            .unwrap(),
    )
    .await;

    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        let body = transfer_body(*id, "acct-3", 100);
        publish(&connection, &queue, &body, Some(&id.to_string())).await;
        publish(&connection, &queue, &body, Some(&id.to_string())).await;
    }
    let (ca, cb) = (running_a.consumer.clone(), running_b.consumer.clone());
    eventually("both copies of every key are handled", || {
        let (sa, sb) = (ca.stats(), cb.stats());
        async move { sa.applied + sa.duplicates + sb.applied + sb.duplicates == 16 }
    })
    .await;
    let (sa, sb) = (running_a.stop().await, running_b.stop().await);

    for id in &ids {
        assert_eq!(
            DB::effects(&pool, &name, &id.to_string()).await,
            1,
            "key {id} applied more than once"
        );
    }
    assert_eq!(sa.applied + sb.applied, 8);
    assert_eq!(sa.duplicates + sb.duplicates, 8);
    assert!(
        sa.applied + sa.duplicates > 0 && sb.applied + sb.duplicates > 0,
        "one consumer got every copy: the race was not exercised"
    );
    assert_eq!(
        runs_a.load(Ordering::SeqCst) + runs_b.load(Ordering::SeqCst),
        8,
        "a handler body ran for a duplicate"
    );
    delete_queues(&connection, &queue).await;
}

async fn a_handler_error_rolls_back_everything_including_the_claim<DB: TestDb>() {
    let (pool, connection, queue, name) = (
        DB::pool().await,
        connection().await,
        fresh_queue("reject"),
        consumer_name("reject"),
    );
    let running = start(
        Consumer::builder(pool.clone(), Recorder::<DB>::new(&name))
            .queue(&queue)
            .build()
            .unwrap(),
    )
    .await;

    // The handler writes its effect, then fails: the effect and the ledger claim must both vanish.
    let id = Uuid::new_v4();
    let doomed = serde_json::to_vec(
        &serde_json::json!({ "id": id, "account": "acct-4", "amount": 900, "fail": true }),
    )
    .unwrap();
    publish(&connection, &queue, &doomed, Some(&id.to_string())).await;
    let consumer = running.consumer.clone();
    eventually("the failure is dead-lettered", || {
        let s = consumer.stats();
        async move { s.dead_lettered == 1 }
    })
    .await;
    assert_eq!(
        DB::effects(&pool, &name, &id.to_string()).await,
        0,
        "the failed handler's write was committed"
    );
    assert!(
        !DB::claimed(&pool, &name, &id.to_string()).await,
        "the ledger kept the claim of a rolled-back message"
    );

    let letters = drain_dead_letters(&connection, &queue).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.reason(), "rejected");
    assert!(
        letter.headers["x-idem-error"].contains("acct-4 is frozen"),
        "{:?}",
        letter.headers
    );
    assert_eq!(letter.headers["x-idem-consumer"], name);
    assert_eq!(letter.headers["x-idem-original-queue"], queue);
    assert_eq!(letter.body, doomed, "the dead letter's body was altered");
    assert_eq!(letter.message_id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(letter.correlation_id.as_deref(), Some("test-correlation"));

    // Since the claim was rolled back, the fixed message with the same key is applied, not skipped.
    publish(
        &connection,
        &queue,
        &transfer_body(id, "acct-4", 900),
        Some(&id.to_string()),
    )
    .await;
    eventually("the corrected message is applied", || {
        let s = consumer.stats();
        async move { s.applied == 1 }
    })
    .await;
    running.stop().await;
    assert_eq!(DB::effects(&pool, &name, &id.to_string()).await, 1);
    delete_queues(&connection, &queue).await;
}

async fn every_malformed_input_class_lands_in_the_dlq_with_its_reason<DB: TestDb>() {
    let (pool, connection, queue, name) = (
        DB::pool().await,
        connection().await,
        fresh_queue("garbage"),
        consumer_name("garbage"),
    );
    let handler = Recorder::<DB>::new(&name);
    let runs = handler.runs.clone();
    let running = start(
        Consumer::builder(pool.clone(), handler)
            .queue(&queue)
            .build()
            .unwrap(),
    )
    .await;

    let id = Uuid::new_v4();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"payment please".to_vec(), "malformed"),
        ("empty body", Vec::new(), "malformed"),
        ("invalid UTF-8", vec![0x7b, 0xff, 0xfe, 0x7d], "malformed"),
        ("a JSON array", b"[1, 2, 3]".to_vec(), "malformed"),
        (
            "wrong field type",
            format!(r#"{{"id":"{id}","account":5,"amount":1}}"#).into_bytes(),
            "malformed",
        ),
        (
            "missing field",
            format!(r#"{{"id":"{id}","amount":1}}"#).into_bytes(),
            "malformed",
        ),
        (
            "missing key",
            br#"{"account":"a","amount":1}"#.to_vec(),
            "missing-key",
        ),
        (
            "null key",
            br#"{"id":null,"account":"a","amount":1}"#.to_vec(),
            "missing-key",
        ),
        (
            "invalid key",
            br#"{"id":"not-a-uuid","account":"a","amount":1}"#.to_vec(),
            "missing-key",
        ),
    ];
    for (i, (_, body, _)) in cases.iter().enumerate() {
        publish(&connection, &queue, body, Some(&format!("bad-{i}"))).await;
    }
    // The consumer is still alive and well after all that.
    let good = Uuid::new_v4();
    publish(
        &connection,
        &queue,
        &transfer_body(good, "acct-5", 1),
        Some(&good.to_string()),
    )
    .await;
    let consumer = running.consumer.clone();
    let expected = cases.len() as u64;
    eventually("every message has an outcome", || {
        let s = consumer.stats();
        async move { s.dead_lettered == expected && s.applied == 1 }
    })
    .await;
    running.stop().await;

    let letters = drain_dead_letters(&connection, &queue).await;
    assert_eq!(letters.len(), cases.len());
    for (i, (story, body, reason)) in cases.iter().enumerate() {
        let message_id = format!("bad-{i}");
        let letter = letters
            .iter()
            .find(|l| l.message_id.as_deref() == Some(message_id.as_str()))
            .unwrap();
        assert_eq!(letter.reason(), *reason, "{story}: {:?}", letter.headers);
        assert!(
            !letter.headers["x-idem-error"].is_empty(),
            "{story}: no error text"
        );
        assert_eq!(&letter.body, body, "{story}: body not kept byte for byte");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran for bad input"
    );
    assert_eq!(DB::effects(&pool, &name, &good.to_string()).await, 1);
    assert_eq!(ready_messages(&connection, &queue).await, 0);
    delete_queues(&connection, &queue).await;
}

async fn the_ledger_is_scoped_by_consumer<DB: TestDb>() {
    let (pool, connection) = (DB::pool().await, connection().await);
    let (billing, audit) = (consumer_name("billing"), consumer_name("audit"));
    let (billing_queue, audit_queue) = (fresh_queue("billing"), fresh_queue("audit"));
    let running_billing = start(
        Consumer::builder(pool.clone(), Recorder::<DB>::new(&billing))
            .queue(&billing_queue)
            .build()
            .unwrap(),
    )
    .await;
    let running_audit = start(
        Consumer::builder(pool.clone(), Recorder::<DB>::new(&audit))
            .queue(&audit_queue)
            .build()
            .unwrap(),
    )
    .await;

    // One message fanned out to two services; each gets it twice.
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-6", 42);
    for queue in [&billing_queue, &audit_queue, &billing_queue, &audit_queue] {
        publish(&connection, queue, &body, Some(&id.to_string())).await;
    }
    let (cb, ca) = (
        running_billing.consumer.clone(),
        running_audit.consumer.clone(),
    );
    eventually("both services handled both copies", || {
        let (sb, sa) = (cb.stats(), ca.stats());
        async move { sb.applied + sb.duplicates == 2 && sa.applied + sa.duplicates == 2 }
    })
    .await;
    let (sb, sa) = (running_billing.stop().await, running_audit.stop().await);

    assert_eq!((sb.applied, sb.duplicates), (1, 1));
    assert_eq!((sa.applied, sa.duplicates), (1, 1));
    assert_eq!(DB::effects(&pool, &billing, &id.to_string()).await, 1);
    assert_eq!(DB::effects(&pool, &audit, &id.to_string()).await, 1);
    delete_queues(&connection, &billing_queue).await;
    delete_queues(&connection, &audit_queue).await;
}
