//! Envelopes: UNB/UNZ interchanges, UNG/UNE groups, UNH/UNT messages, and their controls.

use std::borrow::Cow;
use std::fmt;

use super::error::{EdifactError, Position};
use super::syntax::{Charset, Delimiters};
use super::tokenize::{Segment, Tokens, tokenize};

#[derive(Debug, Clone)]
struct InterchangeInfo {
    una: Option<u32>,
    header: Option<u32>,
    trailer: Option<u32>,
    first_message: u32,
    message_count: u32,
    groups: u32,
}

#[derive(Debug, Clone, Copy)]
struct MessageInfo {
    header: u32,
    trailer: u32,
}

/// A parsed input: one or more interchanges with their messages.
///
/// Structure errors (a segment outside a message, a missing UNT or UNZ) fail [`parse`];
/// control mismatches (UNT segment count, UNZ message count, references) are collected in
/// [`Document::control_issues`] so a file can still be inspected; [`parse_strict`] fails on
/// them too.
pub struct Document<'a> {
    tokens: Tokens<'a>,
    interchanges: Vec<InterchangeInfo>,
    messages: Vec<MessageInfo>,
    issues: Vec<EdifactError>,
}

impl fmt::Debug for Document<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document")
            .field("bytes", &self.tokens.input().len())
            .field("interchanges", &self.interchanges.len())
            .field("messages", &self.messages.len())
            .field("control_issues", &self.issues.len())
            .finish()
    }
}

/// Parses an input into interchanges and messages and checks the control counts.
///
/// Messages without a UNB envelope (a bare `UNH ... UNT`) form an interchange without
/// header. Control mismatches do not fail the parse; see [`Document::control_issues`].
///
/// # Errors
/// Tokenizer errors, and structure errors with their position.
pub fn parse(input: &[u8]) -> Result<Document<'_>, EdifactError> {
    let tokens = tokenize(input)?;
    build(tokens)
}

/// [`parse`], and the first control mismatch is an error too.
///
/// # Errors
/// As [`parse`], plus [`EdifactError::ControlCount`] and [`EdifactError::ReferenceMismatch`].
pub fn parse_strict(input: &[u8]) -> Result<Document<'_>, EdifactError> {
    let doc = parse(input)?;
    match doc.issues.first() {
        Some(e) => Err(e.clone()),
        None => Ok(doc),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Outside,
    Interchange,
    Group { header: u32, first_message: u32 },
}

#[allow(clippy::too_many_lines)]
fn build(tokens: Tokens<'_>) -> Result<Document<'_>, EdifactError> {
    let mut interchanges: Vec<InterchangeInfo> = Vec::new();
    let mut messages: Vec<MessageInfo> = Vec::new();
    let mut issues = Vec::new();
    let mut state = State::Outside;
    let mut open_message: Option<u32> = None;
    let mut pending_una: Option<u32> = None;

    let new_interchange = |una, header, first_message| InterchangeInfo {
        una,
        header,
        trailer: None,
        first_message,
        message_count: 0,
        groups: 0,
    };

    for seg in tokens.segments() {
        let i = u32::try_from(seg.index()).unwrap_or(u32::MAX);
        let at = || tokens.locate(seg.index());
        let tag = seg.tag();
        if let Some(h) = open_message {
            match tag {
                "UNT" => {
                    check_message(&tokens, h, seg, &mut issues, &at)?;
                    messages.push(MessageInfo {
                        header: h,
                        trailer: i,
                    });
                    if let Some(ic) = interchanges.last_mut() {
                        ic.message_count += 1;
                    }
                    open_message = None;
                }
                "UNA" | "UNB" | "UNZ" | "UNG" | "UNE" | "UNH" => {
                    return Err(EdifactError::MissingSegment {
                        position: at(),
                        segment: "UNT",
                    });
                }
                _ => {}
            }
            continue;
        }
        match tag {
            "UNA" => {
                if state != State::Outside {
                    return Err(EdifactError::MissingSegment {
                        position: at(),
                        segment: if matches!(state, State::Group { .. }) {
                            "UNE"
                        } else {
                            "UNZ"
                        },
                    });
                }
                pending_una = Some(i);
            }
            "UNB" => {
                if state != State::Outside {
                    return Err(EdifactError::MissingSegment {
                        position: at(),
                        segment: if matches!(state, State::Group { .. }) {
                            "UNE"
                        } else {
                            "UNZ"
                        },
                    });
                }
                require(seg, 0, 0, "syntax identifier", &at)?;
                interchanges.push(new_interchange(
                    pending_una.take(),
                    Some(i),
                    u32::try_from(messages.len()).unwrap_or(u32::MAX),
                ));
                state = State::Interchange;
            }
            "UNG" => {
                if state != State::Interchange {
                    return Err(EdifactError::UnexpectedSegment {
                        position: at(),
                        reason: "a group needs an open interchange",
                    });
                }
                state = State::Group {
                    header: i,
                    first_message: u32::try_from(messages.len()).unwrap_or(u32::MAX),
                };
            }
            "UNE" => {
                let State::Group {
                    header,
                    first_message,
                } = state
                else {
                    return Err(EdifactError::UnexpectedSegment {
                        position: at(),
                        reason: "UNE without UNG",
                    });
                };
                let actual = messages.len() as u64 - u64::from(first_message);
                check_count(seg, "message count", actual, &mut issues, &at)?;
                check_reference(&tokens, header, 4, seg, "group reference", &mut issues, &at);
                if let Some(ic) = interchanges.last_mut() {
                    ic.groups += 1;
                }
                state = State::Interchange;
            }
            "UNH" => {
                if state == State::Outside {
                    interchanges.push(new_interchange(
                        pending_una.take(),
                        None,
                        u32::try_from(messages.len()).unwrap_or(u32::MAX),
                    ));
                    state = State::Interchange;
                }
                require(seg, 0, 0, "message reference", &at)?;
                require(seg, 1, 0, "message type", &at)?;
                open_message = Some(i);
            }
            "UNZ" => {
                let header = interchanges
                    .last()
                    .and_then(|ic| ic.header)
                    .filter(|_| state != State::Outside);
                let Some(header) = header else {
                    return Err(EdifactError::UnexpectedSegment {
                        position: at(),
                        reason: "UNZ without UNB",
                    });
                };
                if matches!(state, State::Group { .. }) {
                    return Err(EdifactError::MissingSegment {
                        position: at(),
                        segment: "UNE",
                    });
                }
                let ic = interchanges.last_mut().expect("checked above");
                ic.trailer = Some(i);
                let (count, actual) = if ic.groups > 0 {
                    ("group count", ic.groups)
                } else {
                    ("message count", ic.message_count)
                };
                check_count(seg, count, u64::from(actual), &mut issues, &at)?;
                check_reference(
                    &tokens,
                    header,
                    4,
                    seg,
                    "interchange control reference",
                    &mut issues,
                    &at,
                );
                state = State::Outside;
            }
            "UNT" => {
                return Err(EdifactError::UnexpectedSegment {
                    position: at(),
                    reason: "UNT without UNH",
                });
            }
            _ => {
                return Err(EdifactError::SegmentOutsideMessage { position: at() });
            }
        }
    }
    let end = || tokens.locate(tokens.len());
    if open_message.is_some() {
        return Err(EdifactError::MissingSegment {
            position: end(),
            segment: "UNT",
        });
    }
    match state {
        State::Group { .. } => {
            return Err(EdifactError::MissingSegment {
                position: end(),
                segment: "UNE",
            });
        }
        State::Interchange if interchanges.last().is_some_and(|ic| ic.header.is_some()) => {
            return Err(EdifactError::MissingSegment {
                position: end(),
                segment: "UNZ",
            });
        }
        _ => {}
    }
    if interchanges.is_empty() {
        // Only a UNA: nothing to read.
        return Err(EdifactError::Empty);
    }
    Ok(Document {
        tokens,
        interchanges,
        messages,
        issues,
    })
}

fn require(
    seg: Segment<'_>,
    e: usize,
    c: usize,
    field: &'static str,
    at: &dyn Fn() -> Position,
) -> Result<(), EdifactError> {
    if seg.get(e, c).is_some_and(|v| !v.is_empty()) {
        Ok(())
    } else {
        Err(EdifactError::MissingValue {
            position: at().with_element(to_u32(e + 1), Some(to_u32(c + 1))),
            field,
        })
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn check_count(
    seg: Segment<'_>,
    count: &'static str,
    actual: u64,
    issues: &mut Vec<EdifactError>,
    at: &dyn Fn() -> Position,
) -> Result<(), EdifactError> {
    require(seg, 0, 0, count, at)?;
    let position = || at().with_element(1, None);
    let Ok(declared) = seg.text(0, 0).unwrap_or_default().trim().parse::<u64>() else {
        issues.push(EdifactError::NotANumber {
            position: position(),
            field: count,
        });
        return Ok(());
    };
    if declared != actual {
        issues.push(EdifactError::ControlCount {
            position: position(),
            count,
            declared,
            actual,
        });
    }
    Ok(())
}

fn check_reference(
    tokens: &Tokens<'_>,
    header: u32,
    header_element: usize,
    trailer: Segment<'_>,
    reference: &'static str,
    issues: &mut Vec<EdifactError>,
    at: &dyn Fn() -> Position,
) {
    let h = tokens.segment(header as usize);
    let expected = h.get(header_element, 0).map(|v| v.bytes());
    let got = trailer.get(1, 0).map(|v| v.bytes());
    if expected != got {
        issues.push(EdifactError::ReferenceMismatch {
            position: at().with_element(2, None),
            reference,
        });
    }
}

fn check_message(
    tokens: &Tokens<'_>,
    header: u32,
    trailer: Segment<'_>,
    issues: &mut Vec<EdifactError>,
    at: &dyn Fn() -> Position,
) -> Result<(), EdifactError> {
    let actual = trailer.index() as u64 + 1 - u64::from(header);
    check_count(trailer, "segment count", actual, issues, at)?;
    check_reference(tokens, header, 0, trailer, "message reference", issues, at);
    Ok(())
}

impl<'a> Document<'a> {
    /// The tokens underneath: every segment in input order.
    #[must_use]
    pub fn tokens(&self) -> &Tokens<'a> {
        &self.tokens
    }

    /// The input.
    #[must_use]
    pub fn input(&self) -> &'a [u8] {
        self.tokens.input()
    }

    /// Control count and reference mismatches, in input order.
    #[must_use]
    pub fn control_issues(&self) -> &[EdifactError] {
        &self.issues
    }

    /// The interchanges in input order.
    pub fn interchanges(&self) -> impl ExactSizeIterator<Item = Interchange<'_>> + '_ {
        (0..self.interchanges.len()).map(move |i| Interchange {
            doc: self,
            index: i,
        })
    }

    /// Every message of every interchange, in input order.
    pub fn messages(&self) -> impl ExactSizeIterator<Item = Message<'_>> + '_ {
        (0..self.messages.len()).map(move |i| Message {
            doc: self,
            index: i,
        })
    }

    /// Position of a segment (by its index in [`Tokens`]).
    #[must_use]
    pub fn locate(&self, segment_index: usize) -> Position {
        self.tokens.locate(segment_index)
    }
}

/// One interchange (UNB ... UNZ, or bare messages).
#[derive(Clone, Copy)]
pub struct Interchange<'d> {
    doc: &'d Document<'d>,
    index: usize,
}

impl fmt::Debug for Interchange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interchange")
            .field("number", &(self.index + 1))
            .field("messages", &self.info().message_count)
            .finish()
    }
}

impl<'d> Interchange<'d> {
    fn info(&self) -> &'d InterchangeInfo {
        &self.doc.interchanges[self.index]
    }

    /// 1-based number of the interchange in the input.
    #[must_use]
    pub fn number(&self) -> usize {
        self.index + 1
    }

    /// The UNA segment, when one preceded the header.
    #[must_use]
    pub fn una(&self) -> Option<Segment<'d>> {
        self.info().una.map(|i| self.doc.tokens.segment(i as usize))
    }

    /// The UNB segment; `None` for bare messages.
    #[must_use]
    pub fn header(&self) -> Option<Segment<'d>> {
        self.info()
            .header
            .map(|i| self.doc.tokens.segment(i as usize))
    }

    /// The UNZ segment.
    #[must_use]
    pub fn trailer(&self) -> Option<Segment<'d>> {
        self.info()
            .trailer
            .map(|i| self.doc.tokens.segment(i as usize))
    }

    /// Delimiters in force for the interchange's messages.
    #[must_use]
    pub fn delimiters(&self) -> Delimiters {
        self.messages()
            .next()
            .map(|m| *m.header().delimiters())
            .or_else(|| self.header().map(|h| *h.delimiters()))
            .unwrap_or_default()
    }

    /// Syntax identifier (`UNOA`, ...), as written.
    #[must_use]
    pub fn syntax_identifier(&self) -> Option<Cow<'d, str>> {
        self.header()?.text(0, 0)
    }

    /// The declared character repertoire.
    #[must_use]
    pub fn charset(&self) -> Option<Charset> {
        let h = self.header()?;
        Some(Charset::from_identifier(h.get(0, 0)?.raw()))
    }

    /// Syntax version number (1 to 4), when declared and numeric.
    #[must_use]
    pub fn syntax_version(&self) -> Option<u8> {
        self.header()?.text(0, 1)?.trim().parse().ok()
    }

    /// Sender identification (S002/0004), an opaque party id.
    #[must_use]
    pub fn sender(&self) -> Option<Cow<'d, str>> {
        self.header()?.text(1, 0)
    }

    /// Recipient identification (S003/0010), an opaque party id.
    #[must_use]
    pub fn recipient(&self) -> Option<Cow<'d, str>> {
        self.header()?.text(2, 0)
    }

    /// Preparation date and time as written (`YYMMDD`, `HHMM`).
    #[must_use]
    pub fn prepared(&self) -> Option<(Cow<'d, str>, Option<Cow<'d, str>>)> {
        let h = self.header()?;
        Some((h.text(3, 0)?, h.text(3, 1)))
    }

    /// Interchange control reference (0020).
    #[must_use]
    pub fn control_reference(&self) -> Option<Cow<'d, str>> {
        self.header()?.text(4, 0)
    }

    /// The messages of this interchange.
    pub fn messages(&self) -> impl ExactSizeIterator<Item = Message<'d>> + 'd {
        let info = self.info();
        let doc = self.doc;
        (info.first_message as usize..(info.first_message + info.message_count) as usize)
            .map(move |i| Message { doc, index: i })
    }
}

/// One message (UNH ... UNT).
#[derive(Clone, Copy)]
pub struct Message<'d> {
    doc: &'d Document<'d>,
    index: usize,
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("type", &self.message_type())
            .field("segments", &self.segment_count())
            .finish()
    }
}

impl<'d> Message<'d> {
    fn info(&self) -> MessageInfo {
        self.doc.messages[self.index]
    }

    /// 0-based index among all messages of the document.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The UNH segment.
    #[must_use]
    pub fn header(&self) -> Segment<'d> {
        self.doc.tokens.segment(self.info().header as usize)
    }

    /// The UNT segment.
    #[must_use]
    pub fn trailer(&self) -> Segment<'d> {
        self.doc.tokens.segment(self.info().trailer as usize)
    }

    /// Message reference number (0062).
    #[must_use]
    pub fn reference(&self) -> Cow<'d, str> {
        self.header().text(0, 0).unwrap_or_default()
    }

    /// Message type (`MEDLAB`, `MEDRPT`, ...).
    #[must_use]
    pub fn message_type(&self) -> Cow<'d, str> {
        self.header().text(1, 0).unwrap_or_default()
    }

    /// Message version (`1` in `MEDLAB:1`, `D` in `MEDRPT:D:93A:UN`).
    #[must_use]
    pub fn version(&self) -> Option<Cow<'d, str>> {
        self.header().text(1, 1)
    }

    /// Release (`93A`).
    #[must_use]
    pub fn release(&self) -> Option<Cow<'d, str>> {
        self.header().text(1, 2)
    }

    /// Controlling agency (`UN`).
    #[must_use]
    pub fn agency(&self) -> Option<Cow<'d, str>> {
        self.header().text(1, 3)
    }

    /// Association assigned code (`MRPN32`).
    #[must_use]
    pub fn association_code(&self) -> Option<Cow<'d, str>> {
        self.header().text(1, 4)
    }

    /// Number of segments, UNH and UNT included.
    #[must_use]
    pub fn segment_count(&self) -> usize {
        let i = self.info();
        (i.trailer - i.header + 1) as usize
    }

    /// All segments, UNH and UNT included.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = Segment<'d>> + 'd {
        let i = self.info();
        let tokens = &self.doc.tokens;
        (i.header as usize..i.trailer as usize + 1).map(move |k| tokens.segment(k))
    }

    /// The segments between UNH and UNT.
    pub fn body(&self) -> impl ExactSizeIterator<Item = Segment<'d>> + 'd {
        let i = self.info();
        let tokens = &self.doc.tokens;
        (i.header as usize + 1..i.trailer as usize).map(move |k| tokens.segment(k))
    }

    /// Position of one of this message's segments.
    #[must_use]
    pub fn locate(&self, segment: Segment<'_>) -> Position {
        self.doc.locate(segment.index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &[u8] = b"UNA:+.? '\nUNB+UNOA:1+500001234+500005678+261101:0815+IC1'\n\
UNH+M1+MEDLAB:1'\nPID+1961:04:09+M'\nUNT+3+M1'\n\
UNH+M2+MEDVRI:1'\nTXT:1+a'\nTXT:2+b'\nUNT+4+M2'\nUNZ+2+IC1'\n";

    #[test]
    fn envelopes_and_messages() {
        let doc = parse_strict(TWO).unwrap();
        let ics: Vec<_> = doc.interchanges().collect();
        assert_eq!(ics.len(), 1);
        let ic = ics[0];
        assert_eq!(ic.syntax_identifier().as_deref(), Some("UNOA"));
        assert_eq!(ic.charset(), Some(Charset::Unoa));
        assert_eq!(ic.syntax_version(), Some(1));
        assert_eq!(ic.sender().as_deref(), Some("500001234"));
        assert_eq!(ic.recipient().as_deref(), Some("500005678"));
        assert_eq!(ic.control_reference().as_deref(), Some("IC1"));
        assert!(ic.una().is_some());
        let msgs: Vec<_> = ic.messages().collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].message_type(), "MEDLAB");
        assert_eq!(msgs[0].version().as_deref(), Some("1"));
        assert_eq!(msgs[1].reference(), "M2");
        assert_eq!(msgs[1].body().count(), 2);
        assert_eq!(msgs[1].segment_count(), 4);
    }

    #[test]
    fn control_mismatches_are_reported_not_swallowed() {
        let bad = String::from_utf8(TWO.to_vec())
            .unwrap()
            .replace("UNT+4+M2", "UNT+5+M9")
            .replace("UNZ+2+IC1", "UNZ+3+IC2");
        let doc = parse(bad.as_bytes()).unwrap();
        let issues: Vec<String> = doc
            .control_issues()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            issues,
            [
                "interchange 1, message 2, segment UNT #4, element 1, byte 138: segment count declares 5 but there are 4",
                "interchange 1, message 2, segment UNT #4, element 2, byte 138: message reference does not match the header",
                "interchange 1, segment UNZ #9, element 1, byte 148: message count declares 3 but there are 2",
                "interchange 1, segment UNZ #9, element 2, byte 148: interchange control reference does not match the header",
            ]
        );
        assert!(matches!(
            parse_strict(bad.as_bytes()),
            Err(EdifactError::ControlCount {
                declared: 5,
                actual: 4,
                ..
            })
        ));
    }

    #[test]
    fn structure_errors() {
        let e = parse(b"UNH+1+X'FTX+a'UNH+2+X'UNT+2+2'").unwrap_err();
        assert!(
            matches!(e, EdifactError::MissingSegment { segment: "UNT", .. }),
            "{e}"
        );
        assert_eq!(e.offset(), Some(14));
        let e = parse(b"UNB+UNOA:1+A+B+1:1+R'UNH+1+X'UNT+2+1'").unwrap_err();
        assert!(
            matches!(e, EdifactError::MissingSegment { segment: "UNZ", .. }),
            "{e}"
        );
        let e = parse(b"BGM+1'UNH+1+X'UNT+2+1'").unwrap_err();
        assert!(
            matches!(e, EdifactError::SegmentOutsideMessage { .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "segment BGM #1, byte 0: segment outside a message"
        );
        let e = parse(b"UNH++X'UNT+2+1'").unwrap_err();
        assert_eq!(
            e.to_string(),
            "interchange 1, message 1, segment UNH #1, element 1, component 1, byte 0: message reference is missing"
        );
        let e = parse(b"UNZ+0+R'").unwrap_err();
        assert!(matches!(e, EdifactError::UnexpectedSegment { .. }));
    }

    #[test]
    fn bare_messages_and_several_interchanges() {
        let doc = parse_strict(b"UNH+1+ORDERS:D:96A:UN'BGM+220'UNT+3+1'").unwrap();
        let ic = doc.interchanges().next().unwrap();
        assert!(ic.header().is_none());
        assert_eq!(ic.messages().len(), 1);
        let two = [TWO, TWO].concat();
        let doc = parse_strict(&two).unwrap();
        assert_eq!(doc.interchanges().len(), 2);
        assert_eq!(doc.messages().len(), 4);
        let second = doc.interchanges().nth(1).unwrap();
        assert_eq!(second.messages().next().unwrap().index(), 2);
    }

    #[test]
    fn groups() {
        let doc = parse_strict(
            b"UNB+UNOC:3+A+B+1:1+R'UNG+MEDLAB+A+B+1:1+G1'UNH+1+MEDLAB:1'UNT+2+1'UNE+1+G1'UNZ+1+R'",
        )
        .unwrap();
        assert_eq!(doc.messages().len(), 1);
        let doc = parse(
            b"UNB+UNOC:3+A+B+1:1+R'UNG+MEDLAB+A+B+1:1+G1'UNH+1+MEDLAB:1'UNT+2+1'UNE+2+G2'UNZ+1+R'",
        )
        .unwrap();
        assert_eq!(doc.control_issues().len(), 2);
    }
}
