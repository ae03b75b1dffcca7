//! MEDRPT D93A lab reports (`BGM+LRP`) -> lab-result event: the Dutch "Edifact 3.2"
//! subset (association code MRPN32) and MedCom's Danish reports, which share the D93A
//! base and the explicit `Sxx` group marker segments.
//!
//! Layout as the public test vectors show it (developer-written, not an official guide):
//! `NAD+SLA` the lab, `NAD+PO` the requester, `NAD+CCR` a copy, each optionally followed by
//! `ADR` and `COM`; `PNA+PAT` the patient with `PDI` (sex) and `DTM+329` (birth date);
//! `S04` groups with `RFF` and `DTM` describe a specimen; `INV` starts a result, `RSL`,
//! `RND` and `FTX` after it belong to it. `RFF+SRI` and `DTM+ISR` are the report's id and
//! time, `RFF+ROI`/`SOI` the order ids of requester and lab; a NAD after `REL+PRF` is the
//! laboratory that performed the work (doubt: no public vector shows that pair; read
//! tolerantly, whatever the NAD's qualifier). Segments not listed are skipped.

use ketenbus_schemas::event::{
    Address, Coding, ContactPoint, EventKind, HealthProfessional, HealthcareProvider, HumanName,
    Identifier, LabResultEvent, LabTestResult, Patient, systems,
};

use super::lab::LabReport;
use super::{
    Context, code_list_system, decimal_value, edifact_datetime, field, gender, interpretation, path,
};
use crate::NormaliseError;
use crate::edifact::parse::document::Message;
use crate::edifact::parse::tokenize::Segment;
use crate::zib::{bsn_identifier, text_name};

/// Danish civil registration number (CPR).
const CPR: &str = "urn:oid:1.2.208.176.1.2";

/// Party identification `id:code list:agency` (C082); Vektis (`VEK`) codes are AGB.
fn party_identifier(seg: &Segment<'_>) -> Option<Identifier> {
    let id = field(seg, 1, 0)?;
    let list = field(seg, 1, 1).unwrap_or_default();
    let agency = field(seg, 1, 2).unwrap_or_default();
    let system = if agency == "VEK" {
        systems::AGB.to_owned()
    } else {
        code_list_system(&agency, &list)
    };
    Some(Identifier { system, value: id })
}

/// Party name (C080), components 1 to 5 that are not empty (the sixth is a format code).
fn party_name(seg: &Segment<'_>) -> Option<String> {
    let parts: Vec<String> = (0..5).filter_map(|c| field(seg, 3, c)).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Dutch NAD address: street, number[:addition], city, postcode after the name.
fn nad_address(seg: &Segment<'_>) -> Option<Address> {
    let number = match (field(seg, 5, 0), field(seg, 5, 1)) {
        (Some(n), Some(a)) => Some(format!("{n} {a}")),
        (n, _) => n,
    };
    let a = Address {
        street: field(seg, 4, 0),
        house_number: number,
        postal_code: field(seg, 7, 0),
        city: field(seg, 6, 0),
        country: None,
    };
    (a != Address::default()).then_some(a)
}

/// `ADR++<qualifier>:street[:number]+city+postcode[+country]`.
fn adr_address(seg: &Segment<'_>) -> Option<Address> {
    let a = Address {
        street: field(seg, 1, 1),
        house_number: field(seg, 1, 2),
        postal_code: field(seg, 3, 0),
        city: field(seg, 2, 0),
        country: field(seg, 4, 0),
    };
    (a != Address::default()).then_some(a)
}

/// COM: `number:qualifier` (C076), repeating. Qualifiers (UN/EDIFACT 3155): `TE`
/// telephone, `AL` cellular phone, `FX` telefax, `EM` e-mail; others kept as `other`.
fn com_numbers(seg: &Segment<'_>) -> Vec<ContactPoint> {
    (0..seg.element_count())
        .filter_map(|e| {
            let value = field(seg, e, 0)?;
            let q = field(seg, e, 1).unwrap_or_default();
            let (system, use_code) = match q.as_str() {
                "TE" => ("phone", None),
                "AL" => ("phone", Some("mobile")),
                "FX" => ("fax", None),
                "EM" => ("email", None),
                _ => ("other", None),
            };
            Some(ContactPoint {
                system: Some(system.to_owned()),
                value,
                use_code: use_code.map(str::to_owned),
                type_code: None,
            })
        })
        .collect()
}

/// Which party the last ADR/COM belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Party {
    None,
    Lab,
    Requester,
    Copy,
    Patient,
    PerformingLab,
}

/// PNA+PAT: identification and `qualifier:value` name parts.
fn pna_patient(m: &Message<'_>, seg: &Segment<'_>) -> Result<Patient, NormaliseError> {
    let mut identifiers = Vec::new();
    let id = field(seg, 1, 0).or_else(|| field(seg, 1, 2));
    let kinds: Vec<String> = (1..6).filter_map(|c| field(seg, 1, c)).collect();
    if let Some(id) = id {
        if kinds.iter().any(|k| k == "LZB" || k == "BSN") {
            identifiers.push(bsn_identifier(&id, || path(m, seg, Some(2)))?);
        } else if kinds.iter().any(|k| k == "CPR") {
            identifiers.push(Identifier {
                system: CPR.to_owned(),
                value: id,
            });
        } else {
            identifiers.push(Identifier {
                system: code_list_system(kinds.last().map_or("", String::as_str), "patient"),
                value: id,
            });
        }
    }
    let mut name = HumanName::default();
    for e in 2..seg.element_count() {
        let (Some(q), Some(v)) = (field(seg, e, 0), field(seg, e, 1)) else {
            continue;
        };
        match q.as_str() {
            "SU" | "NAN" => name.family = Some(v),
            "FO" | "NVN" => name.given = Some(v),
            "NVL" => name.initials = Some(v),
            // Doubt: one vector writes `NVV:J*de`; read as initials `*` prefix.
            "NVV" => match v.split_once('*') {
                Some((i, p)) => {
                    name.initials = Some(i.to_owned()).filter(|s| !s.is_empty());
                    name.family_prefix = Some(p.to_owned()).filter(|s| !s.is_empty());
                }
                None => name.family_prefix = Some(v),
            },
            "NEA" => name.partner_family = Some(v),
            "NEV" => name.partner_prefix = Some(v),
            _ => {}
        }
    }
    Ok(Patient {
        identifiers,
        name: (name != HumanName::default()).then_some(name),
        ..Patient::default()
    })
}

fn professional(seg: &Segment<'_>, role: &str) -> HealthProfessional {
    let dutch = field(seg, 1, 2).as_deref() == Some("VEK");
    let name = if dutch {
        // Dutch NAD name: family:initials:prefix.
        Some(HumanName {
            family: field(seg, 3, 0),
            initials: field(seg, 3, 1),
            family_prefix: field(seg, 3, 2),
            ..HumanName::default()
        })
    } else {
        party_name(seg).map(text_name)
    };
    HealthProfessional {
        identifiers: party_identifier(seg).into_iter().collect(),
        name,
        role: Some(role.to_owned()),
        ..HealthProfessional::default()
    }
}

/// A laboratory named in a NAD (`SLA`, or after `REL+PRF`).
fn nad_lab(seg: &Segment<'_>) -> HealthcareProvider {
    HealthcareProvider {
        identifiers: party_identifier(seg).into_iter().collect(),
        name: party_name(seg),
        department: None,
        address: nad_address(seg),
        ..HealthcareProvider::default()
    }
}

/// The laboratory the last NAD named, when it named one.
fn lab_of(report: &mut LabResultEvent, party: Party) -> Option<&mut HealthcareProvider> {
    match party {
        Party::Lab => report.performer.as_mut(),
        Party::PerformingLab => report.performing_lab.as_mut(),
        _ => None,
    }
}

/// Maps one MEDRPT lab report.
pub(crate) fn lab_event(
    m: &Message<'_>,
    ctx: &Context<'_>,
    index: i32,
) -> Result<LabResultEvent, NormaliseError> {
    let mut report = LabResultEvent::new(ctx.header(EventKind::LabResult, m, index));
    let mut document_date: Option<String> = None;
    let mut party = Party::None;
    let mut group = String::new();
    // `REL+PRF` announces that the next NAD is the laboratory that performed the work.
    let mut performing_next = false;

    for seg in m.body() {
        let tag = seg.tag();
        if tag.len() == 3 && tag.starts_with('S') && tag[1..].bytes().all(|b| b.is_ascii_digit()) {
            group = tag.to_owned();
            if tag == "S04" {
                report.add_specimen(None);
            }
            continue;
        }
        match tag {
            "DTM" => {
                let q = field(&seg, 0, 0).unwrap_or_default();
                let when = field(&seg, 0, 1)
                    .and_then(|v| edifact_datetime(&v, field(&seg, 0, 2).as_deref()));
                match q.as_str() {
                    "137" if document_date.is_none() => document_date = when,
                    // Issue time of the report (`S02`).
                    "ISR" if report.reported_at.is_none() => report.reported_at = when,
                    "329" => {
                        if let Some(p) = report.patient.as_mut() {
                            p.birth_date = when;
                        }
                    }
                    // Sampling date/time in the specimen group (`SCO` in the Dutch vectors).
                    // Doubt: MedCom's `DTM+4` there may be the order date; not mapped.
                    "SCO" if group == "S04" => {
                        if let Some(s) = report.specimens.last_mut() {
                            s.collected_at = when;
                        }
                    }
                    _ => {}
                }
            }
            // References carried as what they are: the report id (`SRI`), the order ids of
            // requester and lab (`ROI`, `SOI`); others in a specimen group are the
            // specimen's.
            "RFF" => {
                if let (Some(q), Some(v)) = (field(&seg, 0, 0), field(&seg, 0, 1)) {
                    let id = Identifier {
                        system: code_list_system("rff", &q),
                        value: v,
                    };
                    match q.as_str() {
                        "SRI" => report.report_identifiers.push(id),
                        "ROI" | "SOI" => report.order_identifiers.push(id),
                        _ if group == "S04" => {
                            if let Some(s) = report.specimens.last_mut() {
                                s.identifiers.push(id);
                            }
                        }
                        _ => {}
                    }
                }
            }
            "REL" => performing_next = field(&seg, 0, 0).as_deref() == Some("PRF"),
            "NAD" if performing_next => {
                performing_next = false;
                report.performing_lab = Some(nad_lab(&seg));
                party = Party::PerformingLab;
            }
            "NAD" => match field(&seg, 0, 0).as_deref() {
                Some("SLA") => {
                    report.performer = Some(nad_lab(&seg));
                    party = Party::Lab;
                }
                Some("PO") => {
                    let mut p = professional(&seg, "requester");
                    p.organization_name = None;
                    report.requester = Some(p);
                    party = Party::Requester;
                }
                Some("CCR") => {
                    report.professionals.push(professional(&seg, "copy"));
                    party = Party::Copy;
                }
                _ => party = Party::None,
            },
            "ADR" => {
                let a = adr_address(&seg);
                match party {
                    Party::Lab | Party::PerformingLab => {
                        if let Some(p) = lab_of(&mut report, party) {
                            p.address = a;
                        }
                    }
                    Party::Patient => {
                        if let Some(p) = report.patient.as_mut() {
                            p.address = a;
                        }
                    }
                    _ => {}
                }
            }
            // Every COM (C076, repeating) of the party it follows: lab, performing lab,
            // requester, copy-to, patient. A lab's first telephone number is also its `phone`.
            "COM" => {
                let numbers = com_numbers(&seg);
                match party {
                    Party::Lab | Party::PerformingLab => {
                        if let Some(p) = lab_of(&mut report, party) {
                            if p.phone.is_none() {
                                p.phone = numbers
                                    .iter()
                                    .find(|c| c.system.as_deref() == Some("phone"))
                                    .or_else(|| numbers.first())
                                    .map(|c| c.value.clone());
                            }
                            p.telecom.extend(numbers);
                        }
                    }
                    Party::Requester => {
                        if let Some(p) = report.requester.as_mut() {
                            p.telecom.extend(numbers);
                        }
                    }
                    Party::Copy => {
                        if let Some(p) = report.professionals.last_mut() {
                            p.telecom.extend(numbers);
                        }
                    }
                    Party::Patient => {
                        if let Some(p) = report.patient.as_mut() {
                            p.telecom.extend(numbers);
                        }
                    }
                    Party::None => {}
                }
            }
            "CTA" if party == Party::Lab => {
                if let Some(p) = report.performer.as_mut() {
                    p.department = field(&seg, 1, 1).or_else(|| field(&seg, 1, 0));
                }
            }
            "PNA" if field(&seg, 0, 0).as_deref() == Some("PAT") => {
                report.patient = Some(pna_patient(m, &seg)?);
                party = Party::Patient;
            }
            "PDI" => {
                if let Some(p) = report.patient.as_mut() {
                    p.gender = field(&seg, 0, 0).and_then(|g| gender(&g));
                }
            }
            "INV" => {
                let code = field(&seg, 1, 0);
                let list = field(&seg, 1, 1).unwrap_or_default();
                let agency = field(&seg, 1, 2).unwrap_or_default();
                let name = field(&seg, 1, 3);
                // A line with a name and no code is a result whose local code is absent.
                let test = match (code, &name) {
                    (Some(code), _) => Coding {
                        system: if agency == "NHG" {
                            systems::NHG_45.to_owned()
                        } else {
                            code_list_system(&agency, &list)
                        },
                        code,
                        display: name.clone(),
                    },
                    (None, Some(_)) => {
                        report.warnings.push(format!(
                            "result result-{}: investigation has no code, mapped by its name ({})",
                            report.results.len() + 1,
                            path(m, &seg, Some(2))
                        ));
                        Coding {
                            system: String::new(),
                            code: String::new(),
                            display: None,
                        }
                    }
                    (None, None) => {
                        return Err(NormaliseError::missing(
                            path(m, &seg, Some(2)),
                            "investigation has neither code nor name",
                        ));
                    }
                };
                let specimen = report.specimens.len().checked_sub(1);
                let result = LabTestResult {
                    local_name: name,
                    ..report.next_result(test, "final", specimen)
                };
                report.results.push(result);
            }
            "RSL" => {
                if let Some(r) = report.results.last_mut() {
                    r.value_text = field(&seg, 1, 0);
                    let (comparator, decimal) =
                        r.value_text.as_deref().map_or((None, None), decimal_value);
                    r.comparator = comparator;
                    r.value_decimal = decimal;
                    r.reference_text = field(&seg, 2, 0);
                    r.unit = (0..4).find_map(|c| field(&seg, 3, c));
                    r.interpretation_raw = field(&seg, 4, 0);
                    r.interpretation = r.interpretation_raw.as_deref().and_then(interpretation);
                }
            }
            "RND" => {
                if let Some(r) = report.results.last_mut() {
                    r.reference_low = field(&seg, 1, 0);
                    r.reference_high = field(&seg, 2, 0);
                }
            }
            "FTX" => {
                let text: Vec<String> = (0..5).filter_map(|c| field(&seg, 3, c)).collect();
                if !text.is_empty() {
                    let text = text.join(" ");
                    match report.results.last_mut() {
                        Some(r) => r.comments.push(text),
                        None => report.comments.push(text),
                    }
                }
            }
            _ => {}
        }
    }
    report.finish(m, "message has no PNA+PAT segment", document_date)
}
