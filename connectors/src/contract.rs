//! The contracts every connector meets, and what they share: [`ingest`] (sources hand
//! messages to it), [`source`] (how a running source reports), [`normalise`] (raw envelope
//! in, events out), [`sink`] (delivery), the [`content`] store that keeps the documents events
//! refer to, and [`ErrorKind`], how every error is handled.

pub mod content;
pub mod ingest;
pub mod normalise;
pub mod sink;
pub mod source;

/// How an error is to be handled (ARCHITECTURE.md, principle 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Wait, retry, do not acknowledge.
    Retryable,
    /// Dead-letter with the original bytes and a reason code, then acknowledge.
    Rejected,
    /// The component stops and health turns red.
    Fatal,
}
