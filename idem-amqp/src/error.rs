//! Errors of the RabbitMQ adapter.

/// A failure of the RabbitMQ side: configuration, connection, topology, channel, publish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting of a consumer or relay is invalid; the text says which and what to write
    /// instead.
    #[error("invalid idem configuration: {0}")]
    Config(String),

    /// An error of idem's core, as it was (say, a retry policy it refuses); its text says what
    /// to fix and its causes are kept.
    #[error(transparent)]
    Core(#[from] idem_core::Error),

    /// The AMQP URL does not parse.
    #[error("invalid AMQP URL {url:?}: {reason}. Expected amqp://user:password@host:port/vhost (vhost `/` is written %2f), or several such URLs separated by commas (the nodes of a cluster)")]
    InvalidUrl {
        /// The URL, password removed.
        url: String,
        /// What the parser said.
        reason: String,
    },

    /// The broker could not be reached or refused the login.
    #[error("cannot connect to RabbitMQ at {url}: {source}. Check the URL, that the broker is running and reachable from here, and the credentials (with several URLs: none answered; this is the last one's error)")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },

    /// A broker operation failed (declare, consume, qos, cancel, publish, a confirm that could
    /// not arrive...).
    #[error("RabbitMQ {operation} failed: {source}")]
    Broker {
        /// What idem was doing.
        operation: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },

    /// A queue could not be declared.
    #[error("cannot declare queue {queue:?}: {source}. If it already exists with other arguments (say, a delay queue with another TTL), delete it or pick another queue name")]
    Topology {
        /// The queue.
        queue: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },

    /// The consumer stream ended because the channel or connection closed under it.
    #[error("the RabbitMQ consumer on queue {queue:?} stopped: {reason}. Unacknowledged deliveries return to the queue and are deduplicated on redelivery")]
    ConsumerLost {
        /// The queue.
        queue: String,
        /// Why.
        reason: String,
    },

    /// The broker returned a mandatory publish: nothing routes its exchange and routing key to
    /// a queue. The message was not taken.
    #[error("the broker returned the message unroutable ({reply}): {}", unroutable_fix(.exchange, .routing_key))]
    Unroutable {
        /// The exchange published to (`""`: the default exchange, which routes to the queue
        /// named by the routing key).
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's reply text (say, `NO_ROUTE`).
        reply: String,
    },

    /// The broker refused a publish (`basic.nack`): it did not take responsibility for the
    /// message.
    #[error("the broker refused (nack) the publish to {}; check the broker's disk and memory alarms", destination(.exchange, .routing_key))]
    Nacked {
        /// The exchange published to (`""`: the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
    },

    /// A dead letter or retry copy does not fit in one frame even with every producer header
    /// left out and idem's error text cut to nothing: the other properties take the frame.
    /// Publishing it would make the broker close the connection, so it is not published.
    #[error("the copy of this message for {queue:?} needs a {needed}-byte header frame even with only idem's headers, over the connection's frame_max of {frame_max} bytes; raise frame_max (RabbitMQ's default is 131072)")]
    FrameTooLarge {
        /// Where the copy was going (`<queue>.dlq`, `<queue>.retry.<delay>`).
        queue: String,
        /// The smallest header frame it could have.
        needed: usize,
        /// The connection's negotiated frame_max.
        frame_max: u32,
    },

    /// The relay could not declare a destination it was given
    /// ([`crate::RelayBuilder::declare_queue`], `declare_exchange`, `bind_queue`).
    #[error("the outbox relay cannot declare {destination}: {source}. A queue or exchange that already exists with other arguments or of another type is refused (PRECONDITION_FAILED): declare it here as its owner does (idem declares a durable queue of RelayBuilder::queue_type — classic without arguments by default, or x-queue-type=quorum — as an idem consumer with the same queue_type does), or leave it to its owner and drop this declaration; a binding needs its queue and exchange to exist (declare them too)")]
    Declare {
        /// What was declared: `queue "x"`, `exchange "y" (topic)`, or a binding.
        destination: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },

    /// The operating system refused to install a stop-signal handler
    /// ([`crate::Shutdown::on_signals`]).
    #[error("cannot install the {signal} handler: {source}. Without it a stop signal would kill the process mid-delivery (redelivered and deduplicated, but not a graceful stop)")]
    Signals {
        /// Which signal.
        signal: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// Something idem guarantees itself did not hold (say, a publish that needs a confirm went
    /// out on a channel not in confirm mode).
    #[error("{0}; this is a bug in idem")]
    Bug(&'static str),
}

impl Error {
    pub(crate) fn broker(operation: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let operation = operation.into();
        move |source| Self::Broker { operation, source }
    }
}

/// Where a publish went, as an operator would look for it.
fn destination(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("queue {routing_key:?}")
    } else {
        format!("exchange {exchange:?} with routing key {routing_key:?}")
    }
}

/// What to do about an unroutable publish.
fn unroutable_fix(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!(
            "there is no queue {routing_key:?}; declare it (its consumer does on start; an outbox relay does with RelayBuilder::declare_queue)"
        )
    } else {
        format!(
            "nothing is bound to exchange {exchange:?} with routing key {routing_key:?}; declare the queue and its binding (its consumer declares the queue on start; an outbox relay does with RelayBuilder::declare_queue and bind_queue)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn refused_publishes_name_where_they_went() {
        let to_queue = Error::Unroutable {
            exchange: String::new(),
            routing_key: "payments.dlq".into(),
            reply: "NO_ROUTE".into(),
        };
        assert_eq!(
            to_queue.to_string(),
            "the broker returned the message unroutable (NO_ROUTE): there is no queue \"payments.dlq\"; declare it (its consumer does on start; an outbox relay does with RelayBuilder::declare_queue)"
        );
        let to_exchange = Error::Nacked {
            exchange: "events".into(),
            routing_key: "payment.captured".into(),
        };
        assert!(
            to_exchange
                .to_string()
                .contains("exchange \"events\" with routing key \"payment.captured\""),
            "{to_exchange}"
        );
    }

    #[test]
    fn core_errors_keep_their_text() {
        let core = idem_core::Error::Config("retry policy: max_attempts must be at least 1".into());
        let text = core.to_string();
        let error = Error::from(core);
        assert_eq!(error.to_string(), text);
        assert!(matches!(error, Error::Core(idem_core::Error::Config(_))));
    }
}
