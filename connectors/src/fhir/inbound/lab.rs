//! nl-core lab results (Observations of category `laboratory`, nl-core-LaboratoryTestResult)
//! with their Specimen, Patient, Organization and PractitionerRole -> one lab-result event
//! per patient.

use std::collections::{HashMap, HashSet};

use ketenbus_schemas::EventHeader;
use ketenbus_schemas::event::{
    Coding, Identifier, LabResultEvent, LabTestResult, Specimen, systems,
};

use super::{
    Doc, EXT_EDIFACT_REFERENCE, Entry, OBSERVATION_CATEGORY, OBSERVATION_CATEGORY_OLDER, Object,
    REASON_INVALID, SNOMED_FLAGS, V3_INTERPRETATION, V3_INTERPRETATION_OLDER, Value, codings,
    ext_value, identifiers, patient_of, professional, professional_of, provider_of, s,
};
use crate::NormaliseError;

/// The lab Observations of a document, grouped by the patient they are about (one event
/// each), in document order.
pub(super) fn by_patient<'d, 'a>(doc: &'d Doc<'a>) -> Vec<Vec<&'d Entry<'a>>> {
    let mut groups: Vec<Vec<&Entry<'_>>> = Vec::new();
    let mut group_of: HashMap<Option<String>, usize> = HashMap::new();
    for obs in doc.of_type("Observation").filter(|e| is_lab(e.res)) {
        let key = obs.res.get("subject").and_then(|s| {
            doc.resolve(Some(s)).map(|e| e.path.clone()).or_else(|| {
                s.get("reference")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
        });
        match group_of.get(&key) {
            Some(&g) => groups[g].push(obs),
            None => {
                group_of.insert(key, groups.len());
                groups.push(vec![obs]);
            }
        }
    }
    groups
}

fn is_lab(o: &Object) -> bool {
    let profiled = o.obj("meta").is_some_and(|m| {
        m.arr("profile").iter().any(|p| {
            p.as_str()
                .is_some_and(|p| p.ends_with("/nl-core-LaboratoryTestResult"))
        })
    });
    profiled
        || o.arr("category").iter().any(|c| {
            codings(c.as_object()).any(|c| is_category_system(&c.system) && c.code == "laboratory")
        })
        || o.obj("category").is_some_and(|c| {
            codings(Some(c)).any(|c| is_category_system(&c.system) && c.code == "laboratory")
        })
}

fn is_category_system(system: &str) -> bool {
    system == OBSERVATION_CATEGORY || OBSERVATION_CATEGORY_OLDER.contains(&system)
}

fn is_interpretation_system(system: &str) -> bool {
    system == V3_INTERPRETATION || V3_INTERPRETATION_OLDER.contains(&system)
}

/// The refusal of a document whose only Observations are not lab results: it names the
/// element and the reason.
pub(super) fn not_lab(obs: &Entry<'_>) -> NormaliseError {
    NormaliseError::Invalid {
        reason: REASON_INVALID,
        path: format!("{}.category", obs.path),
        what: "observation is neither profiled nl-core-LaboratoryTestResult nor of category laboratory; no other observation is mapped".into(),
    }
}

/// A Reference as an identifier: its `identifier`, else its `reference` with system
/// `urn:ietf:rfc:3986`.
fn reference_identifier(r: &Object) -> Option<Identifier> {
    if let Some(i) = r.obj("identifier")
        && let (Some(system), Some(value)) = (i.str("system"), i.str("value"))
    {
        return Some(Identifier {
            system: system.to_owned(),
            value: value.to_owned(),
        });
    }
    r.str("reference").map(|v| Identifier {
        system: URI.to_owned(),
        value: v.to_owned(),
    })
}

/// Identifier system of a reference kept as text.
pub(crate) const URI: &str = "urn:ietf:rfc:3986";
/// Extension naming the result a corrected result replaces.
pub(crate) const EXT_REPLACES: &str = "http://hl7.org/fhir/StructureDefinition/replaces";

fn quantity_text(q: &Object) -> Option<String> {
    let v = q.get("value")?.as_literal()?;
    Some(match q.str("unit").or_else(|| q.str("code")) {
        Some(u) => format!("{v} {u}"),
        None => v.to_owned(),
    })
}

fn specimen(e: &Entry<'_>, fallback_id: String) -> Result<Specimen, NormaliseError> {
    let mut ids = identifiers(e.res, &e.path)?;
    if let Some(acc) = e.res.obj("accessionIdentifier")
        && let (Some(system), Some(value)) = (acc.str("system"), acc.str("value"))
    {
        ids.push(Identifier {
            system: system.to_owned(),
            value: value.to_owned(),
        });
    }
    let collection = e.res.obj("collection");
    Ok(Specimen {
        id: e.id.map_or(fallback_id, str::to_owned),
        identifiers: ids,
        material: codings(e.res.obj("type")).next(),
        volume: collection
            .and_then(|c| c.obj("quantity"))
            .and_then(quantity_text),
        collected_at: collection.and_then(|c| {
            s(c, "collectedDateTime")
                .or_else(|| c.obj("collectedPeriod").and_then(|p| s(p, "start")))
        }),
        received_at: s(e.res, "receivedTime"),
    })
}

/// One patient's lab results. `only_group`: the document has no other patient's results, so
/// every PractitionerRole in it (department, copy-to) belongs to this event; with several
/// patients, only those the observations point at (else events grow with the square of the
/// document).
pub(super) fn lab_event(
    doc: &Doc<'_>,
    observations: &[&Entry<'_>],
    only_group: bool,
    reports: &Reports<'_, '_>,
    header: &mut EventHeader,
) -> Result<LabResultEvent, NormaliseError> {
    let first = observations[0];
    let patient = patient_of(
        doc,
        first.res.get("subject"),
        &format!("{}.subject", first.path),
    )?;
    let mut performer = None;
    let mut performer_path: Option<&str> = None;
    let mut performing_lab = None;
    let mut requester = None;
    let mut specimens: Vec<Specimen> = Vec::new();
    let mut specimen_at: HashMap<String, usize> = HashMap::new();
    // Specimens by the entry they come from: one source specimen is one event specimen,
    // however many results point at it (urn:uuid references carry no id).
    let mut specimen_of_entry: HashMap<&str, String> = HashMap::new();
    let mut results = Vec::new();
    let mut order_identifiers: Vec<Identifier> = Vec::new();
    let mut order_seen = HashSet::new();
    let mut report_seen = HashSet::new();
    let mut warnings = Vec::new();
    // Result ids by entry path, for panels' members.
    let result_ids: HashMap<&str, String> = observations
        .iter()
        .enumerate()
        .map(|(n, e)| (e.path.as_str(), result_id(e, n)))
        .collect();
    // PractitionerRoles acting as requester, and those the observations point at.
    let mut requesters: HashSet<&str> = HashSet::new();
    let mut referenced: Vec<&Entry<'_>> = Vec::new();
    let mut referenced_paths: HashSet<&str> = HashSet::new();
    for (n, obs) in observations.iter().enumerate() {
        let o = obs.res;
        for p in o.arr("performer") {
            let target = doc.resolve(Some(p));
            if let Some(e) = target.filter(|e| e.ty == "PractitionerRole")
                && referenced_paths.insert(e.path.as_str())
            {
                referenced.push(e);
            }
            // The first Organization reports; a second one performed the work.
            match target {
                Some(e) if e.ty == "Organization" && performer.is_none() => {
                    performer = provider_of(doc, Some(p))?;
                    performer_path = Some(e.path.as_str());
                }
                Some(e)
                    if e.ty == "Organization"
                        && performing_lab.is_none()
                        && performer_path != Some(e.path.as_str()) =>
                {
                    performing_lab = provider_of(doc, Some(p))?;
                }
                _ => {}
            }
        }
        for b in o.arr("basedOn") {
            if let Some(r) = doc
                .resolve(Some(b))
                .and_then(|sr| doc.resolve(sr.res.get("requester")))
            {
                requesters.insert(r.path.as_str());
            }
        }
        for b in o.arr("basedOn") {
            let ids = match doc.resolve(Some(b)).filter(|e| e.ty == "ServiceRequest") {
                Some(sr) => identifiers(sr.res, &sr.path)?,
                None => b
                    .as_object()
                    .filter(|b| b.obj("identifier").is_some())
                    .and_then(reference_identifier)
                    .into_iter()
                    .collect(),
            };
            for i in ids {
                push_new(&mut order_identifiers, &mut order_seen, i);
            }
        }
        if requester.is_none() {
            for b in o.arr("basedOn") {
                if let Some(sr) = doc.resolve(Some(b)).filter(|e| e.ty == "ServiceRequest") {
                    requester = professional_of(doc, sr.res.get("requester"), "requester")?;
                }
            }
        }
        // Specimen: resolved when in the document, else known by the id it is referenced by.
        let mut specimen_id = None;
        if let Some(r) = o.get("specimen") {
            if let Some(e) = doc.resolve(Some(r)).filter(|e| e.ty == "Specimen") {
                if let Some(id) = specimen_of_entry.get(e.path.as_str()) {
                    specimen_id = Some(id.clone());
                } else {
                    let sp = specimen(e, format!("specimen-{}", specimens.len() + 1))?;
                    specimen_id = Some(sp.id.clone());
                    specimen_of_entry.insert(e.path.as_str(), sp.id.clone());
                    if !specimen_at.contains_key(&sp.id) {
                        specimen_at.insert(sp.id.clone(), specimens.len());
                        specimens.push(sp);
                    }
                }
            } else {
                specimen_id = r
                    .get("reference")
                    .and_then(Value::as_str)
                    .map(|r| r.rsplit('/').next().unwrap_or(r).to_owned());
            }
        }
        if let Some(number) = ext_value(o.arr("extension"), EXT_EDIFACT_REFERENCE) {
            let id = specimen_id
                .clone()
                .unwrap_or_else(|| format!("specimen-{}", specimens.len() + 1));
            let at = *specimen_at.entry(id.clone()).or_insert_with(|| {
                specimens.push(Specimen {
                    id: id.clone(),
                    ..Specimen::default()
                });
                specimens.len() - 1
            });
            let sp = &mut specimens[at];
            if !sp
                .identifiers
                .iter()
                .any(|i| i.system == EXT_EDIFACT_REFERENCE)
            {
                sp.identifiers.push(Identifier {
                    system: EXT_EDIFACT_REFERENCE.to_owned(),
                    value: number.to_owned(),
                });
            }
            specimen_id = Some(id);
        }
        results.push(lab_result(
            doc,
            obs,
            n,
            specimen_id,
            &result_ids,
            &mut warnings,
        )?);
    }
    // The DiagnosticReports that hold these results (all of them when the document has one
    // patient): the report's identifiers and issue time.
    let mut report_identifiers: Vec<Identifier> = Vec::new();
    let mut reported_at = None;
    let held: Vec<&Entry<'_>> = if only_group {
        reports.all.clone()
    } else {
        let mut seen = HashSet::new();
        observations
            .iter()
            .flat_map(|o| reports.by_result.get(o.path.as_str()).into_iter().flatten())
            .filter(|dr| seen.insert(dr.path.as_str()))
            .copied()
            .collect()
    };
    for dr in held {
        for i in identifiers(dr.res, &dr.path)? {
            push_new(&mut report_identifiers, &mut report_seen, i);
        }
        if reported_at.is_none() {
            reported_at = s(dr.res, "issued");
        }
        for b in dr.res.arr("basedOn").iter().filter_map(Value::as_object) {
            if let Some(i) = b.obj("identifier").and_then(|_| reference_identifier(b)) {
                push_new(&mut order_identifiers, &mut order_seen, i);
            }
        }
    }
    // PractitionerRoles not acting as requester: department, copy-to (role in code.text).
    let mut professionals = Vec::new();
    let roles: Vec<&Entry<'_>> = if only_group {
        doc.of_type("PractitionerRole").collect()
    } else {
        referenced
    };
    for pr in roles {
        if requesters.contains(pr.path.as_str()) {
            continue;
        }
        let role = pr
            .res
            .arr("code")
            .first()
            .and_then(|c| c.get("text"))
            .and_then(Value::as_str);
        professionals.push(professional(doc, pr, role.unwrap_or("professional"))?);
    }
    header.occurred_at = results
        .iter()
        .find_map(|r| r.effective_at.clone())
        .or_else(|| doc.timestamp.map(str::to_owned));
    let mut event = LabResultEvent {
        header: header.clone(),
        patient,
        performer,
        requester,
        professionals,
        specimens,
        results,
        comments: Vec::new(),
        report_identifiers,
        reported_at,
        order_identifiers,
        warnings,
        performing_lab,
    };
    crate::zib::range_warnings(&mut event);
    Ok(event)
}

/// `i` onto `ids` unless already there (a set keeps this linear).
fn push_new(ids: &mut Vec<Identifier>, seen: &mut HashSet<(String, String)>, i: Identifier) {
    if seen.insert((i.system.clone(), i.value.clone())) {
        ids.push(i);
    }
}

/// The DiagnosticReports of a document, indexed once by the results they hold.
pub(super) struct Reports<'d, 'a> {
    all: Vec<&'d Entry<'a>>,
    by_result: HashMap<&'d str, Vec<&'d Entry<'a>>>,
}

pub(super) fn reports<'d, 'a>(doc: &'d Doc<'a>) -> Reports<'d, 'a> {
    let mut r = Reports {
        all: Vec::new(),
        by_result: HashMap::new(),
    };
    for dr in doc.of_type("DiagnosticReport") {
        r.all.push(dr);
        for res in dr.res.arr("result") {
            if let Some(e) = doc.resolve(Some(res)) {
                r.by_result.entry(e.path.as_str()).or_default().push(dr);
            }
        }
    }
    r
}

fn result_id(e: &Entry<'_>, n: usize) -> String {
    e.id.map_or_else(|| format!("result-{}", n + 1), str::to_owned)
}

fn lab_result(
    doc: &Doc<'_>,
    e: &Entry<'_>,
    n: usize,
    specimen_id: Option<String>,
    result_ids: &HashMap<&str, String>,
    warnings: &mut Vec<String>,
) -> Result<LabTestResult, NormaliseError> {
    let o = e.res;
    let code = o.obj("code");
    let mut codes: Vec<Coding> = codings(code).collect();
    let id = result_id(e, n);
    let test = if codes.is_empty() {
        // A test named only by text is a result with its local code absent.
        if code.and_then(|c| c.str("text")).is_none() {
            return Err(NormaliseError::missing(
                format!("{}.code.coding", e.path),
                "lab result names its test neither by code nor by text",
            ));
        }
        warnings.push(format!(
            "result {id}: test has no code, mapped by its name ({}.code.text)",
            e.path
        ));
        Coding {
            system: String::new(),
            code: String::new(),
            display: None,
        }
    } else {
        let primary = codes
            .iter()
            .position(|c| c.system == systems::NHG_45)
            .or_else(|| codes.iter().position(|c| c.system == systems::LOINC))
            .unwrap_or(0);
        codes.remove(primary)
    };
    let local_code = codes
        .iter()
        .chain(std::iter::once(&test))
        .find(|c| c.system.starts_with("urn:ketenbus:local:"))
        .map(|c| c.code.clone());
    let status = o.str("status").ok_or_else(|| {
        NormaliseError::missing(format!("{}.status", e.path), "lab result without status")
    })?;
    let mut r = LabTestResult {
        other_codes: codes,
        local_code,
        local_name: code.and_then(|c| s(c, "text")),
        specimen_id,
        effective_at: s(o, "effectiveDateTime")
            .or_else(|| s(o, "effectiveInstant"))
            .or_else(|| o.obj("effectivePeriod").and_then(|p| s(p, "start"))),
        comments: o
            .arr("note")
            .iter()
            .filter_map(|n| n.get("text"))
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        identifiers: identifiers(o, &e.path)?,
        corrects: o
            .arr("extension")
            .iter()
            .filter_map(Value::as_object)
            .find(|x| x.str("url") == Some(EXT_REPLACES))
            .and_then(|x| {
                x.obj("valueReference")
                    .and_then(reference_identifier)
                    .or_else(|| {
                        x.obj("valueIdentifier").and_then(|i| {
                            Some(Identifier {
                                system: i.str("system")?.to_owned(),
                                value: i.str("value")?.to_owned(),
                            })
                        })
                    })
            }),
        members: o
            .arr("hasMember")
            .iter()
            .filter_map(|m| {
                match doc
                    .resolve(Some(m))
                    .and_then(|t| result_ids.get(t.path.as_str()))
                {
                    Some(id) => Some(id.clone()),
                    None => m
                        .get("reference")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                }
            })
            .collect(),
        ..LabTestResult::new(id, test, status)
    };
    if let Some(q) = o.obj("valueQuantity") {
        let v = q.get("value").ok_or_else(|| {
            NormaliseError::missing(
                format!("{}.valueQuantity.value", e.path),
                "quantity without value",
            )
        })?;
        let v = v.as_literal().ok_or_else(|| NormaliseError::Invalid {
            reason: REASON_INVALID,
            path: format!("{}.valueQuantity.value", e.path),
            what: "value is not a decimal".into(),
        })?;
        r.value_decimal = Some(v.to_owned());
        r.comparator = s(q, "comparator");
        r.unit = s(q, "unit").or_else(|| s(q, "code"));
        r.unit_system = s(q, "system");
    } else if let Some(v) = o.str("valueString") {
        r.value_text = Some(v.to_owned());
    } else if let Some(v) = o.get("valueInteger").and_then(Value::as_literal) {
        r.value_decimal = Some(v.to_owned());
    } else if let Some(cc) = o.obj("valueCodeableConcept") {
        r.value_coding = codings(Some(cc)).next();
        r.value_text = s(cc, "text");
    } else if let Some(b) = o.get("valueBoolean") {
        r.value_text = Some(
            if matches!(b, Value::Bool(true)) {
                "true"
            } else {
                "false"
            }
            .to_owned(),
        );
    }
    if let Some(rr) = o.arr("referenceRange").first().and_then(Value::as_object) {
        r.reference_low = rr
            .obj("low")
            .and_then(|q| q.get("value"))
            .and_then(Value::as_literal)
            .map(str::to_owned);
        r.reference_high = rr
            .obj("high")
            .and_then(|q| q.get("value"))
            .and_then(Value::as_literal)
            .map(str::to_owned);
        r.reference_text = s(rr, "text");
    }
    // R4: a list; STU3: one CodeableConcept.
    let interp = o
        .arr("interpretation")
        .first()
        .and_then(Value::as_object)
        .or_else(|| o.obj("interpretation"));
    if let Some(interp) = interp {
        let cs: Vec<Coding> = codings(Some(interp)).collect();
        r.interpretation_raw = cs.first().map(|c| c.code.clone());
        r.interpretation_text = s(interp, "text");
        r.interpretation_display = cs.first().and_then(|c| c.display.clone());
        r.interpretation = cs
            .iter()
            .find(|c| is_interpretation_system(&c.system))
            .map(|c| c.code.clone())
            .or_else(|| {
                cs.iter().find_map(|c| {
                    SNOMED_FLAGS
                        .iter()
                        .find(|(sct, _, _)| c.system == systems::SNOMED && c.code == *sct)
                        .map(|(_, v3, _)| (*v3).to_owned())
                })
            });
    }
    // The section is the category that is not the generic `laboratory` one.
    if let Some(c) = o
        .arr("category")
        .iter()
        .filter_map(Value::as_object)
        .find(|c| !codings(Some(c)).any(|x| is_category_system(&x.system)))
    {
        r.section_code = codings(Some(c)).next();
        r.section = s(c, "text").or_else(|| {
            r.section_code
                .as_ref()
                .map(|x| x.display.clone().unwrap_or_else(|| x.code.clone()))
        });
    }
    Ok(r)
}
