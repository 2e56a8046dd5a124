//! The RabbitMQ adapter of idem, on [lapin](https://docs.rs/lapin).
//!
//! A [`Consumer`] declares its durable queue and `<queue>.dlq`, consumes with manual acks and a
//! prefetch, runs each delivery through [`idem_core::process`] (ledger claim, handler and
//! commit in one transaction) on up to `concurrency` tasks, and then:
//!
//! | outcome | what the adapter does |
//! | --- | --- |
//! | applied / duplicate | ack (the result is checked; a failed ack is logged and counted) |
//! | malformed, missing key, handler error | publish to `<queue>.dlq` with `x-idem-reason`, wait for the broker's confirm, then ack |
//! | database unreachable, commit outcome unknown | wait `retry_delay`, then nack with requeue |
//!
//! The stop is graceful: on the shutdown future it cancels the consumer, lets in-flight
//! deliveries finish and ack, and closes its channels.

mod connect;
mod consumer;
mod dead_letter;
mod error;

pub use connect::{connect, shutdown_signal};
pub use consumer::{Consumer, ConsumerBuilder, Stats, CAUSATION_HEADER};
pub use dead_letter::{
    dead_letter_queue, CONSUMER_HEADER, ERROR_HEADER, FAILED_AT_HEADER, QUEUE_HEADER, REASON_HEADER,
};
pub use error::AmqpError;
/// The lapin version idem is built on.
pub use lapin;
