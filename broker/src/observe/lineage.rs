//! The lineage index: for every message, what happened to it — received, normalised into
//! which events, delivered to which subscriptions with what outcome, dead-lettered and why.
//! A SQLite file next to the log, written in batches by one thread; stages record steps
//! without waiting for the disk. The thread lets steps gather for a few milliseconds
//! before it writes, so a busy broker commits the index tens of times a second rather than
//! once per message; [`Lineage::flush`] cuts the wait short. It is an index of this process's work: the topics
//! (raw, events, delivery outcomes, dead letters) remain the record.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ketenbus_schemas::lineage::{Stage, StepOutcome};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub mod search;
pub use search::{BadParameter, ListQuery, Search, Status};

/// A step in a message's life.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Step {
    /// When, ms since the epoch.
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
    /// When, ms since the epoch.
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
    /// Position on the raw topic.
    pub raw_partition: u32,
    /// Offset on the raw topic.
    pub raw_offset: i64,
    /// The id the message gives itself: the UNB interchange control reference, the FHIR
    /// MessageHeader id (else the Bundle id), the mail's Message-ID.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_id: Option<String>,
}

impl Received {
    /// What the lineage records of `envelope`, stored at `position` on the raw topic.
    #[must_use]
    pub fn of(
        envelope: &ketenbus_schemas::RawEnvelope,
        position: crate::bus::Position,
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
            raw_partition: position.partition,
            raw_offset: position.offset,
            source_id: ketenbus_connectors::party::source_id(envelope.format, &envelope.body),
        }
    }
}

enum Op {
    Received(Received),
    Step(String, Step),
    Flush(oneshot::Sender<()>),
}

/// Handle to the lineage index. Cheap to clone.
#[derive(Clone)]
pub struct Lineage {
    tx: mpsc::Sender<Op>,
    path: std::path::PathBuf,
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
         CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at, id);",
    )?;
    search::migrate(&mut conn)?;
    Ok(conn)
}

impl Lineage {
    /// Open (or create) `lineage.db` in `data_dir` and start its writer.
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub fn open(data_dir: &Path) -> rusqlite::Result<Lineage> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let path = data_dir.join("lineage.db");
        let conn = open(&path)?;
        let (tx, rx) = mpsc::channel(16_384);
        std::thread::Builder::new()
            .name("ketenbus-lineage".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Lineage { tx, path })
    }

    /// Record a received message.
    pub async fn received(&self, r: Received) {
        let _ = self.tx.send(Op::Received(r)).await;
    }

    /// Record a step of message `message_id`.
    pub async fn step(&self, message_id: &str, step: Step) {
        let _ = self.tx.send(Op::Step(message_id.to_owned(), step)).await;
    }

    /// Wait until everything recorded so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The lineage of one message, if it is known.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn get(&self, id: &str) -> rusqlite::Result<Option<MessageLineage>> {
        // A client may ask right after its 202, before the batch holding the message is
        // written: flush, so what was acknowledged is always found.
        self.flush().await;
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
        self.flush().await;
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

/// Most operations written in one transaction.
const MAX_BATCH: usize = 8192;
/// How long steps may gather before they are written.
const GATHER: Duration = Duration::from_millis(20);
/// How often a gathering writer looks for a flush request.
const GATHER_STEP: Duration = Duration::from_millis(2);

/// Take what is waiting, then keep taking for up to [`GATHER`] unless the batch is full or
/// someone waits for a flush.
fn gather(rx: &mut mpsc::Receiver<Op>, first: Op) -> Vec<Op> {
    let until = std::time::Instant::now() + GATHER;
    let mut flush = matches!(first, Op::Flush(_));
    let mut ops = vec![first];
    loop {
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => {
                    flush |= matches!(op, Op::Flush(_));
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
        if flush || ops.len() >= MAX_BATCH || std::time::Instant::now() >= until {
            return ops;
        }
        std::thread::sleep(GATHER_STEP);
    }
}

fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Op>) {
    while let Some(first) = rx.blocking_recv() {
        let ops = gather(&mut rx, first);
        let mut flushes = Vec::new();
        let mut touched = std::collections::BTreeSet::new();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut msg = tx.prepare_cached(
                    "INSERT OR IGNORE INTO messages (id, received_at, connector, format, content_type,
                         size, sender, receiver, raw_partition, raw_offset, source_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
                let mut step = tx.prepare_cached(
                    "INSERT INTO steps (message_id, at, stage, subscription, record_id, kind,
                         attempt, outcome, reason, detail, patient)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
                for op in ops {
                    match op {
                        Op::Received(r) => {
                            msg.execute(params![
                                r.id,
                                r.received_at_ms,
                                r.connector,
                                r.format,
                                r.content_type,
                                r.size,
                                r.sender,
                                r.receiver,
                                r.raw_partition,
                                r.raw_offset,
                                r.source_id
                            ])?;
                            step.execute(params![
                                r.id,
                                r.received_at_ms,
                                Stage::Received.as_str(),
                                None::<String>,
                                None::<String>,
                                None::<String>,
                                None::<u32>,
                                StepOutcome::Accepted.as_str(),
                                None::<String>,
                                None::<String>,
                                None::<String>
                            ])?;
                            touched.insert(r.id);
                        }
                        Op::Step(id, s) => {
                            step.execute(params![
                                id,
                                s.at_ms,
                                s.stage.as_str(),
                                s.subscription,
                                s.record_id,
                                s.kind,
                                s.attempt,
                                s.outcome.as_str(),
                                s.reason,
                                s.detail,
                                s.patient
                            ])?;
                            touched.insert(id);
                        }
                        Op::Flush(done) => flushes.push(done),
                    }
                }
            }
            for id in &touched {
                search::refresh(&tx, id)?;
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "lineage index write failed; lineage of these messages is incomplete");
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
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
        raw_partition: r.get(8)?,
        raw_offset: r.get(9)?,
        source_id: r.get(10)?,
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
         FROM steps WHERE message_id = ?1 ORDER BY at, rowid",
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
            d.outcome = s.outcome;
            d.reason.clone_from(&s.reason);
            if s.stage == Stage::Delivery {
                d.attempts = d.attempts.max(s.attempt.unwrap_or(0));
            }
        }
    }
    Ok(Some(MessageLineage {
        received,
        events,
        deliveries: deliveries.into_values().collect(),
        steps,
    }))
}
