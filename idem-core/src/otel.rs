//! OpenTelemetry (feature `opentelemetry`): the delivery span continues the producer's trace, and
//! what a handler publishes continues the delivery span.
//!
//! Everything here goes through the span's `tracing-opentelemetry` layer, which the service
//! installs: without it, the calls below do nothing and the headers are carried over as they
//! came in (see `Tx::publish_to`).

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::BTreeMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A delivery's headers, read by the W3C propagator.
struct Headers<'a>(&'a BTreeMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Makes the producer's span (from `traceparent` / `tracestate` in `headers`) the OpenTelemetry
/// parent of `span`. A missing or invalid `traceparent` leaves `span` as it was (a new root,
/// unless it has a tracing parent): a trace header never fails a delivery.
pub(crate) fn continue_producer_trace(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    if !headers.contains_key("traceparent") {
        return;
    }
    // From an empty context, not `Context::current()`: an invalid header must not make the
    // span a child of whatever context this thread happens to hold.
    let producer =
        TraceContextPropagator::new().extract_with_context(&Context::new(), &Headers(headers));
    if producer.span().span_context().is_valid() {
        // Fails only without a tracing-opentelemetry layer, or for a span filtered out: then
        // there is no OpenTelemetry span to give a parent.
        let _ = span.set_parent(producer);
    }
}

/// The W3C trace context headers of the current span's OpenTelemetry context, or `None` when
/// there is none (no tracing-opentelemetry layer, or the span is filtered out).
pub(crate) fn current_trace_context() -> Option<BTreeMap<String, String>> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut headers = BTreeMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut Injected(&mut headers));
    Some(headers)
}

/// Headers the W3C propagator writes into.
struct Injected<'a>(&'a mut BTreeMap<String, String>);

impl opentelemetry::propagation::Injector for Injected<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes `tracestate` even when it has no entries; W3C lets an empty one
        // be left out, and an empty header is noise on every message.
        if !value.is_empty() {
            self.0.insert(key.to_owned(), value);
        }
    }
}
