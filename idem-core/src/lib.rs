//! The transport-agnostic core of [idem](https://docs.rs/idem): messages and their idempotency
//! keys, the dedup ledger on PostgreSQL and SQLite, the [`Handler`] trait and the one
//! unit-of-work function, [`process`], that runs a delivery as a single transaction.
//!
//! Most users depend on the `idem` facade crate instead, which re-exports all of this together
//! with the `#[idem::handler]` and `#[derive(idem::Message)]` macros and the RabbitMQ adapter.

// Without a backend feature only the transport-agnostic types are usable; the ledger code is
// compiled but unused.
#![cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(unused))]

mod backend;
pub mod backoff;
mod classify;
mod delivery;
mod error;
mod handler;
mod key;
mod message;
pub mod outbox;
mod policy;
mod tx;
mod process;

pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use backend::{Backend, Claim, OutboxBatch};
pub use delivery::{Delivery, Metadata};
pub use error::{redact_url, Error};
pub use handler::{BoxError, ErrorClass, ErrorClassExt, Handler, HandlerError};
pub use key::{Key, KeyError, KeyField};
pub use message::{
    decode_json, json_fingerprint, json_value_parses_as, DecodeError, DecodeErrorKind,
    JsonKeyField, Message,
};
pub use policy::{Policy, RetryPolicy};
/// The sqlx crate idem-core is built on.
pub use sqlx;
pub use tx::Tx;
pub use process::{delivery_span, process, Outcome, Processed, Reason};
