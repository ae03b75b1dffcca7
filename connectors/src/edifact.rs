//! UN/EDIFACT (ISO 9735) as Dutch care-chain partners send it, and the events it becomes.
//!
//! A sans-IO reader and writer: [`tokenize`] splits bytes into segments, elements and
//! components that borrow from the input; [`parse`] adds the UNB/UNG/UNH/UNT/UNE/UNZ
//! envelopes and checks their control counts; [`write_document`] and [`Writer`] put
//! segments back into bytes; [`inspect`] shows a parsed file as JSON. On top of that,
//! [`EdifactNormaliser`] maps MEDLAB:1 and MEDRPT lab reports to lab-result events and
//! MEDVRI:1 / MEDSPE:1 to letter events, and [`acknowledge`] answers an interchange with
//! a UN CONTRL message.
//!
//! The tokenizer is a hand-written byte loop over a 256-entry class table rather than a
//! nom grammar: EDIFACT's lexical syntax is four separators and one escape, the loop keeps
//! the release-character handling in one place, and it is what makes the throughput goal
//! (hundreds of MB/s) reachable.

mod contrl;
mod fuzz;
mod inspect;
mod map;
mod parse;
mod synthetic;

pub use contrl::{CONTRL_CONNECTOR, ContrlParams, acknowledge, reply, syntax_error_code};
#[doc(hidden)]
pub use fuzz::fuzz_one;
pub use inspect::{document_json, inspect, segment_json};
pub use map::{
    EdifactNormaliser, REASON_INVALID_BSN, REASON_MISSING, REASON_SYNTAX, normalise_bytes,
    normalise_document,
};
pub use parse::document::{Document, Interchange, Message, parse, parse_strict};
pub use parse::error::{EdifactError, Position};
pub use parse::syntax::{Charset, Delimiters, decode};
pub use parse::tokenize::{Element, Segment, Tokens, Value, tokenize, tokenize_through};
pub use parse::write::{OwnedElement, OwnedSegment, Writer, write_document};
#[doc(hidden)]
pub use synthetic::{synthetic_bsn, synthetic_medlab};

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod proptests;
