//! Property tests: random segment trees -> writer -> parser -> the same tree, and the
//! parser never panics on arbitrary bytes.

use proptest::prelude::*;

use super::*;

/// Service characters that may be chosen for a UNA (no letters, digits, space, CR or LF).
const POOL: &[u8] = b":+?'*|^!~#@&%$;/\\<>=\x1c\x1d\x1f";

fn delimiters() -> impl Strategy<Value = (Delimiters, bool)> {
    (
        Just(POOL.to_vec()).prop_shuffle(),
        any::<bool>(),
        prop::sample::select(vec![b'.', b',']),
    )
        .prop_map(|(p, v4, decimal)| {
            let d = Delimiters {
                component: p[0],
                element: p[1],
                decimal,
                release: Some(p[2]),
                repetition: v4.then_some(p[3]),
                segment: p[4],
            };
            (d, v4)
        })
        .boxed()
        .prop_union(Just((Delimiters::DEFAULT, false)).boxed())
}

fn value(d: Delimiters) -> impl Strategy<Value = Vec<u8>> {
    let mut specials = vec![
        d.component,
        d.element,
        d.segment,
        b'\r',
        b'\n',
        0xE9,
        0xC3,
        b' ',
    ];
    specials.extend(d.release);
    specials.extend(d.repetition);
    let byte = prop_oneof![
        3 => prop::sample::select(b"abcXYZ0129.,-".to_vec()),
        2 => prop::sample::select(specials),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..8)
}

fn segment(d: Delimiters, v4: bool) -> impl Strategy<Value = OwnedSegment> {
    let tag = "[A-TV-Z0-9][A-Z0-9]{2}";
    let counters = prop::collection::vec(
        prop_oneof![3 => "[0-9]{1,3}".prop_map(String::into_bytes), 1 => value(d)],
        0..4,
    );
    let reps = if v4 { 1..3usize } else { 1..2usize };
    let element = prop::collection::vec(prop::collection::vec(value(d), 1..4), reps)
        .prop_map(|repetitions| OwnedElement { repetitions });
    (tag, counters, prop::collection::vec(element, 0..6)).prop_map(|(tag, counters, elements)| {
        OwnedSegment {
            tag,
            counters,
            elements,
        }
    })
}

fn case() -> impl Strategy<Value = (Delimiters, bool, Vec<OwnedSegment>, Vec<u8>)> {
    delimiters().prop_flat_map(|(d, v4)| {
        (
            Just(d),
            Just(v4),
            prop::collection::vec(segment(d, v4), 0..12),
            prop::sample::select(vec![b"".to_vec(), b"\n".to_vec(), b"\r\n".to_vec()]),
        )
    })
}

fn envelope(d: Delimiters, v4: bool, body: &[OwnedSegment], line_break: &[u8]) -> Vec<u8> {
    let w = Writer::new(d).with_line_break(line_break);
    let mut out = Vec::new();
    w.write_una(&mut out);
    let unb = OwnedSegment {
        tag: "UNB".into(),
        counters: vec![],
        elements: vec![
            OwnedElement::composite(["UNOC", if v4 { "4" } else { "3" }]),
            OwnedElement::simple("500001234"),
            OwnedElement::simple("500005678"),
            OwnedElement::composite(["261101", "0815"]),
            OwnedElement::simple("IC1"),
        ],
    };
    w.write_segment(&mut out, &unb).unwrap();
    w.write_segment(&mut out, &OwnedSegment::new("UNH", ["M1", "TEST"]))
        .unwrap();
    w.write_all(&mut out, body).unwrap();
    let count = (body.len() + 2).to_string();
    w.write_segment(&mut out, &OwnedSegment::new("UNT", [count.as_str(), "M1"]))
        .unwrap();
    w.write_segment(&mut out, &OwnedSegment::new("UNZ", ["1", "IC1"]))
        .unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn tree_write_parse_roundtrip((d, v4, body, line_break) in case()) {
        let bytes = envelope(d, v4, &body, &line_break);
        let doc = parse_strict(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let msg = doc.messages().next().unwrap();
        let got: Vec<OwnedSegment> = msg.body().map(|s| OwnedSegment::from_segment(&s)).collect();
        prop_assert_eq!(&got, &body);
        for seg in msg.body() {
            prop_assert_eq!(seg.delimiters(), &d);
        }
        prop_assert_eq!(write_document(&doc).unwrap(), bytes);
    }

    #[test]
    fn parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        crate::edifact::fuzz_one(&bytes);
    }

    #[test]
    fn parser_never_panics_on_mutated_edifact(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let mut bytes = include_bytes!("../../testdata/edifact/ketenbus/medlab-standards-example.edi").to_vec();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        crate::edifact::fuzz_one(&bytes);
    }
}
