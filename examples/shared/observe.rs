//! `/metrics`, `/healthz` and `/readyz` for an example service, on one small HTTP/1.1 listener:
//! the Prometheus exporter's own listener cannot serve the health routes beside its metrics, and
//! the library stays free of any exporter or HTTP server. A service would use its web
//! framework's router; this is just enough HTTP for Prometheus and a Kubernetes probe.

use idem::amqp::Health;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where a health answer comes from (the consumer's `health()`); `None` in a process without
/// a consumer (a relay alone): it is live while it answers, and ready, having no traffic to
/// turn away.
pub type HealthSource = Option<Arc<dyn Fn() -> Health + Send + Sync>>;

/// Latency buckets for the `_seconds` histograms, from a fast commit to a long retry backoff.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder (before the consumer and relay record anything) and binds
/// `addr`, so a port in use fails the start rather than a scrape.
pub async fn install(addr: &str) -> Result<Endpoint, Box<dyn std::error::Error + Send + Sync>> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| format!("cannot listen on IDEM_METRICS_ADDR {addr}: {error}"))?;
    Ok(Endpoint {
        prometheus,
        listener,
    })
}

/// A bound listener and the recorder's handle, not serving yet.
pub struct Endpoint {
    prometheus: PrometheusHandle,
    listener: TcpListener,
}

impl Endpoint {
    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves on a task of its own, logging the address, until the returned guard drops: the
    /// endpoint lives as long as the service.
    pub fn spawn(self, health: HealthSource) -> Serving {
        if let Ok(addr) = self.local_addr() {
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        }
        Serving(tokio::spawn(self.serve(health)))
    }

    /// Serves until the task is dropped or aborted.
    async fn serve(self, health: HealthSource) {
        let Endpoint {
            prometheus,
            listener,
        } = self;
        // Without the exporter's own listener nobody drains the histograms' buffers: do it here.
        let upkeep = prometheus.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (prometheus, health) = (prometheus.clone(), health.clone());
            tokio::spawn(async move {
                // A slow or broken client only loses its own answer.
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    answer(stream, &prometheus, health.as_deref()),
                )
                .await;
            });
        }
    }
}

/// The endpoint's task, aborted when this drops.
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads one request's head and answers it; the connection is closed after.
async fn answer(
    mut stream: TcpStream,
    prometheus: &PrometheusHandle,
    health: Option<&(dyn Fn() -> Health + Send + Sync)>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0_u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // Query strings do not change the answer.
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path, health) {
        ("GET", "/metrics", _) => ("200 OK", "text/plain; version=0.0.4", prometheus.render()),
        ("GET", "/healthz" | "/readyz", None) => (
            "200 OK",
            "text/plain",
            "ready\na relay alone: no consumer in this process\n".to_owned(),
        ),
        ("GET", "/healthz", Some(health)) => probe(health().live, "live"),
        ("GET", "/readyz", Some(health)) => {
            let h = health();
            let (status, content_type, _) = probe(h.ready, "ready");
            (
                status,
                content_type,
                format!(
                    "{}\nbroker_connected {}\ndatabase_reachable {}\n",
                    if h.ready { "ready" } else { "not ready" },
                    h.broker_connected,
                    h.database_reachable
                ),
            )
        }
        ("GET", _, _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// 200 when `ok`, else 503 (what a Kubernetes probe and a load balancer read).
fn probe(ok: bool, what: &str) -> (&'static str, &'static str, String) {
    if ok {
        ("200 OK", "text/plain", format!("{what}\n"))
    } else {
        (
            "503 Service Unavailable",
            "text/plain",
            format!("not {what}\n"),
        )
    }
}
