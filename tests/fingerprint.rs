//! What "the same payload" means, on real RabbitMQ and on both ledgers: a duplicate that another
//! client re-serialized (`1.0` for `1`, its own key order) is a duplicate, not a key conflict;
//! and a key reused with a number that differs only past 2^64 is a key conflict, not a
//! duplicate silently acked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::{async_trait, Handler, HandlerError, Tx};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

on_both_backends!(
    a_re_serialized_duplicate_is_a_duplicate_and_a_number_differing_past_2_64_a_key_conflict,
);

/// A payout as two producers write it: one keeps `amount` as a double (and writes `1.0`), the
/// other as an integer (`1`); `sequence` is the upstream ledger's 128-bit entry number, which
/// serde decodes exactly into a `u128`.
#[derive(Debug, serde::Deserialize, idem::Message)]
struct Payout {
    #[idem(key)]
    id: Uuid,
    account: String,
    amount: f64,
    sequence: u128,
}

/// Writes the tests' effect row and remembers what it was given.
struct Payouts<DB> {
    consumer: String,
    seen: Arc<Mutex<Vec<(f64, u128)>>>,
    _db: std::marker::PhantomData<fn() -> DB>,
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for Payouts<DB> {
    type Message = Payout;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, payout: Payout) -> Result<(), HandlerError> {
        self.seen
            .lock()
            .unwrap()
            .push((payout.amount, payout.sequence));
        let effect = Transfer {
            id: payout.id,
            account: payout.account,
            amount: payout.amount as i64,
            fail: false,
        };
        DB::insert_effect(tx.conn(), &self.consumer, &effect).await?;
        Ok(())
    }
}

async fn a_re_serialized_duplicate_is_a_duplicate_and_a_number_differing_past_2_64_a_key_conflict<
    DB: TestDb,
>() {
    let story = Story::<DB>::begin("fingerprint").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Payouts::<DB> {
        consumer: story.consumer.clone(),
        seen: Arc::clone(&seen),
        _db: Default::default(),
    };
    let running = story.run(handler).await;
    let id = Uuid::new_v4();

    let original = format!(
        r#"{{"id":"{id}","account":"acct-f1","amount":1,"sequence":18446744073709551616}}"#
    );
    story
        .publish(original.as_bytes(), Some(&id.to_string()))
        .await;
    running
        .wait_until("the original is applied", |s| s.applied == 1)
        .await;

    // The same payout sent again by a client that keeps amounts as doubles and writes its
    // fields in its own order.
    let reserialized = format!(
        r#"{{ "sequence": 18446744073709551616, "amount": 1.0, "account": "acct-f1", "id": "{id}" }}"#
    );
    story
        .publish(reserialized.as_bytes(), Some(&id.to_string()))
        .await;
    running
        .wait_until("the re-serialized copy is handled", |s| {
            s.duplicates + s.dead_lettered == 1
        })
        .await;
    let stats = running.consumer.stats();
    assert_eq!(
        (stats.duplicates, stats.dead_lettered),
        (1, 0),
        "`1.0` for `1` in another key order is the same payload, not a key conflict: {stats:?}"
    );

    // A producer bug reuses the key for another ledger entry, one past 2^64 (which a double
    // cannot tell from the first).
    let reused = format!(
        r#"{{"id":"{id}","account":"acct-f1","amount":1,"sequence":18446744073709551617}}"#
    );
    story
        .publish(reused.as_bytes(), Some(&id.to_string()))
        .await;
    running
        .wait_until("the reused key is handled", |s| {
            s.duplicates + s.dead_lettered == 2
        })
        .await;
    let stats = running.stop().await;
    assert_eq!(
        (stats.applied, stats.duplicates, stats.dead_lettered),
        (1, 1, 1),
        "a sequence one past 2^64 is another payload: {stats:?}"
    );

    assert_eq!(story.effects(&id).await, 1);
    assert_eq!(
        *seen.lock().unwrap(),
        [(1.0, 18_446_744_073_709_551_616)],
        "the first effect must stand"
    );
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason(), "key-conflict");
    assert_eq!(
        String::from_utf8_lossy(&letters[0].body),
        reused,
        "the dead letter is not the reused key"
    );
    let error = &letters[0].headers["x-idem-error"];
    assert!(error.contains("different payload"), "{error}");
    story.end().await;
}
