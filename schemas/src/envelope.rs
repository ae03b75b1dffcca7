//! The raw envelope: a message exactly as a connector took it in.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::AvroRecord;

/// The wire format of a received message, told by its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// UN/EDIFACT interchange (`application/EDIFACT`).
    Edifact,
    /// FHIR R4 JSON (`application/fhir+json`).
    FhirJson,
    /// FHIR R4 XML (`application/fhir+xml`).
    FhirXml,
    /// An RFC 5322 mail message (`message/rfc822`).
    Rfc822,
}

impl Format {
    /// All formats, in schema order.
    pub const ALL: [Format; 4] = [
        Format::Edifact,
        Format::FhirJson,
        Format::FhirXml,
        Format::Rfc822,
    ];

    /// The format for a `Content-Type` value (parameters and case ignored), if ketenbus takes it.
    #[must_use]
    pub fn from_media_type(content_type: &str) -> Option<Format> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence.to_ascii_lowercase().as_str() {
            "application/edifact" => Some(Format::Edifact),
            "application/fhir+json" => Some(Format::FhirJson),
            "application/fhir+xml" => Some(Format::FhirXml),
            "message/rfc822" => Some(Format::Rfc822),
            _ => None,
        }
    }

    /// The schema symbol, also used as a metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Edifact => "edifact",
            Format::FhirJson => "fhir_json",
            Format::FhirXml => "fhir_xml",
            Format::Rfc822 => "rfc822",
        }
    }
}

/// A message exactly as received, with where it came from. Schema: `avro/envelope.avsc`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RawEnvelope {
    /// Message id assigned at ingest (UUIDv7, time-ordered).
    pub id: String,
    /// Milliseconds since the Unix epoch when the connector took the message in.
    pub received_at_ms: i64,
    /// Connector that took it in: http, inbox, smtp, imap, fhir.
    pub connector: String,
    /// Wire format.
    pub format: Format,
    /// Media type as the sender declared it.
    pub content_type: String,
    /// Party id (`scheme:value`) of the sender, when the transport tells it.
    pub sender: Option<String>,
    /// Party id (`scheme:value`) of the receiver, when the transport tells it.
    pub receiver: Option<String>,
    /// The original bytes.
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub body: Vec<u8>,
    /// Transport details without patient data.
    pub attributes: BTreeMap<String, String>,
}

impl fmt::Debug for RawEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawEnvelope")
            .field("id", &self.id)
            .field("connector", &self.connector)
            .field("format", &self.format)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl AvroRecord for RawEnvelope {
    const SCHEMA_JSON: &'static str = include_str!("../avro/envelope.avsc");
    crate::compiled_schema!();
}
