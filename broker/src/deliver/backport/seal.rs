//! `channel.header` values at rest: they carry the subscriber's credentials (a bearer token
//! for its endpoint), so `fhir-subscriptions.sqlite` keeps them sealed with AES-256-GCM
//! (ring), under a key made from the secret in the environment variable
//! `[fhir_subscriptions] header_key_env`, each sealed value bound to its Subscription's id.
//! Without that variable a Subscription with headers is refused; those without run as usual.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// The key from the environment variable `var` (`[fhir_subscriptions] header_key_env`):
/// `None` when it is not set (Subscriptions with `channel.header` are then refused).
///
/// # Errors
/// A [`crate::env::Problem`] at `fhir_subscriptions.header_key_env` when it is set but too short.
pub fn key_from(
    var: &str,
    env: &crate::env::Env,
) -> Result<Option<HeaderKey>, crate::env::Problem> {
    match env.var(var).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(secret) => HeaderKey::from_secret(&secret).map(Some).map_err(|e| {
            crate::env::Problem::new(
                "fhir_subscriptions.header_key_env",
                format!("environment variable {var}: {e}"),
            )
        }),
    }
}

/// What a `channel.header` value is shown as: a read never gives the credential back.
pub const MASK: &str = "****";

/// `Name: value` as shown: `Name: ****`.
#[must_use]
pub fn masked(header: &str) -> String {
    let name = header.split_once(':').map_or(header, |(n, _)| n).trim();
    format!("{name}: {MASK}")
}

/// The headers a change asks for (`asked`), where a masked value (as a read showed it)
/// keeps the value of the header of that name in `old`.
///
/// # Errors
/// The name of a masked header `old` does not have.
pub fn unmask(asked: &[String], old: &[String]) -> Result<Vec<String>, String> {
    let name_of = |h: &str| {
        h.split_once(':')
            .map_or(h, |(n, _)| n)
            .trim()
            .to_ascii_lowercase()
    };
    asked
        .iter()
        .map(|h| {
            if h.split_once(':').is_some_and(|(_, v)| v.trim() == MASK) {
                old.iter()
                    .find(|o| name_of(o) == name_of(h))
                    .cloned()
                    .ok_or_else(|| name_of(h))
            } else {
                Ok(h.clone())
            }
        })
        .collect()
}

/// Shortest secret the key is made from, in bytes.
pub const MIN_SECRET: usize = 32;

/// What a value may not be sealed or opened for.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The secret is too short.
    #[error("the channel.header key must be at least {MIN_SECRET} bytes")]
    Short,
    /// No random nonce could be drawn.
    #[error("no random nonce for sealing channel.header")]
    Random,
    /// Sealed under another key or for another Subscription, or changed.
    #[error("channel.header cannot be opened: sealed under another key, or changed")]
    Open,
}

/// The key channel.header values are sealed with.
pub struct HeaderKey(LessSafeKey);

impl std::fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderKey(..)")
    }
}

impl HeaderKey {
    /// The key made from `secret` (at least [`MIN_SECRET`] bytes): SHA-256 of a label and
    /// the secret.
    ///
    /// # Errors
    /// [`SealError::Short`].
    pub fn from_secret(secret: &str) -> Result<HeaderKey, SealError> {
        if secret.len() < MIN_SECRET {
            return Err(SealError::Short);
        }
        let mut h = Sha256::new();
        h.update(b"ketenbus fhir channel.header v1\0");
        h.update(secret.as_bytes());
        let key = UnboundKey::new(&AES_256_GCM, &h.finalize()).map_err(|_| SealError::Short)?;
        Ok(HeaderKey(LessSafeKey::new(key)))
    }

    /// `plain` sealed for Subscription `id`: a random nonce, then the ciphertext and tag.
    ///
    /// # Errors
    /// [`SealError::Random`].
    pub fn seal(&self, id: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut out = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut out,
            )
            .map_err(|_| SealError::Random)?;
        let mut sealed = nonce.to_vec();
        sealed.append(&mut out);
        Ok(sealed)
    }

    /// What [`HeaderKey::seal`] sealed for `id`.
    ///
    /// # Errors
    /// [`SealError::Open`] under another key, for another id, or changed.
    pub fn open(&self, id: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_masked_value_keeps_the_one_it_stands_for() {
        let old = vec![
            "Authorization: Bearer t0ken".to_owned(),
            "X-A: 1".to_owned(),
        ];
        assert_eq!(masked(&old[0]), "Authorization: ****");
        let asked = vec!["authorization: ****".to_owned(), "X-A: 2".to_owned()];
        assert_eq!(
            unmask(&asked, &old).unwrap(),
            vec![
                "Authorization: Bearer t0ken".to_owned(),
                "X-A: 2".to_owned()
            ]
        );
        assert_eq!(
            unmask(&["X-B: ****".to_owned()], &old).unwrap_err(),
            "x-b",
            "a mask stands for nothing new"
        );
    }

    const SECRET: &str = "a secret of at least thirty-two bytes!";

    #[test]
    fn sealed_values_open_only_under_their_key_and_id() {
        let k = HeaderKey::from_secret(SECRET).unwrap();
        let sealed = k.seal("sub1", b"Authorization: Bearer t0ken").unwrap();
        assert!(
            !sealed.windows(5).any(|w| w == b"t0ken" || w == b"Beare"),
            "nothing of the value in the clear"
        );
        assert_eq!(
            k.open("sub1", &sealed).unwrap(),
            b"Authorization: Bearer t0ken"
        );
        assert_ne!(
            sealed,
            k.seal("sub1", b"Authorization: Bearer t0ken").unwrap()
        );
        assert!(
            k.open("sub2", &sealed).is_err(),
            "bound to its Subscription"
        );
        let other = HeaderKey::from_secret("another secret of at least 32 bytes..").unwrap();
        assert!(other.open("sub1", &sealed).is_err(), "another key");
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(k.open("sub1", &changed).is_err(), "changed");
        assert!(k.open("sub1", &sealed[..5]).is_err(), "cut short");
        assert!(matches!(
            HeaderKey::from_secret("short"),
            Err(SealError::Short)
        ));
    }
}
