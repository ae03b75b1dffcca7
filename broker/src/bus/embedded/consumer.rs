//! Consumer group members: read through their own connection, wake on the writer's
//! notification or after a short wait, commit the contiguous finished prefix.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{oneshot, watch};

use super::WriteOp;
use super::{EmbeddedBus, open_reader, sql_err};
use crate::bus::{AckToken, BusError, Consumer, OffsetTracker, Record};

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
    /// When every partition was last read from the log (not from the fresh records).
    looked_in_log: Option<tokio::time::Instant>,
    /// A read of the log that a dropped poll left running (the next poll takes its rows),
    /// and whether the fresh records taken with it left more behind.
    reading: Option<(LogRead, bool)>,
    /// Reads of the log started (tests).
    #[cfg(test)]
    reads: usize,
}

/// Rows of a read of the log, and whether a partition had more.
type LogRead = tokio::task::JoinHandle<rusqlite::Result<(Vec<Record>, bool)>>;

impl std::fmt::Debug for EmbeddedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedConsumer")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// Records per partition and look. The SQL below spells it as a literal: SQLite plans again
/// on every run for a bound `LIMIT ?`, which cost as much as the read itself.
const FETCH: usize = 256;
const FETCH_SQL: &str = "SELECT offset, key, value, ts, codec FROM records
     WHERE topic = ?1 AND partition = ?2 AND offset >= ?3 ORDER BY offset LIMIT 256";
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// Longest wait before looking again without a notification (sees other processes' writes).
const IDLE_RECHECK: Duration = Duration::from_millis(250);
/// Longest a busy consumer takes only fresh records before it reads the log itself again
/// (which sees other processes' appends, such as `ketenbus dlq replay`'s).
const LOG_LOOK_EVERY: Duration = Duration::from_millis(250);

impl EmbeddedConsumer {
    /// Join `group` on `topics`, after the group's committed offsets, or at `from`
    /// (partition, next offset; 0 for a partition not named) when given.
    pub(super) async fn join(
        bus: &EmbeddedBus,
        group: &str,
        topics: &[String],
        from: Option<&[(u32, i64)]>,
    ) -> Result<EmbeddedConsumer, BusError> {
        bus.refresh_partitions().await?;
        let mut parts = Vec::new();
        for t in topics {
            let n = bus
                .partitions_of(t)
                .ok_or_else(|| BusError::UnknownTopic(t.clone()))?;
            parts.extend((0..n).map(|p| (t.clone(), p)));
        }
        let path = bus.inner.path.clone();
        let group_owned = group.to_owned();
        let from: Option<HashMap<u32, i64>> = from.map(|f| f.iter().copied().collect());
        let (conn, next) = tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
            let conn = open_reader(&path)?;
            let mut next = HashMap::new();
            for (topic, p) in parts {
                if let Some(from) = &from {
                    next.insert((topic, p), from.get(&p).copied().unwrap_or(0));
                    continue;
                }
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
            bus: bus.clone(),
            group: group.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
            next,
            buffer: VecDeque::new(),
            tracker: OffsetTracker::default(),
            appended: bus.inner.appended.clone(),
            last_commit: tokio::time::Instant::now(),
            more: true,
            looked_in_log: None, // the first look reads the log
            reading: None,
            #[cfg(test)]
            reads: 0,
        })
    }

    /// Read on from each partition's next offset: from the writer's fresh records where
    /// they cover it and `fresh` allows, from SQLite otherwise.
    async fn fetch(&mut self, fresh: bool) -> Result<(), BusError> {
        if self.reading.is_none() && !self.start_fetch(fresh) {
            return Ok(());
        }
        // Awaited through `&mut`: a caller that drops this poll (one selecting on it) leaves
        // the read running in `reading` for the next poll, rather than the next poll starting
        // a second read that waits on the first's connection. Callers that select on `poll`
        // for every other event would otherwise pile up blocking threads, each waiting on
        // this consumer's connection, until the runtime's blocking pool is full.
        let (read, fresh_more) = self.reading.as_mut().expect("a read is running");
        let fresh_more = *fresh_more;
        let result = read.await;
        self.reading = None;
        let (rows, log_more) = result
            .map_err(|e| BusError::Fatal(e.to_string()))?
            .map_err(|e| sql_err(&e))?;
        self.more = fresh_more | log_more;
        for r in rows {
            let slot = (r.topic.clone(), r.partition);
            self.next.insert(slot, r.offset + 1);
            self.buffer.push_back(r);
        }
        Ok(())
    }

    /// Take what the fresh records hold and start a read of the log for the partitions they
    /// do not cover; `false` when nothing needs reading from the log.
    fn start_fetch(&mut self, fresh: bool) -> bool {
        let mut more = false;
        let mut wants: Vec<((String, u32), i64)> = Vec::new();
        let mut taken = Vec::new();
        for ((topic, partition), from) in &self.next {
            let kept = if fresh {
                self.bus.inner.fresh.take(topic, *partition, *from, FETCH)
            } else {
                None
            };
            match kept {
                Some(records) => {
                    more |= records.len() >= FETCH;
                    taken.extend(records);
                }
                None => wants.push(((topic.clone(), *partition), *from)),
            }
        }
        for r in taken {
            self.next
                .insert((r.topic.clone(), r.partition), r.offset + 1);
            self.buffer.push_back(r);
        }
        if wants.is_empty() {
            self.more = more;
            return false;
        }
        if !fresh {
            self.looked_in_log = Some(tokio::time::Instant::now());
        }
        // Dropped while reading (a caller that selects on `poll`), the next poll must come
        // back for the read: the notification that asked for it is already taken.
        self.more = true;
        let conn = Arc::clone(&self.conn);
        #[cfg(test)]
        {
            self.reads += 1;
        }
        let read = tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
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
                        value: super::packing::read(r, 2, 4)?,
                        timestamp_ms: r.get(3)?,
                    })
                })?;
                for row in rows {
                    out.push(row?);
                }
                more |= out.len() - before >= FETCH;
            }
            Ok((out, more))
        });
        self.reading = Some((read, more));
        true
    }
}

impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut waited = false;
        let mut timed_out = false;
        loop {
            if let Some(r) = self.buffer.pop_front() {
                self.tracker.started(&r.topic, r.partition, r.offset);
                return Ok(Some(r));
            }
            // Look again only when this process appended since the last look, the last look
            // left records behind, or after a wait (which also catches other processes'
            // writes): an immediate poll after an empty look costs no read.
            // The writer's fresh records answer a look, except after a wait without a
            // notification or when the log was last read LOG_LOOK_EVERY ago: other processes'
            // appends are only there.
            let appended = self.appended.has_changed().unwrap_or(true);
            if appended || self.more || waited {
                self.appended.borrow_and_update();
                let fresh = !timed_out
                    && self
                        .looked_in_log
                        .is_some_and(|at| at.elapsed() < LOG_LOOK_EVERY);
                self.fetch(fresh).await?;
                if !self.buffer.is_empty() {
                    continue;
                }
            }
            // Nothing to hand out: a good moment to commit what finished, so an idle group
            // shows no lag. At most every COMMIT_EVERY: a group that goes idle between
            // every record would otherwise add a transaction (an fsync) per record to the
            // writer that every publisher waits on.
            let mut commit_due = None;
            if self.tracker.has_dirty() {
                let since = self.last_commit.elapsed();
                if since >= COMMIT_EVERY {
                    self.commit().await?;
                } else {
                    commit_due = Some(COMMIT_EVERY - since);
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now)
                .min(IDLE_RECHECK)
                .min(commit_due.unwrap_or(IDLE_RECHECK));
            timed_out = tokio::time::timeout(wait, self.appended.changed())
                .await
                .is_err();
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
    use std::time::Duration;

    use super::super::tests::{open_with, rec};
    use super::super::{EmbeddedBus, EmbeddedConfig};
    use crate::bus::{Bus, Consumer, OutRecord};

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

    /// A bus with topic `t` of `partitions`, and group `g`'s member that has looked once.
    async fn idle_member(
        dir: &std::path::Path,
        partitions: u32,
    ) -> (EmbeddedBus, super::EmbeddedConsumer) {
        let bus = open_with(dir, "t", partitions).await;
        let mut c = bus.subscribe("g", &["t".into()]).await.unwrap();
        assert!(c.poll(Duration::ZERO).await.unwrap().is_none());
        (bus, c)
    }

    #[tokio::test]
    async fn a_consumer_sees_what_another_writer_appended() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, mut c) = idle_member(dir.path(), 2).await;
        // No notification reaches `a` from this writer: only looking again finds it.
        let b = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        b.publish(vec![rec("t", 7, 9)]).await.unwrap();
        let got = c.poll(Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.map(|r| r.value), Some(vec![9]));
    }

    #[tokio::test]
    async fn an_idle_group_commits_at_most_every_commit_every_but_soon() {
        // Idle after every record (a low rate) must not cost a transaction per record.
        let dir = tempfile::tempdir().unwrap();
        let (bus, mut c) = idle_member(dir.path(), 1).await;
        c.commit().await.unwrap(); // COMMIT_EVERY counts from here
        bus.publish(vec![rec("t", 1, 1)]).await.unwrap();
        let r = c.poll(Duration::ZERO).await.unwrap().unwrap();
        c.ack(r.ack_token()).await.unwrap();
        assert!(c.poll(Duration::ZERO).await.unwrap().is_none());
        let committed = |lag: Vec<(u32, i64, i64)>| lag[0].1;
        assert_eq!(
            committed(bus.lag("g", "t").await.unwrap()),
            0,
            "committed at once after going idle"
        );
        // Still idle: committed within COMMIT_EVERY, without another record or poll.
        assert!(c.poll(super::COMMIT_EVERY * 2).await.unwrap().is_none());
        assert_eq!(committed(bus.lag("g", "t").await.unwrap()), 1);
    }

    #[tokio::test]
    async fn a_poll_dropped_while_reading_the_log_loses_no_notification() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, mut c) = idle_member(dir.path(), 1).await;
        // The next look reads the log (SQLite, on a blocking thread), not the fresh records.
        tokio::time::sleep(super::LOG_LOOK_EVERY + Duration::from_millis(50)).await;
        bus.publish(vec![rec("t", 1, 7)]).await.unwrap();
        // A caller selecting on poll drops it at its first await: inside that read.
        let first = tokio::select! {
            biased;
            r = c.poll(Duration::from_secs(1)) => r.unwrap(),
            () = std::future::ready(()) => None,
        };
        let got = match first {
            Some(r) => Some(r), // the read finished at once: nothing was dropped
            None => c.poll(Duration::ZERO).await.unwrap(),
        };
        assert_eq!(got.map(|r| r.value), Some(vec![7]));
    }

    #[tokio::test]
    async fn polls_dropped_while_reading_the_log_start_no_second_read() {
        let dir = tempfile::tempdir().unwrap();
        let bus = open_with(dir.path(), "t", 1).await;
        // More than the fresh records keep (4 MiB), so most is read from the log.
        let n = 3000usize;
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let recs = chunk
                .iter()
                .map(|_| OutRecord {
                    topic: "t".into(),
                    key: vec![1],
                    value: vec![7; 4096],
                })
                .collect();
            bus.publish(recs).await.unwrap();
        }
        let mut c = bus.subscribe("g", &["t".into()]).await.unwrap();
        // A caller that selects on poll and something that is always ready (a delivery
        // loop's lane reports) drops every poll at its first await, inside a read.
        // Bounded, so that a consumer which starts a read for every dropped poll fails here
        // rather than leaving thousands of reads for the runtime to wait out at its end.
        let (mut got, mut dropped) = (0, 0);
        while got < n {
            assert!(
                dropped < 2000,
                "only {got} of {n} read after {dropped} dropped polls ({} reads)",
                c.reads
            );
            let polled = tokio::select! {
                biased;
                r = c.poll(Duration::from_secs(1)) => r.unwrap(),
                () = std::future::ready(()) => None,
            };
            if polled.is_some() {
                got += 1;
            } else {
                dropped += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // One read per page of 256 (and the first look): a dropped poll's read is taken
        // over, not started again beside it.
        let pages = n.div_ceil(super::FETCH);
        assert!(c.reads <= pages + 2, "{} reads for {pages} pages", c.reads);
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
}
