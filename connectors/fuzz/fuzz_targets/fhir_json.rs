//! Fuzz target for the FHIR JSON reader and writer (`ketenbus_connectors::fhir`).
//!
//! Arbitrary bytes go through `fhir::parse(Format::FhirJson, ..)`; a parsed resource must
//! write back, parse again to the same tree and write identically a second time. The
//! resource is also written as XML (which may refuse a tree R4 does not define, but not
//! panic) and run through the FHIR normaliser (`fhir::fuzz_one`). Run from `connectors/`,
//! see `fuzz/README.md`.
#![no_main]

use ketenbus_connectors::fhir;
use ketenbus_schemas::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fhir::fuzz_one(Format::FhirJson, data));
