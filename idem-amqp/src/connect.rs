//! Connecting to the broker and waiting for the stop signal.

use crate::error::AmqpError;
use idem_core::redact_url;
use lapin::{Connection, ConnectionProperties};

/// Connects to RabbitMQ at `url` (`amqp://user:password@host:port/vhost`).
///
/// A URL that does not parse and a broker that cannot be reached both fail here, at start, with a
/// message that names the URL (password removed) and what to check.
pub async fn connect(url: &str) -> Result<Connection, AmqpError> {
    let uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|reason: String| AmqpError::InvalidUrl {
            url: redact_url(url),
            reason,
        })?;
    let properties = ConnectionProperties::default().with_connection_name("idem".into());
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|source| AmqpError::Connect {
            url: redact_url(url),
            source,
        })
}

/// Waits with jittered backoff (0.25 s doubling to 30 s) until the broker at `url` answers
/// again; `None` once `stopped` resolves. The jitter keeps processes that lost the broker
/// together from all coming back at once. Shared by the consumer and the relay.
pub(crate) async fn reconnect(
    url: &str,
    stopped: impl std::future::Future<Output = ()>,
) -> Option<Connection> {
    tokio::pin!(stopped);
    let mut wait = std::time::Duration::from_millis(250);
    loop {
        let jittered = wait.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::select! {
            () = &mut stopped => return None,
            () = tokio::time::sleep(jittered) => {}
        }
        match connect(url).await {
            Ok(connection) => {
                tracing::info!("reconnected to the broker");
                return Some(connection);
            }
            Err(error) => {
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
                tracing::warn!(%error, retry_in = ?wait, "broker still unreachable");
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C): pass it to [`crate::Consumer::run`] for a graceful stop.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received: stopping"),
                    _ = interrupt.recv() => tracing::info!("SIGINT received: stopping"),
                }
            }
            _ => {
                tracing::warn!(
                    "cannot install signal handlers; only Ctrl-C will stop the consumer"
                );
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
