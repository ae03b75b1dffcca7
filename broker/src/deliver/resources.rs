//! The resources of every event, readable one by one: an index from a FHIR `(Type, id)` to
//! the event it comes from, so `GET /fhir/{Type}/{id}` can serve it (issue 14, item 3) and a
//! Notified Pull exchange can be read back.
//!
//! The index holds no patient data: per event its id, its position in its topic, its
//! receiver and its patient pseudonym. A resource id names its event
//! (`<event id>-<local name>`, see [`ketenbus_connectors::fhir::emit::event_of_resource_id`])
//! except when it was too long and was hashed: only those few get a row of their own. A read takes the event from the log at
//! that position and renders it again with [`ketenbus_connectors::fhir::emit::resources`],
//! which is pure, so the bytes served are those the event makes today. When retention has
//! removed the event, the position reads nothing and the resource is *gone* (410): also an
//! id that names the removed event but was never one of its resources, as the index keeps
//! no list of them.
//!
//! Every node fills its own index (`fhir-resources.db` in the data directory) by reading each
//! event topic alone ([`Bus::read_alone`], as the lineage index does), and keeps the position
//! it read up to in the same transaction as the rows, so a restart goes on where it stopped
//! and indexing twice changes nothing.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ketenbus_connectors::BoxFuture;
use ketenbus_connectors::fhir::{Value, emit};
use ketenbus_schemas::{Event, EventKind, topics};
use rusqlite::{Connection, OptionalExtension, params};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Consumer, Record};

/// The event kinds that have a FHIR form (letters have none yet).
pub const KINDS: [EventKind; 3] = [
    EventKind::LabResult,
    EventKind::AcuteHandover,
    EventKind::HandoverNotification,
];

/// Why the index cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The index database failed.
    #[error("resource index: {0}")]
    Index(#[from] rusqlite::Error),
    /// The log could not be read.
    #[error("reading the event log: {0}")]
    Log(String),
    /// The record at a position is no event of its topic.
    #[error("undecodable event at {0}")]
    Undecodable(String),
}

impl ResourceError {
    /// The index and the log are worth another try (busy or away); a record that is no
    /// event is not.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        match self {
            ResourceError::Index(_) | ResourceError::Log(_) => {
                ketenbus_connectors::ErrorKind::Retryable
            }
            ResourceError::Undecodable(_) => ketenbus_connectors::ErrorKind::Fatal,
        }
    }
}

impl From<BusError> for ResourceError {
    fn from(e: BusError) -> Self {
        ResourceError::Log(e.to_string())
    }
}

/// Where a resource's event is, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The event id.
    pub event_id: String,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset.
    pub offset: i64,
    /// The event's receiver party id, when it names one.
    pub receiver: Option<String>,
    /// The event's patient pseudonym, when it has a patient.
    pub patient: Option<String>,
}

impl Located {
    /// Where the event is in the log.
    #[must_use]
    pub fn position(self) -> ketenbus_connectors::LogPosition {
        ketenbus_connectors::LogPosition {
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// Reads one event from the log by position (the bus behind a trait object, so the HTTP
/// state stays free of the engine's type).
pub trait EventLog: Send + Sync {
    /// The event at a position; `None` when it is not, or no longer, in the log.
    fn event_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        offset: i64,
    ) -> BoxFuture<'a, Result<Option<Event>, ResourceError>>;
}

/// [`EventLog`] on a bus.
#[derive(Debug)]
pub struct BusEvents<B>(pub Arc<B>);

impl<B: Bus> EventLog for BusEvents<B> {
    fn event_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        offset: i64,
    ) -> BoxFuture<'a, Result<Option<Event>, ResourceError>> {
        Box::pin(async move {
            let Some(r) = self.0.read_at(topic, partition, offset).await? else {
                return Ok(None);
            };
            decode(&r)
                .map(Some)
                .ok_or_else(|| ResourceError::Undecodable(topic.to_owned()))
        })
    }
}

fn kind_of(r: &Record) -> Option<EventKind> {
    r.topic
        .strip_prefix("ketenbus.events.")
        .and_then(EventKind::parse)
}

fn decode(r: &Record) -> Option<Event> {
    Event::from_avro(kind_of(r)?, &r.value).ok()
}

/// What the index keeps of an event, read without building the event.
fn shape_of(r: &Record) -> Option<emit::EventShape> {
    emit::EventShape::from_avro(kind_of(r)?, &r.value).ok()
}

/// What a read found.
#[derive(Debug)]
pub enum Found {
    /// The resource, and where its event is.
    Resource(Value, Located),
    /// The index knows it, but retention removed its event: 410.
    Gone(Located),
    /// Never known here: 404.
    Unknown,
}

/// The index and the log it points into.
#[derive(Clone)]
pub struct Resources {
    conn: Arc<Mutex<Connection>>,
    log: Arc<dyn EventLog>,
    content: Option<Arc<dyn ketenbus_connectors::ContentStore>>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resources(..)")
    }
}

fn open(data_dir: &Path) -> rusqlite::Result<Connection> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let conn = Connection::open(data_dir.join("fhir-resources.db"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS events (
             event_id TEXT NOT NULL PRIMARY KEY,
             topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
             receiver TEXT, patient TEXT) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS hashed (
             type TEXT NOT NULL, id TEXT NOT NULL, event_id TEXT NOT NULL,
             PRIMARY KEY (type, id)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS applied (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
             PRIMARY KEY (topic, partition));
         CREATE TABLE IF NOT EXISTS node (id TEXT NOT NULL);",
    )?;
    upgrade(&conn)?;
    Ok(conn)
}

/// An index from before one row per event (a row per resource in `resources`) becomes one:
/// nothing is read from the log again.
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'resources')",
        [],
        |r| r.get(0),
    )?;
    if !old {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN;
         INSERT OR IGNORE INTO events (event_id, topic, partition, offset, receiver, patient)
             SELECT event_id, topic, partition, offset, receiver, patient FROM resources;
         INSERT OR IGNORE INTO hashed (type, id, event_id)
             SELECT type, id, event_id FROM resources
             WHERE substr(id, 1, length(event_id) + 1) <> event_id || '-';
         DROP TABLE resources;
         COMMIT;",
    )?;
    tracing::info!("resource index upgraded to one row per event");
    Ok(())
}

/// This node's own name for its reader group (made once, kept in the index).
fn node_of(conn: &Connection) -> rusqlite::Result<String> {
    if let Some(id) = conn
        .query_row("SELECT id FROM node", [], |r| r.get(0))
        .optional()?
    {
        return Ok(id);
    }
    let id = hex::encode(rand::random::<[u8; 8]>());
    conn.execute("INSERT INTO node (id) VALUES (?1)", [&id])?;
    Ok(id)
}

const LOCATED: &str = "SELECT event_id, topic, partition, offset, receiver, patient FROM events";

fn located(r: &rusqlite::Row<'_>) -> rusqlite::Result<Located> {
    Ok(Located {
        event_id: r.get(0)?,
        topic: r.get(1)?,
        partition: r.get(2)?,
        offset: r.get(3)?,
        receiver: r.get(4)?,
        patient: r.get(5)?,
    })
}

impl Resources {
    /// Open the index in `data_dir` and start one reader per event topic on `bus`; they run
    /// until `cancel`.
    ///
    /// # Errors
    /// When the index cannot be opened or a topic cannot be read.
    pub async fn start<B: Bus>(
        data_dir: &Path,
        bus: Arc<B>,
        cancel: &CancellationToken,
    ) -> Result<Resources, ResourceError> {
        let conn = open(data_dir)?;
        let group = format!("ketenbus.fhir-resources.{}", node_of(&conn)?);
        let conn = Arc::new(Mutex::new(conn));
        crate::observe::watch::watch_index("fhir_resources", &group, &KINDS.map(topics::events));
        for kind in KINDS {
            let topic = topics::events(kind);
            let from = {
                let c = conn.lock().unwrap_or_else(PoisonError::into_inner);
                let mut stmt =
                    c.prepare("SELECT partition, next_offset FROM applied WHERE topic = ?1")?;
                stmt.query_map([&topic], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<(u32, i64)>>>()?
            };
            let reader = bus.read_alone(&group, &topic, &from).await?;
            tokio::spawn(crate::bus::background::run(index_topic(
                reader,
                Arc::clone(&conn),
                cancel.clone(),
            )));
        }
        Ok(Resources {
            conn,
            log: Arc::new(BusEvents(bus)),
            content: None,
        })
    }

    /// Serve documents (DocumentReference attachments) inline from `content`, as the FHIR
    /// sink sends them: a content pointer means nothing outside this node.
    #[must_use]
    pub fn with_content(mut self, content: Arc<dyn ketenbus_connectors::ContentStore>) -> Self {
        self.content = Some(content);
        self
    }

    /// The event's resources, documents inline.
    fn render(&self, event: &Event) -> Vec<Value> {
        let mut all = ketenbus_connectors::fhir::emit::resources(event).unwrap_or_default();
        if let Some(store) = &self.content {
            let store = Arc::clone(store);
            let source: ketenbus_connectors::fhir::sink::AttachmentSource =
                Arc::new(move |hash: &str| store.get(hash).ok().flatten());
            for r in &mut all {
                ketenbus_connectors::fhir::sink::inline_resource_attachments(r, &source);
            }
        }
        all
    }

    /// Where the resource `ty`/`id` is, if the index knows it.
    ///
    /// # Errors
    /// When the index cannot be read.
    pub fn locate(&self, ty: &str, id: &str) -> Result<Option<Located>, ResourceError> {
        if let Some(event_id) = emit::event_of_resource_id(id)
            && let Some(at) = self.locate_event(event_id)?
        {
            return Ok(Some(at));
        }
        let c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(c.query_row(
            &format!(
                "{LOCATED} WHERE event_id = (SELECT event_id FROM hashed WHERE type = ?1 AND id = ?2)"
            ),
            params![ty, id],
            located,
        )
        .optional()?)
    }

    /// The resource `ty`/`id`, read from its event.
    ///
    /// # Errors
    /// When the index or the log cannot be read.
    pub async fn read(&self, ty: &str, id: &str) -> Result<Found, ResourceError> {
        let Some(at) = self.locate(ty, id)? else {
            return Ok(Found::Unknown);
        };
        let Some(event) = self
            .log
            .event_at(&at.topic, at.partition, at.offset)
            .await?
        else {
            return Ok(Found::Gone(at));
        };
        let found = self.render(&event).into_iter().find(|r| {
            r.get("resourceType").and_then(Value::as_str) == Some(ty)
                && r.get("id").and_then(Value::as_str) == Some(id)
        });
        Ok(match found {
            Some(r) => Found::Resource(r, at),
            None => Found::Unknown,
        })
    }

    /// Where the event `event_id` is in the log, if the index knows it.
    ///
    /// # Errors
    /// When the index cannot be read.
    pub fn locate_event(&self, event_id: &str) -> Result<Option<Located>, ResourceError> {
        let c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(c.query_row(
            &format!("{LOCATED} WHERE event_id = ?1"),
            [event_id],
            located,
        )
        .optional()?)
    }

    /// The event at a position of an event topic; `None` when it is not, or no longer
    /// (retention), in the log.
    ///
    /// # Errors
    /// When the log cannot be read or the record is no event.
    pub async fn event_at(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Option<Event>, ResourceError> {
        self.log.event_at(topic, partition, offset).await
    }

    /// Every resource of the event `event_id`, in the order of its Bundle; empty when the
    /// index does not know it or retention removed it.
    ///
    /// # Errors
    /// When the index or the log cannot be read.
    pub async fn of_event(&self, event_id: &str) -> Result<Vec<Value>, ResourceError> {
        let Some(at) = self.locate_event(event_id)? else {
            return Ok(Vec::new());
        };
        let Some(event) = self
            .log
            .event_at(&at.topic, at.partition, at.offset)
            .await?
        else {
            return Ok(Vec::new());
        };
        Ok(self.render(&event))
    }

    /// Wait until the index knows event `event_id` (a sink that hands out its URLs right
    /// after the event was published), up to `within`.
    pub async fn wait_for(&self, event_id: &str, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        loop {
            let known = {
                let c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
                c.query_row(
                    "SELECT 1 FROM events WHERE event_id = ?1",
                    [event_id],
                    |_| Ok(()),
                )
                .optional()
                .ok()
                .flatten()
                .is_some()
            };
            if known || tokio::time::Instant::now() >= until {
                return known;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Apply `records` and the position after them in one transaction.
fn apply(conn: &Mutex<Connection>, records: &[Record]) -> rusqlite::Result<()> {
    let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
    let tx = c.transaction()?;
    for r in records {
        if let Some(shape) = shape_of(r) {
            let h = &shape.header;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO events
                 (event_id, topic, partition, offset, receiver, patient)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                h.id,
                r.topic,
                r.partition,
                r.offset,
                h.receiver,
                h.patient_key
            ])?;
            for (ty, id) in emit::ids_not_naming_event(&shape) {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO hashed (type, id, event_id) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![ty, id, h.id])?;
            }
        }
        tx.prepare_cached(
            "INSERT INTO applied (topic, partition, next_offset) VALUES (?1, ?2, ?3)
             ON CONFLICT (topic, partition) DO UPDATE SET next_offset = MAX(next_offset, ?3)",
        )?
        .execute(params![r.topic, r.partition, r.offset + 1])?;
    }
    tx.commit()
}

/// Read one event topic into the index until `cancel`.
async fn index_topic<C: Consumer>(
    mut reader: C,
    conn: Arc<Mutex<Connection>>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            r = reader.poll(Duration::from_millis(500)) => r,
        };
        let first = match first {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "resource index: reading an event topic failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let batch = crate::bus::background::gather(&mut reader, first, 512).await;
        let tokens: Vec<_> = batch.iter().map(Record::ack_token).collect();
        let c = Arc::clone(&conn);
        let applied = tokio::task::spawn_blocking(move || apply(&c, &batch)).await;
        match applied {
            Ok(Ok(())) => {
                for t in tokens {
                    let _ = reader.ack(t).await;
                }
                let _ = reader.commit().await;
            }
            Ok(Err(e)) => {
                // The position was not written either: the records are read again on the
                // next start; meanwhile later ones go on.
                tracing::error!(error = %e, "resource index: writing failed");
            }
            Err(e) => tracing::error!(error = %e, "resource index: the writer panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{OutRecord, TopicSpec};

    const AZ: &str = include_str!(
        "../../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
    );

    fn handover() -> Event {
        let tree = ketenbus_connectors::fhir::json::parse(AZ.as_bytes()).unwrap();
        let mut events =
            ketenbus_connectors::fhir::inbound::events_from(&tree, "env-1", "fhir_json").unwrap();
        let mut e = events.remove(0);
        e.header_mut().receiver = Some("agb:01234567".into());
        e.header_mut().patient_key = Some("pseudo-1".into());
        e
    }

    /// Lab results whose professionals' resource ids are too long and hashed.
    fn lab_results() -> Vec<Event> {
        let edi =
            include_bytes!("../../../connectors/testdata/edifact/ketenbus/medlab-two-messages.edi");
        let mut events = ketenbus_connectors::edifact::normalise_bytes(
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            edi,
        )
        .unwrap();
        for e in &mut events {
            e.header_mut().receiver = Some("agb:01234567".into());
            e.header_mut().patient_key = Some("pseudo-2".into());
        }
        events
    }

    /// An embedded log with `events` on their topics, and their offsets.
    async fn log_with(dir: &Path, events: &[Event]) -> (Arc<impl Bus>, Vec<i64>) {
        let bus = Arc::new(crate::bus::test_log(dir, "log.db"));
        let specs: Vec<TopicSpec> = KINDS
            .iter()
            .map(|k| TopicSpec {
                name: topics::events(*k),
                partitions: 1,
            })
            .collect();
        bus.ensure_topics(&specs).await.unwrap();
        let records = events
            .iter()
            .map(|e| OutRecord {
                topic: topics::events(e.kind()),
                key: e
                    .header()
                    .patient_key
                    .clone()
                    .unwrap_or_default()
                    .into_bytes(),
                value: e.to_avro().unwrap(),
            })
            .collect();
        let at = bus.publish(records).await.unwrap();
        (bus, at.iter().map(|p| p.offset).collect())
    }

    /// Reads every resource of `events` and returns how many had a hashed id.
    async fn all_found(r: &Resources, events: &[Event]) -> usize {
        let mut hashed = 0;
        for event in events {
            assert!(r.wait_for(&event.header().id, Duration::from_secs(5)).await);
            for want in ketenbus_connectors::fhir::emit::resources(event).unwrap() {
                let ty = want.get("resourceType").and_then(Value::as_str).unwrap();
                let id = want.get("id").and_then(Value::as_str).unwrap();
                if emit::event_of_resource_id(id).is_none() {
                    hashed += 1;
                }
                match r.read(ty, id).await.unwrap() {
                    Found::Resource(got, at) => {
                        assert_eq!(got, want);
                        assert_eq!(at.event_id, event.header().id);
                        assert_eq!(at.receiver.as_deref(), Some("agb:01234567"));
                        assert_eq!(at.patient, event.header().patient_key);
                    }
                    other => panic!("{ty}/{id}: {other:?}"),
                }
            }
        }
        hashed
    }

    #[tokio::test]
    async fn resources_with_hashed_ids_are_found_and_made_up_ids_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let events = lab_results();
        let (bus, _) = log_with(dir.path(), &events).await;
        let cancel = CancellationToken::new();
        let r = Resources::start(dir.path(), bus, &cancel).await.unwrap();
        assert!(all_found(&r, &events).await > 0, "no hashed id was tried");
        let first = &events[0].header().id;
        for (ty, id) in [
            ("Observation", format!("{first}-result-999")),
            ("Patient", format!("{first}-result-1")),
            ("Observation", "0123456789abcdef0123456789abcdef".to_owned()),
            ("Observation", format!("{first}x-result-1")),
        ] {
            assert!(
                matches!(r.read(ty, &id).await.unwrap(), Found::Unknown),
                "{ty}/{id}"
            );
        }
        cancel.cancel();
    }

    /// An index written a row per resource (before one row per event) is taken over as it
    /// is: the topic is not read again, and every resource is still found.
    #[tokio::test]
    async fn an_index_of_a_row_per_resource_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let events = lab_results();
        let (bus, offsets) = log_with(dir.path(), &events).await;
        {
            let c = Connection::open(dir.path().join("fhir-resources.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE resources (
                     type TEXT NOT NULL, id TEXT NOT NULL, event_id TEXT NOT NULL,
                     topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
                     receiver TEXT, patient TEXT, PRIMARY KEY (type, id));
                 CREATE TABLE applied (
                     topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
                     PRIMARY KEY (topic, partition));",
            )
            .unwrap();
            let topic = topics::events(EventKind::LabResult);
            for (offset, e) in offsets.iter().zip(&events) {
                for res in ketenbus_connectors::fhir::emit::resources(e).unwrap() {
                    c.execute(
                        "INSERT INTO resources VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7)",
                        params![
                            res.get("resourceType").and_then(Value::as_str),
                            res.get("id").and_then(Value::as_str),
                            e.header().id,
                            topic,
                            offset,
                            e.header().receiver,
                            e.header().patient_key
                        ],
                    )
                    .unwrap();
                }
            }
            c.execute(
                "INSERT INTO applied VALUES (?1, 0, ?2)",
                params![topic, offsets.iter().max().unwrap() + 1],
            )
            .unwrap();
        }
        let cancel = CancellationToken::new();
        let r = Resources::start(dir.path(), bus, &cancel).await.unwrap();
        assert!(all_found(&r, &events).await > 0);
        let c = r.conn.lock().unwrap();
        let left: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'resources'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
        drop(c);
        cancel.cancel();
    }

    #[tokio::test]
    async fn every_resource_of_an_event_is_found_again_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let event = handover();
        let (bus, _) = log_with(dir.path(), std::slice::from_ref(&event)).await;
        let expected = ketenbus_connectors::fhir::emit::resources(&event).unwrap();
        let cancel = CancellationToken::new();
        let r = Resources::start(dir.path(), Arc::clone(&bus), &cancel)
            .await
            .unwrap();
        assert!(r.wait_for(&event.header().id, Duration::from_secs(5)).await);
        for want in &expected {
            let ty = want.get("resourceType").and_then(Value::as_str).unwrap();
            let id = want.get("id").and_then(Value::as_str).unwrap();
            match r.read(ty, id).await.unwrap() {
                Found::Resource(got, at) => {
                    assert_eq!(&got, want);
                    assert_eq!(at.receiver.as_deref(), Some("agb:01234567"));
                    assert_eq!(at.patient.as_deref(), Some("pseudo-1"));
                }
                other => panic!("{ty}/{id}: {other:?}"),
            }
        }
        assert!(matches!(
            r.read("Patient", "nobody").await.unwrap(),
            Found::Unknown
        ));
        cancel.cancel();
        drop(r);
        // A new start reads the index it left, without reading the topic again.
        let cancel = CancellationToken::new();
        let r = Resources::start(dir.path(), bus, &cancel).await.unwrap();
        assert_eq!(r.of_event(&event.header().id).await.unwrap(), expected);
        cancel.cancel();
    }
}
