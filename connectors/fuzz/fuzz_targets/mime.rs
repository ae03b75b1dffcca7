//! Fuzz target for the MIME reading and normalising of `message/rfc822`
//! (`ketenbus_connectors::mail::mime` and `mail::dsn`).
//!
//! Arbitrary bytes go through `mime::inspect` (take the message apart, read a delivery
//! status report, normalise: EDIFACT and FHIR parts to their normalisers, letters to letter
//! events) and `dsn::parse`. Checks: no panic, and every part has its hash. Run from `connectors/`, see `fuzz/README.md`.
#![no_main]

use ketenbus_connectors::mail::{dsn, mime};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(analysis) = mime::analyse(data) {
        for part in &analysis.parts {
            assert_eq!(part.sha256.len(), 64, "part hash");
        }
    }
    let _ = mime::inspect(data);
    let _ = dsn::parse(data);
});
