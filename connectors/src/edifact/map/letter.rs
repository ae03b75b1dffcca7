//! MEDVRI:1 (free-text message) and MEDSPE:1 (specialist letter) -> letter event.
//!
//! Both carry the MEDLAB header segments (ZKH sender institution, AFD/ARA sending
//! department and doctor, ART the addressed doctor, PID/PAD the patient, DET the date)
//! and the text as `TXT` lines of at most 70 characters. Lines are joined with `\n`, as
//! sent: re-flowing them would guess at the author's layout.

use ketenbus_schemas::event::{
    EventKind, HealthProfessional, HealthcareProvider, LetterEvent, Patient,
};

use super::medlab::{
    afd_department, art_professional, det_date, named_professional, pid_patient, zkh_provider,
};
use super::{Context, medlab_address, path};
use crate::NormaliseError;
use crate::edifact::parse::document::Message;

/// Maps one MEDVRI:1 or MEDSPE:1 message.
pub(crate) fn letter_event(
    m: &Message<'_>,
    ctx: &Context<'_>,
    index: i32,
) -> Result<LetterEvent, NormaliseError> {
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
                // An AFD before the ZKH keeps its department.
                let department = organization.as_ref().and_then(|o| o.department.clone());
                organization = Some(HealthcareProvider {
                    department,
                    ..zkh_provider(&seg, ctx)
                });
            }
            "AFD" => afd_department(&seg, &mut organization),
            "ARA" if author.is_none() => {
                author = Some(named_professional(&seg, "author", organization.as_ref()));
            }
            "ART" => recipient = Some(art_professional(&seg, ctx, "recipient")),
            "PID" => patient = Some(pid_patient(m, &seg, ctx)?),
            "PAD" => {
                if let Some(p) = patient.as_mut() {
                    p.address = medlab_address(&seg, 0);
                }
            }
            "DET" if date.is_none() => date = det_date(&seg, ctx),
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
        return Err(NormaliseError::missing(
            path(m, &m.header(), None),
            "message has no PID segment",
        ));
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
