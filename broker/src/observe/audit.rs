//! The audit trail (in the manner of NEN 7513): who got or read which patient's data,
//! when, and for what purpose. Every delivery, every withheld delivery and every read of a
//! message's lineage appends a record to `<data_dir>/audit.jsonl`, one JSON object per line.
//!
//! Records are tamper-evident: each carries `hash`, the HMAC-SHA256 of its own content keyed
//! with the audit key, and `prev`, the `hash` of the record before it, so an edited, removed
//! or inserted record breaks the chain, and someone without the key cannot write a new chain
//! that holds (recomputing plain hashes no longer passes); `ketenbus audit verify` names the
//! first break. The key comes from an environment variable or a key file the configuration
//! names, never from the data directory the trail is in. One writer thread
//! appends whatever is waiting in one write and one fsync; a delivery is acknowledged on
//! the log only after its audit record is on disk. Other processes (`ketenbus dlq purge`)
//! append to the same file: every writer holds the file lock while it appends and goes on
//! from the chain's end as it is in the file.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};

use crate::env::{Env, Problem};

/// The file name in the data directory.
pub const FILE: &str = "audit.jsonl";

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Environment variable the audit key is read from by default.
pub const DEFAULT_KEY_ENV: &str = "KETENBUS_AUDIT_KEY";

/// Fewest bytes an audit key may have.
pub const MIN_KEY_BYTES: usize = 32;

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Keep the audit trail (`<data_dir>/audit.jsonl`). On by default; turn off only where
    /// another component keeps the NEN 7513 log.
    pub enabled: bool,
    /// Environment variable holding the key that chains the records (HMAC-SHA256), at least
    /// 32 bytes. Read when `key_file` is not set. Keep the key where whoever can write the
    /// data directory cannot read it (a secret store, a systemd credential).
    pub key_env: String,
    /// A file holding the key instead (at least 32 bytes; a trailing newline is ignored).
    /// It must not be inside `data_dir`, beside the trail it protects.
    pub key_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            key_env: DEFAULT_KEY_ENV.to_owned(),
            key_file: None,
        }
    }
}

/// The key that chains the audit records. Prints as `***`.
#[derive(Clone)]
pub struct AuditKey(Vec<u8>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(***)")
    }
}

impl AuditKey {
    /// A key of these bytes.
    ///
    /// # Errors
    /// When it holds fewer than [`MIN_KEY_BYTES`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<AuditKey, String> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!("holds fewer than {MIN_KEY_BYTES} bytes"));
        }
        Ok(AuditKey(bytes))
    }

    fn mac(&self, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes keys of any length");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }
}

impl AuditConfig {
    /// The audit key: from `key_file` when set, else from the environment variable `key_env`
    /// (read through `env`). Its error is `(key, message)` for a configuration problem.
    ///
    /// # Errors
    /// When the key is missing, too short, or its file is unreadable or inside `data_dir`.
    pub fn key(&self, data_dir: &Path, env: &Env) -> Result<AuditKey, (&'static str, String)> {
        if let Some(file) = &self.key_file {
            let abs = |p: &Path| {
                std::fs::canonicalize(p)
                    .or_else(|_| std::path::absolute(p))
                    .unwrap_or_else(|_| p.to_path_buf())
            };
            if abs(file).starts_with(abs(data_dir)) {
                return Err((
                    "key_file",
                    format!(
                        "{} is inside data_dir: the key must not be kept beside the trail it protects",
                        file.display()
                    ),
                ));
            }
            let mut bytes = std::fs::read(file)
                .map_err(|e| ("key_file", format!("{}: {e}", file.display())))?;
            while bytes.last().is_some_and(u8::is_ascii_whitespace) {
                bytes.pop();
            }
            return AuditKey::new(bytes)
                .map_err(|m| ("key_file", format!("{}: {m}", file.display())));
        }
        let var = &self.key_env;
        if env.var(var).is_none()
            && let Some(local) = local_key_file(env).filter(|f| f.is_file())
        {
            let bytes = std::fs::read(&local)
                .map_err(|e| ("key_env", format!("{}: {e}", local.display())))?;
            return AuditKey::new(bytes)
                .map_err(|m| ("key_env", format!("{}: {m}", local.display())));
        }
        let value = env.var(var).ok_or_else(|| {
            (
                "key_env",
                format!(
                    "environment variable {var} is not set: the audit trail needs a key of at least {MIN_KEY_BYTES} bytes kept outside data_dir (set {var}, or audit.key_file, or audit.enabled = false)"
                ),
            )
        })?;
        AuditKey::new(value.into_bytes())
            .map_err(|m| ("key_env", format!("environment variable {var} {m}")))
    }
}

impl AuditConfig {
    /// Whether `ketenbus run` makes its own key: on a loopback listener only, when no key is
    /// configured (neither `key_file` nor a set `key_env`).
    #[must_use]
    pub fn makes_own_key(&self, loopback: bool, env: &Env) -> bool {
        loopback && self.key_file.is_none() && env.var(&self.key_env).is_none()
    }

    /// Every problem in `[audit]`: a missing, short or misplaced key, unless the trail is
    /// off or the broker makes its own key (`loopback`: the listener is on loopback only).
    #[must_use]
    pub fn problems(&self, data_dir: &Path, loopback: bool, env: &Env) -> Vec<Problem> {
        if !self.enabled || self.makes_own_key(loopback, env) {
            return Vec::new();
        }
        self.key(data_dir, env)
            .err()
            .map(|(key, m)| Problem::new(format!("audit.{key}"), m))
            .into_iter()
            .collect()
    }
}

impl AuditConfig {
    /// The audit trail `ketenbus run` writes, if enabled. A broker listening on loopback
    /// only (`loopback`) without a configured key makes its own first (the quick start).
    ///
    /// # Errors
    /// No key can be made or read, or the trail cannot be opened.
    pub fn start(
        &self,
        data_dir: &Path,
        loopback: bool,
        env: &Env,
    ) -> Result<Option<Audit>, StartError> {
        if !self.enabled {
            return Ok(None);
        }
        if self.makes_own_key(loopback, env) {
            // The quick start: a loopback broker makes its own key, outside data_dir.
            let file = ensure_local_key(env).map_err(StartError::NoLocalKey)?;
            tracing::warn!(key_file = %file.display(), "audit.key_env is not set: the audit trail is keyed with this machine's own key; set audit.key_env or audit.key_file from a secret store before leaving loopback");
        }
        let key = self
            .key(data_dir, env)
            .map_err(|(k, m)| StartError::Key(k, m))?;
        Audit::open(data_dir, key)
            .map(Some)
            .map_err(StartError::Open)
    }
}

/// Why the audit trail could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No key is configured and none can be made on this machine.
    #[error("audit.key_env is not set and no local key can be made: {0}")]
    NoLocalKey(String),
    /// The configured key is missing, too short or misplaced: (key under `audit`, message).
    #[error("audit.{0}: {1}")]
    Key(&'static str, String),
    /// The trail's file cannot be opened.
    #[error("opening the audit trail")]
    Open(#[source] AuditError),
}

impl StartError {
    /// Without an audit trail the broker does not start: an operator acts.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Fatal
    }
}

/// Where a broker that listens on loopback only (the quick start) keeps the audit key it
/// makes itself when none is configured: `$XDG_CONFIG_HOME/ketenbus/audit.key`, else
/// `$HOME/.config/ketenbus/audit.key`. Outside any data directory, readable by its owner only.
#[must_use]
pub fn local_key_file(env: &Env) -> Option<PathBuf> {
    let config = env
        .var("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env.var("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        })?;
    Some(config.join("ketenbus").join("audit.key"))
}

/// Make the loopback broker's own audit key (32 random bytes, hex, mode 0600) unless it
/// exists, and say where it is. Brokers started at once on one machine agree on one key:
/// the key is written whole to a file of its own and linked into place (a link, unlike a
/// rename, never replaces a key another broker already uses), so no broker reads a
/// half-written key and the first link wins.
///
/// # Errors
/// When there is no home or config directory, or the file cannot be written.
pub fn ensure_local_key(env: &Env) -> Result<PathBuf, String> {
    let file = local_key_file(env).ok_or("neither XDG_CONFIG_HOME nor HOME is set")?;
    if file.is_file() {
        return Ok(file);
    }
    let dir = file
        .parent()
        .ok_or_else(|| format!("{}: no directory", file.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let fresh = dir.join(format!(
        ".audit.key.{}.{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let key = hex::encode(rand::random::<[u8; 32]>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let linked = options
        .open(&fresh)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, key.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| match std::fs::hard_link(&fresh, &file) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        })
        // The link itself must survive a crash: a trail already keyed with this key would
        // not verify under the next key made after a restart.
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    let _ = std::fs::remove_file(&fresh);
    linked.map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(file)
}

/// What happened, as a caller reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `delivery`, `delivery_withheld`, `lineage_read`, `lineage_list`, `patient_search` (a
    /// message search by patient, `patient` naming whom), `fhir_read`, `raw_read`,
    /// `dlq_replay`, `dlq_purge`, `subscription_pause`, `subscription_resume` (the last two
    /// name the subscription as party `subscription:<name>`), `console_login_token`,
    /// `console_login_certificate` (a console login and the way the operator proved who
    /// they are).
    pub action: String,
    /// Who: `subscription:<name>` for a delivery, `operator:<name>` or `anonymous` for a read.
    pub actor: String,
    /// Receiving party id, when known.
    pub party: Option<String>,
    /// Patient pseudonym (the patient key), never a BSN or name.
    pub patient: Option<String>,
    /// Event (record) id.
    pub event_id: Option<String>,
    /// Message (envelope) id.
    pub envelope_id: Option<String>,
    /// Purpose of the exchange, when configured.
    pub purpose: Option<String>,
}

/// One line of the audit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// 1-based sequence number.
    pub seq: u64,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// When, RFC 3339 (UTC).
    pub at: String,
    /// What happened.
    #[serde(flatten)]
    pub entry: Entry,
    /// `hash` of the record before (64 zeros for the first).
    pub prev: String,
    /// HMAC-SHA256, keyed with the audit key, of this record's JSON without `hash`.
    #[serde(skip_serializing, default)]
    pub hash: String,
}

impl Record {
    fn content_hash(&self, key: &AuditKey) -> String {
        let body = serde_json::to_vec(self).expect("audit records serialise");
        key.mac(&body)
    }

    /// The line as written: the content followed by its hash.
    fn line(&self) -> String {
        let mut body = serde_json::to_string(self).expect("audit records serialise");
        body.pop(); // the closing brace
        format!("{body},\"hash\":\"{}\"}}\n", self.hash)
    }
}

/// Why the audit trail cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// File system.
    #[error("audit file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// The writer is gone (shutting down or failed before).
    #[error("audit writer stopped: {0}")]
    Stopped(String),
}

impl AuditError {
    /// Without an audit trail, access to patient data must stop: an operator acts.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Fatal
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<(Vec<Entry>, Reply)>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

/// Where the chain ends: the next sequence number and the last hash. The last record must
/// hold under `key`: a trail written with another key (or without one) is not continued.
fn tail(
    file: &mut std::fs::File,
    path: &Path,
    key: &AuditKey,
) -> Result<(u64, String), AuditError> {
    let io = |error| AuditError::Io {
        path: path.display().to_string(),
        error,
    };
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok((1, GENESIS.to_owned()));
    }
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(io)?;
    // A record cut short by a crash was never acknowledged: drop it.
    if buf.last() != Some(&b'\n') {
        let keep = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let new_len = start + keep as u64;
        tracing::warn!(
            file = %path.display(),
            bytes = len - new_len,
            "dropping an incomplete last audit record (written during a crash, never acknowledged)"
        );
        file.set_len(new_len).map_err(io)?;
        buf.truncate(keep);
        if new_len == 0 {
            return Ok((1, GENESIS.to_owned()));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let r: Record = serde_json::from_str(last).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the last record does not parse ({e}); run `ketenbus audit verify`"),
        ))
    })?;
    if r.hash != r.content_hash(key) {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the last record does not hold under the configured audit key (another key, a trail from before keyed chains, or a changed record); run `ketenbus audit verify`, and move an older trail aside to start a new one",
        )));
    }
    Ok((r.seq + 1, r.hash))
}

fn rfc3339(at_ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

impl Audit {
    /// Open (or create) the audit file in `data_dir` and start its writer thread, chaining
    /// records with `key`.
    ///
    /// # Errors
    /// When the file cannot be opened, or its last record cannot be read or does not hold
    /// under `key`.
    pub fn open(data_dir: &Path, key: AuditKey) -> Result<Audit, AuditError> {
        let path = data_dir.join(FILE);
        let io = |error| AuditError::Io {
            path: path.display().to_string(),
            error,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        file.lock().map_err(io)?;
        let chain_end = tail(&mut file, &path, &key)
            .and_then(|(seq, prev)| Ok((seq, prev, file.metadata().map_err(io)?.len())));
        file.unlock().map_err(io)?;
        let (seq, prev, end) = chain_end?;
        let (tx, rx) = mpsc::channel(8192);
        std::thread::Builder::new()
            .name("ketenbus-audit".into())
            .spawn(move || writer(file, &path, &key, (seq, prev, end), rx))
            .map_err(|e| AuditError::Stopped(e.to_string()))?;
        Ok(Audit { tx })
    }

    /// Append `entries` and wait until they are on disk.
    ///
    /// # Errors
    /// When the writer failed or stopped.
    pub async fn append(&self, entries: Vec<Entry>) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((entries, tx))
            .await
            .map_err(|_| AuditError::Stopped("channel closed".into()))?;
        rx.await
            .map_err(|_| AuditError::Stopped("no answer".into()))?
            .map_err(AuditError::Stopped)
    }
}

/// `chain`: the next sequence number, the last hash and where the file ended when they were
/// read; a file that is longer than where this writer left it was appended to by another
/// process, and the chain goes on from its end.
fn writer(
    mut file: std::fs::File,
    path: &Path,
    key: &AuditKey,
    chain: (u64, String, u64),
    mut rx: mpsc::Receiver<(Vec<Entry>, Reply)>,
) {
    let (mut seq, mut prev, mut end) = chain;
    let mut failed: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Some(e) = &failed {
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
            continue;
        }
        if let Err(e) = file.lock() {
            let e = format!("locking {}: {e}", path.display());
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
            continue;
        }
        if !file.metadata().is_ok_and(|m| m.len() == end) {
            match tail(&mut file, path, key) {
                Ok((s, p)) => (seq, prev) = (s, p),
                Err(e) => {
                    tracing::error!(error = %e, "audit trail cannot be read; deliveries stop");
                    failed = Some(e.to_string());
                    let _ = file.unlock();
                    for (_, reply) in batch {
                        let _ = reply.send(Err(e.to_string()));
                    }
                    continue;
                }
            }
        }
        let at_ms = ketenbus_schemas::now_ms();
        let at = rfc3339(at_ms);
        let mut out = String::new();
        let (mut next_seq, mut next_prev) = (seq, prev.clone());
        for (entries, _) in &batch {
            for entry in entries {
                let mut r = Record {
                    seq: next_seq,
                    at_ms,
                    at: at.clone(),
                    entry: entry.clone(),
                    prev: next_prev.clone(),
                    hash: String::new(),
                };
                r.hash = r.content_hash(key);
                out.push_str(&r.line());
                next_seq += 1;
                next_prev = r.hash;
            }
        }
        let result = file
            .write_all(out.as_bytes())
            .and_then(|()| file.sync_data())
            .and_then(|()| file.metadata());
        let _ = file.unlock();
        let answer = match result {
            Ok(m) => {
                seq = next_seq;
                prev = next_prev;
                end = m.len();
                Ok(())
            }
            Err(e) => {
                // A half-written batch would break the chain: stop writing; an operator acts.
                tracing::error!(file = %path.display(), error = %e, "audit trail cannot be written; deliveries stop");
                let e = format!("writing {}: {e}", path.display());
                failed = Some(e.clone());
                Err(e)
            }
        };
        for (_, reply) in batch {
            let _ = reply.send(answer.clone());
        }
    }
}

/// The result of checking a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Every record is intact and chained.
    Intact {
        /// Records checked.
        records: u64,
        /// Hash of the last one (keep it elsewhere to detect a cut-off tail).
        last_hash: String,
    },
    /// The first record that does not hold.
    Broken {
        /// 1-based line number in the file.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Check the chain of the audit file at `path` with the audit key.
///
/// # Errors
/// When the file cannot be read.
pub fn verify(path: &Path, key: &AuditKey) -> Result<Verified, AuditError> {
    let io = |error| AuditError::Io {
        path: path.display().to_string(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut prev = GENESIS.to_owned();
    let mut n = 0u64;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let line_no = i as u64 + 1;
        let broken = |reason: String| {
            Ok(Verified::Broken {
                line: line_no,
                reason,
            })
        };
        let r: Record = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return broken(format!("not an audit record: {e}")),
        };
        if r.hash != r.content_hash(key) {
            return broken(format!(
                "record seq {} does not match its hash (keyed with the audit key): it was changed or made after it was written, or the key is not the one it was written with",
                r.seq
            ));
        }
        if r.prev != prev {
            return broken(format!(
                "record seq {} does not follow the record before it: a record was removed, inserted or rewritten",
                r.seq
            ));
        }
        if r.seq != n + 1 {
            return broken(format!(
                "sequence number {} where {} was expected",
                r.seq,
                n + 1
            ));
        }
        prev = r.hash;
        n += 1;
    }
    Ok(Verified::Intact {
        records: n,
        last_hash: prev,
    })
}

/// Records at or after `since_ms`, as they are in the file.
///
/// # Errors
/// When the file cannot be read.
pub fn export(path: &Path, since_ms: i64, out: &mut dyn Write) -> Result<u64, AuditError> {
    let io = |error| AuditError::Io {
        path: path.display().to_string(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut n = 0;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(io)?;
        let Ok(r) = serde_json::from_str::<Record>(&line) else {
            continue;
        };
        if r.at_ms >= since_ms {
            writeln!(out, "{line}").map_err(io)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The audit file of a data directory.
#[must_use]
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::new(b"audit-key-for-unit-tests-0123456789".to_vec()).unwrap()
    }

    fn entry(i: usize) -> Entry {
        Entry {
            action: "delivery".into(),
            actor: "subscription:gp".into(),
            party: Some("agb:01234567".into()),
            patient: Some(format!("pk{i}")),
            event_id: Some(format!("m{i}.0")),
            envelope_id: Some(format!("m{i}")),
            purpose: Some("treatment".into()),
        }
    }

    #[tokio::test]
    async fn the_chain_verifies_survives_reopening_and_shows_an_edit() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), key()).unwrap();
        let mut waits = Vec::new();
        for i in 0..50 {
            let a = audit.clone();
            waits.push(tokio::spawn(async move { a.append(vec![entry(i)]).await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        drop(audit);
        let audit = Audit::open(dir.path(), key()).unwrap();
        audit.append(vec![entry(99), entry(100)]).await.unwrap();
        let path = path_in(dir.path());
        let Verified::Intact { records, .. } = verify(&path, &key()).unwrap() else {
            panic!("intact expected")
        };
        assert_eq!(records, 52);

        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"patient\":\"pk", "\"patient\":\"xx", 1);
        let first_edit = edited.lines().position(|l| l.contains("\"xx")).unwrap() as u64 + 1;
        std::fs::write(&path, edited).unwrap();
        match verify(&path, &key()).unwrap() {
            Verified::Broken { line, reason } => {
                assert_eq!(line, first_edit);
                assert!(reason.contains("does not match its hash"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        // Removing a record breaks the chain at the one after it.
        let lines: Vec<&str> = text.lines().collect();
        let mut cut = lines.clone();
        cut.remove(10);
        std::fs::write(&path, cut.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify(&path, &key()).unwrap(),
            Verified::Broken { line: 11, .. }
        ));
    }

    /// What someone with write access but without the key does: remove a record and
    /// recompute every hash after it as a plain SHA-256 chain.
    fn remove_and_rechain_plainly(text: &str, remove: usize) -> String {
        use sha2::Digest;
        let mut prev = GENESIS.to_owned();
        let mut out = String::new();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(remove);
        for (i, line) in lines.into_iter().enumerate() {
            let mut r: Record = serde_json::from_str(line).unwrap();
            r.seq = i as u64 + 1;
            r.prev = prev;
            r.hash = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&r).unwrap()));
            prev = r.hash.clone();
            out.push_str(&r.line());
        }
        out
    }

    #[test]
    fn a_chain_recomputed_without_the_key_is_found_and_so_is_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let audit = Audit::open(dir.path(), key()).unwrap();
        rt.block_on(audit.append((0..6).map(entry).collect()))
            .unwrap();
        drop(audit);
        let path = path_in(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(matches!(
            verify(&path, &key()).unwrap(),
            Verified::Intact { records: 6, .. }
        ));
        std::fs::write(&path, remove_and_rechain_plainly(&text, 2)).unwrap();
        match verify(&path, &key()).unwrap() {
            Verified::Broken { line: 1, reason } => {
                assert!(reason.contains("does not match its hash"), "{reason}");
            }
            v => panic!("a recomputed chain passed: {v:?}"),
        }
        // Nor does the broker continue it.
        assert!(Audit::open(dir.path(), key()).is_err());
        // The intact trail does not hold under another key.
        std::fs::write(&path, &text).unwrap();
        let other = AuditKey::new(b"another-audit-key-0123456789abcdef".to_vec()).unwrap();
        assert!(matches!(
            verify(&path, &other).unwrap(),
            Verified::Broken { line: 1, .. }
        ));
        assert!(Audit::open(dir.path(), other).is_err());
    }

    #[test]
    fn brokers_started_at_once_agree_on_one_local_key() {
        for _ in 0..20 {
            let home = tempfile::tempdir().unwrap();
            let config = home.path().to_string_lossy().into_owned();
            let env = Env::from_fn(move |v| (v == "XDG_CONFIG_HOME").then(|| config.clone()));
            let keys: Vec<String> = std::thread::scope(|s| {
                let started: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            let file = ensure_local_key(&env).unwrap();
                            std::fs::read_to_string(file).unwrap()
                        })
                    })
                    .collect();
                started.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!(keys[0].len(), 64, "{keys:?}");
            assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
            let left: Vec<_> = std::fs::read_dir(home.path().join("ketenbus"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, ["audit.key"]);
        }
    }

    #[test]
    fn the_key_comes_from_the_environment_or_a_file_outside_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = AuditConfig::default();
        let (k, m) = cfg.key(&data, &Env::empty()).unwrap_err();
        assert_eq!(k, "key_env");
        assert!(m.contains("KETENBUS_AUDIT_KEY is not set"), "{m}");
        let short = Env::from_fn(|_| Some("too short".to_owned()));
        assert!(
            cfg.key(&data, &short)
                .unwrap_err()
                .1
                .contains("fewer than 32")
        );
        let good = Env::from_fn(|v| (v == "KETENBUS_AUDIT_KEY").then(|| "k".repeat(32)));
        assert!(cfg.key(&data, &good).is_ok());

        std::fs::create_dir_all(&data).unwrap();
        let beside = data.join("audit.key");
        std::fs::write(&beside, "k".repeat(40)).unwrap();
        let in_data = AuditConfig {
            key_file: Some(beside),
            ..AuditConfig::default()
        };
        let (k, m) = in_data.key(&data, &good).unwrap_err();
        assert_eq!(k, "key_file");
        assert!(m.contains("inside data_dir"), "{m}");
        let away = dir.path().join("audit.key");
        std::fs::write(&away, format!("{}\n", "k".repeat(40))).unwrap();
        let from_file = AuditConfig {
            key_file: Some(away),
            ..AuditConfig::default()
        };
        assert!(from_file.key(&data, &Env::empty()).is_ok());
    }

    #[tokio::test]
    async fn two_writers_on_one_file_keep_one_chain() {
        // The broker and `ketenbus dlq purge` beside it.
        let dir = tempfile::tempdir().unwrap();
        let broker = Audit::open(dir.path(), key()).unwrap();
        let cli = Audit::open(dir.path(), key()).unwrap();
        for i in 0..20 {
            broker.append(vec![entry(i)]).await.unwrap();
            if i % 3 == 0 {
                cli.append(vec![entry(100 + i), entry(200 + i)])
                    .await
                    .unwrap();
            }
        }
        let v = verify(&path_in(dir.path()), &key()).unwrap();
        assert!(matches!(v, Verified::Intact { records: 34, .. }), "{v:?}");
    }

    #[test]
    fn a_torn_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let audit = Audit::open(dir.path(), key()).unwrap();
        rt.block_on(audit.append(vec![entry(1)])).unwrap();
        drop(audit);
        let path = path_in(dir.path());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":2,\"at_").unwrap();
        let audit = Audit::open(dir.path(), key()).unwrap();
        rt.block_on(audit.append(vec![entry(2)])).unwrap();
        assert!(matches!(
            verify(&path, &key()).unwrap(),
            Verified::Intact { records: 2, .. }
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any one changed byte (other than a line end) breaks the chain.
        #[test]
        fn any_changed_byte_is_noticed(at in 0usize..100_000, to in 0u8..=255) {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let audit = Audit::open(dir.path(), key()).unwrap();
            rt.block_on(audit.append((0..5).map(entry).collect())).unwrap();
            drop(audit);
            let path = path_in(dir.path());
            let mut bytes = std::fs::read(&path).unwrap();
            let at = at % bytes.len();
            proptest::prop_assume!(bytes[at] != b'\n' && bytes[at] != to);
            bytes[at] = to;
            std::fs::write(&path, &bytes).unwrap();
            let intact = matches!(verify(&path, &key()), Ok(Verified::Intact { .. }));
            proptest::prop_assert!(!intact, "byte {} changed to {} went unnoticed", at, to);
        }
    }
}
