//! Fuzz target for the MIME reading and normalising of `message/rfc822`
//! (`ketenbus_connectors::mail::mime` and `mail::dsn`).
//!
//! Arbitrary bytes go through `mime::inspect` (take the message apart, read a delivery
//! status report, normalise: EDIFACT and FHIR parts to their normalisers, letters to letter
//! events) and `dsn::parse`. Checks: no panic, and every part has its hash. Run from `connectors/`, see `fuzz/README.md`.
#![no_main]

use std::sync::Once;

use ketenbus_connectors::mail::{dsn, mime};
use libfuzzer_sys::fuzz_target;

/// libFuzzer's panic hook aborts on every panic, even one that is caught. mail-parser 0.11
/// has a `debug_assert!` that malformed multiparts reach; ketenbus catches that panic
/// (`mime::parse_message`), so let it unwind to the catch; every other panic still aborts.
fn let_mail_parser_assertions_unwind() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_mail_parser = info
                .location()
                .is_some_and(|l| l.file().contains("mail-parser-0.11"));
            if !in_mail_parser {
                abort(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let_mail_parser_assertions_unwind();
    if let Ok(analysis) = mime::analyse(data) {
        for part in &analysis.parts {
            assert_eq!(part.sha256.len(), 64, "part hash");
        }
    }
    let _ = mime::inspect(data);
    let _ = dsn::parse(data);
});
