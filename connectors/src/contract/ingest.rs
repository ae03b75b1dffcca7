//! The ingest contract every source (HTTP, inbox folder, SMTP, IMAP, FHIR) hands messages to.

use ketenbus_schemas::RawEnvelope;

use crate::ErrorKind;
use crate::contract::sink::BoxFuture;

/// Proof that a message is durable: only now may the sender hear "done".
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Accepted {
    /// The message id (envelope id).
    pub id: String,
}

/// Why a message was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The log cannot take it now; the sender should try again (`451`, `503`).
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The broker cannot take messages at all.
    #[error("ingest failed: {0}")]
    Fatal(String),
    /// This message will never be taken as it is (a sender posing as a party it may not
    /// send as); the sender hears a permanent refusal (`550`, `403`).
    #[error("refused ({reason}): {detail}")]
    Refused {
        /// Reason code, e.g. `sender_not_allowed`.
        reason: &'static str,
        /// What is wrong; names parties, never patient data.
        detail: String,
    },
}

impl IngestError {
    /// How to handle it.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            IngestError::Unavailable(_) => ErrorKind::Retryable,
            IngestError::Fatal(_) => ErrorKind::Fatal,
            IngestError::Refused { .. } => ErrorKind::Rejected,
        }
    }
}

/// Takes raw envelopes in; resolves only when the envelope is durable on the raw topic.
pub trait Ingest: Send + Sync {
    /// Store the envelope durably.
    fn accept(&self, envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>>;
}
