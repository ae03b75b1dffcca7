//! The normaliser contract: raw envelope in, events out, as a pure function.

use ketenbus_schemas::{Event, RawEnvelope};

use crate::ErrorKind;

/// Reason code for a BSN that fails the eleven-test, whatever the format.
pub const REASON_INVALID_BSN: &str = "invalid_bsn";
/// Reason code for a mandatory element (segment, field) that is absent, whatever the format.
pub const REASON_MISSING: &str = "missing_element";

/// Turns one raw envelope into events. Must be pure: no I/O, clock or randomness, so a
/// replay yields the same events with the same ids (`EventHeader::new` derives them).
pub trait Normalise: Send + Sync {
    /// The events this envelope carries, in order.
    ///
    /// # Errors
    /// [`NormaliseError`] says why the envelope cannot become events; its
    /// [`reason`](NormaliseError::reason) is the dead-letter reason code.
    fn normalise(&self, envelope: &RawEnvelope) -> Result<Vec<Event>, NormaliseError>;

    /// The document bytes the events of [`normalise`](Self::normalise) refer to by SHA-256
    /// (letter attachments), for the caller to keep in the content store before it
    /// publishes the events. Pure like `normalise`; most formats inline everything.
    fn content(&self, _envelope: &RawEnvelope) -> Vec<Vec<u8>> {
        Vec::new()
    }
}

/// Why an envelope did not become events. Texts name positions and fields, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormaliseError {
    /// No normaliser exists for this format yet; raw subscribers still get the envelope.
    #[error("no normaliser for format {format}")]
    UnsupportedFormat {
        /// The envelope's format.
        format: &'static str,
    },
    /// The message parsed, but ketenbus does not map its type.
    #[error("message type {message_type} is not mapped to events")]
    UnsupportedMessageType {
        /// e.g. `ORDERS:D:96A:UN`.
        message_type: String,
    },
    /// The bytes do not follow the format's syntax.
    #[error("{format} syntax error at {position}: {what}")]
    Syntax {
        /// Reason code: `edifact_syntax`, `fhir_syntax`, `mime_syntax`.
        reason: &'static str,
        /// edifact, fhir_json, ...
        format: &'static str,
        /// Where: segment index and tag, byte offset, element path.
        position: String,
        /// What is wrong.
        what: String,
    },
    /// It parsed, but content the mapping needs is missing or invalid.
    #[error("invalid content at {path}: {what}")]
    Invalid {
        /// Reason code, e.g. `invalid_bsn`, `missing_element`.
        reason: &'static str,
        /// Element path (`Bundle.entry[3].resource.subject`, `segment PID #3 element 4`).
        path: String,
        /// What is wrong.
        what: String,
    },
}

impl NormaliseError {
    /// `missing_element` at `path`: content the mapping needs is absent.
    #[must_use]
    pub fn missing(path: String, what: &str) -> NormaliseError {
        NormaliseError::Invalid {
            reason: REASON_MISSING,
            path,
            what: what.to_owned(),
        }
    }

    /// The dead-letter and lineage reason code.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            NormaliseError::UnsupportedFormat { .. } => "unsupported_format",
            NormaliseError::UnsupportedMessageType { .. } => "unsupported_message_type",
            NormaliseError::Syntax { reason, .. } | NormaliseError::Invalid { reason, .. } => {
                reason
            }
        }
    }

    /// Normalising errors are about the input: never worth a retry.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Rejected
    }
}
