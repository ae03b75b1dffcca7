//! Issue 18 class 10 added fields to the shared records and events: a reader of the schema
//! before that change still reads records written now, and a reader now reads records
//! written before, with the new fields at their defaults (Avro schema resolution).

use apache_avro::{Schema, from_avro_datum, to_avro_datum};
use ketenbus_schemas::codec::AvroRecord;
use ketenbus_schemas::event::*;

fn both_ways<T: AvroRecord + PartialEq + std::fmt::Debug>(now: &T, before: &str, emptied: &T) {
    let new = &T::compiled().schema;
    let old = Schema::parse_str(before).expect("previous schema parses");
    let value = apache_avro::to_value(now).unwrap().resolve(new).unwrap();
    let bytes = to_avro_datum(new, value).unwrap();
    // Old reader, new record.
    let as_old = from_avro_datum(new, &mut bytes.as_slice(), Some(&old)).expect("old reads new");
    // New reader, old record: the new fields take their defaults.
    let old_bytes = to_avro_datum(&old, as_old).unwrap();
    let as_new =
        from_avro_datum(&old, &mut old_bytes.as_slice(), Some(new)).expect("new reads old");
    let back: T = apache_avro::from_value(&as_new).unwrap();
    assert_eq!(&back, emptied);
}

fn coding(code: &str) -> Coding {
    Coding {
        system: "urn:test".into(),
        code: code.into(),
        display: None,
    }
}

fn phone() -> ContactPoint {
    ContactPoint {
        system: Some("phone".into()),
        value: "0501234567".into(),
        use_code: None,
        type_code: Some(coding("MC")),
    }
}

fn header(kind: EventKind, full: bool) -> EventHeader {
    let mut h = EventHeader::new(kind, "e", 0, "edifact");
    if full {
        h.interchange_reference = Some("IC0042".into());
        h.message_reference = Some("M0042".into());
    }
    h
}

fn patient(full: bool) -> Patient {
    let mut p = Patient {
        name: Some(HumanName {
            family: Some("Jansen".into()),
            ..HumanName::default()
        }),
        ..Patient::default()
    };
    if full {
        p.name.as_mut().unwrap().call_name = Some("Piet".into());
        p.telecom = vec![phone()];
        p.marital_status = Some(coding("M"));
        p.contacts = vec![Contact {
            relationships: vec![coding("1")],
            telecom: vec![phone()],
            ..Contact::default()
        }];
    }
    p
}

fn professional(full: bool) -> HealthProfessional {
    let mut p = HealthProfessional {
        role: Some("author".into()),
        ..HealthProfessional::default()
    };
    if full {
        p.telecom = vec![phone()];
        p.role_code = Some(coding("01.015"));
        p.role_display = Some("Huisarts".into());
    }
    p
}

fn provider(full: bool) -> HealthcareProvider {
    let mut o = HealthcareProvider {
        name: Some("Regiolab".into()),
        ..HealthcareProvider::default()
    };
    if full {
        o.organization_types = vec![coding("L")];
        o.telecom = vec![phone()];
    }
    o
}

fn attachment(full: bool) -> Attachment {
    Attachment {
        content_type: "application/pdf".into(),
        title: None,
        sha256: "ab".repeat(32),
        size: 1,
        document_type: full.then(|| coding("11524-6")),
    }
}

fn letter(full: bool) -> LetterEvent {
    LetterEvent {
        header: header(EventKind::Letter, full),
        patient: Some(patient(full)),
        author: Some(professional(full)),
        author_organization: Some(provider(full)),
        recipient: None,
        date: None,
        title: None,
        text: None,
        attachments: vec![attachment(full)],
    }
}

fn handover(full: bool) -> AcuteHandoverEvent {
    AcuteHandoverEvent {
        header: header(EventKind::AcuteHandover, full),
        patient: Some(patient(full)),
        referral: Referral {
            id: None,
            code: coding("11131000146102"),
            status: None,
            priority: None,
            authored_on: None,
            reason: None,
        },
        requester: Some(professional(full)),
        requester_organization: Some(provider(full)),
        receiver_organization: None,
        sections: vec![],
        attachments: vec![attachment(full)],
        composition_type: full.then(|| coding("18761-7")),
        composition_title: full.then(|| "Overdracht".into()),
        composition_date: full.then(|| "2026-06-08".into()),
        composition_author: full.then(|| Box::new(professional(true))),
    }
}

fn notification(full: bool) -> HandoverNotificationEvent {
    HandoverNotificationEvent {
        header: header(EventKind::HandoverNotification, full),
        task_reference: "Task/1".into(),
        task_status: "requested".into(),
        sender_endpoint: None,
        requester: None,
        owner: None,
        inputs: if full {
            vec![TaskInput {
                type_code: Some(coding("get-workflow-task")),
                reference: "Task/1".into(),
            }]
        } else {
            vec![]
        },
    }
}

fn lab(full: bool) -> LabResultEvent {
    let mut e = LabResultEvent::new(header(EventKind::LabResult, full));
    e.patient = Some(patient(full));
    e.performer = Some(provider(full));
    e.requester = Some(professional(full));
    e
}

#[test]
fn records_with_the_class_10_fields_and_records_without_read_both_ways() {
    let before = |kind: &str| {
        std::fs::read_to_string(format!(
            "{}/tests/before_class10/event_{kind}.avsc",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    both_ways(&letter(true), &before("letter"), &letter(false));
    both_ways(&handover(true), &before("acute_handover"), &handover(false));
    both_ways(
        &notification(true),
        &before("handover_notification"),
        &notification(false),
    );
    both_ways(&lab(true), &before("lab_result"), &lab(false));
}
