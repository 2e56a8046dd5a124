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

/// How long one node may take to accept a connection and finish the AMQP handshake. A node
/// whose host is gone does not refuse a connection, it never answers: without a bound the
/// kernel's own connect timeout (about two minutes) would pass before the next node is tried.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to RabbitMQ at `url` (`amqp://user:password@host:port/vhost`), or at the first
/// that answers of several URLs separated by commas (the nodes of a cluster, tried in the order
/// given, each for at most 10 s). The consumer and the relay reconnect through it too: a node
/// lost is replaced by the next one that answers.
///
/// A URL that does not parse and a broker that cannot be reached both fail here, at start, with a
/// message that names the URL (password removed) and what to check.
pub async fn connect(url: &str) -> Result<Connection, Error> {
    let nodes = nodes(url)?;
    let several = nodes.len() > 1;
    let mut last = None;
    for (text, uri) in nodes {
        let properties = ConnectionProperties::default().with_connection_name("idem".into());
        let connected = tokio::time::timeout(
            NODE_CONNECT_TIMEOUT,
            Connection::connect_uri(uri, properties),
        )
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {NODE_CONNECT_TIMEOUT:?}"),
            )
            .into())
        });
        match connected {
            Ok(connection) => {
                if several {
                    tracing::info!(node = %redact_url(text), "connected to the broker");
                }
                return Ok(connection);
            }
            Err(source) => {
                if several {
                    tracing::debug!(node = %redact_url(text), error = %source, "broker node did not answer; trying the next");
                }
                last = Some(source);
            }
        }
    }
    match last {
        Some(source) => Err(Error::Connect {
            url: redact_url(url),
            source,
        }),
        None => Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: "no URL given".into(),
        }),
    }
}

/// The URLs in `url` (comma-separated), each parsed: every one must, or none is tried.
fn nodes(url: &str) -> Result<Vec<(&str, lapin::uri::AMQPUri)>, Error> {
    url.split(',')
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .map(|text| {
            let uri = text.parse().map_err(|reason: String| Error::InvalidUrl {
                url: redact_url(text),
                reason,
            })?;
            Ok((text, uri))
        })
        .collect()
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
    fn several_urls_are_the_nodes_of_a_cluster_and_a_bad_one_is_named_without_its_password() {
        let nodes = super::nodes(" amqp://a:pw@n1:5672/%2f ,amqp://a:pw@n2:5673/%2f,").unwrap();
        let hosts: Vec<_> = nodes
            .iter()
            .map(|(_, uri)| uri.authority.host.clone())
            .collect();
        assert_eq!(hosts, ["n1", "n2"]);
        let error = super::nodes("amqp://a:pw@n1/%2f,amqp://a:secret@n2:port/%2f")
            .unwrap_err()
            .to_string();
        assert!(error.contains("n2") && !error.contains("secret"), "{error}");
    }

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
