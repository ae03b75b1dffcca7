//! MEDLAB:1 (the Dutch "Medeur" lab result message) -> lab-result event.
//!
//! Segment meanings follow `shared/STANDARDS.md` section 1. Where sources disagree the
//! reading is tolerant and the raw value is kept: BEP type codes (`0`/`1`) are not used to
//! drop anything, normality flags from both alphabets map to HL7 codes with the raw flag
//! alongside, and doctor/lab codes are AGB only when they look like one.

use ketenbus_schemas::event::{
    Coding, EventKind, HealthProfessional, HealthcareProvider, HumanName, Identifier,
    LabResultEvent, LabTestResult, Patient,
};

use super::lab::LabReport;
use super::{
    Context, ccyy_mm_dd, decimal_value, field, gender, interpretation, local_system,
    medlab_address, path, phone, provider_code, two_digit_date, with_time,
};
use crate::NormaliseError;
use crate::edifact::parse::document::Message;
use crate::edifact::parse::tokenize::Segment;
use crate::zib::{self, bsn_identifier, text_name};

/// PID name element: `married name:prefix:own name:prefix:first name:initials`.
fn pid_name(seg: &Segment<'_>) -> Option<HumanName> {
    let married = field(seg, 2, 0);
    let married_prefix = field(seg, 2, 1);
    let own = field(seg, 2, 2);
    let own_prefix = field(seg, 2, 3);
    let mut name = HumanName {
        given: field(seg, 2, 4),
        initials: field(seg, 2, 5),
        ..HumanName::default()
    };
    if own.is_some() {
        name.family = own;
        name.family_prefix = own_prefix;
        // The name in use equal to the own name is not a partner's name.
        if married != name.family || married_prefix != name.family_prefix {
            name.partner_family = married;
            name.partner_prefix = married_prefix;
        }
    } else {
        // Only one name given: it is the family name.
        name.family = married;
        name.family_prefix = married_prefix;
    }
    (name != HumanName::default()).then_some(name)
}

/// PID: patient from a MEDLAB-family message (MEDLAB, MEDVRI, MEDSPE).
pub(crate) fn pid_patient(
    m: &Message<'_>,
    seg: &Segment<'_>,
    ctx: &Context<'_>,
) -> Result<Patient, NormaliseError> {
    let mut identifiers = Vec::new();
    // Receiver's reference: in practice "BSN" + nine digits.
    if let Some(r) = field(seg, 4, 0) {
        match r.strip_prefix("BSN") {
            Some(bsn) => identifiers.push(bsn_identifier(bsn.trim(), || path(m, seg, Some(5)))?),
            None => identifiers.push(Identifier {
                system: format!("{}:patient", local_system(ctx.receiver.as_deref())),
                value: r,
            }),
        }
    }
    // Sender's own patient number.
    if let Some(s) = field(seg, 3, 0) {
        identifiers.push(Identifier {
            system: format!("{}:patient", local_system(ctx.sender.as_deref())),
            value: s,
        });
    }
    Ok(Patient {
        identifiers,
        name: pid_name(seg),
        birth_date: ccyy_mm_dd(seg, 0),
        gender: field(seg, 1, 0).and_then(|g| gender(&g)),
        ..Patient::default()
    })
}

/// ZKH: the sending institution (lab, hospital) with its code, address and phone.
pub(crate) fn zkh_provider(seg: &Segment<'_>, ctx: &Context<'_>) -> HealthcareProvider {
    HealthcareProvider {
        identifiers: field(seg, 3, 0)
            .iter()
            .map(|c| provider_code(c, ctx.sender_id.as_deref()))
            .collect(),
        name: field(seg, 0, 0),
        department: None,
        address: medlab_address(seg, 1),
        phone: field(seg, 2, 0),
        telecom: field(seg, 2, 0).map(phone).into_iter().collect(),
        ..HealthcareProvider::default()
    }
}

/// AFD: the department of the sending institution, also when no ZKH came before it.
pub(crate) fn afd_department(seg: &Segment<'_>, institution: &mut Option<HealthcareProvider>) {
    institution
        .get_or_insert_with(HealthcareProvider::default)
        .department = field(seg, 0, 0);
}

/// ART: the doctor the message is for (the requester of a lab report, the addressee of a
/// letter), with the kind of doctor as specialty (`H`: huisarts).
pub(crate) fn art_professional(
    seg: &Segment<'_>,
    ctx: &Context<'_>,
    role: &str,
) -> HealthProfessional {
    HealthProfessional {
        identifiers: field(seg, 1, 0)
            .iter()
            .map(|c| provider_code(c, ctx.sender_id.as_deref()))
            .collect(),
        name: field(seg, 2, 0).map(text_name),
        role: Some(role.to_owned()),
        specialty: field(seg, 0, 0).map(|t| Coding {
            display: (t == "H").then(|| "huisarts".to_owned()),
            system: "urn:ketenbus:medlab:art-type".to_owned(),
            code: t,
        }),
        ..HealthProfessional::default()
    }
}

/// ARA, KOP: a doctor named only by text (department, copy-to, author) at the institution.
pub(crate) fn named_professional(
    seg: &Segment<'_>,
    role: &str,
    institution: Option<&HealthcareProvider>,
) -> HealthProfessional {
    HealthProfessional {
        identifiers: Vec::new(),
        name: field(seg, 0, 0).map(text_name),
        role: Some(role.to_owned()),
        organization_name: institution.and_then(|p| p.name.clone()),
        ..HealthProfessional::default()
    }
}

/// DET: `YY:MM:DD+HH:MM`, the two-digit year placed by the interchange date.
pub(crate) fn det_date(seg: &Segment<'_>, ctx: &Context<'_>) -> Option<String> {
    two_digit_date(
        &seg.text(0, 0).unwrap_or_default(),
        &seg.text(0, 1).unwrap_or_default(),
        &seg.text(0, 2).unwrap_or_default(),
        ctx.reference_year,
    )
    .map(|d| with_time(d, seg.text(1, 0).as_deref(), seg.text(1, 1).as_deref()))
}

/// One request/specimen group being read (DET, IDE and what follows).
struct Group {
    specimen: usize,
    complete: bool,
}

/// Maps one MEDLAB:1 message.
pub(crate) fn lab_event(
    m: &Message<'_>,
    ctx: &Context<'_>,
    index: i32,
) -> Result<LabResultEvent, NormaliseError> {
    let mut report = LabResultEvent::new(ctx.header(EventKind::LabResult, m, index));
    let mut lab_system = local_system(ctx.sender_id.as_deref());
    let mut section: Option<String> = None;
    let mut group: Option<Group> = None;
    // Which result OPB/OPU remarks attach to.
    let mut last_result: Option<usize> = None;

    for seg in m.body() {
        match seg.tag() {
            "ZKH" => {
                if let Some(c) = field(&seg, 3, 0) {
                    lab_system = local_system(Some(&c));
                }
                report.performer = Some(zkh_provider(&seg, ctx));
            }
            "PID" => report.patient = Some(pid_patient(m, &seg, ctx)?),
            "PAD" => {
                if let Some(p) = report.patient.as_mut() {
                    p.address = medlab_address(&seg, 0);
                }
            }
            "ART" => report.requester = Some(art_professional(&seg, ctx, "requester")),
            "AFD" => afd_department(&seg, &mut report.performer),
            "ARA" | "KOP" => {
                let role = if seg.tag() == "ARA" {
                    "department"
                } else {
                    "copy"
                };
                let p = named_professional(&seg, role, report.performer.as_ref());
                report.professionals.push(p);
            }
            "DET" => {
                let specimen = report.add_specimen(det_date(&seg, ctx));
                group = Some(Group {
                    specimen,
                    complete: true,
                });
                section = None;
            }
            "IDE" => {
                let g = group.get_or_insert_with(|| Group {
                    specimen: report.add_specimen(None),
                    complete: true,
                });
                g.complete = field(&seg, 0, 0).as_deref() != Some("N");
                let s = &mut report.specimens[g.specimen];
                if let Some(reference) = field(&seg, 1, 0) {
                    s.identifiers.push(Identifier {
                        system: zib::EDIFACT_REFERENCE_NUMBER.to_owned(),
                        value: reference,
                    });
                }
                s.material = field(&seg, 2, 0).map(|mat| Coding {
                    system: lab_system.clone(),
                    display: Some(mat.clone()),
                    code: mat,
                });
                s.volume = field(&seg, 3, 0);
            }
            "OPM" | "COM" => report.comments.extend(field(&seg, 0, 0)),
            "SEC" => section = field(&seg, 0, 0),
            "BEP" => {
                let local_code = field(&seg, 8, 0);
                let local_name = field(&seg, 1, 0);
                let value_text = field(&seg, 2, 0);
                let (comparator, value_decimal) =
                    value_text.as_deref().map_or((None, None), decimal_value);
                let flag = field(&seg, 5, 0);
                let changed = field(&seg, 3, 0).is_some();
                let status = if changed {
                    "corrected"
                } else if group.as_ref().is_some_and(|g| !g.complete) {
                    "preliminary"
                } else {
                    "final"
                };
                let Some(code) = local_code.clone().or_else(|| local_name.clone()) else {
                    return Err(NormaliseError::missing(
                        path(m, &seg, Some(2)),
                        "determination has neither code nor name",
                    ));
                };
                let test = Coding {
                    system: lab_system.clone(),
                    code,
                    display: local_name.clone(),
                };
                let result = LabTestResult {
                    local_code,
                    local_name,
                    value_text,
                    value_decimal,
                    comparator,
                    unit: field(&seg, 4, 0),
                    reference_low: field(&seg, 6, 0),
                    reference_high: field(&seg, 7, 0),
                    interpretation: flag.as_deref().and_then(interpretation),
                    interpretation_raw: flag,
                    section: section.clone(),
                    type_code: field(&seg, 0, 0),
                    ..report.next_result(test, status, group.as_ref().map(|g| g.specimen))
                };
                report.results.push(result);
                last_result = Some(report.results.len() - 1);
            }
            "NUB" => {
                let name = field(&seg, 0, 0);
                let Some(code) = name.clone() else {
                    return Err(NormaliseError::missing(
                        path(m, &seg, Some(1)),
                        "pending determination has no name",
                    ));
                };
                let test = Coding {
                    system: lab_system.clone(),
                    code,
                    display: name.clone(),
                };
                let result = LabTestResult {
                    local_name: name,
                    section: section.clone(),
                    ..report.next_result(test, "registered", group.as_ref().map(|g| g.specimen))
                };
                report.results.push(result);
                last_result = Some(report.results.len() - 1);
            }
            "OPB" | "OPU" => {
                if let (Some(i), Some(text)) = (last_result, field(&seg, 0, 0)) {
                    report.results[i].comments.push(text);
                } else {
                    report.comments.extend(field(&seg, 0, 0));
                }
            }
            _ => {}
        }
    }
    report.finish(m, "message has no PID segment", None)
}
