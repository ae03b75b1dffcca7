//! Party ids (`mailbox:…`, `gln:…`, `ura:…`, `agb:…`, `endpoint:…`) and the senders and
//! receivers a message declares for itself: the UNB of every EDIFACT interchange, every FHIR
//! MessageHeader (also in nested Bundles), and every part of a mail, also of a mail nested in
//! a mail. One place, used by the sender check on every way in and by the normalisers, so
//! what is checked is what the events will say.
//!
//! Reading what a message declares is lenient on purpose: an EDIFACT part is only
//! tokenized (a wrong control count does not hide its UNB), and a mail part that fails to
//! map still declares what its envelope segments or MessageHeaders name.

use std::collections::BTreeSet;

use ketenbus_schemas::Format;

use ketenbus_schemas::event::systems;

use crate::edifact::{Interchange, Segment, tokenize, tokenize_through};
use crate::fhir::inbound::Doc;
use crate::fhir::{self, Object, Value};
use crate::mail::mime;

/// How deep mails nested in mails are read; deeper parts are refused (see [`Declared::opaque`]).
pub const MAX_NESTING: usize = 8;

/// The parties a message names, each set sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Who the message says it is from.
    pub senders: BTreeSet<String>,
    /// Who the message says it is for.
    pub receivers: BTreeSet<String>,
    /// A structured part could not be read far enough to know what it declares (mails nested
    /// deeper than [`MAX_NESTING`]). A checked sender may not post such a message.
    pub opaque: bool,
}

impl Declared {
    fn merge(&mut self, other: Declared) {
        self.senders.extend(other.senders);
        self.receivers.extend(other.receivers);
        self.opaque |= other.opaque;
    }

    /// The one sender the message names, if it names exactly one.
    #[must_use]
    pub fn sender(&self) -> Option<&str> {
        only(&self.senders)
    }

    /// The one receiver the message names, if it names exactly one.
    #[must_use]
    pub fn receiver(&self) -> Option<&str> {
        only(&self.receivers)
    }
}

fn only(set: &BTreeSet<String>) -> Option<&str> {
    match set.len() {
        1 => set.first().map(String::as_str),
        _ => None,
    }
}

/// The party id of UNB element `e` (1 = sender S002, 2 = recipient S003): qualifier 14 is a
/// GS1 location number (`gln:`), anything else a mailbox (ZorgMail and the like).
#[must_use]
pub fn unb(header: &Segment<'_>, e: usize) -> Option<String> {
    let id = header.text(e, 0)?;
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    let scheme = match header.text(e, 1).as_deref().map(str::trim) {
        Some("14") => "gln",
        _ => "mailbox",
    };
    Some(format!("{scheme}:{id}"))
}

/// Sender and recipient of an interchange as its UNB names them, the same ids the events
/// made from it carry in their header.
#[must_use]
pub fn interchange(ic: &Interchange<'_>) -> (Option<String>, Option<String>) {
    match ic.header() {
        Some(h) => (unb(&h, 1), unb(&h, 2)),
        None => (None, None),
    }
}

/// Sender and recipient of the first interchange of an EDIFACT body (see [`interchange`]);
/// none when it does not parse.
#[must_use]
pub fn first_interchange(body: &[u8]) -> (Option<String>, Option<String>) {
    match crate::edifact::parse(body) {
        Ok(doc) => doc
            .interchanges()
            .next()
            .map_or((None, None), |ic| interchange(&ic)),
        Err(_) => (None, None),
    }
}

/// What the UNB segments of an EDIFACT body declare. Bytes that do not tokenize declare
/// nothing: no reader can find a party in them, and the router dead-letters them.
#[must_use]
pub fn edifact(body: &[u8]) -> Declared {
    let mut out = Declared::default();
    if let Ok(tokens) = tokenize(body) {
        for seg in tokens.segments().filter(|s| s.tag() == "UNB") {
            out.senders.extend(unb(&seg, 1));
            out.receivers.extend(unb(&seg, 2));
        }
    }
    out
}

/// The senders and receivers a FHIR resource or Bundle declares: those of every
/// MessageHeader in it, also in Bundles nested in its entries. A document that does not hold
/// together as a Bundle (and so maps to nothing) still declares what its MessageHeaders name
/// by identifier or endpoint, wherever they are in the tree.
#[must_use]
pub fn fhir_tree(root: &Value) -> Declared {
    let mut out = Declared::default();
    if let Some(obj) = root.as_object() {
        declared_into(obj, &mut out);
    }
    out
}

/// `ura:…`, `agb:…` or `uzi:…` for the party a Reference points at.
pub(crate) fn fhir_reference(doc: &Doc<'_>, reference: &Value) -> Option<String> {
    let from_ids = |ids: &[Value]| {
        for (system, scheme) in [
            (systems::URA, "ura"),
            (systems::AGB, "agb"),
            (systems::UZI_SYSTEM, "uzi-sys"),
            (systems::UZI_PERSON, "uzi"),
        ] {
            if let Some(v) = ids
                .iter()
                .filter_map(Value::as_object)
                .find(|i| i.str("system") == Some(system))
                .and_then(|i| i.str("value"))
            {
                return Some(format!("{scheme}:{v}"));
            }
        }
        None
    };
    if let Some(id) = reference.get("identifier").and_then(Value::as_object)
        && let Some(p) = from_ids(std::slice::from_ref(&Value::Object(id.clone())))
    {
        return Some(p);
    }
    let e = doc.resolve(Some(reference))?;
    from_ids(e.res.arr("identifier")).or_else(|| {
        // A PractitionerRole speaks for its organisation.
        let org = doc.resolve(e.res.get("organization"))?;
        from_ids(org.res.arr("identifier"))
    })
}

/// The party a MessageHeader names as its sender: `sender`, else the `source` endpoint.
pub(crate) fn message_header_sender(doc: &Doc<'_>, mh: &Object) -> Option<String> {
    mh.get("sender")
        .and_then(|r| fhir_reference(doc, r))
        .or_else(|| endpoint_party(mh.obj("source")))
}

/// The parties a MessageHeader names as its receivers: each destination's `receiver`, else
/// its endpoint.
pub(crate) fn message_header_receivers<'d>(
    doc: &'d Doc<'_>,
    mh: &'d Object,
) -> impl Iterator<Item = String> + 'd {
    mh.arr("destination")
        .iter()
        .filter_map(Value::as_object)
        .filter_map(move |d| {
            d.get("receiver")
                .and_then(|r| fhir_reference(doc, r))
                .or_else(|| endpoint_party(Some(d)))
        })
}

fn declared_into(obj: &Object, out: &mut Declared) {
    let Ok(doc) = Doc::new(obj) else {
        declared_anywhere(obj, out);
        return;
    };
    for e in &doc.entries {
        match e.ty {
            "MessageHeader" => {
                out.senders.extend(message_header_sender(&doc, e.res));
                out.receivers.extend(message_header_receivers(&doc, e.res));
            }
            "Bundle" => declared_into(e.res, out),
            _ => {}
        }
    }
}

/// Every MessageHeader in a tree, read without resolving references.
fn declared_anywhere(o: &Object, out: &mut Declared) {
    if o.str("resourceType") == Some("MessageHeader") {
        let unresolved = Doc::default();
        out.senders.extend(message_header_sender(&unresolved, o));
        out.receivers
            .extend(message_header_receivers(&unresolved, o));
    }
    for (_, child) in o.iter() {
        match child {
            Value::Object(c) => declared_anywhere(c, out),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_object)
                .for_each(|c| declared_anywhere(c, out)),
            _ => {}
        }
    }
}

fn endpoint_party(o: Option<&Object>) -> Option<String> {
    o.and_then(|o| o.str("endpoint"))
        .map(|e| format!("endpoint:{e}"))
}

/// What a mail declares: every EDIFACT and FHIR part, in mails nested to [`MAX_NESTING`].
#[must_use]
pub fn mail(body: &[u8]) -> Declared {
    mail_at(body, 0)
}

fn mail_at(body: &[u8], depth: usize) -> Declared {
    let mut out = Declared::default();
    let Some(message) = mime::parse_message(body) else {
        return out;
    };
    for part in mime::leaves(&message) {
        match part.route {
            mime::Route::Edifact => out.merge(edifact(part.bytes)),
            mime::Route::FhirJson => out.merge(fhir_bytes(Format::FhirJson, part.bytes)),
            mime::Route::FhirXml => out.merge(fhir_bytes(Format::FhirXml, part.bytes)),
            _ if part.content_type == "message/rfc822" || part.content_type == "message/global" => {
                if depth + 1 >= MAX_NESTING {
                    out.opaque = true;
                } else {
                    out.merge(mail_at(part.bytes, depth + 1));
                }
            }
            _ => {}
        }
    }
    out
}

fn fhir_bytes(format: Format, body: &[u8]) -> Declared {
    fhir::parse(format, body)
        .map(|tree| fhir_tree(&tree))
        .unwrap_or_default()
}

/// The party id of a mail address: `mailbox:<number>` for a hub mailbox whose local part is
/// a number (ZorgMail style `500005678@lms.example`), else `mail:<address>` in lower case.
#[must_use]
pub fn of_mail_address(address: &str) -> Option<String> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (local, domain) = address.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() {
        return None;
    }
    if local.bytes().all(|b| b.is_ascii_digit()) {
        Some(format!("mailbox:{local}"))
    } else {
        Some(format!("mail:{}", address.to_ascii_lowercase()))
    }
}

/// Envelope attribute listing every accepted recipient of a mail, comma-separated (SMTP
/// `RCPT TO`, the `To`/`Cc` of a picked-up mail).
pub const RCPT_ATTRIBUTE: &str = "mail.rcpt_to";

/// Every receiver the transport names for an envelope, in order, each once: its `receiver`
/// and the party of every accepted mail recipient. A subscription filtered on any one of them
/// gets the message.
#[must_use]
pub fn transport_receivers(envelope: &ketenbus_schemas::RawEnvelope) -> Vec<String> {
    let mut out: Vec<String> = envelope.receiver.iter().cloned().collect();
    let listed = envelope
        .attributes
        .get(RCPT_ATTRIBUTE)
        .map(String::as_str)
        .unwrap_or_default();
    for party in listed.split(',').filter_map(of_mail_address) {
        if !out.contains(&party) {
            out.push(party);
        }
    }
    out
}

/// What a message in `format` declares.
#[must_use]
pub fn declared(format: Format, body: &[u8]) -> Declared {
    match format {
        Format::Edifact => edifact(body),
        Format::FhirJson | Format::FhirXml => fhir_bytes(format, body),
        Format::Rfc822 => mail(body),
    }
}

/// Longest id [`source_id`] gives; a longer one is not an id a person would search by.
pub const MAX_SOURCE_ID: usize = 256;

/// The id a message gives itself, the one its sender would quote when asking after it: the
/// interchange control reference of its first UNB (EDIFACT), the id of the MessageHeader of a
/// FHIR message Bundle, else the Bundle's (or resource's) id, a mail's `Message-ID` (without
/// angle brackets). None when the message does not parse that far, or the id is empty or
/// longer than [`MAX_SOURCE_ID`].
#[must_use]
pub fn source_id(format: Format, body: &[u8]) -> Option<String> {
    let id = match format {
        Format::Edifact => {
            // Read up to the first UNB, not the whole interchange.
            let tokens = tokenize_through(body, Some(b"UNB")).ok()?;
            let unb = tokens.segments().find(|s| s.tag() == "UNB")?;
            unb.text(4, 0)?.trim().to_owned()
        }
        Format::FhirJson | Format::FhirXml => {
            let tree = fhir::parse(format, body).ok()?;
            fhir_source_id(tree.as_object()?)?
        }
        Format::Rfc822 => mime::parse_message(body)?.message_id()?.trim().to_owned(),
    };
    (!id.is_empty() && id.len() <= MAX_SOURCE_ID).then_some(id)
}

/// The first entry's MessageHeader id of a message Bundle, else the root's id.
fn fhir_source_id(root: &Object) -> Option<String> {
    let header = root
        .arr("entry")
        .first()
        .and_then(Value::as_object)
        .and_then(|e| e.obj("resource"))
        .filter(|r| r.str("resourceType") == Some("MessageHeader"))
        .and_then(|r| r.str("id"));
    header.or_else(|| root.str("id")).map(str::to_owned)
}

/// Why a message may not be taken from a sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    /// The message names a sender that is not one of the authenticated party's.
    #[error("the message's sender {party} is not a party of the authenticated sender {who}")]
    Foreign {
        /// The foreign party id (an id, never patient data).
        party: String,
        /// Name of the authenticated sender or login.
        who: String,
    },
    /// The message nests mails deeper than ketenbus reads, so its senders are unknown.
    #[error(
        "the message nests mails deeper than {MAX_NESTING} levels; its senders cannot be checked"
    )]
    Opaque,
}

/// Check what a message declares against the parties `who` may send as, and name the
/// envelope's sender: the declared one (there is then exactly one set, all `who`'s own),
/// else `who`'s first party.
///
/// # Errors
/// [`SenderError::Foreign`] naming the first declared party that is not in `allowed`;
/// [`SenderError::Opaque`] when the message cannot be read far enough to know.
pub fn check_sender(
    declared: &Declared,
    who: &str,
    allowed: &[String],
) -> Result<Option<String>, SenderError> {
    if declared.opaque {
        return Err(SenderError::Opaque);
    }
    if let Some(other) = declared.senders.iter().find(|d| !allowed.contains(d)) {
        return Err(SenderError::Foreign {
            party: other.clone(),
            who: who.to_owned(),
        });
    }
    Ok(declared
        .senders
        .first()
        .cloned()
        .or_else(|| allowed.first().cloned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn source_ids_are_what_each_message_calls_itself() {
        let edi = include_bytes!("../testdata/edifact/ketenbus/medlab-invalid-bsn.edi");
        assert_eq!(source_id(Format::Edifact, edi).as_deref(), Some("IC0400"));
        let bundle = include_bytes!("../testdata/fhir/ketenbus/class10-referral.json");
        assert_eq!(
            source_id(Format::FhirJson, bundle).as_deref(),
            Some("mh-class10"),
            "a message Bundle goes by its MessageHeader"
        );
        assert_eq!(
            source_id(
                Format::FhirJson,
                br#"{"resourceType":"Bundle","id":"b1","type":"collection"}"#
            )
            .as_deref(),
            Some("b1")
        );
        let mail = include_bytes!("../testdata/mail/lab-result-edifact-attachment.eml");
        assert_eq!(
            source_id(Format::Rfc822, mail).as_deref(),
            Some("lab-IC0042@lms.example.test")
        );
        assert_eq!(source_id(Format::Edifact, b"not edifact"), None);
        // Only the start is read: what goes wrong after the UNB does not hide its id, after
        // a UNA as well.
        assert_eq!(
            source_id(
                Format::Edifact,
                b"UNA:+.? 'UNB+UNOA:1+A+B+261101:0815+IC0401'UNH+M+MEDLAB:1'BEP?"
            )
            .as_deref(),
            Some("IC0401")
        );
        assert_eq!(source_id(Format::FhirJson, b"{"), None);
        let long = format!(
            "UNB+UNOA:1+1+2+261101:0815+{}'",
            "X".repeat(MAX_SOURCE_ID + 1)
        );
        assert_eq!(source_id(Format::Edifact, long.as_bytes()), None);
    }

    #[test]
    fn party_ids_of_mail_addresses() {
        assert_eq!(
            of_mail_address("500005678@lms.example.test").as_deref(),
            Some("mailbox:500005678")
        );
        assert_eq!(
            of_mail_address("<Lab@Example.test>").as_deref(),
            Some("mail:lab@example.test")
        );
        assert_eq!(of_mail_address(""), None);
        assert_eq!(of_mail_address("nodomain"), None);
    }

    #[test]
    fn every_unb_counts_also_with_a_wrong_control_count() {
        let two = b"UNB+UNOA:1+500001234+500005678+261101:0815+IC1'UNZ+7+IC1'\
                    UNB+UNOA:1+8712345678906:14+500009999+261101:0815+IC2'UNZ+0+IC2'";
        let d = edifact(two);
        assert_eq!(d.senders, set(&["gln:8712345678906", "mailbox:500001234"]));
        assert_eq!(
            d.receivers,
            set(&["mailbox:500005678", "mailbox:500009999"])
        );
    }

    fn mail_with(part_type: &str, part: &str) -> String {
        format!(
            "From: a@example.test\r\nTo: b@example.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
             Content-Type: text/plain\r\n\r\nsee attachment\r\n--b1\r\n\
             Content-Type: {part_type}\r\n\r\n{part}\r\n--b1--\r\n"
        )
    }

    #[test]
    fn a_mail_declares_what_its_parts_and_nested_mails_declare() {
        let edi = "UNB+UNOA:1+500009999+500005678+261101:0815+IC1'UNZ+0+IC1'";
        let flat = mail_with("application/EDIFACT", edi);
        assert_eq!(mail(flat.as_bytes()).senders, set(&["mailbox:500009999"]));
        let nested = mail_with("message/rfc822", &flat);
        assert_eq!(mail(nested.as_bytes()).senders, set(&["mailbox:500009999"]));
        let mut deep = flat;
        for _ in 0..MAX_NESTING {
            deep = mail_with("message/rfc822", &deep);
        }
        let d = mail(deep.as_bytes());
        assert!(d.opaque);
        assert_eq!(check_sender(&d, "lab", &[]), Err(SenderError::Opaque));
    }

    #[test]
    fn the_envelope_sender_is_the_declared_one_or_the_first_allowed() {
        let allowed = vec!["mailbox:1".to_owned(), "mailbox:2".to_owned()];
        let none = Declared::default();
        assert_eq!(
            check_sender(&none, "lab", &allowed).unwrap().as_deref(),
            Some("mailbox:1")
        );
        let own = Declared {
            senders: set(&["mailbox:2"]),
            ..Declared::default()
        };
        assert_eq!(
            check_sender(&own, "lab", &allowed).unwrap().as_deref(),
            Some("mailbox:2")
        );
        let foreign = Declared {
            senders: set(&["mailbox:2", "mailbox:3"]),
            ..Declared::default()
        };
        let e = check_sender(&foreign, "lab", &allowed).unwrap_err();
        assert!(e.to_string().contains("mailbox:3"), "{e}");
    }

    proptest::proptest! {
        /// Whatever a client posts, in whatever format, reading what it declares does not panic.
        #[test]
        fn any_bytes_declare_without_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            f in 0usize..4,
        ) {
            let format = [Format::Edifact, Format::FhirJson, Format::FhirXml, Format::Rfc822][f];
            let _ = declared(format, &body);
        }

        #[test]
        fn unb_parties_are_read_as_the_normaliser_names_them(
            id in "[0-9]{6,13}",
            gln in proptest::prelude::any::<bool>(),
        ) {
            let q = if gln { ":14" } else { "" };
            let msg = format!("UNB+UNOA:1+{id}{q}+500005678+261101:0815+IC1'UNZ+0+IC1'");
            let scheme = if gln { "gln" } else { "mailbox" };
            proptest::prop_assert_eq!(edifact(msg.as_bytes()).senders, set(&[&format!("{scheme}:{id}")]));
        }
    }
}
