//! One fuzzing step for the FHIR readers, writers and normaliser, shared by the cargo-fuzz
//! targets (`connectors/fuzz`: `fhir_json`, `fhir_xml`) so both check the same invariants.

use ketenbus_schemas::{Format, RawEnvelope};

use super::parse::xml::sorted;
use super::{FhirNormaliser, parse, sniff, write};
use crate::Normalise as _;

/// Feeds `data` in `format` (JSON or XML) through the reader, the writer and the normaliser:
/// a parsed resource must write back, parse again to the same tree (for XML up to member
/// order: the reader takes elements out of R4 order, the writer puts them in order) and
/// write identically a second time. It is also written in the other format (which may
/// refuse a tree R4 does not define, but not panic).
///
/// # Panics
/// When one of those invariants breaks: that is the finding.
#[doc(hidden)]
pub fn fuzz_one(format: Format, data: &[u8]) {
    let other = match format {
        Format::FhirXml => Format::FhirJson,
        _ => Format::FhirXml,
    };
    let _ = sniff(data);
    let Ok(resource) = parse(format, data) else {
        return;
    };
    let written = write(format, &resource).expect("a parsed resource writes back");
    let again = parse(format, &written).expect("what was written parses");
    if format == Format::FhirXml {
        assert!(
            sorted(&again) == sorted(&resource),
            "the written resource parses to the same tree"
        );
    } else {
        assert!(
            again == resource,
            "the written resource parses to the same tree"
        );
    }
    let twice = write(format, &again).expect("writes a second time");
    assert_eq!(written, twice, "writing is stable");
    if let Ok(bytes) = write(other, &resource) {
        let _ = parse(other, &bytes);
    }
    let envelope = RawEnvelope {
        id: "fuzz".into(),
        received_at_ms: 0,
        connector: "fuzz".into(),
        format,
        content_type: match format {
            Format::FhirXml => super::MEDIA_XML,
            _ => super::MEDIA_JSON,
        }
        .into(),
        sender: None,
        receiver: None,
        body: data.to_vec(),
        attributes: std::collections::BTreeMap::new(),
    };
    let _ = FhirNormaliser.normalise(&envelope);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_message_passes_in_both_formats() {
        let json = crate::fhir::golden_tests::az_envelope().body;
        fuzz_one(Format::FhirJson, &json);
        let tree = parse(Format::FhirJson, &json).unwrap();
        fuzz_one(Format::FhirXml, &write(Format::FhirXml, &tree).unwrap());
        fuzz_one(Format::FhirXml, b"<Patient xmlns=\"http://hl7.org/fhir\"/>");
    }
}
