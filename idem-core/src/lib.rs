//! The transport-agnostic core of [idem](https://docs.rs/idem): messages and their idempotency
//! keys, the dedup ledger on PostgreSQL and SQLite, the [`Handler`] trait and the one
//! unit-of-work function, [`process`], that runs a delivery as a single transaction.
//!
//! Most users depend on the `idem` facade crate instead, which re-exports the user's part of
//! this together with the `#[idem::handler]` and `#[derive(idem::Message)]` macros and the
//! RabbitMQ adapter.
//!
//! | module | owns |
//! | --- | --- |
//! | `message`, `key` | [`Message`] (decode + key: what consuming needs), [`Publish`] (serialize + kind: what publishing needs), [`Key`], JSON decoding with idem's limits |
//! | `handler`, `tx` | [`Handler`], [`HandlerError`] and its [`ErrorClass`], [`Classify`] for your own errors, the handler's [`Tx`] |
//! | `group`, `batch` | group commit ([`process_group`]) and batch handlers ([`BatchHandler`], [`BatchTx`], [`Batch`]) |
//! | `process`, `delivery`, `outcome`, `policy` | the unit of work: [`process()`], its [`Delivery`] input, its [`Outcome`], the limits ([`Policy`], [`RetryPolicy`]) |
//! | `backend` | [`Backend`]: PostgreSQL and SQLite, migrations, the ledger's SQL |
//! | [`outbox`] | messages published in the handler's transaction |
//! | [`backoff`] | the one doubling-with-jitter delay every wait uses |

// Without a backend feature only the transport-agnostic types are usable; the ledger code is
// compiled but unused.
#![cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(unused))]

mod backend;
pub mod backoff;
mod batch;
mod classify;
mod delivery;
mod error;
mod fingerprint;
mod group;
mod handler;
mod key;
pub mod ledger;
mod message;
#[cfg(feature = "opentelemetry")]
mod otel;
pub mod outbox;
mod outcome;
mod policy;
mod process;
#[doc(hidden)]
pub mod purge;
mod transaction;
mod tx;

pub use async_trait::async_trait;
pub use backend::{schema_status, Backend, SchemaStatus};
pub use backoff::Backoff;
pub use batch::{Batch, BatchHandler, BatchTx};
pub use delivery::{Delivery, Metadata};
pub use error::{redact_url, Error};
pub use group::{process_group, LockOrder};
pub use handler::{BoxError, Classify, ErrorClass, ErrorClassExt, Handler, HandlerError};
pub use key::{Key, KeyError};
pub use message::{DecodeError, DecodeErrorKind, Message, Publish, MAX_JSON_DEPTH};
pub use outbox::PublishError;
pub use outcome::{Outcome, Processed, Reason};
pub use policy::{Isolation, Policy, RetryPolicy};
pub use process::{delivery_span, process};
/// The sqlx crate idem-core is built on.
pub use sqlx;
pub use tx::Tx;

/// What `#[derive(idem::Message)]` expands to, through the facade's `__private`. Not an API: it
/// changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::batch::handle_one;
    pub use crate::handler::error_kind;
    pub use crate::key::KeyField;
    pub use crate::message::{
        decode_json, json_message_fingerprint, json_value_parses_as, JsonKeyField, JsonSpelling,
        MessageKind,
    };
    pub use serde::Serialize;
}
