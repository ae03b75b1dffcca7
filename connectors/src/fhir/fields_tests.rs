//! Issue 18 class 10, the fields that were not carried: each in -> event -> FHIR out
//! (validated by the npm `fhir` validator) -> in again, from ketenbus's own fixtures
//! (`testdata/fhir/ketenbus`, `testdata/edifact/ketenbus/mrpn32-telecom.edi`) and the
//! zib 2020 examples the lab golden test reads.

use ketenbus_schemas::event::{
    AcuteHandoverEvent, Coding, ContactPoint, HandoverNotificationEvent, LabResultEvent, systems,
};
use ketenbus_schemas::{Event, EventHeader, Format, RawEnvelope};

use super::emit::{BundleStyle, EmitOptions, INTERCHANGE_REFERENCE, to_bundle};
use super::validator::assert_valid_bundle;
use super::value::Value;
use super::{FhirNormaliser, json};
use crate::Normalise;

/// A FHIR envelope of `body`.
fn envelope(format: Format, body: Vec<u8>) -> RawEnvelope {
    super::golden_tests::envelope("env-c10", format, body)
}

fn fixture(file: &str) -> Vec<u8> {
    super::golden_tests::testdata(&format!("ketenbus/{file}"))
}

fn cp(system: &str, value: &str, use_code: Option<&str>) -> ContactPoint {
    ContactPoint {
        system: Some(system.into()),
        value: value.into(),
        use_code: use_code.map(str::to_owned),
        type_code: None,
    }
}

fn code(system: &str, code: &str, display: &str) -> Coding {
    Coding {
        system: system.into(),
        code: code.into(),
        display: Some(display.into()),
    }
}

fn handover(events: &[Event]) -> AcuteHandoverEvent {
    let all: Vec<&AcuteHandoverEvent> = events
        .iter()
        .filter_map(|e| match e {
            Event::AcuteHandover(h) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(all.len(), 1);
    all[0].clone()
}

/// Every class 10 field of `class10-referral.json`.
fn assert_referral_fields(e: &AcuteHandoverEvent) {
    let p = e.patient.as_ref().unwrap();
    let n = p.name.as_ref().unwrap();
    assert_eq!(
        (
            n.given.as_deref(),
            n.initials.as_deref(),
            n.call_name.as_deref()
        ),
        (Some("Pieter Jan"), Some("P.J."), Some("Piet"))
    );
    assert_eq!(
        p.telecom,
        vec![
            cp("phone", "0612345678", Some("mobile")),
            cp("phone", "0501234567", Some("home")),
            cp("email", "p.jansen@example.test", Some("home")),
        ]
    );
    assert_eq!(
        p.marital_status,
        Some(code(
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            "M",
            "Married"
        ))
    );
    assert_eq!(p.contacts.len(), 1);
    let c = &p.contacts[0];
    assert_eq!(
        c.relationships,
        vec![
            code(
                "urn:oid:2.16.840.1.113883.2.4.3.11.22.472",
                "01",
                "Eerste relatie/contactpersoon"
            ),
            code(
                "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                "WIFE",
                "Wife"
            ),
        ]
    );
    let cn = c.name.as_ref().unwrap();
    assert_eq!(
        (
            cn.given.as_deref(),
            cn.initials.as_deref(),
            cn.call_name.as_deref(),
            cn.family.as_deref()
        ),
        (Some("Anna"), Some("A."), Some("Ans"), Some("Jansen"))
    );
    assert_eq!(c.telecom, vec![cp("phone", "0687654321", Some("mobile"))]);
    let ca = c.address.as_ref().unwrap();
    assert_eq!(
        (
            ca.street.as_deref(),
            ca.city.as_deref(),
            ca.postal_code.as_deref()
        ),
        (Some("Laanweg 12"), Some("Groningen"), Some("9700AB"))
    );

    let rav = e.requester_organization.as_ref().unwrap();
    assert_eq!(
        rav.organization_types,
        vec![code(
            "http://nictiz.nl/fhir/NamingSystem/organization-type",
            "X3",
            "Ambulancedienst"
        )]
    );
    assert_eq!(
        rav.telecom,
        vec![
            cp("phone", "0309998877", Some("work")),
            cp("fax", "0309998800", Some("work")),
        ]
    );
    assert_eq!(rav.phone.as_deref(), Some("0309998877"));
    let hap = e.receiver_organization.as_ref().unwrap();
    assert_eq!(
        hap.organization_types,
        vec![
            code(
                "http://nictiz.nl/fhir/NamingSystem/organization-type",
                "Z3",
                "Huisartspraktijk (zelfstandig of groepspraktijk)"
            ),
            code(
                "urn:oid:2.16.840.1.113883.2.4.6.7",
                "0100",
                "Huisartsen, niet nader gespecificeerd"
            ),
        ]
    );
    assert_eq!(hap.telecom, vec![cp("phone", "0301234567", Some("work"))]);

    // The requester's telecom is on its PractitionerRole and its Practitioner: once each.
    let r = e.requester.as_ref().unwrap();
    assert_eq!(
        r.telecom,
        vec![
            cp("phone", "0301112233", Some("work")),
            cp("email", "a.boer@rav.example.test", Some("work")),
        ]
    );
    assert_eq!(
        r.role_code,
        Some(code(
            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "REF",
            "referrer"
        ))
    );
    assert_eq!(r.role_display.as_deref(), Some("Verwijzer"));
    assert_eq!(r.role.as_deref(), Some("requester"));

    assert_eq!(
        e.composition_type,
        Some(code(systems::LOINC, "18761-7", "Transfer summary note"))
    );
    assert_eq!(
        e.composition_title.as_deref(),
        Some("Verwijzing ambulance naar huisarts")
    );
    assert_eq!(
        e.composition_date.as_deref(),
        Some("2026-06-09T14:15:00+02:00")
    );
    let author = e.composition_author.as_deref().unwrap();
    assert_eq!(author.role.as_deref(), Some("author"));
    assert_eq!(
        author.name.as_ref().and_then(|n| n.text.as_deref()),
        Some("B. Verpleegkundige")
    );
    assert_eq!(
        author.role_display.as_deref(),
        Some("Ambulanceverpleegkundige")
    );
    assert_eq!(
        author.telecom,
        vec![cp("phone", "0304445566", Some("work"))]
    );
    assert_eq!(author.organization_name.as_deref(), Some("RAV Utrecht"));

    assert_eq!(e.attachments.len(), 1);
    assert_eq!(
        e.attachments[0].document_type,
        Some(code(systems::LOINC, "11524-6", "EKG study"))
    );
    assert_eq!(
        e.header.interchange_reference.as_deref(),
        Some("urn:uuid:5b0b6f6e-4c1e-4b6a-9d7e-0a0a0a0a0a10")
    );
}

fn without_header(e: &AcuteHandoverEvent) -> String {
    let mut e = e.clone();
    e.referral.id = None;
    e.header = EventHeader::new(e.header.kind, "x", 0, "x");
    serde_json::to_string(&e).unwrap()
}

#[test]
fn class_10_fields_of_a_referral_go_in_out_and_back() {
    let source = envelope(Format::FhirJson, fixture("class10-referral.json"));
    let events = FhirNormaliser.normalise(&source).unwrap();
    let e = handover(&events);
    assert_referral_fields(&e);
    assert_eq!(e.header.message_reference.as_deref(), Some("mh-class10"));

    let documents = FhirNormaliser.content(&source);
    let store: super::sink::AttachmentSource = std::sync::Arc::new(move |hash: &str| {
        documents
            .iter()
            .find(|d| crate::contract::content::sha256_hex(d) == hash)
            .cloned()
    });
    for style in [BundleStyle::Message, BundleStyle::Transaction] {
        let mut out = to_bundle(
            &Event::AcuteHandover(e.clone()),
            &EmitOptions {
                style,
                ..EmitOptions::default()
            },
        )
        .unwrap();
        assert_valid_bundle(&out);
        assert_eq!(
            out.get("identifier")
                .and_then(|i| i.get("system"))
                .and_then(Value::as_str),
            Some(INTERCHANGE_REFERENCE)
        );
        super::sink::inline_attachments(&mut out, &store);
        for format in [Format::FhirJson, Format::FhirXml] {
            let again = FhirNormaliser
                .normalise(&envelope(format, super::write(format, &out).unwrap()))
                .unwrap();
            let e2 = handover(&again);
            assert_referral_fields(&e2);
            assert_eq!(
                without_header(&e2),
                without_header(&e),
                "{style:?} {format:?}"
            );
        }
    }
}

fn notification(events: &[Event]) -> HandoverNotificationEvent {
    match events {
        [Event::HandoverNotification(n)] => n.clone(),
        other => panic!("expected one notification, got {}", other.len()),
    }
}

#[test]
fn a_task_keeps_its_input_references_and_not_its_credential() {
    let events = FhirNormaliser
        .normalise(&envelope(Format::FhirJson, fixture("class10-task.json")))
        .unwrap();
    let n = notification(&events);
    let kinds: Vec<(&str, &str)> = n
        .inputs
        .iter()
        .map(|i| {
            (
                i.type_code.as_ref().map_or("", |c| c.code.as_str()),
                i.reference.as_str(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                "read-available-resource",
                "https://vvt.example.test/fhir/Composition/overdracht-1"
            ),
            (
                "query-available-resources",
                "https://vvt.example.test/fhir/Observation?patient=Patient/p1"
            ),
        ]
    );
    let json = serde_json::to_string(&n).unwrap();
    assert!(!json.contains("secret-authorization-base"), "{json}");

    for style in [BundleStyle::Message, BundleStyle::Transaction] {
        let out = to_bundle(
            &events[0],
            &EmitOptions {
                style,
                ..EmitOptions::default()
            },
        )
        .unwrap();
        assert_valid_bundle(&out);
        let again = FhirNormaliser
            .normalise(&envelope(Format::FhirJson, json::to_vec(&out)))
            .unwrap();
        assert_eq!(notification(&again).inputs, n.inputs, "{style:?}");
    }
}

/// The class 10 fields of the zib 2020 examples (Patient-01, Organization-01,
/// PractitionerRole-01 with Practitioner-01) in the lab golden test, in and after the round
/// trip.
pub(super) fn assert_zib_examples(e: &LabResultEvent) {
    let p = e.patient.as_ref().unwrap();
    assert_eq!(
        p.name.as_ref().and_then(|n| n.call_name.as_deref()),
        Some("Jo")
    );
    // The mobile number's kind (zib TelecomType) rides on nl-core's ext-CodeSpecification
    // on `system`, not in `use`.
    let mobile = ContactPoint {
        type_code: Some(code(
            "http://terminology.hl7.org/CodeSystem/v3-AddressUse",
            "MC",
            "Mobile Phone",
        )),
        ..cp("phone", "+31611234567", None)
    };
    assert_eq!(
        p.telecom,
        vec![
            mobile.clone(),
            cp("email", "giesput@myweb.nl", Some("home"))
        ]
    );
    assert_eq!(
        p.marital_status,
        Some(code(
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            "D",
            "Divorced"
        ))
    );
    assert_eq!(p.contacts.len(), 1);
    let c = &p.contacts[0];
    let roles: Vec<&str> = c.relationships.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(roles, ["01", "07"]);
    let cn = c.name.as_ref().unwrap();
    assert_eq!(
        (
            cn.initials.as_deref(),
            cn.family.as_deref(),
            cn.partner_family.as_deref()
        ),
        (Some("J.P.M."), Some("Putten"), Some("Giessen"))
    );
    assert_eq!(
        c.telecom,
        vec![mobile, cp("email", "giesput@myweb.nl", Some("work"))]
    );
    assert_eq!(
        c.address.as_ref().and_then(|a| a.city.as_deref()),
        Some("Hoogmade")
    );
    let lab = e.performer.as_ref().unwrap();
    let types: Vec<&str> = lab
        .organization_types
        .iter()
        .map(|t| t.code.as_str())
        .collect();
    assert_eq!(types, ["0320", "V5"]);
    assert_eq!(
        lab.telecom,
        vec![
            cp("phone", "+31107040704", Some("work")),
            cp("email", "info@erasmus.nl", Some("work")),
        ]
    );
    let r = e.requester.as_ref().unwrap();
    assert_eq!(
        r.telecom,
        vec![
            cp("phone", "+3715828282", Some("work")),
            cp("email", "j.peters@hospital.nl", Some("work")),
        ]
    );
}

fn lab(events: &[Event]) -> LabResultEvent {
    match events {
        [Event::LabResult(l)] => l.clone(),
        other => panic!("expected one lab result, got {}", other.len()),
    }
}

#[test]
fn edifact_phone_numbers_and_control_references_leave_as_valid_fhir_and_come_back() {
    let events = crate::edifact::normalise_bytes(
        "env-c10",
        include_bytes!("../../testdata/edifact/ketenbus/mrpn32-telecom.edi"),
    )
    .unwrap();
    let e = lab(&events);
    let performer = e.performer.as_ref().unwrap();
    assert_eq!(
        performer.telecom,
        vec![
            cp("phone", "040-1234567", None),
            cp("fax", "040-1234500", None)
        ]
    );
    assert_eq!(performer.phone.as_deref(), Some("040-1234567"));
    let requester = e.requester.as_ref().unwrap();
    assert_eq!(
        requester.telecom,
        vec![
            cp("phone", "050-5556677", None),
            cp("email", "a.devries@huisarts.example.test", None),
        ]
    );
    assert_eq!(
        e.professionals[0].telecom,
        vec![cp("phone", "06-11223344", Some("mobile"))]
    );
    let patient = e.patient.as_ref().unwrap();
    assert_eq!(
        patient.telecom,
        vec![
            cp("phone", "06-99887766", Some("mobile")),
            cp("phone", "050-1234567", None),
        ]
    );
    assert_eq!(e.header.interchange_reference.as_deref(), Some("IC0410"));
    assert_eq!(e.header.message_reference.as_deref(), Some("R0411"));

    // MEDLAB's ZKH telephone number is the lab's telecom too.
    let medlab = crate::edifact::normalise_bytes(
        "env-c10",
        include_bytes!("../../testdata/edifact/ketenbus/medlab-standards-example.edi"),
    )
    .unwrap();
    let ml = lab(&medlab);
    assert_eq!(
        ml.performer.as_ref().unwrap().telecom,
        vec![cp("phone", "0501234567", None)]
    );
    assert_eq!(
        (
            ml.header.interchange_reference.as_deref(),
            ml.header.message_reference.as_deref()
        ),
        (Some("IC0042"), Some("M0042"))
    );

    for event in [&events[0], &medlab[0]] {
        let Event::LabResult(before) = event else {
            unreachable!()
        };
        let out = to_bundle(event, &EmitOptions::default()).unwrap();
        assert_valid_bundle(&out);
        let again = lab(&FhirNormaliser
            .normalise(&envelope(Format::FhirJson, json::to_vec(&out)))
            .unwrap());
        assert_eq!(
            again.header.interchange_reference,
            before.header.interchange_reference
        );
        let telecom = |l: &LabResultEvent| {
            (
                l.patient.as_ref().map(|p| p.telecom.clone()),
                l.performer.as_ref().map(|p| p.telecom.clone()),
                l.requester.as_ref().map(|p| p.telecom.clone()),
                l.professionals
                    .iter()
                    .map(|p| p.telecom.clone())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(telecom(&again), telecom(before));
    }
}
