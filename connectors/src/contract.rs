//! The contracts every connector meets, and what they share: [`ingest`] (sources hand
//! messages to it), [`normalize`] (raw envelope in, events out), [`sink`] (delivery) and the
//! [`content`] store that keeps the documents events refer to.

pub mod content;
pub mod ingest;
pub mod normalize;
pub mod sink;
