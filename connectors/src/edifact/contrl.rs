//! UN CONTRL acknowledgements for a received interchange (syntax check result).
//!
//! Pure: the caller gives the control reference and the preparation date and time, so the
//! same input always yields the same acknowledgement. Error codes are from code list 0085:
//! 12 invalid value, 13 missing, 15 not supported in this position, 18 unspecified,
//! 22 invalid service character, 28 references do not match, 29 control count does not
//! match.

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
