//! UN CONTRL acknowledgements for a received interchange (syntax check result), and the
//! envelope that carries one back to a partner that asked for it ([`reply`]).
//!
//! Pure: the caller gives the control reference and the preparation date and time, so the
//! same input always yields the same acknowledgement. Error codes are from code list 0085:
//! 12 invalid value, 13 missing, 15 not supported in this position, 18 unspecified,
//! 22 invalid service character, 28 references do not match, 29 control count does not
//! match.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ketenbus_schemas::{Format, RawEnvelope};

use super::parse::document::{Document, parse};
use super::parse::error::{EdifactError, Position};
use super::parse::syntax::Delimiters;
use super::parse::tokenize::{Tokens, tokenize};
use super::parse::write::{OwnedElement, OwnedSegment, Writer};

/// What the acknowledgement needs from its caller.
#[derive(Debug, Clone, Copy)]
pub struct ContrlParams<'p> {
    /// Interchange control reference of the CONTRL interchange (also its message reference).
    pub reference: &'p str,
    /// Preparation date `YYMMDD`.
    pub date: &'p str,
    /// Preparation time `HHMM`.
    pub time: &'p str,
}

/// Connector name of the CONTRL envelopes ketenbus makes: they are its own, on their way
/// out, and nothing clinical to normalise.
pub const CONTRL_CONNECTOR: &str = "contrl";

/// The CONTRL envelope answering `envelope`, when its UNB sender is one of `partners` (the
/// partners that asked for an acknowledgement of each interchange), addressed back to it.
/// Pure: its id (`<envelope id>.contrl`), control reference and preparation date derive
/// from the envelope.
#[must_use]
pub fn reply(envelope: &RawEnvelope, partners: &HashSet<String>) -> Option<RawEnvelope> {
    if envelope.format != Format::Edifact || partners.is_empty() {
        return None;
    }
    let (sender, recipient) = crate::party::first_interchange(&envelope.body);
    let partner = sender.filter(|s| partners.contains(s))?;
    let stamp = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(envelope.received_at_ms).unwrap_or(0)),
    )
    .to_string(); // 2026-11-24T09:30:00Z
    let date = format!("{}{}{}", &stamp[2..4], &stamp[5..7], &stamp[8..10]);
    let time = format!("{}{}", &stamp[11..13], &stamp[14..16]);
    let reference: String = envelope
        .id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(14)
        .collect();
    let body = acknowledge(
        &envelope.body,
        ContrlParams {
            reference: &reference,
            date: &date,
            time: &time,
        },
    )?;
    Some(RawEnvelope {
        id: format!("{}.contrl", envelope.id),
        received_at_ms: envelope.received_at_ms,
        connector: CONTRL_CONNECTOR.to_owned(),
        format: Format::Edifact,
        content_type: "application/EDIFACT".to_owned(),
        sender: recipient,
        receiver: Some(partner),
        body,
        attributes: BTreeMap::from([("in_reply_to".to_owned(), envelope.id.clone())]),
    })
}

/// Action codes (0083).
const ACCEPTED: &str = "7";
const RECEIVED: &str = "8";
const REJECTED: &str = "4";

/// The 0085 syntax error code for an error.
#[must_use]
pub fn syntax_error_code(e: &EdifactError) -> &'static str {
    match e {
        EdifactError::InvalidUna { .. } | EdifactError::DanglingRelease { .. } => "22",
        EdifactError::InvalidTag { .. } | EdifactError::NotANumber { .. } => "12",
        EdifactError::MissingSegment { .. }
        | EdifactError::MissingValue { .. }
        | EdifactError::Empty => "13",
        EdifactError::SegmentOutsideMessage { .. } | EdifactError::UnexpectedSegment { .. } => "15",
        EdifactError::ReferenceMismatch { .. } => "28",
        EdifactError::ControlCount { .. } => "29",
        _ => "18",
    }
}

/// The received interchange's UNB facts, as far as they could be read.
struct Received {
    delimiters: Delimiters,
    syntax: Vec<Vec<u8>>,
    sender: Vec<Vec<u8>>,
    recipient: Vec<Vec<u8>>,
    reference: Vec<u8>,
}

fn received(tokens: &Tokens<'_>) -> Option<Received> {
    let unb = tokens.segments().find(|s| s.tag() == "UNB")?;
    let comps = |e: usize| -> Vec<Vec<u8>> {
        unb.element(e)
            .map(|el| el.components().map(|v| v.bytes().into_owned()).collect())
            .unwrap_or_default()
    };
    let reference = unb.get(4, 0).map(|v| v.bytes().into_owned())?;
    Some(Received {
        delimiters: *unb.delimiters(),
        syntax: comps(0),
        sender: comps(1),
        recipient: comps(2),
        reference,
    })
}

fn seg(tag: &str, elements: Vec<OwnedElement>) -> OwnedSegment {
    OwnedSegment {
        tag: tag.to_owned(),
        counters: Vec::new(),
        elements,
    }
}

fn simple(v: impl Into<Vec<u8>>) -> OwnedElement {
    OwnedElement::simple(v)
}

fn composite(parts: Vec<Vec<u8>>) -> OwnedElement {
    OwnedElement {
        repetitions: vec![if parts.is_empty() {
            vec![Vec::new()]
        } else {
            parts
        }],
    }
}

/// `element:component` position (S011) of an error, when it has one.
fn position_element(p: &Position) -> Option<OwnedElement> {
    let e = p.element?;
    let mut parts = vec![e.to_string().into_bytes()];
    if let Some(c) = p.component {
        parts.push(c.to_string().into_bytes());
    }
    Some(composite(parts))
}

/// Builds the CONTRL interchange answering `input`, or `None` when no UNB with a control
/// reference can be read (there is nobody to answer to).
///
/// Accepted: `UCI ... +7` and one `UCM ... +7` per message. A message whose trailer does
/// not add up: `UCI ... +8` and `UCM ... +4` with `UCS`/`UCD` pointing at the trailer. An
/// interchange that does not parse, or whose UNZ does not add up: `UCI ... +4` with the
/// error code, the segment tag and the element position when known.
#[must_use]
pub fn acknowledge(input: &[u8], params: ContrlParams<'_>) -> Option<Vec<u8>> {
    let (rcv, outcome) = match tokenize(input) {
        Ok(tokens) => {
            let rcv = received(&tokens)?;
            (rcv, parse(input))
        }
        Err(e) => {
            // The UNB may still be readable if the error comes after it.
            let cut = e.offset().unwrap_or(0).min(input.len());
            let head = &input[..cut];
            let rcv = tokenize(head).ok().and_then(|t| received(&t))?;
            (rcv, Err(e))
        }
    };
    let mut body: Vec<OwnedSegment> = Vec::new();
    match &outcome {
        Err(e) => body.push(rejected_interchange(&rcv, e)),
        Ok(doc) => acknowledge_document(doc, &rcv, &mut body),
    }
    write_contrl(&rcv, &body, params)
}

fn uci(rcv: &Received, action: &str) -> OwnedSegment {
    seg(
        "UCI",
        vec![
            simple(rcv.reference.clone()),
            composite(rcv.sender.clone()),
            composite(rcv.recipient.clone()),
            simple(action),
        ],
    )
}

fn rejected_interchange(rcv: &Received, e: &EdifactError) -> OwnedSegment {
    let mut s = uci(rcv, REJECTED);
    s.elements.push(simple(syntax_error_code(e)));
    if let Some(p) = e.position()
        && let Some(tag) = &p.tag
    {
        s.elements.push(simple(tag.clone()));
        if let Some(el) = position_element(p) {
            s.elements.push(el);
        }
    }
    s
}

fn acknowledge_document(doc: &Document<'_>, rcv: &Received, body: &mut Vec<OwnedSegment>) {
    // An interchange-level issue (UNZ, UNE) rejects the whole interchange.
    let interchange_issue = doc
        .control_issues()
        .iter()
        .find(|e| e.position().is_some_and(|p| p.message.is_none()));
    if let Some(e) = interchange_issue {
        body.push(rejected_interchange(rcv, e));
        return;
    }
    let mut ucms = Vec::new();
    let mut any_rejected = false;
    for m in doc.messages() {
        let header = m.header();
        let identifier: Vec<Vec<u8>> = header
            .element(1)
            .map(|el| el.components().map(|v| v.bytes().into_owned()).collect())
            .unwrap_or_default();
        let reference = header
            .get(0, 0)
            .map(|v| v.bytes().into_owned())
            .unwrap_or_default();
        let trailer_offset = m.trailer().offset();
        let issue = doc
            .control_issues()
            .iter()
            .find(|e| e.offset() == Some(trailer_offset));
        let mut ucm = seg("UCM", vec![simple(reference), composite(identifier)]);
        match issue {
            None => {
                ucm.elements.push(simple(ACCEPTED));
                ucms.push(ucm);
            }
            Some(e) => {
                any_rejected = true;
                ucm.elements.push(simple(REJECTED));
                ucms.push(ucm);
                let p = e.position().cloned().unwrap_or_default();
                ucms.push(seg(
                    "UCS",
                    vec![
                        simple(p.message_segment.unwrap_or(0).to_string()),
                        simple(syntax_error_code(e)),
                    ],
                ));
                if let Some(el) = position_element(&p) {
                    ucms.push(seg("UCD", vec![simple(syntax_error_code(e)), el]));
                }
            }
        }
    }
    body.push(uci(rcv, if any_rejected { RECEIVED } else { ACCEPTED }));
    body.extend(ucms);
}

fn write_contrl(
    rcv: &Received,
    body: &[OwnedSegment],
    params: ContrlParams<'_>,
) -> Option<Vec<u8>> {
    let mut syntax = rcv.syntax.clone();
    if syntax.first().is_none_or(Vec::is_empty) {
        syntax = vec![b"UNOA".to_vec(), b"1".to_vec()];
    }
    // Version 4 has a repetition separator: name it in a UNA so both sides agree.
    let v4 = syntax
        .get(1)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u8>().ok())
        .is_some_and(|v| v >= 4);
    let mut d = rcv.delimiters;
    d.repetition = None;
    if v4 {
        let candidate = if d == Delimiters::LEVEL_B { 0x19 } else { b'*' };
        if !d.is_special(candidate) {
            d.repetition = Some(candidate);
        }
    }
    let w = Writer::new(d).with_line_break(b"\r\n");
    let mut out = Vec::new();
    if v4 || (d != Delimiters::DEFAULT && d != Delimiters::LEVEL_B) {
        w.write_una(&mut out);
    }
    let mut segs = vec![
        seg(
            "UNB",
            vec![
                composite(syntax),
                composite(rcv.recipient.clone()),
                composite(rcv.sender.clone()),
                composite(vec![params.date.into(), params.time.into()]),
                simple(params.reference),
            ],
        ),
        seg(
            "UNH",
            vec![
                simple(params.reference),
                composite(vec![
                    b"CONTRL".to_vec(),
                    b"D".to_vec(),
                    b"3".to_vec(),
                    b"UN".to_vec(),
                ]),
            ],
        ),
    ];
    segs.extend(body.iter().cloned());
    let count = body.len() + 2;
    segs.push(seg(
        "UNT",
        vec![simple(count.to_string()), simple(params.reference)],
    ));
    segs.push(seg("UNZ", vec![simple("1"), simple(params.reference)]));
    // A value the delimiters cannot carry (a separator with no release character): no
    // acknowledgement rather than a wrong one.
    w.write_all(&mut out, &segs).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ContrlParams<'static> = ContrlParams {
        reference: "CTL1",
        date: "261101",
        time: "0900",
    };

    fn text(b: Option<Vec<u8>>) -> String {
        String::from_utf8(b.expect("an acknowledgement")).unwrap()
    }

    #[test]
    fn accepted_interchange() {
        let input = b"UNB+UNOA:1+500001234+500005678+261101:0815+IC1'UNH+M1+MEDLAB:1'PID+1'UNT+3+M1'UNZ+1+IC1'";
        assert_eq!(
            text(acknowledge(input, P)),
            "UNB+UNOA:1+500005678+500001234+261101:0900+CTL1'\r\n\
             UNH+CTL1+CONTRL:D:3:UN'\r\n\
             UCI+IC1+500001234+500005678+7'\r\n\
             UCM+M1+MEDLAB:1+7'\r\n\
             UNT+4+CTL1'\r\n\
             UNZ+1+CTL1'\r\n"
        );
        // The acknowledgement is itself well-formed EDIFACT.
        let ack = acknowledge(input, P).unwrap();
        assert!(crate::edifact::parse_strict(&ack).is_ok());
    }

    #[test]
    fn message_with_wrong_segment_count() {
        let input = b"UNB+UNOA:1+A+B+261101:0815+IC1'UNH+M1+MEDLAB:1'PID+1'UNT+4+M1'UNZ+1+IC1'";
        assert_eq!(
            text(acknowledge(input, P)),
            "UNB+UNOA:1+B+A+261101:0900+CTL1'\r\n\
             UNH+CTL1+CONTRL:D:3:UN'\r\n\
             UCI+IC1+A+B+8'\r\n\
             UCM+M1+MEDLAB:1+4'\r\n\
             UCS+3+29'\r\n\
             UCD+29+1'\r\n\
             UNT+6+CTL1'\r\n\
             UNZ+1+CTL1'\r\n"
        );
    }

    #[test]
    fn version_4_names_its_repetition_separator() {
        let input = b"UNB+UNOC:4+A?*B+C+20261101:0815+IC1'UNH+M1+MEDLAB:1'UNT+2+M1'UNZ+1+IC1'";
        let ack = acknowledge(input, P).unwrap();
        assert!(ack.starts_with(b"UNA:+.?*'\r\nUNB+UNOC:4+C+A?*B+"));
        let doc = crate::edifact::parse_strict(&ack).unwrap();
        let uci = doc.messages().next().unwrap().body().next().unwrap();
        assert_eq!(uci.text(1, 0).as_deref(), Some("A*B"));
    }

    #[test]
    fn a_reply_goes_back_to_a_partner_that_asked_and_derives_from_the_envelope() {
        let envelope = RawEnvelope {
            id: "0193a1b2-0000-7000-8000-000000000001".into(),
            received_at_ms: 1_795_512_600_000, // 2026-11-24T09:30:00Z
            connector: "http".into(),
            format: Format::Edifact,
            content_type: "application/EDIFACT".into(),
            sender: None,
            receiver: None,
            body: b"UNB+UNOA:1+500001234+500005678+261124:0815+IC1'UNH+M1+MEDLAB:1'PID+1'UNT+3+M1'UNZ+1+IC1'".to_vec(),
            attributes: BTreeMap::new(),
        };
        let partners = HashSet::from(["mailbox:500001234".to_owned()]);
        let r = reply(&envelope, &partners).expect("the partner asked");
        assert_eq!(r.id, "0193a1b2-0000-7000-8000-000000000001.contrl");
        assert_eq!(r.connector, CONTRL_CONNECTOR);
        assert_eq!(r.sender.as_deref(), Some("mailbox:500005678"));
        assert_eq!(r.receiver.as_deref(), Some("mailbox:500001234"));
        assert_eq!(r.attributes["in_reply_to"], envelope.id);
        let text = String::from_utf8(r.body).unwrap();
        assert!(
            text.starts_with("UNB+UNOA:1+500005678+500001234+261124:0930+0193a1b2000070'"),
            "{text}"
        );
        assert_eq!(reply(&envelope, &HashSet::new()), None, "nobody asked");
        let other = HashSet::from(["mailbox:1".to_owned()]);
        assert_eq!(reply(&envelope, &other), None, "another partner asked");
    }

    #[test]
    fn unparseable_interchange_is_rejected_with_position() {
        let input = b"UNB+UNOA:1+A+B+261101:0815+IC1'UNH+M1+MEDLAB:1'BEP?";
        let ack = text(acknowledge(input, P));
        assert!(ack.contains("UCI+IC1+A+B+4+22'"), "{ack}");
        let input = b"UNB+UNOA:1+A+B+261101:0815+IC1'UNH+M1+MEDLAB:1'UNT+2+M1'UNZ+2+IC1'";
        let ack = text(acknowledge(input, P));
        assert!(ack.contains("UCI+IC1+A+B+4+29+UNZ+1'"), "{ack}");
        assert_eq!(
            acknowledge(b"UNH+1+X'UNT+2+1'", P),
            None,
            "no UNB: nobody to answer"
        );
        assert_eq!(acknowledge(b"garbage", P), None);
        // Found by the fuzzer: a UNB without syntax identifier still gets a valid answer.
        let ack = acknowledge(b"UNB+++++IC9'", P).unwrap();
        assert!(ack.starts_with(b"UNB+UNOA:1+"));
        assert!(crate::edifact::parse_strict(&ack).is_ok());
    }
}
