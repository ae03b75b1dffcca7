//! The human-readable body of a delivery mail: the event as text a GP can read without
//! software, or a note that the original message is attached.

use std::fmt::Write as _;

use ketenbus_schemas::event::{
    AcuteHandoverEvent, HandoverNotificationEvent, HealthProfessional, HumanName, LabResultEvent,
    LetterEvent, Patient,
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

fn patient_lines(out: &mut String, p: Option<&Patient>) {
    let Some(p) = p else { return };
    let name = p.name.as_ref().map(name_text).unwrap_or_default();
    let _ = writeln!(out, "Patiënt:        {name}");
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
    if !e.attachments.is_empty() {
        out.push_str("\nBijlagen:\n");
        for a in &e.attachments {
            let _ = writeln!(
                out,
                "  - {} ({}, {} bytes)",
                a.title.as_deref().unwrap_or("document"),
                a.content_type,
                a.size
            );
        }
    }
}

fn render_handover(out: &mut String, e: &AcuteHandoverEvent) {
    patient_lines(out, e.patient.as_ref());
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
}

fn render_notification(out: &mut String, e: &HandoverNotificationEvent) {
    let _ = writeln!(
        out,
        "Taak:   {}\nStatus: {}",
        e.task_reference, e.task_status
    );
}

pub(super) fn render_raw(env: &RawEnvelope, record_id: &str) -> String {
    format!(
        "Bericht zoals ontvangen ({}, {} bytes), als bijlage.\n\n--\nVerstuurd door ketenbus. Referentie: {record_id}\n",
        env.format.as_str(),
        env.body.len()
    )
}
