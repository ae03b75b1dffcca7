//! Events: what happened in care, carried as zib-shaped records (zib 2020 / FHIR nl-core).
//! One topic and one schema per kind (`avro/event_<kind>.avsc`); every event starts with
//! the same [`EventHeader`]. Decimal values stay strings so nothing is rounded.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{AvroRecord, CodecError};

/// The kinds of event, one topic each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Lab results: MEDLAB:1, MEDRPT MRPN32, FHIR lab Bundles.
    LabResult,
    /// Letters and documents: MEDVRI:1, MEDSPE:1, mail bodies and attachments.
    Letter,
    /// Acute-care handovers: Acute Zorg FHIR messages.
    AcuteHandover,
    /// Notify-then-pull notifications; no patient data.
    HandoverNotification,
}

impl EventKind {
    /// All kinds.
    pub const ALL: [EventKind; 4] = [
        EventKind::LabResult,
        EventKind::Letter,
        EventKind::AcuteHandover,
        EventKind::HandoverNotification,
    ];

    /// The schema symbol; also the config name and a metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::LabResult => "lab_result",
            EventKind::Letter => "letter",
            EventKind::AcuteHandover => "acute_handover",
            EventKind::HandoverNotification => "handover_notification",
        }
    }

    /// The kind named `s` (as in config).
    #[must_use]
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// What every event carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventHeader {
    /// `<envelope id>.<index>`: the same envelope always yields the same ids.
    pub id: String,
    /// Kind of event.
    pub kind: EventKind,
    /// The envelope it was made from.
    pub envelope_id: String,
    /// Position among the envelope's events.
    pub index: i32,
    /// When it happened in care, ISO 8601 as the source gave it.
    pub occurred_at: Option<String>,
    /// Party id `scheme:value` of the sender.
    pub sender: Option<String>,
    /// Party id `scheme:value` of the receiver.
    pub receiver: Option<String>,
    /// Keyed hash of the patient identifier (the topic key); never the BSN itself.
    pub patient_key: Option<String>,
    /// edifact, fhir_json, fhir_xml or rfc822.
    pub source_format: String,
    /// Message type in the source, e.g. `MEDLAB:1`.
    pub source_message_type: Option<String>,
    /// Control reference of the interchange as the source numbered it: EDIFACT UNB 0020,
    /// FHIR `Bundle.identifier.value`.
    #[serde(default)]
    pub interchange_reference: Option<String>,
    /// Reference of the message within it: EDIFACT UNH 0062, FHIR `MessageHeader.id`.
    #[serde(default)]
    pub message_reference: Option<String>,
}

impl EventHeader {
    /// A header for event number `index` of an envelope; the id derives from both.
    #[must_use]
    pub fn new(kind: EventKind, envelope_id: &str, index: i32, source_format: &str) -> EventHeader {
        EventHeader {
            id: crate::id::event_id(envelope_id, index),
            kind,
            envelope_id: envelope_id.to_owned(),
            index,
            occurred_at: None,
            sender: None,
            receiver: None,
            patient_key: None,
            source_format: source_format.to_owned(),
            source_message_type: None,
            interchange_reference: None,
            message_reference: None,
        }
    }
}

/// An identifier with its naming system.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifier {
    /// Naming system URI (see [`systems`]).
    pub system: String,
    /// The value.
    pub value: String,
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identifier({}, {} chars)", self.system, self.value.len())
    }
}

/// Naming systems of Dutch identifiers (nl-core).
pub mod systems {
    /// Citizen service number.
    pub const BSN: &str = "http://fhir.nl/fhir/NamingSystem/bsn";
    /// Vektis AGB code.
    pub const AGB: &str = "http://fhir.nl/fhir/NamingSystem/agb-z";
    /// Care provider register.
    pub const URA: &str = "http://fhir.nl/fhir/NamingSystem/ura";
    /// UZI person number.
    pub const UZI_PERSON: &str = "http://fhir.nl/fhir/NamingSystem/uzi-nr-pers";
    /// UZI system number.
    pub const UZI_SYSTEM: &str = "http://fhir.nl/fhir/NamingSystem/uzi-nr-sys";
    /// NHG table 45 diagnostic determinations.
    pub const NHG_45: &str =
        "https://referentiemodel.nhg.org/tabellen/nhg-tabel-45-diagnostische-bepalingen";
    /// LOINC.
    pub const LOINC: &str = "http://loinc.org";
    /// SNOMED CT.
    pub const SNOMED: &str = "http://snomed.info/sct";
    /// UCUM units.
    pub const UCUM: &str = "http://unitsofmeasure.org";
}

/// A code from a code system (empty system and code: a test named only by text).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coding {
    /// Code system URI (or `urn:ketenbus:local:<lab>` for lab-local codes).
    pub system: String,
    /// The code.
    pub code: String,
    /// Display text.
    pub display: Option<String>,
}

/// zib AddressInformation.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Street name.
    pub street: Option<String>,
    /// House number with additions.
    pub house_number: Option<String>,
    /// Postal code.
    pub postal_code: Option<String>,
    /// City.
    pub city: Option<String>,
    /// Country.
    pub country: Option<String>,
}

/// zib NameInformation: own and partner name parts kept apart.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanName {
    /// First names.
    pub given: Option<String>,
    /// Initials.
    pub initials: Option<String>,
    /// Voorvoegsels of the own family name.
    pub family_prefix: Option<String>,
    /// Own family name.
    pub family: Option<String>,
    /// Voorvoegsels of the partner's family name.
    pub partner_prefix: Option<String>,
    /// Partner's family name.
    pub partner_family: Option<String>,
    /// The name as one string, as the source wrote it.
    pub text: Option<String>,
    /// Call name (roepnaam): nl-core-NameInformation.GivenName, a `HumanName` with
    /// `use = usual`; STU3 senders give it with the `CL` qualifier.
    #[serde(default)]
    pub call_name: Option<String>,
}

/// zib ContactInformation (TelephoneNumbers, EmailAddresses): FHIR `ContactPoint`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactPoint {
    /// `ContactPoint.system`: phone, fax, email, pager, url, sms, other.
    pub system: Option<String>,
    /// The number or address as written.
    pub value: String,
    /// `ContactPoint.use`: home, work, temp, old, mobile.
    pub use_code: Option<String>,
    /// zib TelecomType as nl-core codes it: `ext-CodeSpecification` on `ContactPoint.system`
    /// (e.g. `MC` mobile phone).
    #[serde(default)]
    pub type_code: Option<Coding>,
}

/// zib ContactPerson: FHIR `Patient.contact`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// Role and relationship codes (`Patient.contact.relationship`).
    #[serde(default)]
    pub relationships: Vec<Coding>,
    /// Name parts.
    pub name: Option<HumanName>,
    /// Telephone numbers and e-mail addresses.
    #[serde(default)]
    pub telecom: Vec<ContactPoint>,
    /// Address.
    pub address: Option<Address>,
}

/// zib Patient.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Patient {
    /// BSN and other identifiers.
    pub identifiers: Vec<Identifier>,
    /// Name parts.
    pub name: Option<HumanName>,
    /// ISO 8601 date, possibly partial.
    pub birth_date: Option<String>,
    /// FHIR administrative gender: male, female, other, unknown.
    pub gender: Option<String>,
    /// Home address.
    pub address: Option<Address>,
    /// Telephone numbers and e-mail addresses (zib ContactInformation).
    #[serde(default)]
    pub telecom: Vec<ContactPoint>,
    /// zib MaritalStatus (`Patient.maritalStatus`, HL7 v3 MaritalStatus).
    #[serde(default)]
    pub marital_status: Option<Coding>,
    /// Contact persons (zib ContactPerson).
    #[serde(default)]
    pub contacts: Vec<Contact>,
}

/// zib HealthcareProvider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthcareProvider {
    /// AGB, URA and other identifiers.
    pub identifiers: Vec<Identifier>,
    /// Organisation name.
    pub name: Option<String>,
    /// Department.
    pub department: Option<String>,
    /// Address.
    pub address: Option<Address>,
    /// Telephone number.
    pub phone: Option<String>,
    /// Organisation type and department specialty (`Organization.type`).
    #[serde(default)]
    pub organization_types: Vec<Coding>,
    /// Every telephone number and e-mail address (`phone` is the first telephone).
    #[serde(default)]
    pub telecom: Vec<ContactPoint>,
}

/// zib HealthProfessional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthProfessional {
    /// AGB, UZI and other identifiers.
    pub identifiers: Vec<Identifier>,
    /// Name parts.
    pub name: Option<HumanName>,
    /// What this professional is to the event: requester, copy, author, department, recipient.
    pub role: Option<String>,
    /// Specialty.
    pub specialty: Option<Coding>,
    /// Organisation the professional works for.
    pub organization_name: Option<String>,
    /// Telephone numbers and e-mail addresses (`PractitionerRole.telecom`).
    #[serde(default)]
    pub telecom: Vec<ContactPoint>,
    /// zib HealthProfessionalRole, coded (`PractitionerRole.code.coding`).
    #[serde(default)]
    pub role_code: Option<Coding>,
    /// zib HealthProfessionalRole as text (`PractitionerRole.code.text`).
    #[serde(default)]
    pub role_display: Option<String>,
}

/// A document stored by content hash in the content store, not inlined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Media type.
    pub content_type: String,
    /// Title or file name.
    pub title: Option<String>,
    /// Hex SHA-256 of the content; the content store key.
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// Kind of document (`DocumentReference.type`, e.g. LOINC).
    #[serde(default)]
    pub document_type: Option<Coding>,
}

/// zib LaboratoryTestResult.Specimen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Specimen {
    /// Local id results point at.
    pub id: String,
    /// Includes the EDIFACT reference number.
    pub identifiers: Vec<Identifier>,
    /// Material.
    pub material: Option<Coding>,
    /// Volume as written.
    pub volume: Option<String>,
    /// Sampling date/time, ISO 8601.
    pub collected_at: Option<String>,
    /// When the lab received it.
    pub received_at: Option<String>,
}

/// zib LaboratoryTestResult: one determination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabTestResult {
    /// Local id within the event.
    pub id: String,
    /// Primary test code (NHG table 45, LOINC or lab-local).
    pub test: Coding,
    /// Further codes for the same test.
    pub other_codes: Vec<Coding>,
    /// Lab-local code, kept next to any mapped code.
    pub local_code: Option<String>,
    /// Lab-local display name.
    pub local_name: Option<String>,
    /// final, preliminary, registered (pending), corrected, cancelled.
    pub status: String,
    /// Result exactly as the source gave it.
    pub value_text: Option<String>,
    /// Coded result (FHIR `valueCodeableConcept`), e.g. SNOMED CT.
    pub value_coding: Option<Coding>,
    /// Numeric result as a decimal string.
    pub value_decimal: Option<String>,
    /// `<`, `<=`, `>=`, `>` before the value.
    pub comparator: Option<String>,
    /// Unit as written.
    pub unit: Option<String>,
    /// Unit code system (UCUM) when the unit is coded.
    pub unit_system: Option<String>,
    /// Lower reference limit.
    pub reference_low: Option<String>,
    /// Upper reference limit.
    pub reference_high: Option<String>,
    /// Reference range as text.
    pub reference_text: Option<String>,
    /// HL7 ObservationInterpretation code (N, H, L, A, HH, LL).
    pub interpretation: Option<String>,
    /// Normality flag as the source wrote it.
    pub interpretation_raw: Option<String>,
    /// The specimen it was measured on.
    pub specimen_id: Option<String>,
    /// Lab section (HEMATOLOGIE, CHEMIE).
    pub section: Option<String>,
    /// Coded section or result type (FHIR category coding), e.g. SNOMED CT.
    pub section_code: Option<Coding>,
    /// When it was measured or sampled.
    pub effective_at: Option<String>,
    /// Remarks on this determination.
    pub comments: Vec<String>,
    /// Identifiers of this result (`Observation.identifier`).
    #[serde(default)]
    pub identifiers: Vec<Identifier>,
    /// The result this one corrects, where the source names it: its identifier, or its
    /// reference with system `urn:ietf:rfc:3986`.
    #[serde(default)]
    pub corrects: Option<Identifier>,
    /// Interpretation as text (`interpretation.text`).
    #[serde(default)]
    pub interpretation_text: Option<String>,
    /// Display of the interpretation coding as the source gave it.
    #[serde(default)]
    pub interpretation_display: Option<String>,
    /// A panel's members (`hasMember`): ids of results in this event, else the reference
    /// as the source gave it.
    #[serde(default)]
    pub members: Vec<String>,
    /// The determination's type code as the source gave it (MEDLAB `BEP` element 1).
    #[serde(default)]
    pub type_code: Option<String>,
}

impl LabTestResult {
    /// A determination of `test` with status `status` and nothing else known yet: every
    /// other field empty, for the mapping to fill in.
    #[must_use]
    pub fn new(id: String, test: Coding, status: &str) -> LabTestResult {
        LabTestResult {
            id,
            test,
            status: status.to_owned(),
            ..LabTestResult::default()
        }
    }
}

/// Lab results of one patient from one report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabResultEvent {
    /// Common header.
    pub header: EventHeader,
    /// The patient.
    pub patient: Option<Patient>,
    /// The lab.
    pub performer: Option<HealthcareProvider>,
    /// Requesting doctor.
    pub requester: Option<HealthProfessional>,
    /// Other doctors: department, copy-to.
    pub professionals: Vec<HealthProfessional>,
    /// Specimens / requests.
    pub specimens: Vec<Specimen>,
    /// Determinations, pending ones with status `registered`.
    pub results: Vec<LabTestResult>,
    /// General lab comments.
    pub comments: Vec<String>,
    /// Identifiers of the report (`DiagnosticReport.identifier`, MEDRPT `RFF+SRI`).
    #[serde(default)]
    pub report_identifiers: Vec<Identifier>,
    /// When the report was issued (`DiagnosticReport.issued`, MEDRPT `DTM+ISR`).
    #[serde(default)]
    pub reported_at: Option<String>,
    /// Identifiers of the order (`ServiceRequest.identifier`, MEDRPT `RFF+ROI`/`SOI`).
    #[serde(default)]
    pub order_identifiers: Vec<Identifier>,
    /// Doubtful content that did not stop the mapping (uncoded test, reversed reference
    /// range), for the lineage; no patient data.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The laboratory that performed the determinations when the source names it apart
    /// from the reporting one (MEDRPT `REL+PRF`).
    #[serde(default)]
    pub performing_lab: Option<HealthcareProvider>,
}

impl LabResultEvent {
    /// A lab result with `header` and nothing else known yet, for the mapping to fill in.
    #[must_use]
    pub fn new(header: EventHeader) -> LabResultEvent {
        LabResultEvent {
            header,
            patient: None,
            performer: None,
            requester: None,
            professionals: Vec::new(),
            specimens: Vec::new(),
            results: Vec::new(),
            comments: Vec::new(),
            report_identifiers: Vec::new(),
            reported_at: None,
            order_identifiers: Vec::new(),
            warnings: Vec::new(),
            performing_lab: None,
        }
    }
}

/// A letter or document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LetterEvent {
    /// Common header.
    pub header: EventHeader,
    /// The patient it is about.
    pub patient: Option<Patient>,
    /// Who wrote it.
    pub author: Option<HealthProfessional>,
    /// Organisation of the author.
    pub author_organization: Option<HealthcareProvider>,
    /// Addressee.
    pub recipient: Option<HealthProfessional>,
    /// Date of the letter.
    pub date: Option<String>,
    /// Title or subject (never in a mail subject line).
    pub title: Option<String>,
    /// Plain text of the letter.
    pub text: Option<String>,
    /// Documents stored by hash.
    pub attachments: Vec<Attachment>,
}

impl LetterEvent {
    /// A letter with `header` and nothing else known yet, for the mapping to fill in.
    #[must_use]
    pub fn new(header: EventHeader) -> LetterEvent {
        LetterEvent {
            header,
            patient: None,
            author: None,
            author_organization: None,
            recipient: None,
            date: None,
            title: None,
            text: None,
            attachments: Vec::new(),
        }
    }
}

/// A Composition section of a handover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// Section code.
    pub code: Option<Coding>,
    /// Section title.
    pub title: Option<String>,
    /// Narrative text.
    pub text: Option<String>,
}

/// The focal ServiceRequest of a handover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Referral {
    /// ServiceRequest id in the sender's system.
    pub id: Option<String>,
    /// What is requested (SNOMED 11131000146102 for transfer of care from ambulance).
    pub code: Coding,
    /// Request status.
    pub status: Option<String>,
    /// Priority.
    pub priority: Option<String>,
    /// When it was written.
    pub authored_on: Option<String>,
    /// Reason for referral as text.
    pub reason: Option<String>,
}

/// An acute-care handover (e.g. ambulance -> GP post referral).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcuteHandoverEvent {
    /// Common header.
    pub header: EventHeader,
    /// The patient.
    pub patient: Option<Patient>,
    /// The referral.
    pub referral: Referral,
    /// Who refers.
    pub requester: Option<HealthProfessional>,
    /// Referring organisation.
    pub requester_organization: Option<HealthcareProvider>,
    /// Receiving organisation.
    pub receiver_organization: Option<HealthcareProvider>,
    /// Composition sections.
    pub sections: Vec<Section>,
    /// Documents stored by hash (ECG, ...).
    pub attachments: Vec<Attachment>,
    /// `Composition.type`.
    #[serde(default)]
    pub composition_type: Option<Coding>,
    /// `Composition.title`.
    #[serde(default)]
    pub composition_title: Option<String>,
    /// `Composition.date`, as the source gave it.
    #[serde(default)]
    pub composition_date: Option<String>,
    /// `Composition.author` when it is a professional.
    #[serde(default)]
    pub composition_author: Option<Box<HealthProfessional>>,
}

/// A notify-then-pull notification; no patient data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverNotificationEvent {
    /// Common header.
    pub header: EventHeader,
    /// Absolute reference of the sender's Task.
    pub task_reference: String,
    /// Task status.
    pub task_status: String,
    /// Where the receiver pulls from.
    pub sender_endpoint: Option<String>,
    /// Party id of the requester.
    pub requester: Option<String>,
    /// Party id of the owner.
    pub owner: Option<String>,
    /// `Task.input` references: what the receiver may pull (no patient data, no credentials).
    #[serde(default)]
    pub inputs: Vec<TaskInput>,
}

/// One `Task.input` that points at something (Twiin notified pull:
/// `read-available-resource`, `query-available-resources`, `get-workflow-task`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInput {
    /// `Task.input.type`, first coding.
    pub type_code: Option<Coding>,
    /// `valueReference.reference` (or `valueUrl`, `valueUri`).
    pub reference: String,
}

macro_rules! event_record {
    ($t:ty, $file:literal) => {
        impl AvroRecord for $t {
            const SCHEMA_JSON: &'static str = include_str!($file);
            crate::compiled_schema!();
        }
    };
}
event_record!(LabResultEvent, "../avro/event_lab_result.avsc");
event_record!(LetterEvent, "../avro/event_letter.avsc");
event_record!(AcuteHandoverEvent, "../avro/event_acute_handover.avsc");
event_record!(
    HandoverNotificationEvent,
    "../avro/event_handover_notification.avsc"
);

/// Any event. JSON form (webhooks) is the record itself with `kind` in its header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Event {
    /// A lab result.
    LabResult(LabResultEvent),
    /// A letter.
    Letter(LetterEvent),
    /// An acute handover.
    AcuteHandover(AcuteHandoverEvent),
    /// A handover notification.
    HandoverNotification(HandoverNotificationEvent),
}

impl Event {
    /// Documents the event refers to by SHA-256 (their bytes live in the content store).
    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        match self {
            Event::Letter(e) => &e.attachments,
            Event::AcuteHandover(e) => &e.attachments,
            Event::LabResult(_) | Event::HandoverNotification(_) => &[],
        }
    }

    /// What the mapping found doubtful but kept (for the lineage); no patient data.
    #[must_use]
    pub fn warnings(&self) -> &[String] {
        match self {
            Event::LabResult(e) => &e.warnings,
            Event::Letter(_) | Event::AcuteHandover(_) | Event::HandoverNotification(_) => &[],
        }
    }

    /// The common header.
    #[must_use]
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::LabResult(e) => &e.header,
            Event::Letter(e) => &e.header,
            Event::AcuteHandover(e) => &e.header,
            Event::HandoverNotification(e) => &e.header,
        }
    }

    /// The common header, to fill in.
    pub fn header_mut(&mut self) -> &mut EventHeader {
        match self {
            Event::LabResult(e) => &mut e.header,
            Event::Letter(e) => &mut e.header,
            Event::AcuteHandover(e) => &mut e.header,
            Event::HandoverNotification(e) => &mut e.header,
        }
    }

    /// The kind.
    #[must_use]
    pub fn kind(&self) -> EventKind {
        self.header().kind
    }

    /// Encode for the kind's topic.
    ///
    /// # Errors
    /// When the value does not fit its schema.
    pub fn to_avro(&self) -> Result<Vec<u8>, CodecError> {
        match self {
            Event::LabResult(e) => e.to_avro(),
            Event::Letter(e) => e.to_avro(),
            Event::AcuteHandover(e) => e.to_avro(),
            Event::HandoverNotification(e) => e.to_avro(),
        }
    }

    /// Decode a value from the topic of `kind`.
    ///
    /// # Errors
    /// When the value is not of that kind's schema.
    pub fn from_avro(kind: EventKind, bytes: &[u8]) -> Result<Event, CodecError> {
        Ok(match kind {
            EventKind::LabResult => Event::LabResult(LabResultEvent::from_avro(bytes)?),
            EventKind::Letter => Event::Letter(LetterEvent::from_avro(bytes)?),
            EventKind::AcuteHandover => Event::AcuteHandover(AcuteHandoverEvent::from_avro(bytes)?),
            EventKind::HandoverNotification => {
                Event::HandoverNotification(HandoverNotificationEvent::from_avro(bytes)?)
            }
        })
    }
}

impl fmt::Debug for Patient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Patient({} identifiers)", self.identifiers.len())
    }
}

impl fmt::Debug for HumanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HumanName(..)")
    }
}

impl fmt::Debug for ContactPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ContactPoint({:?}, {} chars)",
            self.system,
            self.value.len()
        )
    }
}

impl fmt::Debug for TaskInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ty = self.type_code.as_ref().map(|c| c.code.as_str());
        write!(f, "TaskInput({ty:?}, {} chars)", self.reference.len())
    }
}

impl fmt::Debug for Contact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Contact({} relationships)", self.relationships.len())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Address(..)")
    }
}
