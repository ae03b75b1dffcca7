//! One fuzzing step, shared by the cargo-fuzz target (`connectors/fuzz`) and the
//! proptest smoke tests, so the same invariants are checked either way.

use super::contrl::{ContrlParams, acknowledge};
use super::inspect::document_json;
use super::map::normalise_document;
use super::parse::document::{parse, parse_strict};
use super::parse::tokenize::tokenize;
use super::parse::write::{OwnedSegment, write_document};

/// Feeds `data` through tokenizer, parser, inspector, normaliser, CONTRL and writer and checks what must hold:
/// no panic, error offsets inside the input, and a written document that parses back to
/// the same segments.
///
/// # Panics
/// When one of those invariants breaks: that is the finding.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    match tokenize(data) {
        Ok(tokens) => {
            for seg in tokens.segments() {
                let _ = seg.tag();
                let _ = seg.trail();
                for v in seg.counters() {
                    let _ = v.text();
                }
                for el in seg.occurrences() {
                    for v in el.components() {
                        assert!(v.bytes().len() <= v.raw().len());
                        let _ = v.text();
                    }
                }
            }
        }
        Err(e) => {
            if let Some(off) = e.offset() {
                assert!(off <= data.len(), "error offset past the input");
            }
            let _ = e.to_string();
        }
    }
    // Whatever the input, an acknowledgement (when there is one) is well-formed EDIFACT.
    let params = ContrlParams {
        reference: "CTL1",
        date: "261101",
        time: "0900",
    };
    if let Some(ack) = acknowledge(data, params)
        && let Err(e) = parse_strict(&ack)
    {
        panic!("CONTRL does not parse: {e}");
    }
    let doc = match parse(data) {
        Ok(doc) => doc,
        Err(e) => {
            if let Some(off) = e.offset() {
                assert!(off <= data.len(), "error offset past the input");
            }
            return;
        }
    };
    let _ = document_json(&doc);
    // The mappings must not panic either, whatever they decide.
    if let Err(e) = normalise_document("fuzz", &doc) {
        let _ = (e.reason(), e.to_string());
    }
    for m in doc.messages() {
        let _ = (m.reference(), m.message_type(), m.body().count());
    }
    let written = write_document(&doc).expect("a parsed document can be written");
    let again = parse(&written).expect("a written document parses");
    let a: Vec<OwnedSegment> = doc
        .tokens()
        .segments()
        .map(|s| OwnedSegment::from_segment(&s))
        .collect();
    let b: Vec<OwnedSegment> = again
        .tokens()
        .segments()
        .map(|s| OwnedSegment::from_segment(&s))
        .collect();
    assert!(a == b, "written document reads back differently");
    assert_eq!(
        write_document(&again).expect("rewrite"),
        written,
        "writing is idempotent"
    );
}
