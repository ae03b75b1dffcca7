//! The connectors of ketenbus: one module per protocol with its sans-IO parsers, the
//! normalisers that turn raw envelopes into zib-based events, and the delivery sinks.
//! Nothing here owns a socket for long or a log: the broker wires them to both.

pub mod address_book;
pub mod budget;
pub mod contract;
pub mod edifact;
pub mod fhir;
pub mod inbox;
pub mod mail;
pub mod party;
pub mod poison;
pub mod webhook;

#[cfg(test)]
mod linear_cost_tests;

pub use contract::content::{ContentStore, FsContentStore, MemoryContentStore};
pub use contract::ingest::{Accepted, Ingest, IngestError, SourceStatus};
pub use contract::normalize::{Normalize, NormalizeError};
pub use contract::sink::{BoxFuture, Delivery, DeliveryError, Payload, Receipt, Sink};

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
