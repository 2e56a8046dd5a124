//! Connecting to the broker, and the one-future stop signal ([`crate::Shutdown`] is the one for
//! a whole service).

use crate::error::Error;
use idem_core::{redact_url, Backoff};
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

/// Between two tries to reach a broker that is away: 0.25 s doubling to 30 s, each wait
/// shortened at random by up to half, so processes that lost the broker together do not all
/// come back at once.
const RECONNECT_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(250), Duration::from_secs(30)).with_jitter(0.5);

/// Connects to RabbitMQ at `url` (`amqp://user:password@host:port/vhost`).
///
/// A URL that does not parse and a broker that cannot be reached both fail here, at start, with a
/// message that names the URL (password removed) and what to check.
pub async fn connect(url: &str) -> Result<Connection, Error> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|reason: String| Error::InvalidUrl {
        url: redact_url(url),
        reason,
    })?;
    let properties = ConnectionProperties::default().with_connection_name("idem".into());
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|source| Error::Connect {
            url: redact_url(url),
            source,
        })
}

/// Waits with jittered backoff ([`RECONNECT_BACKOFF`]) until the broker at `url` answers
/// again; `None` once `stopped` resolves. Shared by the consumer and the relay.
pub(crate) async fn reconnect(
    url: &str,
    stopped: impl std::future::Future<Output = ()>,
) -> Option<Connection> {
    reconnect_after(url, stopped, 0).await
}

/// [`reconnect`], starting the backoff as if `failures` tries had failed already: for a
/// connection that keeps dying right after it was made.
pub(crate) async fn reconnect_after(
    url: &str,
    stopped: impl std::future::Future<Output = ()>,
    failures: u32,
) -> Option<Connection> {
    tokio::pin!(stopped);
    let mut failures = failures;
    loop {
        tokio::select! {
            () = &mut stopped => return None,
            () = tokio::time::sleep(RECONNECT_BACKOFF.next_delay(failures)) => {}
        }
        match connect(url).await {
            Ok(connection) => {
                tracing::info!("reconnected to the broker");
                return Some(connection);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let retry_in = RECONNECT_BACKOFF.delay(failures);
                tracing::warn!(%error, ?retry_in, "broker still unreachable");
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C), logging which: the stop of a program with **one**
/// serve future, `consumer.serve(url, shutdown_signal())`.
///
/// Each call installs a handler of its own and logs the signal itself, so a service that runs
/// several loops (a consumer and a relay, an HTTP server) takes one [`crate::Shutdown`] instead
/// and hands each loop `shutdown.requested()`: one handler, one log line, every loop stopped.
pub async fn shutdown_signal() {
    match crate::shutdown::signals::Listener::install() {
        Ok(listener) => {
            let received = listener.next().await;
            tracing::info!("{received} received: stopping");
        }
        Err(error) => {
            tracing::warn!(%error, "only Ctrl-C will stop this program");
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received: stopping");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RECONNECT_BACKOFF;
    use std::time::Duration;

    #[test]
    fn reconnects_back_off_from_a_quarter_second_to_thirty_halved_at_most() {
        assert_eq!(RECONNECT_BACKOFF.delay(0), Duration::from_millis(250));
        assert_eq!(RECONNECT_BACKOFF.delay(3), Duration::from_secs(2));
        assert_eq!(RECONNECT_BACKOFF.delay(7), Duration::from_secs(30));
        assert_eq!(
            RECONNECT_BACKOFF.jittered(0, 0.0),
            Duration::from_millis(250)
        );
        assert_eq!(
            RECONNECT_BACKOFF.jittered(0, 1.0),
            Duration::from_millis(125)
        );
    }
}
