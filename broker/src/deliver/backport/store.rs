//! The Subscriptions and their numbered events, in `fhir-subscriptions.sqlite` in the data
//! directory. An event gets the next number of its Subscription when it is first tried,
//! in one transaction, so numbers have no gaps and a retry, a replay or a restart finds the
//! number it had. Per number the store keeps only the event id, when it was numbered and
//! where the event is in the log (topic, partition, offset): never the event, which holds
//! patient data. `$events` reads each event back from the log at that position.
//!
//! The release before kept a copy of each event (`event.value`); opening such a store drops
//! the copies and vacuums the file (and checkpoints its WAL), so none is left on disk.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ketenbus_connectors::LogPosition;
use rusqlite::{Connection, OptionalExtension, params};

use super::Registration;
use super::seal::{HeaderKey, SealError};

/// The file, in the data directory.
pub const FILE: &str = "fhir-subscriptions.sqlite";

/// The ketenbus subscription names (`fhir-<id>`) of the Subscriptions kept in `data_dir`,
/// for the commands that read the log (`status`, `dlq`); none when there is no store yet.
///
/// # Errors
/// When the store is there but cannot be read.
pub fn names(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let path = data_dir.join(FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let mut stmt = conn.prepare("SELECT id FROM subscription ORDER BY id")?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(ids
        .map(|id| id.map(|id| super::subscription_name(&id)))
        .collect::<Result<_, _>>()?)
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("fhir subscription store: {0}")]
    Db(#[from] rusqlite::Error),
    /// A kept Subscription could not be read.
    #[error("fhir subscription store: unreadable subscription: {0}")]
    Format(#[from] serde_json::Error),
    /// `channel.header` values could not be sealed.
    #[error("fhir subscription store: {0}")]
    Seal(#[from] SealError),
    /// `channel.header` values and no key to seal them with.
    #[error("fhir subscription store: no key to seal channel.header with")]
    NoKey,
}

impl StoreError {
    /// A store that fails is retried (the notification waits).
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Retryable
    }
}

/// One numbered event.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// Its number within the Subscription (from 1).
    pub number: u64,
    /// The event id.
    pub event_id: String,
    /// When it was numbered, ms since the epoch.
    pub at_ms: i64,
    /// Where the event is in the log; `None` when it was numbered before the store kept
    /// positions, or was first tried from a retry topic.
    pub position: Option<LogPosition>,
}

/// The store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// What `channel.header` values are sealed with; without it none are kept.
    key: Option<Arc<HeaderKey>>,
    /// Subscriptions whose sealed headers this key cannot open: kept as they are.
    locked: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(..)")
    }
}

impl Store {
    /// Open (or create) the store in `data_dir`.
    ///
    /// # Errors
    /// When the database cannot be opened or set up.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, None)
    }

    /// Open (or create) the store in `data_dir`, `channel.header` values sealed with `key`.
    /// Headers an earlier release kept in plain form are sealed now when there is a key.
    ///
    /// # Errors
    /// When the database cannot be opened, set up or sealed.
    pub fn open_with(data_dir: &Path, key: Option<HeaderKey>) -> Result<Store, StoreError> {
        let conn = Connection::open(data_dir.join(FILE))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS subscription (
                 id TEXT PRIMARY KEY, json TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS event (
                 sub TEXT NOT NULL, number INTEGER NOT NULL, event_id TEXT NOT NULL,
                 at_ms INTEGER NOT NULL, topic TEXT, partition INTEGER, offset INTEGER,
                 PRIMARY KEY (sub, number), UNIQUE (sub, event_id));",
        )?;
        drop_event_copies(&conn)?;
        let sealed_column: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('subscription') WHERE name = 'headers'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !sealed_column {
            // The sealed `channel.header` values; the JSON keeps none.
            conn.execute_batch("ALTER TABLE subscription ADD COLUMN headers BLOB")?;
        }
        let store = Store {
            conn: Arc::new(Mutex::new(conn)),
            key: key.map(Arc::new),
            locked: Arc::default(),
        };
        let plain: Vec<Registration> = store
            .all()?
            .into_iter()
            .filter(|r| !r.headers.is_empty() && !store.is_sealed(&r.id))
            .collect();
        if store.key.is_some() {
            for r in &plain {
                store.put(r)?;
            }
        } else if !plain.is_empty() {
            tracing::warn!(
                subscriptions = plain.len(),
                "fhir subscriptions keep channel.header in plain form: set [fhir_subscriptions] header_key_env to seal them"
            );
        }
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.locked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_sealed(&self, id: &str) -> bool {
        self.conn()
            .query_row(
                "SELECT headers IS NOT NULL FROM subscription WHERE id = ?1",
                params![id],
                |r| r.get::<_, bool>(0),
            )
            .unwrap_or(false)
    }

    /// Whether `channel.header` values can be kept (there is a key).
    #[must_use]
    pub fn seals(&self) -> bool {
        self.key.is_some()
    }

    /// Keep `r` (new or changed), durable before this returns.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn put(&self, r: &Registration) -> Result<(), StoreError> {
        let mut kept = r.clone();
        let headers = std::mem::take(&mut kept.headers);
        let json = serde_json::to_string(&kept)?;
        if headers.is_empty() && self.locked().contains(&r.id) {
            // Sealed under another key: kept as they are until the client gives new ones.
            self.conn().execute(
                "UPDATE subscription SET json = ?2 WHERE id = ?1",
                params![r.id, json],
            )?;
            return Ok(());
        }
        let sealed = if headers.is_empty() {
            None
        } else {
            let key = self.key.as_ref().ok_or(StoreError::NoKey)?;
            Some(key.seal(&r.id, &serde_json::to_vec(&headers)?)?)
        };
        self.conn().execute(
            "INSERT INTO subscription (id, json, headers) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET json = excluded.json, headers = excluded.headers",
            params![r.id, json, sealed],
        )?;
        self.locked().remove(&r.id);
        Ok(())
    }

    /// Forget the Subscription `id` and its events.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM subscription WHERE id = ?1", params![id])?;
        tx.execute("DELETE FROM event WHERE sub = ?1", params![id])?;
        tx.commit()?;
        Ok(())
    }

    /// Every kept Subscription.
    ///
    /// # Errors
    /// When they cannot be read.
    pub fn all(&self) -> Result<Vec<Registration>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT json, headers FROM subscription ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (json, sealed) = row?;
            let mut reg: Registration = serde_json::from_str(&json)?;
            if let Some(sealed) = sealed {
                let opened = self
                    .key
                    .as_ref()
                    .ok_or(SealError::Open)
                    .and_then(|k| k.open(&reg.id, &sealed));
                match opened.map(|plain| serde_json::from_slice::<Vec<String>>(&plain)) {
                    Ok(Ok(headers)) => reg.headers = headers,
                    _ => {
                        // Never sent without the credentials its client gave.
                        tracing::error!(subscription = %reg.subscription_name(), "channel.header cannot be opened (no key, or another key): the subscription is in error until its client gives its headers again");
                        self.locked().insert(reg.id.clone());
                        reg.headers.clear();
                        reg.status = super::Status::Error;
                        reg.error = Some("channel.header cannot be opened: the server's key is not the one it was sealed with; PUT the Subscription with its headers again".into());
                    }
                }
            }
            out.push(reg);
        }
        Ok(out)
    }

    /// The number of event `event_id` in Subscription `sub`: the one it has, else the next,
    /// kept with where the event is in the log (`position`) in the same transaction. A number
    /// kept without a position gets this one.
    ///
    /// # Errors
    /// When it cannot be read or written.
    pub fn number(
        &self,
        sub: &str,
        event_id: &str,
        position: Option<&LogPosition>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let found: Option<i64> = tx
            .query_row(
                "SELECT number FROM event WHERE sub = ?1 AND event_id = ?2",
                params![sub, event_id],
                |r| r.get(0),
            )
            .optional()?;
        let (topic, partition, offset) = match position {
            Some(p) => (Some(p.topic.as_str()), Some(p.partition), Some(p.offset)),
            None => (None, None, None),
        };
        let n = if let Some(n) = found {
            if position.is_some() {
                tx.execute(
                    "UPDATE event SET topic = ?3, partition = ?4, offset = ?5
                     WHERE sub = ?1 AND number = ?2 AND topic IS NULL",
                    params![sub, n, topic, partition, offset],
                )?;
            }
            n
        } else {
            let n: i64 = tx.query_row(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM event WHERE sub = ?1",
                params![sub],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO event (sub, number, event_id, at_ms, topic, partition, offset)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![sub, n, event_id, now_ms, topic, partition, offset],
            )?;
            n
        };
        tx.commit()?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Keep where the numbered event `number` of `sub` is in the log, when no position is
    /// kept for it yet (found later in the resource index).
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn place(&self, sub: &str, number: u64, position: &LogPosition) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE event SET topic = ?3, partition = ?4, offset = ?5
             WHERE sub = ?1 AND number = ?2 AND topic IS NULL",
            params![
                sub,
                i64::try_from(number).unwrap_or(i64::MAX),
                position.topic,
                position.partition,
                position.offset
            ],
        )?;
        Ok(())
    }

    /// How many events Subscription `sub` has numbered.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn count(&self, sub: &str) -> Result<u64, StoreError> {
        let n: i64 = self.conn().query_row(
            "SELECT COALESCE(MAX(number), 0) FROM event WHERE sub = ?1",
            params![sub],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The numbered events `from..=until` of `sub`, at most `limit`, in order.
    ///
    /// # Errors
    /// When they cannot be read.
    pub fn events(
        &self,
        sub: &str,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<Numbered>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT number, event_id, at_ms, topic, partition, offset FROM event
             WHERE sub = ?1 AND number >= ?2 AND number <= ?3 ORDER BY number LIMIT ?4",
        )?;
        let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let rows = stmt.query_map(
            params![sub, big(from), big(until), big(limit as u64)],
            |r| {
                let topic: Option<String> = r.get(3)?;
                let partition: Option<u32> = r.get(4)?;
                let offset: Option<i64> = r.get(5)?;
                Ok(Numbered {
                    number: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    event_id: r.get(1)?,
                    at_ms: r.get(2)?,
                    position: match (topic, partition, offset) {
                        (Some(topic), Some(partition), Some(offset)) => Some(LogPosition {
                            topic,
                            partition,
                            offset,
                        }),
                        _ => None,
                    },
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A store of the release before keeps a copy of each numbered event (`event.value`, with
/// the patient's BSN in it): drop the column's table for one without it, keeping every
/// number, then vacuum the file and empty its WAL so no copy is left on disk. The numbers
/// kept this way have no position; `$events` finds them in the resource index.
fn drop_event_copies(conn: &Connection) -> Result<(), StoreError> {
    let copies: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('event') WHERE name = 'value'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !copies {
        return Ok(());
    }
    conn.execute_batch(
        "PRAGMA secure_delete = ON;
         BEGIN IMMEDIATE;
         CREATE TABLE event_kept (
             sub TEXT NOT NULL, number INTEGER NOT NULL, event_id TEXT NOT NULL,
             at_ms INTEGER NOT NULL, topic TEXT, partition INTEGER, offset INTEGER,
             PRIMARY KEY (sub, number), UNIQUE (sub, event_id));
         INSERT INTO event_kept (sub, number, event_id, at_ms)
             SELECT sub, number, event_id, at_ms FROM event;
         DROP TABLE event;
         ALTER TABLE event_kept RENAME TO event;
         COMMIT;
         PRAGMA wal_checkpoint(TRUNCATE);
         VACUUM;
         PRAGMA wal_checkpoint(TRUNCATE);",
    )?;
    tracing::info!(
        "fhir subscriptions: the event copies an earlier release kept are removed; $events reads events from the log"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a secret of at least thirty-two bytes!";

    fn key() -> Option<HeaderKey> {
        Some(HeaderKey::from_secret(SECRET).unwrap())
    }

    fn with_header(id: &str) -> Registration {
        let mut r = Registration::gone(id);
        r.status = super::super::Status::Active;
        r.error = None;
        r.headers = vec!["Authorization: Bearer s3cr3t-t0ken".into()];
        r
    }

    /// The store's bytes, with its WAL, hold `needle`.
    fn on_disk(dir: &Path, needle: &[u8]) -> bool {
        ["", "-wal"].iter().any(|suffix| {
            std::fs::read(dir.join(format!("{FILE}{suffix}")))
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        })
    }

    #[test]
    fn headers_are_kept_sealed_and_a_store_without_its_key_never_loses_or_sends_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(dir.path(), key()).unwrap();
        s.put(&with_header("a")).unwrap();
        assert!(!on_disk(dir.path(), b"s3cr3t-t0ken"), "sealed at rest");
        drop(s);
        let s = Store::open_with(dir.path(), key()).unwrap();
        assert_eq!(s.all().unwrap()[0].headers, with_header("a").headers);
        drop(s);
        // Without the key: in error, no headers to send, and a status change keeps them.
        let s = Store::open_with(dir.path(), None).unwrap();
        let got = s.all().unwrap().remove(0);
        assert!(got.headers.is_empty());
        assert_eq!(got.status, super::super::Status::Error);
        s.put(&got).unwrap();
        assert!(matches!(s.put(&with_header("b")), Err(StoreError::NoKey)));
        drop(s);
        let s = Store::open_with(dir.path(), key()).unwrap();
        assert_eq!(s.all().unwrap()[0].headers, with_header("a").headers);
    }

    #[test]
    fn plain_headers_of_an_earlier_release_are_sealed_when_there_is_a_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE subscription (id TEXT PRIMARY KEY, json TEXT NOT NULL)",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO subscription (id, json) VALUES ('a', ?1)",
                params![serde_json::to_string(&with_header("a")).unwrap()],
            )
            .unwrap();
        }
        let s = Store::open_with(dir.path(), key()).unwrap();
        assert_eq!(s.all().unwrap()[0].headers, with_header("a").headers);
        drop(s);
        let conn = Connection::open(dir.path().join(FILE)).unwrap();
        conn.execute_batch("VACUUM").unwrap();
        drop(conn);
        assert!(
            !on_disk(dir.path(), b"s3cr3t-t0ken"),
            "sealed once opened with a key"
        );
    }

    fn at(offset: i64) -> LogPosition {
        LogPosition {
            topic: "ketenbus.events.acute_handover".into(),
            partition: 0,
            offset,
        }
    }

    #[test]
    fn numbers_have_no_gaps_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.number("a", "e1", Some(&at(10)), 1).unwrap(), 1);
        assert_eq!(s.number("a", "e2", None, 2).unwrap(), 2);
        assert_eq!(
            s.number("a", "e1", None, 3).unwrap(),
            1,
            "a retry keeps its number"
        );
        assert_eq!(
            s.number("b", "e1", Some(&at(10)), 3).unwrap(),
            1,
            "numbers are per Subscription"
        );
        // A number kept without a position gets the first one given.
        assert_eq!(s.number("a", "e2", Some(&at(11)), 4).unwrap(), 2);
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.count("a").unwrap(), 2);
        assert_eq!(s.number("a", "e3", None, 4).unwrap(), 3);
        s.place("a", 3, &at(12)).unwrap();
        s.place("a", 3, &at(99)).unwrap();
        let got = s.events("a", 1, 3, 10).unwrap();
        assert_eq!(
            got.iter()
                .map(|e| (e.event_id.as_str(), e.position.as_ref().map(|p| p.offset)))
                .collect::<Vec<_>>(),
            vec![("e1", Some(10)), ("e2", Some(11)), ("e3", Some(12))],
            "a kept position is never moved"
        );
        s.remove("a").unwrap();
        assert_eq!(s.count("a").unwrap(), 0);
    }

    /// A store of the release before keeps a copy of each event, with the patient's BSN in
    /// it: opened now, the copies are gone from the file and its WAL, the numbers stay.
    #[test]
    fn event_copies_of_an_earlier_release_are_dropped_and_vacuumed_away() {
        let dir = tempfile::tempdir().unwrap();
        let bsn = b"999999990";
        {
            let conn = Connection::open(dir.path().join(FILE)).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE subscription (id TEXT PRIMARY KEY, json TEXT NOT NULL);
                 CREATE TABLE event (
                     sub TEXT NOT NULL, number INTEGER NOT NULL, event_id TEXT NOT NULL,
                     at_ms INTEGER NOT NULL, value BLOB NOT NULL,
                     PRIMARY KEY (sub, number), UNIQUE (sub, event_id));",
            )
            .unwrap();
            for n in 1..=50_i64 {
                let mut copy = vec![0_u8; 300];
                copy.extend_from_slice(bsn);
                conn.execute(
                    "INSERT INTO event VALUES ('a', ?1, ?2, ?3, ?4)",
                    params![n, format!("e{n}"), n * 1000, copy],
                )
                .unwrap();
            }
            // Left as a crashed earlier release leaves it: the copies also in the WAL.
            std::mem::forget(conn);
        }
        assert!(on_disk(dir.path(), bsn), "the earlier release's copies");
        let s = Store::open(dir.path()).unwrap();
        assert!(
            !on_disk(dir.path(), bsn),
            "no copy left in the file or its WAL"
        );
        assert_eq!(s.count("a").unwrap(), 50, "every number kept");
        let got = s.events("a", 49, 50, 10).unwrap();
        assert_eq!(got[0].event_id, "e49");
        assert_eq!(got[0].at_ms, 49_000);
        assert!(got[0].position.is_none());
        assert_eq!(s.number("a", "e51", Some(&at(1)), 0).unwrap(), 51);
        drop(s);
        // Opened again: nothing more to do, nothing lost.
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.count("a").unwrap(), 51);
    }
}
