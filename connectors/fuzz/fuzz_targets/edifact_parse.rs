//! Fuzz target for the EDIFACT tokenizer, parser, inspector and writer.
//!
//! Run (from `connectors/`, needs a nightly toolchain and `cargo install cargo-fuzz`):
//!
//! ```text
//! cargo +nightly fuzz run edifact_parse fuzz/corpus/edifact_parse \
//!     testdata/edifact/edifact-rs testdata/edifact/medcom-dk-glasdam \
//!     testdata/edifact/pydifact testdata/edifact/ketenbus -- -max_total_time=300
//! ```
//!
//! The invariants live in `ketenbus_connectors::edifact::fuzz_one`, which the proptest
//! smoke tests (`cargo test -p ketenbus-connectors edifact::proptests`) run too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ketenbus_connectors::edifact::fuzz_one(data);
});
