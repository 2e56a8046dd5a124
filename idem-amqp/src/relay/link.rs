//! The relay's link to the broker: one connection and its confirm-mode channel, every wait on
//! it bounded, and what a failure on it means — the broker refusing one publish (it closed the
//! channel: that row's fault; the connection lives on) or a lost broker (reconnect).

use crate::headers;
use crate::publish::confirm_channel;
use idem_core::backoff::unix_seconds;
use idem_core::outbox::relay::OutboxRow;
use lapin::options::BasicPublishOptions;
use lapin::protocol::AMQPErrorKind;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ErrorKind, PublisherConfirm};
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

/// A connection and the relay's channel on it.
pub(super) struct Link {
    connection: Connection,
    channel: Channel,
    /// Exchanges that answered a publish on this channel: they exist and take this user's
    /// publishes (see `batch`: a publish to any other goes alone).
    known: HashSet<String>,
    /// How long a round may wait on the broker, and any other wait on it
    /// (`RelayBuilder::confirm_timeout`).
    pub(super) timeout: Duration,
}

/// Why a run of publishes stopped short.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Trouble {
    /// The broker closed the channel over a publish (a channel-level error: 404 NOT_FOUND for
    /// an exchange that does not exist, 403 ACCESS_REFUSED, 406 PRECONDITION_FAILED…) and the
    /// connection is still up: one row's failure. The text is for that row's `last_error`.
    Refused(String),
    /// The channel is closed (say, a publish on it after the broker closed it) while the
    /// connection is up: a refusal seen in the same run explains it; alone, the broker is
    /// treated as lost.
    ChannelClosed(String),
    /// The connection failed, the broker closed it, or the broker did not answer in time:
    /// reconnect, and leave what was not confirmed due.
    Lost(String),
}

/// `future`, given up after `timeout`: `Err` says what did not answer.
pub(super) async fn bounded<T>(
    timeout: Duration,
    what: &str,
    future: impl Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| format!("the broker did not answer ({what}) within {timeout:?}"))
}

impl Link {
    /// Opens the relay's channel on `connection`. On failure the connection is closed and the
    /// error says why: reconnect.
    pub(super) async fn open(connection: Connection, timeout: Duration) -> Result<Self, String> {
        let opened = bounded(
            timeout,
            "opening the relay's channel",
            confirm_channel(&connection, "relay"),
        )
        .await;
        match opened {
            Ok(Ok(channel)) => Ok(Self {
                connection,
                channel,
                known: HashSet::new(),
                timeout,
            }),
            Ok(Err(error)) => {
                close_connection(&connection, timeout, "relay reconnecting").await;
                Err(error.to_string())
            }
            Err(error) => {
                close_connection(&connection, timeout, "relay reconnecting").await;
                Err(error)
            }
        }
    }

    /// A new channel on the same connection, after the broker closed the last one, by
    /// `deadline`; `Err`: the broker is lost after all.
    pub(super) async fn reopen(&mut self, deadline: tokio::time::Instant) -> Result<(), String> {
        let opened = tokio::time::timeout_at(deadline, confirm_channel(&self.connection, "relay"))
            .await
            .map_err(|_| {
                format!(
                    "the broker did not answer (reopening the relay's channel) within {:?}",
                    self.timeout
                )
            })?;
        self.channel = opened.map_err(|error| error.to_string())?;
        // What took publishes before may be what was refused now (an exchange deleted since).
        self.known.clear();
        tracing::debug!("relay reopened its channel after the broker closed it");
        Ok(())
    }

    /// Whether `exchange` answered a publish on this channel.
    pub(super) fn knows(&self, exchange: &str) -> bool {
        self.known.contains(exchange)
    }

    /// Notes that `exchange` answered a publish on this channel (confirmed, returned or
    /// nacked: it exists, and the broker did not close the channel over it).
    pub(super) fn learn(&mut self, exchange: &str) {
        if !self.known.contains(exchange) {
            self.known.insert(exchange.to_owned());
        }
    }

    /// What `error`, from a publish or a confirm on this link, means.
    pub(super) fn trouble(&self, error: &lapin::Error) -> Trouble {
        if !self.connection.status().connected() {
            return Trouble::Lost(error.to_string());
        }
        match (refusal(error), error.kind()) {
            (Some(refused), _) => Trouble::Refused(refused),
            (None, ErrorKind::InvalidChannelState(..)) => Trouble::ChannelClosed(error.to_string()),
            (None, _) => Trouble::Lost(error.to_string()),
        }
    }

    /// Publishes `row` (mandatory: an unroutable message comes back instead of vanishing, and
    /// the row stays due) with its message id, kind, correlation and causation ids and headers.
    /// The caller bounds the wait.
    pub(super) async fn publish(&self, row: &OutboxRow) -> Result<PublisherConfirm, lapin::Error> {
        let message = &row.message;
        let mut headers = FieldTable::default();
        for (name, value) in &message.route.headers {
            headers.insert(name.as_str().into(), headers::long_string(value));
        }
        if let Some(causation) = &message.causation_id {
            headers::insert_causation_id(&mut headers, causation);
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.message_id.to_string().into())
            .with_type(message.kind.as_str().into())
            .with_timestamp(unix_seconds())
            .with_headers(headers);
        if let Some(correlation) = &message.correlation_id {
            properties = properties.with_correlation_id(correlation.as_str().into());
        }
        self.channel
            .basic_publish(
                message.route.exchange.as_str().into(),
                message.route.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &message.body,
                properties,
            )
            .await
    }

    /// Closes the channel and the connection, each wait bounded.
    pub(super) async fn close(self, reason: &str) {
        if self.channel.status().connected() {
            let _ = bounded(
                self.timeout,
                "closing the channel",
                self.channel.close(200, reason.into()),
            )
            .await;
        }
        close_connection(&self.connection, self.timeout, reason).await;
    }
}

/// Closes `connection`, waiting at most `timeout` (a broker that stopped answering must not
/// hold the relay up).
pub(super) async fn close_connection(connection: &Connection, timeout: Duration, reason: &str) {
    let _ = bounded(
        timeout,
        "closing the connection",
        connection.close(200, reason.into()),
    )
    .await;
}

/// The broker's reply when `error` is a channel-level refusal (an AMQP soft error: the broker
/// closed the channel, not the connection), as `last_error` records it; `None` otherwise.
fn refusal(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
            Some(format!(
                "the broker refused the publish and closed the channel ({}): {}",
                amqp.get_id(),
                amqp.get_message()
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::refusal;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
    use lapin::ErrorKind;

    fn protocol_error(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn a_channel_close_is_a_refusal_with_the_brokers_reason() {
        let missing = protocol_error(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange 'nope' in vhost '/'",
        );
        assert_eq!(
            refusal(&missing).as_deref(),
            Some("the broker refused the publish and closed the channel (404): NOT_FOUND - no exchange 'nope' in vhost '/'")
        );
        let denied = protocol_error(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - write access to exchange 'x' refused",
        );
        assert!(refusal(&denied).is_some_and(|r| r.contains("(403)")));
    }

    #[test]
    fn a_lost_connection_is_not_a_refusal() {
        let forced = protocol_error(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - closed via management plugin",
        );
        assert_eq!(refusal(&forced), None);
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(refusal(&io), None);
        let closed: lapin::Error =
            ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "basic.publish").into();
        assert_eq!(refusal(&closed), None);
    }
}
