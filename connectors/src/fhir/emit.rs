//! FHIR out: events into nl-core resources in a transaction or message Bundle, the inverse
//! of [`super::inbound`]: what that mapping reads from a resource, this one writes back in
//! the same place (codes, values, units, ranges, identifiers, dates, names).
//!
//! Pure and deterministic: resource ids and `urn:uuid` full URLs derive from the event id,
//! so delivering the same event twice writes the same resources (transaction entries are
//! `PUT Type/id`; the patient is a conditional update on the BSN when there is one).

use ketenbus_schemas::Event;
use ketenbus_schemas::codec::{CodecError, read_as};
use ketenbus_schemas::event::{
    AcuteHandoverEvent, Address, Attachment, Coding, Contact, ContactPoint, EventHeader, EventKind,
    HandoverNotificationEvent, HealthProfessional, HealthcareProvider, HumanName, Identifier,
    LabResultEvent, LabTestResult, LetterEvent, Patient, Specimen, systems,
};
use serde::de::IgnoredAny;
use sha2::{Digest, Sha256};

use super::FhirError;
use super::inbound::{
    EXT_CODE_SPECIFICATION, EXT_EDIFACT_REFERENCE, EXT_HOUSE_NUMBER, EXT_OWN_NAME, EXT_OWN_PREFIX,
    EXT_PARTNER_NAME, EXT_PARTNER_PREFIX, EXT_QUALIFIER, EXT_STREET, OBSERVATION_CATEGORY,
    SCT_TRANSFER_FROM_AMBULANCE, SNOMED_FLAGS, V3_INTERPRETATION,
};
use super::inbound::{EXT_REPLACES, URI};
use super::value::{Object, Value};

const NL_CORE: &str = "http://nictiz.nl/fhir/StructureDefinition/";
/// Message event of Acute Zorg message 24 (ambulance -> GP post referral).
const HG_MESSAGE_EVENT: &str = "http://nictiz.nl/fhir/CodeSystem/hg-message-event";
/// Message events for what has no Nictiz event code: the ketenbus event kind.
pub const KETENBUS_EVENT: &str = "urn:ketenbus:event-kind";
/// `Bundle.identifier.system` for the control reference of the interchange the event
/// came in (EDIFACT UNB 0020, or the source Bundle's identifier).
pub const INTERCHANGE_REFERENCE: &str = "urn:ketenbus:interchange-reference";
/// Where ketenbus points at an attachment it keeps by content hash.
pub const CONTENT_URN: &str = "urn:ketenbus:content:sha256:";

/// Transaction (`PUT` per resource) or message (`MessageHeader` first); in config
/// `"transaction"` or `"message"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleStyle {
    /// A `transaction` Bundle for a FHIR server.
    #[default]
    Transaction,
    /// A `message` Bundle for `$process-message`.
    Message,
}

/// How to write the Bundle.
#[derive(Debug, Clone, Default)]
pub struct EmitOptions {
    /// Transaction or message.
    pub style: BundleStyle,
    /// `MessageHeader.source.endpoint`: ketenbus's own FHIR base.
    pub source_endpoint: Option<String>,
    /// `MessageHeader.destination.endpoint`: the subscriber's FHIR base.
    pub destination_endpoint: Option<String>,
}

/// The Bundle an event is delivered as.
///
/// # Errors
/// [`FhirError::Write`] for events without a FHIR form (letters, for now).
pub fn to_bundle(event: &Event, opts: &EmitOptions) -> Result<Value, FhirError> {
    let (b, focus) = build(event, opts)?;
    Ok(b.finish(event, &focus))
}

/// The builder with every resource of `event` added, and the focus.
fn build<'a>(
    event: &Event,
    opts: &'a EmitOptions,
) -> Result<(Builder<'a>, Vec<String>), FhirError> {
    let mut b = Builder::new(&event.header().id, opts);
    let focus = match event {
        Event::LabResult(e) => lab(&mut b, e),
        Event::AcuteHandover(e) => handover(&mut b, e),
        Event::HandoverNotification(e) => notification(&mut b, e),
        Event::Letter(_) => {
            return Err(FhirError::Write {
                path: "event".into(),
                what: "letter events have no FHIR mapping yet".into(),
            });
        }
    };
    Ok((b, focus))
}

/// What of an event decides which resources it has: its header, whether each optional part
/// is there and how many there are of each repeated one. [`EventShape::from_avro`] reads it
/// from the log without building the parts (a lab result's fifty results are walked over), so
/// an index can afford it for every event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventShape {
    /// The event's header.
    pub header: EventHeader,
    parts: Parts,
}

#[derive(Debug, Clone, PartialEq)]
enum Parts {
    Lab {
        patient: bool,
        performer: bool,
        performing_lab: bool,
        requester: bool,
        order: bool,
        professionals: usize,
        specimens: usize,
        results: usize,
        report: bool,
    },
    Handover {
        patient: bool,
        requester_organization: bool,
        receiver_organization: bool,
        requester: bool,
        sections: bool,
        other_author: bool,
        attachments: usize,
    },
    Notification {
        task_reference: String,
    },
    Letter,
}

/// The parts of a lab result [`EventShape`] looks at; the others are walked over.
#[derive(serde::Deserialize)]
struct LabParts {
    header: EventHeader,
    patient: Option<IgnoredAny>,
    performer: Option<IgnoredAny>,
    requester: Option<IgnoredAny>,
    professionals: Vec<IgnoredAny>,
    specimens: Vec<IgnoredAny>,
    results: Vec<IgnoredAny>,
    #[serde(default)]
    report_identifiers: Vec<IgnoredAny>,
    #[serde(default)]
    reported_at: Option<IgnoredAny>,
    #[serde(default)]
    order_identifiers: Vec<IgnoredAny>,
    #[serde(default)]
    performing_lab: Option<IgnoredAny>,
}

/// The parts of a handover [`EventShape`] looks at (the professionals whole: whether the
/// composition's author is the requester decides whether it is a resource of its own).
#[derive(serde::Deserialize)]
struct HandoverParts {
    header: EventHeader,
    patient: Option<IgnoredAny>,
    requester: Option<HealthProfessional>,
    requester_organization: Option<IgnoredAny>,
    receiver_organization: Option<IgnoredAny>,
    sections: Vec<IgnoredAny>,
    attachments: Vec<IgnoredAny>,
    #[serde(default)]
    composition_author: Option<Box<HealthProfessional>>,
}

#[derive(serde::Deserialize)]
struct NotificationParts {
    header: EventHeader,
    task_reference: String,
}

#[derive(serde::Deserialize)]
struct LetterParts {
    header: EventHeader,
}

impl From<LabParts> for EventShape {
    fn from(e: LabParts) -> EventShape {
        EventShape {
            header: e.header,
            parts: Parts::Lab {
                patient: e.patient.is_some(),
                performer: e.performer.is_some(),
                performing_lab: e.performing_lab.is_some(),
                requester: e.requester.is_some(),
                order: e.requester.is_some() || !e.order_identifiers.is_empty(),
                professionals: e.professionals.len(),
                specimens: e.specimens.len(),
                results: e.results.len(),
                report: !e.report_identifiers.is_empty() || e.reported_at.is_some(),
            },
        }
    }
}

impl From<HandoverParts> for EventShape {
    fn from(e: HandoverParts) -> EventShape {
        EventShape {
            parts: Parts::Handover {
                patient: e.patient.is_some(),
                requester_organization: e.requester_organization.is_some(),
                receiver_organization: e.receiver_organization.is_some(),
                requester: e.requester.is_some(),
                sections: !e.sections.is_empty(),
                other_author: e
                    .composition_author
                    .as_ref()
                    .is_some_and(|a| !author_is_requester(e.requester.as_ref(), a)),
                attachments: e.attachments.len(),
            },
            header: e.header,
        }
    }
}

impl From<NotificationParts> for EventShape {
    fn from(e: NotificationParts) -> EventShape {
        EventShape {
            header: e.header,
            parts: Parts::Notification {
                task_reference: e.task_reference,
            },
        }
    }
}

impl From<LetterParts> for EventShape {
    fn from(e: LetterParts) -> EventShape {
        EventShape {
            header: e.header,
            parts: Parts::Letter,
        }
    }
}

impl EventShape {
    /// The shape of `event`.
    #[must_use]
    pub fn of(event: &Event) -> EventShape {
        fn present<T>(part: Option<&T>) -> Option<IgnoredAny> {
            part.map(|_| IgnoredAny)
        }
        let many = |n: usize| vec![IgnoredAny; n];
        match event {
            Event::LabResult(e) => EventShape::from(LabParts {
                header: e.header.clone(),
                patient: present(e.patient.as_ref()),
                performer: present(e.performer.as_ref()),
                requester: present(e.requester.as_ref()),
                professionals: many(e.professionals.len()),
                specimens: many(e.specimens.len()),
                results: many(e.results.len()),
                report_identifiers: many(e.report_identifiers.len()),
                reported_at: present(e.reported_at.as_ref()),
                order_identifiers: many(e.order_identifiers.len()),
                performing_lab: present(e.performing_lab.as_ref()),
            }),
            Event::AcuteHandover(e) => EventShape::from(HandoverParts {
                header: e.header.clone(),
                patient: present(e.patient.as_ref()),
                requester: e.requester.clone(),
                requester_organization: present(e.requester_organization.as_ref()),
                receiver_organization: present(e.receiver_organization.as_ref()),
                sections: many(e.sections.len()),
                attachments: many(e.attachments.len()),
                composition_author: e.composition_author.clone(),
            }),
            Event::HandoverNotification(e) => EventShape::from(NotificationParts {
                header: e.header.clone(),
                task_reference: e.task_reference.clone(),
            }),
            Event::Letter(e) => EventShape::from(LetterParts {
                header: e.header.clone(),
            }),
        }
    }

    /// The shape of the event `bytes` hold, from the topic of `kind`, read without building
    /// the event (an earlier release's value is read whole and measured).
    ///
    /// # Errors
    /// When the value is not of that kind's schema.
    pub fn from_avro(kind: EventKind, bytes: &[u8]) -> Result<EventShape, CodecError> {
        let shape = match kind {
            EventKind::LabResult => read_as::<LabResultEvent, LabParts>(bytes)?.map(Self::from),
            EventKind::AcuteHandover => {
                read_as::<AcuteHandoverEvent, HandoverParts>(bytes)?.map(Self::from)
            }
            EventKind::HandoverNotification => {
                read_as::<HandoverNotificationEvent, NotificationParts>(bytes)?.map(Self::from)
            }
            EventKind::Letter => read_as::<LetterEvent, LetterParts>(bytes)?.map(Self::from),
        };
        match shape {
            Some(shape) => Ok(shape),
            // An earlier release's value: read whole.
            None => Ok(EventShape::of(&Event::from_avro(kind, bytes)?)),
        }
    }
}

/// `(Type, id)` of every resource of [`resources`] whose id does not name its event (see
/// [`event_of_resource_id`]): a hashed id, or a notification's Task, which keeps the sender's
/// id. Worked out from the event's shape and the resources' local names without building
/// the resources (a lab result has some fifty), so an index can afford it for every event.
/// The test `ids_not_naming_the_event_are_those_of_the_resources` holds it to [`resources`].
#[must_use]
pub fn ids_not_naming_event(shape: &EventShape) -> Vec<(String, String)> {
    let own = shape.header.id.as_str();
    let mut locals: Vec<(&str, String)> = Vec::new();
    let mut one = |ty: &'static str, local: &str| locals.push((ty, local.to_owned()));
    let professional = |one: &mut dyn FnMut(&'static str, &str), local: &str| {
        one("Practitioner", &format!("{local}-practitioner"));
        one("PractitionerRole", &format!("{local}-role"));
    };
    match &shape.parts {
        Parts::Lab {
            patient,
            performer,
            performing_lab,
            requester,
            order,
            professionals,
            specimens,
            results,
            report,
        } => {
            if *patient {
                one("Patient", "patient");
            }
            if *performer {
                one("Organization", "performer");
            }
            if *performing_lab {
                one("Organization", "performing-lab");
            }
            if *requester {
                professional(&mut one, "requester");
            }
            if *order {
                one("ServiceRequest", "request");
            }
            for i in 1..=*professionals {
                professional(&mut one, &format!("professional-{i}"));
            }
            for i in 1..=*specimens {
                one("Specimen", &format!("specimen-{i}"));
            }
            for i in 1..=*results {
                one("Observation", &format!("result-{i}"));
            }
            if *report {
                one("DiagnosticReport", "report");
            }
        }
        Parts::Handover {
            patient,
            requester_organization,
            receiver_organization,
            requester,
            sections,
            other_author,
            attachments,
        } => {
            if *patient {
                one("Patient", "patient");
            }
            if *requester_organization {
                one("Organization", "requester-organization");
            }
            if *receiver_organization {
                one("Organization", "receiver-organization");
            }
            if *requester {
                professional(&mut one, "requester");
            }
            if *sections {
                if *other_author {
                    professional(&mut one, "composition-author");
                }
                one("Composition", "composition");
            }
            for i in 1..=*attachments {
                one("DocumentReference", &format!("attachment-{i}"));
            }
            one("ServiceRequest", "referral");
        }
        Parts::Notification { task_reference } => {
            // The Task keeps the sender's id (see `notification`).
            let id = task_reference.rsplit('/').next().unwrap_or_default();
            return (event_of_resource_id(id) != Some(own))
                .then(|| ("Task".to_owned(), id.to_owned()))
                .into_iter()
                .collect();
        }
        Parts::Letter => {}
    }
    locals
        .into_iter()
        .filter_map(|(ty, local)| {
            let id = resource_id(own, &local);
            (event_of_resource_id(&id) != Some(own)).then(|| (ty.to_owned(), id))
        })
        .collect()
}

/// The resources of an event on their own, as a FHIR server serves them at
/// `[base]/{Type}/{id}`: exactly the resources of [`to_bundle`] (message style, so every one
/// keeps its id, which derives from the event id), without the `MessageHeader`, and with each
/// `urn:uuid` reference rewritten to the relative `Type/id` of the resource it names.
///
/// # Errors
/// [`FhirError::Write`] for events without a FHIR form (letters, for now).
pub fn resources(event: &Event) -> Result<Vec<Value>, FhirError> {
    Ok(served(event)?.resources)
}

/// An event's resources as served (see [`resources`]) and what the message is about.
#[derive(Debug, Clone)]
pub struct Served {
    /// `Type/id` of the `MessageHeader.focus` (the first resource when the header names none).
    pub focus: Option<String>,
    /// The resources, each with relative `Type/id` references.
    pub resources: Vec<Value>,
}

/// [`resources`] together with the message's focus.
///
/// # Errors
/// [`FhirError::Write`] for events without a FHIR form (letters, for now).
pub fn served(event: &Event) -> Result<Served, FhirError> {
    let opts = EmitOptions {
        style: BundleStyle::Message,
        ..EmitOptions::default()
    };
    let bundle = to_bundle(event, &opts)?;
    let entries = bundle.get("entry").and_then(Value::as_array).unwrap_or(&[]);
    let mut names = std::collections::HashMap::new();
    for e in entries {
        let (Some(url), Some(r)) = (e.get("fullUrl").and_then(Value::as_str), e.get("resource"))
        else {
            continue;
        };
        if let (Some(ty), Some(id)) = (
            r.get("resourceType").and_then(Value::as_str),
            r.get("id").and_then(Value::as_str),
        ) {
            names.insert(url.to_owned(), format!("{ty}/{id}"));
        }
    }
    let mut focus = None;
    let mut out = Vec::new();
    for e in entries {
        let Some(r) = e.get("resource") else { continue };
        if r.get("resourceType").and_then(Value::as_str) == Some("MessageHeader") {
            focus = r
                .get("focus")
                .and_then(Value::as_array)
                .and_then(|f| f.first())
                .and_then(|f| f.get("reference"))
                .and_then(Value::as_str)
                .and_then(|u| names.get(u).cloned());
            continue;
        }
        let mut r = r.clone();
        relative_references(&mut r, &names);
        out.push(r);
    }
    if focus.is_none() {
        focus = out.first().and_then(|r| {
            Some(format!(
                "{}/{}",
                r.get("resourceType")?.as_str()?,
                r.get("id")?.as_str()?
            ))
        });
    }
    Ok(Served {
        focus,
        resources: out,
    })
}

/// Rewrite every `reference` that names a Bundle entry's full URL to that entry's `Type/id`.
fn relative_references(v: &mut Value, names: &std::collections::HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("reference")
                && let Some(to) = names.get(r.as_str())
            {
                r.clone_from(to);
            }
            for key in o.iter().map(|(k, _)| k.to_owned()).collect::<Vec<_>>() {
                if let Some(child) = o.get_mut(&key) {
                    relative_references(child, names);
                }
            }
        }
        Value::Array(a) => {
            for child in a {
                relative_references(child, names);
            }
        }
        _ => {}
    }
}

struct Entry {
    full_url: String,
    resource: Object,
    request: Option<Object>,
}

struct Builder<'a> {
    event_id: String,
    opts: &'a EmitOptions,
    entries: Vec<Entry>,
}

/// A FHIR id from the event id and a local name; hashed when too long or not id-safe.
fn resource_id(event_id: &str, local: &str) -> String {
    let id = format!("{event_id}-{local}");
    if id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
    {
        id
    } else {
        hex::encode(&Sha256::digest(id.as_bytes())[..16])
    }
}

/// The event id a resource id was made from when [`resource_id`] did not hash it:
/// `<envelope id>.<index>-<local>`, the envelope id without a dot. `None` for a hashed id or
/// one of another shape. A caller that needs certainty checks the event's own resources.
#[must_use]
pub fn event_of_resource_id(id: &str) -> Option<&str> {
    let dot = id.find('.')?;
    let digits = id[dot + 1..].bytes().take_while(u8::is_ascii_digit).count();
    let end = dot + 1 + digits;
    (dot > 0 && digits > 0 && id[end..].len() > 1 && id.as_bytes()[end] == b'-').then(|| &id[..end])
}

/// A UUID-shaped name from the resource id (version 4 / variant bits set, not random).
fn uuid_for(id: &str) -> String {
    let mut h = Sha256::digest(id.as_bytes())[..16].to_vec();
    h[6] = (h[6] & 0x0f) | 0x40;
    h[8] = (h[8] & 0x3f) | 0x80;
    let x = hex::encode(h);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// A FHIR dateTime from an ISO 8601 text as sources give it. FHIR requires seconds and a
/// zone once a time is given; EDIFACT gives Dutch local time without either, so the
/// seconds become `:00` and the zone the Dutch offset of that date (CET/CEST by the EU
/// rule). Dates and complete date-times pass unchanged.
#[must_use]
pub fn fhir_date_time(t: &str) -> String {
    let Some((date, time)) = t.split_once('T') else {
        return t.to_owned();
    };
    let has_zone =
        time.ends_with('Z') || time.get(5..).is_some_and(|rest| rest.contains(['+', '-']));
    if has_zone {
        return t.to_owned();
    }
    let time = if time.len() == 5 {
        format!("{time}:00")
    } else {
        time.to_owned()
    };
    let num = |s: Option<&str>| s.and_then(|x| x.parse::<i64>().ok());
    let mut d = date.split('-');
    let (Some(y), Some(m), Some(day)) = (num(d.next()), num(d.next()), num(d.next())) else {
        return t.to_owned();
    };
    let hour = num(time.get(..2)).unwrap_or(0);
    let offset = if dutch_summer_time(y, m, day, hour) {
        "+02:00"
    } else {
        "+01:00"
    };
    format!("{date}T{time}{offset}")
}

/// Day of week, 0 = Sunday (Sakamoto).
fn weekday(y: i64, m: i64, d: i64) -> i64 {
    const T: [i64; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    let y = if m < 3 { y - 1 } else { y };
    let m = usize::try_from(m - 1).unwrap_or(0).min(11);
    (y + y / 4 - y / 100 + y / 400 + T[m] + d).rem_euclid(7)
}

fn last_sunday(y: i64, m: i64) -> i64 {
    31 - weekday(y, m, 31)
}

/// CEST runs from the last Sunday of March 02:00 to the last Sunday of October 03:00 local.
fn dutch_summer_time(y: i64, m: i64, d: i64, hour: i64) -> bool {
    match m {
        4..=9 => true,
        3 => (d, hour) >= (last_sunday(y, 3), 2),
        10 => (d, hour) < (last_sunday(y, 10), 3),
        _ => false,
    }
}

fn dt(t: Option<&String>) -> Option<String> {
    t.map(|t| fhir_date_time(t))
}

fn reference(full_url: &str) -> Value {
    Object::new().with("reference", full_url).into()
}

fn coding(c: &Coding) -> Value {
    Object::new()
        .with("system", &c.system)
        .with("code", &c.code)
        .with_opt("display", c.display.as_ref())
        .into()
}

fn concept(c: &Coding) -> Value {
    Object::new().with("coding", vec![coding(c)]).into()
}

fn ext_string(url: &str, v: &str) -> Value {
    Object::new().with("url", url).with("valueString", v).into()
}

fn identifiers(ids: &[Identifier]) -> Vec<Value> {
    ids.iter()
        .map(|i| {
            Object::new()
                .with("system", &i.system)
                .with("value", &i.value)
                .into()
        })
        .collect()
}

/// A decimal literal, if the text is one (JSON number grammar).
fn number(text: &str) -> Option<Value> {
    match super::json::parse(text.trim().as_bytes()) {
        Ok(v @ Value::Number(_)) => Some(v),
        _ => None,
    }
}

fn quantity(value: &str, unit: Option<&String>, unit_system: Option<&String>) -> Option<Object> {
    let mut q = Object::new()
        .with("value", number(value)?)
        .with_opt("unit", unit);
    if let (Some(sys), Some(u)) = (unit_system, unit) {
        q = q.with("system", sys).with("code", u);
    }
    Some(q)
}

/// The names of a person: the official one, and the call name as nl-core-NameInformation's
/// GivenName (a `HumanName` with `use = usual`).
fn names(n: &HumanName) -> Vec<Value> {
    let mut out = vec![human_name(n, false)];
    if let Some(c) = &n.call_name {
        out.push(
            Object::new()
                .with("use", "usual")
                .with("given", vec![Value::from(c.as_str())])
                .into(),
        );
    }
    out
}

/// zib ContactInformation as FHIR `ContactPoint`s.
fn telecom(points: &[ContactPoint]) -> Vec<Value> {
    points
        .iter()
        .map(|t| {
            let mut o = Object::new().with_opt("system", t.system.as_ref());
            if let Some(c) = &t.type_code {
                let ext = Object::new()
                    .with("url", EXT_CODE_SPECIFICATION)
                    .with("valueCodeableConcept", concept(c));
                o = o.with("_system", Object::new().with("extension", vec![ext.into()]));
            }
            o.with("value", &t.value)
                .with_opt("use", t.use_code.as_ref())
                .into()
        })
        .collect()
}

/// zib ContactPerson as `Patient.contact`; its one name carries the call name as a given
/// name with the `CL` qualifier.
fn contact(c: &Contact) -> Value {
    Object::new()
        .with_array(
            "relationship",
            c.relationships.iter().map(concept).collect(),
        )
        .with_opt("name", c.name.as_ref().map(|n| human_name(n, true)))
        .with_array("telecom", telecom(&c.telecom))
        .with_opt("address", c.address.as_ref().map(address))
        .into()
}

/// One `HumanName`; `call_inline`: the call name as a given name with qualifier `CL`.
pub(crate) fn human_name(n: &HumanName, call_inline: bool) -> Value {
    let join = |a: Option<&String>, b: Option<&String>| match (a, b) {
        (Some(a), Some(b)) => Some(format!("{a} {b}")),
        (None, Some(b)) => Some(b.clone()),
        _ => None,
    };
    let own = join(n.family_prefix.as_ref(), n.family.as_ref());
    let partner = join(n.partner_prefix.as_ref(), n.partner_family.as_ref());
    let family = match (&own, &partner) {
        (Some(o), Some(p)) => Some(format!("{o}-{p}")),
        (o, p) => o.clone().or_else(|| p.clone()),
    };
    let parts =
        n.family_prefix.is_some() || n.partner_family.is_some() || n.partner_prefix.is_some();
    let mut fam_ext = Vec::new();
    if parts {
        if let Some(p) = &n.family_prefix {
            fam_ext.push(ext_string(EXT_OWN_PREFIX, p));
        }
        if let Some(f) = &n.family {
            fam_ext.push(ext_string(EXT_OWN_NAME, f));
        }
        if let Some(p) = &n.partner_prefix {
            fam_ext.push(ext_string(EXT_PARTNER_PREFIX, p));
        }
        if let Some(f) = &n.partner_family {
            fam_ext.push(ext_string(EXT_PARTNER_NAME, f));
        }
    }
    let mut given = Vec::new();
    let mut twins = Vec::new();
    let qualifier = |q: &str| -> Value {
        Object::new()
            .with(
                "extension",
                vec![
                    Object::new()
                        .with("url", EXT_QUALIFIER)
                        .with("valueCode", q)
                        .into(),
                ],
            )
            .into()
    };
    for g in n.given.iter().flat_map(|g| g.split_whitespace()) {
        given.push(Value::from(g));
        twins.push(qualifier("BR"));
    }
    for i in n
        .initials
        .iter()
        .flat_map(|i| i.split_inclusive('.'))
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        given.push(Value::from(i));
        twins.push(qualifier("IN"));
    }
    for c in n.call_name.iter().filter(|_| call_inline) {
        given.push(Value::from(c.as_str()));
        twins.push(qualifier("CL"));
    }
    let mut o = Object::new()
        .with("use", "official")
        .with_opt("text", n.text.as_ref())
        .with_opt("family", family);
    if !fam_ext.is_empty() {
        o = o.with("_family", Object::new().with("extension", fam_ext));
    }
    o.with_array("given", given)
        .with_array("_given", twins)
        .into()
}

pub(crate) fn address(a: &Address) -> Value {
    let mut o = Object::new();
    if let Some(street) = &a.street {
        match &a.house_number {
            Some(nr) => {
                o = o
                    .with("line", vec![Value::from(format!("{street} {nr}"))])
                    .with(
                        "_line",
                        vec![
                            Object::new()
                                .with(
                                    "extension",
                                    vec![
                                        ext_string(EXT_STREET, street),
                                        ext_string(EXT_HOUSE_NUMBER, nr),
                                    ],
                                )
                                .into(),
                        ],
                    );
            }
            None => o = o.with("line", vec![Value::from(street)]),
        }
    }
    o.with_opt("city", a.city.as_ref())
        .with_opt("postalCode", a.postal_code.as_ref())
        .with_opt("country", a.country.as_ref())
        .into()
}

fn meta(profile: &str) -> Value {
    Object::new()
        .with("profile", vec![Value::from(format!("{NL_CORE}{profile}"))])
        .into()
}

impl<'a> Builder<'a> {
    fn new(event_id: &str, opts: &'a EmitOptions) -> Builder<'a> {
        Builder {
            event_id: event_id.to_owned(),
            opts,
            entries: Vec::new(),
        }
    }

    /// Add a resource; returns its full URL for references.
    fn add(&mut self, local: &str, resource: Object) -> String {
        let ty = resource.str("resourceType").unwrap_or_default().to_owned();
        let id = resource_id(&self.event_id, local);
        let full_url = uuid_for(&id);
        let mut r = Object::new()
            .with("resourceType", ty.as_str())
            .with("id", id.as_str());
        for (k, v) in resource.iter().filter(|(k, _)| *k != "resourceType") {
            r.insert(k, v.clone());
        }
        let request = Object::new()
            .with("method", "PUT")
            .with("url", format!("{ty}/{id}"));
        self.entries.push(Entry {
            full_url: full_url.clone(),
            resource: r,
            request: Some(request),
        });
        full_url
    }

    fn patient(&mut self, p: &Patient) -> String {
        let r = Object::new()
            .with("resourceType", "Patient")
            .with("meta", meta("nl-core-Patient"))
            .with_array("identifier", identifiers(&p.identifiers))
            .with_array("name", p.name.iter().flat_map(names).collect())
            .with_array("telecom", telecom(&p.telecom))
            .with_opt("gender", p.gender.as_ref())
            .with_opt("birthDate", p.birth_date.as_ref())
            .with_array("address", p.address.iter().map(address).collect())
            .with_opt("maritalStatus", p.marital_status.as_ref().map(concept))
            .with_array("contact", p.contacts.iter().map(contact).collect());
        let url = self.add("patient", r);
        let transaction = self.opts.style == BundleStyle::Transaction;
        if let Some(bsn) = p
            .identifiers
            .iter()
            .find(|i| i.system == systems::BSN)
            .filter(|_| transaction)
        {
            // Conditional update: the receiver keeps one Patient per BSN.
            let e = self.entries.last_mut().expect("just added");
            e.resource.remove("id");
            e.request = Some(Object::new().with("method", "PUT").with(
                "url",
                format!("Patient?identifier={}|{}", systems::BSN, bsn.value),
            ));
        }
        url
    }

    fn organization(&mut self, local: &str, o: &HealthcareProvider) -> String {
        let phone = if o.telecom.is_empty() {
            o.phone
                .as_ref()
                .map(|p| {
                    vec![
                        Object::new()
                            .with("system", "phone")
                            .with("value", p)
                            .into(),
                    ]
                })
                .unwrap_or_default()
        } else {
            telecom(&o.telecom)
        };
        let r = Object::new()
            .with("resourceType", "Organization")
            .with("meta", meta("nl-core-HealthcareProvider-Organization"))
            .with_array("identifier", identifiers(&o.identifiers))
            .with_array("type", o.organization_types.iter().map(concept).collect())
            .with_opt("name", o.name.as_ref())
            .with_array("telecom", phone)
            .with_array("address", o.address.iter().map(address).collect());
        self.add(local, r)
    }

    /// Practitioner + PractitionerRole; returns the role's full URL.
    fn professional(
        &mut self,
        local: &str,
        p: &HealthProfessional,
        org: Option<&str>,
        with_role_code: bool,
    ) -> String {
        let pr = Object::new()
            .with("resourceType", "Practitioner")
            .with("meta", meta("nl-core-HealthProfessional-Practitioner"))
            .with_array("identifier", identifiers(&p.identifiers))
            .with_array("name", p.name.iter().flat_map(names).collect());
        let pr_url = self.add(&format!("{local}-practitioner"), pr);
        let org_ref = match (org, &p.organization_name) {
            (Some(url), _) => Some(reference(url)),
            (None, Some(name)) => Some(Object::new().with("display", name).into()),
            (None, None) => None,
        };
        // What the professional is to the event as the first code's text (ketenbus's
        // marker, read back by `inbound`), then zib HealthProfessionalRole.
        let mut code: Vec<Value> = if with_role_code {
            p.role
                .iter()
                .map(|r| Object::new().with("text", r).into())
                .collect()
        } else {
            Vec::new()
        };
        if p.role_code.is_some() || p.role_display.is_some() {
            code.push(
                Object::new()
                    .with_array("coding", p.role_code.iter().map(coding).collect())
                    .with_opt("text", p.role_display.as_ref())
                    .into(),
            );
        }
        let role = Object::new()
            .with("resourceType", "PractitionerRole")
            .with("meta", meta("nl-core-HealthProfessional-PractitionerRole"))
            .with("practitioner", reference(&pr_url))
            .with_opt("organization", org_ref)
            .with_array("code", code)
            .with_array("specialty", p.specialty.iter().map(concept).collect())
            .with_array("telecom", telecom(&p.telecom));
        self.add(&format!("{local}-role"), role)
    }

    fn finish(self, event: &Event, focus: &[String]) -> Value {
        let mut entries = Vec::new();
        let style = self.opts.style;
        if style == BundleStyle::Message {
            let (system, code) = match event {
                Event::AcuteHandover(e) if e.referral.code.code == SCT_TRANSFER_FROM_AMBULANCE => {
                    (HG_MESSAGE_EVENT, "145")
                }
                other => (KETENBUS_EVENT, other.kind().as_str()),
            };
            let source = match event {
                Event::HandoverNotification(n) => n.sender_endpoint.clone(),
                _ => None,
            }
            .or_else(|| self.opts.source_endpoint.clone())
            .unwrap_or_else(|| "urn:ketenbus".to_owned());
            let mut mh = Object::new()
                .with("resourceType", "MessageHeader")
                .with("id", resource_id(&self.event_id, "header"))
                .with(
                    "eventCoding",
                    Object::new().with("system", system).with("code", code),
                );
            if let Some(dest) = &self.opts.destination_endpoint {
                mh = mh.with(
                    "destination",
                    vec![Object::new().with("endpoint", dest).into()],
                );
            }
            mh = mh
                .with("source", Object::new().with("endpoint", source))
                .with_array("focus", focus.iter().map(|f| reference(f)).collect());
            let id = resource_id(&self.event_id, "header");
            entries.push(
                Object::new()
                    .with("fullUrl", uuid_for(&id))
                    .with("resource", mh)
                    .into(),
            );
        }
        for e in self.entries {
            let mut entry = Object::new()
                .with("fullUrl", e.full_url)
                .with("resource", e.resource);
            if style == BundleStyle::Transaction {
                entry = entry.with_opt("request", e.request);
            }
            entries.push(entry.into());
        }
        let ty = match style {
            BundleStyle::Transaction => "transaction",
            BundleStyle::Message => "message",
        };
        Object::new()
            .with("resourceType", "Bundle")
            .with("id", resource_id(&self.event_id, "bundle"))
            .with("type", ty)
            .with_opt(
                "identifier",
                event.header().interchange_reference.as_ref().map(|r| {
                    Object::new()
                        .with("system", INTERCHANGE_REFERENCE)
                        .with("value", r)
                }),
            )
            .with_opt(
                "timestamp",
                dt(event.header().occurred_at.as_ref())
                    .filter(|t| style == BundleStyle::Message && t.contains('T')),
            )
            .with("entry", entries)
            .into()
    }
}

fn lab(b: &mut Builder<'_>, e: &LabResultEvent) -> Vec<String> {
    let patient = e.patient.as_ref().map(|p| b.patient(p));
    let performer = e.performer.as_ref().map(|o| b.organization("performer", o));
    let performing_lab = e
        .performing_lab
        .as_ref()
        .map(|o| b.organization("performing-lab", o));
    let role = e
        .requester
        .as_ref()
        .map(|r| b.professional("requester", r, None, false));
    let request = (role.is_some() || !e.order_identifiers.is_empty()).then(|| {
        let sr = Object::new()
            .with("resourceType", "ServiceRequest")
            .with_array("identifier", identifiers(&e.order_identifiers))
            .with("status", "active")
            .with("intent", "order")
            .with_opt("subject", patient.as_deref().map(reference))
            .with_opt("requester", role.as_deref().map(reference));
        b.add("request", sr)
    });
    for (i, p) in e.professionals.iter().enumerate() {
        b.professional(&format!("professional-{}", i + 1), p, None, true);
    }
    let mut specimen_urls: Vec<(&str, String)> = Vec::new();
    for (i, s) in e.specimens.iter().enumerate() {
        let url = specimen(b, s, i, patient.as_deref());
        specimen_urls.push((s.id.as_str(), url));
    }
    let result_url = |i: usize| uuid_for(&resource_id(&b.event_id, &format!("result-{}", i + 1)));
    let result_urls: Vec<(&str, String)> = e
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), result_url(i)))
        .collect();
    let mut focus = Vec::new();
    for (i, r) in e.results.iter().enumerate() {
        // Members in the event by their Bundle URL, others as the source referenced them.
        let members: Vec<Value> = r
            .members
            .iter()
            .map(|m| {
                result_urls
                    .iter()
                    .find(|(id, _)| *id == m.as_str())
                    .map_or_else(|| reference(m), |(_, u)| reference(u))
            })
            .collect();
        let sp = r
            .specimen_id
            .as_deref()
            .and_then(|id| e.specimens.iter().find(|s| s.id == id));
        let sp_url = r
            .specimen_id
            .as_deref()
            .and_then(|id| specimen_urls.iter().find(|(s, _)| *s == id))
            .map(|(_, u)| u.as_str());
        let obs = observation(
            r,
            sp,
            sp_url,
            patient.as_deref(),
            &[performer.as_deref(), performing_lab.as_deref()],
            request.as_deref(),
        )
        .with_array("hasMember", members);
        focus.push(b.add(&format!("result-{}", i + 1), obs));
    }
    if !e.report_identifiers.is_empty() || e.reported_at.is_some() {
        let report = Object::new()
            .with("resourceType", "DiagnosticReport")
            .with_array("identifier", identifiers(&e.report_identifiers))
            .with_array(
                "basedOn",
                request.as_deref().map(reference).into_iter().collect(),
            )
            .with("status", "final")
            .with(
                "code",
                concept(&Coding {
                    system: systems::LOINC.to_owned(),
                    code: "11502-2".to_owned(),
                    display: Some("Laboratory report".to_owned()),
                }),
            )
            .with_opt("subject", patient.as_deref().map(reference))
            .with_opt(
                "issued",
                dt(e.reported_at.as_ref()).filter(|t| t.contains('T')),
            )
            .with_array("result", focus.iter().map(|f| reference(f)).collect());
        b.add("report", report);
    }
    focus
}

fn specimen(b: &mut Builder<'_>, s: &Specimen, i: usize, patient: Option<&str>) -> String {
    let ids: Vec<Identifier> = s
        .identifiers
        .iter()
        .filter(|i| i.system != EXT_EDIFACT_REFERENCE)
        .cloned()
        .collect();
    let volume = s.volume.as_ref().and_then(|v| {
        let (num, unit) = v
            .split_once(' ')
            .map_or((v.as_str(), None), |(n, u)| (n, Some(u.to_owned())));
        quantity(num, unit.as_ref(), None)
    });
    let collection = Object::new()
        .with_opt("collectedDateTime", dt(s.collected_at.as_ref()))
        .with_opt("quantity", volume);
    let r = Object::new()
        .with("resourceType", "Specimen")
        .with("meta", meta("nl-core-LaboratoryTestResult.Specimen"))
        .with_array("identifier", identifiers(&ids))
        .with_opt("type", s.material.as_ref().map(concept))
        .with_opt("subject", patient.map(reference))
        .with_opt("receivedTime", dt(s.received_at.as_ref()))
        .with_opt("collection", (!collection.is_empty()).then_some(collection));
    b.add(&format!("specimen-{}", i + 1), r)
}

fn observation(
    r: &LabTestResult,
    sp: Option<&Specimen>,
    sp_url: Option<&str>,
    patient: Option<&str>,
    performers: &[Option<&str>],
    request: Option<&str>,
) -> Object {
    let edifact = sp.and_then(|s| {
        s.identifiers
            .iter()
            .find(|i| i.system == EXT_EDIFACT_REFERENCE)
    });
    let lab = Object::new().with(
        "coding",
        vec![
            Object::new()
                .with("system", OBSERVATION_CATEGORY)
                .with("code", "laboratory")
                .with("display", "Laboratory")
                .into(),
        ],
    );
    let mut category = vec![Value::from(lab)];
    if r.section.is_some() || r.section_code.is_some() {
        let codings: Vec<Value> = r.section_code.iter().map(coding).collect();
        category.push(
            Object::new()
                .with_array("coding", codings)
                .with_opt("text", r.section.as_ref())
                .into(),
        );
    }
    // A test named only by text (no code in the source) has an empty code.
    let mut codes: Vec<Value> = (!r.test.code.is_empty())
        .then(|| coding(&r.test))
        .into_iter()
        .collect();
    codes.extend(r.other_codes.iter().map(coding));
    if let Some(local) = &r.local_code
        && r.test.code != *local
        && !r.other_codes.iter().any(|c| c.code == *local)
    {
        codes.push(
            Object::new()
                .with("system", "urn:ketenbus:local:unknown")
                .with("code", local)
                .into(),
        );
    }
    let specimen_ref = match (sp_url, &r.specimen_id) {
        (Some(u), _) => Some(reference(u)),
        (None, Some(id)) => Some(reference(&format!("Specimen/{id}"))),
        _ => None,
    };
    let mut o = Object::new()
        .with("resourceType", "Observation")
        .with("meta", meta("nl-core-LaboratoryTestResult"))
        .with_array(
            "extension",
            edifact
                .map(|i| ext_string(EXT_EDIFACT_REFERENCE, &i.value))
                .into_iter()
                .chain(r.corrects.as_ref().map(replaces))
                .collect(),
        )
        .with_array("identifier", identifiers(&r.identifiers))
        .with_array("basedOn", request.map(reference).into_iter().collect())
        .with("status", r.status.as_str())
        .with("category", category)
        .with(
            "code",
            Object::new()
                .with_array("coding", codes)
                .with_opt("text", r.local_name.as_ref()),
        )
        .with_opt("subject", patient.map(reference))
        .with_opt("effectiveDateTime", dt(r.effective_at.as_ref()))
        .with_array(
            "performer",
            performers.iter().flatten().map(|p| reference(p)).collect(),
        );
    let q = r.value_decimal.as_ref().and_then(|v| {
        quantity(v, r.unit.as_ref(), r.unit_system.as_ref())
            .map(|q| q.with_opt("comparator", r.comparator.as_ref()))
    });
    // `comparator` belongs between value and unit in definition order; JSON order is free.
    if let Some(q) = q {
        o = o.with("valueQuantity", q);
    } else if let Some(c) = &r.value_coding {
        o = o.with(
            "valueCodeableConcept",
            Object::new()
                .with("coding", vec![coding(c)])
                .with_opt("text", r.value_text.as_ref()),
        );
    } else if let Some(t) = r.value_text.as_ref().or(r.value_decimal.as_ref()) {
        o = o.with("valueString", t);
    }
    let mut cs: Vec<Object> = Vec::new();
    if let Some(code) = &r.interpretation {
        let snomed = SNOMED_FLAGS.iter().find(|(_, v3, _)| v3 == code);
        let v3 = Object::new()
            .with("system", V3_INTERPRETATION)
            .with("code", code);
        if let Some((sct, _, display)) = snomed {
            let s = Object::new()
                .with("system", systems::SNOMED)
                .with("code", *sct)
                .with("display", *display);
            if r.interpretation_raw.as_deref() == Some(*sct) {
                cs = vec![s, v3];
            } else {
                cs = vec![v3, s];
            }
        } else {
            cs.push(v3);
        }
    }
    // The source's display stays on the first coding, where it is read back from.
    if let Some(first) = cs.first_mut() {
        first.remove("display");
        if let Some(d) = &r.interpretation_display {
            first.insert("display", d.as_str().into());
        }
    }
    if !cs.is_empty() || r.interpretation_text.is_some() {
        let cs: Vec<Value> = cs.into_iter().map(Value::from).collect();
        o = o.with(
            "interpretation",
            vec![
                Object::new()
                    .with_array("coding", cs)
                    .with_opt("text", r.interpretation_text.as_ref())
                    .into(),
            ],
        );
    }
    o = o
        .with_array(
            "note",
            r.comments
                .iter()
                .map(|c| Object::new().with("text", c).into())
                .collect(),
        )
        .with_opt("specimen", specimen_ref);
    // EDIFACT limits may carry a decimal comma; FHIR decimals have a point.
    let bound = |v: &Option<String>| {
        v.as_ref().and_then(|v| {
            quantity(
                &v.replace(',', "."),
                r.unit.as_ref(),
                r.unit_system.as_ref(),
            )
        })
    };
    let range = Object::new()
        .with_opt("low", bound(&r.reference_low))
        .with_opt("high", bound(&r.reference_high))
        .with_opt("text", r.reference_text.as_ref());
    if !range.is_empty() {
        o = o.with("referenceRange", vec![range.into()]);
    }
    o
}

/// The `replaces` extension naming the result a correction replaces.
fn replaces(i: &Identifier) -> Value {
    let target = if i.system == URI {
        Object::new().with("reference", &i.value)
    } else {
        Object::new().with(
            "identifier",
            Object::new()
                .with("system", &i.system)
                .with("value", &i.value),
        )
    };
    Object::new()
        .with("url", EXT_REPLACES)
        .with("valueReference", target)
        .into()
}

fn narrative(text: &str) -> Value {
    let mut div = String::from("<div xmlns=\"http://www.w3.org/1999/xhtml\">");
    for c in text.chars() {
        match c {
            '<' => div.push_str("&lt;"),
            '>' => div.push_str("&gt;"),
            '&' => div.push_str("&amp;"),
            c => div.push(c),
        }
    }
    div.push_str("</div>");
    Object::new()
        .with("status", "additional")
        .with("div", div)
        .into()
}

fn attachment(a: &Attachment) -> Value {
    let att = Object::new()
        .with("contentType", &a.content_type)
        .with("url", format!("{CONTENT_URN}{}", a.sha256))
        .with("size", Value::Number(a.size.to_string()))
        .with_opt("title", a.title.as_ref());
    Object::new().with("attachment", att).into()
}

/// The composition's author is the requester: written once, as the requester's resource
/// (as in Acute Zorg message 24).
fn author_is_requester(requester: Option<&HealthProfessional>, a: &HealthProfessional) -> bool {
    requester.is_some_and(|r| {
        HealthProfessional {
            role: a.role.clone(),
            ..r.clone()
        } == *a
    })
}

fn handover(b: &mut Builder<'_>, e: &AcuteHandoverEvent) -> Vec<String> {
    let patient = e.patient.as_ref().map(|p| b.patient(p));
    let req_org = e
        .requester_organization
        .as_ref()
        .map(|o| b.organization("requester-organization", o));
    let rec_org = e
        .receiver_organization
        .as_ref()
        .map(|o| b.organization("receiver-organization", o));
    let requester = e
        .requester
        .as_ref()
        .map(|p| b.professional("requester", p, req_org.as_deref(), false));
    let author = requester
        .as_ref()
        .or(req_org.as_ref())
        .map(|u| reference(u));
    let mut supporting = Vec::new();
    if !e.sections.is_empty() {
        let sections: Vec<Value> = e
            .sections
            .iter()
            .map(|s| {
                Object::new()
                    .with_opt("title", s.title.as_ref())
                    .with_opt("code", s.code.as_ref().map(concept))
                    .with_opt("text", s.text.as_deref().map(narrative))
                    .into()
            })
            .collect();
        let date = e
            .composition_date
            .as_ref()
            .or(e.referral.authored_on.as_ref())
            .or(e.header.occurred_at.as_ref());
        // The author is written once: as the requester's resource when it is the same
        // professional, else as its own.
        let author = match &e.composition_author {
            Some(a) if author_is_requester(e.requester.as_ref(), a) => author,
            Some(a) => Some(reference(&b.professional(
                "composition-author",
                a,
                None,
                false,
            ))),
            None => author,
        };
        let ty = e.composition_type.clone().unwrap_or_else(|| Coding {
            system: systems::LOINC.into(),
            code: "18761-7".into(),
            display: Some("Transfer summary note".into()),
        });
        let comp = Object::new()
            .with("resourceType", "Composition")
            .with("status", "final")
            .with("type", concept(&ty))
            .with_opt("subject", patient.as_deref().map(reference))
            .with_opt("date", dt(date))
            .with_array("author", author.into_iter().collect())
            .with(
                "title",
                e.composition_title.as_deref().unwrap_or("Overdracht"),
            )
            .with("section", sections);
        supporting.push(reference(&b.add("composition", comp)));
    }
    for (i, a) in e.attachments.iter().enumerate() {
        let dr = Object::new()
            .with("resourceType", "DocumentReference")
            .with("status", "current")
            .with_opt("type", a.document_type.as_ref().map(concept))
            .with_opt("subject", patient.as_deref().map(reference))
            .with("content", vec![attachment(a)]);
        supporting.push(reference(&b.add(&format!("attachment-{}", i + 1), dr)));
    }
    let r = &e.referral;
    let sr = Object::new()
        .with("resourceType", "ServiceRequest")
        .with("status", r.status.as_deref().unwrap_or("active"))
        .with("intent", "order")
        .with_opt("priority", r.priority.as_ref())
        .with("code", concept(&r.code))
        .with_opt("subject", patient.as_deref().map(reference))
        .with_opt("authoredOn", dt(r.authored_on.as_ref()))
        .with_opt(
            "requester",
            requester.as_deref().or(req_org.as_deref()).map(reference),
        )
        .with_array(
            "performer",
            rec_org.as_deref().map(reference).into_iter().collect(),
        )
        .with_array(
            "reasonCode",
            r.reason
                .iter()
                .map(|t| Object::new().with("text", t).into())
                .collect(),
        )
        .with_array("supportingInfo", supporting);
    vec![b.add("referral", sr)]
}

/// A Reference to a party by identifier (`ura:…`, `agb:…`, `uzi:…`, else `urn:ketenbus:party`).
#[must_use]
pub fn party_reference(party: &str) -> Value {
    let (scheme, value) = party.split_once(':').unwrap_or(("", party));
    let system = match scheme {
        "ura" => systems::URA,
        "agb" => systems::AGB,
        "uzi" => systems::UZI_PERSON,
        "uzi-sys" => systems::UZI_SYSTEM,
        _ => "urn:ketenbus:party",
    };
    let value = if system == "urn:ketenbus:party" {
        party
    } else {
        value
    };
    Object::new()
        .with(
            "identifier",
            Object::new().with("system", system).with("value", value),
        )
        .into()
}

/// A `Task.input` pointing at what the receiver may pull (`type` is required: text when
/// the source gave no coding).
fn task_input(i: &ketenbus_schemas::event::TaskInput) -> Value {
    let ty = match &i.type_code {
        Some(c) => concept(c),
        None => Object::new().with("text", "reference").into(),
    };
    Object::new()
        .with("type", ty)
        .with(
            "valueReference",
            Object::new().with("reference", i.reference.as_str()),
        )
        .into()
}

fn notification(b: &mut Builder<'_>, e: &HandoverNotificationEvent) -> Vec<String> {
    let task = Object::new()
        .with("resourceType", "Task")
        .with("status", e.task_status.as_str())
        .with("intent", "proposal")
        .with_opt("requester", e.requester.as_deref().map(party_reference))
        .with_opt("owner", e.owner.as_deref().map(party_reference))
        .with_array("input", e.inputs.iter().map(task_input).collect());
    let _ = b.add("task", task);
    // The notification names the sender's Task: its absolute URL is the entry's full URL
    // and its id the sender's id, so the receiver pulls from there.
    let entry = b.entries.last_mut().expect("just added");
    if e.task_reference.starts_with("http://") || e.task_reference.starts_with("https://") {
        entry.full_url.clone_from(&e.task_reference);
    }
    if let Some(id) = e.task_reference.rsplit('/').next() {
        entry.resource.insert("id", Value::from(id));
    }
    entry.request = Some(Object::new().with("method", "POST").with("url", "Task"));
    vec![entry.full_url.clone()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_not_naming_the_event_are_those_of_the_resources() {
        let az = include_str!(
            "../../testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
        );
        let tree = super::super::json::parse(az.as_bytes()).unwrap();
        let mut events = super::super::inbound::events_from(&tree, "env-1", "fhir_json").unwrap();
        for edi in [
            &include_bytes!("../../testdata/edifact/ketenbus/medlab-two-messages.edi")[..],
            &include_bytes!("../../testdata/edifact/ketenbus/medlab-standards-example.edi")[..],
        ] {
            events.extend(
                crate::edifact::normalise_bytes("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", edi)
                    .unwrap(),
            );
        }
        // And a notification, whose Task keeps the sender's id.
        let mut note = events
            .iter()
            .find_map(|e| match e {
                Event::AcuteHandover(h) => Some(h.header.clone()),
                _ => None,
            })
            .map(|header| {
                Event::HandoverNotification(ketenbus_schemas::event::HandoverNotificationEvent {
                    header,
                    task_reference: "https://sender.example/fhir/Task/task-7".into(),
                    task_status: "requested".into(),
                    sender_endpoint: None,
                    requester: None,
                    owner: None,
                    inputs: Vec::new(),
                })
            })
            .unwrap();
        note.header_mut().id = "env-1.3".into();
        note.header_mut().kind = EventKind::HandoverNotification;
        events.push(note);
        let (mut hashed, mut kinds) = (0, std::collections::BTreeSet::new());
        for e in events.iter().filter(|e| !matches!(e, Event::Letter(_))) {
            let own = e.header().id.as_str();
            let mut want: Vec<(String, String)> = resources(e)
                .unwrap()
                .iter()
                .map(|r| {
                    let s = |k| r.get(k).and_then(Value::as_str).unwrap().to_owned();
                    (s("resourceType"), s("id"))
                })
                .filter(|(_, id)| event_of_resource_id(id) != Some(own))
                .collect();
            hashed += want.len();
            kinds.extend(want.iter().map(|(ty, _)| ty.clone()));
            let shape = EventShape::of(e);
            let read = EventShape::from_avro(e.kind(), &e.to_avro().unwrap()).unwrap();
            assert_eq!(read, shape, "{own}: the shape read from the log");
            let mut got = ids_not_naming_event(&shape);
            want.sort();
            got.sort();
            assert_eq!(got, want, "{own}");
        }
        assert!(hashed > 0, "no hashed id among the fixtures' resources");
        assert!(
            kinds.contains("Task") && kinds.contains("Practitioner"),
            "{kinds:?}"
        );
    }

    #[test]
    fn a_resource_id_names_its_event_unless_hashed() {
        let event = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.12";
        let id = resource_id(event, "result-3");
        assert_eq!(event_of_resource_id(&id), Some(event));
        assert_eq!(
            event_of_resource_id(&resource_id("env-1.0", "patient")),
            Some("env-1.0")
        );
        let long = resource_id(event, "a-local-name-long-enough-to-be-hashed");
        assert_eq!(long.len(), 32);
        assert_eq!(event_of_resource_id(&long), None);
        for other in [
            "",
            ".",
            "x.1",
            "x.1-",
            ".1-a",
            "x.-a",
            "x.a-b",
            "nodot-at-all",
        ] {
            assert_eq!(event_of_resource_id(other), None, "{other}");
        }
    }

    #[test]
    fn resources_stand_alone_with_relative_references() {
        let az = include_str!(
            "../../testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
        );
        let tree = super::super::json::parse(az.as_bytes()).unwrap();
        let events = super::super::inbound::events_from(&tree, "env-1", "fhir_json").unwrap();
        let rs = resources(&events[0]).unwrap();
        let text = super::super::json::to_vec(&Value::Array(rs.clone()));
        let text = String::from_utf8(text).unwrap();
        assert!(!text.contains("urn:uuid:"), "{text}");
        assert!(!text.contains("MessageHeader"));
        let mut ids = std::collections::BTreeSet::new();
        for r in &rs {
            let id = r.get("id").and_then(Value::as_str).unwrap();
            assert!(
                id.starts_with(&events[0].header().id) || id.len() == 32,
                "{id}"
            );
            assert!(ids.insert(id.to_owned()), "ids are unique");
        }
        // Pulled one by one into a collection Bundle, they map back to the handover.
        // (Attachments come inline from the content store: see `sink::inline_resource_attachments`.)
        let entries: Vec<Value> = rs
            .iter()
            .filter(|r| r.get("resourceType").and_then(Value::as_str) != Some("DocumentReference"))
            .map(|r| {
                let url = format!(
                    "https://a.example/fhir/{}/{}",
                    r.get("resourceType").and_then(Value::as_str).unwrap(),
                    r.get("id").and_then(Value::as_str).unwrap()
                );
                Object::new()
                    .with("fullUrl", url)
                    .with("resource", r.clone())
                    .into()
            })
            .collect();
        let pulled: Value = Object::new()
            .with("resourceType", "Bundle")
            .with("type", "collection")
            .with("entry", entries)
            .into();
        let again = super::super::inbound::events_from(&pulled, "env-2", "fhir_json").unwrap();
        match (&again[0], &events[0]) {
            (Event::AcuteHandover(a), Event::AcuteHandover(b)) => {
                assert_eq!(a.referral.code, b.referral.code);
                assert_eq!(a.referral.reason, b.referral.reason);
                assert_eq!(a.patient, b.patient);
                assert_eq!(a.sections, b.sections);
                assert_eq!(b.attachments.len(), 1, "the ECG, left out here");
            }
            other => panic!("{other:?}"),
        }
        let sr = rs
            .iter()
            .find(|r| r.get("resourceType").and_then(Value::as_str) == Some("ServiceRequest"))
            .unwrap();
        let subject = sr.get("subject").and_then(|s| s.get("reference"));
        assert!(
            subject
                .and_then(Value::as_str)
                .is_some_and(|r| r.starts_with("Patient/")),
            "{subject:?}"
        );
    }

    #[test]
    fn local_times_get_seconds_and_the_dutch_offset() {
        assert_eq!(
            fhir_date_time("2026-11-01T07:40"),
            "2026-11-01T07:40:00+01:00"
        );
        assert_eq!(
            fhir_date_time("2026-07-01T07:40"),
            "2026-07-01T07:40:00+02:00"
        );
        // 2026: CEST from Sunday 29 March 02:00 to Sunday 25 October 03:00.
        assert_eq!(
            fhir_date_time("2026-03-29T01:59:00"),
            "2026-03-29T01:59:00+01:00"
        );
        assert_eq!(
            fhir_date_time("2026-03-29T03:00"),
            "2026-03-29T03:00:00+02:00"
        );
        assert_eq!(
            fhir_date_time("2026-10-25T02:30"),
            "2026-10-25T02:30:00+02:00"
        );
        assert_eq!(
            fhir_date_time("2026-10-25T03:00"),
            "2026-10-25T03:00:00+01:00"
        );
        assert_eq!(
            fhir_date_time("2021-06-12T13:15:00+02:00"),
            "2021-06-12T13:15:00+02:00"
        );
        assert_eq!(
            fhir_date_time("2012-01-16T10:12:00Z"),
            "2012-01-16T10:12:00Z"
        );
        assert_eq!(fhir_date_time("1934-04-28"), "1934-04-28");
    }
}
