//! Fuzz target for the FHIR XML reader and writer (`ketenbus_connectors::fhir`).
//!
//! Arbitrary bytes go through `fhir::parse(Format::FhirXml, ..)`; a parsed resource must
//! write back, parse again to the same tree (up to member order: the reader takes elements
//! out of R4 order) and write identically a second time. The resource is also written as
//! JSON (which must not panic) and run through the FHIR normaliser (`fhir::fuzz_one`). Run
//! from `connectors/`, see `fuzz/README.md`.
#![no_main]

use ketenbus_connectors::fhir;
use ketenbus_schemas::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fhir::fuzz_one(Format::FhirXml, data));
