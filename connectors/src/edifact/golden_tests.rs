//! Golden tests on the public samples in `connectors/testdata/edifact/` (see the
//! PROVENANCE.md in each folder). The files are compiled in, so tests never read
//! anything outside the crate at run time.

use super::*;

macro_rules! sample {
    ($path:literal) => {
        include_bytes!(concat!("../../testdata/edifact/", $path)).as_slice()
    };
}

const ORDERS_OK: &[u8] = sample!("edifact-rs/d96a_orders_conforming.edi");
const ORDERS_BAD: &[u8] = sample!("edifact-rs/d96a_orders_malformed.edi");
const CTL01: &[u8] = sample!("medcom-dk-glasdam/CTL01_1.edi");
const DIS01: &[u8] = sample!("medcom-dk-glasdam/DIS01_1.edi");
const REF01: &[u8] = sample!("medcom-dk-glasdam/REF01_1.edi");
const RPT01: &[u8] = sample!("medcom-dk-glasdam/RPT01_2.edi");
const APERAK: &[u8] = sample!("pydifact/aperak_v3.edi");
const APERAK_REJ: &[u8] = sample!("pydifact/aperak_rejected_v3.edi");
const PATIENT1: &[u8] = sample!("pydifact/patient1.edi");
const PATIENT2: &[u8] = sample!("pydifact/patient2.edi");
const WIKIPEDIA: &[u8] = sample!("pydifact/wikipedia_en.edi");
const HL7_LAB: &[u8] = sample!("pydifact/hl7.lab");
const MEDLAB_EXAMPLE: &[u8] = sample!("ketenbus/medlab-standards-example.edi");

fn only_message<'d>(doc: &'d Document<'d>) -> Message<'d> {
    let mut msgs = doc.messages();
    assert_eq!(msgs.len(), 1);
    msgs.next().unwrap()
}

fn tags(m: &Message<'_>) -> Vec<String> {
    m.segments().map(|s| s.tag().to_owned()).collect()
}

fn assert_roundtrip(input: &[u8]) {
    let doc = parse(input).unwrap();
    assert_eq!(
        write_document(&doc).unwrap(),
        input,
        "parse -> write must be byte-identical"
    );
}

#[test]
fn d96a_orders_conforming_is_a_bare_message() {
    let doc = parse_strict(ORDERS_OK).unwrap();
    let ic = doc.interchanges().next().unwrap();
    assert!(ic.una().is_some(), "the UNA belongs to the bare messages");
    assert!(ic.header().is_none());
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "ORDERS");
    assert_eq!(m.version().as_deref(), Some("D"));
    assert_eq!(m.release().as_deref(), Some("96A"));
    assert_eq!(m.agency().as_deref(), Some("UN"));
    assert_eq!(tags(&m), ["UNH", "BGM", "DTM", "RFF", "NAD", "NAD", "UNT"]);
    let nad = m.body().nth(4).unwrap();
    assert_eq!(nad.text(0, 0).as_deref(), Some("SU"));
    assert_eq!(nad.text(1, 0).as_deref(), Some("4012345000009"));
    assert_eq!(nad.get(1, 1).map(|v| v.is_empty()), Some(true));
    assert_eq!(nad.text(1, 2).as_deref(), Some("9"));
    assert_roundtrip(ORDERS_OK);
}

#[test]
fn d96a_orders_malformed_fails_at_the_stray_bgm() {
    let err = parse(ORDERS_BAD).unwrap_err();
    assert!(
        matches!(err, EdifactError::SegmentOutsideMessage { .. }),
        "{err}"
    );
    let p = err.position().unwrap();
    assert_eq!(p.offset, 10, "BGM starts right after the UNA line");
    assert_eq!(p.segment, Some(1));
    assert_eq!(p.tag.as_deref(), Some("BGM"));
    assert_eq!(
        err.to_string(),
        "segment BGM #1, byte 10: segment outside a message"
    );
    // Without the stray BGM the file still has a wrong UNT count (5 declared, 4 there).
    let without_bgm = [&ORDERS_BAD[..10], &ORDERS_BAD[29..]].concat();
    assert!(without_bgm.starts_with(b"UNA:+.? '\nUNH"));
    let doc = parse(&without_bgm).unwrap();
    let issues: Vec<String> = doc
        .control_issues()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        issues,
        [
            "interchange 1, message 1, segment UNT #4, element 1, byte 77: segment count declares 5 but there are 4"
        ]
    );
}

#[test]
fn medcom_contrl() {
    let doc = parse_strict(CTL01).unwrap();
    let ic = doc.interchanges().next().unwrap();
    assert_eq!(ic.charset(), Some(Charset::Unoc));
    assert_eq!(ic.syntax_version(), Some(3));
    assert_eq!(ic.sender().as_deref(), Some("DKKMDKMDNET"));
    assert_eq!(ic.header().unwrap().text(1, 1).as_deref(), Some("14"));
    assert_eq!(ic.control_reference().as_deref(), Some("KuvertNr1234"));
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "CONTRL");
    assert_eq!(m.association_code().as_deref(), Some("C0130Q"));
    assert_eq!(tags(&m), ["UNH", "UCI", "FTX", "UCM", "UCM", "UNT"]);
    assert_eq!(ic.trailer().unwrap().trail(), b"\n\n");
    assert_roundtrip(CTL01);
}

#[test]
fn medcom_discharge_letter_in_latin1() {
    let doc = parse_strict(DIS01).unwrap();
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "MEDDIS");
    assert_eq!(m.segment_count(), 51);
    let nad = m.body().find(|s| s.tag() == "NAD").unwrap();
    assert_eq!(nad.text(3, 0).as_deref(), Some("HILLERØD SYGEHUS"));
    let pna = m.body().find(|s| s.tag() == "PNA").unwrap();
    assert_eq!(pna.text(1, 0).as_deref(), Some("0108584947"));
    assert_eq!(pna.text(4, 1).as_deref(), Some("Mosebryggersen"));
    assert_roundtrip(DIS01);
}

#[test]
fn medcom_referral_on_one_line_with_escapes() {
    let doc = parse_strict(REF01).unwrap();
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "MEDREF");
    assert_eq!(m.segment_count(), 56);
    let ftx = m.body().find(|s| s.tag() == "FTX").unwrap();
    let v = ftx.get(3, 0).unwrap();
    assert!(v.is_escaped());
    assert_eq!(
        v.text(),
        "Hypertensionsudredning + behandling samt diætvejledning vedrørende \\"
    );
    assert_eq!(ftx.text(3, 1).as_deref(), Some("overvægt"));
    assert_roundtrip(REF01);
}

#[test]
fn medcom_lab_report_d93a() {
    let doc = parse_strict(RPT01).unwrap();
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "MEDRPT");
    assert_eq!(m.release().as_deref(), Some("93A"));
    assert_eq!(m.association_code().as_deref(), Some("R0130K"));
    let rsl = m.body().find(|s| s.tag() == "RSL").unwrap();
    assert_eq!(rsl.text(1, 0).as_deref(), Some("128"));
    assert_eq!(rsl.text(3, 3).as_deref(), Some("µmol/l"));
    assert_eq!(rsl.get(3, 3).unwrap().raw(), b"\xb5mol/l", "raw bytes kept");
    let rnd = m.body().find(|s| s.tag() == "RND").unwrap();
    assert_eq!(rnd.text(1, 0).as_deref(), Some("60"));
    assert_eq!(rnd.text(2, 0).as_deref(), Some("130"));
    let markers = m
        .body()
        .filter(|s| s.tag().starts_with('S') && s.tag()[1..].bytes().all(|b| b.is_ascii_digit()))
        .count();
    assert_eq!(markers, 9);
    assert_roundtrip(RPT01);
}

#[test]
fn aperak_samples_parse_but_their_unt_count_is_wrong() {
    for sample in [APERAK, APERAK_REJ] {
        let doc = parse(sample).unwrap();
        assert_eq!(only_message(&doc).message_type(), "APERAK");
        let issues: Vec<String> = doc
            .control_issues()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(
            issues[0].starts_with("interchange 1, message 1, segment UNT #7, element 1, byte ")
                && issues[0].ends_with("segment count declares 8 but there are 7"),
            "{issues:?}"
        );
        assert!(matches!(
            parse_strict(sample),
            Err(EdifactError::ControlCount {
                declared: 8,
                actual: 7,
                ..
            })
        ));
        assert_roundtrip(sample);
    }
}

#[test]
fn austrian_letters_with_needless_releases_and_line_breaks_in_values() {
    for (sample, lines) in [(PATIENT1, 32), (PATIENT2, 9)] {
        let doc = parse(sample).unwrap();
        let ic = doc.interchanges().next().unwrap();
        assert_eq!(ic.syntax_identifier().as_deref(), Some("ANSI"));
        assert_eq!(ic.charset(), Some(Charset::Other));
        let m = only_message(&doc);
        assert_eq!(m.message_type(), "MEDRPT");
        assert_eq!(m.body().filter(|s| s.tag() == "FTX").count(), lines);
        // UNB splits date and time into two elements, so element 5 is not the control
        // reference the UNZ repeats: reported, not swallowed.
        let issues: Vec<String> = doc
            .control_issues()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].ends_with("interchange control reference does not match the header"));
        // `?.` releases a character that needs none: the values read back, the bytes differ.
        let rewritten = write_document(&doc).unwrap();
        assert_ne!(rewritten, sample);
        let again = parse(&rewritten).unwrap();
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
        assert!(a == b);
    }
    let doc = parse(PATIENT1).unwrap();
    let texts: Vec<String> = only_message(&doc)
        .body()
        .filter(|s| s.tag() == "FTX")
        .map(|s| s.text(2, 0).unwrap_or_default().into_owned())
        .collect();
    assert_eq!(texts[3], "Dr. Max Musterarzt\n");
    assert_eq!(texts[4], "Beispielstraße. 13\n");
    let doc = parse(PATIENT2).unwrap();
    let first = only_message(&doc).body().nth(1).unwrap();
    let text = first.text(2, 0).unwrap();
    assert!(text.starts_with("Dr. med. Max Mustermann\r\nFacharzt für Innere Medizin\r\n"));
}

#[test]
fn wikipedia_paores() {
    let doc = parse_strict(WIKIPEDIA).unwrap();
    let ic = doc.interchanges().next().unwrap();
    assert_eq!(ic.syntax_identifier().as_deref(), Some("IATB"));
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "PAORES");
    assert_eq!(m.segment_count(), 13);
    let odi = m.body().find(|s| s.tag() == "ODI").unwrap();
    assert_eq!(odi.element_count(), 0);
    assert!(!ic.trailer().unwrap().is_terminated() || ic.trailer().unwrap().trail().is_empty());
    assert_roundtrip(WIKIPEDIA);
}

#[test]
fn hl7_wrapped_in_unb_is_not_edifact() {
    let err = parse(HL7_LAB).unwrap_err();
    assert!(matches!(err, EdifactError::InvalidTag { .. }), "{err}");
    let p = err.position().unwrap();
    assert_eq!(p.interchange, Some(1));
    assert_eq!(p.segment, Some(2));
    assert_eq!(p.offset, 43);
    assert_eq!(&HL7_LAB[43..45], b"H`");
    assert!(p.tag.is_none(), "no data in the error");
    assert_eq!(
        err.to_string(),
        "interchange 1, segment #2, byte 43: invalid segment tag"
    );
}

#[test]
fn medlab_example_from_the_standards_page() {
    let doc = parse_strict(MEDLAB_EXAMPLE).unwrap();
    let m = only_message(&doc);
    assert_eq!(m.message_type(), "MEDLAB");
    assert_eq!(
        tags(&m),
        [
            "UNH", "ZKH", "PID", "AFD", "ARA", "DET", "IDE", "SEC", "BEP", "BEP", "OPB", "UNT"
        ]
    );
    let opb = m.body().find(|s| s.tag() == "OPB").unwrap();
    assert_eq!(
        opb.text(0, 0).as_deref(),
        Some("Hemolytisch monster: herhalen aanbevolen")
    );
    assert_roundtrip(MEDLAB_EXAMPLE);
}

#[test]
fn inspect_json_of_a_sample() {
    let j = inspect(RPT01).unwrap();
    let ic = &j["interchanges"][0];
    assert_eq!(ic["syntax_identifier"], "UNOC");
    assert_eq!(ic["messages"][0]["type"], "MEDRPT");
    assert_eq!(ic["messages"][0]["association_code"], "R0130K");
    let rsl = ic["messages"][0]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["tag"] == "RSL")
        .unwrap();
    assert_eq!(rsl["elements"][2], serde_json::json!([""]));
    assert_eq!(
        rsl["elements"][3],
        serde_json::json!(["", "", "", "µmol/l"])
    );
    assert!(inspect(HL7_LAB).is_err());
}
