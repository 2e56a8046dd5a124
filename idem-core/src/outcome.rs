//! What the unit of work decided about one delivery, and so what the adapter must do with it.

use crate::key::Key;
use std::time::Duration;

/// Why a message was dead-lettered; the `x-idem-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The body did not decode into the message type: empty, not UTF-8, not JSON, wrong shape or
    /// values, too deeply nested, over the size limit, or of another message kind.
    Malformed,
    /// The message has no usable idempotency key: absent, null, not parsable, too long.
    MissingKey,
    /// The handler failed permanently; everything was rolled back.
    Rejected,
    /// The handler failed transiently on every attempt the retry policy allows.
    RetriesExhausted,
    /// The key was already applied with a different payload; the first effect stands.
    KeyConflict,
    /// The message kept coming back after its handling was cut short (the process died).
    CrashLoop,
    /// The client library could not read part of the delivery as sent (a message id, content
    /// type, header name or routing key that is not valid UTF-8): it cannot be processed.
    Unreadable,
}

impl Reason {
    /// The header value: `malformed`, `missing-key`, `rejected`, `retries-exhausted`,
    /// `key-conflict`, `crash-loop`, `unreadable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::MissingKey => "missing-key",
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries-exhausted",
            Self::KeyConflict => "key-conflict",
            Self::CrashLoop => "crash-loop",
            Self::Unreadable => "unreadable",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one delivery, and so what the adapter must do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Ledger claim and effect committed together: acknowledge.
    Applied,
    /// The key was already in the ledger with the same payload: the handler did not run;
    /// acknowledge.
    Duplicate,
    /// Nothing was applied and trying again cannot help: publish to the dead-letter queue, then
    /// acknowledge.
    DeadLetter {
        /// The `x-idem-reason`.
        reason: Reason,
        /// What went wrong, for the `x-idem-error` header.
        error: String,
    },
    /// The handler failed transiently and the retry policy allows another attempt: publish the
    /// message to the delay queue of `tier` (with `attempts` in idem's header), then acknowledge.
    Retry {
        /// What went wrong.
        error: String,
        /// Attempts made so far, this one included.
        attempts: u32,
        /// How long to wait, jitter applied (at most `tier`).
        delay: Duration,
        /// Which delay queue: one of [`RetryPolicy::tiers`](crate::RetryPolicy::tiers).
        tier: Duration,
    },
    /// The database is unreachable, or a commit's outcome is unknown: nothing to blame the
    /// message for and no attempt counted. Hold the delivery and run it again later; the ledger
    /// makes a second run of something that did commit a no-op.
    Unavailable {
        /// What went wrong.
        error: String,
    },
}

/// The result of [`process`](crate::process()): the outcome and, when the message got that far, its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// The idempotency key, once decoded.
    pub key: Option<Key>,
    /// What to do with the delivery.
    pub outcome: Outcome,
}
