//! Errors of the RabbitMQ adapter.

/// A failure of the RabbitMQ side: configuration, connection, topology, channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// A setting is invalid; the text says which and what to write instead.
    #[error("invalid idem consumer configuration: {0}")]
    Config(String),

    /// The AMQP URL does not parse.
    #[error("invalid AMQP URL {url:?}: {reason}. Expected amqp://user:password@host:port/vhost (vhost `/` is written %2f)")]
    InvalidUrl {
        /// The URL, password removed.
        url: String,
        /// What the parser said.
        reason: String,
    },

    /// The broker could not be reached or refused the login.
    #[error("cannot connect to RabbitMQ at {url}: {source}. Check AMQP_URL, that the broker is running, and the credentials")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },

    /// A broker operation failed (declare, consume, qos, cancel...).
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
}

impl AmqpError {
    pub(crate) fn broker(operation: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let operation = operation.into();
        move |source| Self::Broker { operation, source }
    }
}
