//! Fuzz target for the FHIR JSON reader and writer (`ketenbus_connectors::fhir`).
//!
//! Arbitrary bytes go through `fhir::parse(Format::FhirJson, ..)`; a parsed resource must
//! write back, parse again to the same tree and write identically a second time. The
//! resource is also written as XML (which may refuse a tree R4 does not define, but not
//! panic) and run through the FHIR normaliser. Run from `connectors/`, see `fuzz/README.md`.
#![no_main]

use ketenbus_connectors::Normalize as _;
use ketenbus_connectors::fhir::{self, FhirNormalizer};
use ketenbus_schemas::{Format, RawEnvelope};
use libfuzzer_sys::fuzz_target;

const FORMAT: Format = Format::FhirJson;
const OTHER: Format = Format::FhirXml;

fuzz_target!(|data: &[u8]| {
    let _ = fhir::sniff(data);
    let Ok(resource) = fhir::parse(FORMAT, data) else {
        return;
    };
    let written = fhir::write(FORMAT, &resource).expect("a parsed resource writes back");
    let again = fhir::parse(FORMAT, &written).expect("what was written parses");
    assert!(
        again == resource,
        "the written resource parses to the same tree"
    );
    let twice = fhir::write(FORMAT, &again).expect("writes a second time");
    assert_eq!(written, twice, "writing is stable");
    if let Ok(other) = fhir::write(OTHER, &resource) {
        let _ = fhir::parse(OTHER, &other);
    }
    let envelope = RawEnvelope {
        id: "fuzz".into(),
        received_at_ms: 0,
        connector: "fuzz".into(),
        format: FORMAT,
        content_type: "application/fhir+json".into(),
        sender: None,
        receiver: None,
        body: data.to_vec(),
        attributes: Default::default(),
    };
    let _ = FhirNormalizer.normalize(&envelope);
});
