//! Patient keys: a keyed hash (HMAC-SHA256) of the patient's identifier, so one patient's
//! events share a topic key (and so a partition and an order) without the BSN in clear text.

use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use ketenbus_schemas::event::{Identifier, systems};
use ketenbus_schemas::{Event, RawEnvelope};
use serde::Deserialize;
use sha2::Sha256;

use crate::env::{Env, Problem};

/// `[keys]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Environment variable holding the secret for patient keys (keyed hash of the BSN).
    /// Every process sharing a Kafka cluster needs the same one. Without it, a random secret
    /// is generated once into `<data_dir>/patient-key.secret`.
    pub patient_key_secret_env: Option<String>,
}

impl KeysConfig {
    /// Every problem in `[keys]`: a named variable that is unset or too short.
    #[must_use]
    pub fn problems(&self, env: &Env) -> Vec<Problem> {
        let Some(var) = &self.patient_key_secret_env else {
            return Vec::new();
        };
        let message = match env.var(var) {
            None => format!("environment variable {var} is not set"),
            Some(v) if v.len() < 16 => {
                format!("environment variable {var} holds fewer than 16 bytes")
            }
            Some(_) => return Vec::new(),
        };
        vec![Problem::new("keys.patient_key_secret_env", message)]
    }

    /// The patient keyer: the secret from the named variable, else the data directory's.
    ///
    /// # Errors
    /// When the secret file cannot be read or written.
    pub fn keyer(&self, data_dir: &Path, env: &Env) -> std::io::Result<PatientKeyer> {
        let secret = self
            .patient_key_secret_env
            .as_ref()
            .and_then(|v| env.var(v));
        PatientKeyer::load(data_dir, secret)
    }
}

/// The patient an event is about, if it names one.
#[must_use]
pub fn patient_of(event: &Event) -> Option<&ketenbus_schemas::event::Patient> {
    match event {
        Event::LabResult(e) => e.patient.as_ref(),
        Event::Letter(e) => e.patient.as_ref(),
        Event::AcuteHandover(e) => e.patient.as_ref(),
        Event::HandoverNotification(_) => None,
    }
}

/// Makes patient keys with one secret.
#[derive(Clone)]
pub struct PatientKeyer {
    secret: Vec<u8>,
}

impl std::fmt::Debug for PatientKeyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientKeyer(***)")
    }
}

const SECRET_FILE: &str = "patient-key.secret";

impl PatientKeyer {
    /// A keyer with this secret.
    #[must_use]
    pub fn new(secret: Vec<u8>) -> PatientKeyer {
        PatientKeyer { secret }
    }

    /// The secret from `env_value` if given, else from `<data_dir>/patient-key.secret`,
    /// created with 32 random bytes (mode 0600) on first use.
    ///
    /// # Errors
    /// When the secret file cannot be read or written.
    pub fn load(data_dir: &Path, env_value: Option<String>) -> std::io::Result<PatientKeyer> {
        if let Some(v) = env_value {
            return Ok(PatientKeyer::new(v.into_bytes()));
        }
        let path = data_dir.join(SECRET_FILE);
        match std::fs::read(&path) {
            Ok(secret) if secret.len() >= 16 => Ok(PatientKeyer::new(secret)),
            Ok(_) => Err(std::io::Error::other(format!(
                "{} holds fewer than 16 bytes",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let secret: [u8; 32] = rand::random();
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&path)?;
                f.write_all(&secret)?;
                f.sync_all()?;
                Ok(PatientKeyer::new(secret.to_vec()))
            }
            Err(e) => Err(e),
        }
    }

    /// A key for another purpose, derived from the same secret (HMAC-SHA256 of `purpose`):
    /// every process sharing the patient-key secret derives the same one, and it reveals
    /// nothing about the secret or the patient keys.
    #[must_use]
    pub fn derive(&self, purpose: &str) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("hmac takes keys of any length");
        mac.update(b"ketenbus derived key\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Key of one identifier: 32 hex characters.
    #[must_use]
    pub fn key_of(&self, id: &Identifier) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("hmac takes keys of any length");
        mac.update(id.system.as_bytes());
        mac.update(b"|");
        mac.update(id.value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Key of the event's patient: the BSN when present, else the first identifier.
    #[must_use]
    pub fn key_for(&self, event: &Event) -> Option<String> {
        let patient = patient_of(event)?;
        let id = patient
            .identifiers
            .iter()
            .find(|i| i.system == systems::BSN)
            .or_else(|| patient.identifiers.first())?;
        Some(self.key_of(id))
    }
}

/// What a raw message itself declares about whom it concerns, for the audit record of its
/// delivery: found with the router's normalisers, which are pure, so this is the reading the
/// router made of the same bytes. The router hands its reading over ([`RawPatients::remember`]),
/// so a raw delivery that comes after it parses nothing again.
pub struct RawPatients {
    normalisers: crate::route::normalise::Normalisers,
    keyer: PatientKeyer,
    read: std::sync::Mutex<Remembered>,
}

/// Most readings the router hands over that are kept: the oldest go first. A raw delivery
/// that comes later normalises the message itself, as before.
const REMEMBERED: usize = 4096;

/// The router's latest readings by envelope id, oldest first in `order`.
#[derive(Default)]
struct Remembered {
    by_id: std::collections::HashMap<String, Declared>,
    order: std::collections::VecDeque<String>,
}

impl std::fmt::Debug for RawPatients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawPatients")
    }
}

/// The patients and receiver a raw message declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Patient keys (pseudonyms), each once, in the message's order.
    pub patients: Vec<String>,
    /// The first receiver party id its events name.
    pub receiver: Option<String>,
}

impl Declared {
    /// Take in the next event's patient key and receiver (the event as normalised, before
    /// the router fills in the transport's parties).
    pub fn add(&mut self, patient: Option<&str>, receiver: Option<&str>) {
        if let Some(p) = patient
            && !self.patients.iter().any(|k| k == p)
        {
            self.patients.push(p.to_owned());
        }
        if self.receiver.is_none() {
            self.receiver = receiver.map(str::to_owned);
        }
    }
}

impl RawPatients {
    /// With this build's normalisers and `keyer`.
    #[must_use]
    pub fn new(keyer: PatientKeyer) -> RawPatients {
        RawPatients {
            normalisers: crate::route::normalise::normalisers(),
            keyer,
            read: std::sync::Mutex::default(),
        }
    }

    /// Keep the router's reading of envelope `id` (what [`RawPatients::declared`] would find),
    /// for the raw deliveries of the same envelope.
    pub fn remember(&self, id: &str, declared: Declared) {
        let mut read = self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if read.by_id.insert(id.to_owned(), declared).is_none() {
            read.order.push_back(id.to_owned());
            if read.order.len() > REMEMBERED
                && let Some(oldest) = read.order.pop_front()
            {
                read.by_id.remove(&oldest);
            }
        }
    }

    /// The router's reading of envelope `id`, if it made one lately.
    #[must_use]
    pub fn remembered(&self, id: &str) -> Option<Declared> {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_id
            .get(id)
            .cloned()
    }

    /// The events `envelope` normalises into, each with its patient key as the router sets
    /// it (the console's on-request read); none for a message that does not normalise.
    #[must_use]
    pub fn events(&self, envelope: &RawEnvelope) -> Vec<Event> {
        let mut events =
            crate::route::normalise::events_of(&self.normalisers, envelope).unwrap_or_default();
        for e in &mut events {
            let key = self.keyer.key_for(e);
            e.header_mut().patient_key = key;
        }
        events
    }

    /// Normalise `envelope` once and take its patients and receiver; nothing for a message
    /// that does not normalise.
    #[must_use]
    pub fn declared(&self, envelope: &RawEnvelope) -> Declared {
        let Ok(events) = crate::route::normalise::events_of(&self.normalisers, envelope) else {
            return Declared::default();
        };
        let mut declared = Declared::default();
        for e in &events {
            declared.add(
                self.keyer.key_for(e).as_deref(),
                e.header().receiver.as_deref(),
            );
        }
        declared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_hide_the_bsn() {
        let k = PatientKeyer::new(b"0123456789abcdef".to_vec());
        let id = Identifier {
            system: systems::BSN.into(),
            value: "999911120".into(),
        };
        let a = k.key_of(&id);
        assert_eq!(a, k.key_of(&id));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("999911120"));
        let other = PatientKeyer::new(b"another secret!!".to_vec());
        assert_ne!(a, other.key_of(&id), "the key depends on the secret");
    }

    fn medlab(n: usize, bsn: &str) -> String {
        format!(
            "UNH+M{n:04}+MEDLAB:1'ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567'\
PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN{bsn}'DET+26:11:01+07:40'IDE+J+L{n:07}+bloed'\
SEC+CHEMIE'BEP+0+Kalium+5.9++mmol/l+>+3.5+5.0+K'UNT+8+M{n:04}'"
        )
    }

    #[test]
    fn a_raw_message_declares_each_of_its_patients_once_and_its_receiver() {
        let body = format!(
            "UNB+UNOA:1+500001234+500005678+261101:0815+IC0001'{}{}{}UNZ+3+IC0001'",
            medlab(1, "999990007"),
            medlab(2, "999990019"),
            medlab(3, "999990007"),
        );
        let envelope = RawEnvelope {
            id: "m".into(),
            received_at_ms: 0,
            connector: "http".into(),
            format: ketenbus_schemas::Format::Edifact,
            content_type: "application/EDIFACT".into(),
            sender: None,
            receiver: None,
            body: body.into_bytes(),
            attributes: Default::default(),
        };
        let k = PatientKeyer::new(b"0123456789abcdef".to_vec());
        let declared = RawPatients::new(k.clone()).declared(&envelope);
        let key = |bsn: &str| {
            k.key_of(&Identifier {
                system: systems::BSN.into(),
                value: bsn.into(),
            })
        };
        assert_eq!(declared.patients, vec![key("999990007"), key("999990019")]);
        assert_eq!(declared.receiver.as_deref(), Some("mailbox:500005678"));
        let unreadable = RawEnvelope {
            body: b"not edifact".to_vec(),
            ..envelope
        };
        assert_eq!(
            RawPatients::new(k).declared(&unreadable),
            Declared::default()
        );
    }

    #[test]
    fn the_router_s_readings_are_kept_in_a_bounded_window() {
        let raw = RawPatients::new(PatientKeyer::new(b"0123456789abcdef".to_vec()));
        let reading = |i: usize| Declared {
            patients: vec![format!("p{i}")],
            receiver: None,
        };
        for i in 0..=REMEMBERED {
            raw.remember(&format!("m{i}"), reading(i));
        }
        assert_eq!(raw.remembered("m0"), None, "the oldest went");
        assert_eq!(raw.remembered("m1"), Some(reading(1)));
        assert_eq!(
            raw.remembered(&format!("m{REMEMBERED}")),
            Some(reading(REMEMBERED))
        );
        let read = raw.read.lock().unwrap();
        assert_eq!(
            (read.by_id.len(), read.order.len()),
            (REMEMBERED, REMEMBERED)
        );
    }

    #[test]
    fn the_generated_secret_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = PatientKeyer::load(dir.path(), None).unwrap();
        let b = PatientKeyer::load(dir.path(), None).unwrap();
        let id = Identifier {
            system: systems::BSN.into(),
            value: "999911120".into(),
        };
        assert_eq!(a.key_of(&id), b.key_of(&id));
    }
}
