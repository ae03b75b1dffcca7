//! Fresh records kept in memory: the writer puts each committed record here after its
//! transaction commits, and consumers that are at the head of a partition take them from
//! here instead of reading them back from SQLite (a query, a page walk and a copy per
//! record, on a blocking thread). Bounded by bytes; the oldest records go first.
//!
//! What is here is always the log's content: a record enters only once committed (durable),
//! each partition holds one contiguous run of offsets (a gap, such as another process's
//! append, starts the run again), and anything that deletes records (retention, removal)
//! empties it. A consumer whose position is not inside a run reads SQLite as before; so does
//! every look after a wait, which is what sees other processes' appends.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use crate::bus::Record;

/// Most bytes (keys plus values) kept: about 85 ms of records at 4,500 messages a second
/// (each message's raw record, event, lineage and outcome, 10-11 KB), where the router and
/// the subscriptions read within a few milliseconds of the writer. Measured against 8 MiB
/// (`ketenbus-bench --count 30000 --batch 100`, three alternating pairs): peak RSS 101 /
/// 103 / 103 against 106 / 111 / 109 MB, 4,145 / 4,313 / 4,525 against 4,231 / 4,159 / 4,449
/// msg/s.
pub(super) const BUDGET: usize = 4 * 1024 * 1024;
/// A larger record is not kept: it breaks its partition's run, so its readers use SQLite.
pub(super) const LARGEST: usize = 256 * 1024;

/// One partition's run: records at offsets `first`, `first + 1`, ...
#[derive(Default)]
struct Run {
    first: i64,
    records: VecDeque<Record>,
}

impl Run {
    fn end(&self) -> i64 {
        self.first + i64::try_from(self.records.len()).unwrap_or(i64::MAX)
    }
}

#[derive(Default)]
struct State {
    runs: HashMap<(String, u32), Run>,
    /// What went in, oldest first: (topic, partition, offset, bytes). An entry whose record
    /// left with a reset run is skipped when its turn comes.
    order: VecDeque<(String, u32, i64, usize)>,
    bytes: usize,
}

/// The fresh records of one log. Cheap to share behind an `Arc`.
pub(super) struct Fresh {
    budget: usize,
    state: Mutex<State>,
}

fn size(r: &Record) -> usize {
    r.key.len() + r.value.len()
}

impl Fresh {
    pub(super) fn new(budget: usize) -> Fresh {
        Fresh {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keep records just committed, in the order of their offsets within each partition.
    pub(super) fn put(&self, committed: Vec<Record>) {
        let mut s = self.lock();
        for r in committed {
            let bytes = size(&r);
            let run = s.runs.entry((r.topic.clone(), r.partition)).or_default();
            let restart = run.records.is_empty() || run.end() != r.offset || bytes > LARGEST;
            let dropped: usize = if restart {
                // A gap, a record too large to keep, or the first record: the run starts
                // again here (after the large record: its readers use SQLite).
                let gone = run.records.drain(..).map(|r| size(&r)).sum();
                run.first = if bytes > LARGEST {
                    r.offset + 1
                } else {
                    r.offset
                };
                gone
            } else {
                0
            };
            let kept = bytes <= LARGEST;
            let entry = (r.topic.clone(), r.partition, r.offset, bytes);
            if kept {
                run.records.push_back(r);
            }
            s.bytes -= dropped;
            if kept {
                s.order.push_back(entry);
                s.bytes += bytes;
            }
        }
        while s.bytes > self.budget {
            let Some((topic, partition, offset, bytes)) = s.order.pop_front() else {
                break;
            };
            let Some(run) = s.runs.get_mut(&(topic, partition)) else {
                continue;
            };
            if run.first == offset && !run.records.is_empty() {
                run.records.pop_front();
                run.first += 1;
                s.bytes -= bytes;
            }
        }
        // Entries of reset runs pile up only when other processes append often: drop them.
        let live: usize = s.runs.values().map(|r| r.records.len()).sum();
        if s.order.len() > 2 * live + 4096 {
            let State { runs, order, .. } = &mut *s;
            order.retain(|(t, p, o, _)| {
                runs.get(&(t.clone(), *p))
                    .is_some_and(|r| *o >= r.first && *o < r.end())
            });
        }
    }

    /// Records of (`topic`, `partition`) from offset `from` on, at most `max`, that this
    /// process's writer committed: `None` when `from` is not inside or right at the end of
    /// the partition's run (read SQLite then); none for a partition it never wrote.
    pub(super) fn take(
        &self,
        topic: &str,
        partition: u32,
        from: i64,
        max: usize,
    ) -> Option<Vec<Record>> {
        let s = self.lock();
        let Some(run) = s.runs.get(&(topic.to_owned(), partition)) else {
            return Some(Vec::new());
        };
        if from < run.first || from > run.end() {
            return None;
        }
        let skip = usize::try_from(from - run.first).ok()?;
        Some(run.records.iter().skip(skip).take(max).cloned().collect())
    }

    /// Forget every record (records were deleted), but not where each run ended: a reader
    /// before that end reads SQLite.
    pub(super) fn clear(&self) {
        let mut s = self.lock();
        for run in s.runs.values_mut() {
            run.first = run.end();
            run.records.clear();
        }
        s.order.clear();
        s.bytes = 0;
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: u32, offset: i64, len: usize) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: vec![],
            value: vec![u8::try_from(offset % 251).unwrap(); len],
            timestamp_ms: 0,
        }
    }

    fn offsets(v: &[Record]) -> Vec<i64> {
        v.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn hands_out_a_run_from_any_offset_inside_it() {
        let f = Fresh::new(1 << 20);
        f.put((5..10).map(|o| rec(0, o, 10)).collect());
        assert_eq!(offsets(&f.take("t", 0, 7, 100).unwrap()), vec![7, 8, 9]);
        assert_eq!(offsets(&f.take("t", 0, 5, 2).unwrap()), vec![5, 6]);
        assert!(f.take("t", 0, 10, 100).unwrap().is_empty(), "caught up");
        assert!(f.take("t", 0, 4, 100).is_none(), "before the run: SQLite");
        assert!(f.take("t", 0, 11, 100).is_none(), "past the run: SQLite");
        assert!(
            f.take("t", 1, 0, 100).unwrap().is_empty(),
            "a partition this writer never wrote: nothing from here"
        );
    }

    #[test]
    fn a_gap_starts_the_run_again() {
        // Offsets 3 and 4 were written by another process: never handed out from here.
        let f = Fresh::new(1 << 20);
        f.put((0..3).map(|o| rec(0, o, 10)).collect());
        f.put(vec![rec(0, 5, 10)]);
        let seen: Vec<Option<Vec<i64>>> = [3, 1, 5]
            .iter()
            .map(|o| f.take("t", 0, *o, 100).map(|v| offsets(&v)))
            .collect();
        assert_eq!(seen, vec![None, None, Some(vec![5])]);
        assert_eq!(f.bytes(), 10, "only the new run is kept");
    }

    #[test]
    fn stays_within_its_budget_dropping_the_oldest() {
        let f = Fresh::new(1000);
        for o in 0..50 {
            f.put(vec![rec(u32::try_from(o % 2).unwrap(), o / 2, 100)]);
            assert!(f.bytes() <= 1000);
        }
        // Ten records of 100 bytes fit: the newest five of each partition.
        assert!(f.take("t", 0, 19, 100).is_none());
        assert_eq!(
            offsets(&f.take("t", 0, 20, 100).unwrap()),
            vec![20, 21, 22, 23, 24]
        );
        assert_eq!(
            offsets(&f.take("t", 1, 20, 100).unwrap()),
            vec![20, 21, 22, 23, 24]
        );
    }

    #[test]
    fn a_large_record_is_not_kept_and_its_readers_go_to_the_log() {
        let f = Fresh::new(1 << 30);
        f.put(vec![rec(0, 0, 10), rec(0, 1, LARGEST + 1), rec(0, 2, 10)]);
        assert!(f.take("t", 0, 0, 100).is_none());
        assert!(f.take("t", 0, 1, 100).is_none());
        assert_eq!(offsets(&f.take("t", 0, 2, 100).unwrap()), vec![2]);
        assert_eq!(f.bytes(), 10);
    }

    #[test]
    fn clearing_forgets_everything() {
        let f = Fresh::new(1 << 20);
        f.put((0..3).map(|o| rec(0, o, 10)).collect());
        f.clear();
        assert!(
            f.take("t", 0, 0, 100).is_none(),
            "behind the run's end: SQLite"
        );
        assert!(f.take("t", 0, 3, 100).unwrap().is_empty(), "at its end");
        assert_eq!(f.bytes(), 0);
    }
}
