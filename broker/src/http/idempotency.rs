//! `Idempotency-Key` on the write routes: a sender that did not hear the answer (a timeout, a
//! `503`, a dropped connection) sends the same message again with the same key and gets the
//! first answer's message id, never a second message.
//!
//! The key is bound to the message id *before* the envelope is published, in
//! `<data_dir>/idempotency.db` (SQLite, synchronous = FULL): when a first attempt ended
//! without an answer but its envelope was stored after all (a Kafka producer that timed out
//! with the record possibly persisted), the retry publishes the envelope again under the same
//! id, and a duplicate carries the same id as every other duplicate ketenbus can make (event
//! ids, webhook `Idempotency-Key`). Keys are scoped by the authenticated sender, so one
//! sender cannot learn or reuse another's; the same key with another body is refused (`422
//! idempotency_key_reused`). Keys are kept for [`KEEP`].
//!
//! This index is per process: on a Kafka cluster with several nodes, a retry that reaches
//! another node is a new message.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use ketenbus_connectors::{Ingest, IngestError};
use ketenbus_schemas::RawEnvelope;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

/// How long a key is remembered.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// What a key says about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The message is stored under this id: answer it again.
    Stored(String),
    /// Publish the envelope under this id (a new key, or a retry of an attempt that was not
    /// answered), then call [`Claimed::stored`].
    Publish(String),
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// Empty, too long or not visible ASCII: `400`.
    #[error("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters")]
    Malformed,
    /// The key came before with another message: `422`.
    #[error("this Idempotency-Key was used for another message")]
    Reused,
    /// The index cannot be read or written: `503`, try again.
    #[error("idempotency index: {0}")]
    Unavailable(String),
}

/// One key's turn: requests with the same key take it one after the other.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// The idempotency index of one broker.
#[derive(Clone)]
pub struct Idempotency {
    db: Arc<Mutex<Connection>>,
    /// Keys being worked on now: a second request with the same key waits for the first.
    busy: Arc<Mutex<HashMap<(String, String), Turn>>>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

/// A key held by one request until it is dropped.
#[must_use]
pub struct Claimed {
    index: Idempotency,
    scope: String,
    key: String,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Idempotency {
    /// Open (or create) `<data_dir>/idempotency.db`, forgetting keys older than [`KEEP`].
    ///
    /// # Errors
    /// When the file cannot be opened or created.
    pub fn open(data_dir: &Path) -> rusqlite::Result<Idempotency> {
        let conn = Connection::open(data_dir.join("idempotency.db"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS keys (
                 scope TEXT NOT NULL,
                 key TEXT NOT NULL,
                 id TEXT NOT NULL,
                 body_sha256 TEXT NOT NULL,
                 stored INTEGER NOT NULL,
                 at_ms INTEGER NOT NULL,
                 PRIMARY KEY (scope, key)
             );",
        )?;
        let index = Idempotency {
            db: Arc::new(Mutex::new(conn)),
            busy: Arc::default(),
        };
        index.forget_old()?;
        Ok(index)
    }

    fn forget_old(&self) -> rusqlite::Result<usize> {
        let cutoff =
            ketenbus_schemas::now_ms() - i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
        lock(&self.db).execute("DELETE FROM keys WHERE at_ms < ?1", params![cutoff])
    }

    /// Claim `key` for `scope` (the authenticated sender, or `anonymous`) and a message body
    /// (its SHA-256, lowercase hex): what to answer or publish, and the key held until the answer is given.
    ///
    /// # Errors
    /// [`IdempotencyError`]: malformed, reused for another body, or the index unavailable.
    pub async fn claim(
        &self,
        scope: &str,
        key: &str,
        body_sha256: String,
        new_id: impl FnOnce() -> String,
    ) -> Result<(Claim, Claimed), IdempotencyError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdempotencyError::Malformed);
        }
        let slot = (scope.to_owned(), key.to_owned());
        let turn = Arc::clone(lock(&self.busy).entry(slot.clone()).or_default());
        let turn = turn.lock_owned().await;
        let claimed = Claimed {
            index: self.clone(),
            scope: slot.0,
            key: slot.1,
            _turn: turn,
        };
        let sha = body_sha256;
        let (scope, key) = (claimed.scope.clone(), claimed.key.clone());
        let index = self.clone();
        let id = new_id();
        let claim = tokio::task::spawn_blocking(move || {
            let db = lock(&index.db);
            let found: Option<(String, String, bool)> = db
                .query_row(
                    "SELECT id, body_sha256, stored FROM keys WHERE scope = ?1 AND key = ?2",
                    params![scope, key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(|e| IdempotencyError::Unavailable(e.to_string()))?;
            match found {
                Some((_, other, _)) if other != sha => Err(IdempotencyError::Reused),
                Some((id, _, true)) => Ok(Claim::Stored(id)),
                Some((id, _, false)) => Ok(Claim::Publish(id)),
                None => {
                    db.execute(
                        "INSERT INTO keys (scope, key, id, body_sha256, stored, at_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                        params![scope, key, id, sha, ketenbus_schemas::now_ms()],
                    )
                    .map_err(|e| IdempotencyError::Unavailable(e.to_string()))?;
                    Ok(Claim::Publish(id))
                }
            }
        })
        .await
        .map_err(|e| IdempotencyError::Unavailable(e.to_string()))??;
        Ok((claim, claimed))
    }
}

/// A message body the HTTP layer wrote to the body store as it arrived (`http::budget`),
/// handed to the route as a request extension; shared so the request can be cloned, the file
/// removed when the last holder lets go unless an envelope claimed it.
#[derive(Clone, Debug)]
pub struct SpooledBody(pub Arc<crate::bus::bodies::Spooled>);

/// A write route's message body.
#[derive(Debug)]
pub enum Payload {
    /// Held in memory.
    Held(bytes::Bytes),
    /// Written to the body store as it arrived.
    Spooled(Arc<crate::bus::bodies::Spooled>),
}

impl Payload {
    /// The body's length.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Payload::Held(b) => b.len(),
            Payload::Spooled(s) => s.len(),
        }
    }

    /// Whether the body is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body's SHA-256, lowercase hex.
    #[must_use]
    pub fn sha256(&self) -> String {
        match self {
            Payload::Held(b) => hex::encode(Sha256::digest(b)),
            Payload::Spooled(s) => s.sha256().to_owned(),
        }
    }
}

/// Why a write route's message was not taken.
#[derive(Debug)]
pub enum NotTaken {
    /// The `Idempotency-Key` cannot be used.
    Key(IdempotencyError),
    /// The log did not take it.
    Ingest(IngestError),
}

impl Idempotency {
    /// Take a message in once per `Idempotency-Key` (`key`, scoped by `scope`): the id stored
    /// under the key, else the id of the envelope `envelope(id, body)` makes, once it is
    /// durable. Without a key every call is a message of its own. A held `body` is handed on
    /// as the buffer it came in (no copy when nothing else holds it); a spooled one as the
    /// attribute that names its file, the envelope's body empty.
    ///
    /// # Errors
    /// [`NotTaken`]: the key cannot be used, or the log did not take the envelope.
    pub async fn accept_once(
        &self,
        ingest: &dyn Ingest,
        key: Option<&str>,
        scope: &str,
        body: Payload,
        envelope: impl FnOnce(String, Vec<u8>) -> RawEnvelope,
    ) -> Result<String, NotTaken> {
        let (id, held) = match key {
            None => (ketenbus_schemas::new_envelope_id(), None),
            Some(k) => match self
                .claim(scope, k, body.sha256(), ketenbus_schemas::new_envelope_id)
                .await
                .map_err(NotTaken::Key)?
            {
                (Claim::Stored(id), _) => return Ok(id),
                (Claim::Publish(id), held) => (id, Some(held)),
            },
        };
        let (env, spooled) = match body {
            Payload::Held(bytes) => (envelope(id, Vec::from(bytes)), None),
            Payload::Spooled(spooled) => {
                let mut env = envelope(id, Vec::new());
                env.attributes.insert(
                    crate::bus::bodies::ATTRIBUTE.to_owned(),
                    spooled.attribute(),
                );
                (env, Some(spooled))
            }
        };
        let accepted = ingest.accept(env).await.map_err(NotTaken::Ingest)?;
        // Held until the log has the envelope: a spooled body's file is then the envelope's.
        drop(spooled);
        if let Some(held) = held
            && let Err(e) = held.stored().await
        {
            // Stored all the same; a retry with this key publishes it again under the same id.
            tracing::warn!(error = %e, "idempotency index not updated");
        }
        Ok(accepted.id)
    }
}

impl Claimed {
    /// The message is durable: later requests with this key get its id.
    ///
    /// # Errors
    /// When the index cannot be written (the message is stored; a retry publishes it again
    /// under the same id).
    pub async fn stored(self) -> Result<(), IdempotencyError> {
        let (db, scope, key) = (
            Arc::clone(&self.index.db),
            self.scope.clone(),
            self.key.clone(),
        );
        tokio::task::spawn_blocking(move || {
            lock(&db)
                .execute(
                    "UPDATE keys SET stored = 1 WHERE scope = ?1 AND key = ?2",
                    params![scope, key],
                )
                .map(|_| ())
                .map_err(|e| IdempotencyError::Unavailable(e.to_string()))
        })
        .await
        .map_err(|e| IdempotencyError::Unavailable(e.to_string()))?
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let mut busy = lock(&self.index.busy);
        let slot = (
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.key),
        );
        // Only this request's turn refers to the lock besides the map: nobody waits.
        if busy.get(&slot).is_some_and(|m| Arc::strong_count(m) <= 2) {
            busy.remove(&slot);
        }
    }
}

/// The `Idempotency-Key` request header, when it is text.
pub fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or("\u{0}"))
}

/// Status and code for a key that cannot be used.
pub fn idempotency_refusal(e: &IdempotencyError) -> (StatusCode, &'static str) {
    match e {
        IdempotencyError::Malformed => (StatusCode::BAD_REQUEST, "bad_idempotency_key"),
        IdempotencyError::Reused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
        IdempotencyError::Unavailable(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "idempotency_unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(body: &[u8]) -> String {
        Payload::Held(bytes::Bytes::copy_from_slice(body)).sha256()
    }

    #[tokio::test]
    async fn a_key_gives_one_id_per_body_and_scope() {
        let dir = tempfile::tempdir().unwrap();
        let index = Idempotency::open(dir.path()).unwrap();
        let ids = std::sync::atomic::AtomicU32::new(0);
        let new = || {
            format!(
                "id-{}",
                ids.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            )
        };
        let (c, held) = index.claim("lab", "k1", sha(b"m"), new).await.unwrap();
        assert_eq!(c, Claim::Publish("id-0".into()));
        drop(held); // not stored: a retry publishes the same id again
        let (c, held) = index.claim("lab", "k1", sha(b"m"), new).await.unwrap();
        assert_eq!(c, Claim::Publish("id-0".into()));
        held.stored().await.unwrap();
        let (c, held) = index.claim("lab", "k1", sha(b"m"), new).await.unwrap();
        assert_eq!(c, Claim::Stored("id-0".into()));
        drop(held);
        // Another scope has its own keys; another body under the same key is refused.
        let (c, _h) = index.claim("other", "k1", sha(b"m"), new).await.unwrap();
        assert!(matches!(c, Claim::Publish(id) if id != "id-0"));
        assert!(matches!(
            index.claim("lab", "k1", sha(b"other"), new).await,
            Err(IdempotencyError::Reused)
        ));
        assert!(matches!(
            index.claim("lab", "", sha(b"m"), new).await,
            Err(IdempotencyError::Malformed)
        ));
        assert!(matches!(
            index.claim("lab", "a b", sha(b"m"), new).await,
            Err(IdempotencyError::Malformed)
        ));
        // Remembered across a restart.
        drop(index);
        let index = Idempotency::open(dir.path()).unwrap();
        let (c, _h) = index.claim("lab", "k1", sha(b"m"), new).await.unwrap();
        assert_eq!(c, Claim::Stored("id-0".into()));
    }
}
