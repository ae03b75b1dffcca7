//! What a subscription's loop has read from its source topics and not finished, by count
//! and by bytes: the loop reads on only while both are under their bounds, so the records
//! held in lanes, queues and sinks at once stay at most [`IN_FLIGHT_BYTES`] plus one record
//! (a single record larger than the bound still goes, alone).

use std::collections::HashMap;

use crate::bus::AckToken;

/// Most bytes of records (values, and bodies kept in files) a subscription holds at once.
/// With a batch webhook of 400 lanes the count alone would let 12,800 records in.
pub(super) const IN_FLIGHT_BYTES: usize = 16 * 1024 * 1024;

/// The records a subscription holds, each with its weight.
#[derive(Default)]
pub(super) struct InFlight {
    weights: HashMap<AckToken, usize>,
    bytes: usize,
}

impl InFlight {
    /// Whether another record may be read: fewer than `cap` held and the bytes under
    /// [`IN_FLIGHT_BYTES`] (with nothing held, always).
    pub(super) fn room(&self, cap: usize) -> bool {
        self.weights.is_empty() || (self.weights.len() < cap && self.bytes < IN_FLIGHT_BYTES)
    }

    /// A record read, of `weight` bytes.
    pub(super) fn started(&mut self, token: AckToken, weight: usize) {
        if let Some(old) = self.weights.insert(token, weight) {
            self.bytes -= old;
        }
        self.bytes += weight;
    }

    /// A record finished (its outcome is being written).
    pub(super) fn finished(&mut self, token: &AckToken) {
        if let Some(w) = self.weights.remove(token) {
            self.bytes -= w;
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(offset: i64) -> AckToken {
        AckToken {
            topic: "ketenbus.raw".into(),
            partition: 0,
            offset,
        }
    }

    /// Reads while there is room, as the loop does, and returns how many it took.
    fn fill(f: &mut InFlight, cap: usize, weight: usize, from: i64) -> i64 {
        let mut n = 0;
        while f.room(cap) && n < 100_000 {
            f.started(token(from + n), weight);
            n += 1;
        }
        n
    }

    #[test]
    fn large_records_are_held_one_bound_at_a_time_and_a_huge_one_alone() {
        let mut f = InFlight::default();
        // 25 MiB messages: one at a time, never two at once.
        assert_eq!(fill(&mut f, 12_800, 25 << 20, 0), 1);
        f.finished(&token(0));
        assert_eq!(f.bytes(), 0);
        assert_eq!(
            fill(&mut f, 12_800, 25 << 20, 1),
            1,
            "and the next after it"
        );
        f.finished(&token(1));
        // 1 MiB records: the bound plus one record at most.
        let n = fill(&mut f, 12_800, 1 << 20, 10);
        assert_eq!(n, 16);
        assert!(f.bytes() <= IN_FLIGHT_BYTES + (1 << 20));
        // A record finished twice, or one never read, changes nothing.
        f.finished(&token(10));
        f.finished(&token(10));
        f.finished(&token(999));
        assert_eq!(f.bytes(), 15 << 20);
        assert_eq!(fill(&mut f, 12_800, 1 << 20, 100), 1);
    }

    #[test]
    fn small_records_are_bounded_by_count_and_a_batch_webhooks_lanes_by_bytes() {
        let mut f = InFlight::default();
        // 2 KB records behind 16 lanes (cap 512): the count decides.
        assert_eq!(fill(&mut f, 512, 4_500, 0), 512);
        let mut f = InFlight::default();
        // Behind a batch webhook's 400 lanes (cap 12,800): the bytes decide.
        let n = fill(&mut f, 12_800, 4_500, 0);
        assert!(n < 12_800 && f.bytes() <= IN_FLIGHT_BYTES + 4_500, "{n}");
        assert!(n >= 3_000, "still room for every lane many times over: {n}");
    }
}
