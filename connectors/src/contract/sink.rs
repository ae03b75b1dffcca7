//! The delivery contract every sink (webhook, FHIR, secure mail) implements.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ketenbus_schemas::{Event, RawEnvelope};

use crate::ErrorKind;

/// A boxed future, so sinks of different types sit behind one `dyn Sink`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a subscription delivers: a normalised event, or the envelope exactly as received.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A zib-based event.
    Event(Arc<Event>),
    /// The original message, for archiving or pass-through.
    Raw(Arc<RawEnvelope>),
}

/// One record to deliver to one subscription.
#[derive(Clone)]
pub struct Delivery {
    /// Subscription name.
    pub subscription: Arc<str>,
    /// Event id, or envelope id for raw: the idempotency key.
    pub record_id: String,
    /// What to deliver.
    pub payload: Payload,
    /// 1 for the first try.
    pub attempt: u32,
    /// Where the record is in the log, when it was read straight from its source topic;
    /// `None` for a record read back from a subscription's own retry or replay topic.
    pub position: Option<LogPosition>,
}

/// A record's place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPosition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: i64,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("subscription", &self.subscription)
            .field("record_id", &self.record_id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Proof that the receiver took it.
#[derive(Debug, Clone)]
#[must_use]
pub struct Receipt {
    /// What the receiver answered (status line, message id); never payload.
    pub detail: String,
    /// Where the address came from ([`crate::address_book::Origin`]'s text): fixed in the
    /// sink's config, an `[address_book]` override, or which directory and resources;
    /// `None` for sinks without an address. Never patient data.
    pub origin: Option<String>,
}

/// Why a delivery failed, classified once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth another try after backoff (network error, 5xx, 429).
    #[error("retryable {reason}: {detail}")]
    Retryable {
        /// Reason code (`connect`, `timeout`, `http_503`).
        reason: String,
        /// Receiver's answer or the error text; never payload.
        detail: String,
    },
    /// Will never succeed as it is (4xx other than 429, invalid for the receiver).
    #[error("rejected {reason}: {detail}")]
    Rejected {
        /// Reason code (`http_404`, `invalid_payload`).
        reason: String,
        /// Receiver's answer; never payload.
        detail: String,
    },
}

impl DeliveryError {
    /// Retryable or Rejected.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeliveryError::Retryable { .. } => ErrorKind::Retryable,
            DeliveryError::Rejected { .. } => ErrorKind::Rejected,
        }
    }

    /// The reason code.
    #[must_use]
    pub fn reason(&self) -> &str {
        match self {
            DeliveryError::Retryable { reason, .. } | DeliveryError::Rejected { reason, .. } => {
                reason
            }
        }
    }

    /// The detail text.
    #[must_use]
    pub fn detail(&self) -> &str {
        match self {
            DeliveryError::Retryable { detail, .. } | DeliveryError::Rejected { detail, .. } => {
                detail
            }
        }
    }
}

/// A place events are delivered to. Must be idempotent on `record_id`: a receiver may see
/// the same id twice after a crash, never two ids for one event.
pub trait Sink: Send + Sync {
    /// Deliver one record.
    fn deliver<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<Receipt, DeliveryError>>;
}
