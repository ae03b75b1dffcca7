//! The `.avsc` files are the source of truth: every Rust type must encode with its schema
//! (field names, types and order checked by Avro's resolution), decode back to an equal
//! value, and name exactly the schema's fields.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::BTreeSet;

use ketenbus_schemas::codec::{AvroRecord, fingerprint_of};
use ketenbus_schemas::event::*;
use ketenbus_schemas::{DeadLetter, DeliveryOutcome, Format, Outcome, RawEnvelope, RetryRecord};

fn roundtrip<T: AvroRecord + PartialEq + std::fmt::Debug>(v: &T) {
    let bytes = v.to_avro().expect("encodes with its schema");
    assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object marker");
    assert_eq!(fingerprint_of(&bytes).unwrap(), T::compiled().fingerprint);
    let back = T::from_avro(&bytes).expect("decodes");
    assert_eq!(&back, v);
    // The same bytes as apache-avro's generic path (value, resolution, validation).
    let schema = &T::compiled().schema;
    let generic = apache_avro::to_avro_datum(
        schema,
        apache_avro::to_value(v).unwrap().resolve(schema).unwrap(),
    )
    .unwrap();
    assert_eq!(&bytes[10..], generic.as_slice(), "{}", T::compiled().name);
    // Fields of the JSON form are exactly the schema's fields.
    let schema: serde_json::Value = serde_json::from_str(T::SCHEMA_JSON).unwrap();
    let want: BTreeSet<String> = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    let json = serde_json::to_value(v).unwrap();
    let got: BTreeSet<String> = json.as_object().unwrap().keys().cloned().collect();
    assert_eq!(got, want, "fields of {}", T::compiled().name);
}

fn header(kind: EventKind) -> EventHeader {
    let mut h = EventHeader::new(kind, "0192d3a4-0000-7000-8000-000000000001", 0, "edifact");
    h.occurred_at = Some("2026-11-01T07:40".into());
    h.sender = Some("mailbox:500001234".into());
    h.patient_key = Some("k".repeat(32));
    h.source_message_type = Some("MEDLAB:1".into());
    h.interchange_reference = Some("IC0042".into());
    h.message_reference = Some("M0042".into());
    h
}

fn phone(value: &str) -> ContactPoint {
    ContactPoint {
        system: Some("phone".into()),
        value: value.into(),
        use_code: Some("work".into()),
        type_code: Some(Coding {
            system: "http://terminology.hl7.org/CodeSystem/v3-AddressUse".into(),
            code: "MC".into(),
            display: Some("Mobile Phone".into()),
        }),
    }
}

fn patient() -> Patient {
    Patient {
        identifiers: vec![Identifier {
            system: systems::BSN.into(),
            value: "999911120".into(),
        }],
        name: Some(HumanName {
            given: Some("Pieter".into()),
            initials: Some("P.".into()),
            family: Some("Jansen".into()),
            call_name: Some("Piet".into()),
            ..Default::default()
        }),
        birth_date: Some("1961-04-09".into()),
        gender: Some("male".into()),
        address: Some(Address {
            city: Some("Groningen".into()),
            ..Default::default()
        }),
        telecom: vec![phone("0501234567")],
        marital_status: Some(Coding {
            system: "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus".into(),
            code: "M".into(),
            display: Some("Married".into()),
        }),
        contacts: vec![Contact {
            relationships: vec![Coding {
                system: "urn:oid:2.16.840.1.113883.2.4.3.11.22.472".into(),
                code: "1".into(),
                display: Some("Eerste relatie/contactpersoon".into()),
            }],
            name: Some(HumanName {
                family: Some("Jansen".into()),
                ..Default::default()
            }),
            telecom: vec![phone("0612345678")],
            address: None,
        }],
    }
}

fn professional() -> HealthProfessional {
    HealthProfessional {
        identifiers: vec![Identifier {
            system: systems::AGB.into(),
            value: "01000001".into(),
        }],
        name: Some(HumanName {
            text: Some("Dr. A. de Boer".into()),
            ..Default::default()
        }),
        role: Some("requester".into()),
        specialty: Some(Coding {
            system: "urn:oid:2.16.840.1.113883.2.4.6.7".into(),
            code: "0100".into(),
            display: None,
        }),
        organization_name: None,
        telecom: vec![phone("0507654321")],
        role_code: Some(Coding {
            system: "urn:oid:2.16.840.1.113883.2.4.15.111".into(),
            code: "01.015".into(),
            display: Some("Huisarts".into()),
        }),
        role_display: Some("Huisarts".into()),
    }
}

fn attachment() -> Attachment {
    Attachment {
        content_type: "application/pdf".into(),
        title: Some("ecg.pdf".into()),
        sha256: "ab".repeat(32),
        size: 1234,
        document_type: Some(Coding {
            system: systems::LOINC.into(),
            code: "11524-6".into(),
            display: Some("EKG study".into()),
        }),
    }
}

#[test]
fn envelope_matches_its_schema() {
    for format in Format::ALL {
        roundtrip(&RawEnvelope {
            id: "m1".into(),
            received_at_ms: 1_764_000_000_000,
            connector: "http".into(),
            format,
            content_type: "application/EDIFACT".into(),
            sender: None,
            receiver: Some("mailbox:500005678".into()),
            body: b"UNB+UNOA:1'".to_vec(),
            attributes: [("file".to_owned(), "a.edi".to_owned())].into(),
        });
    }
}

#[test]
fn outcome_and_dead_letter_match_their_schemas() {
    for outcome in [
        Outcome::Delivered,
        Outcome::Retrying,
        Outcome::DeadLettered,
        Outcome::Filtered,
    ] {
        roundtrip(&DeliveryOutcome {
            subscription: "s".into(),
            record_id: "m1.0".into(),
            envelope_id: "m1".into(),
            at_ms: 1,
            attempt: 2,
            outcome,
            reason: Some("http_503".into()),
            detail: None,
        });
    }
    // A dead letter, and a resolution record (no value, resolved_at_ms set).
    for (detail, value, attempt, resolved_at_ms) in [
        (
            Some("404 Not Found".into()),
            vec![0xC3, 0x01, 9],
            Some(4),
            None,
        ),
        (None, Vec::new(), None, Some(1_764_000_000_000)),
    ] {
        roundtrip(&DeadLetter {
            id: "m1.0@1".into(),
            stage: "s".into(),
            record_id: "m1.0".into(),
            envelope_id: "m1".into(),
            at_ms: 1,
            reason: "http_404".into(),
            detail,
            source_topic: "ketenbus.events.lab_result".into(),
            key: vec![1, 2],
            value,
            attempt,
            resolved_at_ms,
        });
    }
    for first_failure_ms in [None, Some(1_764_000_000_000)] {
        roundtrip(&RetryRecord {
            record_id: "m1.0".into(),
            envelope_id: "m1".into(),
            attempt: 3,
            first_failure_ms,
            next_attempt_ms: 1_764_000_000_500,
            reason: first_failure_ms.map(|_| "http_503".into()),
            detail: None,
            source_topic: "ketenbus.events.lab_result".into(),
            key: vec![1, 2],
            value: vec![0xC3, 0x01, 9],
            replay_of: first_failure_ms.map(|_| "m1.0@1".into()),
        });
    }
}

#[test]
fn lab_result_matches_its_schema() {
    roundtrip(&LabResultEvent {
        header: header(EventKind::LabResult),
        patient: Some(patient()),
        performer: Some(HealthcareProvider {
            name: Some("Regiolab Noord".into()),
            phone: Some("0501234567".into()),
            organization_types: vec![Coding {
                system: "http://nictiz.nl/fhir/NamingSystem/organization-type".into(),
                code: "L".into(),
                display: None,
            }],
            telecom: vec![phone("0501234567")],
            ..Default::default()
        }),
        requester: Some(professional()),
        professionals: vec![professional()],
        specimens: vec![Specimen {
            id: "s1".into(),
            identifiers: vec![Identifier {
                system: "urn:ketenbus:edifact-reference".into(),
                value: "L2611017".into(),
            }],
            material: Some(Coding {
                system: "urn:ketenbus:local".into(),
                code: "bloed".into(),
                display: None,
            }),
            collected_at: Some("2026-11-01T07:40".into()),
            ..Default::default()
        }],
        results: vec![LabTestResult {
            id: "r1".into(),
            test: Coding {
                system: "urn:ketenbus:local".into(),
                code: "K".into(),
                display: Some("Kalium".into()),
            },
            other_codes: vec![],
            local_code: Some("K".into()),
            local_name: Some("Kalium".into()),
            status: "final".into(),
            value_text: Some("5.9".into()),
            value_coding: None,
            value_decimal: Some("5.9".into()),
            comparator: None,
            unit: Some("mmol/l".into()),
            unit_system: None,
            reference_low: Some("3.5".into()),
            reference_high: Some("5.0".into()),
            reference_text: None,
            interpretation: Some("H".into()),
            interpretation_raw: Some(">".into()),
            specimen_id: Some("s1".into()),
            section: Some("CHEMIE".into()),
            section_code: None,
            effective_at: None,
            comments: vec!["Hemolytisch monster: herhalen aanbevolen".into()],
            identifiers: vec![Identifier {
                system: "urn:oid:2.16.528.1.1007.3.3.1234.1".into(),
                value: "R-1".into(),
            }],
            corrects: Some(Identifier {
                system: "urn:oid:2.16.528.1.1007.3.3.1234.1".into(),
                value: "R-0".into(),
            }),
            interpretation_text: Some("boven referentiebereik".into()),
            interpretation_display: Some("High".into()),
            members: vec!["r2".into()],
            type_code: Some("0".into()),
        }],
        comments: vec![],
        report_identifiers: vec![Identifier {
            system: "urn:ketenbus:edifact:rff:SRI".into(),
            value: "RPT-7".into(),
        }],
        reported_at: Some("2026-11-01T09:00".into()),
        order_identifiers: vec![Identifier {
            system: "urn:ketenbus:edifact:rff:ROI".into(),
            value: "ORD-7".into(),
        }],
        warnings: vec!["result r1: reference range low above high, kept as sent".into()],
        performing_lab: Some(HealthcareProvider {
            name: Some("Pathologielab Oost".into()),
            ..Default::default()
        }),
    });
}

#[test]
fn letter_handover_and_notification_match_their_schemas() {
    roundtrip(&LetterEvent {
        header: header(EventKind::Letter),
        patient: Some(patient()),
        author: Some(professional()),
        author_organization: None,
        recipient: None,
        date: Some("2026-11-01".into()),
        title: None,
        text: Some("Geachte collega,".into()),
        attachments: vec![attachment()],
    });
    roundtrip(&AcuteHandoverEvent {
        header: header(EventKind::AcuteHandover),
        patient: Some(patient()),
        referral: Referral {
            id: Some("sr-1".into()),
            code: Coding {
                system: systems::SNOMED.into(),
                code: "11131000146102".into(),
                display: None,
            },
            status: Some("active".into()),
            priority: Some("urgent".into()),
            authored_on: None,
            reason: None,
        },
        requester: None,
        requester_organization: None,
        receiver_organization: None,
        sections: vec![Section {
            code: None,
            title: Some("Reden van verwijzing".into()),
            text: Some("...".into()),
        }],
        attachments: vec![attachment()],
        composition_type: Some(Coding {
            system: systems::LOINC.into(),
            code: "18761-7".into(),
            display: None,
        }),
        composition_title: Some("Ambulanceverwijzing".into()),
        composition_date: Some("2026-06-08T11:15:00+02:00".into()),
        composition_author: Some(Box::new(professional())),
    });
    roundtrip(&HandoverNotificationEvent {
        header: header(EventKind::HandoverNotification),
        task_reference: "https://vvt.example.test/fhir/Task/1".into(),
        task_status: "requested".into(),
        sender_endpoint: None,
        requester: Some("ura:00000001".into()),
        owner: None,
        inputs: vec![TaskInput {
            type_code: Some(Coding {
                system: "http://fhir.nl/fhir/NamingSystem/TaskParameterType".into(),
                code: "get-workflow-task".into(),
                display: None,
            }),
            reference: "https://vvt.example.test/fhir/Task/1".into(),
        }],
    });
}

#[test]
fn a_value_of_another_schema_is_refused() {
    let o = DeliveryOutcome {
        subscription: "s".into(),
        record_id: "r".into(),
        envelope_id: "e".into(),
        at_ms: 0,
        attempt: 1,
        outcome: Outcome::Delivered,
        reason: None,
        detail: None,
    };
    let bytes = o.to_avro().unwrap();
    assert!(RawEnvelope::from_avro(&bytes).is_err());
    assert!(RawEnvelope::from_avro(b"plain").is_err());
}

#[test]
fn fingerprints_match_an_independent_implementation() {
    // Parsing Canonical Form fingerprints as Python's fastavro 1.x computes them
    // (`fastavro.schema.fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")`),
    // as the hex of the 8 bytes single-object encoding writes.
    let hex = |f: [u8; 8]| f.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(RawEnvelope::compiled().fingerprint), "027ee19725004e3d");
}

#[test]
fn lineage_record_matches_its_schema() {
    use ketenbus_schemas::lineage::{LineageReceived, LineageRecord, LineageStep};
    let received = LineageRecord {
        message_id: "m1".into(),
        step_id: String::new(),
        received: Some(LineageReceived {
            received_at_ms: 1_764_000_000_000,
            connector: "http".into(),
            format: "edifact".into(),
            content_type: "application/EDIFACT".into(),
            size: 42,
            sender: Some("agb:01234567".into()),
            receiver: None,
            raw_partition: 2,
            raw_offset: 7,
            file: Some("lab-0042.edi".into()),
            source_id: Some("IC0042".into()),
        }),
        step: None,
    };
    roundtrip(&received);
    assert_eq!(received.key(), b"m1/");
    let step = LineageRecord {
        message_id: "m1".into(),
        step_id: "0193a1b2-0000-7000-8000-000000000001.000000000003".into(),
        received: None,
        step: Some(LineageStep {
            at_ms: 1_764_000_000_001,
            stage: "delivery".into(),
            subscription: Some("gp".into()),
            record_id: Some("m1.0".into()),
            kind: Some("lab_result".into()),
            attempt: Some(2),
            outcome: "retrying".into(),
            reason: Some("http_503".into()),
            detail: None,
            patient: Some("4a489bac718020756c333b6feec3c609".into()),
        }),
    };
    roundtrip(&step);
    assert_eq!(
        step.key(),
        b"m1/0193a1b2-0000-7000-8000-000000000001.000000000003"
    );
}
