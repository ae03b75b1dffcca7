//! The human-readable body of a delivery mail: the event as text a GP can read without
//! software, or a note that the original message is attached.

use std::fmt::Write as _;

use ketenbus_schemas::event::{
    AcuteHandoverEvent, Attachment, ContactPoint, HandoverNotificationEvent, HealthProfessional,
    HumanName, LabResultEvent, LetterEvent, Patient,
};
use ketenbus_schemas::{Event, RawEnvelope};

pub(super) fn kind_label(event: &Event) -> &'static str {
    match event {
        Event::LabResult(_) => "Laboratoriumuitslag",
        Event::Letter(_) => "Brief",
        Event::AcuteHandover(_) => "Acute overdracht",
        Event::HandoverNotification(_) => "Overdrachtsmelding",
    }
}

fn name_text(n: &HumanName) -> String {
    if let Some(t) = &n.text {
        return t.clone();
    }
    let family = [n.family_prefix.as_deref(), n.family.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    [
        n.initials.as_deref().or(n.given.as_deref()),
        Some(family.as_str()),
    ]
    .into_iter()
    .flatten()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(" ")
}

/// One line per telephone number or e-mail address, labelled by kind.
fn telecom_lines(out: &mut String, points: &[ContactPoint]) {
    for t in points {
        let label = match (t.system.as_deref(), t.use_code.as_deref()) {
            (Some("email"), _) => "E-mail",
            (Some("fax"), _) => "Fax",
            (_, Some("mobile")) => "Mobiel",
            _ => "Telefoon",
        };
        let _ = writeln!(
            out,
            "{label}:{}{}",
            " ".repeat(16 - label.len() - 1),
            t.value
        );
    }
}

fn patient_lines(out: &mut String, p: Option<&Patient>) {
    let Some(p) = p else { return };
    let name = p.name.as_ref().map(name_text).unwrap_or_default();
    let _ = writeln!(out, "Patiënt:        {name}");
    if let Some(c) = p.name.as_ref().and_then(|n| n.call_name.as_ref()) {
        let _ = writeln!(out, "Roepnaam:       {c}");
    }
    telecom_lines(out, &p.telecom);
    if let Some(b) = &p.birth_date {
        let _ = writeln!(out, "Geboortedatum:  {b}");
    }
    for id in &p.identifiers {
        let label = if id.system == ketenbus_schemas::event::systems::BSN {
            "BSN"
        } else {
            "Identificatie"
        };
        let _ = writeln!(
            out,
            "{label}:{}{}",
            " ".repeat(16usize.saturating_sub(label.len() + 1)),
            id.value
        );
    }
}

fn professional(p: &HealthProfessional) -> String {
    let mut s = p.name.as_ref().map(name_text).unwrap_or_default();
    if let Some(r) = p
        .role_display
        .as_ref()
        .or(p.role_code.as_ref().and_then(|c| c.display.as_ref()))
    {
        let _ = write!(s, ", {r}");
    }
    if let Some(o) = &p.organization_name {
        let _ = write!(s, " ({o})");
    }
    s
}

pub(super) fn render_event(event: &Event, record_id: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", kind_label(event));
    match event {
        Event::LabResult(e) => render_lab(&mut out, e),
        Event::Letter(e) => render_letter(&mut out, e),
        Event::AcuteHandover(e) => render_handover(&mut out, e),
        Event::HandoverNotification(e) => render_notification(&mut out, e),
    }
    let h = event.header();
    let _ = writeln!(
        out,
        "\n--\nVerstuurd door ketenbus. Referentie: {record_id}"
    );
    if let Some(s) = &h.sender {
        let _ = writeln!(out, "Afzender: {s}");
    }
    if let Some(t) = &h.source_message_type {
        let _ = writeln!(out, "Bron: {} ({t})", h.source_format);
    }
    out.push_str(
        "Het gestructureerde bericht zit als bijlage (ketenbus-event.json) bij deze mail.\n",
    );
    out
}

fn render_lab(out: &mut String, e: &LabResultEvent) {
    patient_lines(out, e.patient.as_ref());
    if let Some(p) = &e.performer {
        let _ = writeln!(
            out,
            "Laboratorium:   {}",
            p.name.clone().unwrap_or_default()
        );
    }
    if let Some(p) = &e.performer {
        telecom_lines(out, &p.telecom);
    }
    if let Some(r) = &e.requester {
        let _ = writeln!(out, "Aanvrager:      {}", professional(r));
    }
    out.push('\n');
    for r in &e.results {
        let name = r
            .local_name
            .clone()
            .or_else(|| r.test.display.clone())
            .unwrap_or_else(|| r.test.code.clone());
        let value = r
            .value_text
            .clone()
            .or_else(|| r.value_decimal.clone())
            .unwrap_or_else(|| "(volgt)".into());
        let unit = r.unit.clone().unwrap_or_default();
        let range = match (&r.reference_low, &r.reference_high, &r.reference_text) {
            (Some(l), Some(h), _) => format!("  [{l} - {h}]"),
            (_, _, Some(t)) => format!("  [{t}]"),
            _ => String::new(),
        };
        let flag = r
            .interpretation
            .clone()
            .map(|f| format!("  {f}"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {name:<24} {value} {unit}{range}{flag}");
        for c in &r.comments {
            let _ = writeln!(out, "      {c}");
        }
    }
    for c in &e.comments {
        let _ = writeln!(out, "\n{c}");
    }
}

fn render_letter(out: &mut String, e: &LetterEvent) {
    patient_lines(out, e.patient.as_ref());
    if let Some(a) = &e.author {
        let _ = writeln!(out, "Van:            {}", professional(a));
    }
    if let Some(d) = &e.date {
        let _ = writeln!(out, "Datum:          {d}");
    }
    if let Some(t) = &e.title {
        let _ = writeln!(out, "Onderwerp:      {t}");
    }
    if let Some(t) = &e.text {
        let _ = writeln!(out, "\n{t}");
    }
    attachment_lines(out, &e.attachments);
}

fn attachment_lines(out: &mut String, attachments: &[Attachment]) {
    if !attachments.is_empty() {
        out.push_str("\nBijlagen:\n");
        for a in attachments {
            let kind = a
                .document_type
                .as_ref()
                .map(|t| format!("{}, ", t.display.as_deref().unwrap_or(&t.code)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  - {} ({kind}{}, {} bytes)",
                a.title.as_deref().unwrap_or("document"),
                a.content_type,
                a.size
            );
        }
    }
}

fn render_handover(out: &mut String, e: &AcuteHandoverEvent) {
    patient_lines(out, e.patient.as_ref());
    if let Some(t) = &e.composition_title {
        let _ = writeln!(out, "Titel:          {t}");
    }
    if let Some(d) = &e.composition_date {
        let _ = writeln!(out, "Datum:          {d}");
    }
    if let Some(a) = &e.composition_author {
        let _ = writeln!(out, "Auteur:         {}", professional(a));
    }
    if let Some(r) = &e.referral.reason {
        let _ = writeln!(out, "Reden:          {r}");
    }
    for s in &e.sections {
        let _ = writeln!(
            out,
            "\n{}\n{}",
            s.title.as_deref().unwrap_or(""),
            s.text.as_deref().unwrap_or("")
        );
    }
    attachment_lines(out, &e.attachments);
}

fn render_notification(out: &mut String, e: &HandoverNotificationEvent) {
    let _ = writeln!(
        out,
        "Taak:   {}\nStatus: {}",
        e.task_reference, e.task_status
    );
    for i in &e.inputs {
        let kind = i.type_code.as_ref().map_or("input", |c| c.code.as_str());
        let _ = writeln!(out, "  {kind}: {}", i.reference);
    }
}

pub(super) fn render_raw(env: &RawEnvelope, record_id: &str) -> String {
    format!(
        "Bericht zoals ontvangen ({}, {} bytes), als bijlage.\n\n--\nVerstuurd door ketenbus. Referentie: {record_id}\n",
        env.format.as_str(),
        env.body.len()
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ketenbus_schemas::{Format, RawEnvelope};

    use super::render_event;
    use crate::Normalise;
    use crate::fhir::inbound::FhirNormaliser;

    fn events(file: &str) -> Vec<ketenbus_schemas::Event> {
        let path = format!(
            "{}/testdata/fhir/ketenbus/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        FhirNormaliser
            .normalise(&RawEnvelope {
                id: "env-r".into(),
                received_at_ms: 0,
                connector: "fhir".into(),
                format: Format::FhirJson,
                content_type: "application/fhir+json".into(),
                sender: None,
                receiver: None,
                body: std::fs::read(path).unwrap(),
                attributes: BTreeMap::new(),
            })
            .unwrap()
    }

    #[test]
    fn the_mail_body_lists_the_class_10_fields() {
        let body = render_event(&events("class10-referral.json")[0], "env-r.0");
        for line in [
            "Roepnaam:       Piet",
            "Mobiel:         0612345678",
            "Telefoon:       0501234567",
            "E-mail:         p.jansen@example.test",
            "Titel:          Verwijzing ambulance naar huisarts",
            "Datum:          2026-06-09T14:15:00+02:00",
            "Auteur:         B. Verpleegkundige, Ambulanceverpleegkundige (RAV Utrecht)",
            "  - 12-afleidingen ECG (EKG study, application/pdf, 37 bytes)",
        ] {
            assert!(body.contains(line), "{line:?} missing from:\n{body}");
        }
        let body = render_event(&events("class10-task.json")[0], "env-r.0");
        assert!(
            body.contains(
                "  read-available-resource: https://vvt.example.test/fhir/Composition/overdracht-1"
            ),
            "{body}"
        );
        assert!(!body.contains("secret"), "{body}");
    }
}
