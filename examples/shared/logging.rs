//! The examples' logging: `RUST_LOG` (or a default), lapin's returned-message line off, and
//! `IDEM_LOG_FORMAT=json` for one JSON object per line (what a log pipeline ingests). Traces:
//! `IDEM_OTEL=stdout` (with the feature `opentelemetry`) prints each OpenTelemetry span as it
//! ends, the delivery spans joined to the producer's trace.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// One layer of the examples' subscriber.
type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the subscriber, writing to stdout or stderr. Fails on an `IDEM_LOG_FORMAT` or
/// `IDEM_OTEL` it does not know, saying what to write.
pub fn init(default_filter: &str, to_stderr: bool) -> Result<(), String> {
    let json = match std::env::var("IDEM_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => false,
        Ok("json") => true,
        Ok(other) => {
            return Err(format!(
                "IDEM_LOG_FORMAT={other:?} is not a log format: write `json` (one JSON object per line) or `text` (the default)"
            ))
        }
    };
    // RUST_LOG filters the log lines only: the demo's quiet default must not hide the spans.
    let logs = filter(default_filter);
    let fmt = tracing_subscriber::fmt::layer();
    let fmt: Boxed = match (json, to_stderr) {
        (true, true) => fmt
            .json()
            .with_writer(std::io::stderr)
            .with_filter(logs)
            .boxed(),
        (true, false) => fmt.json().with_filter(logs).boxed(),
        (false, true) => fmt.with_writer(std::io::stderr).with_filter(logs).boxed(),
        (false, false) => fmt.with_filter(logs).boxed(),
    };
    let mut layers = vec![fmt];
    layers.extend(traces()?);
    tracing_subscriber::registry().with(layers).init();
    Ok(())
}

/// `RUST_LOG` (or `default`), with lapin's line about a returned message off: lapin logs a
/// message the broker returns (unroutable) whole, body bytes included, at WARN, and payment
/// details do not belong in logs. idem logs it on one line, destination and message id.
fn filter(default: &str) -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    tracing_subscriber::EnvFilter::new(format!("lapin::returned_messages=off,{spec}"))
}

/// The OpenTelemetry layer `IDEM_OTEL` asks for, if any.
fn traces() -> Result<Option<Boxed>, String> {
    match std::env::var("IDEM_OTEL").as_deref() {
        Err(_) | Ok("") => Ok(None),
        Ok("stdout") => stdout_traces().map(Some),
        Ok(other) => Err(format!(
            "IDEM_OTEL={other:?} is not a trace exporter: write `stdout`, or leave it unset (no traces)"
        )),
    }
}

/// Spans to stdout, each as it ends. A real service exports to a collector instead (OTLP).
#[cfg(feature = "opentelemetry")]
fn stdout_traces() -> Result<Boxed, String> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::filter::LevelFilter;
    // The simple processor writes each span as it ends: nothing is left to flush at exit.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(opentelemetry_stdout::SpanExporter::default())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("idem-example"));
    Ok(layer.with_filter(LevelFilter::INFO).boxed())
}

#[cfg(not(feature = "opentelemetry"))]
fn stdout_traces() -> Result<Boxed, String> {
    Err("IDEM_OTEL=stdout needs the feature `opentelemetry` (cargo run --features opentelemetry --example ...)".into())
}
