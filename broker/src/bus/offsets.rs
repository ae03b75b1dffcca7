//! Tracks finished records per partition and yields the contiguous finished prefix: the
//! offset a consumer group may commit without skipping an unfinished record.

use std::collections::{BTreeSet, HashMap};

/// Per (topic, partition): records handed out but not finished, and the commit point.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<(String, u32), Part>,
}

#[derive(Debug, Default)]
struct Part {
    /// Offsets handed out and not yet finished.
    in_flight: BTreeSet<i64>,
    /// Highest offset handed out.
    highest: Option<i64>,
    /// Next offset to commit (one past the finished prefix), when it moved since the last take.
    dirty: bool,
}

impl OffsetTracker {
    /// A record at `offset` was handed out.
    pub fn started(&mut self, topic: &str, partition: u32, offset: i64) {
        let p = self.parts.entry((topic.to_owned(), partition)).or_default();
        p.in_flight.insert(offset);
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// The record at `offset` is finished.
    pub fn finished(&mut self, topic: &str, partition: u32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&(topic.to_owned(), partition)) {
            p.in_flight.remove(&offset);
            p.dirty = true;
        }
    }

    /// The commit point of a partition: the offset of the first unfinished record, or one past
    /// the highest handed out when all are finished. `None` when nothing was handed out.
    #[must_use]
    pub fn commit_point(&self, topic: &str, partition: u32) -> Option<i64> {
        let p = self.parts.get(&(topic.to_owned(), partition))?;
        Some(match p.in_flight.first() {
            Some(first) => *first,
            None => p.highest? + 1,
        })
    }

    /// Commit points that moved since the last call: (topic, partition, next offset).
    pub fn take_dirty(&mut self) -> Vec<(String, u32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), p) in &mut self.parts {
            if p.dirty {
                p.dirty = false;
                let point = match p.in_flight.first() {
                    Some(first) => *first,
                    None => p.highest.map_or(0, |h| h + 1),
                };
                out.push((topic.clone(), *partition, point));
            }
        }
        out
    }

    /// Whether a commit point moved since the last [`take_dirty`](Self::take_dirty).
    #[must_use]
    pub fn has_dirty(&self) -> bool {
        self.parts.values().any(|p| p.dirty)
    }

    /// Forget a partition (revoked in a rebalance).
    pub fn forget(&mut self, topic: &str, partition: u32) {
        self.parts.remove(&(topic.to_owned(), partition));
    }

    /// Records handed out and not finished, over all partitions.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_finished_prefix() {
        let mut t = OffsetTracker::default();
        for o in 0..5 {
            t.started("t", 0, o);
        }
        t.finished("t", 0, 0);
        t.finished("t", 0, 2);
        t.finished("t", 0, 3);
        assert_eq!(t.commit_point("t", 0), Some(1), "offset 1 is unfinished");
        assert_eq!(t.take_dirty(), vec![("t".to_owned(), 0, 1)]);
        assert!(t.take_dirty().is_empty());
        t.finished("t", 0, 1);
        assert_eq!(t.commit_point("t", 0), Some(4));
        t.finished("t", 0, 4);
        assert_eq!(t.take_dirty(), vec![("t".to_owned(), 0, 5)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.started("t", 0, 10);
        t.started("t", 1, 3);
        t.finished("t", 1, 3);
        assert_eq!(t.commit_point("t", 0), Some(10));
        assert_eq!(t.commit_point("t", 1), Some(4));
        assert_eq!(t.commit_point("u", 0), None);
    }
}
