//! The embedded engine: topics in one SQLite database (WAL) in the data directory.
//!
//! One writer thread owns the write connection and commits whatever requests are waiting
//! in one transaction (group commit), so many concurrent publishers share one fsync.
//! Consumers read through their own connections and wake on a notification from the
//! writer (or after a short poll, which also sees writes from other processes such as
//! `ketenbus dlq replay`). Retention deletes by age and size, but never a record that a
//! consumer group reading its topic (the [`Readers`] from the configuration) has not
//! committed, nor a dead letter, and gives the pages back to the file system
//! (`auto_vacuum = INCREMENTAL`, WAL truncated). A topic that stays past its size limit by
//! more than a margin because of unfinished records makes the log refuse new messages from
//! senders ([`Bus::refuses_ingest`]) rather than lose one.
//!
//! The writer never checkpoints: copying the WAL into the database and fsyncing it would hold
//! every waiting publisher behind it. A checkpointer thread with its own connection does
//! that a few times a second while appends come in. A commit is durable once its WAL frames
//! are fsynced, so this changes when the database file catches up, not what is acknowledged.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ketenbus_schemas::now_ms;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    AckToken, Bus, BusError, Consumer, OffsetTracker, OutRecord, Position, Readers, Record,
    RetentionReport, TopicSpec, is_dead_letter_topic,
};

/// Settings of the embedded engine (`[bus.embedded]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Database file, relative to the data directory.
    pub file: PathBuf,
    /// `full` fsyncs every commit (durable against power loss); `normal` only against a process crash.
    pub synchronous: Synchronous,
    /// Most write requests committed together in one transaction.
    pub max_batch: usize,
    /// Records older than this are deleted once every consumer group that reads their topic
    /// (router, subscriptions) has finished them; dead letters are never deleted by age.
    #[serde(with = "humantime_serde")]
    pub retention_max_age: Duration,
    /// Most bytes (keys plus values) kept per topic; the oldest finished records go first.
    /// Unfinished records and dead letters are kept past it.
    pub retention_max_bytes: bytesize::ByteSize,
    /// How far past `retention_max_bytes` a topic may grow with records not every reader has
    /// finished (a subscriber down) before new messages are refused (HTTP 503, SMTP 451)
    /// until the readers catch up. Checked on every retention pass.
    pub retention_refuse_margin: bytesize::ByteSize,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            file: PathBuf::from("log.db"),
            synchronous: Synchronous::Full,
            max_batch: 512,
            retention_max_age: Duration::from_secs(7 * 24 * 3600),
            retention_max_bytes: bytesize::ByteSize::gib(10),
            retention_refuse_margin: bytesize::ByteSize::gib(1),
            retention_interval: Duration::from_secs(60),
        }
    }
}

/// SQLite `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit.
    Full,
    /// fsync at checkpoints only.
    Normal,
}

enum WriteOp {
    Append(
        Vec<OutRecord>,
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

struct Inner {
    path: PathBuf,
    writer: mpsc::Sender<WriteOp>,
    appended: watch::Receiver<u64>,
    partitions: Mutex<HashMap<String, u32>>,
    /// Retention limits: age, bytes per topic, margin past the bytes before refusing.
    limits: (Duration, u64, u64),
    /// Why new messages are refused, set by each retention pass.
    refusing: Mutex<Option<String>>,
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

/// Stable partitioner: FNV-1a of the key, modulo the partition count.
#[must_use]
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(h % u64::from(partitions.max(1))).unwrap_or(0)
}

fn open(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // auto_vacuum must be set before the first table exists.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    tune(&conn)?;
    conn.pragma_update(
        None,
        "synchronous",
        if sync == Synchronous::Full {
            "FULL"
        } else {
            "NORMAL"
        },
    )?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS records (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
             key BLOB NOT NULL, value BLOB NOT NULL, ts INTEGER NOT NULL);
         CREATE UNIQUE INDEX IF NOT EXISTS records_pos ON records (topic, partition, offset);
         CREATE INDEX IF NOT EXISTS records_ts ON records (topic, ts);
         CREATE TABLE IF NOT EXISTS partition_ends (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
             PRIMARY KEY (topic, partition)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS group_offsets (
             grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
             PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID;",
    )?;
    Ok(conn)
}

/// Page cache and memory-mapped reads: consumers read what was just written, so serving
/// pages from the mapping instead of copying them through `pread` saves a copy per record.
fn tune(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "mmap_size", 256 * 1024 * 1024)?;
    conn.pragma_update(None, "cache_size", -32 * 1024)
}

/// How often the checkpointer copies the WAL into the database while appends come in.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The checkpointer's connection: it writes the database file, fsyncing as `sync` says.
fn open_checkpointer(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(
        None,
        "synchronous",
        if sync == Synchronous::Full {
            "FULL"
        } else {
            "NORMAL"
        },
    )?;
    Ok(conn)
}

/// Checkpoint (PASSIVE: never waits for the writer or readers) at most every
/// [`CHECKPOINT_EVERY`] while the writer rings `bell`; stops when the writer stops.
fn checkpointer(conn: &Connection, bell: &std::sync::mpsc::Receiver<()>) {
    let mut last = Instant::now();
    while bell.recv().is_ok() {
        if let Some(rest) = CHECKPOINT_EVERY.checked_sub(last.elapsed()) {
            std::thread::sleep(rest);
        }
        // Rings during the sleep are covered by the checkpoint that follows.
        let _ = bell.try_recv();
        last = Instant::now();
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "log checkpoint failed, retrying with the next append");
        }
    }
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    tune(&conn)?;
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
        let ckpt = open_checkpointer(&path, config.synchronous).map_err(|e| sql_err(&e))?;
        let (tx, rx) = mpsc::channel(4096);
        let (appended_tx, appended) = watch::channel(0u64);
        let (bell, rings) = std::sync::mpsc::sync_channel(1);
        let max_batch = config.max_batch.max(1);
        std::thread::Builder::new()
            .name("ketenbus-log-ckpt".into())
            .spawn(move || checkpointer(&ckpt, &rings))
            .map_err(|e| BusError::Fatal(format!("spawn checkpointer: {e}")))?;
        std::thread::Builder::new()
            .name("ketenbus-log-writer".into())
            .spawn(move || writer_loop(conn, rx, &appended_tx, &bell, max_batch))
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
            }),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Bytes the log takes on disk (database plus WAL).
    #[must_use]
    pub fn disk_bytes(&self) -> u64 {
        let wal = self.inner.path.with_extension("db-wal");
        [self.inner.path.as_path(), wal.as_path()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Delete records older than `max_age` and the oldest past `max_bytes` per topic, then
    /// give the space back to the file system. Only records below every reader's committed
    /// offset (per partition, see [`Readers`]) go; dead-letter topics are left alone.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn retention_pass(
        &self,
        max_age: Duration,
        max_bytes: u64,
        readers: &Readers,
    ) -> Result<RetentionReport, BusError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Retention(max_age, max_bytes, readers.clone(), tx))
            .await?;
        rx.await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))?
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

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<WriteOp>,
    appended: &watch::Sender<u64>,
    bell: &std::sync::mpsc::SyncSender<()>,
    max_batch: usize,
) {
    let mut seq = 0u64;
    let mut ends = Ends::default();
    while let Some(first) = rx.blocking_recv() {
        let mut appends = Vec::new();
        let mut others = Vec::new();
        let mut op = Some(first);
        while let Some(next) = op.take() {
            match next {
                WriteOp::Append(records, reply) => appends.push((records, reply)),
                other => others.push(other),
            }
            if appends.len() + others.len() < max_batch {
                op = rx.try_recv().ok();
            }
        }
        if !appends.is_empty() {
            let result = append_batch(&mut conn, &mut ends, &appends);
            match result {
                Ok(positions) => {
                    // Consumers first: a publisher that polls right after its publish
                    // returned must not find its consumer still unaware of the commit.
                    seq += 1;
                    appended.send_replace(seq);
                    for ((_, reply), pos) in appends.into_iter().zip(positions) {
                        let _ = reply.send(pos);
                    }
                    // Full means a ring is already waiting.
                    let _ = bell.try_send(());
                }
                Err(e) => {
                    ends.forget();
                    let err = sql_err(&e);
                    for (_, reply) in appends {
                        let _ = reply.send(Err(match &err {
                            BusError::Unavailable(s) => BusError::Unavailable(s.clone()),
                            other => BusError::Fatal(other.to_string()),
                        }));
                    }
                }
            }
        }
        for op in others {
            match op {
                WriteOp::Append(..) => unreachable!("appends were taken above"),
                WriteOp::Commit(group, points, reply) => {
                    let _ = reply
                        .send(commit_offsets(&mut conn, &group, &points).map_err(|e| sql_err(&e)));
                }
                WriteOp::CreateTopics(specs, reply) => {
                    ends.forget();
                    let _ = reply.send(create_topics(&mut conn, &specs).map_err(|e| sql_err(&e)));
                }
                WriteOp::Retention(age, bytes, readers, reply) => {
                    ends.forget();
                    let _ = reply
                        .send(retention(&mut conn, age, bytes, &readers).map_err(|e| sql_err(&e)));
                }
                WriteOp::Remove(topic, positions, reply) => {
                    ends.forget();
                    let _ =
                        reply.send(remove(&mut conn, &topic, &positions).map_err(|e| sql_err(&e)));
                }
            }
        }
    }
}

type AppendReply = oneshot::Sender<Result<Vec<Position>, BusError>>;

/// The next offset of partition (?1, ?2): after its newest record, or after the newest one
/// retention removed (`partition_ends`), so offsets never restart under consumer groups.
const PARTITION_END: &str = "SELECT MAX(
     COALESCE((SELECT MAX(offset) + 1 FROM records WHERE topic = ?1 AND partition = ?2), 0),
     COALESCE((SELECT next_offset FROM partition_ends WHERE topic = ?1 AND partition = ?2), 0))";

/// What the writer remembers between batches: partition counts and the next offset of each
/// partition it wrote. Valid while no other connection committed (`PRAGMA data_version`
/// tells), so a batch costs no `MAX(offset)` lookups once the partitions are warm.
#[derive(Default)]
struct Ends {
    data_version: Option<i64>,
    partitions: HashMap<String, u32>,
    next: HashMap<(String, u32), i64>,
}

impl Ends {
    fn forget(&mut self) {
        self.data_version = None;
        self.partitions.clear();
        self.next.clear();
    }

    /// Drop what another connection may have changed; load the partition counts if needed.
    fn refresh(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let version: i64 = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if self.data_version != Some(version) {
            self.forget();
            self.data_version = Some(version);
        }
        if self.partitions.is_empty() {
            self.partitions = load_partitions(conn)?;
        }
        Ok(())
    }
}

/// One transaction for every waiting append. A request naming an unknown topic fails alone.
/// On error the caller forgets `ends`: the offsets handed out were rolled back.
fn append_batch(
    conn: &mut Connection,
    ends: &mut Ends,
    appends: &[(Vec<OutRecord>, AppendReply)],
) -> rusqlite::Result<Vec<Result<Vec<Position>, BusError>>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(appends.len());
    {
        // Inside the write lock: nobody else can commit until this transaction ends.
        ends.refresh(&tx)?;
        let mut end_stmt = tx.prepare_cached(PARTITION_END)?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO records (topic, partition, offset, key, value, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let ts = now_ms();
        for (records, reply) in appends {
            // A publisher that gave up (its sender heard 503) must not find its record stored
            // after all: skip it now that the write lock is ours.
            if reply.is_closed() {
                out.push(Err(BusError::Unavailable(
                    "publisher gave up before the write".into(),
                )));
                continue;
            }
            if let Some(missing) = records
                .iter()
                .find(|r| !ends.partitions.contains_key(&r.topic))
            {
                out.push(Err(BusError::UnknownTopic(missing.topic.clone())));
                continue;
            }
            let mut positions = Vec::with_capacity(records.len());
            for r in records {
                let partition = partition_for(&r.key, ends.partitions[&r.topic]);
                let slot = (r.topic.clone(), partition);
                let offset = match ends.next.get(&slot) {
                    Some(o) => *o,
                    None => end_stmt.query_row(params![r.topic, partition], |row| row.get(0))?,
                };
                insert.execute(params![r.topic, partition, offset, r.key, r.value, ts])?;
                ends.next.insert(slot, offset + 1);
                positions.push(Position { partition, offset });
            }
            out.push(Ok(positions));
        }
    }
    tx.commit()?;
    Ok(out)
}

fn commit_offsets(
    conn: &mut Connection,
    group: &str,
    points: &[(String, u32, i64)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO group_offsets (grp, topic, partition, next_offset) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (grp, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        )?;
        for (topic, partition, offset) in points {
            stmt.execute(params![group, topic, partition, offset])?;
        }
    }
    tx.commit()
}

fn create_topics(conn: &mut Connection, specs: &[TopicSpec]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for s in specs {
        tx.execute(
            "INSERT OR IGNORE INTO topics (name, partitions) VALUES (?1, ?2)",
            params![s.name, s.partitions.max(1)],
        )?;
    }
    tx.commit()
}

/// Offsets never go back: remember each partition's end before its records may go.
const KEEP_ENDS: &str = "INSERT INTO partition_ends (topic, partition, next_offset)
     SELECT topic, partition, MAX(offset) + 1 FROM records WHERE topic = ?1 GROUP BY partition
     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)";

/// The next records of topic ?1 in append order after (ts ?2, rowid ?3).
const OLDEST_AFTER: &str = "SELECT ts, rowid, partition, offset, length(key) + length(value)
     FROM records WHERE topic = ?1 AND (ts, rowid) > (?2, ?3) ORDER BY ts, rowid LIMIT 1000";

/// A record as the size walk sees it.
struct Oldest {
    ts: i64,
    rowid: i64,
    partition: u32,
    offset: i64,
    len: i64,
}

/// Per partition of `topic`, the first offset retention must keep: the lowest committed offset
/// of `groups` (0 for a group that has committed nothing there). `i64::MAX` for every
/// partition when no group reads the topic.
fn floors(
    conn: &Connection,
    topic: &str,
    partitions: u32,
    groups: &[String],
) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT next_offset FROM group_offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3",
    )?;
    let mut out = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        let mut floor = i64::MAX;
        for g in groups {
            let committed: i64 = stmt
                .query_row(params![g, topic, p], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            floor = floor.min(committed);
        }
        out.push(floor);
    }
    Ok(out)
}

fn retention(
    conn: &mut Connection,
    max_age: Duration,
    max_bytes: u64,
    readers: &Readers,
) -> rusqlite::Result<RetentionReport> {
    let cutoff = now_ms() - i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
    let limit = i64::try_from(max_bytes).unwrap_or(i64::MAX);
    let mut report = RetentionReport::default();
    let mut topics: Vec<(String, u32)> = load_partitions(conn)?.into_iter().collect();
    topics.sort();
    for (topic, partitions) in topics {
        if is_dead_letter_topic(&topic) {
            continue;
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(KEEP_ENDS, params![topic])?;
        let floors = match readers.get(&topic) {
            Some(groups) => floors(&tx, &topic, partitions, groups)?,
            None => vec![i64::MAX; partitions as usize],
        };
        for (p, floor) in floors.iter().enumerate() {
            report.deleted += tx.execute(
                "DELETE FROM records WHERE topic = ?1 AND partition = ?2 AND offset < ?3 AND ts < ?4",
                params![topic, p, floor, cutoff],
            )? as u64;
        }
        let size: i64 = tx.query_row(
            "SELECT COALESCE(SUM(length(key) + length(value)), 0) FROM records WHERE topic = ?1",
            params![topic],
            |r| r.get(0),
        )?;
        let mut excess = size - limit;
        if excess > 0 {
            // Oldest first, among the records below the floor of their partition: one walk
            // along the (topic, ts) index, whose order (ts, then rowid) is append order.
            let mut walk = tx.prepare_cached(OLDEST_AFTER)?;
            let mut delete = tx.prepare_cached("DELETE FROM records WHERE rowid = ?1")?;
            let mut after = (i64::MIN, i64::MIN);
            'walk: while excess > 0 {
                let rows: Vec<Oldest> = walk
                    .query_map(params![topic, after.0, after.1], |r| {
                        Ok(Oldest {
                            ts: r.get(0)?,
                            rowid: r.get(1)?,
                            partition: r.get(2)?,
                            offset: r.get(3)?,
                            len: r.get(4)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    after = (row.ts, row.rowid);
                    if row.offset >= floors[row.partition as usize] {
                        continue;
                    }
                    report.deleted += delete.execute(params![row.rowid])? as u64;
                    excess -= row.len;
                    if excess <= 0 {
                        break 'walk;
                    }
                }
            }
        }
        tx.commit()?;
        if excess > 0 {
            report
                .held
                .push((topic.clone(), u64::try_from(excess).unwrap_or(0)));
        }
    }
    if report.deleted > 0 {
        give_back(conn)?;
    }
    Ok(report)
}

/// Return freed pages to the file system.
fn give_back(conn: &Connection) -> rusqlite::Result<()> {
    // Each step of this pragma frees pages; run it to the end.
    let mut vacuum = conn.prepare("PRAGMA incremental_vacuum")?;
    let mut rows = vacuum.query([])?;
    while rows.next()?.is_some() {}
    drop(rows);
    drop(vacuum);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

/// Remove single records (`ketenbus dlq purge`); offsets go on where they were.
fn remove(conn: &mut Connection, topic: &str, positions: &[(u32, i64)]) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(KEEP_ENDS, params![topic])?;
    let mut removed = 0u64;
    {
        let mut delete = tx.prepare_cached(
            "DELETE FROM records WHERE topic = ?1 AND partition = ?2 AND offset = ?3",
        )?;
        for (p, o) in positions {
            removed += delete.execute(params![topic, p, o])? as u64;
        }
    }
    tx.commit()?;
    if removed > 0 {
        give_back(conn)?;
    }
    Ok(removed)
}

impl Bus for EmbeddedBus {
    type Consumer = EmbeddedConsumer;

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
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Append(records, tx)).await?;
        rx.await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))?
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<EmbeddedConsumer, BusError> {
        self.refresh_partitions().await?;
        let mut parts = Vec::new();
        for t in topics {
            let n = self
                .partitions_of(t)
                .ok_or_else(|| BusError::UnknownTopic(t.clone()))?;
            parts.extend((0..n).map(|p| (t.clone(), p)));
        }
        let path = self.inner.path.clone();
        let group_owned = group.to_owned();
        let (conn, next) = tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
            let conn = open_reader(&path)?;
            let mut next = HashMap::new();
            for (topic, p) in parts {
                let committed: Option<i64> = conn
                    .query_row(
                        "SELECT next_offset FROM group_offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3",
                        params![group_owned, topic, p],
                        |r| r.get(0),
                    )
                    .optional()?;
                next.insert((topic, p), committed.unwrap_or(0));
            }
            Ok((conn, next))
        })
        .await
        .map_err(|e| BusError::Fatal(e.to_string()))?
        .map_err(|e| sql_err(&e))?;
        Ok(EmbeddedConsumer {
            bus: self.clone(),
            group: group.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
            next,
            buffer: VecDeque::new(),
            tracker: OffsetTracker::default(),
            appended: self.inner.appended.clone(),
            last_commit: tokio::time::Instant::now(),
            more: true,
        })
    }

    async fn read_all(&self, topic: &str) -> Result<Vec<Record>, BusError> {
        let path = self.inner.path.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<Record>> {
            let conn = open_reader(&path)?;
            let mut stmt = conn.prepare(
                "SELECT partition, offset, key, value, ts FROM records WHERE topic = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![topic], |r| {
                Ok(Record {
                    topic: topic.clone(),
                    partition: r.get(0)?,
                    offset: r.get(1)?,
                    key: r.get(2)?,
                    value: r.get(3)?,
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
                "SELECT key, value, ts FROM records WHERE topic = ?1 AND partition = ?2 AND offset = ?3",
                params![topic, partition, offset],
                |r| {
                    Ok(Record {
                        topic: topic.clone(),
                        partition,
                        offset,
                        key: r.get(0)?,
                        value: r.get(1)?,
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
        let (max_age, max_bytes, margin) = self.inner.limits;
        let mut report = self.retention_pass(max_age, max_bytes, readers).await?;
        report.refusing = report
            .held
            .iter()
            .find(|(_, excess)| *excess > margin)
            .map(|(topic, excess)| {
                format!(
                    "topic {topic} holds {excess} bytes of unfinished records past retention_max_bytes ({max_bytes}), more than retention_refuse_margin ({margin})"
                )
            });
        report
            .refusing
            .clone_into(&mut self.inner.refusing.lock().expect("refusing lock"));
        Ok(report)
    }

    fn refuses_ingest(&self) -> Option<String> {
        self.inner.refusing.lock().expect("refusing lock").clone()
    }
}

/// A consumer group member on the embedded log. In one process a group has one member,
/// which reads every partition.
pub struct EmbeddedConsumer {
    bus: EmbeddedBus,
    group: String,
    conn: Arc<Mutex<Connection>>,
    next: HashMap<(String, u32), i64>,
    buffer: VecDeque<Record>,
    tracker: OffsetTracker,
    appended: watch::Receiver<u64>,
    last_commit: tokio::time::Instant,
    /// The last look may have left records behind (a full page, or never looked yet).
    more: bool,
}

/// Records per partition and look. The SQL below spells it as a literal: SQLite plans again
/// on every run for a bound `LIMIT ?`, which cost as much as the read itself.
const FETCH: usize = 256;
const FETCH_SQL: &str = "SELECT offset, key, value, ts FROM records
     WHERE topic = ?1 AND partition = ?2 AND offset >= ?3 ORDER BY offset LIMIT 256";
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// Longest wait before looking again without a notification (sees other processes' writes).
const IDLE_RECHECK: Duration = Duration::from_millis(250);

impl EmbeddedConsumer {
    async fn fetch(&mut self) -> Result<(), BusError> {
        let conn = Arc::clone(&self.conn);
        let wants: Vec<((String, u32), i64)> =
            self.next.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let (rows, more) = tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
            let conn = conn.lock().expect("reader lock");
            let mut stmt = conn.prepare_cached(FETCH_SQL)?;
            let mut out = Vec::new();
            let mut more = false;
            for ((topic, partition), from) in wants {
                let before = out.len();
                let rows = stmt.query_map(params![topic, partition, from], |r| {
                    Ok(Record {
                        topic: topic.clone(),
                        partition,
                        offset: r.get(0)?,
                        key: r.get(1)?,
                        value: r.get(2)?,
                        timestamp_ms: r.get(3)?,
                    })
                })?;
                for row in rows {
                    out.push(row?);
                }
                more |= out.len() - before >= FETCH;
            }
            Ok((out, more))
        })
        .await
        .map_err(|e| BusError::Fatal(e.to_string()))?
        .map_err(|e| sql_err(&e))?;
        self.more = more;
        for r in rows {
            let slot = (r.topic.clone(), r.partition);
            self.next.insert(slot, r.offset + 1);
            self.buffer.push_back(r);
        }
        Ok(())
    }
}

impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut waited = false;
        loop {
            if let Some(r) = self.buffer.pop_front() {
                self.tracker.started(&r.topic, r.partition, r.offset);
                return Ok(Some(r));
            }
            // Look again only when this process appended since the last look, the last look
            // left records behind, or after a wait (which also catches other processes'
            // writes): an immediate poll after an empty look costs no read.
            let appended = self.appended.has_changed().unwrap_or(true);
            if appended || self.more || waited {
                self.appended.borrow_and_update();
                self.fetch().await?;
                if !self.buffer.is_empty() {
                    continue;
                }
            }
            // Nothing to hand out: a good moment to commit what finished, so an idle group
            // shows no lag.
            if self.tracker.has_dirty() {
                self.commit().await?;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(IDLE_RECHECK);
            let _ = tokio::time::timeout(wait, self.appended.changed()).await;
            waited = true;
        }
    }

    async fn ack(&mut self, token: AckToken) -> Result<(), BusError> {
        self.tracker
            .finished(&token.topic, token.partition, token.offset);
        if self.last_commit.elapsed() >= COMMIT_EVERY {
            self.commit().await?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        self.last_commit = tokio::time::Instant::now();
        let points = self.tracker.take_dirty();
        if points.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.bus
            .send(WriteOp::Commit(self.group.clone(), points, tx))
            .await?;
        rx.await
            .map_err(|_| BusError::Fatal("log writer stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bus in `dir` with one topic.
    async fn open_with(dir: &Path, topic: &str, partitions: u32) -> EmbeddedBus {
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

    #[tokio::test]
    async fn committed_offsets_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let bus = open_with(dir.path(), "a", 1).await;
            let recs = (0..3)
                .map(|i| OutRecord {
                    topic: "a".into(),
                    key: vec![1],
                    value: vec![i],
                })
                .collect();
            bus.publish(recs).await.unwrap();
            let mut c = bus.subscribe("g", &["a".into()]).await.unwrap();
            let r = c.poll(Duration::from_secs(1)).await.unwrap().unwrap();
            c.ack(r.ack_token()).await.unwrap();
            c.commit().await.unwrap();
        }
        let bus = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        let mut c = bus.subscribe("g", &["a".into()]).await.unwrap();
        let r = c.poll(Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(r.value, vec![1], "resumes after the committed record");
        let next = bus
            .publish(vec![OutRecord {
                topic: "a".into(),
                key: vec![1],
                value: vec![9],
            }])
            .await
            .unwrap();
        assert_eq!(next[0].offset, 3, "offsets continue after reopening");
    }

    #[tokio::test]
    async fn retention_frees_disk() {
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "big", 2).await;
        for chunk in 0..20u32 {
            let recs = (0..50u32)
                .map(|i| OutRecord {
                    topic: "big".into(),
                    key: (chunk * 50 + i).to_be_bytes().to_vec(),
                    value: vec![7; 4096],
                })
                .collect();
            bus.publish(recs).await.unwrap();
        }
        let before = bus.disk_bytes();
        assert!(before > 4_000_000, "wrote about 4 MB, disk shows {before}");
        let report = bus
            .retention_pass(Duration::from_secs(3600), 512 * 1024, &Readers::new())
            .await
            .unwrap();
        assert!(report.deleted >= 800, "deleted {}", report.deleted);
        // The write-ahead log is truncated once no reader holds it (a checkpoint running on
        // its own thread may for a moment): the next pass gives the space back then.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut after = bus.disk_bytes();
        while after >= before / 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            bus.retention_pass(Duration::from_secs(3600), 512 * 1024, &Readers::new())
                .await
                .unwrap();
            after = bus.disk_bytes();
        }
        assert!(
            after < before / 3,
            "disk went from {before} to {after} bytes"
        );
        let left = bus.read_all("big").await.unwrap();
        let kept: usize = left.iter().map(|r| r.value.len() + r.key.len()).sum();
        assert!(kept <= 512 * 1024, "kept {kept} bytes");
        // The newest records are the ones kept.
        assert_eq!(left.last().unwrap().key, 999u32.to_be_bytes().to_vec());
        // Age: everything is younger than an hour; a zero age removes all.
        bus.retention_pass(Duration::ZERO, u64::MAX, &Readers::new())
            .await
            .unwrap();
        assert!(bus.read_all("big").await.unwrap().is_empty());
        // Offsets go on where they were, also after a reopen: a consumer group's committed
        // offset must not skip what comes next.
        let ends: Vec<i64> = bus
            .lag("nobody", "big")
            .await
            .unwrap()
            .iter()
            .map(|(_, _, end)| *end)
            .collect();
        assert_eq!(ends.iter().sum::<i64>(), 1000, "{ends:?}");
        drop(bus);
        let bus = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        let p = bus.publish(vec![rec("big", 0, 1)]).await.unwrap()[0];
        assert_eq!(p.offset, ends[p.partition as usize], "{ends:?}");
    }

    /// `n` records on each of the two partitions of `topic`, 101 bytes each (key and value).
    async fn fill_two_partitions(bus: &EmbeddedBus, topic: &str, n: usize) {
        let keys: Vec<u8> = (0..=255u8)
            .filter(|k| partition_for(&[*k], 2) == 0)
            .take(1)
            .chain((0..=255u8).filter(|k| partition_for(&[*k], 2) == 1).take(1))
            .collect();
        for _ in 0..n {
            for k in &keys {
                bus.publish(vec![OutRecord {
                    topic: topic.into(),
                    key: vec![*k],
                    value: vec![0; 100],
                }])
                .await
                .unwrap();
            }
        }
    }

    /// Group `group` finishes the first `upto[p]` records of each partition p of `topic`.
    async fn finish(bus: &EmbeddedBus, group: &str, topic: &str, upto: [i64; 2]) {
        let mut c = bus.subscribe(group, &[topic.into()]).await.unwrap();
        while let Some(r) = c.poll(Duration::from_millis(50)).await.unwrap() {
            if r.offset < upto[r.partition as usize] {
                c.ack(r.ack_token()).await.unwrap();
            }
        }
        c.commit().await.unwrap();
    }

    /// Offsets left per partition.
    async fn left(bus: &EmbeddedBus, topic: &str) -> [Vec<i64>; 2] {
        let mut out = [Vec::new(), Vec::new()];
        for r in bus.read_all(topic).await.unwrap() {
            out[r.partition as usize].push(r.offset);
        }
        out
    }

    #[tokio::test]
    async fn retention_stops_at_the_lowest_commit_of_every_reader_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "t", 2).await;
        fill_two_partitions(&bus, "t", 10).await;
        finish(&bus, "fast", "t", [10, 10]).await;
        finish(&bus, "slow", "t", [3, 0]).await;
        let readers = |groups: &[&str]| -> Readers {
            Readers::from([(
                "t".to_owned(),
                groups.iter().map(|g| (*g).to_owned()).collect(),
            )])
        };
        // A group in the configuration that never started holds everything.
        let r = bus
            .retention_pass(Duration::ZERO, 0, &readers(&["fast", "slow", "never"]))
            .await
            .unwrap();
        assert_eq!(r.deleted, 0);
        assert_eq!(r.held, vec![("t".to_owned(), 2020)]);
        // By age and by size alike, each partition goes only up to its own floor.
        let r = bus
            .retention_pass(Duration::ZERO, u64::MAX, &readers(&["fast", "slow"]))
            .await
            .unwrap();
        assert_eq!(r.deleted, 3);
        assert_eq!(
            left(&bus, "t").await,
            [(3..10).collect::<Vec<i64>>(), (0..10).collect()]
        );
        finish(&bus, "slow", "t", [5, 4]).await;
        let r = bus
            .retention_pass(Duration::from_secs(3600), 0, &readers(&["fast", "slow"]))
            .await
            .unwrap();
        assert_eq!(r.deleted, 6, "by size: 2 on partition 0, 4 on partition 1");
        assert_eq!(
            left(&bus, "t").await,
            [(5..10).collect::<Vec<i64>>(), (4..10).collect()]
        );
        assert_eq!(r.held, vec![("t".to_owned(), 1111)], "what is left is held");
        // Without readers the topic is cut as before.
        bus.retention_pass(Duration::ZERO, u64::MAX, &Readers::new())
            .await
            .unwrap();
        assert_eq!(left(&bus, "t").await, [Vec::<i64>::new(), Vec::new()]);
    }

    #[tokio::test]
    async fn dead_letters_outlive_retention_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "ketenbus.dlq.gp", 2).await;
        fill_two_partitions(&bus, "ketenbus.dlq.gp", 3).await;
        let r = bus
            .retention_pass(Duration::ZERO, 0, &Readers::new())
            .await
            .unwrap();
        assert_eq!(r, RetentionReport::default());
        assert_eq!(bus.read_all("ketenbus.dlq.gp").await.unwrap().len(), 6);
        assert_eq!(
            bus.remove("ketenbus.dlq.gp", &[(0, 1), (1, 2), (1, 9)])
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            left(&bus, "ketenbus.dlq.gp").await,
            [vec![0, 2], vec![0, 1]]
        );
        // Offsets go on after the removed newest record.
        let p = bus
            .publish(vec![rec("ketenbus.dlq.gp", 7, 7)])
            .await
            .unwrap()[0];
        assert!(p.offset >= 2, "{p:?}");
    }

    #[tokio::test]
    async fn a_topic_held_past_the_margin_refuses_ingest_until_its_readers_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedConfig {
            retention_max_age: Duration::ZERO,
            retention_max_bytes: bytesize::ByteSize::b(300),
            retention_refuse_margin: bytesize::ByteSize::b(1000),
            ..EmbeddedConfig::default()
        };
        let bus = EmbeddedBus::open(dir.path(), &config).unwrap();
        bus.ensure_topics(&[TopicSpec {
            name: "t".into(),
            partitions: 2,
        }])
        .await
        .unwrap();
        let readers = Readers::from([("t".to_owned(), vec!["sub".to_owned()])]);
        fill_two_partitions(&bus, "t", 6).await;
        let r = bus.enforce_retention(&readers).await.unwrap();
        assert_eq!((r.excess_bytes(), r.refusing.as_deref()), (912, None));
        assert_eq!(bus.refuses_ingest(), None, "within the margin");
        fill_two_partitions(&bus, "t", 1).await;
        let r = bus.enforce_retention(&readers).await.unwrap();
        assert_eq!(r.excess_bytes(), 1114);
        let why = bus.refuses_ingest().expect("past the margin");
        assert!(
            why.contains("topic t") && why.contains("retention_refuse_margin"),
            "{why}"
        );
        assert_eq!(r.deleted, 0, "nothing unfinished goes");
        finish(&bus, "sub", "t", [7, 7]).await;
        let r = bus.enforce_retention(&readers).await.unwrap();
        assert_eq!((r.deleted, r.excess_bytes()), (14, 0));
        assert_eq!(bus.refuses_ingest(), None);
    }

    fn rec(topic: &str, key: u8, value: u8) -> OutRecord {
        OutRecord {
            topic: topic.into(),
            key: vec![key],
            value: vec![value],
        }
    }

    #[tokio::test]
    async fn offsets_continue_after_another_writer_appended() {
        // Two buses on one file are what `ketenbus dlq replay` beside a running broker is:
        // the first must not hand out an offset the second already used.
        let dir = tempfile::tempdir().unwrap();
        let a = open_with(dir.path(), "t", 1).await;
        assert_eq!(a.publish(vec![rec("t", 1, 0)]).await.unwrap()[0].offset, 0);
        let b = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        assert_eq!(b.publish(vec![rec("t", 1, 1)]).await.unwrap()[0].offset, 1);
        assert_eq!(a.publish(vec![rec("t", 1, 2)]).await.unwrap()[0].offset, 2);
        let values: Vec<u8> = a
            .read_all("t")
            .await
            .unwrap()
            .iter()
            .map(|r| r.value[0])
            .collect();
        assert_eq!(values, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn a_consumer_sees_what_another_writer_appended() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_with(dir.path(), "t", 2).await;
        let mut c = a.subscribe("g", &["t".into()]).await.unwrap();
        assert!(c.poll(Duration::ZERO).await.unwrap().is_none());
        // No notification reaches `a` from this writer: only looking again finds it.
        let b = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        b.publish(vec![rec("t", 7, 9)]).await.unwrap();
        let got = c.poll(Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.map(|r| r.value), Some(vec![9]));
    }

    #[tokio::test]
    async fn a_record_is_there_for_a_poll_right_after_its_publish() {
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "t", 4).await;
        let mut c = bus.subscribe("g", &["t".into()]).await.unwrap();
        assert!(c.poll(Duration::ZERO).await.unwrap().is_none());
        for i in 0..50u8 {
            bus.publish(vec![rec("t", i, i)]).await.unwrap();
            let r = c.poll(Duration::ZERO).await.unwrap();
            assert_eq!(r.map(|r| r.value), Some(vec![i]), "record {i}");
        }
    }

    #[test]
    fn partitioner_is_stable() {
        assert_eq!(partition_for(b"abc", 8), partition_for(b"abc", 8));
        assert_eq!(partition_for(b"", 1), 0);
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition_for(b"a", 1000),
            u32::try_from(0xaf63_dc4c_8601_ec8c_u64 % 1000).unwrap()
        );
    }
}
