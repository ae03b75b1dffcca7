//! Patient keys: a keyed hash (HMAC-SHA256) of the patient's identifier, so one patient's
//! events share a topic key (and so a partition and an order) without the BSN in clear text.

use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use ketenbus_schemas::Event;
use ketenbus_schemas::event::{Identifier, systems};
use sha2::Sha256;

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
        let patient = match event {
            Event::LabResult(e) => e.patient.as_ref(),
            Event::Letter(e) => e.patient.as_ref(),
            Event::AcuteHandover(e) => e.patient.as_ref(),
            Event::HandoverNotification(_) => None,
        }?;
        let id = patient
            .identifiers
            .iter()
            .find(|i| i.system == systems::BSN)
            .or_else(|| patient.identifiers.first())?;
        Some(self.key_of(id))
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
