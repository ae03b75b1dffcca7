//! EDIFACT envelopes -> events: dispatch by message type, and what the mappings share.
//!
//! One event per message (UNH ... UNT), numbered across the envelope. An envelope is
//! normalised whole or not at all: one message of a type ketenbus does not map
//! (`unsupported_message_type`), a syntax or control-count error (`edifact_syntax`) or an
//! invalid BSN (`invalid_bsn`) dead-letters the whole envelope with its original bytes.

use std::borrow::Cow;

use ketenbus_schemas::event::{Address, ContactPoint, EventHeader, EventKind, Identifier, systems};
use ketenbus_schemas::{Event, RawEnvelope};

use super::parse::document::{Document, Interchange, Message, parse};
use super::parse::error::{EdifactError, Position};
use super::parse::tokenize::Segment;
use crate::{Normalise, NormaliseError};

mod lab;
pub(crate) mod letter;
pub(crate) mod medlab;
pub(crate) mod medrpt;

#[cfg(test)]
mod golden_tests;

/// Reason code for input that is not EDIFACT or breaks its envelope rules.
pub const REASON_SYNTAX: &str = "edifact_syntax";
pub use crate::contract::normalise::{REASON_INVALID_BSN, REASON_MISSING};

/// Normalises EDIFACT envelopes: MEDLAB:1 and MEDRPT lab reports (MRPN32, and MedCom's
/// D93A reports built the same way) to lab-result events, MEDVRI:1 and MEDSPE:1 to letter
/// events.
#[derive(Debug, Clone, Copy, Default)]
pub struct EdifactNormaliser;

/// What kind of mapping a message gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    Medlab,
    Medrpt,
    Letter,
}

/// `MEDLAB:1`, `MEDRPT:D:93A:UN:MRPN32`: the UNH message identifier as written.
pub(crate) fn message_identifier(m: &Message<'_>) -> String {
    let h = m.header();
    match h.element(1) {
        Some(el) => {
            let parts: Vec<Cow<'_, str>> = el.components().map(|v| v.text()).collect();
            let mut s = parts.join(":");
            while s.ends_with(':') {
                s.pop();
            }
            s
        }
        None => String::new(),
    }
}

/// Which mapping, if any, applies to a message.
pub(crate) fn mapping_for(m: &Message<'_>) -> Option<Mapping> {
    let ty = m.message_type();
    let version = m.version();
    match (ty.as_ref(), version.as_deref()) {
        ("MEDLAB", Some("1")) => Some(Mapping::Medlab),
        ("MEDVRI" | "MEDSPE", Some("1")) => Some(Mapping::Letter),
        ("MEDRPT", Some("D"))
            if m.release().as_deref() == Some("93A")
                && m.body()
                    .find(|s| s.tag() == "BGM")
                    .is_some_and(|bgm| bgm.text(0, 0).as_deref() == Some("LRP")) =>
        {
            Some(Mapping::Medrpt)
        }
        _ => None,
    }
}

/// Envelope-level facts every mapping needs.
pub(crate) struct Context<'e> {
    pub envelope_id: &'e str,
    pub sender: Option<String>,
    pub receiver: Option<String>,
    /// Four-digit year of the interchange date, to place two-digit years.
    pub reference_year: Option<i32>,
    /// UNB sender id, for lab-local code systems.
    pub sender_id: Option<String>,
    /// UNB interchange control reference (0020).
    pub control_reference: Option<String>,
}

impl Context<'_> {
    /// The header of event number `index` of this interchange, made from message `m`.
    pub(crate) fn header(&self, kind: EventKind, m: &Message<'_>, index: i32) -> EventHeader {
        let mut header = EventHeader::new(kind, self.envelope_id, index, "edifact");
        header.sender.clone_from(&self.sender);
        header.receiver.clone_from(&self.receiver);
        header.source_message_type = Some(message_identifier(m));
        header
            .interchange_reference
            .clone_from(&self.control_reference);
        header.message_reference = Some(m.reference().trim().to_owned()).filter(|r| !r.is_empty());
        header
    }
}

impl<'e> Context<'e> {
    fn new(envelope_id: &'e str, ic: &Interchange<'_>) -> Self {
        let reference_year = ic.prepared().and_then(|(date, _)| {
            let d = date.trim();
            if !d.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            match d.len() {
                8 => d[..4].parse().ok(),
                6 => d[..2]
                    .parse::<i32>()
                    .ok()
                    .map(|yy| if yy < 70 { 2000 + yy } else { 1900 + yy }),
                _ => None,
            }
        });
        let (sender, receiver) = crate::party::interchange(ic);
        Self {
            envelope_id,
            sender,
            receiver,
            reference_year,
            sender_id: ic.sender().map(|s| s.trim().to_owned()),
            control_reference: ic
                .control_reference()
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty()),
        }
    }
}

fn syntax_error(e: &EdifactError) -> NormaliseError {
    NormaliseError::Syntax {
        reason: REASON_SYNTAX,
        format: "edifact",
        position: e.position().map_or_else(
            || format!("byte {}", e.offset().unwrap_or(0)),
            ToString::to_string,
        ),
        what: e.what(),
    }
}

/// Normalises an EDIFACT body that is already in memory (what [`EdifactNormaliser`] does
/// with an envelope's body).
///
/// # Errors
/// `edifact_syntax` with the position when the bytes do not parse or a control count is
/// wrong; `unsupported_message_type` for a message ketenbus does not map; `invalid_bsn` and
/// `missing_element` when a mapped message lacks what its event needs.
pub fn normalise_bytes(envelope_id: &str, body: &[u8]) -> Result<Vec<Event>, NormaliseError> {
    let doc = parse(body).map_err(|e| syntax_error(&e))?;
    normalise_document(envelope_id, &doc)
}

/// [`normalise_bytes`] for a parsed document.
///
/// # Errors
/// As [`normalise_bytes`].
pub fn normalise_document(
    envelope_id: &str,
    doc: &Document<'_>,
) -> Result<Vec<Event>, NormaliseError> {
    // Unsupported types first: a partner's APERAK with a wrong count is still an APERAK.
    for m in doc.messages() {
        if mapping_for(&m).is_none() {
            return Err(NormaliseError::UnsupportedMessageType {
                message_type: message_identifier(&m),
            });
        }
    }
    if let Some(issue) = doc.control_issues().first() {
        return Err(syntax_error(issue));
    }
    let mut events = Vec::with_capacity(doc.messages().len());
    for ic in doc.interchanges() {
        let ctx = Context::new(envelope_id, &ic);
        for m in ic.messages() {
            let index = i32::try_from(events.len()).unwrap_or(i32::MAX);
            let event = match mapping_for(&m) {
                Some(Mapping::Medlab) => Event::LabResult(medlab::lab_event(&m, &ctx, index)?),
                Some(Mapping::Medrpt) => Event::LabResult(medrpt::lab_event(&m, &ctx, index)?),
                Some(Mapping::Letter) => Event::Letter(letter::letter_event(&m, &ctx, index)?),
                None => unreachable!("checked above"),
            };
            events.push(event);
        }
    }
    Ok(events)
}

impl Normalise for EdifactNormaliser {
    fn normalise(&self, envelope: &RawEnvelope) -> Result<Vec<Event>, NormaliseError> {
        normalise_bytes(&envelope.id, &envelope.body)
    }
}

// ---- helpers the mappings share -------------------------------------------------------

/// A path for error texts: `interchange 1, message 1, segment PID #3, element 5`.
pub(crate) fn path(m: &Message<'_>, seg: &Segment<'_>, element: Option<u32>) -> String {
    let mut p: Position = m.locate(*seg);
    p.element = element;
    p.component = None;
    p.to_string()
}

/// Component text, trimmed, `None` when empty.
pub(crate) fn field(seg: &Segment<'_>, e: usize, c: usize) -> Option<String> {
    let t = seg.text(e, c)?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// A telephone number as a zib ContactInformation entry (MEDLAB ZKH).
pub(crate) fn phone(number: String) -> ContactPoint {
    ContactPoint {
        system: Some("phone".to_owned()),
        value: number,
        use_code: None,
        type_code: None,
    }
}

/// `urn:ketenbus:local:<party>`: code system for lab-local codes of one sender.
pub(crate) fn local_system(party: Option<&str>) -> String {
    format!("urn:ketenbus:local:{}", party.unwrap_or("unknown"))
}

/// An identifier from a code list that ketenbus has no URI for.
pub(crate) fn code_list_system(agency: &str, list: &str) -> String {
    let clean = |s: &str| -> String {
        s.trim()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_ascii_lowercase()
    };
    format!("urn:ketenbus:code-list:{}:{}", clean(agency), clean(list))
}

/// A provider or doctor code: eight digits read as AGB (Vektis codes are always eight
/// digits), anything else kept under the sender's local system.
///
/// Doubt: MEDLAB does not say which register its codes come from; eight digits is how an
/// AGB code looks, not proof of one. The raw value is kept either way.
pub(crate) fn provider_code(code: &str, sender: Option<&str>) -> Identifier {
    if code.len() == 8 && code.bytes().all(|b| b.is_ascii_digit()) {
        Identifier {
            system: systems::AGB.to_owned(),
            value: code.to_owned(),
        }
    } else {
        Identifier {
            system: local_system(sender),
            value: code.to_owned(),
        }
    }
}

/// MEDLAB address element: `street:number:PO box:city:postcode`.
pub(crate) fn medlab_address(seg: &Segment<'_>, e: usize) -> Option<Address> {
    let street = field(seg, e, 0);
    let pobox = field(seg, e, 2);
    let a = Address {
        street: street.or_else(|| pobox.map(|p| format!("Postbus {p}"))),
        house_number: field(seg, e, 1),
        postal_code: field(seg, e, 4),
        city: field(seg, e, 3),
        country: None,
    };
    (a != Address::default()).then_some(a)
}

/// `YY`, `MM`, `DD` with a two-digit year placed in the century that puts it at most one
/// year after the interchange date (or 2000-2069 / 1970-1999 without one). Pure: no clock.
pub(crate) fn two_digit_date(
    yy: &str,
    mm: &str,
    dd: &str,
    reference_year: Option<i32>,
) -> Option<String> {
    let y: i32 = yy.trim().parse().ok()?;
    let m: u32 = mm.trim().parse().ok()?;
    let d: u32 = dd.trim().parse().ok()?;
    if yy.trim().len() != 2 || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let year = match reference_year {
        Some(r) => {
            let mut c = r - r.rem_euclid(100) + y;
            if c > r + 1 {
                c -= 100;
            }
            c
        }
        None if y < 70 => 2000 + y,
        None => 1900 + y,
    };
    Some(format!("{year:04}-{m:02}-{d:02}"))
}

/// `HH:MM` appended to a date: `2026-11-01T07:40`.
pub(crate) fn with_time(date: String, hh: Option<&str>, mm: Option<&str>) -> String {
    match (hh.map(str::trim), mm.map(str::trim)) {
        (Some(h), Some(m))
            if h.len() == 2
                && m.len() == 2
                && h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) =>
        {
            format!("{date}T{h}:{m}")
        }
        _ => date,
    }
}

/// `CCYY:MM:DD` components (MEDLAB PID) as an ISO date, possibly partial.
pub(crate) fn ccyy_mm_dd(seg: &Segment<'_>, e: usize) -> Option<String> {
    let y = field(seg, e, 0)?;
    if y.len() != 4 || !y.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |c| field(seg, e, c).and_then(|v| v.parse::<u32>().ok());
    Some(match (num(1), num(2)) {
        (Some(m), Some(d)) if (1..=12).contains(&m) && (1..=31).contains(&d) => {
            format!("{y}-{m:02}-{d:02}")
        }
        (Some(m), _) if (1..=12).contains(&m) => format!("{y}-{m:02}"),
        _ => y,
    })
}

/// An EDIFACT date/time with its format code (102 `CCYYMMDD`, 203 `CCYYMMDDHHMM`,
/// 204 with seconds) as ISO 8601 without zone (the sources give local time).
pub(crate) fn edifact_datetime(value: &str, format: Option<&str>) -> Option<String> {
    let v = value.trim();
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let date = |s: &str| format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..8]);
    match (format.map(str::trim), v.len()) {
        (Some("102") | None, 8) => Some(date(v)),
        (Some("203") | None, 12) => Some(format!("{}T{}:{}", date(v), &v[8..10], &v[10..12])),
        (Some("204") | None, 14) => Some(format!(
            "{}T{}:{}:{}",
            date(v),
            &v[8..10],
            &v[10..12],
            &v[12..14]
        )),
        _ => None,
    }
}

/// A result value split into comparator and decimal (`<0.5`, `>= 10`, `4,0`); `None` for
/// the decimal when the value is not a number.
pub(crate) fn decimal_value(raw: &str) -> (Option<String>, Option<String>) {
    let t = raw.trim();
    let (comparator, rest) = ["<=", ">=", "<", ">"]
        .iter()
        .find_map(|c| t.strip_prefix(c).map(|r| (Some(*c), r.trim_start())))
        .unwrap_or((None, t));
    let (sign, digits) = match rest.as_bytes().first() {
        Some(b'-') => ("-", &rest[1..]),
        Some(b'+') => ("", &rest[1..]),
        _ => ("", rest),
    };
    let (int, frac) = match digits.find(['.', ',']) {
        Some(i) => (&digits[..i], Some(&digits[i + 1..])),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return (None, None);
    }
    let mut value = String::with_capacity(digits.len() + 1);
    value.push_str(sign);
    value.push_str(int);
    if let Some(f) = frac {
        value.push('.');
        value.push_str(f);
    }
    (comparator.map(str::to_owned), Some(value))
}

/// Normality flags from either alphabet (`>`/`<`, `H`/`L`/`N`, `HI`/`LO`, `+`/`-`) as an
/// HL7 ObservationInterpretation code; unknown flags give `None` (the raw one is kept).
pub(crate) fn interpretation(flag: &str) -> Option<String> {
    let code = match flag.trim().to_ascii_uppercase().as_str() {
        ">" | "H" | "HI" | "+" => "H",
        "<" | "L" | "LO" | "-" => "L",
        ">>" | "HH" | "++" => "HH",
        "<<" | "LL" | "--" => "LL",
        "N" | "=" => "N",
        "A" | "*" => "A",
        _ => return None,
    };
    Some(code.to_owned())
}

/// `M`/`V` (MEDLAB), `1`/`2`/`9` (MRPN32 PDI) as FHIR administrative gender.
pub(crate) fn gender(code: &str) -> Option<String> {
    let g = match code.trim().to_ascii_uppercase().as_str() {
        "M" | "1" => "male",
        "V" | "F" | "2" => "female",
        "" => return None,
        "O" => "other",
        _ => "unknown",
    };
    Some(g.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_digit_years_follow_the_interchange_date() {
        assert_eq!(
            two_digit_date("26", "11", "01", Some(2026)).as_deref(),
            Some("2026-11-01")
        );
        assert_eq!(
            two_digit_date("27", "01", "02", Some(2026)).as_deref(),
            Some("2027-01-02")
        );
        assert_eq!(
            two_digit_date("99", "12", "31", Some(2000)).as_deref(),
            Some("1999-12-31")
        );
        assert_eq!(
            two_digit_date("98", "08", "27", None).as_deref(),
            Some("1998-08-27")
        );
        assert_eq!(
            two_digit_date("10", "10", "01", None).as_deref(),
            Some("2010-10-01")
        );
        assert_eq!(two_digit_date("26", "13", "01", None), None);
        assert_eq!(
            with_time("2026-11-01".into(), Some("07"), Some("40")),
            "2026-11-01T07:40"
        );
    }

    #[test]
    fn a_garbled_interchange_date_gives_no_reference_year() {
        // Found by the fuzzer: slicing a non-ASCII date panicked.
        let input = "UNB+UNOA:1+A+B+2\u{d3}\u{ce}101:0815+IC1'UNH+M1+MEDLAB:1'PID+1961:04:09+M'\
DET+26:11:01'UNT+4+M1'UNZ+1+IC1'";
        let events = normalise_bytes("e", input.as_bytes()).unwrap();
        let Event::LabResult(lab) = &events[0] else {
            panic!("lab result expected");
        };
        assert_eq!(lab.specimens[0].collected_at.as_deref(), Some("2026-11-01"));
    }

    #[test]
    fn values_flags_and_dates() {
        assert_eq!(decimal_value("5.9"), (None, Some("5.9".into())));
        assert_eq!(decimal_value("4,0"), (None, Some("4.0".into())));
        assert_eq!(
            decimal_value("< 0.5"),
            (Some("<".into()), Some("0.5".into()))
        );
        assert_eq!(
            decimal_value(">=10"),
            (Some(">=".into()), Some("10".into()))
        );
        assert_eq!(decimal_value("-3"), (None, Some("-3".into())));
        assert_eq!(decimal_value("negatief"), (None, None));
        assert_eq!(decimal_value("1."), (None, None));
        assert_eq!(decimal_value("+7"), (None, Some("7".into())));
        assert_eq!(decimal_value("1.2.3"), (None, None));
        assert_eq!(interpretation(">").as_deref(), Some("H"));
        assert_eq!(interpretation("LO").as_deref(), Some("L"));
        assert_eq!(interpretation("?"), None);
        assert_eq!(
            edifact_datetime("200001161252", Some("203")).as_deref(),
            Some("2000-01-16T12:52")
        );
        assert_eq!(
            edifact_datetime("19991003", Some("102")).as_deref(),
            Some("1999-10-03")
        );
        assert_eq!(edifact_datetime("1999", Some("102")), None);
        assert_eq!(gender("V").as_deref(), Some("female"));
        assert_eq!(gender("9").as_deref(), Some("unknown"));
    }
}
