//! The RabbitMQ adapter of idem, on [lapin](https://docs.rs/lapin).
//!
//! A [`Consumer`] declares its durable queue and `<queue>.dlq`, consumes with manual acks and a
//! prefetch, runs each delivery through [`idem_core::process`] (ledger claim, handler and
//! commit in one transaction) on up to `concurrency` tasks, and then:
//!
//! | outcome | what the adapter does |
//! | --- | --- |
//! | applied / duplicate | ack (the result is checked; a failed ack is logged and counted) |
//! | transient handler failure, attempts left | publish to the delay queue `<queue>.retry.<delay>` with `x-idem-attempts`, wait for the confirm, then ack; the queue's TTL routes it back |
//! | malformed, missing key, permanent failure, retries exhausted, key conflict, crash loop | publish to `<queue>.dlq` with `x-idem-reason`, wait for the broker's confirm, then ack |
//! | database unreachable, commit outcome unknown | hold the delivery and run it again with backoff (1 s doubling to 30 s); not an attempt |
//!
//! The acks of a channel go out through one ack window: a `basic.ack(multiple)` covers every
//! delivery up to the highest tag below which all are settled (a group's acks are one frame), and
//! never one still in its transaction, held, or waiting for a confirm; settled deliveries above
//! such a gap wait for it at most 100 ms, then are acked one by one.
//!
//! [`Consumer::serve`] reconnects by itself after a broker restart or a forced close. The stop
//! is graceful: on the shutdown future it cancels the consumer, lets in-flight deliveries finish
//! and ack, and closes its channels.
//!
//! Retries and dead letters carry idem's [`headers`] (`x-idem-*`); [`Relay::serve`] publishes
//! the transactional outbox with the same publisher confirms, after declaring the queues and
//! exchanges it was told its messages go to ([`RelayBuilder::declare_queue`]). One
//! [`Shutdown`] stops every loop of a service on one signal.
//!
//! Consumers and relays record metrics through the [`metrics`](https://docs.rs/metrics) facade
//! (`idem_deliveries_total{consumer, outcome}`, `idem_dead_letters_total{consumer, reason}`,
//! `idem_handler_seconds`, `idem_ready`, `idem_dlq_messages{consumer, queue}`,
//! `idem_outbox_pending`…; the README lists them all): install any exporter in the service,
//! before building the consumer, and they appear; without one they cost next to nothing. A
//! consumer also watches its dead-letter queue and logs one WARN when its depth reaches
//! [`ConsumerBuilder::dlq_alert_threshold`], one INFO when it is back under.

mod connect;
mod consumer;
mod error;
mod fit;
pub mod headers;
mod health;
mod publish;
mod relay;
mod shutdown;
mod telemetry;
mod topology;

pub use connect::{connect, shutdown_signal};
pub use consumer::{Consumer, ConsumerBuilder, ConsumerStats};
pub use error::Error;
pub use health::Health;
/// The lapin version idem is built on.
pub use lapin;
pub use relay::{Relay, RelayBuilder, RelayStats, RELAY_POOL_CONNECTIONS};
pub use shutdown::Shutdown;
pub use topology::{
    check_consumer_queues, consumer_queues, dead_letter_queue, declare_consumer_queues,
    retry_queue, QueueSpec, QueueState, QueueType,
};
