//! The lab-result schema changes compatibly: a reader of the previous schema
//! (`tests/previous/event_lab_result.avsc`, as released at d1a0699) reads records written
//! with the new one, and a reader of the new one reads the previous records, filling the new
//! fields with their defaults.

use apache_avro::{Schema, from_avro_datum, to_avro_datum, types::Value};
use ketenbus_schemas::codec::AvroRecord;
use ketenbus_schemas::event::{Coding, LabResultEvent, LabTestResult};
use ketenbus_schemas::{EventHeader, EventKind};

const PREVIOUS: &str = include_str!("previous/event_lab_result.avsc");

fn event() -> LabResultEvent {
    let mut e = LabResultEvent::new(EventHeader::new(
        EventKind::LabResult,
        "env",
        0,
        "fhir_json",
    ));
    let mut r = LabTestResult::new(
        "r1".into(),
        Coding {
            system: "http://loinc.org".into(),
            code: "718-7".into(),
            display: None,
        },
        "corrected",
    );
    r.interpretation_text = Some("analyser was faulty".into());
    r.members = vec!["r2".into()];
    e.results.push(r);
    e.warnings.push("w".into());
    e
}

fn field<'v>(v: &'v Value, name: &str) -> Option<&'v Value> {
    match v {
        Value::Record(fs) => fs.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

#[test]
fn a_previous_reader_reads_new_records_and_the_other_way_round() {
    let previous = Schema::parse_str(PREVIOUS).unwrap();
    let current = &LabResultEvent::compiled().schema;
    let e = event();
    // New -> previous reader: the new fields are skipped, the rest reads.
    let new_bytes = to_avro_datum(
        current,
        apache_avro::to_value(&e).unwrap().resolve(current).unwrap(),
    )
    .unwrap();
    let old_view = from_avro_datum(current, &mut new_bytes.as_slice(), Some(&previous)).unwrap();
    assert!(field(&old_view, "warnings").is_none());
    let results = field(&old_view, "results").unwrap();
    let Value::Array(rs) = results else { panic!() };
    assert_eq!(
        field(&rs[0], "status"),
        Some(&Value::String("corrected".into()))
    );
    // Previous -> new reader: the new fields take their defaults.
    let mut old = e.clone();
    old.warnings.clear();
    old.results[0].interpretation_text = None;
    old.results[0].members.clear();
    let mut old_value = apache_avro::to_value(&old)
        .unwrap()
        .resolve(current)
        .unwrap();
    // Drop the new fields to write exactly what the previous release wrote.
    let keep = |v: &mut Value, names: &[&str]| {
        if let Value::Record(fs) = v {
            fs.retain(|(n, _)| !names.contains(&n.as_str()));
        }
    };
    keep(
        &mut old_value,
        &[
            "report_identifiers",
            "reported_at",
            "order_identifiers",
            "warnings",
            "performing_lab",
        ],
    );
    if let Some(Value::Array(rs)) = match &mut old_value {
        Value::Record(fs) => fs.iter_mut().find(|(n, _)| n == "results").map(|(_, v)| v),
        _ => None,
    } {
        for r in rs {
            keep(
                r,
                &[
                    "identifiers",
                    "corrects",
                    "interpretation_text",
                    "interpretation_display",
                    "members",
                ],
            );
        }
    }
    let old_bytes = to_avro_datum(&previous, old_value).unwrap();
    let new_view = from_avro_datum(&previous, &mut old_bytes.as_slice(), Some(current)).unwrap();
    let back: LabResultEvent = apache_avro::from_value(&new_view).unwrap();
    assert_eq!(back, old);
}
