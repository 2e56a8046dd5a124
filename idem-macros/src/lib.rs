//! The macros of [idem](https://docs.rs/idem): `#[derive(Message)]`, `#[derive(Publish)]` and
//! `#[handler]`.
//!
//! Use them through the `idem` facade (`#[derive(idem::Message)]`, `#[idem::handler(...)]`);
//! the code they generate names only `::idem::__private::…`, so this crate is not meant to be
//! depended on directly. They are shorthand: everything they write can be written by hand
//! against `idem::Message` and `idem::Handler`.
//!
//! ```
//! #[derive(Debug, serde::Deserialize, idem::Message)]
//! struct PaymentRequested {
//!     #[idem(key)]
//!     payment_id: uuid::Uuid,
//!     amount_cents: i64,
//! }
//!
//! #[idem::handler(consumer = "payments")]
//! async fn capture(tx: &mut idem::Tx<'_, idem::Postgres>, msg: PaymentRequested) -> Result<(), sqlx::Error> {
//!     sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $1")
//!         .bind(msg.amount_cents)
//!         .execute(tx.conn())
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! Errors point at the offending token and say what to write instead; on an error the
//! attribute macro still emits the function unchanged, so editors keep working and no cascade
//! of follow-up errors hides the real one.
//!
//! Each macro is a folder of the same phases, the shape of thiserror-impl and serde_derive:
//! `attr.rs` reads the attributes, `ast.rs` holds the typed input, `valid.rs` checks it and
//! `expand.rs` generates the code; `mod.rs` runs them in that order. Errors that stop a parser
//! (an unknown, malformed or repeated option; an item that is not a function) are reported where
//! the parsing is; `valid.rs` makes every other check, one error per problem. All are collected
//! (`errors.rs`) rather than returned at the first, so that one build shows them all. A folder
//! per macro, not one file per phase for both, because the two macros share nothing but the
//! type and token helpers in `types.rs`.

use proc_macro::TokenStream;

mod errors;
mod handler;
mod message;
mod types;

/// Implements `idem::Message` for a struct with named fields, decoding the body as JSON.
///
/// The struct must also derive (or implement) `serde::Deserialize`. With `serde::Serialize` it
/// can be published as well (`idem::Publish`), under the same kind.
///
/// - `#[idem(key)]` on one field makes it the idempotency key. Allowed types: `Uuid`, `String`,
///   `i16`, `i32`, `i64`, `i128`, `u16`, `u32`, `u64`, `u128`, or an `Option` of one of those
///   (`None` is dead-lettered as `missing-key`). Without a key field the AMQP `message_id` is
///   the key.
/// - `#[idem(kind = "payments.requested")]` on the struct sets the kind shown in logs and
///   dead-letter headers; it defaults to the struct's name.
///
/// The key's JSON name follows the field's `#[serde(rename = "...")]` and the struct's
/// `#[serde(rename_all = "...")]`, so that a body whose key is absent, null or not a valid key
/// is dead-lettered as `missing-key` rather than `malformed`.
///
/// Generic structs are accepted when they have no lifetime parameters; their bounds must make
/// the struct `serde::de::DeserializeOwned` (e.g. `struct Event<T: DeserializeOwned + Send + 'static>`).
#[proc_macro_derive(Message, attributes(idem))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    match syn::parse::<syn::DeriveInput>(input) {
        Ok(input) => message::derive(&input).into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// Implements `idem::Publish` for a struct this service only publishes: its kind, for a
/// `serde::Serialize` body. No `Deserialize`, no key field — publishing needs neither (the
/// outbox gives each message its own deterministic message id, which the consumer dedups on).
///
/// ```
/// #[derive(serde::Serialize, idem::Publish)]
/// #[idem(kind = "inventory.reserved")]
/// struct InventoryReserved<'a> {
///     order_id: uuid::Uuid,
///     sku: &'a str, // a published type may borrow: it is only serialized
///     quantity: u32,
/// }
///
/// # #[derive(Debug, serde::Deserialize, idem::Message)]
/// # struct ReserveStock { #[idem(key)] order_id: uuid::Uuid, sku: String, quantity: u32 }
/// #[idem::handler(consumer = "inventory")]
/// async fn reserve(
///     tx: &mut idem::Tx<'_, idem::Postgres>,
///     msg: ReserveStock,
/// ) -> Result<(), idem::HandlerError> {
///     // ... the reservation itself, on tx.conn() ...
///     let reserved = InventoryReserved {
///         order_id: msg.order_id,
///         sku: &msg.sku,
///         quantity: msg.quantity,
///     };
///     tx.publish(&reserved).await?; // to the queue `inventory.reserved`, after the commit
///     Ok(())
/// }
/// ```
///
/// - `#[idem(kind = "inventory.reserved")]` on the struct sets the kind: the AMQP `type` it is
///   published with, and the queue `Tx::publish` sends it to. It defaults to the struct's name.
/// - The struct must have named fields, so that its body is a JSON object, which is what an idem
///   consumer reads. Generic and borrowing structs are accepted; a generic one is publishable
///   for the parameters that make it `serde::Serialize`.
///
/// A type that is consumed too (a contract shared by the publishing and the consuming service)
/// derives `serde::Serialize, serde::Deserialize, idem::Message` instead: a derived `Message`
/// that is `serde::Serialize` is publishable as it is, under the kind its consumers expect.
/// Deriving `Publish` as well is refused (two implementations of the kind).
#[proc_macro_derive(Publish, attributes(idem))]
pub fn derive_publish(input: TokenStream) -> TokenStream {
    match syn::parse::<syn::DeriveInput>(input) {
        Ok(input) => message::derive_publish(&input).into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// Turns `async fn NAME(tx: &mut idem::Tx<'_, DB>, msg: M) -> Result<T, E>` into a handler.
///
/// `#[idem::handler(consumer = "payments")]`: the consumer name scopes the dedup ledger (two
/// consumers of one message each apply it once).
///
/// `NAME` becomes a unit struct implementing `idem::Handler<DB>` with `Message = M`; the body
/// stays callable as `NAME::call(tx, msg)`. The error type `E` must convert into
/// `idem::HandlerError` (any `std::error::Error + Send + Sync + 'static`, `String`,
/// `anyhow::Error`, `idem::HandlerError` itself). When `E` implements `idem::Classify`, each
/// error's class is what its `class()` says (`OutOfStock` → dead-lettered at once); otherwise
/// idem reads the class from the error's source chain (sqlx errors keep theirs; anything else
/// is transient).
///
/// The handler gets only the transaction handle: it cannot commit, roll back, or reach the pool.
/// idem commits the ledger claim and the handler's writes together, then acknowledges.
///
/// # Batch handlers
///
/// `#[idem::handler(consumer = "payments", batch)]` on
/// `async fn NAME(tx: &mut idem::BatchTx<'_, DB>, msgs: Vec<M>) -> Result<T, E>` makes a handler
/// of whole batches for set-based SQL: with the consumer's `group_commit`, it gets every
/// claimed (first-time) message of a group in one call, in one transaction. `NAME` implements
/// `idem::BatchHandler<DB>` and `idem::Handler<DB>` (a message that runs alone is a batch of
/// one). When it fails, idem splits the batch until the message to blame is alone. What it
/// publishes belongs to one message: `tx.publish_for(i, &event)` for `msgs[i]`.
///
/// ```
/// # #[derive(Debug, serde::Deserialize, idem::Message)]
/// # struct PaymentRequested { #[idem(key)] payment_id: uuid::Uuid, account_id: String, amount_cents: i64 }
/// #[idem::handler(consumer = "payments", batch)]
/// async fn capture(
///     tx: &mut idem::BatchTx<'_, idem::Postgres>,
///     payments: Vec<PaymentRequested>,
/// ) -> Result<(), sqlx::Error> {
///     let accounts: Vec<&str> = payments.iter().map(|p| p.account_id.as_str()).collect();
///     let cents: Vec<i64> = payments.iter().map(|p| p.amount_cents).collect();
///     // Batches side by side lock shared rows in one order, or they deadlock.
///     sqlx::query("SELECT 1 FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE")
///         .bind(&accounts)
///         .execute(tx.conn())
///         .await?;
///     sqlx::query(
///         "UPDATE accounts SET balance_cents = balance_cents + s.cents
///            FROM (SELECT id, SUM(cents)::bigint AS cents
///                    FROM UNNEST($1::text[], $2::bigint[]) AS p(id, cents) GROUP BY id) s
///           WHERE accounts.id = s.id",
///     )
///     .bind(&accounts)
///     .bind(&cents)
///     .execute(tx.conn())
///     .await?;
///     Ok(())
/// }
/// ```
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::attribute(args.into(), item.into()).into()
}
