//! What the external producer sends, all chosen from the seed: unique payments, byte-identical
//! duplicates (back to back, from a second connection at the same moment, and late), bad
//! messages of every class, and key conflicts.

use rand::rngs::StdRng;
use rand::seq::{index, SliceRandom};
use rand::Rng;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

/// The kind the payments example declares for its message (AMQP `type`). Half the payments
/// carry it, half carry no `type` at all: both must be accepted.
pub const PAYMENT_KIND: &str = "payment.requested";

const MALFORMED: &str = "malformed";
const MISSING_KEY: &str = "missing-key";
const KEY_CONFLICT: &str = "key-conflict";

/// How much of everything to send.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Unique valid payments.
    pub payments: usize,
    /// Accounts they are spread over.
    pub accounts: usize,
    /// Share of payments published twice (a few three times) back to back.
    pub back_to_back: f64,
    /// Share of payments also published from a second connection at the same moment.
    pub concurrent: f64,
    /// Payments re-published late, once they are known to be applied.
    pub late: usize,
    /// Applied payments sent again with the same payment_id and another amount.
    pub conflicts: usize,
}

/// One AMQP message as the producer publishes it. Every copy of it is these very bytes and
/// properties: a different body under the same key would be a key conflict, not a duplicate.
#[derive(Debug)]
pub struct Msg {
    pub message_id: String,
    /// The AMQP `type` property.
    pub kind: Option<&'static str>,
    pub body: Vec<u8>,
}

/// A unique valid payment: what the database must show once, afterwards.
#[derive(Debug)]
pub struct Payment {
    pub id: String,
    pub account: String,
    pub cents: i64,
    pub message: Arc<Msg>,
}

/// A message that must end up in the DLQ with `reason`.
#[derive(Debug)]
pub struct Bad {
    pub message: Arc<Msg>,
    pub reason: &'static str,
    pub what: String,
}

#[derive(Debug)]
pub struct Workload {
    pub payments: Vec<Payment>,
    /// The main publisher's stream, in order: every payment (some two or three times in a
    /// row) with the bad messages mixed in.
    pub stream: Vec<Arc<Msg>>,
    /// Copies the second connection sends: (position of the original in `stream`, copy).
    pub concurrent: Vec<(usize, Arc<Msg>)>,
    /// Payments (indexes into `payments`) re-published late, after they were applied. All
    /// from the first 40 % of the stream.
    pub late: Vec<usize>,
    /// Key conflicts: (index of the original in `payments`, the conflicting message). The
    /// originals are from the first 40 % of the stream; each is sent only once its original is
    /// known to be applied.
    pub conflicts: Vec<(usize, Bad)>,
    /// What the late publisher sends once the originals are applied: the late copies and the
    /// key conflicts, mixed.
    pub late_stream: Vec<Arc<Msg>>,
    /// The bad messages mixed into `stream`.
    pub bad: Vec<Bad>,
    /// Extra copies in `stream`.
    pub back_to_back: usize,
}

impl Workload {
    pub fn generate(rng: &mut StdRng, sizes: Sizes) -> Self {
        let payments: Vec<Payment> = (0..sizes.payments)
            .map(|_| {
                let id = uuid(rng);
                let account = format!("acct-{:02}", rng.random_range(0..sizes.accounts));
                let cents = rng.random_range(1..=10_000);
                let kind = rng.random_bool(0.5).then_some(PAYMENT_KIND);
                let message = Arc::new(Msg {
                    message_id: id.clone(),
                    kind,
                    body: payment_body(&id, &account, cents),
                });
                Payment {
                    id,
                    account,
                    cents,
                    message,
                }
            })
            .collect();

        let mut stream = Vec::new();
        let mut back_to_back = 0;
        for payment in &payments {
            let extra = if rng.random_bool(sizes.back_to_back / 5.0) {
                2
            } else {
                usize::from(rng.random_bool(sizes.back_to_back))
            };
            for _ in 0..=extra {
                stream.push(Arc::clone(&payment.message));
            }
            back_to_back += extra;
        }
        let bad = bad_messages(rng);
        for bad in &bad {
            let at = rng.random_range(0..=stream.len());
            stream.insert(at, Arc::clone(&bad.message));
        }

        let mut first_position = HashMap::new();
        for (position, message) in stream.iter().enumerate() {
            first_position
                .entry(message.message_id.as_str())
                .or_insert(position);
        }
        let concurrent = payments
            .iter()
            .filter(|_| rng.random_bool(sizes.concurrent))
            .map(|p| (first_position[p.id.as_str()], Arc::clone(&p.message)))
            .collect();

        let early = sizes.payments * 2 / 5;
        let picks = index::sample(rng, early, sizes.late + sizes.conflicts).into_vec();
        let late = picks[..sizes.late].to_vec();
        let conflicts = picks[sizes.late..]
            .iter()
            .map(|&i| {
                let original = &payments[i];
                let cents = original.cents + rng.random_range(1..=500);
                let message = Arc::new(Msg {
                    message_id: uuid(rng),
                    kind: original.message.kind,
                    body: payment_body(&original.id, &original.account, cents),
                });
                let what = format!(
                    "payment {} again with amount_cents {cents} instead of {}",
                    original.id, original.cents
                );
                (
                    i,
                    Bad {
                        message,
                        reason: KEY_CONFLICT,
                        what,
                    },
                )
            })
            .collect::<Vec<_>>();
        let mut late_stream: Vec<Arc<Msg>> = late
            .iter()
            .map(|&i| Arc::clone(&payments[i].message))
            .chain(conflicts.iter().map(|(_, bad)| Arc::clone(&bad.message)))
            .collect();
        late_stream.shuffle(rng);

        Self {
            payments,
            stream,
            concurrent,
            late,
            conflicts,
            late_stream,
            bad,
            back_to_back,
        }
    }
}

/// A v4 UUID from the seeded generator.
fn uuid(rng: &mut StdRng) -> String {
    uuid::Builder::from_random_bytes(rng.random::<u128>().to_le_bytes())
        .into_uuid()
        .to_string()
}

fn payment_body(id: &str, account: &str, cents: i64) -> Vec<u8> {
    json_bytes(
        json!({ "payment_id": id, "account_id": account, "amount_cents": cents, "currency": "EUR" }),
    )
}

fn json_bytes(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

/// Two of every class of bad input, each with a key (where it has one) that no valid payment
/// uses and a message_id of its own to find it by in the DLQ.
fn bad_messages(rng: &mut StdRng) -> Vec<Bad> {
    let mut bad = Vec::new();
    for _ in 0..2 {
        let id: Vec<String> = (0..14).map(|_| uuid(rng)).collect();
        let negative = -rng.random_range(1..=10_000i64);
        let valid = |id: &str| json!({ "payment_id": id, "account_id": "acct-00", "amount_cents": 100, "currency": "EUR" });
        let with = |id: &str, field: &str, value: serde_json::Value| {
            let mut body = valid(id);
            body[field] = value;
            json_bytes(body)
        };
        let without_key = {
            let mut body = valid("");
            body.as_object_mut().unwrap().remove("payment_id");
            json_bytes(body)
        };
        let invalid_utf8 = [
            br#"{"payment_id":""#.as_slice(),
            id[1].as_bytes(),
            br#"","account_id":"acct-"#,
            &[0xff, 0xfe],
            br#"","amount_cents":100,"currency":"EUR"}"#,
        ]
        .concat();
        let nested = format!(
            r#"{{"payment_id":"{}","account_id":"acct-00","amount_cents":100,"currency":"EUR","extra":{}{}}}"#,
            id[11],
            "[".repeat(10_000),
            "]".repeat(10_000)
        )
        .into_bytes();
        let cases: [(&str, Vec<u8>, Option<&'static str>, &'static str); 14] = [
            ("an empty body", Vec::new(), None, MALFORMED),
            ("invalid UTF-8", invalid_utf8, None, MALFORMED),
            (
                "not JSON",
                b"capture 100 EUR please".to_vec(),
                None,
                MALFORMED,
            ),
            (
                "amount_cents \"ten\"",
                with(&id[3], "amount_cents", json!("ten")),
                None,
                MALFORMED,
            ),
            (
                "account_id null",
                with(&id[4], "account_id", json!(null)),
                None,
                MALFORMED,
            ),
            (
                "payment_id null",
                with(&id[5], "payment_id", json!(null)),
                None,
                MISSING_KEY,
            ),
            ("no payment_id", without_key, None, MISSING_KEY),
            (
                "payment_id \"not-a-uuid\"",
                with(&id[7], "payment_id", json!("not-a-uuid")),
                None,
                MISSING_KEY,
            ),
            (
                "amount_cents 0",
                with(&id[8], "amount_cents", json!(0)),
                None,
                MALFORMED,
            ),
            (
                "a negative amount_cents",
                with(&id[9], "amount_cents", json!(negative)),
                None,
                MALFORMED,
            ),
            (
                "currency \"eur\"",
                with(&id[10], "currency", json!("eur")),
                None,
                MALFORMED,
            ),
            (
                "an extra field nested 10 000 arrays deep",
                nested,
                None,
                MALFORMED,
            ),
            (
                "a body over 1 MiB",
                with(&id[12], "padding", json!("x".repeat(1024 * 1024 + 1024))),
                None,
                MALFORMED,
            ),
            (
                "a valid body of AMQP type refund.requested",
                json_bytes(valid(&id[13])),
                Some("refund.requested"),
                MALFORMED,
            ),
        ];
        for (what, body, kind, reason) in cases {
            bad.push(Bad {
                message: Arc::new(Msg {
                    message_id: uuid(rng),
                    kind,
                    body,
                }),
                reason,
                what: what.to_owned(),
            });
        }
    }
    bad
}
