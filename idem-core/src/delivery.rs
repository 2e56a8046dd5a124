//! What the transport says about a delivery, beside its body.

use std::collections::BTreeMap;

/// Transport metadata of one delivery.
///
/// The adapter fills it from the AMQP properties. None of it decides deduplication: the
/// `redelivered` flag in particular is a hint for logs and extra care, never a reason to skip work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The producer's message id (AMQP `message_id`); the key when the message has no key field.
    pub message_id: Option<String>,
    /// The correlation id shared by every message of one business flow.
    pub correlation_id: Option<String>,
    /// The id of the message whose handling produced this one (idem header `x-idem-causation-id`).
    pub causation_id: Option<String>,
    /// The broker's redelivery flag: an earlier delivery of this message was not acknowledged.
    pub redelivered: bool,
    /// The message kind the producer declared (AMQP `type`). When present it must be the
    /// handler's [`Message::KIND`](crate::Message::KIND); a message of another kind is dead-lettered.
    pub kind: Option<String>,
    /// Attempts already made at this message that failed transiently (idem's own header
    /// `x-idem-attempts`, not the broker's redelivery count); 0 on first delivery.
    pub previous_attempts: u32,
    /// When the first of those attempts failed, in seconds since the Unix epoch.
    pub first_failure: Option<u64>,
    /// Application headers whose values are text or numbers, rendered as text.
    pub headers: BTreeMap<String, String>,
    /// The broker's count of earlier deliveries of this message, where the broker keeps one
    /// that can be trusted: a quorum queue's `x-delivery-count` on a redelivery. The
    /// crash-loop guard then takes it instead of writing a count of its own. `None` on a first
    /// delivery and on classic queues (there the header is the producer's to set).
    pub delivery_count: Option<u32>,
}

/// The delivery handed to the unit of work: raw body plus metadata.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The body exactly as received.
    pub body: &'a [u8],
    /// What the transport said about it.
    pub metadata: &'a Metadata,
    /// How many times this very delivery was already tried in place, while the database was
    /// unreachable. Only the first try counts a redelivery toward the crash-loop limit.
    pub tries_in_place: u32,
    /// Set by the adapter once it has held this delivery for a while although the database
    /// answers other deliveries: then "database unavailable" is this message's own failure, a
    /// transient one that counts as an attempt, so that no delivery is held forever.
    pub blame_if_unavailable: bool,
}
