//! Event mapping tests: ketenbus's own fixtures and the public samples, each compared
//! field by field with a reviewed golden file (`*.events.json`), plus the rejections.
//!
//! After a deliberate mapping change, rewrite the golden files with
//! `KETENBUS_BLESS=1 cargo test -p ketenbus-connectors edifact::map::golden_tests`
//! and review the diff.

use std::collections::BTreeMap;

use ketenbus_schemas::event::{LabResultEvent, LetterEvent, systems};
use ketenbus_schemas::{Event, Format, RawEnvelope};
use serde_json::Value as Json;

use super::*;
use crate::edifact::{inspect, synthetic_medlab};
use crate::zib::EDIFACT_REFERENCE_NUMBER;
use crate::{ErrorKind, Normalise, NormaliseError};

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!("../../../testdata/edifact/", $path)).as_slice()
    };
}

macro_rules! golden {
    ($input:literal, $golden:literal) => {
        check_golden(
            fixture!($input),
            include_str!(concat!("../../../testdata/edifact/ketenbus/", $golden)),
            $golden,
        )
    };
}

fn check_golden(input: &[u8], golden: &str, name: &str) -> Vec<Event> {
    let events = normalise_bytes("env-1", input).expect("normalises");
    let actual = serde_json::to_value(&events).unwrap();
    if std::env::var_os("KETENBUS_BLESS").is_some() {
        let path = format!(
            "{}/testdata/edifact/ketenbus/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::write(path, serde_json::to_string_pretty(&actual).unwrap() + "\n").unwrap();
        return events;
    }
    let expected: Json = serde_json::from_str(golden).expect("golden file is JSON");
    assert!(
        actual == expected,
        "events differ from {name}; got:\n{}",
        serde_json::to_string_pretty(&actual).unwrap()
    );
    // And back: the golden JSON is a valid event list.
    let parsed: Vec<Event> = serde_json::from_value(expected).unwrap();
    assert_eq!(parsed.len(), events.len());
    events
}

fn lab(e: &Event) -> &LabResultEvent {
    match e {
        Event::LabResult(l) => l,
        other => panic!("expected a lab result, got {:?}", other.kind()),
    }
}

fn letter(e: &Event) -> &LetterEvent {
    match e {
        Event::Letter(l) => l,
        other => panic!("expected a letter, got {:?}", other.kind()),
    }
}

fn envelope(body: &[u8]) -> RawEnvelope {
    RawEnvelope {
        id: "env-1".into(),
        received_at_ms: 0,
        connector: "inbox".into(),
        format: Format::Edifact,
        content_type: "application/EDIFACT".into(),
        sender: None,
        receiver: None,
        body: body.to_vec(),
        attributes: BTreeMap::new(),
    }
}

#[test]
fn medlab_two_messages() {
    let events = golden!(
        "ketenbus/medlab-two-messages.edi",
        "medlab-two-messages.events.json"
    );
    assert_eq!(events.len(), 2);
    let first = lab(&events[0]);
    assert_eq!(first.header.id, "env-1.0");
    assert_eq!(
        first.header.occurred_at.as_deref(),
        Some("2026-10-31T07:40")
    );
    let patient = first.patient.as_ref().unwrap();
    assert_eq!(patient.identifiers[0].system, systems::BSN);
    assert_eq!(patient.identifiers[0].value, "999911120");
    assert_eq!(
        patient.address.as_ref().unwrap().city.as_deref(),
        Some("'s-Gravenhage"),
        "released apostrophe"
    );
    let statuses: Vec<&str> = first.results.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(
        statuses,
        ["final", "final", "corrected", "preliminary", "registered"]
    );
    let kalium = &first.results[2];
    assert_eq!(kalium.interpretation.as_deref(), Some("H"));
    assert_eq!(kalium.interpretation_raw.as_deref(), Some(">"));
    assert_eq!(
        kalium.comments,
        [
            "Hemolytisch monster: herhalen aanbevolen",
            "(kalium mogelijk vals verhoogd+)"
        ]
    );
    let glucose = &first.results[3];
    assert_eq!(glucose.comparator.as_deref(), Some("<"));
    assert_eq!(glucose.value_decimal.as_deref(), Some("0.5"));
    assert_eq!(glucose.value_text.as_deref(), Some("<0,5"));
    assert_eq!(glucose.specimen_id.as_deref(), Some("specimen-2"));
    assert_eq!(
        first.comments,
        ["Nuchter afgenomen", "Vragen? Bel de coördinator"]
    );
    // The second message has none of the optional segments, and a 1999 date.
    let second = lab(&events[1]);
    assert_eq!(second.header.id, "env-1.1");
    assert!(second.performer.is_none() && second.requester.is_none());
    assert_eq!(
        second.specimens[0].collected_at.as_deref(),
        Some("1999-12-31T23:59")
    );
    assert_eq!(
        second.results[0].test.system,
        "urn:ketenbus:local:500001234"
    );
}

#[test]
fn medlab_example_from_the_standards_page() {
    let events = golden!(
        "ketenbus/medlab-standards-example.edi",
        "medlab-standards-example.events.json"
    );
    let e = lab(&events[0]);
    assert_eq!(
        e.specimens[0].identifiers[0].system,
        EDIFACT_REFERENCE_NUMBER
    );
    assert_eq!(e.specimens[0].identifiers[0].value, "L2611017");
    assert_eq!(e.results.len(), 2);
}

#[test]
fn medvri_and_medspe_letters() {
    let events = golden!("ketenbus/medvri-medspe.edi", "medvri-medspe.events.json");
    let vri = letter(&events[0]);
    assert_eq!(vri.header.source_message_type.as_deref(), Some("MEDVRI:1"));
    assert_eq!(
        vri.text.as_deref(),
        Some(
            "Geachte collega,\n\nMevrouw Smit is gezien op het spreekuur wegens klachten: hoesten.\n  Met vriendelijke groet,"
        )
    );
    let spe = letter(&events[1]);
    assert_eq!(spe.header.source_message_type.as_deref(), Some("MEDSPE:1"));
    assert_eq!(
        spe.text.as_deref(),
        Some("Specialistenbrief cardiologie: ECG zonder afwijkingen. Café"),
        "ISO-8859-1 byte decoded, unreleased colon read back as text"
    );
    assert_eq!(
        spe.patient.as_ref().unwrap().birth_date.as_deref(),
        Some("1980")
    );
}

#[test]
fn mrpn32_lab_report() {
    let events = golden!("ketenbus/mrpn32.edi", "mrpn32.events.json");
    let e = lab(&events[0]);
    assert_eq!(
        e.header.source_message_type.as_deref(),
        Some("MEDRPT:D:93A:UN:MRPN32")
    );
    assert_eq!(
        e.performer.as_ref().unwrap().identifiers[0].system,
        systems::AGB
    );
    assert_eq!(e.results[0].test.system, systems::NHG_45);
    assert_eq!(e.results[1].value_decimal.as_deref(), Some("5.9"));
    assert_eq!(e.results[1].interpretation.as_deref(), Some("H"));
}

#[test]
fn medcom_lab_report_maps_too() {
    let events = golden!("medcom-dk-glasdam/RPT01_2.edi", "RPT01_2.events.json");
    let e = lab(&events[0]);
    assert_eq!(e.results[0].unit.as_deref(), Some("µmol/l"));
    assert_eq!(
        e.patient.as_ref().unwrap().identifiers[0].system,
        "urn:oid:1.2.208.176.1.2"
    );
    assert_eq!(e.header.sender.as_deref(), Some("gln:5790000120284"));
}

#[test]
fn through_the_normalise_trait_and_pure() {
    let env = envelope(fixture!("ketenbus/medlab-two-messages.edi"));
    let a = EdifactNormaliser.normalise(&env).unwrap();
    let b = EdifactNormaliser.normalise(&env).unwrap();
    assert_eq!(a, b, "same envelope, same events");
    assert_eq!(a.len(), 2);
}

fn reject(body: &[u8]) -> NormaliseError {
    let e = EdifactNormaliser.normalise(&envelope(body)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Rejected);
    e
}

#[test]
fn other_message_types_are_unsupported() {
    for (body, ty) in [
        (
            fixture!("edifact-rs/d96a_orders_conforming.edi"),
            "ORDERS:D:96A:UN",
        ),
        (fixture!("pydifact/aperak_v3.edi"), "APERAK:D:96A:UN"),
        (
            fixture!("pydifact/aperak_rejected_v3.edi"),
            "APERAK:D:96A:UN",
        ),
        (fixture!("pydifact/wikipedia_en.edi"), "PAORES:93:1:IA"),
        (fixture!("pydifact/patient1.edi"), "MEDRPT:1:901:UN"),
        (fixture!("pydifact/patient2.edi"), "MEDRPT:1:901:UN"),
        (
            fixture!("medcom-dk-glasdam/CTL01_1.edi"),
            "CONTRL:D:93A:ZZ:C0130Q",
        ),
        (
            fixture!("medcom-dk-glasdam/DIS01_1.edi"),
            "MEDDIS:D:93A:UN:D0133L",
        ),
        (
            fixture!("medcom-dk-glasdam/REF01_1.edi"),
            "MEDREF:D:93A:UN:H0130R",
        ),
    ] {
        let e = reject(body);
        assert_eq!(e.reason(), "unsupported_message_type");
        assert_eq!(
            e,
            NormaliseError::UnsupportedMessageType {
                message_type: ty.into()
            }
        );
    }
}

#[test]
fn unparseable_input_is_a_positioned_syntax_error() {
    let e = reject(fixture!("pydifact/hl7.lab"));
    assert_eq!(e.reason(), "edifact_syntax");
    assert_eq!(
        e.to_string(),
        "edifact syntax error at interchange 1, segment #2, byte 43: invalid segment tag"
    );
    let e = reject(fixture!("edifact-rs/d96a_orders_malformed.edi"));
    assert_eq!(
        e.to_string(),
        "edifact syntax error at segment BGM #1, byte 10: segment outside a message"
    );
    let e = reject(b"not edifact at all");
    assert_eq!(e.reason(), "edifact_syntax");
}

#[test]
fn wrong_control_counts_reject_a_supported_message() {
    let good =
        String::from_utf8(fixture!("ketenbus/medlab-standards-example.edi").to_vec()).unwrap();
    let bad = good.replace("UNT+12+M0042", "UNT+11+M0042");
    let e = reject(bad.as_bytes());
    assert_eq!(e.reason(), "edifact_syntax");
    assert_eq!(
        e.to_string(),
        "edifact syntax error at interchange 1, message 1, segment UNT #12, element 1, byte 412: segment count declares 11 but there are 12"
    );
}

#[test]
fn invalid_bsn_is_rejected_with_where_not_what() {
    let e = reject(fixture!("ketenbus/medlab-invalid-bsn.edi"));
    assert_eq!(e.reason(), "invalid_bsn");
    assert_eq!(
        e.to_string(),
        "invalid content at interchange 1, message 1, segment PID #2, element 5, byte 71: BSN fails the eleven-test"
    );
    assert!(
        !e.to_string().contains("999911121"),
        "no patient data in errors"
    );
}

#[test]
fn a_medlab_without_patient_is_rejected() {
    let e = reject(b"UNH+1+MEDLAB:1'BEP+0+Kalium+4.1++mmol/l++3.5+5.0+K'UNT+3+1'");
    assert_eq!(e.reason(), "missing_element");
    assert_eq!(
        e.to_string(),
        "invalid content at interchange 1, message 1, segment UNH #1, byte 0: message has no PID segment"
    );
}

#[test]
fn synthetic_load_normalises() {
    let bytes = synthetic_medlab(20);
    let events = normalise_bytes("load", &bytes).unwrap();
    assert_eq!(events.len(), 20);
    assert!(events.iter().all(|e| lab(e).results.len() == 8));
}

#[test]
fn inspect_shows_events_or_why_not() {
    let j = inspect(fixture!("ketenbus/mrpn32.edi")).unwrap();
    assert_eq!(j["events"][0]["header"]["id"], "inspect.0");
    let j = inspect(fixture!("pydifact/aperak_v3.edi")).unwrap();
    assert_eq!(j["rejected"]["reason"], "unsupported_message_type");
    assert_eq!(j["control_issues"].as_array().unwrap().len(), 1);
}
