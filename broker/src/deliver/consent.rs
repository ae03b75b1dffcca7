//! Consent: before a subscription delivers an event, ask whether the patient allows the
//! receiving party to have it for the subscription's purpose. A refused delivery is the
//! outcome `filtered` with reason `no_consent` (lineage and the delivery-outcomes topic),
//! never a silent drop.
//!
//! [`ConsentRegistry`] is the seam: [`FileRegistry`] reads a CSV file kept by the operator
//! (re-read when it changes); [`crate::deliver::mitz::MitzRegistry`] asks Mitz, the national
//! consent service, its closed question over mTLS (`[consent.mitz]`). The patient is known only by the pseudonym ketenbus already uses as
//! the topic key (the patient key, a keyed hash of the BSN); `ketenbus consent pseudonym`
//! computes it for a BSN.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ketenbus_connectors::{BoxFuture, Payload};
use serde::Deserialize;

use crate::env::Problem;

/// `[consent]`: where consent is looked up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsentConfig {
    /// CSV file of consent decisions, one per line:
    /// `patient,party,purpose,decision` with the patient pseudonym (patient key), the
    /// receiving party id (or `*`), the purpose (or `*`) and `allow` or `deny`. Lines
    /// starting with `#` and a header line starting with `patient` are skipped. Re-read
    /// when the file changes (checked at most once a second).
    pub file: Option<PathBuf>,
    /// Ask Mitz instead (`[consent.mitz]`); set either `file` or this, not both.
    pub mitz: Option<crate::deliver::mitz::MitzConfig>,
}

/// What a subscription does without a recorded decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultDecision {
    /// Deliver.
    Allow,
    /// Do not deliver (outcome `filtered`, reason `no_consent`).
    Deny,
}

/// `[subscriptions.consent]`: deliver only what consent allows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConsent {
    /// Party id of the receiver, as consent is recorded for it (`agb:…`, `ura:…`). Absent:
    /// each record's own receiver, for a sink that sends every record to its receiver
    /// through the address book.
    #[serde(default)]
    pub party: Option<String>,
    /// Purpose of the exchange, as consent is recorded (e.g. `treatment`).
    #[serde(default = "treatment")]
    pub purpose: String,
    /// Without a recorded decision (also for raw messages, whose patient is not known):
    /// `deny` (the default) or `allow`.
    #[serde(default = "deny")]
    pub default: DefaultDecision,
}

fn treatment() -> String {
    "treatment".into()
}

fn deny() -> DefaultDecision {
    DefaultDecision::Deny
}

/// A question to a consent registry.
#[derive(Debug, Clone, Copy)]
pub struct ConsentQuery<'a> {
    /// Patient pseudonym (the patient key).
    pub patient: &'a str,
    /// Receiving party id.
    pub party: &'a str,
    /// Purpose.
    pub purpose: &'a str,
    /// The patient's BSN, for a registry that must name it to its service (Mitz); absent
    /// for raw messages and events without one. Prints as `Bsn(***)`.
    pub bsn: Option<Bsn<'a>>,
}

/// A BSN on its way to a consent service: never printed, never logged.
#[derive(Clone, Copy)]
pub struct Bsn<'a>(pub &'a str);

impl std::fmt::Debug for Bsn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bsn(***)")
    }
}

/// The BSN of an event's patient (nl-core Patient identifier), if it names one.
#[must_use]
pub fn event_bsn(event: &ketenbus_schemas::Event) -> Option<&str> {
    crate::route::keys::patient_of(event)?
        .identifiers
        .iter()
        .find(|i| i.system == ketenbus_schemas::event::systems::BSN)
        .map(|i| i.value.as_str())
}

/// A registry's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The patient allows it.
    Allowed,
    /// The patient objects.
    Denied,
    /// Nothing recorded: the subscription's default applies.
    Unknown,
}

/// The registry could not answer now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("consent registry unavailable: {0}")]
pub struct ConsentError(pub String);

impl ConsentError {
    /// Ask again later: a delivery waits rather than going out unchecked.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Retryable
    }
}

/// Where consent is recorded. Object-safe; implementations may do I/O.
pub trait ConsentRegistry: Send + Sync {
    /// The recorded decision for `query`.
    fn lookup<'a>(&'a self, query: ConsentQuery<'a>)
    -> BoxFuture<'a, Result<Answer, ConsentError>>;
}

type Rules = HashMap<(String, String, String), bool>;

/// Consent decisions from a CSV file, re-read when its modification time changes. When a
/// changed file cannot be read, the last good rules stay in force and an error is logged.
pub struct FileRegistry {
    path: PathBuf,
    rules: RwLock<(Option<SystemTime>, Arc<Rules>)>,
    checked: Mutex<Instant>,
}

impl std::fmt::Debug for FileRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRegistry")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why a consent file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConsentFileError {
    /// Unreadable.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A line that is not `patient,party,purpose,allow|deny` (no values quoted).
    #[error("{path} line {line}: {what}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
}

/// Parse the CSV text of a consent file.
///
/// # Errors
/// The first malformed line (by number; values are never quoted).
pub fn parse_rules(path: &Path, text: &str) -> Result<Rules, ConsentFileError> {
    let mut rules = Rules::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (i == 0 && line.starts_with("patient")) {
            continue;
        }
        let bad = |what| ConsentFileError::Line {
            path: path.display().to_string(),
            line: i + 1,
            what,
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [patient, party, purpose, decision] = fields.as_slice() else {
            return Err(bad("expected 4 fields: patient,party,purpose,decision"));
        };
        if patient.is_empty() || party.is_empty() || purpose.is_empty() {
            return Err(bad("empty field"));
        }
        let allowed = match decision.to_ascii_lowercase().as_str() {
            "allow" | "allowed" | "yes" => true,
            "deny" | "denied" | "no" => false,
            _ => return Err(bad("decision must be allow or deny")),
        };
        rules.insert(
            (
                (*patient).to_owned(),
                (*party).to_owned(),
                (*purpose).to_owned(),
            ),
            allowed,
        );
    }
    Ok(rules)
}

fn read_rules(path: &Path) -> Result<(Option<SystemTime>, Rules), ConsentFileError> {
    let read = |error| ConsentFileError::Read {
        path: path.display().to_string(),
        error,
    };
    let modified = std::fs::metadata(path).map_err(read)?.modified().ok();
    let text = std::fs::read_to_string(path).map_err(read)?;
    Ok((modified, parse_rules(path, &text)?))
}

impl FileRegistry {
    /// Read the file once; later changes are picked up on lookups.
    ///
    /// # Errors
    /// When it cannot be read or parsed.
    pub fn open(path: &Path) -> Result<FileRegistry, ConsentFileError> {
        let (modified, rules) = read_rules(path)?;
        Ok(FileRegistry {
            path: path.to_path_buf(),
            rules: RwLock::new((modified, Arc::new(rules))),
            checked: Mutex::new(Instant::now()),
        })
    }

    fn current(&self) -> Arc<Rules> {
        let due = {
            let mut checked = self.checked.lock().expect("consent lock");
            let due = checked.elapsed() >= Duration::from_secs(1);
            if due {
                *checked = Instant::now();
            }
            due
        };
        if due {
            let modified = std::fs::metadata(&self.path)
                .ok()
                .and_then(|m| m.modified().ok());
            let known = self.rules.read().expect("consent lock").0;
            if modified != known {
                match read_rules(&self.path) {
                    Ok((m, r)) => {
                        tracing::info!(file = %self.path.display(), rules = r.len(), "consent file re-read");
                        *self.rules.write().expect("consent lock") = (m, Arc::new(r));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "consent file not re-read; the previous rules stay in force");
                    }
                }
            }
        }
        Arc::clone(&self.rules.read().expect("consent lock").1)
    }

    /// The decision for `q`: the most specific rule wins (exact party and purpose, then
    /// purpose `*`, then party `*`, then both).
    #[must_use]
    pub fn decide(&self, q: ConsentQuery<'_>) -> Answer {
        let rules = self.current();
        for (party, purpose) in [
            (q.party, q.purpose),
            (q.party, "*"),
            ("*", q.purpose),
            ("*", "*"),
        ] {
            let key = (q.patient.to_owned(), party.to_owned(), purpose.to_owned());
            if let Some(allowed) = rules.get(&key) {
                return if *allowed {
                    Answer::Allowed
                } else {
                    Answer::Denied
                };
            }
        }
        Answer::Unknown
    }
}

impl ConsentRegistry for FileRegistry {
    fn lookup<'a>(
        &'a self,
        query: ConsentQuery<'a>,
    ) -> BoxFuture<'a, Result<Answer, ConsentError>> {
        Box::pin(async move { Ok(self.decide(query)) })
    }
}

impl ConsentRegistry for crate::deliver::mitz::MitzRegistry {
    fn lookup<'a>(
        &'a self,
        query: ConsentQuery<'a>,
    ) -> BoxFuture<'a, Result<Answer, ConsentError>> {
        use crate::deliver::mitz::{Decision, Question};
        Box::pin(async move {
            // Without a BSN Mitz cannot be asked: nothing is known (the default applies).
            let Some(Bsn(bsn)) = query.bsn else {
                return Ok(Answer::Unknown);
            };
            let q = Question {
                patient: query.patient,
                bsn,
                party: query.party,
                purpose: query.purpose,
            };
            match self.decide(q).await {
                Ok(Decision::Permit) => Ok(Answer::Allowed),
                Ok(Decision::Deny) => Ok(Answer::Denied),
                Ok(Decision::NotApplicable | Decision::Indeterminate) => Ok(Answer::Unknown),
                Err(e) => Err(ConsentError(e.to_string())),
            }
        })
    }
}

/// One subscription's consent check: a registry and the subscription's party, purpose and
/// default.
pub struct ConsentCheck {
    /// Where to ask.
    pub registry: Arc<dyn ConsentRegistry>,
    /// Party, purpose, default.
    pub policy: SubscriptionConsent,
}

impl std::fmt::Debug for ConsentCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentCheck")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What a consent check decided for one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver.
    Deliver,
    /// Do not deliver; the detail says why without patient data.
    Withhold(String),
}

impl ConsentCheck {
    /// Decide for `payload`. An event concerns its own patient; a raw message every patient
    /// it declares (`raw_patients`, found by the router's normalisers): it is delivered only
    /// when each of them allows it (or, with nothing recorded, the default does).
    ///
    /// # Errors
    /// When the registry cannot answer now (retry later).
    pub async fn verdict(
        &self,
        payload: &Payload,
        raw_patients: &[String],
    ) -> Result<Verdict, ConsentError> {
        let (patients, receiver, bsn): (Vec<&str>, Option<String>, Option<&str>) = match payload {
            Payload::Event(e) => (
                e.header().patient_key.as_deref().into_iter().collect(),
                e.header().receiver.clone(),
                event_bsn(e),
            ),
            Payload::Raw(env) => (
                raw_patients.iter().map(String::as_str).collect(),
                env.receiver.clone(),
                None,
            ),
        };
        let p = &self.policy;
        let party = p.party.clone().or(receiver);
        // The strictest answer of all the patients: one refusal withholds the message.
        let mut answer = if patients.is_empty() {
            Answer::Unknown
        } else {
            Answer::Allowed
        };
        if let Some(party) = &party {
            for patient in patients {
                match self
                    .registry
                    .lookup(ConsentQuery {
                        patient,
                        party,
                        purpose: &p.purpose,
                        bsn: bsn.map(Bsn),
                    })
                    .await?
                {
                    Answer::Denied => {
                        answer = Answer::Denied;
                        break;
                    }
                    Answer::Unknown => answer = Answer::Unknown,
                    Answer::Allowed => {}
                }
            }
        } else {
            answer = Answer::Unknown;
        }
        let party = party.as_deref().unwrap_or("a record without receiver");
        Ok(match (answer, p.default) {
            (Answer::Allowed, _) | (Answer::Unknown, DefaultDecision::Allow) => Verdict::Deliver,
            (Answer::Denied, _) => Verdict::Withhold(format!(
                "the patient denied consent for {party} / {}",
                p.purpose
            )),
            (Answer::Unknown, DefaultDecision::Deny) => Verdict::Withhold(format!(
                "no consent recorded for {party} / {} and the subscription's default is deny",
                p.purpose
            )),
        })
    }
}

impl ConsentConfig {
    /// Problems with `[consent]` and the subscriptions' consent tables: for the `i`th
    /// subscription, its table and whether its sink sends each record to its receiver.
    #[must_use]
    pub fn problems(&self, subscriptions: &[(usize, &SubscriptionConsent, bool)]) -> Vec<Problem> {
        Problem::all(problems(self, subscriptions))
    }

    /// The registry `[consent]` names, if any.
    ///
    /// # Errors
    /// The consent file cannot be read.
    pub fn registry(&self) -> Result<Option<Arc<dyn ConsentRegistry>>, ConsentFileError> {
        Ok(match &self.file {
            Some(f) => Some(Arc::new(FileRegistry::open(f)?) as Arc<dyn ConsentRegistry>),
            None => None,
        })
    }
}

/// Problems with `[consent]` and the subscriptions' consent tables, as (key path, message).
fn problems(
    consent: &ConsentConfig,
    subscriptions: &[(usize, &SubscriptionConsent, bool)],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(file) = &consent.file
        && let Err(e) = read_rules(file)
    {
        out.push(("consent.file".into(), e.to_string()));
    }
    if consent.file.is_some() && consent.mitz.is_some() {
        out.push((
            "consent.mitz".into(),
            "set either [consent] file or [consent.mitz], not both".into(),
        ));
    }
    for (i, s, sends_to_receiver) in subscriptions {
        if consent.file.is_none() && consent.mitz.is_none() {
            out.push((
                format!("subscriptions[{i}].consent"),
                "needs a consent registry: set [consent] file or [consent.mitz]".into(),
            ));
        }
        match &s.party {
            Some(party)
                if !party
                    .split_once(':')
                    .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty()) =>
            {
                out.push((
                    format!("subscriptions[{i}].consent.party"),
                    "must be a party id scheme:value, e.g. agb:01234567".into(),
                ));
            }
            None if !sends_to_receiver => out.push((
                format!("subscriptions[{i}].consent.party"),
                "required unless the sink sends each record to its receiver (address book)".into(),
            )),
            _ => {}
        }
        if s.purpose.trim().is_empty() || s.purpose.contains(',') {
            out.push((
                format!("subscriptions[{i}].consent.purpose"),
                "must be a word without commas".into(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_rule_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.csv");
        std::fs::write(
            &path,
            "patient,party,purpose,decision\n# comment\np1,agb:1,treatment,allow\np1,*,*,deny\np2,*,treatment,deny\n",
        )
        .unwrap();
        let r = FileRegistry::open(&path).unwrap();
        let q = |patient, party, purpose| ConsentQuery {
            patient,
            party,
            purpose,
            bsn: None,
        };
        assert_eq!(r.decide(q("p1", "agb:1", "treatment")), Answer::Allowed);
        assert_eq!(r.decide(q("p1", "agb:2", "treatment")), Answer::Denied);
        assert_eq!(r.decide(q("p2", "agb:1", "treatment")), Answer::Denied);
        assert_eq!(r.decide(q("p2", "agb:1", "research")), Answer::Unknown);
        assert_eq!(r.decide(q("p3", "agb:1", "treatment")), Answer::Unknown);
    }

    #[tokio::test]
    async fn without_a_party_each_record_is_checked_for_its_own_receiver() {
        use ketenbus_schemas::event::HandoverNotificationEvent;
        use ketenbus_schemas::{Event, EventHeader, EventKind};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consent.csv");
        std::fs::write(
            &path,
            "patient,party,purpose,decision\np1,agb:1,treatment,allow\np1,agb:2,treatment,deny\n",
        )
        .unwrap();
        let check = ConsentCheck {
            registry: Arc::new(FileRegistry::open(&path).unwrap()),
            policy: SubscriptionConsent {
                party: None,
                purpose: "treatment".into(),
                default: DefaultDecision::Deny,
            },
        };
        let to = |receiver: Option<&str>| {
            let mut header =
                EventHeader::new(EventKind::HandoverNotification, "env", 0, "fhir_json");
            header.patient_key = Some("p1".into());
            header.receiver = receiver.map(str::to_owned);
            Payload::Event(Arc::new(Event::HandoverNotification(
                HandoverNotificationEvent {
                    header,
                    task_reference: "https://hap.example.test/fhir/Task/1".into(),
                    task_status: "requested".into(),
                    sender_endpoint: None,
                    requester: None,
                    owner: None,
                    inputs: Vec::new(),
                },
            )))
        };
        assert_eq!(
            check.verdict(&to(Some("agb:1")), &[]).await.unwrap(),
            Verdict::Deliver
        );
        assert!(matches!(
            check.verdict(&to(Some("agb:2")), &[]).await.unwrap(),
            Verdict::Withhold(why) if why.contains("agb:2")
        ));
        assert!(matches!(
            check.verdict(&to(None), &[]).await.unwrap(),
            Verdict::Withhold(why) if why.contains("without receiver")
        ));
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let e = parse_rules(
            Path::new("c.csv"),
            "p1,agb:1,treatment,allow\np2,agb:1,maybe\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.csv line 2: expected 4 fields: patient,party,purpose,decision"
        );
        let e = parse_rules(Path::new("c.csv"), "p1,agb:1,treatment,perhaps\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_names_a_line(text in "\\PC{0,400}") {
            match parse_rules(Path::new("c.csv"), &text) {
                Ok(rules) => proptest::prop_assert!(rules.len() <= text.lines().count()),
                Err(ConsentFileError::Line { line, .. }) => {
                    proptest::prop_assert!(line >= 1 && line <= text.lines().count());
                }
                Err(e) => proptest::prop_assert!(false, "{e}"),
            }
        }
    }
}
