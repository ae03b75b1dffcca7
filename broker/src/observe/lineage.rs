//! The lineage index: for every message, what happened to it — received, normalised into
//! which events, delivered to which subscriptions with what outcome, dead-lettered and why.
//!
//! One lineage for all nodes: each step is a [`LineageRecord`] on the topic
//! `ketenbus.lineage` (compacted on Kafka; see [`LineageRecord`] for why one key per step).
//! The stages whose acknowledgement promises a message is known write its records in the
//! same append as their own, before they acknowledge ([`Lineage::writes`]): ingest its
//! `received` record with the raw record (before the sender's 202), the router its records
//! with the events (before the raw record's ack), a subscription its delivery steps with the
//! outcomes. So a node killed at any moment leaves no acknowledged message unknown to the
//! other nodes. Other steps (retries, replays) are recorded on a [`Lineage`] handle without
//! waiting; a publisher task gathers them for a few milliseconds and publishes them. Every node reads the whole topic alone
//! ([`Bus::read_alone`]: no group shares its partitions, so each node sees every node's
//! writes) and applies it to its own SQLite index (`lineage.db`), in batches, with the
//! position it read up to in the same transaction; so every node answers for every message.
//! The embedded engine takes the same path with one node. Applying is idempotent (a step is
//! stored once per key), so a record read twice (a publish retried after a lost answer, a
//! lost position) changes nothing. It stays an index: the topics (raw, events, delivery
//! outcomes, dead letters) remain the record.
//!
//! What a read sees: after [`Lineage::flush`], every write this node made before it
//! (published and applied here); writes of other nodes once this node's reader has polled
//! them, normally within milliseconds of their publication.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ketenbus_schemas::AvroRecord;
use ketenbus_schemas::lineage::{LineageReceived, LineageRecord, LineageStep, Stage, StepOutcome};
use ketenbus_schemas::topics;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Consumer, OutRecord, Record};

pub mod search;
pub use search::{BadParameter, ListQuery, Search, Status};

/// A step in a message's life.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Step {
    /// When, ms since the epoch; serialised with `at` beside it, the same time in RFC 3339.
    #[serde(flatten, serialize_with = "at_and_ms")]
    pub at_ms: i64,
    /// Where the message was.
    pub stage: Stage,
    /// Subscription, for delivery steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
    /// Event id (or envelope id for raw deliveries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    /// Event kind, or raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Attempt number of a delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// What it came to.
    pub outcome: StepOutcome,
    /// Reason code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Detail without payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Patient pseudonym (the patient key) of the event, on normalised steps: what a search
    /// by patient finds the message by. Never a BSN.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub patient: Option<String>,
}

impl Step {
    /// A step with only stage and outcome set.
    #[must_use]
    pub fn new(at_ms: i64, stage: Stage, outcome: StepOutcome) -> Step {
        Step {
            at_ms,
            stage,
            subscription: None,
            record_id: None,
            kind: None,
            attempt: None,
            outcome,
            reason: None,
            detail: None,
            patient: None,
        }
    }
}

/// What ketenbus knows of a message when it was received.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Received {
    /// Message (envelope) id.
    pub id: String,
    /// When, ms since the epoch; serialised with `received_at` beside it, in RFC 3339.
    #[serde(flatten, serialize_with = "received_at_and_ms")]
    pub received_at_ms: i64,
    /// Connector.
    pub connector: String,
    /// Format.
    pub format: String,
    /// Declared media type.
    pub content_type: String,
    /// Body size in bytes.
    pub size: u64,
    /// Sender party id.
    pub sender: Option<String>,
    /// Receiver party id.
    pub receiver: Option<String>,
    /// Position on the raw topic, serialised as `raw_partition` and `raw_offset` (both
    /// `null` while unknown). Unknown in the record ingest writes with the envelope itself,
    /// in one write before the sender's acknowledgement (the position comes only from that
    /// write); the router's record of the envelope, made when it routes it, carries it.
    #[serde(flatten, serialize_with = "raw_position")]
    pub raw: Option<crate::bus::Position>,
    /// The id the message gives itself: the UNB interchange control reference, the FHIR
    /// MessageHeader id (else the Bundle id), the mail's Message-ID.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_id: Option<String>,
    /// The inbox file it came from (its name, never a path): the detail of its `received`
    /// step.
    #[serde(skip)]
    pub file: Option<String>,
}

/// `<name>_ms` as epoch milliseconds and `<name>` as RFC 3339 (UTC, milliseconds).
fn time_pair<S: serde::Serializer>(name: &str, ms: i64, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry(&format!("{name}_ms"), &ms)?;
    map.serialize_entry(name, &humantime::format_rfc3339_millis(t).to_string())?;
    map.end()
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's serialize_with takes a reference
fn at_and_ms<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    time_pair("at", *ms, s)
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's serialize_with takes a reference
fn received_at_and_ms<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    time_pair("received_at", *ms, s)
}

#[allow(clippy::ref_option)] // serde's serialize_with takes a reference
fn raw_position<S: serde::Serializer>(
    raw: &Option<crate::bus::Position>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry("raw_partition", &raw.map(|p| p.partition))?;
    map.serialize_entry("raw_offset", &raw.map(|p| p.offset))?;
    map.end()
}

impl Received {
    /// What the lineage records of `envelope`, stored at `position` on the raw topic (`None`:
    /// not known yet, see [`Received::raw`]).
    #[must_use]
    pub fn of(
        envelope: &ketenbus_schemas::RawEnvelope,
        position: Option<crate::bus::Position>,
    ) -> Received {
        Received {
            id: envelope.id.clone(),
            received_at_ms: envelope.received_at_ms,
            connector: envelope.connector.clone(),
            format: envelope.format.as_str().to_owned(),
            content_type: envelope.content_type.clone(),
            size: envelope.body.len() as u64,
            sender: envelope.sender.clone(),
            receiver: envelope.receiver.clone(),
            raw: position,
            file: (envelope.connector == "inbox")
                .then(|| {
                    envelope
                        .attributes
                        .get(ketenbus_connectors::inbox::FILE_ATTRIBUTE)
                })
                .flatten()
                .cloned(),
            source_id: ketenbus_connectors::party::source_id(envelope.format, &envelope.body),
        }
    }
}

enum Op {
    Received(Received),
    Step(String, Step),
    Flush(oneshot::Sender<()>),
    /// Answered once everything recorded before it is on the lineage topic; dropped
    /// unanswered when that failed (logged). It rides the normal gathering, cutting nothing
    /// short.
    Published(oneshot::Sender<()>),
}

/// Why the lineage index cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    /// The index database failed.
    #[error("lineage index: {0}")]
    Index(#[from] rusqlite::Error),
    /// The lineage topic cannot be read.
    #[error("lineage topic: {0}")]
    Bus(#[from] BusError),
}

impl LineageError {
    /// How to handle it.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        match self {
            LineageError::Index(_) => ketenbus_connectors::ErrorKind::Fatal,
            LineageError::Bus(e) => e.kind(),
        }
    }
}

/// Handle to the lineage index. Cheap to clone.
#[derive(Clone)]
pub struct Lineage {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
    group: String,
    /// Shared with the publisher and the reader: what [`Lineage::flush`] waits for.
    progress: Arc<Mutex<Progress>>,
    /// Step ids of steps a stage publishes itself ([`Lineage::records`]).
    ids: Arc<Mutex<StepIds>>,
    /// The lineage topic is on the log the stages write to (not a log of its own, as in
    /// tests of the stages): see [`Lineage::records`].
    shares_log: bool,
}

impl std::fmt::Debug for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lineage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The lineage of one message as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageLineage {
    /// What was received.
    #[serde(flatten)]
    pub received: Received,
    /// Events it was normalised into: (event id, kind).
    pub events: Vec<EventRef>,
    /// Latest outcome per subscription and record.
    pub deliveries: Vec<DeliverySummary>,
    /// Every step, in order.
    pub steps: Vec<Step>,
}

/// An event made from the message.
#[derive(Debug, Clone, Serialize)]
pub struct EventRef {
    /// Event id.
    pub id: String,
    /// Kind.
    pub kind: String,
}

/// Where a record stands with a subscription.
#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    /// Subscription.
    pub subscription: String,
    /// Event id or envelope id.
    pub record_id: String,
    /// Latest outcome.
    pub outcome: StepOutcome,
    /// Reason of the latest outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Attempts made.
    pub attempts: u32,
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS messages (
             id TEXT PRIMARY KEY, received_at INTEGER NOT NULL, connector TEXT NOT NULL, format TEXT NOT NULL,
             content_type TEXT NOT NULL, size INTEGER NOT NULL, sender TEXT, receiver TEXT,
             raw_partition INTEGER NOT NULL, raw_offset INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS steps (
             message_id TEXT NOT NULL, at INTEGER NOT NULL, stage TEXT NOT NULL, subscription TEXT,
             record_id TEXT, kind TEXT, attempt INTEGER, outcome TEXT NOT NULL, reason TEXT, detail TEXT);
         CREATE INDEX IF NOT EXISTS steps_message ON steps (message_id);
         CREATE INDEX IF NOT EXISTS steps_outcome ON steps (outcome, subscription, at);
         CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at, id);
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS applied (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);",
    )?;
    // The step's key on the lineage topic: a step is applied once. An index from before the
    // lineage topic has none on its rows (NULL, which the unique index lets repeat).
    let has_key: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('steps') WHERE name = 'step_key'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_key {
        conn.execute_batch("ALTER TABLE steps ADD COLUMN step_key TEXT")?;
    }
    conn.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS steps_key ON steps (message_id, step_key)",
    )?;
    search::migrate(&mut conn)?;
    Ok(conn)
}

/// This index's node name (made once, kept in the index): its reader's consumer group is
/// `ketenbus.lineage.<node>`. A new index (a new machine, a removed `lineage.db`) is a new
/// node that reads the topic from its beginning.
fn node_of(conn: &Connection) -> rusqlite::Result<String> {
    let found: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'node'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(node) = found {
        return Ok(node);
    }
    let node = ketenbus_schemas::new_envelope_id();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('node', ?1)",
        params![node],
    )?;
    Ok(node)
}

/// How far the index has applied the topic: (partition, next offset).
fn applied_of(conn: &Connection) -> rusqlite::Result<Vec<(u32, i64)>> {
    let mut stmt = conn.prepare("SELECT partition, next_offset FROM applied")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Longest a read waits for this node's own writes to reach the index.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Channel room for writes waiting to be published.
const QUEUE: usize = 16_384;

impl Lineage {
    /// Open (or create) `lineage.db` in `data_dir`, and start the tasks that publish this
    /// node's writes to `ketenbus.lineage` on `bus` and apply the whole topic to the index.
    /// The tasks run until every handle is dropped.
    ///
    /// # Errors
    /// When the database cannot be opened or the topic cannot be read.
    pub async fn start<B: Bus>(data_dir: &Path, bus: Arc<B>) -> Result<Lineage, LineageError> {
        let (conn, path) = open_in(data_dir)?;
        let node = node_of(&conn)?;
        let group = topics::lineage_group(&node);
        let reader = bus
            .read_alone(&group, topics::LINEAGE, &applied_of(&conn)?)
            .await?;
        crate::observe::watch::watch_index("lineage", &group, &[topics::LINEAGE.to_owned()]);
        let (lineage, rx) = Lineage::handle(path, group, true);
        tokio::spawn(pipe(bus, reader, conn, rx, lineage.shared()));
        Ok(lineage)
    }

    /// A handle whose writes wait in the returned queue.
    fn handle(path: PathBuf, group: String, shares_log: bool) -> (Lineage, mpsc::Receiver<Op>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let lineage = Lineage {
            tx,
            path,
            group,
            progress: Arc::new(Mutex::new(Progress::default())),
            ids: Arc::new(Mutex::new(StepIds::new())),
            shares_log,
        };
        (lineage, rx)
    }

    /// The lineage-topic records of `steps` (message id, step), for a stage that publishes
    /// them itself in the same append as its own records: see [`Lineage::writes`].
    #[must_use]
    pub fn records(&self, steps: &[(String, Step)]) -> Option<Vec<OutRecord>> {
        self.writes(&[], steps)
    }

    /// The lineage-topic records of `received` messages and of `steps` (message id, step),
    /// for a stage that publishes them itself in the same append as its own records, before
    /// it acknowledges what they record (one group commit on the embedded engine, one produce
    /// burst on Kafka; no wait for the publisher task); it then calls
    /// [`Lineage::published_at`] with their positions. Publishing them twice (a retried
    /// append) stores each once. `None` when this lineage's topic is on a log of its own
    /// (tests of the stages): record them with [`Lineage::received`] and [`Lineage::step`].
    #[must_use]
    pub fn writes(
        &self,
        received: &[Received],
        steps: &[(String, Step)],
    ) -> Option<Vec<OutRecord>> {
        if !self.shares_log {
            return None;
        }
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let ops = received.iter().map(|r| Op::Received(r.clone())).chain(
            steps
                .iter()
                .map(|(id, step)| Op::Step(id.clone(), step.clone())),
        );
        Some(
            ops.filter_map(|op| record_of(op, &mut ids))
                .filter_map(out_record)
                .collect(),
        )
    }

    /// Where records from [`Lineage::records`] landed: a later [`Lineage::flush`] waits for
    /// the index to apply them too.
    pub fn published_at(&self, positions: &[crate::bus::Position]) {
        let mut p = lock(&self.progress);
        for pos in positions {
            let next = p.published.entry(pos.partition).or_insert(0);
            *next = (*next).max(pos.offset + 1);
        }
    }

    /// The consumer group under which this node's index commits its reading of the lineage
    /// topic (retention on the embedded engine keeps what it has not applied).
    #[must_use]
    pub fn group(&self) -> &str {
        &self.group
    }

    /// A lineage on its own embedded log in `data_dir` (`lineage-test-log.db`), for tests of
    /// the stages. Needs a Tokio runtime.
    ///
    /// # Errors
    /// When the database cannot be opened.
    #[cfg(test)]
    pub fn open(data_dir: &Path) -> Result<Lineage, LineageError> {
        let bus = Arc::new(crate::bus::test_log(data_dir, "lineage-test-log.db"));
        let (conn, path) = open_in(data_dir)?;
        let node = node_of(&conn)?;
        let group = topics::lineage_group(&node);
        let applied = applied_of(&conn)?;
        let (lineage, rx) = Lineage::handle(path, group.clone(), false);
        let shared = lineage.shared();
        tokio::spawn(async move {
            bus.ensure_topics(&[crate::bus::TopicSpec {
                name: topics::LINEAGE.to_owned(),
                partitions: 2,
            }])
            .await
            .expect("lineage topic");
            let reader = bus
                .read_alone(&group, topics::LINEAGE, &applied)
                .await
                .expect("lineage reader");
            pipe(bus, reader, conn, rx, shared).await;
        });
        Ok(lineage)
    }

    /// What the publisher and the reader share with the handles. The tasks must not hold the
    /// handle itself: they run until every handle is dropped.
    fn shared(&self) -> (Arc<Mutex<Progress>>, Arc<Mutex<StepIds>>) {
        (Arc::clone(&self.progress), Arc::clone(&self.ids))
    }

    /// Record a received message.
    pub async fn received(&self, r: Received) {
        let _ = self.tx.send(Op::Received(r)).await;
    }

    /// Record a step of message `message_id`.
    pub async fn step(&self, message_id: &str, step: Step) {
        let _ = self.tx.send(Op::Step(message_id.to_owned(), step)).await;
    }

    /// Wait until everything this node recorded so far is published and applied to its
    /// index (writes of other nodes: see the module doc).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// A signal that fires once everything this node recorded so far is on the lineage
    /// topic, without waiting for any index; it closes unanswered when that failed (logged).
    /// Stages that must not acknowledge before their lineage is durable fold their writes into
    /// their own append instead ([`Lineage::writes`]): this is for a lineage on a log of its
    /// own (tests of the stages).
    pub async fn published(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Op::Published(tx)).await;
        rx
    }

    /// Before a read: [`Lineage::flush`], but no longer than [`SETTLE`] (a log that takes no
    /// writes now must not hold up the API; the read then shows what the index has).
    async fn settle(&self) {
        if tokio::time::timeout(SETTLE, self.flush()).await.is_err() {
            tracing::warn!("lineage writes not yet in the index; a read shows what it has");
        }
    }

    /// The lineage of message `id`, waiting up to `within` for it to reach this node's index:
    /// for work on a message another node took in (a bounce, a replay), whose lineage arrives
    /// through the lineage topic.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn find(
        &self,
        id: &str,
        within: Duration,
    ) -> rusqlite::Result<Option<MessageLineage>> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let found = self.get(id).await?;
            if found.is_some() || tokio::time::Instant::now() >= until {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The lineage of one message, if it is known.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn get(&self, id: &str) -> rusqlite::Result<Option<MessageLineage>> {
        // A client may ask right after its 202, before the batch holding the message is
        // written: flush, so what was acknowledged is always found.
        self.settle().await;
        let path = self.path.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || read(&path, &id))
            .await
            .unwrap_or_else(|e| Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
    }
}

/// One page of messages, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The messages.
    pub items: Vec<Received>,
    /// Cursor for the next page, when there is one.
    pub next: Option<String>,
}

impl Lineage {
    /// Messages matching `q`, newest first, a page at a time (see [`search`]).
    ///
    /// # Errors
    /// A database failure, as text.
    pub async fn list(&self, q: Search) -> Result<Page, String> {
        self.settle().await;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Page> {
            let conn =
                Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            conn.busy_timeout(Duration::from_secs(5))?;
            search::page(&conn, &q)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }
}

/// Open (or create) `lineage.db` in `data_dir`.
fn open_in(data_dir: &Path) -> rusqlite::Result<(Connection, PathBuf)> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let path = data_dir.join("lineage.db");
    Ok((open(&path)?, path))
}

/// Most writes published, or records applied, in one batch.
const MAX_BATCH: usize = 8192;
/// How long writes may gather before they are published.
const GATHER: Duration = Duration::from_millis(20);

/// Take what is waiting, then keep taking for up to [`GATHER`] unless the batch is full or
/// someone waits for a flush.
async fn gather(rx: &mut mpsc::Receiver<Op>, first: Op) -> Vec<Op> {
    let until = tokio::time::Instant::now() + GATHER;
    let mut flush = matches!(first, Op::Flush(_));
    let mut ops = vec![first];
    while !flush && ops.len() < MAX_BATCH {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(op)) => {
                flush |= matches!(op, Op::Flush(_));
                ops.push(op);
            }
            Ok(None) | Err(_) => break,
        }
    }
    ops
}

/// What the publisher and the reader share: how far this node published and the index
/// applied (partition -> next offset), and the flushes waiting for the index to catch up.
#[derive(Default)]
struct Progress {
    published: HashMap<u32, i64>,
    applied: HashMap<u32, i64>,
    waiting: Vec<(HashMap<u32, i64>, oneshot::Sender<()>)>,
}

impl Progress {
    fn covers(applied: &HashMap<u32, i64>, target: &HashMap<u32, i64>) -> bool {
        target
            .iter()
            .all(|(p, o)| applied.get(p).is_some_and(|a| a >= o))
    }

    /// Answer the flushes whose target the index has reached.
    fn wake(&mut self) {
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(target, _)| Self::covers(&self.applied, target));
        self.waiting = rest;
        for (_, answer) in done {
            let _ = answer.send(());
        }
    }
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Publish this node's writes and apply the whole topic, until every handle is dropped.
async fn pipe<B: Bus>(
    bus: Arc<B>,
    reader: B::Consumer,
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    (progress, ids): (Arc<Mutex<Progress>>, Arc<Mutex<StepIds>>),
) {
    let stop = CancellationToken::new();
    let apply = tokio::spawn(crate::bus::background::run(read_topic(
        reader,
        conn,
        Arc::clone(&progress),
        stop.clone(),
    )));
    publish(&*bus, rx, &progress, &ids).await;
    stop.cancel();
    let _ = apply.await;
}

/// The writer instance and sequence of this process's steps: `<instance>.<sequence>`.
struct StepIds {
    instance: String,
    next: u64,
}

impl StepIds {
    fn new() -> StepIds {
        StepIds {
            instance: ketenbus_schemas::new_envelope_id(),
            next: 0,
        }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}.{:012}", self.instance, self.next)
    }
}

/// The record of one write.
fn record_of(op: Op, ids: &mut StepIds) -> Option<LineageRecord> {
    match op {
        Op::Received(r) => Some(LineageRecord {
            message_id: r.id,
            step_id: String::new(),
            received: Some(LineageReceived {
                received_at_ms: r.received_at_ms,
                connector: r.connector,
                format: r.format,
                content_type: r.content_type,
                size: i64::try_from(r.size).unwrap_or(i64::MAX),
                sender: r.sender,
                receiver: r.receiver,
                raw_partition: r
                    .raw
                    .map_or(UNPLACED, |p| i32::try_from(p.partition).unwrap_or(i32::MAX)),
                raw_offset: r.raw.map_or(UNPLACED.into(), |p| p.offset),
                file: r.file,
                source_id: r.source_id,
            }),
            step: None,
        }),
        Op::Step(id, s) => Some(LineageRecord {
            message_id: id,
            step_id: ids.next(),
            received: None,
            step: Some(LineageStep {
                at_ms: s.at_ms,
                stage: s.stage.as_str().to_owned(),
                subscription: s.subscription,
                record_id: s.record_id,
                kind: s.kind,
                attempt: s.attempt.map(|a| i32::try_from(a).unwrap_or(i32::MAX)),
                outcome: s.outcome.as_str().to_owned(),
                reason: s.reason,
                detail: s.detail,
                patient: s.patient,
            }),
        }),
        Op::Flush(_) | Op::Published(_) => None,
    }
}

/// A lineage record as it goes on the topic; `None` (logged) when it does not encode.
fn out_record(record: LineageRecord) -> Option<OutRecord> {
    match record.to_avro() {
        Ok(value) => Some(OutRecord {
            topic: topics::LINEAGE.to_owned(),
            key: record.key(),
            value,
        }),
        Err(e) => {
            tracing::error!(error = %e, "lineage write not encodable; the lineage of its message is incomplete");
            None
        }
    }
}

/// Gather this node's writes and publish them in batches; register each flush to be answered
/// once the index applied everything published before it.
async fn publish<B: Bus>(
    bus: &B,
    mut rx: mpsc::Receiver<Op>,
    progress: &Mutex<Progress>,
    ids: &Mutex<StepIds>,
) {
    // Not cancelled: writes made while the broker stops are still published.
    let never = CancellationToken::new();
    while let Some(first) = rx.recv().await {
        let mut flushes = Vec::new();
        let mut published = Vec::new();
        let mut records = Vec::new();
        for op in gather(&mut rx, first).await {
            match op {
                Op::Flush(done) => flushes.push(done),
                Op::Published(done) => published.push(done),
                op => {
                    let made =
                        record_of(op, &mut ids.lock().unwrap_or_else(PoisonError::into_inner));
                    records.extend(made.and_then(out_record));
                }
            }
        }
        match crate::bus::publish_retrying(bus, records, &never).await {
            Ok(positions) => {
                let mut p = lock(progress);
                for pos in positions {
                    let next = p.published.entry(pos.partition).or_insert(0);
                    *next = (*next).max(pos.offset + 1);
                }
                drop(p);
                for done in published {
                    let _ = done.send(());
                }
            }
            Err(e) => {
                // Not answered: whoever waits must not take these writes for durable.
                tracing::error!(error = %e, "lineage writes not published; the lineage of these messages is incomplete");
            }
        }
        let mut p = lock(progress);
        for done in flushes {
            let target = p.published.clone();
            p.waiting.push((target, done));
        }
        p.wake();
    }
}

/// Read the whole lineage topic and apply it to the index in batches, each with the position
/// it reached, until `stop`.
async fn read_topic<C: Consumer>(
    mut reader: C,
    conn: Connection,
    progress: Arc<Mutex<Progress>>,
    stop: CancellationToken,
) {
    let conn = Arc::new(Mutex::new(conn));
    let mut wait = Duration::from_millis(100);
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            r = reader.poll(Duration::from_millis(250)) => r,
        };
        let first = match polled {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "lineage topic unreadable, retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        wait = Duration::from_millis(100);
        let batch = crate::bus::background::gather(&mut reader, first, MAX_BATCH).await;
        let tokens: Vec<_> = batch.iter().map(Record::ack_token).collect();
        let db = Arc::clone(&conn);
        let applied = tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            apply(&mut conn, &batch)
        })
        .await;
        match applied {
            Ok(Ok(reached)) => {
                let mut p = lock(&progress);
                for (partition, next) in reached {
                    let a = p.applied.entry(partition).or_insert(0);
                    *a = (*a).max(next);
                }
                p.wake();
            }
            Ok(Err(e)) => {
                // The position was not stored either: the batch is read again after a restart.
                tracing::error!(error = %e, "lineage index write failed; the lineage of these messages is incomplete");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "lineage index task failed");
                continue;
            }
        }
        // Retention (embedded) and lag see the index's progress through the group.
        for t in tokens {
            let _ = reader.ack(t).await;
        }
    }
}

/// Apply records to the index in one transaction with the position they reach; returns
/// (partition, next offset) per partition. A record applied before changes nothing.
fn apply(conn: &mut Connection, batch: &[Record]) -> rusqlite::Result<Vec<(u32, i64)>> {
    let mut reached: BTreeMap<u32, i64> = BTreeMap::new();
    let decoded: Vec<(&Record, Option<LineageRecord>)> = batch
        .iter()
        .map(|r| {
            let rec = LineageRecord::from_avro(&r.value)
                .map_err(|e| tracing::warn!(partition = r.partition, offset = r.offset, error = %e, "a lineage record does not decode; skipped"))
                .ok();
            (r, rec)
        })
        .collect();
    // The messages whose search facets this batch changes.
    let mut touched = std::collections::BTreeSet::new();
    let tx = conn.transaction()?;
    {
        let mut msg = tx.prepare_cached(
            // The first record of a message decides, but for its position: ingest's record
            // has none, the router's (read later or, rarely, first) gives it.
            "INSERT INTO messages (id, received_at, connector, format, content_type, size,
                 sender, receiver, raw_partition, raw_offset, source_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET raw_partition = excluded.raw_partition,
                 raw_offset = excluded.raw_offset
             WHERE messages.raw_offset < 0 AND excluded.raw_offset >= 0",
        )?;
        let mut step = tx.prepare_cached(
            "INSERT OR IGNORE INTO steps (message_id, at, stage, subscription, record_id, kind,
                 attempt, outcome, reason, detail, step_key, patient)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut pos = tx.prepare_cached(
            "INSERT INTO applied (partition, next_offset) VALUES (?1, ?2)
             ON CONFLICT (partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
        )?;
        for (r, rec) in &decoded {
            let next = reached.entry(r.partition).or_insert(0);
            *next = (*next).max(r.offset + 1);
            let Some(rec) = rec else { continue };
            if let Some(m) = &rec.received {
                msg.execute(params![
                    rec.message_id,
                    m.received_at_ms,
                    m.connector,
                    m.format,
                    m.content_type,
                    m.size,
                    m.sender,
                    m.receiver,
                    m.raw_partition,
                    m.raw_offset,
                    m.source_id
                ])?;
                step.execute(params![
                    rec.message_id,
                    m.received_at_ms,
                    Stage::Received.as_str(),
                    None::<String>,
                    None::<String>,
                    None::<String>,
                    None::<u32>,
                    StepOutcome::Accepted.as_str(),
                    None::<String>,
                    m.file.as_ref().map(|f| format!("file {f}")),
                    rec.step_id,
                    None::<String>
                ])?;
                touched.insert(rec.message_id.as_str());
            }
            if let Some(s) = &rec.step {
                if s.stage.parse::<Stage>().is_err() || s.outcome.parse::<StepOutcome>().is_err() {
                    tracing::warn!(partition = r.partition, offset = r.offset, stage = %s.stage, outcome = %s.outcome, "a lineage step names a stage or outcome this release does not know; skipped");
                    continue;
                }
                step.execute(params![
                    rec.message_id,
                    s.at_ms,
                    s.stage,
                    s.subscription,
                    s.record_id,
                    s.kind,
                    s.attempt,
                    s.outcome,
                    s.reason,
                    s.detail,
                    rec.step_id,
                    s.patient
                ])?;
                touched.insert(rec.message_id.as_str());
            }
        }
        for (partition, next) in &reached {
            pos.execute(params![partition, next])?;
        }
    }
    for id in &touched {
        search::refresh(&tx, id)?;
    }
    tx.commit()?;
    Ok(reached.into_iter().collect())
}

/// The raw partition and offset of a `received` record (and of a `messages` row) whose
/// position is not known yet: ingest's record, written with the envelope.
const UNPLACED: i32 = -1;

/// The position of a `received` record or `messages` row, `None` when [`UNPLACED`].
fn placed(partition: i64, offset: i64) -> Option<crate::bus::Position> {
    Some(crate::bus::Position {
        partition: u32::try_from(partition).ok()?,
        offset: (offset >= 0).then_some(offset)?,
    })
}

/// Every record on the lineage topic of `bus`, decoded (tests: what a kill would leave).
///
/// # Panics
/// When the topic cannot be read or a record does not decode.
#[cfg(test)]
pub(crate) async fn on_topic<B: Bus>(bus: &B) -> Vec<LineageRecord> {
    let records = bus.read_all(topics::LINEAGE).await.expect("lineage topic");
    records
        .iter()
        .map(|r| LineageRecord::from_avro(&r.value).expect("a lineage record"))
        .collect()
}

/// A `messages` row: id, received_at, connector, format, content_type, size, sender,
/// receiver, raw_partition, raw_offset, source_id.
fn received_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Received> {
    Ok(Received {
        id: r.get(0)?,
        received_at_ms: r.get(1)?,
        connector: r.get(2)?,
        format: r.get(3)?,
        content_type: r.get(4)?,
        size: r.get(5)?,
        sender: r.get(6)?,
        receiver: r.get(7)?,
        raw: placed(r.get(8)?, r.get(9)?),
        source_id: r.get(10)?,
        file: None,
    })
}

/// A stage or outcome column, read back as its name.
fn name<T: std::str::FromStr<Err = ketenbus_schemas::lineage::UnknownName>>(
    r: &rusqlite::Row<'_>,
    column: usize,
) -> rusqlite::Result<T> {
    let text: String = r.get(column)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn read(path: &Path, id: &str) -> rusqlite::Result<Option<MessageLineage>> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let received = conn
        .query_row(
            "SELECT id, received_at, connector, format, content_type, size, sender, receiver,
                    raw_partition, raw_offset, source_id FROM messages WHERE id = ?1",
            params![id],
            received_row,
        )
        .optional()?;
    let Some(received) = received else {
        return Ok(None);
    };
    let mut stmt = conn.prepare(
        "SELECT at, stage, subscription, record_id, kind, attempt, outcome, reason, detail, patient
         FROM steps WHERE message_id = ?1 ORDER BY at, step_key, rowid",
    )?;
    let steps: Vec<Step> = stmt
        .query_map(params![id], |r| {
            Ok(Step {
                at_ms: r.get(0)?,
                stage: name(r, 1)?,
                subscription: r.get(2)?,
                record_id: r.get(3)?,
                kind: r.get(4)?,
                attempt: r.get(5)?,
                outcome: name(r, 6)?,
                reason: r.get(7)?,
                detail: r.get(8)?,
                patient: r.get(9)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut events = Vec::new();
    let mut deliveries: BTreeMap<(String, String), DeliverySummary> = BTreeMap::new();
    for s in &steps {
        if let (true, Some(id), Some(kind)) = (s.stage == Stage::Normalised, &s.record_id, &s.kind)
            && !events.iter().any(|e: &EventRef| &e.id == id)
        {
            events.push(EventRef {
                id: id.clone(),
                kind: kind.clone(),
            });
        }
        if let (Some(sub), Some(rec)) = (&s.subscription, &s.record_id) {
            let d = deliveries
                .entry((sub.clone(), rec.clone()))
                .or_insert_with(|| DeliverySummary {
                    subscription: sub.clone(),
                    record_id: rec.clone(),
                    outcome: s.outcome,
                    reason: None,
                    attempts: 0,
                });
            // Of the steps of attempts, the latest attempt decides: steps written in the same
            // millisecond by different writers (a replay's step and the delivery that followed
            // it) may sort either way. A step of no attempt (a delivery report) comes after.
            if s.attempt.is_none_or(|a| a >= d.attempts) {
                d.outcome = s.outcome;
                d.reason.clone_from(&s.reason);
            }
            // A dead letter on the first attempt has no delivery step, only its own.
            d.attempts = d.attempts.max(s.attempt.unwrap_or(0));
        }
    }
    Ok(Some(MessageLineage {
        received,
        events,
        deliveries: deliveries.into_values().collect(),
        steps,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use ketenbus_schemas::AvroRecord;
    use ketenbus_schemas::lineage::{LineageRecord, Stage, StepOutcome};
    use ketenbus_schemas::topics;

    use super::{Lineage, Received, Step};
    use crate::bus::{Bus, OutRecord, TopicSpec, test_log};

    async fn log(dir: &std::path::Path) -> Arc<impl Bus> {
        let bus = Arc::new(test_log(dir, "log.db"));
        bus.ensure_topics(&[TopicSpec {
            name: topics::LINEAGE.to_owned(),
            partitions: 3,
        }])
        .await
        .unwrap();
        bus
    }

    fn received(id: &str) -> Received {
        Received {
            id: id.to_owned(),
            received_at_ms: 1_764_000_000_000,
            connector: "http".into(),
            format: "edifact".into(),
            content_type: "application/EDIFACT".into(),
            size: 10,
            sender: None,
            receiver: None,
            raw: Some(crate::bus::Position {
                partition: 0,
                offset: 4,
            }),
            file: None,
            source_id: None,
        }
    }

    fn delivery(attempt: u32, outcome: StepOutcome) -> Step {
        let mut s = Step::new(1_764_000_000_100, Stage::Delivery, outcome);
        s.subscription = Some("gp".into());
        s.record_id = Some("m1".into());
        s.attempt = Some(attempt);
        s
    }

    async fn steps(l: &Lineage, id: &str) -> Vec<StepOutcome> {
        let m = l.get(id).await.unwrap().expect("the message is known");
        m.steps.iter().map(|s| s.outcome).collect()
    }

    /// A replayed dead letter delivered in the same millisecond as its `replayed` step, whose
    /// step id sorts after the delivery's (two writers): the summary still says delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_latest_attempt_decides_a_delivery_summary() {
        let dir = tempfile::tempdir().unwrap();
        let bus = log(dir.path()).await;
        let l = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        l.received(received("m1")).await;
        l.step("m1", delivery(1, StepOutcome::DeadLettered)).await;
        l.step("m1", delivery(2, StepOutcome::Delivered)).await;
        let mut replayed = delivery(1, StepOutcome::Replayed);
        replayed.stage = Stage::DeadLettered;
        l.step("m1", replayed).await;
        l.flush().await;
        let m = l.get("m1").await.unwrap().unwrap();
        assert_eq!(m.deliveries.len(), 1);
        assert_eq!(m.deliveries[0].outcome, StepOutcome::Delivered);
        assert_eq!(m.deliveries[0].attempts, 2);
    }

    /// Ingest's `received` record has no position (it is written with the envelope), the
    /// router's has: the index keeps the first record and takes the position from whichever
    /// gives it, in either order; the API shows `null` until then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_is_placed_by_the_record_that_knows_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let bus = log(dir.path()).await;
        let l = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        let unplaced = |id: &str| Received {
            raw: None,
            sender: Some("mailbox:1".into()),
            ..received(id)
        };
        l.received(unplaced("m5")).await;
        l.flush().await;
        let m = l.get("m5").await.unwrap().unwrap();
        assert_eq!(m.received.raw, None);
        let json = serde_json::to_value(&m).unwrap();
        assert!(
            json["raw_partition"].is_null() && json["raw_offset"].is_null(),
            "{json}"
        );
        l.received(received("m5")).await;
        l.received(received("m6")).await;
        l.received(unplaced("m6")).await;
        l.flush().await;
        for id in ["m5", "m6"] {
            let m = l.get(id).await.unwrap().unwrap();
            assert_eq!(m.received.raw.map(|p| p.offset), Some(4), "{id}");
            assert_eq!(serde_json::to_value(&m).unwrap()["raw_offset"], 4);
            assert_eq!(steps(&l, id).await, vec![StepOutcome::Accepted], "{id}");
        }
        let first = l.get("m5").await.unwrap().unwrap().received;
        assert_eq!(
            first.sender.as_deref(),
            Some("mailbox:1"),
            "the first record decides"
        );
    }

    /// A restart reads on from where the index was; a record read again (its position lost,
    /// or the same step published twice) is applied once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_applies_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let bus = log(dir.path()).await;
        let l = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        l.received(received("m1")).await;
        l.step("m1", delivery(1, StepOutcome::Retrying)).await;
        l.step("m1", delivery(2, StepOutcome::Delivered)).await;
        l.flush().await;
        let want = vec![
            StepOutcome::Accepted,
            StepOutcome::Retrying,
            StepOutcome::Delivered,
        ];
        assert_eq!(steps(&l, "m1").await, want);
        drop(l);
        tokio::time::sleep(Duration::from_millis(300)).await;

        let l = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        l.flush().await;
        assert_eq!(steps(&l, "m1").await, want, "after a restart");
        drop(l);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // The position lost: the whole topic is read again, and every step of it published
        // twice over (a publish retried after its answer was lost).
        let conn = rusqlite::Connection::open(dir.path().join("lineage.db")).unwrap();
        conn.execute("DELETE FROM applied", []).unwrap();
        drop(conn);
        let again: Vec<OutRecord> = bus
            .read_all(topics::LINEAGE)
            .await
            .unwrap()
            .into_iter()
            .map(|r| OutRecord {
                topic: r.topic,
                key: r.key,
                value: r.value,
            })
            .collect();
        assert_eq!(again.len(), 3, "one record per write");
        bus.publish(again).await.unwrap();
        let l = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        l.step("m1", delivery(3, StepOutcome::Delivered)).await;
        l.flush().await;
        let mut more = want.clone();
        more.push(StepOutcome::Delivered);
        assert_eq!(steps(&l, "m1").await, more, "every step once");
        let m = l.get("m1").await.unwrap().unwrap();
        assert_eq!(m.deliveries.len(), 1);
        assert_eq!(m.deliveries[0].attempts, 3);
    }

    /// Retention on the embedded engine removes a lineage record only once this node's index
    /// applied it (its group committed past it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_keeps_what_the_index_has_not_applied() {
        use crate::bus::embedded::{EmbeddedBus, EmbeddedConfig};
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(
            EmbeddedBus::open(
                dir.path(),
                &EmbeddedConfig {
                    retention_max_age: Duration::ZERO,
                    ..EmbeddedConfig::default()
                },
            )
            .unwrap(),
        );
        bus.ensure_topics(&[TopicSpec {
            name: topics::LINEAGE.to_owned(),
            partitions: 2,
        }])
        .await
        .unwrap();
        // Written by another process (a node, `ketenbus dlq`) before this index started.
        let rec = |id: &str| {
            let r = LineageRecord {
                message_id: id.to_owned(),
                step_id: String::new(),
                received: Some(ketenbus_schemas::lineage::LineageReceived {
                    received_at_ms: 1,
                    connector: "http".into(),
                    format: "edifact".into(),
                    content_type: "application/EDIFACT".into(),
                    size: 1,
                    sender: None,
                    receiver: None,
                    raw_partition: 0,
                    raw_offset: 0,
                    file: None,
                    source_id: None,
                }),
                step: None,
            };
            OutRecord {
                topic: topics::LINEAGE.to_owned(),
                key: r.key(),
                value: r.to_avro().unwrap(),
            }
        };
        bus.publish(vec![rec("m3"), rec("m4")]).await.unwrap();
        let index = tempfile::tempdir().unwrap();
        let conn = super::open_in(index.path()).unwrap().0;
        let group = topics::lineage_group(&super::node_of(&conn).unwrap());
        drop(conn);
        let readers = crate::bus::Readers::from([(topics::LINEAGE.to_owned(), vec![group])]);
        tokio::time::sleep(Duration::from_millis(5)).await;
        bus.enforce_retention(&readers).await.unwrap();
        assert_eq!(
            bus.read_all(topics::LINEAGE).await.unwrap().len(),
            2,
            "nothing applied, nothing removed"
        );

        let l = Lineage::start(index.path(), Arc::clone(&bus))
            .await
            .unwrap();
        assert!(
            l.find("m4", Duration::from_secs(10))
                .await
                .unwrap()
                .is_some()
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            bus.enforce_retention(&readers).await.unwrap();
            if bus.read_all(topics::LINEAGE).await.unwrap().is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "applied records are removed once committed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(l.get("m3").await.unwrap().is_some(), "the index keeps them");
    }

    /// Two nodes on one log: each index applies the other's writes, so either answers for a
    /// message the other took in, with the steps both made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_node_answers_for_what_another_took_in() {
        let shared = tempfile::tempdir().unwrap();
        let bus = log(shared.path()).await;
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Lineage::start(da.path(), Arc::clone(&bus)).await.unwrap();
        let b = Lineage::start(db.path(), Arc::clone(&bus)).await.unwrap();
        assert_ne!(a.group(), b.group(), "each node reads under its own group");
        a.received(received("m2")).await;
        a.flush().await;
        let on_b = b
            .find("m2", Duration::from_secs(10))
            .await
            .unwrap()
            .expect("node B knows what node A took in");
        assert_eq!(on_b.received.raw.map(|p| p.offset), Some(4));
        // B delivers it; A sees the delivery.
        b.step("m2", delivery(1, StepOutcome::Delivered)).await;
        b.flush().await;
        assert_eq!(
            steps(&b, "m2").await,
            vec![StepOutcome::Accepted, StepOutcome::Delivered]
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let on_a = steps(&a, "m2").await;
            if on_a.len() == 2 {
                assert_eq!(on_a, vec![StepOutcome::Accepted, StepOutcome::Delivered]);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "A saw {on_a:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A record of a later release's stage is skipped, not a failure of the index.
        let mut odd = LineageRecord {
            message_id: "m2".into(),
            step_id: "later.1".into(),
            received: None,
            step: None,
        };
        odd.step = Some(ketenbus_schemas::lineage::LineageStep {
            at_ms: 1,
            stage: "teleported".into(),
            subscription: None,
            record_id: None,
            kind: None,
            attempt: None,
            outcome: "delivered".into(),
            reason: None,
            detail: None,
            patient: None,
        });
        bus.publish(vec![OutRecord {
            topic: topics::LINEAGE.to_owned(),
            key: odd.key(),
            value: odd.to_avro().unwrap(),
        }])
        .await
        .unwrap();
        a.step("m2", delivery(2, StepOutcome::Delivered)).await;
        a.flush().await;
        assert_eq!(steps(&a, "m2").await.len(), 3);
    }
}
