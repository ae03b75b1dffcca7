//! FHIR in: nl-core resources into ketenbus events, as a pure function, one module per
//! kind of event:
//!
//! - `lab`: Observations of category `laboratory` (nl-core-LaboratoryTestResult) with their
//!   Specimen, Patient, Organization and PractitionerRole -> one lab-result event per patient;
//! - `handover`: an Acute Zorg referral (ServiceRequest SNOMED 11131000146102, or the focus
//!   of a message with a Composition) with its Composition sections and DocumentReference
//!   attachments -> an acute-handover event;
//! - `task`: a `Task` (eOverdracht notify-then-pull) -> a handover notification without
//!   patient data.
//!
//! A single resource, or a Bundle of type message, transaction, batch, collection or
//! document. References resolve by `fullUrl` or by `Type/id` within the Bundle. This module
//! holds the document index (`Doc`) and the readers of the resources every kind shares
//! (Patient, Organization, Practitioner(Role), names, addresses, identifiers); the parties a
//! MessageHeader names are read in [`crate::party`].

use std::collections::HashMap;

use base64::Engine as _;
use ketenbus_schemas::event::{
    Address, Coding, Contact, ContactPoint, HealthProfessional, HealthcareProvider, HumanName,
    Identifier, Patient, systems,
};
use ketenbus_schemas::{Event, EventHeader, EventKind, RawEnvelope};

use super::FhirError;
use super::value::{Object, Value};
use crate::{Normalise, NormaliseError, party, zib};

mod dates;
mod handover;
mod lab;
mod task;

pub use handover::narrative_text;
pub(crate) use lab::{EXT_REPLACES, URI};

/// Reason code: not well-formed FHIR.
pub const REASON_SYNTAX: &str = "fhir_syntax";
pub use crate::contract::normalise::{REASON_INVALID_BSN, REASON_MISSING};
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
/// Older system URLs read as [`OBSERVATION_CATEGORY`] (STU3).
pub const OBSERVATION_CATEGORY_OLDER: [&str; 1] = ["http://hl7.org/fhir/observation-category"];
/// Older system URLs read as [`V3_INTERPRETATION`]: STU3's v3 URL and HL7 v2 table 0078
/// (abnormal flags), whose codes H, L, N, A, HH, LL are the same.
pub const V3_INTERPRETATION_OLDER: [&str; 4] = [
    "http://hl7.org/fhir/v3/ObservationInterpretation",
    "http://hl7.org/fhir/v2/0078",
    "http://terminology.hl7.org/CodeSystem/v2-0078",
    "http://terminology.hl7.org/ValueSet/v2-0078",
];

pub(crate) const EXT_OWN_PREFIX: &str =
    "http://hl7.org/fhir/StructureDefinition/humanname-own-prefix";
pub(crate) const EXT_OWN_NAME: &str = "http://hl7.org/fhir/StructureDefinition/humanname-own-name";
pub(crate) const EXT_PARTNER_PREFIX: &str =
    "http://hl7.org/fhir/StructureDefinition/humanname-partner-prefix";
pub(crate) const EXT_PARTNER_NAME: &str =
    "http://hl7.org/fhir/StructureDefinition/humanname-partner-name";
pub(crate) const EXT_QUALIFIER: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier";
/// nl-core's extension giving a coded meaning to a primitive (here `ContactPoint.system`).
pub(crate) const EXT_CODE_SPECIFICATION: &str =
    "http://nictiz.nl/fhir/StructureDefinition/ext-CodeSpecification";
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
pub struct FhirNormaliser;

impl Normalise for FhirNormaliser {
    fn normalise(&self, envelope: &RawEnvelope) -> Result<Vec<Event>, NormaliseError> {
        let format = envelope.format.as_str();
        let root = super::parse(envelope.format, &envelope.body).map_err(|e| syntax(&e, format))?;
        events_from(&root, &envelope.id, format)
    }

    /// The decoded `data` of every attachment in the message (DocumentReference content),
    /// which the events refer to by SHA-256. Undecodable data is left out: `normalise`
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

fn syntax(e: &FhirError, format: &'static str) -> NormaliseError {
    let (position, what) = match e {
        FhirError::Syntax { position, what } => (position.clone(), what.clone()),
        FhirError::Write { path, what } => (path.clone(), what.clone()),
    };
    NormaliseError::Syntax {
        reason: REASON_SYNTAX,
        format,
        position,
        what,
    }
}

/// One resource of the document, with where it sits.
pub(crate) struct Entry<'a> {
    /// Element path of the resource (`Bundle.entry[3].resource`).
    pub(crate) path: String,
    pub(crate) full_url: Option<&'a str>,
    pub(crate) res: &'a Object,
    pub(crate) ty: &'a str,
    pub(crate) id: Option<&'a str>,
    /// A contained resource, referenced as `#id`.
    pub(crate) contained: bool,
}

/// The resources contained in `container`, as entries after it.
fn push_with_contained<'a>(
    entries: &mut Vec<Entry<'a>>,
    container: Entry<'a>,
) -> Result<(), NormaliseError> {
    let res = container.res;
    let path = container.path.clone();
    entries.push(container);
    for (k, c) in res.arr("contained").iter().enumerate() {
        let Some(c) = c.as_object() else { continue };
        let cpath = format!("{path}.contained[{k}]");
        let ty = c.str("resourceType").ok_or_else(|| {
            NormaliseError::missing(
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
pub(crate) struct Doc<'a> {
    pub(crate) entries: Vec<Entry<'a>>,
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
    pub(crate) fn new(root: &'a Object) -> Result<Doc<'a>, NormaliseError> {
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
            .ok_or_else(|| NormaliseError::missing("Bundle.type".into(), "Bundle without type"))?;
        let mut entries = Vec::new();
        for (i, e) in root.arr("entry").iter().enumerate() {
            let Some(res) = e.get("resource").and_then(Value::as_object) else {
                continue;
            };
            let path = format!("Bundle.entry[{i}].resource");
            let ty = res.str("resourceType").ok_or_else(|| {
                NormaliseError::missing(
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
                    return Err(NormaliseError::missing(
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
    pub(crate) fn resolve(&self, reference: Option<&Value>) -> Option<&Entry<'a>> {
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
/// [`NormaliseError::Invalid`] naming the element path (`invalid_bsn`, `missing_element`,
/// `invalid_element`); [`NormaliseError::UnsupportedMessageType`] when nothing in it maps.
pub fn events_from(
    root: &Value,
    envelope_id: &str,
    source_format: &str,
) -> Result<Vec<Event>, NormaliseError> {
    let root = root
        .as_object()
        .ok_or_else(|| NormaliseError::missing("document".into(), "not a FHIR resource"))?;
    dates::check(root)?;
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
        h.interchange_reference = root.obj("identifier").and_then(|i| s(i, "value"));
        if let Some(mh) = doc.message_header() {
            h.sender = party::message_header_sender(&doc, mh.res);
            h.receiver = party::message_header_receivers(&doc, mh.res).next();
            h.message_reference = mh.id.map(str::to_owned);
        }
        h
    };

    // Acute handovers: the referral ServiceRequests. With one referral, the document's
    // Compositions and attachments are its own; with several, each takes only those it
    // points at (else the events grow with the square of the document).
    let referrals = handover::referrals(&doc);
    let only_referral = referrals.len() == 1;
    for sr in referrals {
        let mut header = next_header(EventKind::AcuteHandover, &events);
        let e = handover::handover(&doc, sr, only_referral, &mut header)?;
        events.push(Event::AcuteHandover(e));
    }

    // Lab results, one event per patient.
    let groups = lab::by_patient(&doc);
    let only_group = groups.len() == 1;
    let reports = lab::reports(&doc);
    for observations in groups {
        let mut header = next_header(EventKind::LabResult, &events);
        let e = lab::lab_event(&doc, &observations, only_group, &reports, &mut header)?;
        events.push(Event::LabResult(e));
    }

    // Notify-then-pull Tasks.
    for task in doc.of_type("Task") {
        let header = next_header(EventKind::HandoverNotification, &events);
        let e = task::notification(&doc, task, header)?;
        events.push(Event::HandoverNotification(e));
    }

    if events.is_empty() {
        if let Some(obs) = doc.of_type("Observation").next() {
            return Err(lab::not_lab(obs));
        }
        return Err(NormaliseError::UnsupportedMessageType {
            message_type: doc.message_type,
        });
    }
    Ok(events)
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

/// Extension `url` among `exts`.
fn ext_object<'v>(exts: &'v [Value], url: &str) -> Option<&'v Object> {
    exts.iter()
        .filter_map(Value::as_object)
        .find(|e| e.str("url") == Some(url))
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

fn identifiers(o: &Object, path: &str) -> Result<Vec<Identifier>, NormaliseError> {
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

pub(crate) fn human_name(o: &Object) -> HumanName {
    let fam_ext = o
        .obj("_family")
        .map(|f| f.arr("extension"))
        .unwrap_or_default();
    let own = ext_value(fam_ext, EXT_OWN_NAME);
    let mut given = Vec::new();
    let mut initials = Vec::new();
    let mut call = Vec::new();
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
            Some("CL") => call.push(g),
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
        call_name: join(call, " "),
    }
}

/// The official name, else the first that is not a call name; with the call name
/// (nl-core-NameInformation.GivenName: a name with `use = usual`) when there is one.
fn pick_name(o: &Object) -> Option<HumanName> {
    let names: Vec<&Object> = o.arr("name").iter().filter_map(Value::as_object).collect();
    let usual = names.iter().find(|n| n.str("use") == Some("usual"));
    let mut name = names
        .iter()
        .find(|n| n.str("use") == Some("official"))
        .or_else(|| names.iter().find(|n| n.str("use") != Some("usual")))
        .or_else(|| names.first())
        .map(|n| human_name(n))?;
    if name.call_name.is_none()
        && let Some(u) = usual
    {
        let given: Vec<&str> = u.arr("given").iter().filter_map(Value::as_str).collect();
        name.call_name = (!given.is_empty()).then(|| given.join(" "));
    }
    Some(name)
}

/// `telecom` of a resource or element: zib ContactInformation.
pub(crate) fn telecom(o: &Object) -> Vec<ContactPoint> {
    o.arr("telecom")
        .iter()
        .filter_map(Value::as_object)
        .filter_map(|t| {
            Some(ContactPoint {
                system: s(t, "system"),
                value: s(t, "value")?,
                use_code: s(t, "use"),
                type_code: t
                    .obj("_system")
                    .map(|x| x.arr("extension"))
                    .and_then(|x| ext_object(x, EXT_CODE_SPECIFICATION))
                    .and_then(|e| codings(e.obj("valueCodeableConcept")).next()),
            })
        })
        .collect()
}

/// Every coding of every CodeableConcept in array `key`.
fn all_codings(o: &Object, key: &str) -> Vec<Coding> {
    o.arr(key)
        .iter()
        .flat_map(|c| codings(c.as_object()).collect::<Vec<_>>())
        .collect()
}

/// `Patient.contact`: zib ContactPerson.
fn contacts(o: &Object) -> Vec<Contact> {
    o.arr("contact")
        .iter()
        .filter_map(Value::as_object)
        .map(|c| Contact {
            relationships: all_codings(c, "relationship"),
            name: c.obj("name").map(human_name),
            telecom: telecom(c),
            address: c.obj("address").map(address),
        })
        .collect()
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

fn patient(e: &Entry<'_>) -> Result<Patient, NormaliseError> {
    Ok(Patient {
        identifiers: identifiers(e.res, &e.path)?,
        name: pick_name(e.res),
        birth_date: s(e.res, "birthDate"),
        gender: s(e.res, "gender"),
        address: first_address(e.res),
        telecom: telecom(e.res),
        marital_status: codings(e.res.obj("maritalStatus")).next(),
        contacts: contacts(e.res),
    })
}

/// The patient a Reference points at; a logical reference by BSN also counts.
fn patient_of(
    doc: &Doc<'_>,
    reference: Option<&Value>,
    path: &str,
) -> Result<Option<Patient>, NormaliseError> {
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

fn provider(e: &Entry<'_>) -> Result<HealthcareProvider, NormaliseError> {
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
        organization_types: all_codings(e.res, "type"),
        telecom: telecom(e.res),
    })
}

fn provider_of(
    doc: &Doc<'_>,
    reference: Option<&Value>,
) -> Result<Option<HealthcareProvider>, NormaliseError> {
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
) -> Result<Option<HealthProfessional>, NormaliseError> {
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
) -> Result<HealthProfessional, NormaliseError> {
    let mut p = HealthProfessional {
        role: Some(role.to_owned()),
        ..HealthProfessional::default()
    };
    match e.ty {
        "PractitionerRole" => {
            p.identifiers = identifiers(e.res, &e.path)?;
            p.telecom = telecom(e.res);
            if let Some(pr) = doc.resolve(e.res.get("practitioner")) {
                p.identifiers.extend(identifiers(pr.res, &pr.path)?);
                p.name = pick_name(pr.res);
                // Practitioner.telecom often repeats the role's: each number once (a set,
                // so the cost stays linear however many numbers there are).
                let key =
                    |t: &ContactPoint| (t.system.clone(), t.value.clone(), t.use_code.clone());
                let mut seen: std::collections::HashSet<_> = p.telecom.iter().map(key).collect();
                for t in telecom(pr.res) {
                    if seen.insert(key(&t)) {
                        p.telecom.push(t);
                    }
                }
            } else if let Some(d) = e.res.obj("practitioner").and_then(|r| r.str("display")) {
                p.name = Some(zib::text_name(d));
            }
            // zib HealthProfessionalRole; a text equal to `role` is ketenbus's own marker of
            // what the professional is to the event (see `emit`), not the zib role.
            let codes: Vec<&Object> = e
                .res
                .arr("code")
                .iter()
                .filter_map(Value::as_object)
                .collect();
            p.role_code = codes.iter().find_map(|c| codings(Some(c)).next());
            p.role_display = codes
                .iter()
                .filter_map(|c| c.str("text"))
                .find(|t| *t != role)
                .map(str::to_owned);
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
            p.telecom = telecom(e.res);
        }
        _ => {}
    }
    Ok(p)
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
