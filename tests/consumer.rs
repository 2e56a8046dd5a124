//! Failure stories of the consumer, each proven by counting rows afterwards, on real RabbitMQ
//! and on both ledgers (PostgreSQL and SQLite).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use futures_util::StreamExt;
use idem::amqp::lapin::options::{BasicConsumeOptions, BasicQosOptions};
use idem::amqp::lapin::types::FieldTable;
use idem::amqp::Consumer;
use idem::transport::{Delivery, Outcome};
use idem::Metadata;
use std::sync::atomic::Ordering;
use std::time::Duration;
use uuid::Uuid;

on_both_backends!(
    the_same_message_published_three_times_applies_once,
    a_crash_between_commit_and_ack_redelivers_and_applies_once,
    two_consumers_receiving_the_same_key_at_once_apply_it_once,
    a_handler_error_rolls_back_everything_including_the_claim,
    every_malformed_input_class_lands_in_the_dlq_with_its_reason,
    the_ledger_is_scoped_by_consumer,
);

async fn the_same_message_published_three_times_applies_once<DB: TestDb>() {
    let story = Story::<DB>::begin("thrice").await;
    let handler = story.recorder();
    let runs = handler.runs.clone();
    let running = story.run(handler).await;

    // A producer that did not get its confirm publishes again, twice.
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-1", 500);
    for _ in 0..3 {
        story.publish(&body, Some(&id.to_string())).await;
    }
    running
        .wait_until("all three copies are handled", |s| {
            s.applied + s.duplicates == 3
        })
        .await;
    let stats = running.stop().await;

    assert_eq!((stats.applied, stats.duplicates), (1, 2));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler body ran for a duplicate"
    );
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

async fn a_crash_between_commit_and_ack_redelivers_and_applies_once<DB: TestDb>() {
    let story = Story::<DB>::begin("crash").await;
    story.declare().await;
    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-2", 700), Some(&id.to_string()))
        .await;

    // First life: the delivery is processed and committed, then the channel dies before the ack.
    let channel = story.connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = channel
        .basic_consume(
            story.queue.as_str().into(),
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
    let first_life = story.recorder();
    let delivered = Delivery {
        body: &delivery.data,
        metadata: &metadata,
        tries_in_place: 0,
        blame_if_unavailable: false,
    };
    let policy = idem::transport::Policy::default();
    let processed = idem::transport::process(&story.pool, &first_life, delivered, &policy).await;
    assert_eq!(processed.outcome, Outcome::Applied);
    channel
        .close(200, "crash after commit, before ack".into())
        .await
        .unwrap();

    // Second life: the broker redelivers; the ledger has the key; ack without running the handler.
    let second_life = story.recorder();
    let runs = second_life.runs.clone();
    let running = story.run(second_life).await;
    running
        .wait_until("the redelivery is handled", |s| s.duplicates == 1)
        .await;
    let stats = running.stop().await;

    assert_eq!(stats.applied, 0);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler ran again after the commit"
    );
    assert_eq!(story.effects(&id).await, 1);
    story.end().await; // nothing left: the redelivery was acked
}

async fn two_consumers_receiving_the_same_key_at_once_apply_it_once<DB: TestDb>() {
    let story = Story::<DB>::begin("race").await;
    // Each handler holds its transaction open for a while, so both copies are in flight together.
    let pause = Duration::from_millis(100);
    let (a, b) = (
        story.recorder().pausing(pause),
        story.recorder().pausing(pause),
    );
    let (runs_a, runs_b) = (a.runs.clone(), b.runs.clone());
    // Prefetch 1 each: the broker hands the two copies of a key to the two consumers in turn.
    let one_at_a_time = |handler| {
        Consumer::builder(story.pool.clone(), handler)
            .queue(&story.queue)
            .prefetch(1)
            .concurrency(1)
            .build()
            .unwrap()
    };
    let running_a = start(one_at_a_time(a)).await;
    let running_b = start(one_at_a_time(b)).await;

    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        let body = transfer_body(*id, "acct-3", 100);
        story.publish(&body, Some(&id.to_string())).await;
        story.publish(&body, Some(&id.to_string())).await;
    }
    let b_consumer = running_b.consumer.clone();
    running_a
        .wait_until("both copies of every key are handled", |sa| {
            let sb = b_consumer.stats();
            sa.applied + sa.duplicates + sb.applied + sb.duplicates == 16
        })
        .await;
    let (sa, sb) = (running_a.stop().await, running_b.stop().await);

    for id in &ids {
        assert_eq!(
            story.effects(id).await,
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
    let runs = runs_a.load(Ordering::SeqCst) + runs_b.load(Ordering::SeqCst);
    assert_eq!(runs, 8, "a handler body ran for a duplicate");
    story.end().await;
}

async fn a_handler_error_rolls_back_everything_including_the_claim<DB: TestDb>() {
    let story = Story::<DB>::begin("reject").await;
    let running = story.run(story.recorder()).await;

    // The handler writes its effect, then fails: the effect and the ledger claim must both vanish.
    let id = Uuid::new_v4();
    let doomed = serde_json::json!({ "id": id, "account": "acct-4", "amount": 900, "fail": true });
    let doomed = serde_json::to_vec(&doomed).unwrap();
    story.publish(&doomed, Some(&id.to_string())).await;
    running
        .wait_until("the failure is dead-lettered", |s| s.dead_lettered == 1)
        .await;
    assert_eq!(
        story.effects(&id).await,
        0,
        "the failed handler's write was committed"
    );
    let claimed = DB::claimed(&story.pool, &story.consumer, &id.to_string()).await;
    assert!(
        !claimed,
        "the ledger kept the claim of a rolled-back message"
    );

    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.reason(), "rejected");
    assert!(
        letter.headers["x-idem-error"].contains("acct-4 is frozen"),
        "{:?}",
        letter.headers
    );
    assert_eq!(letter.headers["x-idem-consumer"], story.consumer);
    assert_eq!(letter.headers["x-idem-original-queue"], story.queue);
    assert_eq!(letter.body, doomed, "the dead letter's body was altered");
    assert_eq!(letter.message_id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(letter.correlation_id.as_deref(), Some("test-correlation"));

    // Since the claim was rolled back, the fixed message with the same key is applied, not skipped.
    story
        .publish(&transfer_body(id, "acct-4", 900), Some(&id.to_string()))
        .await;
    running
        .wait_until("the corrected message is applied", |s| s.applied == 1)
        .await;
    running.stop().await;
    assert_eq!(story.effects(&id).await, 1);
    story.end().await;
}

async fn every_malformed_input_class_lands_in_the_dlq_with_its_reason<DB: TestDb>() {
    let story = Story::<DB>::begin("garbage").await;
    let handler = story.recorder();
    let runs = handler.runs.clone();
    let running = story
        .run_with(handler, |consumer| consumer.max_body_bytes(64 * 1024))
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
        (
            "null field",
            format!(r#"{{"id":"{id}","account":null,"amount":1}}"#).into_bytes(),
            "malformed",
        ),
        (
            "deeply nested JSON",
            format!(
                r#"{{"id":"{id}","account":"a","amount":1,"x":{}{}}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes(),
            "malformed",
        ),
        (
            "over the size limit",
            format!(
                r#"{{"id":"{id}","account":"a","amount":1,"pad":"{}"}}"#,
                "x".repeat(64 * 1024)
            )
            .into_bytes(),
            "malformed",
        ),
    ];
    for (i, (_, body, _)) in cases.iter().enumerate() {
        story.publish(body, Some(&format!("bad-{i}"))).await;
    }
    // A valid body of another kind: published to the wrong queue.
    let refund = transfer_body(Uuid::new_v4(), "acct-5", 1);
    publish_with(
        &story.connection,
        &story.queue,
        &refund,
        Some("bad-kind"),
        |p| p.with_type("refund.requested".into()),
    )
    .await;
    // The consumer is still alive and well after all that.
    let good = Uuid::new_v4();
    story
        .publish(&transfer_body(good, "acct-5", 1), Some(&good.to_string()))
        .await;
    let expected = cases.len() as u64 + 1;
    running
        .wait_until("every message has an outcome", |s| {
            s.dead_lettered == expected && s.applied == 1
        })
        .await;
    running.stop().await;

    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), cases.len() + 1);
    let wrong_kind = letters
        .iter()
        .find(|l| l.message_id.as_deref() == Some("bad-kind"))
        .unwrap();
    assert_eq!(wrong_kind.reason(), "malformed");
    assert!(
        wrong_kind.headers["x-idem-error"].contains("\"refund.requested\""),
        "{:?}",
        wrong_kind.headers
    );
    for (i, (case, body, reason)) in cases.iter().enumerate() {
        let message_id = format!("bad-{i}");
        let letter = letters
            .iter()
            .find(|l| l.message_id.as_deref() == Some(message_id.as_str()))
            .unwrap();
        assert_eq!(letter.reason(), *reason, "{case}: {:?}", letter.headers);
        assert!(
            !letter.headers["x-idem-error"].is_empty(),
            "{case}: no error text"
        );
        assert_eq!(&letter.body, body, "{case}: body not kept byte for byte");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran for bad input"
    );
    assert_eq!(story.effects(&good).await, 1);
    story.end().await;
}

async fn the_ledger_is_scoped_by_consumer<DB: TestDb>() {
    let (billing, audit) = (
        Story::<DB>::begin("billing").await,
        Story::<DB>::begin("audit").await,
    );
    let running_billing = billing.run(billing.recorder()).await;
    // The audit service keeps its ledger in the same database as billing.
    let audit_handler = Recorder::<DB>::new(&audit.consumer);
    let shared_pool = Consumer::builder(billing.pool.clone(), audit_handler).queue(&audit.queue);
    let running_audit = start(shared_pool.build().unwrap()).await;

    // One message fanned out to two services; each gets it twice.
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-6", 42);
    for story in [&billing, &audit, &billing, &audit] {
        publish(
            &story.connection,
            &story.queue,
            &body,
            Some(&id.to_string()),
        )
        .await;
    }
    let audit_consumer = running_audit.consumer.clone();
    running_billing
        .wait_until("both services handled both copies", |sb| {
            let sa = audit_consumer.stats();
            sb.applied + sb.duplicates == 2 && sa.applied + sa.duplicates == 2
        })
        .await;
    let (sb, sa) = (running_billing.stop().await, running_audit.stop().await);

    assert_eq!((sb.applied, sb.duplicates), (1, 1));
    assert_eq!((sa.applied, sa.duplicates), (1, 1));
    assert_eq!(
        DB::effects(&billing.pool, &billing.consumer, &id.to_string()).await,
        1
    );
    assert_eq!(
        DB::effects(&billing.pool, &audit.consumer, &id.to_string()).await,
        1
    );
    billing.end().await;
    audit.end().await;
}
