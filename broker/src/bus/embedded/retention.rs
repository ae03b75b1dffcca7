//! Retention: by age and size, never past what a reader of the topic has not finished, never
//! a dead letter; freed pages go back to the file system. Also single removals (`ketenbus dlq
//! purge`) and the size on disk.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::WriteOp;
use super::{EmbeddedBus, load_partitions, now_ms};
use crate::bus::{BusError, Readers, RetentionReport, is_dead_letter_topic};
use ketenbus_schemas::topics;

impl EmbeddedBus {
    /// Bytes the log takes on disk (database plus WAL).
    pub(super) fn bytes_on_disk(&self) -> u64 {
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

    /// One retention pass with the configured limits; remembers whether the log refuses
    /// new messages (see [`crate::bus::Bus::refuses_ingest`]).
    pub(super) async fn enforce(&self, readers: &Readers) -> Result<RetentionReport, BusError> {
        let (max_age, max_bytes, margin) = self.inner.limits;
        let mut report = self.retention_pass(max_age, max_bytes, readers).await?;
        let (path, bodies) = (self.inner.path.clone(), self.inner.bodies.clone());
        match tokio::task::spawn_blocking(move || sweep_bodies(&path, &bodies)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "retention removed body files"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "body files not swept, trying again next pass")
            }
            Err(e) => tracing::warn!(error = %e, "body sweep failed"),
        }
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
}

/// Remove the body files no record names any more (see [`crate::bus::bodies`]): a body
/// whose raw record retention removed and which no dead letter, retry or replay record
/// copies; a body whose record was never committed (a crash between the fsync and the
/// commit); a temporary file a crash left half written. Bodies of envelopes being published
/// are not looked at. Returns how many envelopes' files went.
///
/// # Errors
/// When the database or the directory cannot be read.
pub(super) fn sweep_bodies(
    path: &std::path::Path,
    bodies: &crate::bus::bodies::BodyStore,
) -> Result<u64, String> {
    let entries = bodies.entries().map_err(|e| e.to_string())?;
    if entries.is_empty() {
        return Ok(0);
    }
    let conn = super::open_reader(path).map_err(|e| e.to_string())?;
    let q = |e: rusqlite::Error| e.to_string();
    let copies: Vec<String> = load_partitions(&conn)
        .map_err(q)?
        .into_keys()
        .filter(|t| {
            is_dead_letter_topic(t)
                || t.starts_with("ketenbus.retry.")
                || t.starts_with("ketenbus.replay.")
        })
        .collect();
    let mut at = conn
        .prepare("SELECT 1 FROM records WHERE topic = ?1 AND partition = ?2 AND offset = ?3")
        .map_err(q)?;
    // Written just before its record was appended: look from a minute before the file's time.
    let mut by_key = conn
        .prepare(
            "SELECT partition, offset FROM records WHERE topic = ?1 AND ts >= ?2 AND key = ?3 LIMIT 1",
        )
        .map_err(q)?;
    let mut copied = conn
        .prepare("SELECT 1 FROM records WHERE topic = ?1 AND key = ?2 LIMIT 1")
        .map_err(q)?;
    let mut removed = 0;
    for entry in entries {
        if entry.id.is_empty() {
            // A temporary file of a write a crash cut short.
            entry.remove().map_err(|e| e.to_string())?;
            removed += 1;
            continue;
        }
        let raw_there = match entry.at {
            Some(pos) => at
                .exists(params![topics::RAW, pos.partition, pos.offset])
                .map_err(q)?,
            None if entry.has_body => {
                let found: Option<(u32, i64)> = by_key
                    .query_row(
                        params![topics::RAW, entry.modified_ms - 60_000, entry.id.as_bytes()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(q)?;
                if let Some((partition, offset)) = found {
                    bodies.note_position(&entry.id, crate::bus::Position { partition, offset });
                }
                found.is_some()
            }
            None => false,
        };
        if raw_there {
            continue;
        }
        let mut kept = false;
        for topic in &copies {
            if copied
                .exists(params![topic, entry.id.as_bytes()])
                .map_err(q)?
            {
                kept = true;
                break;
            }
        }
        if !kept {
            entry.remove().map_err(|e| e.to_string())?;
            removed += 1;
        }
    }
    Ok(removed)
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

///
/// `owed` says a step freed pages whose WAL was not truncated yet (see [`give_back`]): this
/// pass tries again even if it deletes nothing.
pub(super) fn retention(
    conn: &mut Connection,
    max_age: Duration,
    max_bytes: u64,
    readers: &Readers,
    owed: &mut bool,
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
    give_back(conn, report.deleted > 0, owed)?;
    Ok(report)
}

/// Return freed pages to the file system and truncate the WAL, when this step `freed` some
/// or an earlier one's truncation is still `owed`; `owed` then says whether the WAL stays
/// untruncated (another connection's checkpoint or a reader held it), for the next step.
fn give_back(conn: &Connection, freed: bool, owed: &mut bool) -> rusqlite::Result<()> {
    if !freed && !*owed {
        return Ok(());
    }
    // Each step of this pragma frees pages; run it to the end.
    let mut vacuum = conn.prepare("PRAGMA incremental_vacuum")?;
    let mut rows = vacuum.query([])?;
    while rows.next()?.is_some() {}
    drop(rows);
    drop(vacuum);
    *owed = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok(r.get::<_, i64>(0)? != 0)
    })?;
    Ok(())
}

/// Remove single records (`ketenbus dlq purge`); offsets go on where they were.
pub(super) fn remove(
    conn: &mut Connection,
    topic: &str,
    positions: &[(u32, i64)],
    owed: &mut bool,
) -> rusqlite::Result<u64> {
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
    give_back(conn, removed > 0, owed)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{open_with, rec};
    use super::super::{EmbeddedBus, EmbeddedConfig};
    use crate::bus::{
        Bus, Consumer, OutRecord, Readers, RetentionReport, TopicSpec, partition_for,
    };

    #[tokio::test]
    async fn retention_frees_disk() {
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "big", 2).await;
        // Values that do not compress: the log stores them as given.
        for chunk in 0..20u32 {
            let recs = (0..50u32)
                .map(|i| OutRecord {
                    topic: "big".into(),
                    key: (chunk * 50 + i).to_be_bytes().to_vec(),
                    value: super::super::packing::tests::noise(4096, u64::from(chunk * 50 + i)),
                })
                .collect();
            bus.publish(recs).await.unwrap();
        }
        let before = bus.bytes_on_disk();
        assert!(before > 4_000_000, "wrote about 4 MB, disk shows {before}");
        let report = bus
            .retention_pass(Duration::from_secs(3600), 512 * 1024, &Readers::new())
            .await
            .unwrap();
        assert!(report.deleted >= 800, "deleted {}", report.deleted);
        // The write-ahead log is truncated once no reader holds it (a checkpoint running on
        // its own thread may for a moment): the next pass gives the space back then.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut after = bus.bytes_on_disk();
        while after >= before / 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            bus.retention_pass(Duration::from_secs(3600), 512 * 1024, &Readers::new())
                .await
                .unwrap();
            after = bus.bytes_on_disk();
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
}
