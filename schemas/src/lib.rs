//! Everything that crosses a ketenbus topic: the Avro schemas (the `.avsc` files in
//! `schemas/avro` are the source of truth), the Rust types that mirror them and the codec.
//! Values are written in Avro single-object encoding so any Avro library can read them;
//! values written by an earlier release's schemas (`schemas/history`) still decode.

pub mod codec;
mod datum;
pub mod envelope;
pub mod event;
pub mod history;
pub mod id;
pub mod lineage;
pub mod outcome;
pub mod topics;

pub use codec::{AvroRecord, CodecError};
pub use envelope::{Format, RawEnvelope};
pub use event::{Event, EventHeader, EventKind};
pub use id::{envelope_of, event_id, new_envelope_id, now_ms};
pub use outcome::{DeadLetter, DeliveryOutcome, Outcome, RetryRecord};
