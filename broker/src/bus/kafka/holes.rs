//! Holes in what a fetch returns, read again before they are believed.
//!
//! tansu 0.6 (the Kafka-protocol broker of the tests) raises a partition's high watermark
//! before it writes the record batch it reserved the offset for. A fetch that comes in
//! between, when another producer's later batch is already written, returns that later
//! batch: the consumer moves past a record that is on the partition a moment later and never
//! sees it. (Shown with Python's confluent-kafka alone: six producers on one partition and
//! a consumer tailing it; a second consumer reading the partition afterwards finds offsets
//! the first one never got.) On Kafka itself a hole is a record the cluster removed on
//! purpose: compacted away, or a transaction marker.
//!
//! So a consumer takes a record that follows a hole only after reading the partition again
//! from the hole's start: a record that was late turns up there; a hole that stays empty for
//! [`RECHECK`] is one the cluster made, and the records after it are taken. Only holes before
//! fresh records (younger than [`FRESH`]) are read again: the race happens at the head of a
//! partition, and compaction leaves holes in older records, which a consumer catching up then
//! reads without delay.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a hole in fresh records is read again before it is taken for one the cluster
/// made (compaction, a transaction marker). A late batch in tansu is written within
/// milliseconds.
pub(super) const RECHECK: Duration = Duration::from_millis(500);

/// Records younger than this (by their timestamp) are fresh: a hole before one is read again.
pub(super) const FRESH: Duration = Duration::from_secs(60);

/// What to do with a record just fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Hand it out.
    Take,
    /// Drop it and read the partition again from this offset (the hole's start).
    ReadFrom(i64),
}

/// Per partition: the next offset expected and the hole being checked.
#[derive(Debug, Default)]
pub(super) struct Holes {
    parts: HashMap<(String, u32), Part>,
}

#[derive(Debug)]
struct Part {
    /// One past the last offset handed out.
    next: i64,
    /// The hole at `next` being read again: since when, and whether it has been read again
    /// for [`RECHECK`] (then the next record after it is taken).
    hole: Option<(Instant, bool)>,
}

impl Holes {
    /// Judge the record at `offset` of `topic`/`partition`, stamped `timestamp_ms`, fetched
    /// at `now_ms` (epoch ms) / `now`.
    pub(super) fn check(
        &mut self,
        topic: &str,
        partition: u32,
        offset: i64,
        timestamp_ms: i64,
        now_ms: i64,
        now: Instant,
    ) -> Verdict {
        let key = (topic.to_owned(), partition);
        let Some(part) = self.parts.get_mut(&key) else {
            // The first record since the partition was assigned: nothing to compare with.
            self.parts.insert(
                key,
                Part {
                    next: offset + 1,
                    hole: None,
                },
            );
            return Verdict::Take;
        };
        // In order, or an earlier record again (read again after a hole): take it.
        if offset <= part.next {
            part.next = offset + 1;
            part.hole = None;
            return Verdict::Take;
        }
        let fresh = now_ms.saturating_sub(timestamp_ms)
            < i64::try_from(FRESH.as_millis()).unwrap_or(i64::MAX);
        match part.hole {
            _ if !fresh => {}
            None => {
                part.hole = Some((now, false));
                return Verdict::ReadFrom(part.next);
            }
            Some((_, true)) => {
                tracing::warn!(
                    topic,
                    partition,
                    from = part.next,
                    to = offset - 1,
                    "kafka offsets absent after reading them again; taken as removed by the cluster (compaction, transaction markers)"
                );
            }
            Some((since, false)) => {
                if now.duration_since(since) >= RECHECK {
                    // Once more from the hole: what follows it is then taken in order.
                    part.hole = Some((since, true));
                }
                return Verdict::ReadFrom(part.next);
            }
        }
        part.next = offset + 1;
        part.hole = None;
        Verdict::Take
    }

    /// Expect `next` as the first offset of `topic`/`partition` (a reader told where to
    /// start): a hole right at the start is read again like any other.
    pub(super) fn expect(&mut self, topic: &str, partition: u32, next: i64) {
        self.parts
            .insert((topic.to_owned(), partition), Part { next, hole: None });
    }

    /// Forget a partition (revoked in a rebalance): its next owner starts without expectations.
    pub(super) fn forget(&mut self, topic: &str, partition: u32) {
        self.parts.remove(&(topic.to_owned(), partition));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{FRESH, Holes, RECHECK, Verdict};

    const NOW: i64 = 1_764_000_000_000;

    #[test]
    fn records_in_order_are_taken() {
        let mut h = Holes::default();
        let t = Instant::now();
        for o in 5..10 {
            assert_eq!(h.check("t", 0, o, NOW, NOW, t), Verdict::Take);
        }
    }

    /// The tansu race: offset 7 is written after 8 was fetched. The consumer reads again
    /// from 7 and gets 7, then 8: nothing is skipped.
    #[test]
    fn a_late_record_is_read_again_and_taken_in_order() {
        let mut h = Holes::default();
        let t = Instant::now();
        assert_eq!(h.check("t", 0, 6, NOW, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 0, 8, NOW, NOW, t), Verdict::ReadFrom(7));
        // A stale record fetched before the seek: dropped again.
        assert_eq!(h.check("t", 0, 9, NOW, NOW, t), Verdict::ReadFrom(7));
        assert_eq!(h.check("t", 0, 7, NOW, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 0, 8, NOW, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 0, 9, NOW, NOW, t), Verdict::Take);
    }

    /// A hole that stays (a compacted record) holds the partition back for [`RECHECK`], then
    /// the reading goes on from it once more and takes what follows.
    #[test]
    fn a_lasting_hole_is_taken_after_the_recheck() {
        let mut h = Holes::default();
        let t = Instant::now();
        assert_eq!(h.check("t", 0, 6, NOW, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 0, 9, NOW, NOW, t), Verdict::ReadFrom(7));
        let later = t + RECHECK / 2;
        assert_eq!(h.check("t", 0, 9, NOW, NOW, later), Verdict::ReadFrom(7));
        let after = t + RECHECK;
        assert_eq!(h.check("t", 0, 9, NOW, NOW, after), Verdict::ReadFrom(7));
        assert_eq!(h.check("t", 0, 9, NOW, NOW, after), Verdict::Take);
        assert_eq!(h.check("t", 0, 10, NOW, NOW, after), Verdict::Take);
        // The next hole is checked again from the start.
        assert_eq!(h.check("t", 0, 12, NOW, NOW, after), Verdict::ReadFrom(11));
    }

    /// Old records (a consumer catching up on a compacted partition) are read without delay.
    #[test]
    fn holes_in_old_records_are_taken_at_once() {
        let mut h = Holes::default();
        let t = Instant::now();
        let old = NOW - i64::try_from(FRESH.as_millis()).unwrap() - 1;
        assert_eq!(h.check("t", 0, 6, old, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 0, 9, old, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 0, 10, old, NOW, t), Verdict::Take);
    }

    /// A reader that starts at offset 7 (where its index left off) and whose first fetch
    /// returns 8: 7 is read again, not skipped.
    #[test]
    fn a_hole_at_a_readers_start_is_read_again() {
        let mut h = Holes::default();
        let t = Instant::now();
        h.expect("t", 0, 7);
        assert_eq!(h.check("t", 0, 8, NOW, NOW, t), Verdict::ReadFrom(7));
        assert_eq!(h.check("t", 0, 7, NOW, NOW, t), Verdict::Take);
    }

    #[test]
    fn partitions_and_reassignments_start_afresh() {
        let mut h = Holes::default();
        let t = Instant::now();
        assert_eq!(h.check("t", 0, 6, NOW, NOW, t), Verdict::Take);
        assert_eq!(h.check("t", 1, 40, NOW, NOW, t), Verdict::Take);
        assert_eq!(h.check("u", 0, 2, NOW, NOW, t), Verdict::Take);
        h.forget("t", 0);
        // After a rebalance the partition may resume anywhere (its committed offset).
        assert_eq!(
            h.check("t", 0, 100, NOW, NOW, t + Duration::from_secs(1)),
            Verdict::Take
        );
    }
}
