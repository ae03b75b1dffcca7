//! Golden tests on the official Nictiz examples (testdata/fhir, CC0, synthetic patients):
//! in -> event (every clinical field asserted) -> out (validated by the npm `fhir`
//! validator) -> in again (the same clinical content), in JSON and in XML.

use std::collections::BTreeMap;

use ketenbus_schemas::event::{Coding, Identifier, systems};
use ketenbus_schemas::{Event, Format, RawEnvelope};

use super::emit::{BundleStyle, EmitOptions, to_bundle};
use super::validator::assert_valid_bundle;
use super::value::{Object, Value};
use super::{FhirNormaliser, json, xml};
use crate::{Normalise, NormaliseError};

pub(super) fn testdata(rel: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/fhir")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn zib(name: &str) -> Value {
    xml::parse(&testdata(&format!("nictiz-r4-zib2020/{name}.xml"))).unwrap()
}

pub(crate) fn envelope(id: &str, format: Format, body: Vec<u8>) -> RawEnvelope {
    RawEnvelope {
        id: id.to_owned(),
        received_at_ms: 0,
        connector: "fhir".into(),
        format,
        content_type: if format == Format::FhirXml {
            super::MEDIA_XML
        } else {
            super::MEDIA_JSON
        }
        .into(),
        sender: None,
        receiver: None,
        body,
        attributes: BTreeMap::new(),
    }
}

/// The Acute Zorg referral message exactly as published.
pub(crate) fn az_envelope() -> RawEnvelope {
    envelope(
        "env-az",
        Format::FhirJson,
        testdata("nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"),
    )
}

fn entry(resource: Value) -> Value {
    let ty = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap()
        .to_owned();
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap()
        .to_owned();
    Object::new()
        .with("fullUrl", format!("https://lab.example.nl/fhir/{ty}/{id}"))
        .with("resource", resource)
        .with(
            "request",
            Object::new()
                .with("method", "PUT")
                .with("url", format!("{ty}/{id}")),
        )
        .into()
}

fn set(resource: &mut Value, key: &str, v: Value) {
    if let Value::Object(o) = resource {
        o.insert(key, v);
    }
}

/// A lab transaction Bundle of the Nictiz nl-core examples as published. Three links the
/// examples leave out are added in memory so every part of the mapping is exercised: the
/// sodium result names the Organization example as performer and a ServiceRequest whose
/// requester is the PractitionerRole example, and the chloride result carries an
/// ext-EdifactReferenceNumber (as a MEDLAB-derived result would).
fn lab_bundle() -> Value {
    let mut sodium = zib("nl-core-LaboratoryTestResult-01");
    set(
        &mut sodium,
        "performer",
        vec![
            Object::new()
                .with(
                    "reference",
                    "Organization/nl-core-HealthcareProvider-Organization-01",
                )
                .into(),
        ]
        .into(),
    );
    set(
        &mut sodium,
        "basedOn",
        vec![
            Object::new()
                .with("reference", "ServiceRequest/lab-request-01")
                .into(),
        ]
        .into(),
    );
    let mut chloride = zib("nl-core-LaboratoryTestResult-02");
    set(
        &mut chloride,
        "extension",
        vec![
            Object::new()
                .with("url", super::inbound::EXT_EDIFACT_REFERENCE)
                .with("valueString", "L2611017")
                .into(),
        ]
        .into(),
    );
    let request = Object::new()
        .with("resourceType", "ServiceRequest")
        .with("id", "lab-request-01")
        .with("status", "completed")
        .with("intent", "order")
        .with(
            "subject",
            Object::new().with("reference", "Patient/nl-core-Patient-01"),
        )
        .with(
            "requester",
            Object::new().with(
                "reference",
                "PractitionerRole/nl-core-HealthProfessional-PractitionerRole-01",
            ),
        );
    let entries = vec![
        entry(zib("nl-core-Patient-01")),
        entry(zib("nl-core-HealthcareProvider-Organization-01")),
        entry(zib("nl-core-HealthProfessional-Practitioner-01")),
        entry(zib("nl-core-HealthProfessional-PractitionerRole-01")),
        entry(request.into()),
        entry(zib("nl-core-LaboratoryTestResult.Specimen-01")),
        entry(sodium),
        entry(chloride),
        entry(zib("nl-core-LaboratoryTestResult-03")),
        entry(zib("nl-core-LaboratoryTestResult-LaboratoryTest-05")),
        entry(zib("nl-core-LaboratoryTestResult-LaboratoryTest-06")),
    ];
    Object::new()
        .with("resourceType", "Bundle")
        .with("type", "transaction")
        .with("entry", entries)
        .into()
}

pub(crate) fn code(system: &str, code: &str, display: &str) -> Coding {
    Coding {
        system: system.into(),
        code: code.into(),
        display: Some(display.into()),
    }
}

pub(crate) fn id(system: &str, value: &str) -> Identifier {
    Identifier {
        system: system.into(),
        value: value.into(),
    }
}

pub(crate) fn only<T: Clone>(events: &[Event], f: impl Fn(&Event) -> Option<&T>) -> T {
    assert_eq!(events.len(), 1, "one event expected");
    f(&events[0]).expect("event of the expected kind").clone()
}

pub(crate) fn lab_of(e: &Event) -> Option<&ketenbus_schemas::event::LabResultEvent> {
    match e {
        Event::LabResult(x) => Some(x),
        _ => None,
    }
}

fn handover_of(e: &Event) -> Option<&ketenbus_schemas::event::AcuteHandoverEvent> {
    match e {
        Event::AcuteHandover(x) => Some(x),
        _ => None,
    }
}

/// Every clinical field of the lab event made from the Nictiz examples.
fn assert_lab_content(e: &ketenbus_schemas::event::LabResultEvent) {
    let p = e.patient.as_ref().unwrap();
    assert_eq!(p.identifiers, vec![id(systems::BSN, "111222333")]);
    assert_eq!(p.birth_date.as_deref(), Some("1934-04-28"));
    assert_eq!(p.gender.as_deref(), Some("female"));
    let n = p.name.as_ref().unwrap();
    assert_eq!(n.given.as_deref(), Some("Johanna Petronella Maria"));
    assert_eq!(n.initials, None);
    assert_eq!(
        (n.family_prefix.as_deref(), n.family.as_deref()),
        (Some("van"), Some("Putten"))
    );
    assert_eq!(
        (n.partner_prefix.as_deref(), n.partner_family.as_deref()),
        (Some("van der"), Some("Giessen"))
    );
    assert_eq!(
        n.text.as_deref(),
        Some("Johanna Petronella Maria van Putten-van der Giessen")
    );
    let a = p.address.as_ref().unwrap();
    assert_eq!(a.street.as_deref(), Some("1e Jacob van Campenstr"));
    assert_eq!(a.house_number.as_deref(), Some("15"));
    assert_eq!(a.postal_code.as_deref(), Some("1012 NX"));
    assert_eq!(a.city.as_deref(), Some("Hoogmade"));
    assert_eq!(a.country.as_deref(), Some("Nederland"));

    let lab = e.performer.as_ref().unwrap();
    assert_eq!(lab.identifiers, vec![id(systems::URA, "06020806")]);
    assert_eq!(
        lab.name.as_deref(),
        Some("Erasmus Universitair Medisch Centrum")
    );
    assert_eq!(lab.phone.as_deref(), Some("+31107040704"));
    let la = lab.address.as_ref().unwrap();
    assert_eq!(
        (la.street.as_deref(), la.house_number.as_deref()),
        (Some("s-Gravendijkwal"), Some("230"))
    );
    assert_eq!(
        (la.postal_code.as_deref(), la.city.as_deref()),
        (Some("3015 CE"), Some("Rotterdam"))
    );

    let r = e.requester.as_ref().unwrap();
    assert_eq!(r.role.as_deref(), Some("requester"));
    assert_eq!(
        r.identifiers,
        vec![id("http://fhir.nl/fhir/NamingSystem/big", "21870932")]
    );
    let rn = r.name.as_ref().unwrap();
    assert_eq!(
        (
            rn.initials.as_deref(),
            rn.family.as_deref(),
            rn.text.as_deref()
        ),
        (Some("J.H.R."), Some("Peters"), Some("J.H.R. Peters"))
    );
    assert_eq!(
        r.specialty,
        Some(code(
            "http://fhir.nl/fhir/NamingSystem/uzi-rolcode",
            "01.026",
            "Neuroloog"
        ))
    );
    assert!(e.professionals.is_empty());
    super::fields_tests::assert_zib_examples(e);

    // Specimen-01 is in the Bundle; the chloride result's specimen is not, but its EDIFACT
    // reference number is kept on it.
    assert_eq!(e.specimens.len(), 2);
    let blood = &e.specimens[0];
    assert_eq!(
        blood.material,
        Some(code(systems::SNOMED, "87612001", "bloed"))
    );
    assert_eq!(
        blood.collected_at.as_deref(),
        Some("2012-06-12T09:00:00+02:00")
    );
    assert!(blood.identifiers.is_empty());
    assert_eq!(
        e.specimens[1].identifiers,
        vec![id(super::inbound::EXT_EDIFACT_REFERENCE, "L2611017")]
    );

    assert_eq!(e.results.len(), 5);
    let [na, cl, hav, hb, ht] = &e.results[..] else {
        unreachable!()
    };
    // (test, value, unit, low, high, interpretation, raw flag, effective, section)
    let expect = [
        (
            na,
            "2947-0",
            "Sodium [Moles/volume] in Blood",
            Some("138"),
            "mmol/l",
            Some("136"),
            Some("146"),
            None,
            None,
            "2021-06-12T13:15:00+02:00",
            "Serumtest",
        ),
        (
            cl,
            "2069-3",
            "Chloride",
            Some("109"),
            "mmol/l",
            Some("99"),
            Some("108"),
            Some("H"),
            Some("281302008"),
            "2012-05-23T08:08:00+02:00",
            "Serumtest",
        ),
        (
            hb,
            "718-7",
            "Hemoglobine",
            Some("11.5"),
            "mmol/l",
            Some("12.0"),
            Some("16.0"),
            Some("L"),
            Some("281300000"),
            "2022-01-02T12:00:00+01:00",
            "Serumtest",
        ),
        (
            ht,
            "20570-8",
            "Hematocriet",
            Some("45"),
            "%",
            Some("39"),
            Some("51"),
            None,
            None,
            "2022-01-02T12:00:02+01:00",
            "Serumtest",
        ),
    ];
    for (r, loinc, display, value, unit, low, high, interp, raw, at, section) in expect {
        assert_eq!(r.test, code(systems::LOINC, loinc, display));
        assert!(r.other_codes.is_empty());
        assert_eq!(r.status, "final");
        assert_eq!(r.value_decimal.as_deref(), value, "{loinc}");
        assert_eq!(r.unit.as_deref(), Some(unit));
        assert_eq!(r.unit_system.as_deref(), Some(systems::UCUM));
        assert_eq!(
            (r.reference_low.as_deref(), r.reference_high.as_deref()),
            (low, high),
            "{loinc}"
        );
        assert_eq!(
            (r.interpretation.as_deref(), r.interpretation_raw.as_deref()),
            (interp, raw),
            "{loinc}"
        );
        assert_eq!(r.effective_at.as_deref(), Some(at));
        assert_eq!(r.section.as_deref(), Some(section));
        assert!(r.comparator.is_none() && r.value_text.is_none());
    }
    assert_eq!(na.specimen_id.as_deref(), Some(blood.id.as_str()));
    assert_eq!(cl.specimen_id.as_deref(), Some(e.specimens[1].id.as_str()));
    // A coded result keeps its SNOMED code (and no text: the example has none).
    assert_eq!(
        hav.test,
        code(
            systems::LOINC,
            "22314-9",
            "Hepatitis A virus IgM Ab [Presence] in Serum"
        )
    );
    assert_eq!(
        hav.value_coding,
        Some(code(
            systems::SNOMED,
            "165996008",
            "hepatitis A-test negatief"
        ))
    );
    assert!(hav.value_text.is_none());
    assert_eq!(hav.section.as_deref(), Some("Virologisch onderzoek"));
    assert_eq!(
        hav.section_code,
        Some(code(systems::SNOMED, "395124008", "Virologisch onderzoek"))
    );
    assert_eq!(
        hav.effective_at.as_deref(),
        Some("2012-01-16T10:12:00+00:00")
    );
    assert_eq!(
        e.header.occurred_at.as_deref(),
        Some("2021-06-12T13:15:00+02:00")
    );
}

/// The event with local ids (specimen and result ids, which differ between source and
/// ketenbus-written Bundles) replaced by positions, and the header left out.
pub(crate) fn clinical(e: &ketenbus_schemas::event::LabResultEvent) -> String {
    let mut e = e.clone();
    let ids: Vec<String> = e.specimens.iter().map(|s| s.id.clone()).collect();
    for (i, s) in e.specimens.iter_mut().enumerate() {
        s.id = format!("s{i}");
    }
    let result_ids: Vec<String> = e.results.iter().map(|r| r.id.clone()).collect();
    for (i, r) in e.results.iter_mut().enumerate() {
        r.id = format!("r{i}");
        for m in &mut r.members {
            if let Some(p) = result_ids.iter().position(|x| x == m) {
                *m = format!("r{p}");
            }
        }
        r.specimen_id = r.specimen_id.as_ref().map(|s| {
            ids.iter()
                .position(|x| x == s)
                .map_or_else(|| format!("external:{s}"), |p| format!("s{p}"))
        });
    }
    e.header = ketenbus_schemas::EventHeader::new(e.header.kind, "x", 0, "x");
    // Warnings name source ids and paths; tests assert them on their own.
    e.warnings.clear();
    serde_json::to_string(&e).unwrap()
}

#[test]
fn nictiz_lab_results_in_json_and_xml_map_to_one_lab_event() {
    let bundle = lab_bundle();
    let from_json = FhirNormaliser
        .normalise(&envelope(
            "env-lab",
            Format::FhirJson,
            json::to_vec(&bundle),
        ))
        .unwrap();
    let from_xml = FhirNormaliser
        .normalise(&envelope(
            "env-lab",
            Format::FhirXml,
            xml::to_vec(&bundle).unwrap(),
        ))
        .unwrap();
    let lab = only(&from_json, lab_of);
    assert_lab_content(&lab);
    assert_eq!(lab.header.id, "env-lab.0");
    assert_eq!(lab.header.source_format, "fhir_json");
    assert_eq!(
        lab.header.source_message_type.as_deref(),
        Some("Bundle.transaction")
    );
    let lab_xml = only(&from_xml, lab_of);
    assert_eq!(lab_xml.header.source_format, "fhir_xml");
    assert_eq!(clinical(&lab_xml), clinical(&lab));
}

#[test]
fn lab_event_goes_out_as_valid_nl_core_and_comes_back_the_same() {
    let events = FhirNormaliser
        .normalise(&envelope(
            "env-lab",
            Format::FhirJson,
            json::to_vec(&lab_bundle()),
        ))
        .unwrap();
    let lab = only(&events, lab_of);
    for style in [BundleStyle::Transaction, BundleStyle::Message] {
        let opts = EmitOptions {
            style,
            source_endpoint: Some("https://ketenbus.example/fhir".into()),
            destination_endpoint: Some("https://gp.example/fhir".into()),
        };
        let out = to_bundle(&events[0], &opts).unwrap();
        assert_valid_bundle(&out);
        // Same bundle, same bytes: delivery is idempotent.
        assert_eq!(
            json::to_string(&out),
            json::to_string(&to_bundle(&events[0], &opts).unwrap())
        );
        for format in [Format::FhirJson, Format::FhirXml] {
            let body = super::write(format, &out).unwrap();
            let again = FhirNormaliser
                .normalise(&envelope("env-out", format, body))
                .unwrap();
            let lab2 = only(&again, lab_of);
            assert_lab_content(&lab2);
            assert_eq!(clinical(&lab2), clinical(&lab), "{style:?} {format:?}");
        }
    }
    // Resource level: the exact decimal literals, units and codes the source had.
    let out = json::to_string(&to_bundle(&events[0], &EmitOptions::default()).unwrap());
    for needle in [
        r#""valueQuantity":{"value":11.5,"unit":"mmol/l","system":"http://unitsofmeasure.org","code":"mmol/l"}"#,
        r#""low":{"value":12.0,"unit":"mmol/l","system":"http://unitsofmeasure.org","code":"mmol/l"},"high":{"value":16.0"#,
        r#"{"system":"http://snomed.info/sct","code":"281302008","display":"Boven referentiebereik"},{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation","code":"H"}"#,
        r#""extension":[{"url":"http://nictiz.nl/fhir/StructureDefinition/ext-EdifactReferenceNumber","valueString":"L2611017"}]"#,
        r#""family":"van Putten-van der Giessen""#,
        r#""request":{"method":"PUT","url":"Patient?identifier=http://fhir.nl/fhir/NamingSystem/bsn|111222333"}"#,
    ] {
        assert!(out.contains(needle), "missing {needle}");
    }
}

fn assert_az_content(e: &ketenbus_schemas::event::AcuteHandoverEvent) {
    let p = e.patient.as_ref().unwrap();
    assert_eq!(p.identifiers, vec![id(systems::BSN, "999999990")]);
    let n = p.name.as_ref().unwrap();
    assert_eq!(
        (
            n.given.as_deref(),
            n.family.as_deref(),
            n.family_prefix.as_deref()
        ),
        (Some("Patrick"), Some("de Vries"), None)
    );
    assert_eq!(
        (p.gender.as_deref(), p.birth_date.as_deref()),
        (Some("male"), Some("1944-03-10"))
    );
    let r = &e.referral;
    assert_eq!(
        r.code,
        code(
            systems::SNOMED,
            "11131000146102",
            "overdracht van zorg vanuit ambulance"
        )
    );
    assert_eq!(
        (r.status.as_deref(), r.priority.as_deref()),
        (Some("completed"), None)
    );
    assert_eq!(r.authored_on.as_deref(), Some("2026-06-08T11:15:00+02:00"));
    assert_eq!(
        r.reason.as_deref(),
        Some("Controleconsult gevraagd na ambulancezorg (maagklachten).")
    );
    let q = e.requester.as_ref().unwrap();
    assert_eq!(q.role.as_deref(), Some("requester"));
    assert_eq!(
        q.name.as_ref().and_then(|n| n.text.as_deref()),
        Some("A. Ambulance")
    );
    assert_eq!(q.organization_name.as_deref(), Some("RAV Utrecht"));
    let rav = e.requester_organization.as_ref().unwrap();
    assert_eq!(
        (rav.identifiers.clone(), rav.name.as_deref()),
        (vec![id(systems::URA, "00000001")], Some("RAV Utrecht"))
    );
    let hap = e.receiver_organization.as_ref().unwrap();
    assert_eq!(
        (hap.identifiers.clone(), hap.name.as_deref()),
        (
            vec![id(systems::URA, "00000002")],
            Some("Huisartsenpost Utrecht")
        )
    );
    let sections: Vec<(Option<&str>, Option<&str>, Option<&str>)> = e
        .sections
        .iter()
        .map(|s| {
            (
                s.code.as_ref().map(|c| c.code.as_str()),
                s.title.as_deref(),
                s.text.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        sections,
        vec![
            (
                Some("440378000"),
                Some("Reden van verwijzing"),
                Some("Controleconsult gevraagd na ambulancezorg (maagklachten).")
            ),
            (
                Some("18776-5"),
                Some("Ingestelde behandeling"),
                Some("Antacidum toegediend, klachten verminderd.")
            ),
            (
                Some("55110-1"),
                Some("Diagnose/conclusie"),
                Some("Waarschijnlijk maagklachten. Controle door huisarts gewenst.")
            ),
            (
                Some("69730-0"),
                Some("Afspraken met patiënt"),
                Some("Maak een afspraak op de huisartsenpost voor een controleconsult.")
            ),
        ]
    );
    assert_eq!(e.sections[0].code.as_ref().unwrap().system, systems::SNOMED);
    assert_eq!(e.attachments.len(), 1);
    let a = &e.attachments[0];
    assert_eq!(
        (a.content_type.as_str(), a.title.as_deref(), a.size),
        ("application/pdf", Some("12-afleidingen ECG"), 9)
    );
    // sha256 of the decoded data ("%PDF-1.4\n"), not of the base64 text.
    assert_eq!(
        a.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"%PDF-1.4\n"))
    );
    // The bytes go to the content store, so a mail or FHIR subscriber gets the document.
    assert_eq!(
        FhirNormaliser.content(&az_envelope()),
        [b"%PDF-1.4\n".to_vec()]
    );
}

fn handover_clinical(e: &ketenbus_schemas::event::AcuteHandoverEvent) -> String {
    let mut e = e.clone();
    e.referral.id = None;
    e.header = ketenbus_schemas::EventHeader::new(e.header.kind, "x", 0, "x");
    serde_json::to_string(&e).unwrap()
}

#[test]
fn acute_zorg_referral_maps_to_an_acute_handover() {
    let events = FhirNormaliser.normalise(&az_envelope()).unwrap();
    let e = only(&events, handover_of);
    assert_az_content(&e);
    assert_eq!(
        e.referral.id.as_deref(),
        Some("hg-ReferralServiceRequest-AmbulanceHAP-referral")
    );
    assert_eq!(e.header.id, "env-az.0");
    assert_eq!(
        e.header.occurred_at.as_deref(),
        Some("2026-06-08T11:15:00+02:00")
    );
    assert_eq!(e.header.sender.as_deref(), Some("ura:00000001"));
    assert_eq!(
        e.header.receiver.as_deref(),
        Some("endpoint:https://hap.example.nl/fhir")
    );
    assert_eq!(
        e.header.source_message_type.as_deref(),
        Some("Bundle.message:145")
    );
    // The same message as XML maps to the same handover.
    let tree = json::parse(&az_envelope().body).unwrap();
    let from_xml = FhirNormaliser
        .normalise(&envelope(
            "env-az",
            Format::FhirXml,
            xml::to_vec(&tree).unwrap(),
        ))
        .unwrap();
    assert_eq!(
        handover_clinical(&only(&from_xml, handover_of)),
        handover_clinical(&e)
    );
}

#[test]
fn acute_handover_goes_out_as_a_valid_message_and_comes_back_the_same() {
    let events = FhirNormaliser.normalise(&az_envelope()).unwrap();
    let e = only(&events, handover_of);
    for style in [BundleStyle::Message, BundleStyle::Transaction] {
        let opts = EmitOptions {
            style,
            source_endpoint: Some("https://ketenbus.example/fhir".into()),
            destination_endpoint: Some("https://hap.example.nl/fhir".into()),
        };
        let mut out = to_bundle(&events[0], &opts).unwrap();
        assert_valid_bundle(&out);
        // A pointer into the content store is refused on the way in: the sink sends the
        // document's bytes, as here.
        let pointer = FhirNormaliser
            .normalise(&envelope("env-out", Format::FhirJson, json::to_vec(&out)))
            .unwrap_err();
        assert!(
            matches!(&pointer, NormaliseError::Invalid { path, .. } if path.ends_with(".content[0].attachment.url")),
            "{pointer:?}"
        );
        let documents = FhirNormaliser.content(&az_envelope());
        let source: super::sink::AttachmentSource = std::sync::Arc::new(move |hash: &str| {
            documents
                .iter()
                .find(|d| crate::contract::content::sha256_hex(d) == hash)
                .cloned()
        });
        super::sink::inline_attachments(&mut out, &source);
        for format in [Format::FhirJson, Format::FhirXml] {
            let again = FhirNormaliser
                .normalise(&envelope(
                    "env-out",
                    format,
                    super::write(format, &out).unwrap(),
                ))
                .unwrap();
            let e2 = only(&again, handover_of);
            assert_az_content(&e2);
            assert_eq!(
                handover_clinical(&e2),
                handover_clinical(&e),
                "{style:?} {format:?}"
            );
        }
    }
    let msg = json::to_string(
        &to_bundle(
            &events[0],
            &EmitOptions {
                style: BundleStyle::Message,
                ..EmitOptions::default()
            },
        )
        .unwrap(),
    );
    assert!(msg.contains(r#""eventCoding":{"system":"http://nictiz.nl/fhir/CodeSystem/hg-message-event","code":"145"}"#), "{msg}");
}

#[test]
fn a_bsn_failing_the_eleven_test_is_rejected_with_its_path() {
    let text = String::from_utf8(az_envelope().body)
        .unwrap()
        .replace("999999990", "999999991");
    let err = FhirNormaliser
        .normalise(&envelope("env-bad", Format::FhirJson, text.into_bytes()))
        .unwrap_err();
    assert_eq!(
        err,
        NormaliseError::Invalid {
            reason: "invalid_bsn",
            path: "Bundle.entry[3].resource.identifier[0]".into(),
            what: "BSN fails the eleven-test".into()
        }
    );
    assert!(
        !err.to_string().contains("999999991"),
        "error texts carry no values"
    );
}

const TASK_MESSAGE: &str = r#"{"resourceType":"Bundle","type":"message","entry":[
  {"fullUrl":"urn:uuid:5b1e3c2a-0000-4000-8000-000000000001","resource":{"resourceType":"MessageHeader",
    "eventCoding":{"system":"http://example.org/fhir/message-events","code":"notification"},
    "source":{"endpoint":"https://vvt.example.nl/fhir"},"focus":[{"reference":"https://vvt.example.nl/fhir/Task/overdracht-42"}]}},
  {"fullUrl":"https://vvt.example.nl/fhir/Task/overdracht-42","resource":{"resourceType":"Task","id":"overdracht-42",
    "status":"requested","intent":"proposal","authoredOn":"2026-11-20T09:30:00+01:00",
    "requester":{"identifier":{"system":"http://fhir.nl/fhir/NamingSystem/ura","value":"00000003"}},
    "owner":{"identifier":{"system":"http://fhir.nl/fhir/NamingSystem/ura","value":"00000004"}}}}]}"#;

#[test]
fn a_task_notification_maps_to_a_thin_event_and_back() {
    let events = FhirNormaliser
        .normalise(&envelope(
            "env-task",
            Format::FhirJson,
            TASK_MESSAGE.as_bytes().to_vec(),
        ))
        .unwrap();
    let n = only(&events, |e| match e {
        Event::HandoverNotification(x) => Some(x),
        _ => None,
    });
    assert_eq!(
        n.task_reference,
        "https://vvt.example.nl/fhir/Task/overdracht-42"
    );
    assert_eq!(n.task_status, "requested");
    assert_eq!(
        n.sender_endpoint.as_deref(),
        Some("https://vvt.example.nl/fhir")
    );
    assert_eq!(
        (n.requester.as_deref(), n.owner.as_deref()),
        (Some("ura:00000003"), Some("ura:00000004"))
    );
    assert_eq!(n.header.patient_key, None);
    assert_eq!(
        n.header.occurred_at.as_deref(),
        Some("2026-11-20T09:30:00+01:00")
    );
    let out = to_bundle(
        &events[0],
        &EmitOptions {
            style: BundleStyle::Message,
            ..EmitOptions::default()
        },
    )
    .unwrap();
    assert_valid_bundle(&out);
    let again = FhirNormaliser
        .normalise(&envelope(
            "env-task-out",
            Format::FhirJson,
            json::to_vec(&out),
        ))
        .unwrap();
    let Event::HandoverNotification(n2) = &again[0] else {
        panic!("notification expected")
    };
    assert_eq!(
        (
            &n2.task_reference,
            &n2.task_status,
            &n2.sender_endpoint,
            &n2.requester,
            &n2.owner
        ),
        (
            &n.task_reference,
            &n.task_status,
            &n.sender_endpoint,
            &n.requester,
            &n.owner
        )
    );
}

#[test]
fn single_observation_and_task_resources_map_too() {
    let obs = testdata("nictiz-r4-zib2020/nl-core-LaboratoryTestResult-LaboratoryTest-05.xml");
    let events = FhirNormaliser
        .normalise(&envelope("env-obs", Format::FhirXml, obs))
        .unwrap();
    let lab = only(&events, lab_of);
    assert!(
        lab.patient.is_none(),
        "the referenced Patient is not in the message"
    );
    assert_eq!(lab.results[0].value_decimal.as_deref(), Some("11.5"));
    assert_eq!(
        lab.results[0].specimen_id.as_deref(),
        Some("nl-core-LaboratoryTestResult.Specimen-04")
    );
    assert_eq!(
        lab.header.source_message_type.as_deref(),
        Some("Observation")
    );
    let task = br#"{"resourceType":"Task","id":"t1","status":"ready","intent":"order"}"#;
    let events = FhirNormaliser
        .normalise(&envelope("env-t", Format::FhirJson, task.to_vec()))
        .unwrap();
    assert!(
        matches!(&events[0], Event::HandoverNotification(n) if n.task_reference == "Task/t1" && n.task_status == "ready")
    );
}

#[test]
fn what_cannot_be_mapped_is_named() {
    let patient = testdata("nictiz-r4-zib2020/nl-core-Patient-01.xml");
    let err = FhirNormaliser
        .normalise(&envelope("e", Format::FhirXml, patient))
        .unwrap_err();
    assert_eq!(err.reason(), "unsupported_message_type");
    let err = FhirNormaliser
        .normalise(&envelope(
            "e",
            Format::FhirJson,
            b"{\"resourceType\":".to_vec(),
        ))
        .unwrap_err();
    assert_eq!(err.reason(), "fhir_syntax");
    let no_code = br#"{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],"code":{}}"#;
    let err = FhirNormaliser
        .normalise(&envelope("e", Format::FhirJson, no_code.to_vec()))
        .unwrap_err();
    assert!(
        matches!(err, NormaliseError::Invalid { reason: "missing_element", ref path, .. } if path == "Observation.code.coding"),
        "{err}"
    );
}

#[test]
fn normalising_is_pure() {
    let a = FhirNormaliser.normalise(&az_envelope()).unwrap();
    let b = FhirNormaliser.normalise(&az_envelope()).unwrap();
    assert_eq!(a, b);
}

/// A lab event shaped like the EDIFACT normaliser's (MEDLAB example of STANDARDS.md,
/// synthetic): local codes, local times without zone, a comparator-free text flag, a
/// remark, a pending determination. It must leave as valid nl-core too.
#[test]
fn an_edifact_shaped_lab_event_leaves_as_valid_nl_core() {
    use ketenbus_schemas::event::{
        HealthcareProvider, HumanName, LabResultEvent, LabTestResult, Patient, Specimen,
    };
    let local = "urn:ketenbus:local:mailbox:500001234";
    let result = |id: &str,
                  code: &str,
                  name: &str,
                  value: Option<&str>,
                  unit: &str,
                  low: &str,
                  high: &str,
                  flag: Option<&str>| LabTestResult {
        local_code: Some(code.into()),
        local_name: Some(name.into()),
        value_text: value.map(str::to_owned),
        value_decimal: value.map(str::to_owned),
        unit: Some(unit.into()),
        reference_low: Some(low.into()),
        reference_high: Some(high.into()),
        interpretation: flag.map(|_| "H".to_owned()),
        interpretation_raw: flag.map(str::to_owned),
        specimen_id: Some("specimen-1".into()),
        section: Some("CHEMIE".into()),
        effective_at: Some("2026-11-01T07:40".into()),
        ..LabTestResult::new(
            id.into(),
            Coding {
                system: local.into(),
                code: code.into(),
                display: Some(name.into()),
            },
            if value.is_some() {
                "final"
            } else {
                "registered"
            },
        )
    };
    let mut kalium = result(
        "result-2",
        "K",
        "Kalium",
        Some("5.9"),
        "mmol/l",
        "3.5",
        "5.0",
        Some(">"),
    );
    kalium
        .comments
        .push("Hemolytisch monster: herhalen aanbevolen".into());
    let mut header = ketenbus_schemas::EventHeader::new(
        ketenbus_schemas::EventKind::LabResult,
        "env-edi",
        0,
        "edifact",
    );
    header.occurred_at = Some("2026-11-01T07:40".into());
    let event = Event::LabResult(LabResultEvent {
        patient: Some(Patient {
            identifiers: vec![id(systems::BSN, "999911120")],
            name: Some(HumanName {
                given: Some("Pieter".into()),
                initials: Some("P.".into()),
                family: Some("Jansen".into()),
                ..HumanName::default()
            }),
            birth_date: Some("1961-04-09".into()),
            gender: Some("male".into()),
            ..Patient::default()
        }),
        performer: Some(HealthcareProvider {
            name: Some("Regiolab Noord".into()),
            phone: Some("0501234567".into()),
            ..HealthcareProvider::default()
        }),
        requester: None,
        professionals: Vec::new(),
        specimens: vec![Specimen {
            id: "specimen-1".into(),
            identifiers: vec![id(super::inbound::EXT_EDIFACT_REFERENCE, "L2611017")],
            material: Some(Coding {
                system: local.into(),
                code: "bloed".into(),
                display: Some("bloed".into()),
            }),
            collected_at: Some("2026-11-01T07:40".into()),
            ..Specimen::default()
        }],
        results: vec![
            result(
                "result-1",
                "KREA",
                "Kreatinine",
                Some("88"),
                "umol/l",
                "60",
                "110",
                None,
            ),
            kalium,
            result("result-3", "CRP", "CRP", None, "mg/l", "0", "10", None),
        ],
        ..LabResultEvent::new(header)
    });
    let out = to_bundle(&event, &EmitOptions::default()).unwrap();
    assert_valid_bundle(&out);
    let back = FhirNormaliser
        .normalise(&envelope(
            "env-edi-out",
            Format::FhirJson,
            json::to_vec(&out),
        ))
        .unwrap();
    let lab = only(&back, lab_of);
    assert_eq!(lab.results.len(), 3);
    let k = &lab.results[1];
    assert_eq!(
        (
            k.test.code.as_str(),
            k.local_code.as_deref(),
            k.local_name.as_deref()
        ),
        ("K", Some("K"), Some("Kalium"))
    );
    assert_eq!(
        (
            k.value_decimal.as_deref(),
            k.unit.as_deref(),
            k.interpretation.as_deref()
        ),
        (Some("5.9"), Some("mmol/l"), Some("H"))
    );
    assert_eq!(
        (k.reference_low.as_deref(), k.reference_high.as_deref()),
        (Some("3.5"), Some("5.0"))
    );
    assert_eq!(
        k.comments,
        vec!["Hemolytisch monster: herhalen aanbevolen".to_owned()]
    );
    assert_eq!(
        k.effective_at.as_deref(),
        Some("2026-11-01T07:40:00+01:00"),
        "FHIR needs a zone: the Dutch offset is stated"
    );
    assert_eq!(lab.results[2].status, "registered");
    assert_eq!(
        lab.specimens[0].identifiers,
        vec![id(super::inbound::EXT_EDIFACT_REFERENCE, "L2611017")]
    );
    assert_eq!(
        lab.patient
            .as_ref()
            .unwrap()
            .name
            .as_ref()
            .unwrap()
            .initials
            .as_deref(),
        Some("P.")
    );
    assert_eq!(
        lab.performer.as_ref().unwrap().phone.as_deref(),
        Some("0501234567")
    );
}

#[test]
fn contained_resources_resolve_by_local_reference() {
    // A single Observation carrying its Patient and Specimen as contained resources.
    let mut obs = zib("nl-core-LaboratoryTestResult-01");
    let mut patient = zib("nl-core-Patient-01");
    set(&mut patient, "id", "p".into());
    let mut specimen = zib("nl-core-LaboratoryTestResult.Specimen-01");
    set(&mut specimen, "id", "s".into());
    set(&mut obs, "contained", vec![patient, specimen].into());
    set(
        &mut obs,
        "subject",
        Object::new().with("reference", "#p").into(),
    );
    set(
        &mut obs,
        "specimen",
        Object::new().with("reference", "#s").into(),
    );
    let events = FhirNormaliser
        .normalise(&envelope("env-c", Format::FhirJson, json::to_vec(&obs)))
        .unwrap();
    let lab = only(&events, lab_of);
    assert_eq!(
        lab.patient.unwrap().identifiers,
        vec![id(systems::BSN, "111222333")]
    );
    assert_eq!(lab.specimens[0].material.as_ref().unwrap().code, "87612001");
    // The contained Patient is checked too.
    let bad = json::to_string(&obs).replace("111222333", "111222334");
    let err = FhirNormaliser
        .normalise(&envelope("env-c", Format::FhirJson, bad.into_bytes()))
        .unwrap_err();
    assert!(
        matches!(err, NormaliseError::Invalid { reason: "invalid_bsn", ref path, .. } if path == "Observation.contained[0].identifier[0]"),
        "{err}"
    );
}

mod robustness {
    use proptest::prelude::*;

    use super::*;

    fn az_xml() -> Vec<u8> {
        xml::to_vec(&json::parse(&az_envelope().body).unwrap()).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Network input: no byte string makes the readers or the mapping panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for format in [Format::FhirJson, Format::FhirXml] {
                let _ = FhirNormaliser.normalise(&envelope("p", format, bytes.clone()));
            }
        }

        /// Nor does a real message with a few bytes changed or cut.
        #[test]
        fn damaged_messages_never_panic(cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), truncate in any::<prop::sample::Index>()) {
            for (format, mut body) in [(Format::FhirJson, az_envelope().body), (Format::FhirXml, az_xml())] {
                for (at, b) in &cuts {
                    let i = at.index(body.len());
                    body[i] = *b;
                }
                let _ = FhirNormaliser.normalise(&envelope("p", format, body.clone()));
                body.truncate(truncate.index(body.len()));
                let _ = FhirNormaliser.normalise(&envelope("p", format, body));
            }
        }
    }
}
