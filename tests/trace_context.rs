//! Traces across hops (feature `opentelemetry`), on real RabbitMQ and both ledgers: a traced
//! producer's message is handled in a delivery span that continues the producer's trace as a
//! child of the producer's span, and what the handler publishes through the outbox carries the
//! delivery span onward, so the next consumer nests under this hop. A garbage `traceparent`
//! neither fails the message nor travels on.
//!
//! The spans are read back from an in-memory OpenTelemetry exporter behind a
//! `tracing-opentelemetry` layer, installed the way a service installs its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::*;
use idem::amqp::lapin::options::BasicGetOptions;
use idem::amqp::lapin::types::{AMQPValue, FieldTable};
use idem::amqp::lapin::{BasicProperties, Connection};
use idem::amqp::Relay;
use idem::outbox::Route;
use idem::{async_trait, Handler, HandlerError, Tx};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

on_both_backends!(
    the_delivery_span_continues_the_producers_trace_and_the_next_hop_continues_it,
    a_garbage_traceparent_is_applied_in_a_new_trace_and_does_not_travel_on,
);

/// The producer's trace and span, as its W3C `traceparent` names them.
const PRODUCER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// What every test in this binary exports its spans to: a tracing-opentelemetry layer on the
/// global subscriber (the consumer's tasks run on tokio's worker threads), installed once.
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    let (exporter, _provider) = EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        // The simple processor exports each span as it ends: nothing to flush.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("idem-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other subscriber in this test binary");
        (exporter, provider)
    });
    exporter
}

/// The exported delivery span of the message `message_id`, once it has ended (after the ack).
async fn delivery_span_of(message_id: &str) -> SpanData {
    let mut found = None;
    eventually("the delivery span is exported", || {
        found = spans()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|span| {
                span.name == "delivery"
                    && span.attributes.iter().any(|kv| {
                        kv.key.as_str() == "message_id" && kv.value.as_str() == message_id
                    })
            });
        let done = found.is_some();
        async move { done }
    })
    .await;
    found.unwrap()
}

/// Applies a transfer and tells the downstream queue about it through the outbox.
struct Forwarder<DB> {
    consumer: String,
    downstream: String,
    _db: std::marker::PhantomData<fn() -> DB>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, idem::Message)]
#[idem(kind = "transfer.forwarded")]
struct Forwarded {
    #[idem(key)]
    id: Uuid,
}

#[async_trait]
impl<DB: TestDb> Handler<DB> for Forwarder<DB> {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, DB>, t: Transfer) -> Result<(), HandlerError> {
        DB::insert_effect(tx.conn(), &self.consumer, &t).await?;
        tx.publish_to(Route::queue(&self.downstream), &Forwarded { id: t.id })
            .await?;
        Ok(())
    }
}

/// A message as the next consumer would receive it.
struct Downstream(BasicProperties);

impl Downstream {
    fn header(&self, name: &str) -> Option<String> {
        let headers = self.0.headers().as_ref()?;
        Some(headers.inner().get(name)?.as_long_string()?.to_string())
    }
}

/// One hop: a consumer that forwards through the outbox, a relay that publishes the outbox,
/// and the downstream queue, on an outbox of its own (no other test's rows).
struct Hop<DB: TestDb> {
    story: Story<DB>,
    downstream: String,
}

impl<DB: TestDb> Hop<DB> {
    async fn begin(name: &str) -> Self {
        let mut story = Story::<DB>::begin(name).await;
        if DB::NAME == "PostgreSQL" {
            let url = fresh_pg_database(&format!("trace_{}", Uuid::new_v4().simple())).await;
            story.pool = DB::connect(&url, 8).await.unwrap();
            DB::migrate(&story.pool).await.unwrap();
        }
        DB::create_effects(&story.pool).await;
        let downstream = fresh_queue(&format!("{name}-next"));
        declare_durable(&story.connection, &downstream).await;
        Self { story, downstream }
    }

    /// Publishes a transfer with `traceparent` (and a `tracestate`), runs the consumer and the
    /// relay until the forwarded message is downstream; that message.
    async fn send(&self, message_id: &str, traceparent: &str) -> Downstream {
        let story = &self.story;
        let handler = Forwarder::<DB> {
            consumer: story.consumer.clone(),
            downstream: self.downstream.clone(),
            _db: Default::default(),
        };
        let running = story.run(handler).await;
        let relay = Arc::new(
            Relay::builder(story.pool.clone())
                .poll_interval(Duration::from_millis(50))
                .build()
                .unwrap(),
        );
        let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
        let relay_task = tokio::spawn({
            let relay = Arc::clone(&relay);
            async move {
                relay
                    .serve(&amqp_url(), async {
                        let _ = relay_stopped.await;
                    })
                    .await
                    .unwrap();
            }
        });

        let id = Uuid::new_v4();
        publish_with(
            &story.connection,
            &story.queue,
            &transfer_body(id, "acct-t1", 40),
            Some(message_id),
            |p| {
                let mut headers = FieldTable::default();
                for (name, value) in [("traceparent", traceparent), ("tracestate", "idem=t1")] {
                    headers.insert(name.into(), AMQPValue::LongString(value.into()));
                }
                p.with_headers(headers)
            },
        )
        .await;
        running
            .wait_until("the transfer is applied", |s| s.applied == 1)
            .await;
        assert_eq!(story.effects(&id).await, 1);

        let channel = story.connection.create_channel().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let forwarded = loop {
            let got = channel
                .basic_get(
                    self.downstream.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap();
            if let Some(message) = got {
                break Downstream(message.delivery.properties.clone());
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the relay to publish the forwarded message"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let _ = channel.close(200, "received".into()).await;
        running.stop().await;
        stop_relay.send(()).unwrap();
        relay_task.await.unwrap();
        forwarded
    }

    async fn end(self) {
        delete_queue(&self.story.connection, &self.downstream).await;
        self.story.end().await;
    }
}

async fn delete_queue(connection: &Connection, name: &str) {
    let channel = connection.create_channel().await.unwrap();
    let _ = channel.queue_delete(name.into(), Default::default()).await;
    let _ = channel.close(200, "deleted".into()).await;
}

async fn the_delivery_span_continues_the_producers_trace_and_the_next_hop_continues_it<
    DB: TestDb,
>() {
    spans();
    let hop = Hop::<DB>::begin("traced").await;

    // A traced producer (say, an HTTP service instrumented with OpenTelemetry) sends a transfer.
    let message_id = format!("traced-{}", Uuid::new_v4());
    let traceparent = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01");
    let forwarded = hop.send(&message_id, &traceparent).await;

    // The delivery span is in the producer's trace, a child of the producer's span.
    let delivery = delivery_span_of(&message_id).await;
    let trace = TraceId::from_hex(PRODUCER_TRACE).unwrap();
    assert_eq!(delivery.span_context.trace_id(), trace);
    assert_eq!(
        delivery.parent_span_id,
        SpanId::from_hex(PRODUCER_SPAN).unwrap()
    );
    assert!(delivery.parent_span_is_remote);
    assert_eq!(delivery.span_context.trace_state().header(), "idem=t1");

    // The next hop's parent is this delivery span, not the producer's: a chain, not siblings.
    assert_eq!(
        forwarded.header("traceparent").as_deref(),
        Some(format!("00-{PRODUCER_TRACE}-{}-01", delivery.span_context.span_id()).as_str())
    );
    assert_eq!(forwarded.header("tracestate").as_deref(), Some("idem=t1"));
    hop.end().await;
}

async fn a_garbage_traceparent_is_applied_in_a_new_trace_and_does_not_travel_on<DB: TestDb>() {
    spans();
    let hop = Hop::<DB>::begin("garbage").await;

    // A producer with a broken tracing library: the header is there, the trace context is not.
    let message_id = format!("garbage-{}", Uuid::new_v4());
    let forwarded = hop.send(&message_id, "00-not-a-trace-id-01").await;

    // Applied all the same (`send` waited for it), in a span of a new trace of its own.
    let delivery = delivery_span_of(&message_id).await;
    assert_eq!(delivery.parent_span_id, SpanId::INVALID, "not a root span");
    assert!(delivery.span_context.is_valid());
    assert_ne!(
        delivery.span_context.trace_id(),
        TraceId::from_hex(PRODUCER_TRACE).unwrap()
    );

    // Downstream continues that new trace; the garbage (and its tracestate) stopped here.
    assert_eq!(
        forwarded.header("traceparent").as_deref(),
        Some(
            format!(
                "00-{}-{}-01",
                delivery.span_context.trace_id(),
                delivery.span_context.span_id()
            )
            .as_str()
        )
    );
    assert_eq!(forwarded.header("tracestate"), None);
    hop.end().await;
}
