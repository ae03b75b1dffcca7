//! FHIR R4 read and written: [`json`] and [`xml`] turn bytes into the JSON-shaped
//! [`Value`](super::Value) tree and back; XML goes through the R4 element [`model`]
//! (which elements exist, in which order, of which type).

pub mod json;
pub mod model;
pub mod xml;
