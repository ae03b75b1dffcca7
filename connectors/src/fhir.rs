//! HL7 FHIR R4, the way Dutch care exchanges it (zib 2020 / nl-core).
//!
//! Sans-IO layers, each usable alone:
//! - [`value`]: a light generic resource tree in FHIR's JSON shape (decimals kept exact);
//!   [`parse`](mod@parse)'s [`json`] and [`xml`] read and write it (XML through the R4 element model).
//! - [`inbound`]: [`FhirNormaliser`], nl-core lab results, Acute Zorg referrals and
//!   eOverdracht-style Task notifications into ketenbus events.
//! - [`emit`]: the inverse, events into nl-core resources in a transaction or message Bundle.
//! - [`outcome`]: OperationOutcome written for senders and read from receivers.
//! - [`sink`]: [`FhirSink`], delivery of events to a subscriber's FHIR endpoint.

pub mod emit;
mod fuzz;
pub mod inbound;
pub mod outcome;
pub mod parse;
pub mod sink;
pub mod value;

#[cfg(test)]
mod fields_tests;
#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod lab_fidelity_tests;
#[cfg(test)]
pub(crate) mod validator;

use ketenbus_schemas::Format;

pub use emit::{BundleStyle, EmitOptions, to_bundle};
#[doc(hidden)]
pub use fuzz::fuzz_one;
pub use inbound::FhirNormaliser;
pub use parse::{json, xml};
pub use sink::FhirSink;
pub use value::{Object, Value};

use crate::ErrorKind;

/// `application/fhir+json`.
pub const MEDIA_JSON: &str = "application/fhir+json";
/// `application/fhir+xml`.
pub const MEDIA_XML: &str = "application/fhir+xml";

/// What went wrong reading or writing FHIR. Texts name positions, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirError {
    /// Not well-formed JSON/XML, or XML elements R4 does not define.
    #[error("fhir syntax error at {position}: {what}")]
    Syntax {
        /// Byte offset or element path.
        position: String,
        /// What is wrong.
        what: String,
    },
    /// A tree that cannot be written in the requested form.
    #[error("cannot write fhir at {path}: {what}")]
    Write {
        /// Element path.
        path: String,
        /// What is wrong.
        what: String,
    },
}

impl FhirError {
    /// Both are about the content: never worth a retry.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Rejected
    }
}

/// Parse a FHIR resource in `format` (JSON or XML) into the JSON-shaped tree.
///
/// # Errors
/// [`FhirError::Syntax`]; also for a format that is not FHIR.
pub fn parse(format: Format, bytes: &[u8]) -> Result<Value, FhirError> {
    let v = match format {
        Format::FhirJson => json::parse(bytes)?,
        Format::FhirXml => xml::parse(bytes)?,
        other => {
            return Err(FhirError::Syntax {
                position: "document".into(),
                what: format!("{} is not a FHIR format", other.as_str()),
            });
        }
    };
    match v.get("resourceType") {
        Some(Value::String(_)) => Ok(v),
        _ => Err(FhirError::Syntax {
            position: "document".into(),
            what: "not a FHIR resource (no resourceType)".into(),
        }),
    }
}

/// Write a resource in `format`.
///
/// # Errors
/// [`FhirError::Write`] when the tree does not fit the R4 model (XML only).
pub fn write(format: Format, resource: &Value) -> Result<Vec<u8>, FhirError> {
    match format {
        Format::FhirXml => xml::to_vec(resource),
        _ => Ok(json::to_vec(resource)),
    }
}

/// The FHIR format of a document by its first character (`<` is XML), for files without a
/// media type (`ketenbus inspect FILE`).
#[must_use]
pub fn sniff(bytes: &[u8]) -> Format {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'<') => Format::FhirXml,
        _ => Format::FhirJson,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_xml_from_json() {
        assert_eq!(sniff(b"  <Patient/>"), Format::FhirXml);
        assert_eq!(sniff(b"\xEF\xBB\xBF{}"), Format::FhirJson);
    }
}
