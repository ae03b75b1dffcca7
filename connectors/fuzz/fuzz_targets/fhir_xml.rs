//! Fuzz target for the FHIR XML reader and writer (`ketenbus_connectors::fhir`).
//!
//! Arbitrary bytes go through `fhir::parse(Format::FhirXml, ..)`; a parsed resource must
//! write back, parse again to the same tree (up to member order: the reader takes elements
//! out of R4 order) and write identically a second time. The resource is also written as
//! JSON (which must not panic) and run through the FHIR normaliser. Run from `connectors/`, see `fuzz/README.md`.
#![no_main]

use ketenbus_connectors::Normalize as _;
use ketenbus_connectors::fhir::{self, FhirNormalizer, Object, Value};
use ketenbus_schemas::{Format, RawEnvelope};
use libfuzzer_sys::fuzz_target;

const FORMAT: Format = Format::FhirXml;
const OTHER: Format = Format::FhirJson;

/// The tree with every object's members sorted by name.
fn sorted(v: &Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        Value::Object(o) => {
            let mut members: Vec<_> = o.iter().collect();
            members.sort_by_key(|(k, _)| *k);
            let mut out = Object::new();
            for (k, v) in members {
                out.insert(k, sorted(v));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = fhir::sniff(data);
    let Ok(resource) = fhir::parse(FORMAT, data) else {
        return;
    };
    let written = fhir::write(FORMAT, &resource).expect("a parsed resource writes back");
    let again = fhir::parse(FORMAT, &written).expect("what was written parses");
    // The reader takes elements out of R4 order, the writer puts them in order: compare
    // object members regardless of their order.
    assert!(
        sorted(&again) == sorted(&resource),
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
        content_type: "application/fhir+xml".into(),
        sender: None,
        receiver: None,
        body: data.to_vec(),
        attributes: Default::default(),
    };
    let _ = FhirNormalizer.normalize(&envelope);
});
