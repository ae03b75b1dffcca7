//! The EDIFACT reader and writer: [`tokenize`] splits bytes into segments that borrow from
//! the input ([`syntax`] holds the service characters and character sets), [`document`] adds
//! the envelopes and their control counts, [`write`] puts segments back into bytes, and
//! [`error`] says what went wrong where.

pub(crate) mod document;
pub(crate) mod error;
pub(crate) mod syntax;
pub(crate) mod tokenize;
pub(crate) mod write;
