//! Clinical fidelity of lab results (issue 18, classes 1 to 9) on ketenbus's own fixtures
//! (`testdata/fhir/ketenbus`, `testdata/edifact/ketenbus/mrpn32-fidelity.edi`): in -> event
//! (every clinical field asserted) -> FHIR out (validated by the npm `fhir` validator) ->
//! in again (the same clinical content).

use ketenbus_schemas::event::{LabResultEvent, LabTestResult, systems};
use ketenbus_schemas::{Event, Format};

use super::emit::{BundleStyle, EmitOptions, to_bundle};
use super::golden_tests::{clinical, code, envelope, id, lab_of, only};
use super::validator::assert_valid_bundle;
use super::{FhirNormaliser, json};
use crate::{Normalise, NormaliseError};

const RES: &str = "urn:oid:2.16.840.1.113883.2.4.3.999.1.1";
const UCUM: &str = "http://unitsofmeasure.org";

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/fhir/ketenbus")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn lab(body: Vec<u8>) -> LabResultEvent {
    let events = FhirNormaliser
        .normalise(&envelope("env-fid", Format::FhirJson, body))
        .unwrap();
    only(&events, lab_of)
}

/// Out in both styles, valid, and in again with the same clinical content; the
/// transaction Bundle as JSON text for resource-level checks.
fn out_and_back(e: &LabResultEvent) -> String {
    let event = Event::LabResult(e.clone());
    for style in [BundleStyle::Transaction, BundleStyle::Message] {
        let opts = EmitOptions {
            style,
            ..EmitOptions::default()
        };
        let out = to_bundle(&event, &opts).unwrap();
        assert_valid_bundle(&out);
        for format in [Format::FhirJson, Format::FhirXml] {
            let body = super::write(format, &out).unwrap();
            let again = only(
                &FhirNormaliser
                    .normalise(&envelope("env-out", format, body))
                    .unwrap(),
                lab_of,
            );
            assert_eq!(clinical(&again), clinical(e), "{style:?} {format:?}");
            assert_eq!(
                again.warnings.len(),
                e.warnings.len(),
                "{style:?} {format:?}"
            );
        }
    }
    json::to_string(&to_bundle(&event, &EmitOptions::default()).unwrap())
}

fn quantity_result(r: &LabTestResult) -> (Option<&str>, Option<&str>, Option<&str>, Option<&str>) {
    (
        r.value_decimal.as_deref(),
        r.unit.as_deref(),
        r.reference_low.as_deref(),
        r.reference_high.as_deref(),
    )
}

/// Classes 1 (identifiers, correction link), 2 (interpretation text and display), 3 (panel
/// with members in the Bundle and only referenced), 4 (one specimen shared by four
/// results through `urn:uuid`), 9 (reversed range kept, warned).
#[test]
fn a_transaction_keeps_ids_corrections_interpretations_panels_and_one_specimen() {
    let e = lab(fixture("lab-fidelity-transaction.json"));
    // The patient.
    let p = e.patient.as_ref().unwrap();
    assert_eq!(p.identifiers, vec![id(systems::BSN, "999911120")]);
    assert_eq!(p.birth_date.as_deref(), Some("1961-04-09"));
    assert_eq!(p.gender.as_deref(), Some("male"));
    // The reporting and the performing laboratory.
    assert_eq!(
        e.performer.as_ref().unwrap().identifiers,
        vec![id(systems::URA, "00000042")]
    );
    assert_eq!(
        e.performing_lab.as_ref().unwrap().identifiers,
        vec![id(systems::URA, "00000043")]
    );
    assert_eq!(
        e.performing_lab.as_ref().unwrap().name.as_deref(),
        Some("Pathologielab Oost")
    );
    // Report and order identity.
    assert_eq!(
        e.report_identifiers,
        vec![id(
            "urn:oid:2.16.840.1.113883.2.4.3.999.1.5",
            "RPT-2611-0042"
        )]
    );
    assert_eq!(e.reported_at.as_deref(), Some("2026-11-04T09:20:00+01:00"));
    assert_eq!(
        e.order_identifiers,
        vec![id("urn:oid:2.16.840.1.113883.2.4.3.999.1.4", "ORD-88120")]
    );
    // One specimen, with both its identifiers.
    assert_eq!(e.specimens.len(), 1, "{:?}", e.specimens);
    let sp = &e.specimens[0];
    assert_eq!(
        sp.identifiers,
        vec![
            id("urn:oid:2.16.840.1.113883.2.4.3.999.1.2", "SP-2611-0042"),
            id("urn:oid:2.16.840.1.113883.2.4.3.999.1.3", "ACC-778"),
        ]
    );
    assert_eq!(
        sp.material,
        Some(code(systems::SNOMED, "119297000", "Blood specimen"))
    );
    assert_eq!(
        sp.collected_at.as_deref(),
        Some("2026-11-04T07:45:00+01:00")
    );
    assert_eq!(sp.received_at.as_deref(), Some("2026-11-04T08:30:00+01:00"));
    assert_eq!(e.results.len(), 4);
    for r in &e.results {
        assert_eq!(r.specimen_id.as_deref(), Some(sp.id.as_str()), "{}", r.id);
        assert_eq!(r.effective_at.as_deref(), Some("2026-11-04T07:45:00+01:00"));
        assert_eq!(r.section, None);
    }
    let [panel, hb, ht, mcv] = [&e.results[0], &e.results[1], &e.results[2], &e.results[3]];
    // The panel: its code and its members, two here and one only referenced.
    assert_eq!(
        panel.test,
        code(
            systems::LOINC,
            "24360-0",
            "Hemoglobin and Hematocrit panel - Blood"
        )
    );
    assert_eq!(panel.identifiers, vec![id(RES, "R-0042-0")]);
    assert_eq!(
        panel.members,
        vec![
            hb.id.clone(),
            ht.id.clone(),
            "Observation/mcv-2611-0041".to_owned()
        ]
    );
    assert_eq!(
        (panel.value_decimal.as_deref(), panel.value_text.as_deref()),
        (None, None)
    );
    // The correction: its identifier and what it corrects.
    assert_eq!(
        hb.test,
        code(systems::LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood")
    );
    assert_eq!(
        hb.local_name.as_deref(),
        Some("Hemoglobin [Mass/volume] in Blood")
    );
    assert_eq!(hb.status, "corrected");
    assert_eq!(hb.identifiers, vec![id(RES, "R-0042-1")]);
    assert_eq!(hb.corrects, Some(id(RES, "R-0041-1")));
    assert_eq!(
        quantity_result(hb),
        (Some("6.1"), Some("mmol/L"), Some("8.5"), Some("11.0"))
    );
    assert_eq!(hb.unit_system.as_deref(), Some(UCUM));
    assert_eq!(hb.interpretation.as_deref(), Some("L"));
    assert_eq!(hb.interpretation_raw.as_deref(), Some("L"));
    assert_eq!(hb.interpretation_display.as_deref(), Some("Low"));
    assert_eq!(
        hb.interpretation_text.as_deref(),
        Some("Gecorrigeerde uitslag: de analyser was defect")
    );
    assert_eq!(hb.comments, vec!["Vervangt de uitslag van 3 november"]);
    // The reversed range: kept as sent, and a warning.
    assert_eq!(ht.identifiers, vec![id(RES, "R-0042-2")]);
    assert_eq!(
        quantity_result(ht),
        (Some("0.38"), Some("L/L"), Some("0.5"), Some("0.4"))
    );
    assert_eq!(
        (
            ht.interpretation.as_deref(),
            ht.interpretation_display.as_deref()
        ),
        (Some("N"), Some("Normal"))
    );
    assert_eq!(mcv.identifiers, vec![id(RES, "R-0042-3")]);
    assert_eq!(
        quantity_result(mcv),
        (Some("91"), Some("fL"), Some("80"), Some("100"))
    );
    assert_eq!(
        (
            mcv.interpretation_display.as_deref(),
            mcv.interpretation_text.as_deref()
        ),
        (None, Some("binnen referentiewaarden"))
    );
    assert_eq!(
        e.warnings,
        vec![format!(
            "result {}: reference range low 0.5 above high 0.4, kept as sent",
            ht.id
        )]
    );

    // The way out carries all of it.
    let out = out_and_back(&e);
    for needle in [
        r#""identifier":[{"system":"urn:oid:2.16.840.1.113883.2.4.3.999.1.1","value":"R-0042-1"}]"#,
        r#"{"url":"http://hl7.org/fhir/StructureDefinition/replaces","valueReference":{"identifier":{"system":"urn:oid:2.16.840.1.113883.2.4.3.999.1.1","value":"R-0041-1"}}}"#,
        r#""text":"Gecorrigeerde uitslag: de analyser was defect""#,
        r#"{"reference":"Observation/mcv-2611-0041"}"#,
        r#""resourceType":"DiagnosticReport""#,
        r#""issued":"2026-11-04T09:20:00+01:00""#,
        r#""identifier":[{"system":"urn:oid:2.16.840.1.113883.2.4.3.999.1.4","value":"ORD-88120"}]"#,
    ] {
        assert!(out.contains(needle), "missing {needle}");
    }
    assert_eq!(out.matches(r#""resourceType":"Specimen""#).count(), 1);
    assert_eq!(out.matches(r#""hasMember""#).count(), 1);
}

/// Class 8: a searchset of lab Observations with STU3 category and v2 0078
/// interpretation systems maps; a document of other observations is refused at the
/// element, with the reason.
#[test]
fn older_category_and_interpretation_systems_are_read() {
    let body = fixture("lab-stu3-searchset.json");
    let events = FhirNormaliser
        .normalise(&envelope("env-s", Format::FhirJson, body))
        .unwrap();
    let e = only(&events, lab_of);
    assert_eq!(
        e.header.source_message_type.as_deref(),
        Some("Bundle.searchset")
    );
    assert_eq!(
        e.patient.as_ref().unwrap().identifiers,
        vec![id(systems::BSN, "999911120")]
    );
    assert_eq!(e.results.len(), 2);
    let (k, na) = (&e.results[0], &e.results[1]);
    assert_eq!(k.id, "k1");
    assert_eq!(
        k.test,
        code(
            systems::LOINC,
            "2823-3",
            "Potassium [Moles/volume] in Serum or Plasma"
        )
    );
    assert_eq!(k.identifiers, vec![id(RES, "R-0050-1")]);
    assert_eq!(k.status, "final");
    assert_eq!(
        quantity_result(k),
        (Some("5.9"), Some("mmol/L"), Some("3.5"), Some("5.0"))
    );
    assert_eq!(
        (
            k.interpretation.as_deref(),
            k.interpretation_raw.as_deref(),
            k.interpretation_display.as_deref()
        ),
        (Some("H"), Some("H"), Some("High"))
    );
    assert_eq!(k.effective_at.as_deref(), Some("2026-11-05T08:00:00+01:00"));
    assert_eq!(na.id, "n1");
    assert_eq!(
        na.test,
        code(
            systems::LOINC,
            "2951-2",
            "Sodium [Moles/volume] in Serum or Plasma"
        )
    );
    assert_eq!(
        (na.value_decimal.as_deref(), na.unit.as_deref()),
        (Some("131"), Some("mmol/L"))
    );
    assert_eq!(
        (
            na.interpretation.as_deref(),
            na.interpretation_text.as_deref()
        ),
        (Some("L"), Some("laag"))
    );
    assert!(e.warnings.is_empty());
    let out = out_and_back(&e);
    assert!(out.contains(r#""text":"laag""#));

    // Observations that are no lab results: refused at their category, saying why.
    let vital = br#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":"http://hl7.org/fhir/observation-category","code":"vital-signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]}}}]}"#;
    let err = FhirNormaliser
        .normalise(&envelope("e", Format::FhirJson, vital.to_vec()))
        .unwrap_err();
    assert!(
        matches!(err, NormaliseError::Invalid { reason: "invalid_element", ref path, ref what }
            if path == "Bundle.entry[0].resource.category" && what.contains("laboratory")),
        "{err}"
    );
}

/// Class 5: every date, dateTime and instant is checked; a template placeholder is refused
/// with its element path.
#[test]
fn dates_that_are_no_fhir_dates_are_refused_with_their_path() {
    let good = String::from_utf8(fixture("lab-fidelity-transaction.json")).unwrap();
    for (from, to, path) in [
        (
            r#""effectiveDateTime": "2026-11-04T07:45:00+01:00""#,
            r#""effectiveDateTime": "${DATE, T, M, -1}""#,
            "Bundle.entry[3].resource.effectiveDateTime",
        ),
        (
            r#""collectedDateTime": "2026-11-04T07:45:00+01:00""#,
            r#""collectedDateTime": "04-11-2026 07:45""#,
            "Bundle.entry[1].resource.collection.collectedDateTime",
        ),
        (
            r#""birthDate": "1961-04-09""#,
            r#""birthDate": "1961-4-9""#,
            "Bundle.entry[0].resource.birthDate",
        ),
        (
            r#""issued": "2026-11-04T09:20:00+01:00""#,
            r#""issued": "2026-11-04""#,
            "Bundle.entry[7].resource.issued",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        let bad = good.replacen(from, to, 1);
        let err = FhirNormaliser
            .normalise(&envelope("e", Format::FhirJson, bad.into_bytes()))
            .unwrap_err();
        assert!(
            matches!(err, NormaliseError::Invalid { reason: "invalid_element", path: ref p, .. } if p == path),
            "{to}: {err}"
        );
    }
}

/// Class 6: a test named only by text maps (local code absent) with a warning; with
/// neither code nor text the result is refused at its code.
#[test]
fn a_test_named_only_by_text_is_a_result() {
    let obs = br#"{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],"code":{"text":"Histologisch onderzoek huidexcisie"},"valueString":"Geen maligniteit"}"#;
    let e = lab(obs.to_vec());
    let r = &e.results[0];
    assert_eq!((r.test.system.as_str(), r.test.code.as_str()), ("", ""));
    assert_eq!(
        r.local_name.as_deref(),
        Some("Histologisch onderzoek huidexcisie")
    );
    assert_eq!(r.value_text.as_deref(), Some("Geen maligniteit"));
    assert_eq!(
        e.warnings,
        vec!["result result-1: test has no code, mapped by its name (Observation.code.text)"]
    );
    let out = out_and_back(&e);
    assert!(out.contains(r#""code":{"text":"Histologisch onderzoek huidexcisie"}"#));
}

/// Classes 2, 6, 7 and 9 from EDIFACT: a MEDRPT report keeps its report id and time and the
/// order ids as what they are (not as specimen identifiers), maps a pathology line with a
/// name and no code, keeps each result's FTX remark, keeps a reversed range as sent with a
/// warning; the FHIR out is valid and carries all of it.
#[test]
fn a_medrpt_report_keeps_its_identity_uncoded_lines_remarks_and_ranges() {
    let events = crate::edifact::normalise_bytes(
        "env-rpt",
        include_bytes!("../../testdata/edifact/ketenbus/mrpn32-fidelity.edi"),
    )
    .unwrap();
    let e = only(&events, lab_of);
    let rff = |q: &str, v: &str| id(&format!("urn:ketenbus:code-list:rff:{q}"), v);
    assert_eq!(e.report_identifiers, vec![rff("sri", "RPT-2611-0400")]);
    assert_eq!(e.reported_at.as_deref(), Some("2026-11-04T09:20"));
    assert_eq!(
        e.order_identifiers,
        vec![rff("roi", "HA-77120"), rff("soi", "M2611040007")]
    );
    assert_eq!(e.specimens.len(), 1);
    assert!(e.specimens[0].identifiers.is_empty(), "{:?}", e.specimens);
    assert_eq!(
        e.specimens[0].collected_at.as_deref(),
        Some("2026-11-04T07:45")
    );
    assert_eq!(
        e.patient.as_ref().unwrap().identifiers,
        vec![id(systems::BSN, "999911120")]
    );
    let lab_ = e.performer.as_ref().unwrap();
    assert_eq!(lab_.identifiers, vec![id(systems::AGB, "01212121")]);
    assert_eq!(lab_.name.as_deref(), Some("Streeklab Zuid"));
    // The laboratory that performed the work, apart from the reporting one.
    let prf = e.performing_lab.as_ref().unwrap();
    assert_eq!(prf.identifiers, vec![id(systems::AGB, "01313131")]);
    assert_eq!(prf.name.as_deref(), Some("Pathologielab Oost"));
    assert_eq!(prf.phone.as_deref(), Some("053-7654321"));
    let a = prf.address.as_ref().unwrap();
    assert_eq!(
        (
            a.street.as_deref(),
            a.house_number.as_deref(),
            a.city.as_deref(),
            a.postal_code.as_deref()
        ),
        (Some("Oostweg"), Some("3"), Some("Enschede"), Some("7511AA"))
    );
    assert_eq!(e.results.len(), 2);
    let (histo, k) = (&e.results[0], &e.results[1]);
    assert_eq!(
        (histo.test.system.as_str(), histo.test.code.as_str()),
        ("", "")
    );
    assert_eq!(
        histo.local_name.as_deref(),
        Some("Histologisch onderzoek huidexcisie")
    );
    assert_eq!(histo.value_text.as_deref(), Some("Geen maligniteit"));
    assert_eq!(histo.value_decimal, None);
    assert_eq!(histo.comments, vec!["Excisie radicaal"]);
    assert_eq!(histo.specimen_id.as_deref(), Some("specimen-1"));
    assert_eq!(k.test, code(systems::NHG_45, "K", "Kalium"));
    assert_eq!(
        quantity_result(k),
        (Some("4.1"), Some("mmol/l"), Some("5,0"), Some("3,5"))
    );
    assert_eq!(k.value_text.as_deref(), Some("4,1"));
    assert_eq!(k.reference_text.as_deref(), Some("5.0 3.5"));
    assert_eq!(
        k.comments,
        vec!["Referentiewaarden zoals het analyseapparaat ze gaf"]
    );
    assert_eq!(
        e.warnings,
        vec![
            "result result-1: investigation has no code, mapped by its name (interchange 1, message 1, segment INV #27, element 2, byte 658)".to_owned(),
            "result result-2: reference range low 5,0 above high 3,5, kept as sent".to_owned(),
        ]
    );
    let out = to_bundle(&events[0], &EmitOptions::default()).unwrap();
    assert_valid_bundle(&out);
    let text = json::to_string(&out);
    for needle in [
        r#""code":{"text":"Histologisch onderzoek huidexcisie"}"#,
        r#""value":"RPT-2611-0400""#,
        r#""issued":"2026-11-04T09:20:00+01:00""#,
        r#""value":"HA-77120""#,
        r#""value":"M2611040007""#,
        r#""text":"Excisie radicaal""#,
        r#""name":"Pathologielab Oost""#,
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    // And in again: the same identity, the uncoded line still a result.
    let again = lab(json::to_vec(&out));
    assert_eq!(again.report_identifiers, e.report_identifiers);
    assert_eq!(again.order_identifiers, e.order_identifiers);
    assert_eq!(again.performer, e.performer);
    assert_eq!(again.performing_lab, e.performing_lab);
    assert_eq!(again.results.len(), 2);
    assert_eq!(again.results[0].local_name, histo.local_name);
    assert_eq!(again.warnings.len(), 2);
}

/// Class 9 from MEDLAB: a determination whose lower limit is above its upper limit keeps
/// both as sent, with a warning; the FHIR out is valid and carries both limits.
#[test]
fn a_medlab_reversed_range_is_kept_with_a_warning() {
    let medlab = "UNB+UNOA:1+500001234+500005678+261101:0815+IC0042'UNH+M0042+MEDLAB:1'\
PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'DET+26:11:01+07:40'IDE+J+L2611017+bloed'\
BEP+0+Kalium+4.1++mmol/l++5.0+3.5+K'UNT+6+M0042'UNZ+1+IC0042'";
    let events = crate::edifact::normalise_bytes("env-ml", medlab.as_bytes()).unwrap();
    let e = only(&events, lab_of);
    let k = &e.results[0];
    assert_eq!(
        quantity_result(k),
        (Some("4.1"), Some("mmol/l"), Some("5.0"), Some("3.5"))
    );
    assert_eq!(
        e.warnings,
        vec!["result result-1: reference range low 5.0 above high 3.5, kept as sent"]
    );
    let out = to_bundle(&events[0], &EmitOptions::default()).unwrap();
    assert_valid_bundle(&out);
    let text = json::to_string(&out);
    assert!(
        text.contains(r#""low":{"value":5.0,"unit":"mmol/l"},"high":{"value":3.5"#),
        "{text}"
    );
    assert_eq!(lab(json::to_vec(&out)).warnings.len(), 1);
}
