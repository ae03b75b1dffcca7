//! The address book from mCSD directories (`[[mcsd]]`): the Dutch addressing generic
//! function (GF Adressering) is a profile of IHE mCSD (ITI-90 Find Matching Care Services,
//! ITI-91 Request Care Services Updates). ketenbus keeps a replica of each directory in its
//! data dir and resolves a record's receiver in it, behind the `[address_book]` entries,
//! which win.
//!
//! - Replica: `<data_dir>/mcsd/<name>.db` (SQLite, write-ahead log): each page read is
//!   one transaction, indexed by identifier and by `providedBy`; see [`Replica`] for why.
//! - Initial load per resource type (Organization, Endpoint, HealthcareService, Location):
//!   a paged search `GET <base>/<Type>?_count=N`, following `Bundle.link[relation=next]`;
//!   the first page's `Bundle.meta.lastUpdated` is the `_since` of the next run.
//! - Then per type `GET <base>/<Type>/_history?_since=<time>` (ITI-91), again paged; a
//!   restart continues from the stored `_since`, it does not load everything again.
//! - mCSD has no deletes: a resource ends by its `status` (`active`), never by vanishing.
//!   A history entry without a resource is ignored.
//! - Resolution: party id (`ura:…`, `agb:…`, or `<system>|<value>`) → an active
//!   Organization (or HealthcareService) with that identifier → its endpoints, those of a
//!   HealthcareService that names the party first, then the Organization's, then those of
//!   the Organization's HealthcareServices → the first that fits the channel, has
//!   `status = active` and is within its `period`. FHIR endpoints need a `payloadMimeType`
//!   stating `fhirVersion=4.0`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ketenbus_connectors::address_book::{Channel, Directory, Resolved, Source};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::Value;

use crate::env::Problem;

/// The resource types replicated, in the order they are read.
pub const TYPES: [&str; 4] = ["Organization", "Endpoint", "HealthcareService", "Location"];
/// Identifier system of the URA (care provider register).
pub const URA_SYSTEM: &str = "http://fhir.nl/fhir/NamingSystem/ura";
/// Identifier system of the AGB code.
pub const AGB_SYSTEM: &str = "http://fhir.nl/fhir/NamingSystem/agb-z";
/// Most pages read per resource type and run (a guard against a `next` loop).
const MAX_PAGES: usize = 10_000;

/// `[[mcsd]]`: one mCSD directory to replicate (the LRZa, a party's own directory).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McsdConfig {
    /// Name of the directory (lower case letters, digits, `-`, `_`): the replica's file
    /// name and the metric label.
    pub name: String,
    /// FHIR base URL of the directory. https; plain http only to loopback.
    pub base_url: String,
    /// Client certificate (PEM, leaf first, then its chain) for mTLS; with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file` (PEM, unencrypted).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Trust anchors for the directory's server certificate (PEM files); when given, only
    /// these are trusted, not the built-in roots.
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
    /// Time between two runs of the incremental update (default `5m`).
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest wait per request (default `30s`).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Resources asked per page (`_count`, default 100).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

fn default_poll() -> Duration {
    Duration::from_secs(300)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_page_size() -> u32 {
    100
}

impl McsdConfig {
    /// The problems of this source (keys below `mcsd[i]`).
    #[must_use]
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            out.push((
                "name".to_owned(),
                "use lower case letters, digits, - and _".to_owned(),
            ));
        }
        if let Err(m) = crate::deliver::mitz::base_url(&self.base_url) {
            out.push(("base_url".to_owned(), m));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => out.push(("key_file".into(), "required with cert_file".into())),
            (None, Some(_)) => out.push(("cert_file".into(), "required with key_file".into())),
            _ => {}
        }
        if let Err(e) = self.client() {
            let (key, message) = match e {
                crate::deliver::mitz::MitzError::File { key, message }
                | crate::deliver::mitz::MitzError::Setting { key, message } => (key, message),
            };
            out.push((key.to_owned(), message));
        }
        if self.poll_interval.is_zero() {
            out.push(("poll_interval".into(), "must be more than 0".into()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".into(), "must be more than 0".into()));
        }
        if self.page_size == 0 {
            out.push(("page_size".into(), "must be at least 1".into()));
        }
        out
    }

    /// The HTTP client: mTLS when a certificate is given.
    ///
    /// # Errors
    /// A certificate, key or trust anchor file that cannot be used.
    pub fn client(&self) -> Result<reqwest::Client, crate::deliver::mitz::MitzError> {
        let identity = self.cert_file.as_ref().zip(self.key_file.as_ref());
        crate::deliver::mitz::mtls_client(identity, &self.ca_files, self.timeout)
    }
}

/// Problems of every `[[mcsd]]` source, names unique among them.
#[must_use]
pub fn problems(sources: &[McsdConfig]) -> Vec<Problem> {
    let mut out = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        out.extend(Problem::under(&format!("mcsd[{i}]"), s.problems()));
        if sources[..i].iter().any(|o| o.name == s.name) {
            out.push(Problem::new(
                format!("mcsd[{i}].name"),
                format!("{:?} is used by an earlier [[mcsd]]", s.name),
            ));
        }
    }
    out
}

/// Why a sync run failed (the replica keeps what it had).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The directory could not be reached or answered an error.
    #[error("{url}: {message}")]
    Http {
        /// Path of the request (no query).
        url: String,
        /// What happened.
        message: String,
    },
    /// The answer is not a Bundle ketenbus can read.
    #[error("{url}: {message}")]
    Bundle {
        /// Path of the request.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The replica could not be written.
    #[error("writing the replica {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The replica's schema. `resources` holds the newest version of each resource;
/// `identifiers` (of Organizations and HealthcareServices) and `provided_by` (a service's
/// Organization) are the indexes a lookup reads, so no lookup reads the whole replica.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS resources (
        key TEXT PRIMARY KEY,            -- Type/id
        last_updated INTEGER NOT NULL,   -- meta.lastUpdated, seconds
        body TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS identifiers (
        system TEXT NOT NULL, value TEXT NOT NULL, key TEXT NOT NULL,
        PRIMARY KEY (system, value, key)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS identifiers_by_key ON identifiers (key);
    CREATE TABLE IF NOT EXISTS provided_by (
        org TEXT NOT NULL, service TEXT NOT NULL,
        PRIMARY KEY (org, service)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS provided_by_service ON provided_by (service);
    CREATE TABLE IF NOT EXISTS since (rtype TEXT PRIMARY KEY, at TEXT NOT NULL);
";

/// The replica file of the releases before the SQLite replica: read once, then removed.
#[derive(Debug, Default, Deserialize)]
struct OldFile {
    since: BTreeMap<String, String>,
    resources: BTreeMap<String, Value>,
}

/// The local replica of one directory: `<data_dir>/mcsd/<name>.db`, SQLite.
///
/// Why SQLite and not a JSON file or a journal: each page of a sync is one transaction
/// (only the resources it carries are written, the `_since` of a type with the last page),
/// a kill in the middle of a write leaves the last committed page (SQLite's write-ahead
/// log), and the identifier indexes make a lookup a few index reads, whatever the size
/// of the directory. An append-only journal would need its own compaction and an index
/// rebuilt in memory at each start; the broker already carries SQLite for its lineage.
#[derive(Debug)]
pub struct Replica {
    name: String,
    path: PathBuf,
    db: Mutex<Option<Connection>>,
}

impl Replica {
    /// The replica of `name` under `data_dir`, opened (created when there is none).
    ///
    /// # Errors
    /// The file cannot be opened or is not a replica.
    pub fn open(data_dir: &Path, name: &str) -> std::io::Result<Replica> {
        let r = Replica::at(data_dir, name);
        r.load()?;
        Ok(r)
    }

    /// The replica of `name` under `data_dir`, empty until [`Replica::load`].
    #[must_use]
    pub fn at(data_dir: &Path, name: &str) -> Replica {
        Replica {
            name: name.to_owned(),
            path: data_dir.join("mcsd").join(format!("{name}.db")),
            db: Mutex::new(None),
        }
    }

    /// Open the replica's file (creating it), and take in the JSON file of an older
    /// release when there is one.
    ///
    /// # Errors
    /// The file cannot be opened or is not a replica.
    pub fn load(&self) -> std::io::Result<()> {
        let io = |e: rusqlite::Error| std::io::Error::other(e);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(&self.path).map_err(io)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(io)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(io)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(io)?;
        conn.execute_batch(SCHEMA).map_err(io)?;
        *self.lock() = Some(conn);
        let old = self.path.with_extension("json");
        match std::fs::read(&old) {
            Ok(bytes) => {
                let file: OldFile = serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                for (key, r) in file.resources {
                    let rtype = key.split('/').next().unwrap_or("").to_owned();
                    self.apply(&rtype, &[serde_json::json!({ "resource": r })])
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                }
                for (rtype, at) in file.since {
                    self.set_since(&rtype, &at)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                }
                std::fs::remove_file(&old)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// An empty replica in memory (for tests).
    #[cfg(test)]
    fn empty(name: &str) -> Replica {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        Replica {
            name: name.to_owned(),
            path: PathBuf::new(),
            db: Mutex::new(Some(conn)),
        }
    }

    /// The directory's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many resources the replica holds (0 before [`Replica::load`]).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock()
            .as_ref()
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM resources", [], |r| r.get::<_, i64>(0))
                    .ok()
            })
            .map_or(0, |n| usize::try_from(n).unwrap_or(0))
    }

    /// Whether the replica holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Connection>> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_err(&self, e: rusqlite::Error) -> SyncError {
        SyncError::Write {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        }
    }

    /// The `_since` of `rtype`'s next update.
    fn since(&self, rtype: &str) -> Option<String> {
        self.lock().as_ref().and_then(|c| {
            c.query_row("SELECT at FROM since WHERE rtype = ?1", [rtype], |r| {
                r.get(0)
            })
            .optional()
            .ok()
            .flatten()
        })
    }

    fn set_since(&self, rtype: &str, at: &str) -> Result<(), SyncError> {
        let guard = self.lock();
        let Some(c) = guard.as_ref() else {
            return Err(self.write_err(rusqlite::Error::InvalidQuery));
        };
        c.execute(
            "INSERT INTO since (rtype, at) VALUES (?1, ?2)
             ON CONFLICT (rtype) DO UPDATE SET at = excluded.at",
            params![rtype, at],
        )
        .map(drop)
        .map_err(|e| self.write_err(e))
    }

    /// Take resources of `rtype` from a page, in one transaction: the newest version of
    /// each wins, and its index rows are replaced.
    fn apply(&self, rtype: &str, entries: &[Value]) -> Result<usize, SyncError> {
        let mut guard = self.lock();
        let Some(c) = guard.as_mut() else {
            return Err(self.write_err(rusqlite::Error::InvalidQuery));
        };
        let tx = c.transaction().map_err(|e| self.write_err(e))?;
        let mut taken = 0;
        for e in entries {
            let Some(r) = e.get("resource") else { continue };
            if r.get("resourceType").and_then(Value::as_str) != Some(rtype) {
                continue;
            }
            let Some(id) = r.get("id").and_then(Value::as_str) else {
                continue;
            };
            let key = format!("{rtype}/{id}");
            let updated = last_updated(r);
            let older: Option<i64> = tx
                .query_row(
                    "SELECT last_updated FROM resources WHERE key = ?1",
                    [&key],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|e| self.write_err(e))?;
            if older.is_some_and(|o| o > updated) {
                continue;
            }
            write_resource(&tx, &key, updated, r).map_err(|e| self.write_err(e))?;
            taken += 1;
        }
        tx.commit().map_err(|e| self.write_err(e))?;
        Ok(taken)
    }

    /// One run: per type, the initial load or the update since the last run. Each page
    /// is written as it comes; each type's `_since` once that type is read to the end.
    ///
    /// # Errors
    /// The first request or page that failed; what was read before it is kept.
    pub async fn sync(
        &self,
        client: &reqwest::Client,
        base_url: &str,
        page_size: u32,
    ) -> Result<usize, SyncError> {
        let base = base_url.trim_end_matches('/');
        let mut taken = 0;
        for rtype in TYPES {
            let since = self.since(rtype);
            let mut url = match &since {
                None => format!("{base}/{rtype}?_count={page_size}"),
                Some(t) => format!(
                    "{base}/{rtype}/_history?_since={}&_count={page_size}",
                    query_escape(t)
                ),
            };
            let mut next_since = None;
            for page in 0.. {
                if page >= MAX_PAGES {
                    return Err(SyncError::Bundle {
                        url: path_of(&url),
                        message: format!("more than {MAX_PAGES} pages"),
                    });
                }
                let bundle = fetch(client, &url).await?;
                if page == 0 {
                    next_since = Some(
                        bundle
                            .pointer("/meta/lastUpdated")
                            .and_then(Value::as_str)
                            .ok_or_else(|| SyncError::Bundle {
                                url: path_of(&url),
                                message: "the first page carries no Bundle.meta.lastUpdated".into(),
                            })?
                            .to_owned(),
                    );
                }
                let entries = bundle
                    .get("entry")
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice);
                taken += self.apply(rtype, entries)?;
                let next = bundle
                    .get("link")
                    .and_then(Value::as_array)
                    .and_then(|links| {
                        links
                            .iter()
                            .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
                    })
                    .and_then(|l| l.get("url"))
                    .and_then(Value::as_str);
                match next {
                    None => break,
                    Some(n) if same_origin(n, base) => n.clone_into(&mut url),
                    Some(_) => {
                        return Err(SyncError::Bundle {
                            url: path_of(&url),
                            message: "a next link leaves the directory's base URL".into(),
                        });
                    }
                }
            }
            if let Some(t) = next_since {
                self.set_since(rtype, &t)?;
            }
        }
        Ok(taken)
    }

    /// Why each candidate endpoint for `party` on `channel` was taken or skipped, at `now`
    /// (seconds since the epoch).
    #[must_use]
    pub fn explain(&self, party: &str, channel: Channel, now: i64) -> Explanation {
        let mut out = Explanation::default();
        let Some((system, value)) = identifier_of(party) else {
            out.skipped
                .push(format!("{party}: not scheme:value or system|value"));
            return out;
        };
        let guard = self.lock();
        let Some(c) = guard.as_ref() else {
            out.skipped.push("the replica is not open".into());
            return out;
        };
        match explain_in(c, &self.name, (&system, value), channel, now, &mut out) {
            Ok(()) => {}
            Err(e) => out.skipped.push(format!("reading the replica: {e}")),
        }
        out
    }
}

/// `(key, resource)` rows of a query.
fn rows(
    c: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<(String, Value)>> {
    let mut stmt = c.prepare_cached(sql)?;
    let found = stmt
        .query_map(args, |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(found
        .into_iter()
        .filter_map(|(k, body)| serde_json::from_str(&body).ok().map(|v| (k, v)))
        .collect())
}

/// The resources of `prefix` (`Organization/`, `HealthcareService/`) with identifier
/// `system|value`: an index read.
const BY_IDENTIFIER: &str =
    "SELECT r.key, r.body FROM identifiers i JOIN resources r ON r.key = i.key
     WHERE i.system = ?1 AND i.value = ?2 AND i.key >= ?3 AND i.key < ?4 ORDER BY i.key";
/// The HealthcareServices an Organization provides: an index read.
const SERVICES_OF: &str =
    "SELECT r.key, r.body FROM provided_by p JOIN resources r ON r.key = p.service
     WHERE p.org = ?1 ORDER BY p.service";
/// One resource by key.
const BY_KEY: &str = "SELECT key, body FROM resources WHERE key = ?1";

/// Store `r` (the newest version of `key`) and replace its index rows.
fn write_resource(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
    updated: i64,
    r: &Value,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO resources (key, last_updated, body) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET last_updated = excluded.last_updated, body = excluded.body",
        params![key, updated, r.to_string()],
    )?;
    tx.execute("DELETE FROM identifiers WHERE key = ?1", [key])?;
    tx.execute("DELETE FROM provided_by WHERE service = ?1", [key])?;
    for i in r
        .get("identifier")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
    {
        if let (Some(system), Some(value)) = (
            i.get("system").and_then(Value::as_str),
            i.get("value").and_then(Value::as_str),
        ) {
            tx.execute(
                "INSERT OR IGNORE INTO identifiers (system, value, key) VALUES (?1, ?2, ?3)",
                params![system, value, key],
            )?;
        }
    }
    if key.starts_with("HealthcareService/")
        && let Some(org) = r.pointer("/providedBy/reference").and_then(Value::as_str)
    {
        tx.execute(
            "INSERT OR IGNORE INTO provided_by (org, service) VALUES (?1, ?2)",
            params![org.trim_start_matches("./"), key],
        )?;
    }
    Ok(())
}

/// [`Replica::explain`] on an open replica.
fn explain_in(
    c: &Connection,
    name: &str,
    (system, value): (&str, &str),
    channel: Channel,
    now: i64,
    out: &mut Explanation,
) -> rusqlite::Result<()> {
    // (via, endpoint reference) in order of preference.
    let mut candidates: Vec<(Vec<String>, String)> = Vec::new();
    let refs = |r: &Value| -> Vec<String> {
        r.get("endpoint")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.get("reference").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let active = |r: &Value| r.get("active").and_then(Value::as_bool) != Some(false);
    // `prefix` up to the next prefix: the keys of one resource type.
    let of_type = |t: &str| -> rusqlite::Result<Vec<(String, Value)>> {
        rows(
            c,
            BY_IDENTIFIER,
            params![system, value, format!("{t}/"), format!("{t}0")],
        )
    };
    // Services that carry the identifier first, then Organizations (each followed by the
    // services it provides).
    let services = of_type("HealthcareService")?;
    let orgs = of_type("Organization")?;
    for (key, r) in services.iter().chain(&orgs) {
        if !active(r) {
            out.skipped.push(format!("{key}: not active"));
            continue;
        }
        for e in refs(r) {
            candidates.push((vec![key.clone()], e));
        }
        if key.starts_with("Organization/") {
            for (skey, s) in rows(c, SERVICES_OF, [key])? {
                if active(&s) {
                    for e in refs(&s) {
                        candidates.push((vec![key.clone(), skey.clone()], e));
                    }
                }
            }
        }
    }
    if candidates.is_empty() && out.skipped.is_empty() {
        out.skipped.push(format!(
            "no active Organization or HealthcareService with identifier {system}|{value}"
        ));
    }
    for (mut via, reference) in candidates {
        let reference = reference.trim_start_matches("./");
        let Some((key, ep)) = rows(c, BY_KEY, [reference])?.pop() else {
            out.skipped.push(format!("{reference}: not in the replica"));
            continue;
        };
        match fits(&ep, channel, now) {
            Ok(address) => {
                via.push(key);
                out.chosen.get_or_insert(Resolved {
                    address,
                    source: Source::Directory {
                        name: name.to_owned(),
                        via,
                    },
                });
            }
            Err(why) => out.skipped.push(format!("{key}: {why}")),
        }
    }
    Ok(())
}

/// What [`Replica::explain`] found.
#[derive(Debug, Default)]
pub struct Explanation {
    /// The endpoint a record is sent to.
    pub chosen: Option<Resolved>,
    /// Every endpoint or resource passed over, with why.
    pub skipped: Vec<String>,
}

impl Directory for Replica {
    fn address(&self, party: &str, channel: Channel) -> Option<Resolved> {
        self.explain(party, channel, unix_now()).chosen
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `(system, value)` of a party id: `ura:` and `agb:` map to their naming systems,
/// `system|value` is taken as it is.
fn identifier_of(party: &str) -> Option<(String, &str)> {
    if let Some((system, value)) = party.split_once('|') {
        return Some((system.to_owned(), value));
    }
    let (scheme, value) = party.split_once(':')?;
    let system = match scheme {
        "ura" => URA_SYSTEM.to_owned(),
        "agb" => AGB_SYSTEM.to_owned(),
        other => format!("http://fhir.nl/fhir/NamingSystem/{other}"),
    };
    Some((system, value))
}

fn codes(ep: &Value) -> Vec<String> {
    ep.get("connectionType")
        .and_then(|c| {
            // R4: one Coding; later versions: CodeableConcepts.
            if c.is_array() {
                c.as_array().map(|a| {
                    a.iter()
                        .flat_map(|cc| {
                            cc.get("coding")
                                .and_then(Value::as_array)
                                .cloned()
                                .unwrap_or_default()
                        })
                        .collect::<Vec<_>>()
                })
            } else {
                Some(vec![c.clone()])
            }
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.get("code").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// The address an endpoint gives `channel` at `now`, or why it does not fit.
fn fits(ep: &Value, channel: Channel, now: i64) -> Result<String, String> {
    let status = ep.get("status").and_then(Value::as_str).unwrap_or("");
    if status != "active" {
        return Err(format!("status {status}"));
    }
    if let Some(start) = ep.pointer("/period/start").and_then(Value::as_str)
        && instant(start).is_none_or(|s| s > now)
    {
        return Err(format!("period starts {start}"));
    }
    if let Some(end) = ep.pointer("/period/end").and_then(Value::as_str)
        && instant(end).is_none_or(|e| e <= now)
    {
        return Err(format!("period ended {end}"));
    }
    let address = ep.get("address").and_then(Value::as_str).unwrap_or("");
    let codes = codes(ep);
    match channel {
        Channel::Fhir => {
            if !codes
                .iter()
                .any(|c| matches!(c.as_str(), "hl7-fhir-rest" | "hl7-fhir-msg"))
            {
                return Err("connectionType is not hl7-fhir-rest or hl7-fhir-msg".into());
            }
            let mimes: Vec<&str> = ep
                .get("payloadMimeType")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !mimes.iter().any(|m| {
                m.split(';')
                    .skip(1)
                    .any(|p| p.trim().replace(' ', "") == "fhirVersion=4.0")
            }) {
                return Err(format!(
                    "payloadMimeType {mimes:?} states no fhirVersion=4.0 (R4)"
                ));
            }
            Ok(address.to_owned())
        }
        Channel::Webhook => {
            if !codes.iter().any(|c| c == "webhook") {
                return Err("connectionType is not webhook".into());
            }
            Ok(address.to_owned())
        }
        Channel::Mail => {
            if let Some(m) = address.strip_prefix("mailto:") {
                return Ok(m.to_owned());
            }
            if codes
                .iter()
                .any(|c| matches!(c.as_str(), "direct-project" | "secure-email"))
            {
                return Ok(address.to_owned());
            }
            Err("neither a mail connectionType nor a mailto: address".into())
        }
    }
}

/// `meta.lastUpdated` as seconds (0 when missing).
fn last_updated(r: &Value) -> i64 {
    r.pointer("/meta/lastUpdated")
        .and_then(Value::as_str)
        .and_then(instant)
        .unwrap_or(0)
}

/// A FHIR date, dateTime or instant as seconds since the epoch (a date is its midnight
/// UTC; a dateTime without zone is taken as UTC).
#[must_use]
pub fn instant(s: &str) -> Option<i64> {
    let (date, rest) = s.split_at(s.len().min(10));
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next().map_or(Some(1), |v| v.parse().ok())?;
    let day: i64 = d.next().map_or(Some(1), |v| v.parse().ok())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400;
    if let Some(t) = rest.strip_prefix('T') {
        let (clock, zone) = match t.find(['Z', '+', '-']) {
            Some(i) => t.split_at(i),
            None => (t, ""),
        };
        let mut c = clock.split(':');
        let h: i64 = c.next()?.parse().ok()?;
        let mi: i64 = c.next()?.parse().ok()?;
        let sec: i64 = c
            .next()
            .map_or(Some(0), |v| v.split('.').next()?.parse().ok())?;
        secs += h * 3600 + mi * 60 + sec;
        if let Some(off) = zone.strip_prefix(['+', '-']) {
            let (oh, om) = off.split_once(':')?;
            let o = oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60;
            secs += if zone.starts_with('+') { -o } else { o };
        }
    } else if !rest.is_empty() {
        return None;
    }
    Some(secs)
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn path_of(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_owned()
}

fn same_origin(next: &str, base: &str) -> bool {
    match (reqwest::Url::parse(next), reqwest::Url::parse(base)) {
        (Ok(n), Ok(b)) => {
            let root = b.path().trim_end_matches('/');
            n.origin() == b.origin()
                && (n.path() == b.path() || n.path().starts_with(&format!("{root}/")))
        }
        _ => false,
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Value, SyncError> {
    let err = |message: String| SyncError::Http {
        url: path_of(url),
        message,
    };
    let resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/fhir+json")
        .send()
        .await
        .map_err(|e| err(format!("request failed: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(err(format!("answered {status}")));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| err(format!("reading the answer: {e}")))?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| SyncError::Bundle {
        url: path_of(url),
        message: format!("not JSON: {e}"),
    })?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(SyncError::Bundle {
            url: path_of(url),
            message: "not a Bundle".into(),
        });
    }
    Ok(v)
}

/// The replicas of `sources` under `data_dir`, not read yet: the address book the sinks are
/// built with holds these, and the runtime loads and syncs them.
#[must_use]
pub fn replicas(data_dir: &Path, sources: &[McsdConfig]) -> Vec<Arc<Replica>> {
    sources
        .iter()
        .map(|s| Arc::new(Replica::at(data_dir, &s.name)))
        .collect()
}

/// Keep `replica` in step with its directory until `cancel`: a run at once, then every
/// `poll_interval`. A failed run is logged and counted; the replica keeps serving.
pub async fn run(
    cfg: McsdConfig,
    replica: Arc<Replica>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let client = match cfg.client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(directory = %cfg.name, error = %e, "mcsd client cannot be built");
            return;
        }
    };
    loop {
        match replica.sync(&client, &cfg.base_url, cfg.page_size).await {
            Ok(n) => {
                crate::observe::metrics::mcsd_synced(&cfg.name, unix_now());
                if n > 0 {
                    tracing::info!(directory = %cfg.name, resources = n, total = replica.len(), "mcsd directory synced");
                } else {
                    tracing::debug!(directory = %cfg.name, total = replica.len(), "mcsd directory synced, no changes");
                }
            }
            Err(e) => {
                crate::observe::metrics::mcsd_failed(&cfg.name);
                tracing::warn!(directory = %cfg.name, error = %e, "mcsd sync failed; the replica keeps serving");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(cfg.poll_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000; // 2026-11-30

    fn replica() -> Replica {
        let r = Replica::empty("lrza");
        let all: Vec<Value> =
            serde_json::from_str(include_str!("../../../tests/fixtures/mcsd/directory.json"))
                .unwrap();
        for t in TYPES {
            let entries: Vec<Value> = all
                .iter()
                .map(|res| serde_json::json!({ "resource": res }))
                .collect();
            r.apply(t, &entries).unwrap();
        }
        r
    }

    fn via(e: &Explanation) -> (String, Vec<String>) {
        let chosen = e.chosen.clone().expect("an endpoint fits");
        match chosen.source {
            Source::Directory { name, via } => {
                assert_eq!(name, "lrza");
                (chosen.address, via)
            }
            Source::Override => panic!("not from the directory"),
        }
    }

    #[test]
    fn each_channel_gets_the_endpoint_that_fits_it() {
        let r = replica();
        let (hook, path) = via(&r.explain("ura:90000001", Channel::Webhook, NOW));
        assert_eq!(hook, "http://127.0.0.1:1/linde/hook");
        assert_eq!(path, ["Organization/org-linde", "Endpoint/ep-linde-hook"]);
        let fhir = r.explain("agb:01999991", Channel::Fhir, NOW);
        assert_eq!(via(&fhir).0, "https://fhir.linde.example.test/r4");
        assert!(
            fhir.skipped.iter().any(|s| s
                .starts_with("Endpoint/ep-linde-fhir-stu3: payloadMimeType")
                && s.contains("fhirVersion=4.0")),
            "{:?}",
            fhir.skipped
        );
        let mail = r.explain("ura:90000001", Channel::Mail, NOW);
        assert_eq!(via(&mail).0, "900000001@lms.example.test");
    }

    #[test]
    fn a_healthcare_service_narrows_and_an_ended_period_is_skipped() {
        let r = replica();
        let dept = r.explain(
            "http://example.test/NamingSystem/department|hap-triage",
            Channel::Webhook,
            NOW,
        );
        let (addr, path) = via(&dept);
        assert_eq!(addr, "https://triage.hap.example.test/hook");
        assert_eq!(
            path,
            ["HealthcareService/hs-hap-triage", "Endpoint/ep-hap-triage"]
        );
        assert!(
            dept.skipped
                .contains(&"Endpoint/ep-hap-old: period ended 2026-01-01T00:00:00+01:00".into()),
            "{:?}",
            dept.skipped
        );
        // The organisation itself has no endpoint: its service's is used.
        let (addr, path) = via(&r.explain("ura:90000002", Channel::Webhook, NOW));
        assert_eq!(addr, "https://triage.hap.example.test/hook");
        assert_eq!(path[0], "Organization/org-hap");
        // Before 2026 the old endpoint was the one.
        let before = instant("2025-12-01").unwrap();
        assert_eq!(
            via(&r.explain("ura:90000002", Channel::Webhook, before)).0,
            "https://old.hap.example.test/hook"
        );
    }

    #[test]
    fn inactive_unknown_and_unfit_parties_get_nothing_and_say_why() {
        let r = replica();
        let closed = r.explain("ura:90000003", Channel::Webhook, NOW);
        assert!(closed.chosen.is_none());
        assert_eq!(closed.skipped, ["Organization/org-closed: not active"]);
        let unknown = r.explain("ura:12345678", Channel::Webhook, NOW);
        assert!(unknown.chosen.is_none() && !unknown.skipped.is_empty());
        assert!(
            r.explain("ura:90000002", Channel::Fhir, NOW)
                .chosen
                .is_none()
        );
        assert!(r.explain("nonsense", Channel::Mail, NOW).chosen.is_none());
    }

    #[test]
    fn the_newest_version_wins_and_a_history_entry_without_resource_is_ignored() {
        let r = replica();
        let newer = serde_json::json!({"resource": {
            "resourceType": "Endpoint", "id": "ep-linde-hook",
            "meta": {"lastUpdated": "2026-11-02T10:00:00Z"}, "status": "off",
            "connectionType": {"code": "webhook"}, "address": "https://x.example.test/"}});
        let older = serde_json::json!({"resource": {
            "resourceType": "Endpoint", "id": "ep-linde-hook",
            "meta": {"lastUpdated": "2026-10-02T10:00:00Z"}, "status": "active",
            "connectionType": {"code": "webhook"}, "address": "https://y.example.test/"}});
        let deleted =
            serde_json::json!({"request": {"method": "DELETE", "url": "Endpoint/ep-linde-hook"}});
        assert_eq!(r.apply("Endpoint", &[newer, older, deleted]).unwrap(), 1);
        let e = r.explain("ura:90000001", Channel::Webhook, NOW);
        assert!(e.chosen.is_none());
        assert!(
            e.skipped
                .contains(&"Endpoint/ep-linde-hook: status off".into())
        );
    }

    #[test]
    fn next_links_stay_within_the_base_url() {
        let base = "https://lrza.example.test/fhir";
        assert!(same_origin(
            "https://lrza.example.test/fhir/Endpoint?_offset=2",
            base
        ));
        for hostile in [
            "https://evil.example.test/fhir/Endpoint",
            "http://lrza.example.test/fhir/Endpoint",
            "https://lrza.example.test:8443/fhir/Endpoint",
            "https://lrza.example.test/other/Endpoint",
            "https://lrza.example.test/fhirx/Endpoint",
            "not a url",
        ] {
            assert!(!same_origin(hostile, base), "{hostile}");
        }
        assert_eq!(
            query_escape("2026-11-30T10:00:00.123+01:00"),
            "2026-11-30T10:00:00.123%2B01:00"
        );
    }

    #[test]
    fn instants_read_dates_zones_and_fractions() {
        assert_eq!(instant("1970-01-01"), Some(0));
        assert_eq!(instant("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(instant("1970-01-01T00:00:01.500Z"), Some(1));
        assert_eq!(instant("1970-01-02T00:00:00-01:00"), Some(86_400 + 3600));
        assert_eq!(instant("2026"), Some(1_767_225_600));
        assert_eq!(instant("2026-13-01"), None);
        assert_eq!(instant("tomorrow"), None);
    }

    #[test]
    fn the_replica_file_survives_a_reopen_and_takes_in_an_old_json_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open(dir.path(), "lrza").unwrap();
        assert!(r.is_empty());
        r.apply(
            "Location",
            &[serde_json::json!({"resource": {"resourceType": "Location", "id": "l1"}})],
        )
        .unwrap();
        r.set_since("Location", "2026-11-30T00:00:00Z").unwrap();
        drop(r);
        let again = Replica::open(dir.path(), "lrza").unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again.since("Location").unwrap(), "2026-11-30T00:00:00Z");
        // The JSON replica of an older release is taken in once, then removed.
        let old = dir.path().join("mcsd/old.json");
        std::fs::write(
            &old,
            serde_json::json!({
                "since": {"Organization": "2026-11-29T00:00:00Z"},
                "resources": {"Organization/o1": {"resourceType": "Organization", "id": "o1",
                    "identifier": [{"system": URA_SYSTEM, "value": "1"}], "active": true,
                    "endpoint": [{"reference": "Endpoint/e1"}]},
                    "Endpoint/e1": {"resourceType": "Endpoint", "id": "e1", "status": "active",
                    "connectionType": {"code": "webhook"}, "address": "https://o1.example.test/"}}
            })
            .to_string(),
        )
        .unwrap();
        let taken = Replica::open(dir.path(), "old").unwrap();
        assert!(!old.exists());
        assert_eq!(taken.len(), 2);
        assert_eq!(taken.since("Organization").unwrap(), "2026-11-29T00:00:00Z");
        assert_eq!(
            taken
                .explain("ura:1", Channel::Webhook, NOW)
                .chosen
                .unwrap()
                .address,
            "https://o1.example.test/"
        );
    }

    #[test]
    fn a_lookup_reads_indexes_not_the_whole_replica() {
        let r = replica();
        let guard = r.lock();
        let c = guard.as_ref().unwrap();
        for (sql, args) in [(BY_IDENTIFIER, 4), (SERVICES_OF, 1), (BY_KEY, 1)] {
            let plan: Vec<String> = c
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(
                    rusqlite::params_from_iter(std::iter::repeat_n("x", args)),
                    |row| row.get::<_, String>(3),
                )
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert!(
                plan.iter()
                    .all(|step| !step.starts_with("SCAN") && step.contains("USING")),
                "{sql}: {plan:?}"
            );
        }
    }

    #[test]
    fn a_new_version_replaces_the_index_rows_of_the_old() {
        let r = replica();
        let page = [
            serde_json::json!({"resource": {"resourceType": "Organization", "id": "new",
                "identifier": [{"system": URA_SYSTEM, "value": "90000009"}],
                "endpoint": [{"reference": "Endpoint/ep-linde-hook"}]}}),
        ];
        assert_eq!(r.apply("Organization", &page).unwrap(), 1);
        assert!(
            r.explain("ura:90000009", Channel::Webhook, NOW)
                .chosen
                .is_some()
        );
        // Its identifier changes: the old one no longer finds it.
        let moved = serde_json::json!({"resource": {"resourceType": "Organization", "id": "new",
            "meta": {"lastUpdated": "2026-11-30T00:00:00Z"},
            "identifier": [{"system": URA_SYSTEM, "value": "90000010"}],
            "endpoint": [{"reference": "Endpoint/ep-linde-hook"}]}});
        r.apply("Organization", &[moved]).unwrap();
        assert!(
            r.explain("ura:90000009", Channel::Webhook, NOW)
                .chosen
                .is_none()
        );
        assert!(
            r.explain("ura:90000010", Channel::Webhook, NOW)
                .chosen
                .is_some()
        );
    }

    fn source(toml_text: &str) -> McsdConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn problems_name_plain_http_missing_files_and_duplicate_names() {
        let good = source("name = \"lrza\"\nbase_url = \"http://127.0.0.1:8080/fhir\"\n");
        assert!(problems(std::slice::from_ref(&good)).is_empty());
        let bad = source(
            "name = \"LRZa\"\nbase_url = \"http://lrza.example.test/fhir\"\n\
             cert_file = \"/nonexistent/c.pem\"\npoll_interval = \"0s\"\n",
        );
        let found: Vec<String> = problems(&[bad, good.clone(), good])
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        for want in [
            "mcsd[0].name: use lower case letters",
            "mcsd[0].base_url: plain http to a non-loopback host",
            "mcsd[0].key_file: required with cert_file",
            "mcsd[0].poll_interval: must be more than 0",
            "mcsd[2].name: \"lrza\" is used by an earlier [[mcsd]]",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(want)),
                "{want} in {found:?}"
            );
        }
        assert!(toml::from_str::<McsdConfig>("name = \"a\"\nbase_url = \"x\"\nfax = 1\n").is_err());
        let missing = source(
            "name = \"a\"\nbase_url = \"https://a.example.test\"\n\
             cert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n",
        );
        assert!(
            problems(&[missing])
                .iter()
                .any(|p| p.path == "mcsd[0].cert_file" && p.message.contains("cannot read")),
        );
    }

    #[test]
    fn every_key_is_in_the_example_config() {
        let example = include_str!("../../../ops/ketenbus.example.toml");
        let section = example
            .split("# [[mcsd]]")
            .nth(1)
            .expect("the example has an [[mcsd]] section");
        for key in [
            "name",
            "base_url",
            "cert_file",
            "key_file",
            "ca_files",
            "poll_interval",
            "timeout",
            "page_size",
        ] {
            assert!(
                section.contains(&format!("# {key} =")),
                "{key} is not in the example"
            );
        }
    }
}
