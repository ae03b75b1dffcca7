//! The embedded engine: topics in one SQLite database (WAL) in the data directory.
//!
//! One writer thread owns the write connection and commits whatever requests are waiting
//! in one transaction (group commit), so many concurrent publishers share one fsync.
//! Consumers read through their own connections and wake on a notification from the
//! writer (or after a short poll, which also sees writes from other processes such as
//! `ketenbus dlq replay`); at the head of a partition they take what the writer just
//! committed from memory (module `fresh`) rather than reading it back. Retention deletes by age and size, but never a record that a
//! consumer group reading its topic (the [`Readers`] from the configuration) has not
//! committed, nor a dead letter, and gives the pages back to the file system
//! (`auto_vacuum = INCREMENTAL`, WAL truncated). A topic that stays past its size limit by
//! more than a margin because of unfinished records makes the log refuse new messages from
//! senders ([`Bus::refuses_ingest`]) rather than lose one.
//!
//! The writer does not checkpoint the whole WAL: copying it into the database and fsyncing it
//! would hold every waiting publisher behind it. A checkpointer thread with its own
//! connection does that every 100 ms while appends come in; the writer then copies only
//! the frames committed since, so that its next transaction writes the WAL from the start
//! again and the WAL stays the size of about 100 ms of commits. A commit is durable once
//! its WAL frames are fsynced, so this changes when the database file catches up, not what
//! is acknowledged.

mod config;
mod consumer;
mod fresh;
mod packing;
mod retention;
mod writer;

pub use config::{EmbeddedConfig, Synchronous};
pub use consumer::EmbeddedConsumer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Bus, BusError, OutRecord, Position, Readers, Record, RetentionReport, TopicSpec};
use writer::{PARTITION_END, checkpointer, open_checkpointer, writer_loop};

/// A request to the writer thread, with where its answer goes.
enum WriteOp {
    /// Records, each one's value as stored when packed ([`packing::pack`]), the answer.
    Append(
        Vec<OutRecord>,
        Vec<Option<Vec<u8>>>,
        oneshot::Sender<Result<Vec<Position>, BusError>>,
    ),
    Commit(
        String,
        Vec<(String, u32, i64)>,
        oneshot::Sender<Result<(), BusError>>,
    ),
    CreateTopics(Vec<TopicSpec>, oneshot::Sender<Result<(), BusError>>),
    Retention(
        Duration,
        u64,
        Readers,
        oneshot::Sender<Result<RetentionReport, BusError>>,
    ),
    Remove(
        String,
        Vec<(u32, i64)>,
        oneshot::Sender<Result<u64, BusError>>,
    ),
}

/// The embedded engine. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus").finish_non_exhaustive()
    }
}

struct Inner {
    path: PathBuf,
    writer: mpsc::Sender<WriteOp>,
    appended: watch::Receiver<u64>,
    partitions: Mutex<HashMap<String, u32>>,
    /// Retention limits: age, bytes per topic, margin past the bytes before refusing.
    limits: (Duration, u64, u64),
    /// Why new messages are refused, set by each retention pass.
    refusing: Mutex<Option<String>>,
    /// Records just committed, for consumers at the head of their partitions.
    fresh: Arc<fresh::Fresh>,
    /// Large bodies of raw envelopes, beside the log (`data_dir/bodies`).
    bodies: crate::bus::bodies::BodyStore,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn sql_err(e: &rusqlite::Error) -> BusError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
            ) =>
        {
            BusError::Unavailable(e.to_string())
        }
        _ => BusError::Fatal(e.to_string()),
    }
}

fn open(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // auto_vacuum must be set before the first table exists.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    tune(&conn, WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "synchronous", sync.pragma())?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS records (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
             key BLOB NOT NULL, value BLOB NOT NULL, ts INTEGER NOT NULL,
             codec INTEGER NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX IF NOT EXISTS records_pos ON records (topic, partition, offset);
         CREATE INDEX IF NOT EXISTS records_ts ON records (topic, ts);
         CREATE TABLE IF NOT EXISTS partition_ends (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
             PRIMARY KEY (topic, partition)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS group_offsets (
             grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
             PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID;",
    )?;
    // A log made before values were packed gets the codec column (every row plain).
    let has_codec = conn
        .prepare("SELECT 1 FROM pragma_table_info('records') WHERE name = 'codec'")?
        .exists([])?;
    if !has_codec {
        conn.execute_batch("ALTER TABLE records ADD COLUMN codec INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(conn)
}

/// Page cache of the writer's connection (KiB): the pages appends touch (the ends of the
/// tables and of each topic's and partition's run in the indexes: a few hundred pages of
/// 4 KiB) stay hot; SQLite's caches are heap memory that is never given back.
const WRITER_CACHE_KIB: i64 = 2 * 1024;
/// Page cache of each reader (a consumer each, KiB): consumers at the head take records from
/// memory, and one catching up reads each page once.
const READER_CACHE_KIB: i64 = 1024;
/// Page cache of the checkpointer (KiB): a checkpoint copies pages from the WAL to the
/// database without keeping them.
pub(super) const CHECKPOINTER_CACHE_KIB: i64 = 256;

/// Page cache, and no memory-mapped reads: every page read through a mapping stays in the
/// process's resident memory (file-backed, but counted in its RSS) for as long as the
/// mapping lives, so one retention pass summing a topic's bytes, or a consumer catching up
/// from the start, took up to the whole mapping (256 MiB: a 30,000-message run peaked at
/// 433 MB RSS, 288 MB of it `log.db` pages). Without it a read costs a copy into this
/// bounded cache; consumers at the head take fresh records from memory anyway.
fn tune(conn: &Connection, cache_kib: i64) -> rusqlite::Result<()> {
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "cache_size", -cache_kib)
}

pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    tune(&conn, READER_CACHE_KIB)?;
    Ok(conn)
}

impl EmbeddedBus {
    /// Open (or create) the log in `data_dir`.
    ///
    /// # Errors
    /// When the directory or database cannot be opened.
    pub fn open(data_dir: &Path, config: &EmbeddedConfig) -> Result<EmbeddedBus, BusError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| BusError::Fatal(format!("data directory {}: {e}", data_dir.display())))?;
        let path = data_dir.join(&config.file);
        let conn = open(&path, config.synchronous).map_err(|e| sql_err(&e))?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| sql_err(&e))?;
        let partitions = load_partitions(&conn).map_err(|e| sql_err(&e))?;
        let bodies = crate::bus::bodies::BodyStore::open(
            &data_dir.join("bodies"),
            usize::try_from(config.large_body.as_u64()).unwrap_or(usize::MAX),
        )
        .map_err(|e| BusError::Fatal(format!("body directory: {e}")))?;
        let ckpt = open_checkpointer(&path, config.synchronous).map_err(|e| sql_err(&e))?;
        let (tx, rx) = mpsc::channel(4096);
        let (appended_tx, appended) = watch::channel(0u64);
        let (bell, rings) = std::sync::mpsc::sync_channel(1);
        let caught_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let told = Arc::clone(&caught_up);
        let max_batch = config.max_batch.max(1);
        let fresh = Arc::new(fresh::Fresh::new(fresh::BUDGET));
        let kept = Arc::clone(&fresh);
        std::thread::Builder::new()
            .name("ketenbus-log-ckpt".into())
            .spawn(move || checkpointer(&ckpt, &rings, &told))
            .map_err(|e| BusError::Fatal(format!("spawn checkpointer: {e}")))?;
        std::thread::Builder::new()
            .name("ketenbus-log-writer".into())
            .spawn(move || {
                writer_loop(
                    conn,
                    rx,
                    (&appended_tx, &kept),
                    (&bell, &caught_up),
                    max_batch,
                );
            })
            .map_err(|e| BusError::Fatal(format!("spawn writer: {e}")))?;
        Ok(EmbeddedBus {
            inner: Arc::new(Inner {
                path,
                writer: tx,
                appended,
                partitions: Mutex::new(partitions),
                limits: (
                    config.retention_max_age,
                    config.retention_max_bytes.as_u64(),
                    config.retention_refuse_margin.as_u64(),
                ),
                refusing: Mutex::new(None),
                fresh,
                bodies,
            }),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn send(&self, op: WriteOp) -> Result<(), BusError> {
        self.inner
            .writer
            .send(op)
            .await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))
    }

    fn partitions_of(&self, topic: &str) -> Option<u32> {
        self.inner
            .partitions
            .lock()
            .expect("partitions lock")
            .get(topic)
            .copied()
    }

    async fn refresh_partitions(&self) -> Result<(), BusError> {
        let path = self.inner.path.clone();
        let map = tokio::task::spawn_blocking(move || {
            let conn = open_reader(&path)?;
            load_partitions(&conn)
        })
        .await
        .map_err(|e| BusError::Fatal(e.to_string()))?
        .map_err(|e| sql_err(&e))?;
        *self.inner.partitions.lock().expect("partitions lock") = map;
        Ok(())
    }
}

fn load_partitions(conn: &Connection) -> rusqlite::Result<HashMap<String, u32>> {
    let mut stmt = conn.prepare("SELECT name, partitions FROM topics")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
    rows.collect()
}

impl Bus for EmbeddedBus {
    type Consumer = EmbeddedConsumer;

    fn disk_bytes(&self) -> Option<u64> {
        Some(self.bytes_on_disk())
    }

    fn bodies(&self) -> Option<&crate::bus::bodies::BodyStore> {
        Some(&self.inner.bodies)
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::CreateTopics(topics.to_vec(), tx))
            .await?;
        rx.await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))??;
        self.refresh_partitions().await
    }

    async fn publish(&self, records: Vec<OutRecord>) -> Result<Vec<Position>, BusError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Packed here, on the publishers' threads, so the one writer thread only writes.
        let pack =
            |records: &[OutRecord]| packing::pack_all(records.iter().map(|r| r.value.as_slice()));
        let (records, packed) =
            if records.iter().map(|r| r.value.len()).sum::<usize>() <= packing::PACK_INLINE {
                let packed = pack(&records);
                (records, packed)
            } else {
                tokio::task::spawn_blocking(move || {
                    let packed = pack(&records);
                    (records, packed)
                })
                .await
                .map_err(|e| BusError::Fatal(format!("packing values: {e}")))?
            };
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Append(records, packed, tx)).await?;
        rx.await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))?
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<EmbeddedConsumer, BusError> {
        EmbeddedConsumer::join(self, group, topics, None).await
    }

    async fn read_alone(
        &self,
        group: &str,
        topic: &str,
        from: &[(u32, i64)],
    ) -> Result<EmbeddedConsumer, BusError> {
        // One process reads the embedded log: a group's one member reads every partition.
        EmbeddedConsumer::join(self, group, &[topic.to_owned()], Some(from)).await
    }

    async fn read_all(&self, topic: &str) -> Result<Vec<Record>, BusError> {
        let path = self.inner.path.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<Record>> {
            let conn = open_reader(&path)?;
            let mut stmt = conn.prepare(
                "SELECT partition, offset, key, value, ts, codec FROM records WHERE topic = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![topic], |r| {
                Ok(Record {
                    topic: topic.clone(),
                    partition: r.get(0)?,
                    offset: r.get(1)?,
                    key: r.get(2)?,
                    value: packing::read(r, 3, 5)?,
                    timestamp_ms: r.get(4)?,
                })
            })?;
            rows.collect()
        })
        .await
        .map_err(|e| BusError::Fatal(e.to_string()))?
        .map_err(|e| sql_err(&e))
    }

    async fn read_at(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Option<Record>, BusError> {
        let path = self.inner.path.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Option<Record>> {
            let conn = open_reader(&path)?;
            conn.query_row(
                "SELECT key, value, ts, codec FROM records WHERE topic = ?1 AND partition = ?2 AND offset = ?3",
                params![topic, partition, offset],
                |r| {
                    Ok(Record {
                        topic: topic.clone(),
                        partition,
                        offset,
                        key: r.get(0)?,
                        value: packing::read(r, 1, 3)?,
                        timestamp_ms: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
        .map_err(|e| BusError::Fatal(e.to_string()))?
        .map_err(|e| sql_err(&e))
    }

    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<(u32, i64, i64)>, BusError> {
        self.refresh_partitions().await?;
        let n = self
            .partitions_of(topic)
            .ok_or_else(|| BusError::UnknownTopic(topic.to_owned()))?;
        let path = self.inner.path.clone();
        let (group, topic) = (group.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<(u32, i64, i64)>> {
            let conn = open_reader(&path)?;
            let mut out = Vec::new();
            for p in 0..n {
                let end: i64 = conn.query_row(PARTITION_END, params![topic, p], |r| r.get(0))?;
                let committed: i64 = conn
                    .query_row(
                        "SELECT next_offset FROM group_offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3",
                        params![group, topic, p],
                        |r| r.get(0),
                    )
                    .optional()?
                    .unwrap_or(0);
                out.push((p, committed, end));
            }
            Ok(out)
        })
        .await
        .map_err(|e| BusError::Fatal(e.to_string()))?
        .map_err(|e| sql_err(&e))
    }

    async fn remove(&self, topic: &str, positions: &[(u32, i64)]) -> Result<u64, BusError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Remove(topic.to_owned(), positions.to_vec(), tx))
            .await?;
        rx.await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))?
    }

    async fn enforce_retention(&self, readers: &Readers) -> Result<RetentionReport, BusError> {
        self.enforce(readers).await
    }

    fn refuses_ingest(&self) -> Option<String> {
        self.inner.refusing.lock().expect("refusing lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bus in `dir` with one topic.
    pub(super) async fn open_with(dir: &Path, topic: &str, partitions: u32) -> EmbeddedBus {
        let bus = EmbeddedBus::open(dir, &EmbeddedConfig::default()).unwrap();
        bus.ensure_topics(&[TopicSpec {
            name: topic.into(),
            partitions,
        }])
        .await
        .unwrap();
        bus
    }

    #[tokio::test]
    async fn keeps_the_bus_contract() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        super::super::contract::run_contract(&bus, "t").await;
    }

    pub(super) fn rec(topic: &str, key: u8, value: u8) -> OutRecord {
        OutRecord {
            topic: topic.into(),
            key: vec![key],
            value: vec![value],
        }
    }

    #[tokio::test]
    async fn values_are_stored_packed_and_every_read_of_the_log_gives_them_back_as_published() {
        use crate::bus::Consumer;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        // A log written before values were packed: no codec column, a plain row in it.
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
                 CREATE TABLE records (topic TEXT NOT NULL, partition INTEGER NOT NULL,
                     offset INTEGER NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
                     ts INTEGER NOT NULL);
                 INSERT INTO topics VALUES ('t', 1);
                 INSERT INTO records VALUES ('t', 0, 0, x'01', CAST('written before' AS BLOB), 1);",
            )
            .unwrap();
        }
        let bus = open_with(dir.path(), "t", 1).await;
        // An event-like value (names and codes repeated per result) and a short one.
        let event: Vec<u8> = b"result-1 Kreatinine umol/l specimen-1 CHEMIE 88 60-110 "
            .iter()
            .copied()
            .cycle()
            .take(8448)
            .collect();
        let out = |value: &[u8]| OutRecord {
            topic: "t".into(),
            key: vec![1],
            value: value.to_vec(),
        };
        bus.publish(vec![out(&event), out(b"short")]).await.unwrap();
        let stored: Vec<(i64, i64, i64)> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT offset, codec, length(value) FROM records ORDER BY offset")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(stored[0], (0, packing::PLAIN, 14));
        assert_eq!((stored[1].0, stored[1].1), (1, packing::LZ4));
        assert!(stored[1].2 < 8448 / 4, "stored {} bytes", stored[1].2);
        assert_eq!(stored[2], (2, packing::PLAIN, 5));
        let expected = vec![b"written before".to_vec(), event.clone(), b"short".to_vec()];
        // Every way a record is read from the log, not from the writer's memory: by
        // position, the whole topic, a consumer joining now, and all of them after a restart.
        for round in ["open", "reopened"] {
            let bus = if round == "open" {
                bus.clone()
            } else {
                EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap()
            };
            bus.inner.fresh.clear();
            let at = bus.read_at("t", 0, 1).await.unwrap().unwrap();
            assert_eq!(at.value, event, "{round}: read_at");
            let all: Vec<_> = bus
                .read_all("t")
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.value)
                .collect();
            assert_eq!(all, expected, "{round}: read_all");
            let mut c = bus.subscribe(round, &["t".into()]).await.unwrap();
            let mut polled = Vec::new();
            while let Some(r) = c.poll(Duration::from_millis(200)).await.unwrap() {
                polled.push(r.value);
            }
            assert_eq!(polled, expected, "{round}: a consumer");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_a_steady_stream_of_commits() {
        use crate::bus::Consumer;
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "t", 4).await;
        // A consumer reading beside the writer, as delivery does.
        let mut c = bus.subscribe("g", &["t".into()]).await.unwrap();
        let reading = tokio::spawn(async move {
            loop {
                if let Ok(Some(r)) = c.poll(Duration::from_millis(100)).await {
                    c.ack(r.ack_token()).await.unwrap();
                }
            }
        });
        let wal = dir.path().join("log.db-wal");
        // The WAL header's checkpoint sequence number (bytes 12..16, big-endian) goes up
        // each time the WAL starts over (SQLite file format, "WAL File Format").
        let starts = || -> Option<u32> {
            let head = std::fs::read(&wal).ok()?;
            Some(u32::from_be_bytes(head.get(12..16)?.try_into().ok()?))
        };
        // Publishers one after the other leave the writer idle between commits, when the
        // WAL starts over without help; many at once keep a commit always waiting.
        let publishers: Vec<_> = (0..16u8)
            .map(|k| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    loop {
                        let recs = vec![OutRecord {
                            topic: "t".into(),
                            key: vec![k],
                            value: vec![k; 4096],
                        }];
                        bus.publish(recs).await.unwrap();
                    }
                })
            })
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        let started = std::time::Instant::now();
        // Five checkpoint periods of commits.
        while started.elapsed() < Duration::from_secs(5) {
            seen.extend(starts());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for p in publishers {
            p.abort();
        }
        reading.abort();
        // Never started over, the WAL grows by every page ever written, for good.
        assert!(
            seen.len() >= 3,
            "the WAL started over {} times in 5 s of commits ({seen:?})",
            seen.len().saturating_sub(1)
        );
    }
}
