//! The writer thread: one connection that commits every waiting request in one transaction
//! (group commit), and the checkpointer beside it that copies the WAL into the database.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::config::Synchronous;
use super::fresh::Fresh;
use super::retention::{remove, retention};
use super::{WriteOp, load_partitions, now_ms, sql_err};
use crate::bus::{BusError, OutRecord, Position, Record, TopicSpec, partition_for};

/// How often the checkpointer copies the WAL into the database while appends come in, and
/// so (see [`restart_wal`]) about how much WAL there is. A checkpoint writes and fsyncs the
/// database file, which slows the writer's commits (WAL fsyncs) that overlap it. Measured at
/// 1,000 msg/s with the WAL starting over after each: every 1 s, each second began with a
/// burst of slow commits (accept p99 24-26 ms over two runs, a WAL of about 100 MB); every
/// 100 ms, no such rhythm (p99 20-21 ms, a WAL of about 10 MB) at the same CPU.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The checkpointer's connection: it writes the database file, fsyncing as `sync` says.
pub(super) fn open_checkpointer(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", sync.pragma())?;
    conn.pragma_update(None, "cache_size", -super::CHECKPOINTER_CACHE_KIB)?;
    Ok(conn)
}

/// Checkpoint (PASSIVE: never waits for the writer or readers) at most every
/// [`CHECKPOINT_EVERY`] while the writer rings `bell`; stops when the writer stops. After a
/// checkpoint that copied every frame it found, `caught_up` asks the writer to start the WAL
/// over (see [`restart_wal`]).
pub(super) fn checkpointer(
    conn: &Connection,
    bell: &std::sync::mpsc::Receiver<()>,
    caught_up: &AtomicBool,
) {
    let mut last = Instant::now();
    while bell.recv().is_ok() {
        if let Some(rest) = CHECKPOINT_EVERY.checked_sub(last.elapsed()) {
            std::thread::sleep(rest);
        }
        // Rings during the sleep are covered by the checkpoint that follows.
        let _ = bell.try_recv();
        last = Instant::now();
        match passive_checkpoint(conn) {
            Ok(true) => caught_up.store(true, Ordering::Release),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "log checkpoint failed, retrying with the next append");
            }
        }
    }
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: whether it copied every frame of the WAL it found.
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let (busy, frames, copied): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok(busy == 0 && frames > 0 && copied == frames)
    })
}

/// Let the next transaction write the WAL from its start again rather than after its end.
///
/// SQLite starts the WAL over only when a write transaction begins with every frame already
/// copied into the database and no reader inside the WAL. Under a steady stream of commits
/// that never happens by itself: the checkpointer copies what it finds while the writer keeps
/// appending, so when a transaction begins there are always frames the last checkpoint did
/// not see, and the WAL grew by every page ever written (1.1 GB in 15 s at 1,000 msg/s, each
/// new block of it zeroed by the file system first). The writer, once the checkpointer has
/// caught up, copies the few frames committed since itself (nothing else can commit in
/// between), and its next transaction starts the WAL over if no reader is inside it then.
fn restart_wal(conn: &Connection) {
    if let Err(e) = passive_checkpoint(conn) {
        tracing::warn!(error = %e, "log checkpoint by the writer failed");
    }
}

/// `appended` tells consumers a commit happened; `fresh` keeps what it committed for them.
pub(super) fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<WriteOp>,
    (appended, fresh): (&watch::Sender<u64>, &Fresh),
    (bell, caught_up): (&std::sync::mpsc::SyncSender<()>, &AtomicBool),
    max_batch: usize,
) {
    let mut seq = 0u64;
    let mut ends = Ends::default();
    // A WAL truncation after retention or removal that a checkpoint held off (`give_back`).
    let mut wal_owed = false;
    while let Some(first) = rx.blocking_recv() {
        let mut appends = Vec::new();
        let mut commits = Vec::new();
        let mut others = Vec::new();
        let mut op = Some(first);
        while let Some(next) = op.take() {
            match next {
                WriteOp::Append(records, packed, reply) => {
                    appends.push((records, packed, reply));
                }
                WriteOp::Commit(group, points, reply) => commits.push((group, points, reply)),
                other => others.push(other),
            }
            if appends.len() + commits.len() + others.len() < max_batch {
                op = rx.try_recv().ok();
            }
        }
        if appends.is_empty() {
            // No group commit to ride along with: a transaction of their own.
            for (group, points, reply) in commits.drain(..) {
                let _ =
                    reply.send(commit_offsets(&mut conn, &group, &points).map_err(|e| sql_err(&e)));
            }
        }
        if !appends.is_empty() {
            if caught_up.swap(false, Ordering::Acquire) {
                restart_wal(&conn);
            }
            // Offset commits go in the appends' transaction: one commit, one fsync.
            let result = append_batch(&mut conn, &mut ends, &appends, &commits);
            let committed = result.as_ref().map(drop).map_err(sql_err);
            for (_, _, reply) in commits.drain(..) {
                let _ = reply.send(match &committed {
                    Ok(()) => Ok(()),
                    Err(BusError::Unavailable(s)) => Err(BusError::Unavailable(s.clone())),
                    Err(other) => Err(BusError::Fatal(other.to_string())),
                });
            }
            match result {
                Ok((positions, ts)) => {
                    // Consumers first: a publisher that polls right after its publish
                    // returned must not find its consumer still unaware of the commit.
                    let mut replies = Vec::with_capacity(appends.len());
                    let mut committed = Vec::new();
                    for ((records, _, reply), pos) in appends.into_iter().zip(positions) {
                        if let Ok(pos) = &pos {
                            committed.extend(records.into_iter().zip(pos).map(|(r, p)| Record {
                                topic: r.topic,
                                partition: p.partition,
                                offset: p.offset,
                                key: r.key,
                                value: r.value,
                                timestamp_ms: ts,
                            }));
                        }
                        replies.push((reply, pos));
                    }
                    fresh.put(committed);
                    seq += 1;
                    appended.send_replace(seq);
                    for (reply, pos) in replies {
                        let _ = reply.send(pos);
                    }
                    // Full means a ring is already waiting.
                    let _ = bell.try_send(());
                }
                Err(e) => {
                    ends.forget();
                    let err = sql_err(&e);
                    for (_, _, reply) in appends {
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
                WriteOp::Append(..) | WriteOp::Commit(..) => {
                    unreachable!("appends and commits were taken above")
                }
                WriteOp::CreateTopics(specs, reply) => {
                    ends.forget();
                    fresh.clear();
                    let _ = reply.send(create_topics(&mut conn, &specs).map_err(|e| sql_err(&e)));
                }
                WriteOp::Retention(age, bytes, readers, reply) => {
                    ends.forget();
                    fresh.clear();
                    let _ = reply.send(
                        retention(&mut conn, age, bytes, &readers, &mut wal_owed)
                            .map_err(|e| sql_err(&e)),
                    );
                }
                WriteOp::Remove(topic, positions, reply) => {
                    ends.forget();
                    fresh.clear();
                    let _ = reply.send(
                        remove(&mut conn, &topic, &positions, &mut wal_owed)
                            .map_err(|e| sql_err(&e)),
                    );
                }
            }
        }
    }
}

type AppendReply = oneshot::Sender<Result<Vec<Position>, BusError>>;

/// The next offset of partition (?1, ?2): after its newest record, or after the newest one
/// retention removed (`partition_ends`), so offsets never restart under consumer groups.
pub(super) const PARTITION_END: &str = "SELECT MAX(
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

/// A consumer group's offsets to commit, and where the answer goes.
type OffsetCommit = (
    String,
    Vec<(String, u32, i64)>,
    oneshot::Sender<Result<(), BusError>>,
);

/// One transaction for every waiting append, and the waiting offset `commits`. A request
/// naming an unknown topic fails alone. On error the caller forgets `ends`: the offsets
/// handed out were rolled back. Also answers the records' timestamp.
#[allow(clippy::type_complexity)]
fn append_batch(
    conn: &mut Connection,
    ends: &mut Ends,
    appends: &[(Vec<OutRecord>, Vec<Option<Vec<u8>>>, AppendReply)],
    commits: &[OffsetCommit],
) -> rusqlite::Result<(Vec<Result<Vec<Position>, BusError>>, i64)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(appends.len());
    let ts = now_ms();
    {
        // Inside the write lock: nobody else can commit until this transaction ends.
        ends.refresh(&tx)?;
        let mut end_stmt = tx.prepare_cached(PARTITION_END)?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO records (topic, partition, offset, key, value, ts, codec)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (records, packed, reply) in appends {
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
            for (r, packed) in records.iter().zip(packed) {
                let partition = partition_for(&r.key, ends.partitions[&r.topic]);
                let slot = (r.topic.clone(), partition);
                let offset = match ends.next.get(&slot) {
                    Some(o) => *o,
                    None => end_stmt.query_row(params![r.topic, partition], |row| row.get(0))?,
                };
                let (value, codec) = match packed {
                    Some(p) => (p.as_slice(), super::packing::LZ4),
                    None => (r.value.as_slice(), super::packing::PLAIN),
                };
                insert.execute(params![r.topic, partition, offset, r.key, value, ts, codec])?;
                ends.next.insert(slot, offset + 1);
                positions.push(Position { partition, offset });
            }
            out.push(Ok(positions));
        }
        for (group, points, _) in commits {
            upsert_offsets(&tx, group, points)?;
        }
    }
    tx.commit()?;
    Ok((out, ts))
}

fn commit_offsets(
    conn: &mut Connection,
    group: &str,
    points: &[(String, u32, i64)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    upsert_offsets(&tx, group, points)?;
    tx.commit()
}

fn upsert_offsets(
    conn: &Connection,
    group: &str,
    points: &[(String, u32, i64)],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO group_offsets (grp, topic, partition, next_offset) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (grp, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
    )?;
    for (topic, partition, offset) in points {
        stmt.execute(params![group, topic, partition, offset])?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::tests::{open_with, rec};
    use super::super::{EmbeddedBus, EmbeddedConfig};
    use crate::bus::Bus;

    #[tokio::test]
    async fn an_offset_commit_riding_with_appends_is_durable_and_answered() {
        use super::super::fresh::Fresh;
        use super::{WriteOp, writer_loop};
        use tokio::sync::{mpsc, oneshot, watch};

        let dir = tempfile::tempdir().unwrap();
        drop(open_with(dir.path(), "t", 1).await);
        let cfg = EmbeddedConfig::default();
        let path = dir.path().join(&cfg.file);
        let conn = super::super::open(&path, cfg.synchronous).unwrap();
        // Both waiting when the writer looks: one group commit takes them together.
        let (tx, rx) = mpsc::channel(4);
        let (append, appended_rx) = oneshot::channel();
        let (commit, committed_rx) = oneshot::channel();
        tx.send(WriteOp::Append(vec![rec("t", 1, 7)], vec![None], append))
            .await
            .unwrap();
        tx.send(WriteOp::Commit(
            "g".into(),
            vec![("t".into(), 0, 1)],
            commit,
        ))
        .await
        .unwrap();
        drop(tx);
        std::thread::spawn(move || {
            let (appended, _) = watch::channel(0);
            let (bell, _rings) = std::sync::mpsc::sync_channel(1);
            let caught_up = std::sync::atomic::AtomicBool::new(false);
            writer_loop(
                conn,
                rx,
                (&appended, &Fresh::new(1024)),
                (&bell, &caught_up),
                16,
            );
        })
        .join()
        .unwrap();
        assert_eq!(appended_rx.await.unwrap().unwrap()[0].offset, 0);
        committed_rx.await.unwrap().unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        let next: i64 = other
            .query_row(
                "SELECT next_offset FROM group_offsets WHERE grp = 'g' AND topic = 't'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(next, 1);
        let records: i64 = other
            .query_row("SELECT COUNT(*) FROM records WHERE topic = 't'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(records, 1);
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
}
