//! A message without a key field is deduplicated by its AMQP message_id, and one without a
//! usable message_id is dead-lettered `missing-key` instead of being applied blindly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::amqp::Consumer;
use idem::{Postgres, Tx};
use uuid::Uuid;

/// No `#[idem(key)]` field: the producer's message_id is the key.
#[derive(Debug, serde::Deserialize, idem::Message)]
struct Note {
    text: String,
}

#[idem::handler(consumer = "notes")]
async fn keep_note(tx: &mut Tx<'_, Postgres>, note: Note) -> Result<(), sqlx::Error> {
    let key = tx.key().to_string();
    sqlx::query(
        "INSERT INTO test_effects (consumer, key, account, amount) VALUES ('notes', $1, $2, 0)",
    )
    .bind(key)
    .bind(note.text)
    .execute(tx.conn())
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_id_is_the_key_when_the_message_has_no_key_field() {
    let (pool, connection, queue) = (
        <Postgres as TestDb>::pool().await,
        connection().await,
        fresh_queue("notes"),
    );
    let running = start(
        Consumer::builder(pool.clone(), keep_note)
            .queue(&queue)
            .build()
            .unwrap(),
    )
    .await;

    let message_id = format!("note-{}", Uuid::new_v4());
    let body = br#"{"text": "remember the milk"}"#;
    publish(&connection, &queue, body, Some(&message_id)).await;
    publish(&connection, &queue, body, Some(&message_id)).await;
    publish(&connection, &queue, body, None).await;
    publish(&connection, &queue, body, Some(&"x".repeat(250))).await;
    let consumer = running.consumer.clone();
    eventually("all four are handled", || {
        let s = consumer.stats();
        async move { s.applied + s.duplicates + s.dead_lettered == 4 }
    })
    .await;
    let stats = running.stop().await;

    assert_eq!(
        (stats.applied, stats.duplicates, stats.dead_lettered),
        (1, 1, 2)
    );
    assert_eq!(
        <Postgres as TestDb>::effects(&pool, "notes", &message_id).await,
        1
    );
    let letters = drain_dead_letters(&connection, &queue).await;
    assert_eq!(letters.len(), 2);
    assert!(
        letters.iter().all(|l| l.reason() == "missing-key"),
        "{letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|l| l.headers["x-idem-error"].contains("no AMQP message_id")),
        "{letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|l| l.headers["x-idem-error"].contains("250 bytes long")),
        "{letters:?}"
    );
    delete_queues(&connection, &queue).await;
}
