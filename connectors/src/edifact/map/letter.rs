//! MEDVRI:1 (free-text message) and MEDSPE:1 (specialist letter) -> letter event.
//!
//! Both carry the MEDLAB header segments (ZKH sender institution, AFD/ARA sending
//! department and doctor, ART the addressed doctor, PID/PAD the patient, DET the date)
//! and the text as `TXT` lines of at most 70 characters. Lines are joined with `\n`, as
//! sent: re-flowing them would guess at the author's layout.

use ketenbus_schemas::event::{
    Coding, EventKind, HealthProfessional, HealthcareProvider, LetterEvent, Patient,
};

use super::medlab::pid_patient;
use super::{
    Context, REASON_MISSING, field, medlab_address, path, provider_code, two_digit_date, with_time,
};
use crate::NormalizeError;
use crate::edifact::parse::document::Message;
use crate::zib::text_name;

/// Maps one MEDVRI:1 or MEDSPE:1 message.
pub(crate) fn letter_event(
    m: &Message<'_>,
    ctx: &Context<'_>,
    index: i32,
) -> Result<LetterEvent, NormalizeError> {
    let mut header = ctx.header(EventKind::Letter, m, index);

    let mut patient: Option<Patient> = None;
    let mut organization: Option<HealthcareProvider> = None;
    let mut author: Option<HealthProfessional> = None;
    let mut recipient: Option<HealthProfessional> = None;
    let mut date: Option<String> = None;
    let mut lines: Vec<String> = Vec::new();

    for seg in m.body() {
        match seg.tag() {
            "ZKH" => {
                let code = field(&seg, 3, 0);
                organization = Some(HealthcareProvider {
                    identifiers: code
                        .iter()
                        .map(|c| provider_code(c, ctx.sender_id.as_deref()))
                        .collect(),
                    name: field(&seg, 0, 0),
                    department: organization.as_ref().and_then(|o| o.department.clone()),
                    address: medlab_address(&seg, 1),
                    phone: field(&seg, 2, 0),
                });
            }
            "AFD" => {
                let dept = field(&seg, 0, 0);
                match organization.as_mut() {
                    Some(o) => o.department = dept,
                    None => {
                        organization = Some(HealthcareProvider {
                            department: dept,
                            ..HealthcareProvider::default()
                        });
                    }
                }
            }
            "ARA" if author.is_none() => {
                author = Some(HealthProfessional {
                    identifiers: Vec::new(),
                    name: field(&seg, 0, 0).map(text_name),
                    role: Some("author".to_owned()),
                    specialty: None,
                    organization_name: organization.as_ref().and_then(|o| o.name.clone()),
                });
            }
            "ART" => {
                recipient = Some(HealthProfessional {
                    identifiers: field(&seg, 1, 0)
                        .iter()
                        .map(|c| provider_code(c, ctx.sender_id.as_deref()))
                        .collect(),
                    name: field(&seg, 2, 0).map(text_name),
                    role: Some("recipient".to_owned()),
                    specialty: field(&seg, 0, 0).map(|t| Coding {
                        display: (t == "H").then(|| "huisarts".to_owned()),
                        system: "urn:ketenbus:medlab:art-type".to_owned(),
                        code: t,
                    }),
                    organization_name: None,
                });
            }
            "PID" => patient = Some(pid_patient(m, &seg, ctx)?),
            "PAD" => {
                if let Some(p) = patient.as_mut() {
                    p.address = medlab_address(&seg, 0);
                }
            }
            "DET" if date.is_none() => {
                date = two_digit_date(
                    &seg.text(0, 0).unwrap_or_default(),
                    &seg.text(0, 1).unwrap_or_default(),
                    &seg.text(0, 2).unwrap_or_default(),
                    ctx.reference_year,
                )
                .map(|d| with_time(d, seg.text(1, 0).as_deref(), seg.text(1, 1).as_deref()));
            }
            // Text lines keep their spaces: only the line break is ours. A component
            // separator the sender forgot to release is text: put it back.
            "TXT" => {
                let sep = char::from(seg.delimiters().component).to_string();
                let parts: Vec<String> = seg
                    .element(0)
                    .map(|e| e.components().map(|v| v.text().into_owned()).collect())
                    .unwrap_or_default();
                lines.push(parts.join(&sep));
            }
            _ => {}
        }
    }
    let Some(patient) = patient else {
        return Err(NormalizeError::Invalid {
            reason: REASON_MISSING,
            path: path(m, &m.header(), None),
            what: "message has no PID segment".to_owned(),
        });
    };
    header.occurred_at.clone_from(&date);
    Ok(LetterEvent {
        header,
        patient: Some(patient),
        author,
        author_organization: organization,
        recipient,
        date,
        title: None,
        text: (!lines.is_empty()).then(|| lines.join("\n")),
        attachments: Vec::new(),
    })
}
