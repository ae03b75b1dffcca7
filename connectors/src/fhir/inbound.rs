//! FHIR in: nl-core resources into ketenbus events, as a pure function.
//!
//! - Observations of category `laboratory` (nl-core-LaboratoryTestResult) with their
//!   Specimen, Patient, Organization and PractitionerRole -> one lab-result event per patient;
//! - an Acute Zorg referral (ServiceRequest SNOMED 11131000146102, or the focus of a message
//!   with a Composition) with its Composition sections and DocumentReference attachments
//!   -> an acute-handover event;
//! - a `Task` (eOverdracht notify-then-pull) -> a handover notification without patient data.
//!
//! A single resource, or a Bundle of type message, transaction, batch, collection or
//! document. References resolve by `fullUrl` or by `Type/id` within the Bundle.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use ketenbus_schemas::event::{
    AcuteHandoverEvent, Address, Attachment, Coding, HandoverNotificationEvent, HealthProfessional,
    HealthcareProvider, HumanName, Identifier, LabResultEvent, LabTestResult, Patient, Referral,
    Section, Specimen, systems,
};
use ketenbus_schemas::{Event, EventHeader, EventKind, RawEnvelope};
use sha2::{Digest, Sha256};

use super::FhirError;
use super::value::{Object, Value};
use crate::{Normalize, NormalizeError, zib};

/// Reason code: not well-formed FHIR.
pub const REASON_SYNTAX: &str = "fhir_syntax";
pub use crate::contract::normalize::{REASON_INVALID_BSN, REASON_MISSING};
/// Reason code: an element is present but unusable (bad base64, wrong JSON type).
pub const REASON_INVALID: &str = "invalid_element";

/// SNOMED CT: transfer of care from ambulance (Acute Zorg message 24).
pub const SCT_TRANSFER_FROM_AMBULANCE: &str = "11131000146102";
/// Extension holding MEDLAB's IDE reference number; also the identifier system ketenbus
/// uses for it on a specimen (as the EDIFACT normaliser does).
pub const EXT_EDIFACT_REFERENCE: &str = crate::zib::EDIFACT_REFERENCE_NUMBER;
/// Observation category code system.
pub const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
/// HL7 v3 ObservationInterpretation.
pub const V3_INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";

pub(crate) const EXT_OWN_PREFIX: &str =
    "http://hl7.org/fhir/StructureDefinition/humanname-own-prefix";
pub(crate) const EXT_OWN_NAME: &str = "http://hl7.org/fhir/StructureDefinition/humanname-own-name";
pub(crate) const EXT_PARTNER_PREFIX: &str =
    "http://hl7.org/fhir/StructureDefinition/humanname-partner-prefix";
pub(crate) const EXT_PARTNER_NAME: &str =
    "http://hl7.org/fhir/StructureDefinition/humanname-partner-name";
pub(crate) const EXT_QUALIFIER: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier";
pub(crate) const EXT_STREET: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-streetName";
pub(crate) const EXT_HOUSE_NUMBER: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-houseNumber";

/// zib result flags (SNOMED) and the HL7 interpretation codes they mean.
pub(crate) const SNOMED_FLAGS: [(&str, &str, &str); 3] = [
    ("281302008", "H", "Boven referentiebereik"),
    ("281300000", "L", "Onder referentiebereik"),
    ("263654008", "A", "Abnormaal"),
];

/// The FHIR normaliser for `fhir_json` and `fhir_xml` envelopes.
#[derive(Debug, Clone, Copy, Default)]
pub struct FhirNormalizer;

impl Normalize for FhirNormalizer {
    fn normalize(&self, envelope: &RawEnvelope) -> Result<Vec<Event>, NormalizeError> {
        let format = envelope.format.as_str();
        let root = super::parse(envelope.format, &envelope.body).map_err(|e| syntax(&e, format))?;
        events_from(&root, &envelope.id, format)
    }

    /// The decoded `data` of every attachment in the message (DocumentReference content),
    /// which the events refer to by SHA-256. Undecodable data is left out: `normalize`
    /// rejects that message anyway.
    fn content(&self, envelope: &RawEnvelope) -> Vec<Vec<u8>> {
        let Ok(root) = super::parse(envelope.format, &envelope.body) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        inline_attachment_data(&root, &mut out);
        out
    }
}

/// Every `attachment.data` below `v`, decoded.
fn inline_attachment_data(v: &Value, out: &mut Vec<Vec<u8>>) {
    match v {
        Value::Object(o) => {
            if let Some(data) = o.obj("attachment").and_then(|a| a.str("data"))
                && let Ok(bytes) = base64::engine::general_purpose::STANDARD
                    .decode(data.split_whitespace().collect::<String>())
            {
                out.push(bytes);
            }
            for (_, child) in o.iter() {
                inline_attachment_data(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| inline_attachment_data(i, out)),
        _ => {}
    }
}

fn syntax(e: &FhirError, format: &'static str) -> NormalizeError {
    let (position, what) = match e {
        FhirError::Syntax { position, what } => (position.clone(), what.clone()),
        FhirError::Write { path, what } => (path.clone(), what.clone()),
    };
    NormalizeError::Syntax {
        reason: REASON_SYNTAX,
        format,
        position,
        what,
    }
}

/// One resource of the document, with where it sits.
struct Entry<'a> {
    /// Element path of the resource (`Bundle.entry[3].resource`).
    path: String,
    full_url: Option<&'a str>,
    res: &'a Object,
    ty: &'a str,
    id: Option<&'a str>,
    /// A contained resource, referenced as `#id`.
    contained: bool,
}

/// The resources contained in `container`, as entries after it.
fn push_with_contained<'a>(
    entries: &mut Vec<Entry<'a>>,
    container: Entry<'a>,
) -> Result<(), NormalizeError> {
    let res = container.res;
    let path = container.path.clone();
    entries.push(container);
    for (k, c) in res.arr("contained").iter().enumerate() {
        let Some(c) = c.as_object() else { continue };
        let cpath = format!("{path}.contained[{k}]");
        let ty = c.str("resourceType").ok_or_else(|| {
            NormalizeError::missing(
                format!("{cpath}.resourceType"),
                "resource without resourceType",
            )
        })?;
        entries.push(Entry {
            path: cpath,
            full_url: None,
            res: c,
            ty,
            id: c.str("id"),
            contained: true,
        });
    }
    Ok(())
}

/// The resources of one FHIR document, indexed so that resolving a reference or listing
/// a type costs the same however large the document (parse cost stays linear).
#[derive(Default)]
struct Doc<'a> {
    entries: Vec<Entry<'a>>,
    /// Contained resources by id (the first one wins, as a scan would find it).
    by_local_id: HashMap<&'a str, usize>,
    /// Entries by `fullUrl`.
    by_full_url: HashMap<&'a str, usize>,
    /// Entries (not contained) by type and id.
    by_type_id: HashMap<(&'a str, &'a str), usize>,
    /// Entries by type, in document order.
    by_type: HashMap<&'a str, Vec<usize>>,
    /// `Bundle.message`, `Bundle.transaction`, `Observation`, ...
    message_type: String,
    /// Index of the MessageHeader of a message Bundle.
    header: Option<usize>,
    timestamp: Option<&'a str>,
}

impl<'a> Doc<'a> {
    fn new(root: &'a Object) -> Result<Doc<'a>, NormalizeError> {
        let ty = root.str("resourceType").unwrap_or_default();
        if ty != "Bundle" {
            let entry = Entry {
                path: ty.to_owned(),
                full_url: None,
                res: root,
                ty,
                id: root.str("id"),
                contained: false,
            };
            let mut entries = Vec::new();
            push_with_contained(&mut entries, entry)?;
            return Ok(Doc::indexed(entries, ty.to_owned(), None, None));
        }
        let bundle_type = root
            .str("type")
            .ok_or_else(|| NormalizeError::missing("Bundle.type".into(), "Bundle without type"))?;
        let mut entries = Vec::new();
        for (i, e) in root.arr("entry").iter().enumerate() {
            let Some(res) = e.get("resource").and_then(Value::as_object) else {
                continue;
            };
            let path = format!("Bundle.entry[{i}].resource");
            let ty = res.str("resourceType").ok_or_else(|| {
                NormalizeError::missing(
                    format!("{path}.resourceType"),
                    "resource without resourceType",
                )
            })?;
            let entry = Entry {
                path,
                full_url: e.get("fullUrl").and_then(Value::as_str),
                res,
                ty,
                id: res.str("id"),
                contained: false,
            };
            push_with_contained(&mut entries, entry)?;
        }
        let header = if bundle_type == "message" {
            match entries.first() {
                Some(e) if e.ty == "MessageHeader" => Some(0),
                _ => {
                    return Err(NormalizeError::missing(
                        "Bundle.entry[0].resource".into(),
                        "a message Bundle starts with a MessageHeader",
                    ));
                }
            }
        } else {
            None
        };
        let mut message_type = format!("Bundle.{bundle_type}");
        if let Some(code) = header
            .and_then(|h| entries[h].res.obj("eventCoding"))
            .and_then(|c| c.str("code"))
        {
            message_type = format!("{message_type}:{code}");
        }
        Ok(Doc::indexed(
            entries,
            message_type,
            header,
            root.str("timestamp"),
        ))
    }

    fn indexed(
        entries: Vec<Entry<'a>>,
        message_type: String,
        header: Option<usize>,
        timestamp: Option<&'a str>,
    ) -> Doc<'a> {
        let mut doc = Doc {
            by_local_id: HashMap::new(),
            by_full_url: HashMap::new(),
            by_type_id: HashMap::new(),
            by_type: HashMap::new(),
            entries: Vec::new(),
            message_type,
            header,
            timestamp,
        };
        for (i, e) in entries.iter().enumerate() {
            doc.by_type.entry(e.ty).or_default().push(i);
            if let Some(u) = e.full_url {
                doc.by_full_url.entry(u).or_insert(i);
            }
            match (e.contained, e.id) {
                (true, Some(id)) => {
                    doc.by_local_id.entry(id).or_insert(i);
                }
                (false, Some(id)) => {
                    doc.by_type_id.entry((e.ty, id)).or_insert(i);
                }
                _ => {}
            }
        }
        doc.entries = entries;
        doc
    }

    /// The entry a Reference points at.
    fn resolve(&self, reference: Option<&Value>) -> Option<&Entry<'a>> {
        let r = reference?.get("reference")?.as_str()?;
        if let Some(local) = r.strip_prefix('#') {
            return self.by_local_id.get(local).map(|&i| &self.entries[i]);
        }
        if let Some(&i) = self.by_full_url.get(r) {
            return Some(&self.entries[i]);
        }
        let r = r.split("/_history/").next().unwrap_or(r);
        let mut parts = r.rsplit('/');
        let id = parts.next()?;
        let ty = parts.next()?;
        self.by_type_id.get(&(ty, id)).map(|&i| &self.entries[i])
    }

    fn of_type(&self, ty: &str) -> impl Iterator<Item = &Entry<'a>> + '_ {
        self.by_type
            .get(ty)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|&i| &self.entries[i])
    }

    fn message_header(&self) -> Option<&Entry<'a>> {
        self.header.map(|h| &self.entries[h])
    }
}

/// The events a parsed FHIR resource or Bundle maps to.
///
/// # Errors
/// [`NormalizeError::Invalid`] naming the element path (`invalid_bsn`, `missing_element`,
/// `invalid_element`); [`NormalizeError::UnsupportedMessageType`] when nothing in it maps.
pub fn events_from(
    root: &Value,
    envelope_id: &str,
    source_format: &str,
) -> Result<Vec<Event>, NormalizeError> {
    let root = root
        .as_object()
        .ok_or_else(|| NormalizeError::missing("document".into(), "not a FHIR resource"))?;
    let doc = Doc::new(root)?;
    // Every BSN in the message passes the eleven-test, mapped or not.
    for p in doc.of_type("Patient") {
        identifiers(p.res, &p.path)?;
    }
    let mut events = Vec::new();
    let next_header = |kind: EventKind, events: &Vec<Event>| {
        let mut h = EventHeader::new(
            kind,
            envelope_id,
            i32::try_from(events.len()).unwrap_or(i32::MAX),
            source_format,
        );
        h.source_message_type = Some(doc.message_type.clone());
        if let Some(mh) = doc.message_header() {
            h.sender = header_sender(&doc, mh.res);
            h.receiver = header_receivers(&doc, mh.res).next();
        }
        h
    };

    // Acute handovers: the referral ServiceRequests.
    let focus: HashSet<&str> = doc
        .message_header()
        .map(|mh| {
            mh.res
                .arr("focus")
                .iter()
                .filter_map(|f| doc.resolve(Some(f)))
                .map(|e| e.path.as_str())
                .collect()
        })
        .unwrap_or_default();
    let has_composition = doc.of_type("Composition").next().is_some();
    let referrals: Vec<&Entry<'_>> = doc
        .of_type("ServiceRequest")
        .filter(|sr| {
            let transfer = codings(sr.res.obj("code"))
                .any(|c| c.system == systems::SNOMED && c.code == SCT_TRANSFER_FROM_AMBULANCE);
            transfer || (has_composition && focus.contains(sr.path.as_str()))
        })
        .collect();
    // With one referral, the document's Compositions and attachments are its own; with
    // several, each takes only those it points at (else the events grow with the square of
    // the document).
    let only_referral = referrals.len() == 1;
    for sr in referrals {
        let mut header = next_header(EventKind::AcuteHandover, &events);
        let e = handover(&doc, sr, only_referral, &mut header)?;
        events.push(Event::AcuteHandover(e));
    }

    // Lab results, one event per patient.
    let mut groups: Vec<Vec<&Entry<'_>>> = Vec::new();
    let mut group_of: HashMap<Option<String>, usize> = HashMap::new();
    for obs in doc.of_type("Observation").filter(|e| is_lab(e.res)) {
        let key = obs.res.get("subject").and_then(|s| {
            doc.resolve(Some(s)).map(|e| e.path.clone()).or_else(|| {
                s.get("reference")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
        });
        match group_of.get(&key) {
            Some(&g) => groups[g].push(obs),
            None => {
                group_of.insert(key, groups.len());
                groups.push(vec![obs]);
            }
        }
    }
    let only_group = groups.len() == 1;
    for observations in groups {
        let mut header = next_header(EventKind::LabResult, &events);
        let e = lab_event(&doc, &observations, only_group, &mut header)?;
        events.push(Event::LabResult(e));
    }

    // Notify-then-pull Tasks.
    for task in doc.of_type("Task") {
        let header = next_header(EventKind::HandoverNotification, &events);
        events.push(Event::HandoverNotification(notification(
            &doc, task, header,
        )?));
    }

    if events.is_empty() {
        return Err(NormalizeError::UnsupportedMessageType {
            message_type: doc.message_type,
        });
    }
    Ok(events)
}

fn is_lab(o: &Object) -> bool {
    let profiled = o.obj("meta").is_some_and(|m| {
        m.arr("profile").iter().any(|p| {
            p.as_str()
                .is_some_and(|p| p.ends_with("/nl-core-LaboratoryTestResult"))
        })
    });
    profiled
        || o.arr("category").iter().any(|c| {
            codings(c.as_object())
                .any(|c| c.system == OBSERVATION_CATEGORY && c.code == "laboratory")
        })
}

/// The codings of a CodeableConcept that have both system and code.
fn codings(cc: Option<&Object>) -> impl Iterator<Item = Coding> + '_ {
    cc.map(|c| c.arr("coding"))
        .unwrap_or_default()
        .iter()
        .filter_map(|c| {
            let c = c.as_object()?;
            Some(Coding {
                system: c.str("system")?.to_owned(),
                code: c.str("code")?.to_owned(),
                display: c.str("display").map(str::to_owned),
            })
        })
}

fn s(o: &Object, key: &str) -> Option<String> {
    o.str(key).map(str::to_owned)
}

/// The value of extension `url` among `exts`, as text.
fn ext_value<'v>(exts: &'v [Value], url: &str) -> Option<&'v str> {
    exts.iter()
        .filter_map(Value::as_object)
        .find(|e| e.str("url") == Some(url))
        .and_then(|e| {
            e.iter()
                .find(|(k, _)| k.starts_with("value"))
                .and_then(|(_, v)| v.as_literal())
        })
}

fn identifiers(o: &Object, path: &str) -> Result<Vec<Identifier>, NormalizeError> {
    let mut out = Vec::new();
    for (k, id) in o.arr("identifier").iter().enumerate() {
        let Some(id) = id.as_object() else { continue };
        let (Some(system), Some(value)) = (id.str("system"), id.str("value")) else {
            continue;
        };
        if system == systems::BSN && !zib::bsn_is_valid(value) {
            return Err(zib::invalid_bsn(format!("{path}.identifier[{k}]")));
        }
        out.push(Identifier {
            system: system.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(out)
}

/// `ura:…`, `agb:…` or `uzi:…` for the party a Reference points at.
fn party(doc: &Doc<'_>, reference: &Value) -> Option<String> {
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
fn header_sender(doc: &Doc<'_>, mh: &Object) -> Option<String> {
    mh.get("sender")
        .and_then(|r| party(doc, r))
        .or_else(|| endpoint_party(mh.obj("source")))
}

/// The parties a MessageHeader names as its receivers: each destination's `receiver`, else
/// its endpoint.
fn header_receivers<'d>(doc: &'d Doc<'_>, mh: &'d Object) -> impl Iterator<Item = String> + 'd {
    mh.arr("destination")
        .iter()
        .filter_map(Value::as_object)
        .filter_map(move |d| {
            d.get("receiver")
                .and_then(|r| party(doc, r))
                .or_else(|| endpoint_party(Some(d)))
        })
}

/// The senders and receivers a FHIR resource or Bundle declares: those of every
/// MessageHeader in it, also in Bundles nested in its entries. A document that does not hold
/// together as a Bundle (and so maps to nothing) still declares what its MessageHeaders name
/// by identifier or endpoint, wherever they are in the tree.
#[must_use]
pub fn declared(root: &Value) -> crate::party::Declared {
    let mut out = crate::party::Declared::default();
    if let Some(obj) = root.as_object() {
        declared_into(obj, &mut out);
    }
    out
}

fn declared_into(obj: &Object, out: &mut crate::party::Declared) {
    let Ok(doc) = Doc::new(obj) else {
        declared_anywhere(obj, out);
        return;
    };
    for e in &doc.entries {
        match e.ty {
            "MessageHeader" => {
                out.senders.extend(header_sender(&doc, e.res));
                out.receivers.extend(header_receivers(&doc, e.res));
            }
            "Bundle" => declared_into(e.res, out),
            _ => {}
        }
    }
}

/// Every MessageHeader in a tree, read without resolving references.
fn declared_anywhere(o: &Object, out: &mut crate::party::Declared) {
    if o.str("resourceType") == Some("MessageHeader") {
        let unresolved = Doc::default();
        out.senders.extend(header_sender(&unresolved, o));
        out.receivers.extend(header_receivers(&unresolved, o));
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

pub(crate) fn human_name(o: &Object) -> HumanName {
    let fam_ext = o
        .obj("_family")
        .map(|f| f.arr("extension"))
        .unwrap_or_default();
    let own = ext_value(fam_ext, EXT_OWN_NAME);
    let mut given = Vec::new();
    let mut initials = Vec::new();
    let twins = o.arr("_given");
    for (i, g) in o.arr("given").iter().enumerate() {
        let Some(g) = g.as_str() else { continue };
        let q = twins
            .get(i)
            .and_then(|t| t.get("extension"))
            .and_then(Value::as_array)
            .and_then(|x| ext_value(x, EXT_QUALIFIER));
        match q {
            Some("IN") => initials.push(g),
            Some("CL") => {}
            _ => given.push(g),
        }
    }
    let join = |v: Vec<&str>, sep: &str| (!v.is_empty()).then(|| v.join(sep));
    HumanName {
        given: join(given, " "),
        initials: join(initials, ""),
        family_prefix: ext_value(fam_ext, EXT_OWN_PREFIX).map(str::to_owned),
        family: own.or_else(|| o.str("family")).map(str::to_owned),
        partner_prefix: ext_value(fam_ext, EXT_PARTNER_PREFIX).map(str::to_owned),
        partner_family: ext_value(fam_ext, EXT_PARTNER_NAME).map(str::to_owned),
        text: s(o, "text"),
    }
}

/// The official name, else the first that is not a call name.
fn pick_name(o: &Object) -> Option<HumanName> {
    let names: Vec<&Object> = o.arr("name").iter().filter_map(Value::as_object).collect();
    names
        .iter()
        .find(|n| n.str("use") == Some("official"))
        .or_else(|| names.iter().find(|n| n.str("use") != Some("usual")))
        .or_else(|| names.first())
        .map(|n| human_name(n))
}

pub(crate) fn address(o: &Object) -> Address {
    let line = o.arr("line").first().and_then(Value::as_str);
    let exts = o
        .arr("_line")
        .first()
        .and_then(|l| l.get("extension"))
        .and_then(Value::as_array)
        .unwrap_or_default();
    let street = ext_value(exts, EXT_STREET);
    Address {
        street: street.or(line).map(str::to_owned),
        house_number: ext_value(exts, EXT_HOUSE_NUMBER).map(str::to_owned),
        postal_code: s(o, "postalCode"),
        city: s(o, "city"),
        country: s(o, "country"),
    }
}

fn first_address(o: &Object) -> Option<Address> {
    let all: Vec<&Object> = o
        .arr("address")
        .iter()
        .filter_map(Value::as_object)
        .collect();
    all.iter()
        .find(|a| a.str("use") == Some("home"))
        .or_else(|| all.first())
        .map(|a| address(a))
}

fn patient(e: &Entry<'_>) -> Result<Patient, NormalizeError> {
    Ok(Patient {
        identifiers: identifiers(e.res, &e.path)?,
        name: pick_name(e.res),
        birth_date: s(e.res, "birthDate"),
        gender: s(e.res, "gender"),
        address: first_address(e.res),
    })
}

/// The patient a Reference points at; a logical reference by BSN also counts.
fn patient_of(
    doc: &Doc<'_>,
    reference: Option<&Value>,
    path: &str,
) -> Result<Option<Patient>, NormalizeError> {
    if let Some(e) = doc.resolve(reference).filter(|e| e.ty == "Patient") {
        return patient(e).map(Some);
    }
    let Some(id) = reference
        .and_then(|r| r.get("identifier"))
        .and_then(Value::as_object)
    else {
        return Ok(None);
    };
    let wrapper = Object::new().with("identifier", Value::Array(vec![Value::Object(id.clone())]));
    let ids = identifiers(&wrapper, path)?;
    Ok((!ids.is_empty()).then(|| Patient {
        identifiers: ids,
        ..Patient::default()
    }))
}

fn provider(e: &Entry<'_>) -> Result<HealthcareProvider, NormalizeError> {
    let phone = e
        .res
        .arr("telecom")
        .iter()
        .filter_map(Value::as_object)
        .find(|t| t.str("system") == Some("phone"))
        .and_then(|t| s(t, "value"));
    Ok(HealthcareProvider {
        identifiers: identifiers(e.res, &e.path)?,
        name: s(e.res, "name"),
        department: None,
        address: e
            .res
            .arr("address")
            .first()
            .and_then(Value::as_object)
            .map(address),
        phone,
    })
}

fn provider_of(
    doc: &Doc<'_>,
    reference: Option<&Value>,
) -> Result<Option<HealthcareProvider>, NormalizeError> {
    match doc.resolve(reference) {
        Some(e) if e.ty == "Organization" => provider(e).map(Some),
        Some(e) if e.ty == "PractitionerRole" => provider_of(doc, e.res.get("organization")),
        Some(_) => Ok(None),
        None => Ok(reference
            .and_then(|r| r.get("display"))
            .and_then(Value::as_str)
            .map(|d| HealthcareProvider {
                name: Some(d.to_owned()),
                ..HealthcareProvider::default()
            })),
    }
}

/// A PractitionerRole or Practitioner as a zib HealthProfessional.
fn professional_of(
    doc: &Doc<'_>,
    reference: Option<&Value>,
    role: &str,
) -> Result<Option<HealthProfessional>, NormalizeError> {
    let Some(e) = doc.resolve(reference) else {
        let display = reference
            .and_then(|r| r.get("display"))
            .and_then(Value::as_str);
        return Ok(display.map(|d| HealthProfessional {
            name: Some(zib::text_name(d)),
            role: Some(role.to_owned()),
            ..HealthProfessional::default()
        }));
    };
    professional(doc, e, role).map(Some)
}

fn professional(
    doc: &Doc<'_>,
    e: &Entry<'_>,
    role: &str,
) -> Result<HealthProfessional, NormalizeError> {
    let mut p = HealthProfessional {
        role: Some(role.to_owned()),
        ..HealthProfessional::default()
    };
    match e.ty {
        "PractitionerRole" => {
            p.identifiers = identifiers(e.res, &e.path)?;
            if let Some(pr) = doc.resolve(e.res.get("practitioner")) {
                p.identifiers.extend(identifiers(pr.res, &pr.path)?);
                p.name = pick_name(pr.res);
            } else if let Some(d) = e.res.obj("practitioner").and_then(|r| r.str("display")) {
                p.name = Some(zib::text_name(d));
            }
            p.specialty = e
                .res
                .arr("specialty")
                .first()
                .and_then(|c| codings(c.as_object()).next());
            p.organization_name = match doc.resolve(e.res.get("organization")) {
                Some(org) => s(org.res, "name"),
                None => e.res.obj("organization").and_then(|r| s(r, "display")),
            };
        }
        "Practitioner" => {
            p.identifiers = identifiers(e.res, &e.path)?;
            p.name = pick_name(e.res);
        }
        _ => {}
    }
    Ok(p)
}

fn quantity_text(q: &Object) -> Option<String> {
    let v = q.get("value")?.as_literal()?;
    Some(match q.str("unit").or_else(|| q.str("code")) {
        Some(u) => format!("{v} {u}"),
        None => v.to_owned(),
    })
}

fn specimen(e: &Entry<'_>, fallback_id: String) -> Result<Specimen, NormalizeError> {
    let mut ids = identifiers(e.res, &e.path)?;
    if let Some(acc) = e.res.obj("accessionIdentifier")
        && let (Some(system), Some(value)) = (acc.str("system"), acc.str("value"))
    {
        ids.push(Identifier {
            system: system.to_owned(),
            value: value.to_owned(),
        });
    }
    let collection = e.res.obj("collection");
    Ok(Specimen {
        id: e.id.map_or(fallback_id, str::to_owned),
        identifiers: ids,
        material: codings(e.res.obj("type")).next(),
        volume: collection
            .and_then(|c| c.obj("quantity"))
            .and_then(quantity_text),
        collected_at: collection.and_then(|c| {
            s(c, "collectedDateTime")
                .or_else(|| c.obj("collectedPeriod").and_then(|p| s(p, "start")))
        }),
        received_at: s(e.res, "receivedTime"),
    })
}

/// One patient's lab results. `only_group`: the document has no other patient's results, so
/// every PractitionerRole in it (department, copy-to) belongs to this event; with several
/// patients, only those the observations point at (else events grow with the square of the
/// document).
fn lab_event(
    doc: &Doc<'_>,
    observations: &[&Entry<'_>],
    only_group: bool,
    header: &mut EventHeader,
) -> Result<LabResultEvent, NormalizeError> {
    let first = observations[0];
    let patient = patient_of(
        doc,
        first.res.get("subject"),
        &format!("{}.subject", first.path),
    )?;
    let mut performer = None;
    let mut requester = None;
    let mut specimens: Vec<Specimen> = Vec::new();
    let mut specimen_at: HashMap<String, usize> = HashMap::new();
    let mut results = Vec::new();
    // PractitionerRoles acting as requester, and those the observations point at.
    let mut requesters: HashSet<&str> = HashSet::new();
    let mut referenced: Vec<&Entry<'_>> = Vec::new();
    let mut referenced_paths: HashSet<&str> = HashSet::new();
    for (n, obs) in observations.iter().enumerate() {
        let o = obs.res;
        for p in o.arr("performer") {
            let target = doc.resolve(Some(p));
            if let Some(e) = target.filter(|e| e.ty == "PractitionerRole")
                && referenced_paths.insert(e.path.as_str())
            {
                referenced.push(e);
            }
            match target.map(|e| e.ty) {
                Some("Organization") if performer.is_none() => {
                    performer = provider_of(doc, Some(p))?
                }
                _ => {}
            }
        }
        for b in o.arr("basedOn") {
            if let Some(r) = doc
                .resolve(Some(b))
                .and_then(|sr| doc.resolve(sr.res.get("requester")))
            {
                requesters.insert(r.path.as_str());
            }
        }
        if requester.is_none() {
            for b in o.arr("basedOn") {
                if let Some(sr) = doc.resolve(Some(b)).filter(|e| e.ty == "ServiceRequest") {
                    requester = professional_of(doc, sr.res.get("requester"), "requester")?;
                }
            }
        }
        // Specimen: resolved when in the document, else known by the id it is referenced by.
        let mut specimen_id = None;
        if let Some(r) = o.get("specimen") {
            if let Some(e) = doc.resolve(Some(r)).filter(|e| e.ty == "Specimen") {
                let sp = specimen(e, format!("specimen-{}", specimens.len() + 1))?;
                specimen_id = Some(sp.id.clone());
                if !specimen_at.contains_key(&sp.id) {
                    specimen_at.insert(sp.id.clone(), specimens.len());
                    specimens.push(sp);
                }
            } else {
                specimen_id = r
                    .get("reference")
                    .and_then(Value::as_str)
                    .map(|r| r.rsplit('/').next().unwrap_or(r).to_owned());
            }
        }
        if let Some(number) = ext_value(o.arr("extension"), EXT_EDIFACT_REFERENCE) {
            let id = specimen_id
                .clone()
                .unwrap_or_else(|| format!("specimen-{}", specimens.len() + 1));
            let at = *specimen_at.entry(id.clone()).or_insert_with(|| {
                specimens.push(Specimen {
                    id: id.clone(),
                    ..Specimen::default()
                });
                specimens.len() - 1
            });
            let sp = &mut specimens[at];
            if !sp
                .identifiers
                .iter()
                .any(|i| i.system == EXT_EDIFACT_REFERENCE)
            {
                sp.identifiers.push(Identifier {
                    system: EXT_EDIFACT_REFERENCE.to_owned(),
                    value: number.to_owned(),
                });
            }
            specimen_id = Some(id);
        }
        results.push(lab_result(obs, n, specimen_id)?);
    }
    // PractitionerRoles not acting as requester: department, copy-to (role in code.text).
    let mut professionals = Vec::new();
    let roles: Vec<&Entry<'_>> = if only_group {
        doc.of_type("PractitionerRole").collect()
    } else {
        referenced
    };
    for pr in roles {
        if requesters.contains(pr.path.as_str()) {
            continue;
        }
        let role = pr
            .res
            .arr("code")
            .first()
            .and_then(|c| c.get("text"))
            .and_then(Value::as_str);
        professionals.push(professional(doc, pr, role.unwrap_or("professional"))?);
    }
    header.occurred_at = results
        .iter()
        .find_map(|r| r.effective_at.clone())
        .or_else(|| doc.timestamp.map(str::to_owned));
    Ok(LabResultEvent {
        header: header.clone(),
        patient,
        performer,
        requester,
        professionals,
        specimens,
        results,
        comments: Vec::new(),
    })
}

fn lab_result(
    e: &Entry<'_>,
    n: usize,
    specimen_id: Option<String>,
) -> Result<LabTestResult, NormalizeError> {
    let o = e.res;
    let code = o.obj("code");
    let mut codes: Vec<Coding> = codings(code).collect();
    if codes.is_empty() {
        return Err(NormalizeError::missing(
            format!("{}.code.coding", e.path),
            "lab result without a coded test",
        ));
    }
    let primary = codes
        .iter()
        .position(|c| c.system == systems::NHG_45)
        .or_else(|| codes.iter().position(|c| c.system == systems::LOINC))
        .unwrap_or(0);
    let test = codes.remove(primary);
    let local_code = codes
        .iter()
        .chain(std::iter::once(&test))
        .find(|c| c.system.starts_with("urn:ketenbus:local:"))
        .map(|c| c.code.clone());
    let status = o.str("status").ok_or_else(|| {
        NormalizeError::missing(format!("{}.status", e.path), "lab result without status")
    })?;

    let id =
        e.id.map_or_else(|| format!("result-{}", n + 1), str::to_owned);
    let mut r = LabTestResult {
        other_codes: codes,
        local_code,
        local_name: code.and_then(|c| s(c, "text")),
        specimen_id,
        effective_at: s(o, "effectiveDateTime")
            .or_else(|| s(o, "effectiveInstant"))
            .or_else(|| o.obj("effectivePeriod").and_then(|p| s(p, "start"))),
        comments: o
            .arr("note")
            .iter()
            .filter_map(|n| n.get("text"))
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        ..LabTestResult::new(id, test, status)
    };
    if let Some(q) = o.obj("valueQuantity") {
        let v = q.get("value").ok_or_else(|| {
            NormalizeError::missing(
                format!("{}.valueQuantity.value", e.path),
                "quantity without value",
            )
        })?;
        let v = v.as_literal().ok_or_else(|| NormalizeError::Invalid {
            reason: REASON_INVALID,
            path: format!("{}.valueQuantity.value", e.path),
            what: "value is not a decimal".into(),
        })?;
        r.value_decimal = Some(v.to_owned());
        r.comparator = s(q, "comparator");
        r.unit = s(q, "unit").or_else(|| s(q, "code"));
        r.unit_system = s(q, "system");
    } else if let Some(v) = o.str("valueString") {
        r.value_text = Some(v.to_owned());
    } else if let Some(v) = o.get("valueInteger").and_then(Value::as_literal) {
        r.value_decimal = Some(v.to_owned());
    } else if let Some(cc) = o.obj("valueCodeableConcept") {
        r.value_coding = codings(Some(cc)).next();
        r.value_text = s(cc, "text");
    } else if let Some(b) = o.get("valueBoolean") {
        r.value_text = Some(
            if matches!(b, Value::Bool(true)) {
                "true"
            } else {
                "false"
            }
            .to_owned(),
        );
    }
    if let Some(rr) = o.arr("referenceRange").first().and_then(Value::as_object) {
        r.reference_low = rr
            .obj("low")
            .and_then(|q| q.get("value"))
            .and_then(Value::as_literal)
            .map(str::to_owned);
        r.reference_high = rr
            .obj("high")
            .and_then(|q| q.get("value"))
            .and_then(Value::as_literal)
            .map(str::to_owned);
        r.reference_text = s(rr, "text");
    }
    if let Some(interp) = o.arr("interpretation").first().and_then(Value::as_object) {
        let cs: Vec<Coding> = codings(Some(interp)).collect();
        r.interpretation_raw = cs.first().map(|c| c.code.clone());
        r.interpretation = cs
            .iter()
            .find(|c| c.system == V3_INTERPRETATION)
            .map(|c| c.code.clone())
            .or_else(|| {
                cs.iter().find_map(|c| {
                    SNOMED_FLAGS
                        .iter()
                        .find(|(sct, _, _)| c.system == systems::SNOMED && c.code == *sct)
                        .map(|(_, v3, _)| (*v3).to_owned())
                })
            });
    }
    // The section is the category that is not the generic `laboratory` one.
    if let Some(c) = o
        .arr("category")
        .iter()
        .filter_map(Value::as_object)
        .find(|c| !codings(Some(c)).any(|x| x.system == OBSERVATION_CATEGORY))
    {
        r.section_code = codings(Some(c)).next();
        r.section = s(c, "text").or_else(|| {
            r.section_code
                .as_ref()
                .map(|x| x.display.clone().unwrap_or_else(|| x.code.clone()))
        });
    }
    Ok(r)
}

/// Plain text of an XHTML narrative: tags dropped, entities decoded, spaces collapsed.
#[must_use]
pub fn narrative_text(div: &str) -> String {
    let mut out = String::with_capacity(div.len());
    let mut rest = div;
    while let Some(i) = rest.find(['<', '&']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if rest.starts_with('<') {
            let end = rest.find('>').map_or(rest.len(), |e| e + 1);
            // Block ends read as a space.
            out.push(' ');
            rest = &rest[end..];
        } else {
            // Entities are short: look no further than 10 bytes (a scan to the next `;` for
            // every `&` would cost the square of a text full of them).
            let end = rest.bytes().take(11).position(|b| b == b';');
            let Some(end) = end else {
                out.push('&');
                rest = &rest[1..];
                continue;
            };
            let ent = &rest[1..end];
            let ch = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ if ent.starts_with("#x") => u32::from_str_radix(&ent[2..], 16)
                    .ok()
                    .and_then(char::from_u32),
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            match ch {
                Some(c) => out.push(c),
                None => out.push_str(&rest[..=end]),
            }
            rest = &rest[end + 1..];
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One referral. `only_referral`: the document holds no other, so its Compositions and
/// attachments belong to this one even when the referral does not point at them.
fn handover(
    doc: &Doc<'_>,
    sr: &Entry<'_>,
    only_referral: bool,
    header: &mut EventHeader,
) -> Result<AcuteHandoverEvent, NormalizeError> {
    let o = sr.res;
    let code = codings(o.obj("code")).next().ok_or_else(|| {
        NormalizeError::missing(
            format!("{}.code.coding", sr.path),
            "referral without a coded request",
        )
    })?;
    let referral = Referral {
        id: sr.id.map(str::to_owned),
        code,
        status: s(o, "status"),
        priority: s(o, "priority"),
        authored_on: s(o, "authoredOn"),
        reason: o
            .arr("reasonCode")
            .first()
            .and_then(Value::as_object)
            .and_then(|c| s(c, "text").or_else(|| codings(Some(c)).next().and_then(|x| x.display))),
    };
    let patient = patient_of(doc, o.get("subject"), &format!("{}.subject", sr.path))?;
    let requester_ref = o.get("requester");
    let (requester, mut requester_organization) = match doc.resolve(requester_ref).map(|e| e.ty) {
        Some("Organization") => (None, provider_of(doc, requester_ref)?),
        _ => (professional_of(doc, requester_ref, "requester")?, None),
    };
    if requester_organization.is_none()
        && let Some(e) = doc
            .resolve(requester_ref)
            .filter(|e| e.ty == "PractitionerRole")
    {
        requester_organization = provider_of(doc, e.res.get("organization"))?;
    }
    if requester_organization.is_none() {
        requester_organization = match doc.message_header() {
            Some(mh) => provider_of(doc, mh.res.get("sender"))?,
            None => None,
        };
    }
    let mut receiver_organization = provider_of(doc, o.arr("performer").first())?;
    if receiver_organization.is_none()
        && let Some(mh) = doc.message_header()
    {
        let dest = mh
            .res
            .arr("destination")
            .first()
            .and_then(|d| d.get("receiver"));
        receiver_organization = provider_of(doc, dest)?;
    }

    // Composition and attachments: those the referral points at, else all in the document.
    let supporting: Vec<&Entry<'_>> = o
        .arr("supportingInfo")
        .iter()
        .filter_map(|r| doc.resolve(Some(r)))
        .collect();
    let pick = |ty: &'static str| -> Vec<&Entry<'_>> {
        let linked: Vec<&Entry<'_>> = supporting.iter().copied().filter(|e| e.ty == ty).collect();
        if linked.is_empty() && only_referral {
            doc.of_type(ty).collect()
        } else {
            linked
        }
    };
    let mut sections = Vec::new();
    for comp in pick("Composition") {
        for sec in comp.res.arr("section").iter().filter_map(Value::as_object) {
            sections.push(Section {
                code: codings(sec.obj("code")).next(),
                title: s(sec, "title"),
                text: sec
                    .obj("text")
                    .and_then(|t| t.str("div"))
                    .map(narrative_text),
            });
        }
    }
    let mut attachments = Vec::new();
    for dr in pick("DocumentReference") {
        for (k, c) in dr.res.arr("content").iter().enumerate() {
            let Some(a) = c.get("attachment").and_then(Value::as_object) else {
                continue;
            };
            let Some(data) = a.str("data") else {
                // A pointer into ketenbus's content store names a document that did not come
                // with this message: whoever knows a hash would get another party's document.
                if a.str("url")
                    .is_some_and(|u| u.starts_with(super::emit::CONTENT_URN))
                {
                    return Err(NormalizeError::Invalid {
                        reason: REASON_INVALID,
                        path: format!("{}.content[{k}].attachment.url", dr.path),
                        what: "a content reference to a document that did not come with this message; send the document as attachment.data".into(),
                    });
                }
                continue;
            };
            let path = format!("{}.content[{k}].attachment.data", dr.path);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.split_whitespace().collect::<String>())
                .map_err(|_| NormalizeError::Invalid {
                    reason: REASON_INVALID,
                    path: path.clone(),
                    what: "attachment data is not base64".into(),
                })?;
            attachments.push(Attachment {
                content_type: s(a, "contentType").ok_or_else(|| {
                    NormalizeError::missing(
                        format!("{}.content[{k}].attachment.contentType", dr.path),
                        "attachment without contentType",
                    )
                })?,
                title: s(a, "title"),
                sha256: hex::encode(Sha256::digest(&bytes)),
                size: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            });
        }
    }
    header.occurred_at = referral
        .authored_on
        .clone()
        .or_else(|| doc.timestamp.map(str::to_owned));
    Ok(AcuteHandoverEvent {
        header: header.clone(),
        patient,
        referral,
        requester,
        requester_organization,
        receiver_organization,
        sections,
        attachments,
    })
}

fn notification(
    doc: &Doc<'_>,
    task: &Entry<'_>,
    mut header: EventHeader,
) -> Result<HandoverNotificationEvent, NormalizeError> {
    let o = task.res;
    let status = o.str("status").ok_or_else(|| {
        NormalizeError::missing(format!("{}.status", task.path), "Task without status")
    })?;
    let source = doc
        .message_header()
        .and_then(|mh| mh.res.obj("source"))
        .and_then(|s| s.str("endpoint"));
    let absolute = task
        .full_url
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"));
    let task_reference = match (absolute, source, task.id) {
        (Some(u), _, _) => u.to_owned(),
        (None, Some(base), Some(id)) => format!("{}/Task/{id}", base.trim_end_matches('/')),
        (None, None, Some(id)) => format!("Task/{id}"),
        _ => {
            return Err(NormalizeError::missing(
                format!("{}.id", task.path),
                "Task without id or absolute fullUrl",
            ));
        }
    };
    let sender_endpoint = source.map(str::to_owned).or_else(|| {
        task_reference
            .find("/Task/")
            .filter(|_| absolute.is_some())
            .map(|i| task_reference[..i].to_owned())
    });
    header.occurred_at = s(o, "lastModified")
        .or_else(|| s(o, "authoredOn"))
        .or_else(|| doc.timestamp.map(str::to_owned));
    Ok(HandoverNotificationEvent {
        header,
        task_reference,
        task_status: status.to_owned(),
        sender_endpoint,
        requester: o.get("requester").and_then(|r| party(doc, r)),
        owner: o.get("owner").and_then(|r| party(doc, r)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrative_text_drops_markup() {
        assert_eq!(
            narrative_text("<div xmlns=\"x\"><p>a &amp; b</p>\n <p>c&#233;</p></div>"),
            "a & b cé"
        );
    }
}
