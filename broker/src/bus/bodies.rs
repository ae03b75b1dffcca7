//! Claim check for large message bodies: on an engine that keeps its log on this machine
//! (embedded), a body past `bus.embedded.large_body` is written to its own file in
//! `data_dir/bodies` (to a temporary name, fsynced, renamed, the directory fsynced) before its
//! envelope goes on the raw topic without it, marked with the attribute [`ATTRIBUTE`]
//! (`"<length> <sha256>"`). Every reader of the raw topic puts the body back with
//! [`decode_raw`], so a large message never passes through the log's pages, its Avro copies or
//! its page caches, and the memory of four 25 MiB messages at once stays small.
//!
//! A body file lives as long as a record on the log names its envelope: the raw record (its
//! position is kept next to the body as an empty marker file `<id>.at-<partition>-<offset>`
//! once it is published) or a copy of it on a dead-letter, retry or replay topic. The
//! engine's retention pass removes the others (on the embedded engine): a body whose record
//! retention removed, and what a crash left (a half-written temporary file, a body whose
//! record was never committed). A body whose envelope is being published is never removed.
//!
//! A way in that receives a body in pieces (HTTP) writes it here as it arrives, through a
//! [`Spool`], instead of holding it whole: the envelope it then hands on carries only the
//! attribute, and [`BodyStore::claim`] gives the spooled file the envelope's id.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ketenbus_schemas::{AvroRecord, RawEnvelope};
use sha2::{Digest, Sha256};

use super::Position;

/// The attribute of an envelope whose body is in the body store: `"<length> <sha256>"`.
pub const ATTRIBUTE: &str = "ketenbus.body_file";

/// Why a raw record could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The record is not an envelope.
    #[error("undecodable envelope: {0}")]
    Codec(#[from] ketenbus_schemas::codec::CodecError),
    /// The envelope names a body file that cannot be read or does not match.
    #[error("body file of envelope {id}: {reason}")]
    Body {
        /// The envelope id.
        id: String,
        /// What went wrong (no patient data).
        reason: String,
    },
}

/// Decode a raw record's value and put back a body kept in `bodies`.
///
/// # Errors
/// When the value is not an envelope, or its body file is missing or does not match.
pub fn decode_raw(bodies: Option<&BodyStore>, value: &[u8]) -> Result<RawEnvelope, RawError> {
    let mut env = RawEnvelope::from_avro(value)?;
    if env.attributes.contains_key(ATTRIBUTE) {
        let Some(store) = bodies else {
            return Err(RawError::Body {
                id: env.id,
                reason: "this engine keeps no body files".into(),
            });
        };
        store.fill(&mut env)?;
    }
    Ok(env)
}

/// The bytes a raw record stands for: its value, or with a body kept in a file, that body's
/// length too (read from the envelope's attribute without decoding it). For bounds on what
/// readers hold at once: a claimed record is small, its body is not.
#[must_use]
pub fn weight(value: &[u8]) -> usize {
    value.len() + claimed_len(value).unwrap_or(0)
}

/// The body length named by [`ATTRIBUTE`] in an encoded envelope, if it has one. The map
/// entry's value follows its key as an Avro string: a zigzag length, then `"<length> <sha>"`.
fn claimed_len(value: &[u8]) -> Option<usize> {
    let at = memchr::memmem::find(value, ATTRIBUTE.as_bytes())? + ATTRIBUTE.len();
    let rest = value.get(at..)?;
    // The string's length: one varint byte or more (high bit set on all but the last).
    let skip = rest.iter().position(|b| b & 0x80 == 0)? + 1;
    let digits = rest.get(skip..)?;
    let end = digits.iter().position(|b| *b == b' ')?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// The body files of one data directory. Cheap to clone.
#[derive(Clone)]
pub struct BodyStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    threshold: usize,
    /// Envelopes written here whose publish has not finished, and spools: never swept.
    publishing: Mutex<HashSet<String>>,
    /// Finished spools no envelope has claimed yet: the attribute value of each body by the
    /// name of its temporary file.
    spooled: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for BodyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyStore")
            .field("dir", &self.inner.dir)
            .field("threshold", &self.inner.threshold)
            .finish_non_exhaustive()
    }
}

/// A body written for an envelope being published. Say how the publish ended:
/// [`Claim::published`] or [`Claim::refused`]. Dropped without either (the publish timed
/// out and may still commit), the body is kept and not swept until the next start, when the
/// sweep looks for its record.
#[must_use]
#[derive(Debug)]
pub struct Claim {
    store: BodyStore,
    id: String,
}

impl Claim {
    /// The envelope is on the log at `pos`: note its position beside the body.
    pub fn published(self, pos: Position) {
        if let Err(e) = std::fs::File::create(self.store.marker(&self.id, pos)) {
            // The sweep finds the record by its key instead.
            tracing::warn!(error = %e, "body position marker not written");
        }
        self.store.done(&self.id);
    }

    /// The log refused the envelope: nothing names the body, it goes.
    pub fn refused(self) {
        let _ = std::fs::remove_file(self.store.path(&self.id));
        self.store.done(&self.id);
    }
}

/// A body being written to the store as it arrives ([`BodyStore::spool`]): its bytes go to
/// a temporary file, hashed on the way. [`Spool::finish`] makes it durable; dropped before
/// that (the sender went away, the body was refused, the fsync failed), the file goes.
#[derive(Debug)]
pub struct Spool {
    store: BodyStore,
    name: String,
    file: std::fs::File,
    sha: Sha256,
    len: usize,
    /// Durable and handed on as a [`Spooled`]: no longer this spool's to remove.
    finished: bool,
}

impl Spool {
    /// Append `bytes`. Blocking.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.sha.update(bytes);
        self.len += bytes.len();
        Ok(())
    }

    /// The body is complete: make it durable and wait for the envelope that names it.
    /// Blocking (an fsync).
    ///
    /// # Errors
    /// When the file cannot be synced; the file then goes.
    pub fn finish(mut self) -> std::io::Result<Spooled> {
        self.file.sync_all()?;
        self.finished = true;
        let value = attribute_value(self.len, std::mem::take(&mut self.sha));
        self.store
            .inner
            .spooled
            .lock()
            .expect("spooled lock")
            .insert(self.name.clone(), value.clone());
        Ok(Spooled {
            store: self.store.clone(),
            name: std::mem::take(&mut self.name),
            len: self.len,
            value,
        })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.finished {
            self.store.discard_spool(&self.name);
        }
    }
}

/// The value of [`ATTRIBUTE`] for a body of `len` bytes hashed by `sha`.
fn attribute_value(len: usize, sha: Sha256) -> String {
    format!("{len} {}", hex::encode(sha.finalize()))
}

/// A complete, durable body in the store, waiting for its envelope: put
/// [`Spooled::attribute`] on the envelope under [`ATTRIBUTE`] and leave its body empty.
/// Dropped while no envelope has claimed it (the message was refused), the file goes.
#[derive(Debug)]
pub struct Spooled {
    store: BodyStore,
    name: String,
    len: usize,
    /// `"<length> <sha256>"`, as the log will carry it.
    value: String,
}

impl Spooled {
    /// The body's length.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the body is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body's SHA-256, lowercase hex.
    #[must_use]
    pub fn sha256(&self) -> &str {
        self.value.split_once(' ').map_or("", |(_, sha)| sha)
    }

    /// The value of [`ATTRIBUTE`] for the envelope of this body: `"<length> <sha256>
    /// <spool>"`, the spool's name taken away again when the envelope claims it.
    #[must_use]
    pub fn attribute(&self) -> String {
        format!("{} {}", self.value, self.name)
    }

    /// The whole body, read back. Blocking.
    ///
    /// # Errors
    /// When the file cannot be read (or an envelope has claimed it already).
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.store.temporary(&self.name))
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let waiting = self
            .store
            .inner
            .spooled
            .lock()
            .expect("spooled lock")
            .remove(&self.name)
            .is_some();
        if waiting {
            self.store.discard_spool(&self.name);
        }
    }
}

/// The length of an envelope's body: its own, or the one [`ATTRIBUTE`] names.
#[must_use]
pub fn body_len(env: &RawEnvelope) -> usize {
    env.attributes
        .get(ATTRIBUTE)
        .and_then(|v| v.split_once(' ')?.0.parse().ok())
        .unwrap_or(env.body.len())
}

/// The file name of an envelope id, or `None` for an id that is not a plain name.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl BodyStore {
    /// The store in `dir` (created when missing) for bodies longer than `threshold` bytes.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: &Path, threshold: usize) -> std::io::Result<BodyStore> {
        std::fs::create_dir_all(dir)?;
        Ok(BodyStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                threshold,
                publishing: Mutex::new(HashSet::new()),
                spooled: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether a body of `len` bytes goes to a file.
    #[must_use]
    pub fn takes(&self, len: usize) -> bool {
        len > self.inner.threshold
    }

    fn done(&self, id: &str) {
        self.inner
            .publishing
            .lock()
            .expect("publishing lock")
            .remove(id);
    }

    fn path(&self, id: &str) -> PathBuf {
        self.inner.dir.join(id)
    }

    /// Remove the file of spool `name`, which no envelope will claim.
    fn discard_spool(&self, name: &str) {
        let _ = std::fs::remove_file(self.temporary(name));
        self.done(name);
    }

    /// Where a body is written before it is complete and durable: a name the sweep removes
    /// unless it is in `publishing`.
    fn temporary(&self, name: &str) -> PathBuf {
        self.inner.dir.join(format!(".{name}.tmp"))
    }

    fn marker(&self, id: &str, pos: Position) -> PathBuf {
        self.inner
            .dir
            .join(format!("{id}.at-{}-{}", pos.partition, pos.offset))
    }

    /// Move `env`'s body into its own file, durable when this returns, and mark the
    /// envelope. Blocking (a write and two fsyncs).
    ///
    /// # Errors
    /// When the file cannot be written; the envelope is then unchanged.
    /// An envelope that already carries [`ATTRIBUTE`] had its body spooled here: that file
    /// takes the envelope's id.
    ///
    /// # Errors
    /// When the file cannot be written, or the envelope names a body no spool of this store
    /// holds; the envelope is then unchanged.
    pub fn claim(&self, env: &mut RawEnvelope) -> std::io::Result<Claim> {
        if !valid_id(&env.id) {
            return Err(std::io::Error::other("envelope id is not a file name"));
        }
        let spooled = match env.attributes.get(ATTRIBUTE) {
            Some(named) => Some(self.take_spooled(named).ok_or_else(|| {
                std::io::Error::other("the envelope names a body no spool here holds")
            })?),
            None => None,
        };
        self.inner
            .publishing
            .lock()
            .expect("publishing lock")
            .insert(env.id.clone());
        let claim = Claim {
            store: self.clone(),
            id: env.id.clone(),
        };
        let tmp = match &spooled {
            Some((name, _)) => {
                // The spool's file now belongs to the envelope: no longer the spool's to
                // remove, and kept from the sweep under the envelope's id.
                self.done(name);
                self.temporary(name)
            }
            None => {
                let tmp = self.temporary(&env.id);
                let wrote = std::fs::File::create(&tmp).and_then(|mut f| {
                    f.write_all(&env.body)?;
                    f.sync_all()
                });
                if let Err(e) = wrote {
                    let _ = std::fs::remove_file(&tmp);
                    claim.refused();
                    return Err(e);
                }
                tmp
            }
        };
        let written = std::fs::rename(&tmp, self.path(&env.id))
            .and_then(|()| std::fs::File::open(&self.inner.dir)?.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            claim.refused();
            return Err(e);
        }
        let value = match spooled {
            Some((_, value)) => value,
            None => attribute_value(env.body.len(), Sha256::new_with_prefix(&env.body)),
        };
        env.attributes.insert(ATTRIBUTE.to_owned(), value);
        env.body = Vec::new();
        Ok(claim)
    }

    /// Start writing a body as it arrives. Blocking (creates a file).
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn spool(&self) -> std::io::Result<Spool> {
        let name = format!("spool-{}", ketenbus_schemas::new_envelope_id());
        self.inner
            .publishing
            .lock()
            .expect("publishing lock")
            .insert(name.clone());
        let file = match std::fs::File::create(self.temporary(&name)) {
            Ok(f) => f,
            Err(e) => {
                self.done(&name);
                return Err(e);
            }
        };
        Ok(Spool {
            store: self.clone(),
            name,
            file,
            sha: Sha256::new(),
            len: 0,
            finished: false,
        })
    }

    /// The finished, unclaimed spool a spooled envelope's attribute names
    /// (`"<length> <sha256> <spool>"`, [`Spooled::attribute`]), taken from the spools
    /// waiting: its temporary name and the attribute value for the log. None unless that
    /// spool is waiting and holds exactly that body.
    fn take_spooled(&self, named: &str) -> Option<(String, String)> {
        let (value, name) = named.rsplit_once(' ')?;
        let mut spooled = self.inner.spooled.lock().expect("spooled lock");
        if spooled.get(name).map(String::as_str) != Some(value) {
            return None;
        }
        spooled.remove(name);
        Some((name.to_owned(), value.to_owned()))
    }

    /// Put the body of a marked envelope back, checked against its length and SHA-256, and
    /// take the mark away: the envelope as it was received.
    ///
    /// # Errors
    /// When the file is missing, unreadable or does not match.
    pub fn fill(&self, env: &mut RawEnvelope) -> Result<(), RawError> {
        let bad = |reason: String| RawError::Body {
            id: env.id.clone(),
            reason,
        };
        let Some((len, sha)) = env
            .attributes
            .get(ATTRIBUTE)
            .and_then(|v| v.split_once(' '))
            .and_then(|(l, s)| Some((l.parse::<usize>().ok()?, s.to_owned())))
        else {
            return Err(bad("malformed body attribute".into()));
        };
        if !valid_id(&env.id) {
            return Err(bad("envelope id is not a file name".into()));
        }
        let body = std::fs::read(self.path(&env.id)).map_err(|e| bad(e.to_string()))?;
        if body.len() != len || hex::encode(Sha256::digest(&body)) != sha {
            return Err(bad("length or sha256 differs from the envelope's".into()));
        }
        env.body = body;
        env.attributes.remove(ATTRIBUTE);
        Ok(())
    }

    /// The body files and what the sweep knows of each, skipping envelopes being published.
    pub(crate) fn entries(&self) -> std::io::Result<Vec<Entry>> {
        let publishing = self
            .inner
            .publishing
            .lock()
            .expect("publishing lock")
            .clone();
        let mut bodies: std::collections::BTreeMap<String, Entry> =
            std::collections::BTreeMap::new();
        let mut temporary = Vec::new();
        for e in std::fs::read_dir(&self.inner.dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
                if !publishing.contains(id) {
                    temporary.push(e.path());
                }
                continue;
            }
            let (id, at) = match name.split_once(".at-") {
                Some((id, at)) => (id.to_owned(), parse_at(at)),
                None => (name.clone(), None),
            };
            if publishing.contains(&id) {
                continue;
            }
            let modified_ms = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let entry = bodies.entry(id.clone()).or_insert_with(|| Entry {
                id,
                at: None,
                has_body: false,
                modified_ms: i64::MAX,
                files: Vec::new(),
            });
            entry.files.push(e.path());
            if at.is_some() {
                entry.at = at;
            } else {
                entry.has_body = true;
                entry.modified_ms = modified_ms;
            }
        }
        let mut out: Vec<Entry> = bodies.into_values().collect();
        out.extend(temporary.into_iter().map(|p| Entry {
            id: String::new(),
            at: None,
            has_body: false,
            modified_ms: 0,
            files: vec![p],
        }));
        Ok(out)
    }

    /// Note that the raw record of `id` is at `pos` (the sweep found it by its key).
    pub(crate) fn note_position(&self, id: &str, pos: Position) {
        let _ = std::fs::File::create(self.marker(id, pos));
    }
}

fn parse_at(at: &str) -> Option<Position> {
    let (p, o) = at.split_once('-')?;
    Some(Position {
        partition: p.parse().ok()?,
        offset: o.parse().ok()?,
    })
}

/// One envelope's files as the sweep sees them.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The envelope id; empty for a leftover temporary file.
    pub(crate) id: String,
    /// Where its raw record was published, when known.
    pub(crate) at: Option<Position>,
    /// Whether the body itself is there (not only a marker).
    pub(crate) has_body: bool,
    /// When the body was written (ms since the epoch).
    pub(crate) modified_ms: i64,
    /// Every file of it (body, marker, temporary file).
    pub(crate) files: Vec<PathBuf>,
}

impl Entry {
    /// Remove its files, the body first (a marker left alone is removed next time).
    pub(crate) fn remove(&self) -> std::io::Result<()> {
        let mut files = self.files.clone();
        files.sort_by_key(|p| p.to_string_lossy().contains(".at-"));
        for f in files {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketenbus_schemas::Format;

    fn envelope(id: &str, body: Vec<u8>) -> RawEnvelope {
        RawEnvelope {
            id: id.into(),
            received_at_ms: 1,
            connector: "http".into(),
            format: Format::Edifact,
            content_type: "application/EDIFACT".into(),
            sender: None,
            receiver: None,
            body,
            attributes: std::collections::BTreeMap::new(),
        }
    }

    #[test]
    fn a_claimed_body_comes_back_whole_and_a_changed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BodyStore::open(dir.path(), 10).unwrap();
        assert!(
            !store.takes(10) && store.takes(11),
            "just over the threshold"
        );
        let original = envelope("0190-a", b"UNB+UNOA:1+x'".repeat(100));
        let mut env = original.clone();
        let claim = store.claim(&mut env).unwrap();
        claim.published(Position {
            partition: 3,
            offset: 7,
        });
        assert!(env.body.is_empty());
        let value = env.to_avro().unwrap();
        assert!(value.len() < 200, "the record is small");
        assert_eq!(
            weight(&value),
            value.len() + original.body.len(),
            "its weight counts the body"
        );
        assert_eq!(
            weight(&original.to_avro().unwrap()),
            original.to_avro().unwrap().len()
        );
        assert_eq!(decode_raw(Some(&store), &value).unwrap(), original);
        assert!(dir.path().join("0190-a.at-3-7").exists());
        assert!(
            matches!(decode_raw(None, &value), Err(RawError::Body { .. })),
            "an engine without body files does not pretend"
        );
        std::fs::write(dir.path().join("0190-a"), b"tampered").unwrap();
        assert!(matches!(
            decode_raw(Some(&store), &value),
            Err(RawError::Body { .. })
        ));
    }

    #[test]
    fn a_refused_claim_removes_the_body_and_one_being_published_is_never_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BodyStore::open(dir.path(), 0).unwrap();
        let mut env = envelope("0190-b", vec![1; 64]);
        let claim = store.claim(&mut env).unwrap();
        assert!(
            store.entries().unwrap().is_empty(),
            "a body being published is never swept"
        );
        claim.refused();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut env = envelope("0190-c", vec![1; 64]);
        drop(store.claim(&mut env).unwrap());
        assert!(
            store.entries().unwrap().is_empty(),
            "a publish that timed out may still commit: kept until the next start"
        );
    }

    #[test]
    fn a_spooled_body_becomes_the_file_of_the_envelope_that_names_it_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = BodyStore::open(dir.path(), 10).unwrap();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let body = b"From: a@example.test\r\n\r\nbrief".repeat(50);

        // Being written, and written but not yet named: never swept.
        let mut spool = store.spool().unwrap();
        for piece in body.chunks(7) {
            spool.write(piece).unwrap();
        }
        assert!(
            store.entries().unwrap().is_empty(),
            "a spool is never swept"
        );
        let spooled = spool.finish().unwrap();
        assert!(store.entries().unwrap().is_empty(), "nor a finished one");
        assert_eq!(spooled.read().unwrap(), body);
        assert_eq!(spooled.len(), body.len());
        assert_eq!(
            spooled.attribute().rsplit_once(' ').unwrap().0,
            format!("{} {}", body.len(), hex::encode(Sha256::digest(&body)))
        );

        // An identical body spooled beside it: each envelope takes its own file.
        let mut twin = store.spool().unwrap();
        twin.write(&body).unwrap();
        let twin = twin.finish().unwrap();
        let named = |id: &str, spooled: &Spooled| {
            let mut env = envelope(id, Vec::new());
            env.attributes
                .insert(ATTRIBUTE.to_owned(), spooled.attribute());
            env
        };
        let (mut a, mut b) = (named("0190-s1", &spooled), named("0190-s2", &twin));
        // Another spool's name with this body's length and digest: not its body.
        let mut wrong = named("0190-s4", &twin);
        wrong.attributes.insert(
            ATTRIBUTE.to_owned(),
            format!(
                "{} {}",
                spooled.len() + 1,
                twin.attribute().split_once(' ').unwrap().1
            ),
        );
        assert!(store.claim(&mut wrong).is_err());
        store.claim(&mut a).unwrap().published(Position {
            partition: 0,
            offset: 1,
        });
        store.claim(&mut b).unwrap().refused();
        let canonical = format!("{} {}", body.len(), hex::encode(Sha256::digest(&body)));
        assert_eq!(
            a.attributes[ATTRIBUTE], canonical,
            "the log never sees the spool"
        );
        let (a_value, b_value) = (a.to_avro().unwrap(), b.to_avro().unwrap());
        let spooled_attribute = spooled.attribute();
        drop((spooled, twin));
        assert_eq!(
            names(),
            ["0190-s1", "0190-s1.at-0-1"],
            "the refused one is gone"
        );
        assert_eq!(
            decode_raw(Some(&store), &a_value).unwrap(),
            envelope("0190-s1", body.clone())
        );
        assert!(decode_raw(Some(&store), &b_value).is_err());
        assert_eq!(body_len(&a), body.len());

        // An envelope naming a body no spool holds (forged, or claimed already) is refused.
        let mut forged = envelope("0190-s3", Vec::new());
        forged.attributes.insert(ATTRIBUTE.to_owned(), canonical);
        assert!(store.claim(&mut forged).is_err());
        forged
            .attributes
            .insert(ATTRIBUTE.to_owned(), spooled_attribute);
        assert!(store.claim(&mut forged).is_err(), "claimed already");

        // Cut off while written, or refused once written: the file goes.
        let mut cut = store.spool().unwrap();
        cut.write(&body[..100]).unwrap();
        drop(cut);
        let mut refused = store.spool().unwrap();
        refused.write(&body).unwrap();
        drop(refused.finish().unwrap());
        assert_eq!(names(), ["0190-s1", "0190-s1.at-0-1"]);
        assert!(store.entries().unwrap().iter().all(|e| !e.id.is_empty()));
    }
}
