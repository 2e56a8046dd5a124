//! What "the same payload" means, on real RabbitMQ and on both ledgers: a duplicate that another
//! client re-serialized (`1.0` for `1`, its own key order, its UUID key in upper case or braced,
//! `10E+399` for `1e400`) is a duplicate, not a key conflict; and a key reused with a number
//! that differs only past 2^64 is a key conflict, not a duplicate silently acked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::{async_trait, Handler, HandlerError, Tx};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

on_both_backends!(
    a_re_serialized_duplicate_is_a_duplicate_and_a_number_differing_past_2_64_a_key_conflict,
    the_same_payout_with_its_key_spelled_another_way_is_a_duplicate_and_another_amount_a_conflict,
    unknown_fields_json_cannot_hold_as_text_still_compare_as_values,
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
    seen: Seen,
    _db: std::marker::PhantomData<fn() -> DB>,
}

/// What a payouts handler saw, in order.
type Seen = Arc<Mutex<Vec<(f64, u128)>>>;

impl<DB: TestDb> Payouts<DB> {
    /// A handler for `story`'s consumer, and what it will have seen.
    fn for_story(story: &Story<DB>) -> (Self, Seen) {
        let seen = Seen::default();
        let handler = Self {
            consumer: story.consumer.clone(),
            seen: Arc::clone(&seen),
            _db: Default::default(),
        };
        (handler, seen)
    }
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
    let (handler, seen) = Payouts::<DB>::for_story(&story);
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

/// One producer writes UUIDs in upper case, another braced, a third as a URN: the key is one
/// key, so the payout is one payload; only another amount under it is a key conflict.
async fn the_same_payout_with_its_key_spelled_another_way_is_a_duplicate_and_another_amount_a_conflict<
    DB: TestDb,
>() {
    let story = Story::<DB>::begin("fingerprint-key").await;
    let (handler, seen) = Payouts::<DB>::for_story(&story);
    let running = story.run(handler).await;
    let id = Uuid::new_v4();
    let payout = |id: &str, amount: &str| {
        format!(r#"{{"id":"{id}","account":"acct-f2","amount":{amount},"sequence":7}}"#)
    };

    story
        .publish(payout(&id.to_string(), "10").as_bytes(), None)
        .await;
    running
        .wait_until("the original is applied", |s| s.applied == 1)
        .await;
    let spellings = [
        id.hyphenated().to_string().to_uppercase(),
        id.braced().to_string(),
        id.urn().to_string(),
        id.simple().to_string(),
    ];
    for (sent, spelling) in spellings.iter().enumerate() {
        story
            .publish(payout(spelling, "10.0").as_bytes(), None)
            .await;
        running
            .wait_until("the respelled copy is handled", |s| {
                s.duplicates + s.dead_lettered == sent as u64 + 1
            })
            .await;
    }
    let stats = running.consumer.stats();
    assert_eq!(
        (stats.duplicates, stats.dead_lettered),
        (4, 0),
        "the same payout with its UUID in upper case, braced, as a URN or without hyphens is a \
         duplicate, not a key conflict: {stats:?}"
    );

    // The key reused, braced, for another amount: a conflict, whatever the key's spelling.
    let reused = payout(&id.braced().to_string().to_uppercase(), "11");
    story.publish(reused.as_bytes(), None).await;
    running
        .wait_until("the reused key is handled", |s| s.dead_lettered == 1)
        .await;
    let stats = running.stop().await;
    assert_eq!((stats.applied, stats.duplicates), (1, 4), "{stats:?}");
    assert_eq!(story.effects(&id).await, 1);
    assert_eq!(
        *seen.lock().unwrap(),
        [(10.0, 7)],
        "the first effect must stand"
    );
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason(), "key-conflict");
    assert_eq!(String::from_utf8_lossy(&letters[0].body), reused);
    story.end().await;
}

/// A field the payout does not read may hold what a double or Unicode text cannot (`1e400`, an
/// unpaired surrogate escape). A copy re-serialized by another client (other whitespace, escape
/// case and exponent spelling) is still the same payload; another value there is not.
async fn unknown_fields_json_cannot_hold_as_text_still_compare_as_values<DB: TestDb>() {
    let story = Story::<DB>::begin("fingerprint-odd").await;
    let (handler, seen) = Payouts::<DB>::for_story(&story);
    let running = story.run(handler).await;
    let id = Uuid::new_v4();

    let original = format!(
        r#"{{"id":"{id}","account":"acct-f3","amount":3,"sequence":1,"trace":{{"big":1e400,"tag":"\ud800"}}}}"#
    );
    story.publish(original.as_bytes(), None).await;
    running
        .wait_until("the original is applied", |s| s.applied == 1)
        .await;
    let reserialized = format!(
        "{{ \"trace\" : {{ \"tag\": \"\\uD800\", \"big\": 10E+399 }},\n  \"sequence\": 1, \"amount\": 3, \"account\": \"acct-f3\", \"id\": \"{id}\" }}"
    );
    story.publish(reserialized.as_bytes(), None).await;
    running
        .wait_until("the re-serialized copy is handled", |s| {
            s.duplicates + s.dead_lettered == 1
        })
        .await;
    assert_eq!(
        running.consumer.stats().duplicates,
        1,
        "`1e400` and `10E+399`, `\\ud800` and `\\uD800` are one value each"
    );
    let other = original.replace(r"\ud800", r"\ud801");
    story.publish(other.as_bytes(), None).await;
    running
        .wait_until("the other value is handled", |s| {
            s.duplicates + s.dead_lettered == 2
        })
        .await;
    let stats = running.stop().await;
    assert_eq!(
        (stats.applied, stats.duplicates, stats.dead_lettered),
        (1, 1, 1),
        "another unpaired surrogate is another payload: {stats:?}"
    );
    assert_eq!(*seen.lock().unwrap(), [(3.0, 1)], "the handler ran once");
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters[0].reason(), "key-conflict");
    story.end().await;
}

/// The derive reads a body the way serde reads the struct: a field under its serde alias, the
/// key in any form its type parses, are the same payload.
#[test]
fn the_derived_fingerprint_reads_aliases_and_the_key_as_the_struct_does() {
    use idem::{Key, Message};
    #[derive(Debug, serde::Deserialize, idem::Message)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Refund {
        #[idem(key)]
        #[serde(alias = "id")]
        refund_id: Uuid,
        #[serde(alias = "amount_cents", alias = "cents")]
        amount: i64,
    }
    let id = Uuid::new_v4();
    let key = Key::from(id);
    let fingerprint = |body: String| {
        let refund = Refund::decode(body.as_bytes()).unwrap();
        assert_eq!(refund.key().unwrap(), Some(key.clone()), "{body}");
        Refund::fingerprint(body.as_bytes(), &key)
    };
    let original = fingerprint(format!(r#"{{"refundId":"{id}","amount":5}}"#));
    let upper = id.to_string().to_uppercase();
    for body in [
        format!(r#"{{"id":"{upper}","amount_cents":5}}"#),
        format!(r#"{{"cents":5,"refundId":"{}"}}"#, id.braced()),
        format!(r#"{{"amount":5,"id":"{}"}}"#, id.urn()),
    ] {
        assert_eq!(fingerprint(body.clone()), original, "{body}");
    }
    assert_ne!(
        fingerprint(format!(r#"{{"id":"{id}","cents":6}}"#)),
        original
    );
}
