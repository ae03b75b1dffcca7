//! MIME (RFC 2045-2049) through Stalwart's `mail-parser`: every leaf part of a message is
//! routed by its type. EDIFACT bodies and attachments go to the EDIFACT normaliser, FHIR
//! JSON/XML to the FHIR normaliser, and plain text, HTML and documents (PDF, images) make a
//! letter event whose attachments are referenced by SHA-256; [`Normalise::content`] hands
//! their bytes to the router, which keeps them in the content store.
//! Delivery status reports (`multipart/report`) make no event: [`crate::mail::dsn`] reads them.
//!
//! Normalising stays a function of the bytes: event ids are `<envelope id>.<n>` numbered over
//! the whole message.

use ketenbus_schemas::event::{Attachment, HealthProfessional, LetterEvent};
use ketenbus_schemas::{Event, EventHeader, EventKind, Format, RawEnvelope};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde::Serialize;

use crate::contract::content::sha256_hex;
use crate::contract::normalise::{Normalise, NormaliseError};

/// Reason code for a message that is not RFC 5322.
pub const REASON_SYNTAX: &str = "mime_syntax";

/// Where a part goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// To the EDIFACT normaliser.
    Edifact,
    /// To the FHIR normaliser as JSON.
    FhirJson,
    /// To the FHIR normaliser as XML.
    FhirXml,
    /// The text of a letter.
    LetterText,
    /// An HTML letter body (kept as attachment too).
    LetterHtml,
    /// A document attached to the letter.
    Attachment,
    /// A delivery status report: the whole message is a DSN.
    DeliveryReport,
}

/// One leaf part of a message.
#[derive(Clone, Serialize)]
pub struct PartInfo {
    /// Position among the leaf parts.
    pub index: usize,
    /// Media type, lower case, without parameters.
    pub content_type: String,
    /// File name, when the part has one.
    pub filename: Option<String>,
    /// Decoded size in bytes.
    pub size: usize,
    /// Hex SHA-256 of the decoded bytes.
    pub sha256: String,
    /// Where it goes.
    pub route: Route,
    #[serde(skip)]
    bytes: Vec<u8>,
}

impl std::fmt::Debug for PartInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartInfo")
            .field("index", &self.index)
            .field("content_type", &self.content_type)
            .field("size", &self.size)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// A message taken apart: the headers a letter needs and its routed parts.
#[derive(Clone, Serialize)]
pub struct Analysis {
    /// `Message-ID` without angle brackets.
    pub message_id: Option<String>,
    /// Whether the message is a delivery status report.
    pub is_report: bool,
    /// Leaf parts in order.
    pub parts: Vec<PartInfo>,
    #[serde(skip)]
    subject: Option<String>,
    #[serde(skip)]
    date: Option<String>,
    #[serde(skip)]
    author: Option<String>,
}

impl std::fmt::Debug for Analysis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analysis")
            .field("is_report", &self.is_report)
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

fn is_edifact(bytes: &[u8]) -> bool {
    let start = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = &start[start
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(start.len())..];
    start.starts_with(b"UNA") || start.starts_with(b"UNB+")
}

fn route_of(content_type: &str, filename: Option<&str>, attachment: bool, bytes: &[u8]) -> Route {
    let name = filename.map(str::to_ascii_lowercase).unwrap_or_default();
    match content_type {
        "application/edifact" | "application/edi-consent" => Route::Edifact,
        "application/fhir+json" => Route::FhirJson,
        "application/fhir+xml" => Route::FhirXml,
        "application/json" if contains(bytes, b"\"resourceType\"") => Route::FhirJson,
        "application/xml" | "text/xml" if contains(bytes, b"http://hl7.org/fhir") => Route::FhirXml,
        "message/delivery-status" | "message/global-delivery-status" => Route::DeliveryReport,
        _ if is_edifact(bytes)
            && (content_type.starts_with("text/")
                || content_type == "application/octet-stream"
                || name.ends_with(".edi")
                || name.ends_with(".edifact")) =>
        {
            Route::Edifact
        }
        "text/plain" if !attachment => Route::LetterText,
        "text/html" if !attachment => Route::LetterHtml,
        _ => Route::Attachment,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `MessageParser::parse`, with a panic inside the parser taken as "not a message":
/// mail-parser 0.11 has a `debug_assert!` that malformed multipart input can reach (found by
/// the `mime` fuzz target), so debug builds and tests would otherwise panic.
pub(crate) fn parse_message(bytes: &[u8]) -> Option<mail_parser::Message<'_>> {
    std::panic::catch_unwind(|| MessageParser::default().parse(bytes))
        .ok()
        .flatten()
}

/// One leaf part of a parsed message, borrowed: a nested `message/rfc822` is one leaf whose
/// bytes are the whole nested message.
pub(crate) struct Leaf<'m> {
    /// Its index in the message's parts.
    pub(crate) part: usize,
    pub(crate) content_type: String,
    pub(crate) filename: Option<String>,
    pub(crate) route: Route,
    pub(crate) bytes: &'m [u8],
}

/// The leaf parts of a parsed message in order, each with where it goes.
pub(crate) fn leaves<'m>(message: &'m mail_parser::Message<'m>) -> impl Iterator<Item = Leaf<'m>> {
    message
        .parts
        .iter()
        .enumerate()
        .filter_map(|(index, part)| {
            let bytes: &[u8] = match &part.body {
                PartType::Multipart(_) => return None,
                PartType::Text(t) | PartType::Html(t) => t.as_bytes(),
                PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
                PartType::Message(m) => m.raw_message(),
            };
            let content_type = part
                .content_type()
                .map(|c| {
                    format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")).to_ascii_lowercase()
                })
                .unwrap_or_else(|| "text/plain".to_owned());
            let filename = part.attachment_name().map(str::to_owned);
            let attachment = part
                .content_disposition()
                .is_some_and(|d| d.is_attachment())
                || filename.is_some();
            let route = route_of(&content_type, filename.as_deref(), attachment, bytes);
            Some(Leaf {
                part: index,
                content_type,
                filename,
                route,
                bytes,
            })
        })
}

/// The bytes of a leaf part's body (as [`leaves`] gives them), taken out of the message.
fn take_body(body: &mut PartType<'_>) -> Vec<u8> {
    match std::mem::replace(body, PartType::Text("".into())) {
        PartType::Text(t) | PartType::Html(t) => t.into_owned().into_bytes(),
        PartType::Binary(b) | PartType::InlineBinary(b) => b.into_owned(),
        PartType::Message(m) => m.raw_message.into_owned(),
        PartType::Multipart(_) => Vec::new(),
    }
}

/// Take a message apart (pure).
///
/// # Errors
/// [`NormaliseError::Syntax`] when the bytes are not a mail message.
pub fn analyse(bytes: &[u8]) -> Result<Analysis, NormaliseError> {
    let syntax = |what: &str| NormaliseError::Syntax {
        reason: REASON_SYNTAX,
        format: "rfc822",
        position: "message".into(),
        what: what.into(),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(syntax("empty message"));
    }
    let mut message = parse_message(bytes).ok_or_else(|| syntax("not an RFC 5322 message"))?;
    if message.headers().is_empty() {
        return Err(syntax("no header fields"));
    }
    let root_type = message
        .content_type()
        .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")).to_ascii_lowercase())
        .unwrap_or_default();
    let mut parts = Vec::new();
    let mut taken = Vec::new();
    for leaf in leaves(&message) {
        if leaf.bytes.is_empty() && matches!(leaf.route, Route::LetterText | Route::LetterHtml) {
            continue;
        }
        taken.push(leaf.part);
        parts.push(PartInfo {
            index: parts.len(),
            size: leaf.bytes.len(),
            sha256: sha256_hex(leaf.bytes),
            content_type: leaf.content_type,
            filename: leaf.filename,
            route: leaf.route,
            bytes: Vec::new(),
        });
    }
    // The decoded bodies move from the parsed message into the parts, not copied: a 25 MiB
    // letter's PDF is held once.
    for (info, part) in parts.iter_mut().zip(taken) {
        info.bytes = take_body(&mut message.parts[part].body);
    }
    Ok(Analysis {
        message_id: message.message_id().map(str::to_owned),
        is_report: root_type == "multipart/report"
            || parts.iter().any(|p| p.route == Route::DeliveryReport),
        subject: message.subject().map(str::to_owned),
        date: message.date().map(mail_parser::DateTime::to_rfc3339),
        author: message
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.name().or(a.address()))
            .map(str::to_owned),
        parts,
    })
}

/// The normaliser for `message/rfc822`.
pub struct MailNormaliser {
    edifact: Box<dyn Normalise>,
    fhir: Box<dyn Normalise>,
}

impl std::fmt::Debug for MailNormaliser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailNormaliser").finish_non_exhaustive()
    }
}

impl Default for MailNormaliser {
    /// With the crate's EDIFACT and FHIR normalisers.
    fn default() -> Self {
        MailNormaliser {
            edifact: Box::new(crate::edifact::EdifactNormaliser),
            fhir: Box::new(crate::fhir::FhirNormaliser),
        }
    }
}

impl MailNormaliser {
    /// With other normalisers for the structured parts (tests).
    #[must_use]
    pub fn with_normalisers(
        edifact: Box<dyn Normalise>,
        fhir: Box<dyn Normalise>,
    ) -> MailNormaliser {
        MailNormaliser { edifact, fhir }
    }

    fn structured(
        &self,
        envelope: &RawEnvelope,
        part: &PartInfo,
    ) -> Result<Vec<Event>, NormaliseError> {
        let (normaliser, format, media) = match part.route {
            Route::Edifact => (&self.edifact, Format::Edifact, "application/EDIFACT"),
            Route::FhirJson => (&self.fhir, Format::FhirJson, "application/fhir+json"),
            _ => (&self.fhir, Format::FhirXml, "application/fhir+xml"),
        };
        let mut attributes = envelope.attributes.clone();
        attributes.insert("mime.part".into(), part.index.to_string());
        let sub = RawEnvelope {
            id: envelope.id.clone(),
            received_at_ms: envelope.received_at_ms,
            connector: envelope.connector.clone(),
            format,
            content_type: media.to_owned(),
            sender: envelope.sender.clone(),
            receiver: envelope.receiver.clone(),
            body: part.bytes.clone(),
            attributes,
        };
        normaliser.normalise(&sub).map_err(|e| match e {
            NormaliseError::Syntax {
                reason,
                format,
                position,
                what,
            } => NormaliseError::Syntax {
                reason,
                format,
                position: format!("mime part {}: {position}", part.index),
                what,
            },
            NormaliseError::Invalid { reason, path, what } => NormaliseError::Invalid {
                reason,
                path: format!("mime part {}: {path}", part.index),
                what,
            },
            other => other,
        })
    }
}

/// The parts a letter keeps as attachments: documents, HTML, and every text part but the
/// first (which is the letter's own text).
fn kept(parts: &[PartInfo]) -> impl Iterator<Item = &PartInfo> {
    let letter_text = parts.iter().position(|p| p.route == Route::LetterText);
    parts.iter().enumerate().filter_map(move |(i, p)| {
        let keep = match p.route {
            Route::LetterHtml | Route::Attachment => true,
            Route::LetterText => Some(i) != letter_text,
            _ => false,
        };
        keep.then_some(p)
    })
}

fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut in_tag = false;
    let mut tag = String::new();
    for c in html.chars() {
        match (in_tag, c) {
            (false, '<') => {
                in_tag = true;
                tag.clear();
            }
            (true, '>') => {
                in_tag = false;
                let t = tag
                    .trim_start_matches('/')
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if matches!(
                    t.as_str(),
                    "br" | "p" | "div" | "tr" | "li" | "h1" | "h2" | "h3"
                ) {
                    out.push('\n');
                }
            }
            (true, c) => tag.push(c),
            (false, c) => out.push(c),
        }
    }
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

impl Normalise for MailNormaliser {
    fn content(&self, envelope: &RawEnvelope) -> Vec<Vec<u8>> {
        match analyse(&envelope.body) {
            Ok(a) if !a.is_report => {
                // Moved out, not copied: the documents are held once.
                let mut keep = vec![false; a.parts.len()];
                for p in kept(&a.parts) {
                    keep[p.index] = true;
                }
                a.parts
                    .into_iter()
                    .zip(keep)
                    .filter_map(|(p, k)| k.then_some(p.bytes))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    fn normalise(&self, envelope: &RawEnvelope) -> Result<Vec<Event>, NormaliseError> {
        let a = analyse(&envelope.body)?;
        if a.is_report {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        let mut structured = false;
        let mut text = None;
        let mut html = None;
        for part in &a.parts {
            match part.route {
                Route::Edifact | Route::FhirJson | Route::FhirXml => {
                    structured = true;
                    events.extend(self.structured(envelope, part)?);
                }
                Route::LetterText if text.is_none() => {
                    text = Some(String::from_utf8_lossy(&part.bytes).into_owned());
                }
                Route::LetterHtml if html.is_none() => {
                    html = Some(html_to_text(&String::from_utf8_lossy(&part.bytes)));
                }
                _ => {}
            }
        }
        let attachments: Vec<Attachment> = kept(&a.parts)
            .map(|part| Attachment {
                content_type: part.content_type.clone(),
                title: part.filename.clone(),
                sha256: part.sha256.clone(),
                size: i64::try_from(part.size).unwrap_or(i64::MAX),
                // MIME names the media type only; the kind of document has no source here.
                document_type: None,
            })
            .collect();
        let text = text
            .or(html)
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        // A covering note beside structured content ("see attachment") is not a letter.
        if !attachments.is_empty() || (!structured && text.is_some()) {
            let mut header =
                EventHeader::new(EventKind::Letter, &envelope.id, 0, Format::Rfc822.as_str());
            header.occurred_at.clone_from(&a.date);
            header.source_message_type = Some("RFC5322".to_owned());
            events.push(Event::Letter(LetterEvent {
                header,
                patient: None,
                author: a.author.as_ref().map(|n| HealthProfessional {
                    name: Some(crate::zib::text_name(n.clone())),
                    role: Some("author".to_owned()),
                    ..HealthProfessional::default()
                }),
                author_organization: None,
                recipient: None,
                date: a.date.clone(),
                title: a.subject.clone(),
                text,
                attachments,
            }));
        }
        // One numbering over the whole message, so ids stay unique and stable.
        for (i, e) in events.iter_mut().enumerate() {
            let h = e.header_mut();
            h.index = i32::try_from(i).unwrap_or(i32::MAX);
            h.id = format!("{}.{i}", envelope.id);
            h.envelope_id.clone_from(&envelope.id);
        }
        Ok(events)
    }
}

/// A message's parts and where each goes, its Message-ID and, for a delivery status
/// notification, the report: the `parsed` part of `ketenbus inspect FILE.eml`.
///
/// # Errors
/// When the bytes are not a mail message.
pub fn describe(bytes: &[u8]) -> Result<serde_json::Value, NormaliseError> {
    let a = analyse(bytes)?;
    let report = if a.is_report {
        crate::mail::dsn::parse(bytes)
    } else {
        None
    };
    Ok(serde_json::json!({
        "message_id": a.message_id,
        "is_report": a.is_report,
        "parts": a.parts,
        "delivery_report": report,
    }))
}

/// [`describe`] plus the events the message becomes.
///
/// # Errors
/// When the bytes are not a mail message.
pub fn inspect(bytes: &[u8]) -> Result<serde_json::Value, NormaliseError> {
    let mut out = describe(bytes)?;
    let envelope = RawEnvelope {
        id: "inspect".into(),
        received_at_ms: 0,
        connector: "inspect".into(),
        format: Format::Rfc822,
        content_type: crate::mail::MEDIA_RFC822.into(),
        sender: None,
        receiver: None,
        body: bytes.to_vec(),
        attributes: std::collections::BTreeMap::new(),
    };
    match MailNormaliser::default().normalise(&envelope) {
        Ok(events) => out["events"] = serde_json::to_value(events).unwrap_or_default(),
        Err(e) => out["error"] = e.to_string().into(),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ketenbus_schemas::EventKind;

    use super::*;

    /// Found by the `mime` fuzz target: a malformed `multipart/report` reaches a
    /// `debug_assert!` in mail-parser 0.11 ("Invalid part ID, could not find multipart."), so
    /// debug builds panicked. Now it is a syntax error (release builds never asserted).
    #[test]
    fn a_multipart_that_trips_the_mail_parser_is_a_syntax_error_not_a_panic() {
        const INPUT: &[u8] = b"Return-Path: <>\n\
      Date: Tue, 24 Nov 2026 09:01:00 +0100 (CET)\n\
      From: MAILER-DAEMON@relay.example.test (Mail Del4 Nov 2026 09:01:00 +0100 (CETrsion: 1.0\n\
      Content-Type: multipart/report; report-type=delivery-status;\n\
      \tboundary=\"5ABC.1764000060/relay.example.testb Nkv 026 0+\xc9\xdf+010\xb0 (-only lee.test\n\
      Subjet\xa8n\x00\x00\x00\xbc\x9bcont\xff\xff\xff\xff\xff\xff\x01<>\n\
      Received: b Nk\"\n\
      Message-Id: <20261124080100.5ABC@r\n\
      To: ketenbus@ketenbus.example.test\n\
      MIME-Version: 1.0\n\
      Content-Type: multipart/report; report-type=delivery-stasus;\n\
      \tboundary=\"5ABC.1764000060/relay.example.test\"\n\
      Message-Id: <20261124080100.5ABC@relay.example.test>\n\
      \n\
      --5ABC.1764000060/relay.example.test\n\
      Content-Description: Notification\n\
      Content-Type: text/plain; charset=us-ascii\n\
      \n\
      Your message was successfully delivered to the destination(s) listed below.\n\
      \n\
      --5ABC.1764000060/relay.example.test\n\
      Content-Description: Delivery report\n\
      Content-Type: messagE/global\n\
      \n\
      --5ABC.1764000600/relay.example.test\n\
      Content-Description: Message Headers\n\
      Content-Tt\n\
      Content-Description: Delivery report\n\
      Content-Type: messagE/global\n\
      \n\
      --5ABC.1764000600/relay.example.test\n\
      Content-Description: Message Headers\n\
      Content-Type: text/rfc822-head+rs\n\
      \n\
      Messageicht v\x95ia ketenbus\n\
      \n\
      --5ABC.1764000060/relay.example.test--\n";
        assert!(matches!(analyse(INPUT), Err(NormaliseError::Syntax { .. })));
        assert!(crate::mail::dsn::parse(INPUT).is_none());
        assert!(inspect(INPUT).is_err());
    }

    fn envelope(body: &[u8]) -> RawEnvelope {
        RawEnvelope {
            id: "env1".into(),
            received_at_ms: 1,
            connector: "smtp".into(),
            format: Format::Rfc822,
            content_type: "message/rfc822".into(),
            sender: Some("mailbox:500001234".into()),
            receiver: Some("mailbox:500005678".into()),
            body: body.to_vec(),
            attributes: BTreeMap::new(),
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/testdata/mail/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn an_edifact_attachment_becomes_a_lab_result_and_the_covering_note_no_letter() {
        let events = MailNormaliser::default()
            .normalise(&envelope(&fixture("lab-result-edifact-attachment.eml")))
            .unwrap();
        let kinds: Vec<EventKind> = events.iter().map(Event::kind).collect();
        assert_eq!(kinds, [EventKind::LabResult], "{events:?}");
        let h = events[0].header();
        assert_eq!(h.id, "env1.0");
        assert_eq!(h.envelope_id, "env1");
        assert_eq!(h.source_format, "edifact");
        let Event::LabResult(lab) = &events[0] else {
            unreachable!()
        };
        assert!(!lab.results.is_empty());
    }

    #[test]
    fn an_edifact_body_is_found_by_its_content() {
        let events = MailNormaliser::default()
            .normalise(&envelope(&fixture("lab-result-edifact-body.eml")))
            .unwrap();
        assert_eq!(
            events.iter().map(Event::kind).collect::<Vec<_>>(),
            [EventKind::LabResult]
        );
    }

    #[test]
    fn a_pdf_letter_keeps_its_text_and_the_pdf_by_hash() {
        let n = MailNormaliser::default();
        let events = n.normalise(&envelope(&fixture("letter-pdf.eml"))).unwrap();
        assert_eq!(events.len(), 1);
        let Event::Letter(l) = &events[0] else {
            panic!("a letter")
        };
        assert_eq!(l.title.as_deref(), Some("Ontslagbrief (synthetisch)"));
        assert!(l.text.as_deref().unwrap().starts_with("Geachte collega,"));
        assert_eq!(l.date.as_deref(), Some("2026-11-02T14:30:00+01:00"));
        assert_eq!(
            l.header.occurred_at.as_deref(),
            Some("2026-11-02T14:30:00+01:00")
        );
        assert_eq!(l.attachments.len(), 1);
        let a = &l.attachments[0];
        assert_eq!(a.content_type, "application/pdf");
        assert_eq!(a.title.as_deref(), Some("ontslagbrief.pdf"));
        let pdf = fixture("ontslagbrief.pdf");
        assert_eq!(a.sha256, sha256_hex(&pdf));
        assert_eq!(a.size, pdf.len() as i64);
        assert_eq!(
            n.content(&envelope(&fixture("letter-pdf.eml"))),
            std::slice::from_ref(&pdf),
            "the PDF's bytes go to the content store, the event keeps its hash"
        );
        // Pure: the same envelope gives the same events.
        assert_eq!(
            n.normalise(&envelope(&fixture("letter-pdf.eml"))).unwrap(),
            events
        );
    }

    #[test]
    fn an_html_letter_becomes_text_and_keeps_the_html() {
        let events = MailNormaliser::default()
            .normalise(&envelope(&fixture("letter-html.eml")))
            .unwrap();
        let Event::Letter(l) = &events[0] else {
            panic!("a letter")
        };
        let text = l.text.as_deref().unwrap();
        assert!(
            text.contains("De afspraak is op 4 november & duurt 30 minuten."),
            "{text}"
        );
        assert!(!text.contains('<'));
        assert_eq!(l.attachments[0].content_type, "text/html");
    }

    #[test]
    fn delivery_reports_make_no_event() {
        let events = MailNormaliser::default()
            .normalise(&envelope(&fixture("dsn-failed.eml")))
            .unwrap();
        assert!(events.is_empty());
    }

    struct Count(&'static str);
    impl Normalise for Count {
        fn normalise(&self, envelope: &RawEnvelope) -> Result<Vec<Event>, NormaliseError> {
            let mut h =
                EventHeader::new(EventKind::Letter, &envelope.id, 0, envelope.format.as_str());
            h.source_message_type = Some(self.0.to_owned());
            Ok(vec![Event::Letter(LetterEvent {
                text: Some(String::from_utf8_lossy(&envelope.body).into_owned()),
                ..LetterEvent::new(h)
            })])
        }
    }

    #[test]
    fn fhir_parts_go_to_the_fhir_normaliser_and_ids_are_numbered_over_the_message() {
        let mail = b"From: a@b.test\r\nSubject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/fhir+json\r\n\r\n{\"resourceType\":\"Bundle\"}\r\n--b\r\nContent-Type: application/xml\r\n\r\n<Bundle xmlns=\"http://hl7.org/fhir\"/>\r\n--b\r\nContent-Type: application/json\r\n\r\n{\"resourceType\":\"Task\"}\r\n--b--\r\n";
        let n =
            MailNormaliser::with_normalisers(Box::new(Count("edifact")), Box::new(Count("fhir")));
        let events = n.normalise(&envelope(mail)).unwrap();
        let seen: Vec<(String, String, String)> = events
            .iter()
            .map(|e| {
                (
                    e.header().id.clone(),
                    e.header().source_format.clone(),
                    e.header().source_message_type.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("env1.0".into(), "fhir_json".into(), "fhir".into()),
                ("env1.1".into(), "fhir_xml".into(), "fhir".into()),
                ("env1.2".into(), "fhir_json".into(), "fhir".into()),
            ]
        );
    }

    #[test]
    fn a_fhir_bundle_attachment_reaches_the_real_fhir_normaliser() {
        let bundle = std::fs::read(format!(
            "{}/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let mut mail = b"From: ambulance@rav.example.test\r\nSubject: Overdracht\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nZie bijlage.\r\n--b\r\nContent-Type: application/fhir+json\r\nContent-Disposition: attachment; filename=overdracht.json\r\n\r\n".to_vec();
        mail.extend_from_slice(&bundle);
        mail.extend_from_slice(b"\r\n--b--\r\n");
        let events = MailNormaliser::default()
            .normalise(&envelope(&mail))
            .unwrap();
        assert_eq!(
            events.iter().map(Event::kind).collect::<Vec<_>>(),
            [EventKind::AcuteHandover],
            "{events:?}"
        );
        assert_eq!(events[0].header().id, "env1.0");
        assert_eq!(events[0].header().source_format, "fhir_json");
    }

    #[test]
    fn a_broken_edifact_part_is_rejected_naming_the_part() {
        let mail = b"From: a@b.test\r\nMIME-Version: 1.0\r\nContent-Type: application/EDIFACT\r\n\r\nUNB+UNOA:1+1+2+261101:0815+X'UNH+1+MEDLAB:1'PID+++'\r\n";
        let err = MailNormaliser::default()
            .normalise(&envelope(mail))
            .unwrap_err();
        assert!(err.to_string().contains("mime part 0"), "{err}");
    }

    #[test]
    fn not_a_message_is_a_syntax_error() {
        let err = MailNormaliser::default()
            .normalise(&envelope(b"   \r\n"))
            .unwrap_err();
        assert_eq!(err.reason(), REASON_SYNTAX);
    }

    #[test]
    fn inspect_lists_parts_and_events() {
        let v = inspect(&fixture("letter-pdf.eml")).unwrap();
        assert_eq!(v["parts"].as_array().unwrap().len(), 2);
        assert_eq!(v["parts"][1]["route"], "attachment");
        assert_eq!(v["events"][0]["header"]["kind"], "letter");
        let v = inspect(&fixture("dsn-failed.eml")).unwrap();
        assert_eq!(v["delivery_report"]["recipients"][0]["action"], "failed");
    }
}
