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
pub mod zib;

#[cfg(test)]
mod linear_cost_tests;

pub use contract::ErrorKind;
pub use contract::content::{ContentStore, FsContentStore, MemoryContentStore};
pub use contract::ingest::{Accepted, Ingest, IngestError};
pub use contract::normalise::{Normalise, NormaliseError};
pub use contract::sink::{BoxFuture, Delivery, DeliveryError, LogPosition, Payload, Receipt, Sink};
pub use contract::source::SourceStatus;
