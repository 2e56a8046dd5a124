//! A message without a key field is deduplicated by its AMQP message_id, and one without a
//! usable message_id is dead-lettered `missing-key` instead of being applied blindly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
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
    let story = Story::<Postgres>::begin("notes").await;
    let running = story.run(keep_note).await;

    let message_id = format!("note-{}", Uuid::new_v4());
    let body = br#"{"text": "remember the milk"}"#;
    story.publish(body, Some(&message_id)).await;
    story.publish(body, Some(&message_id)).await;
    story.publish(body, None).await;
    story.publish(body, Some(&"x".repeat(250))).await;
    running
        .wait_until("all four are handled", |s| {
            s.applied + s.duplicates + s.dead_lettered == 4
        })
        .await;
    let stats = running.stop().await;

    assert_eq!(
        (stats.applied, stats.duplicates, stats.dead_lettered),
        (1, 1, 2)
    );
    assert_eq!(
        <Postgres as TestDb>::effects(&story.pool, "notes", &message_id).await,
        1
    );
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 2);
    assert!(
        letters.iter().all(|l| l.reason() == "missing-key"),
        "{letters:?}"
    );
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l.headers["x-idem-error"].as_str())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("no AMQP message_id")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("250 bytes long")),
        "{errors:?}"
    );
    story.end().await;
}
