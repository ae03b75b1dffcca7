//! Parking: which keys have records on the retry topic, the retry topic's records held in
//! memory per key, and how the subscription's loop hands them back to their lanes (see the
//! module documentation of [`super`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ketenbus_schemas::{AvroRecord, Outcome, RetryRecord, topics};
use tokio_util::sync::CancellationToken;

use super::{Done, Job, Loop, Prior, Report, Undeliverable};
use crate::bus::bodies::BodyStore;
use crate::bus::while_unavailable;
use crate::bus::{AckToken, Bus, BusError, Record, partition_for};
use crate::deliver::config::RetryConfig;
use crate::deliver::decode::decode_value;
use ketenbus_schemas::now_ms;

/// A record read from the retry topic and not finished.
struct Held {
    token: AckToken,
    parked: RetryRecord,
    /// Undelivered since (first failure, else when it was parked), for the oldest-age metric.
    since_ms: i64,
}

/// Parked records of one key.
#[derive(Default)]
struct KeyState {
    /// Published (or being published) to the retry topic and not read back yet.
    pending: usize,
    /// Read back from the retry topic and not finished, in offset order.
    queue: VecDeque<Held>,
    /// The head of `queue` is with a lane.
    busy: bool,
}

impl KeyState {
    fn idle(&self) -> bool {
        self.pending == 0 && self.queue.is_empty() && !self.busy
    }
}

/// Which keys have parked records; shared by the subscription's loop and its lanes.
#[derive(Default)]
pub(super) struct Parking {
    keys: HashMap<Vec<u8>, KeyState>,
}

impl Parking {
    pub(super) fn is_parked(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key)
    }

    /// One more record of `key` is on its way to the retry topic.
    pub(super) fn park(&mut self, key: &[u8]) {
        self.keys.entry(key.to_vec()).or_default().pending += 1;
    }

    fn tidy(&mut self, key: &[u8]) {
        if self.keys.get(key).is_some_and(KeyState::idle) {
            self.keys.remove(key);
        }
    }
}

pub(super) fn lock(p: &Mutex<Parking>) -> MutexGuard<'_, Parking> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Per retry partition: offsets read and not finished (with their key), and the highest
/// finished offset, to tell which held records keep the commit point behind.
#[derive(Default)]
pub(super) struct RetryPart {
    held: BTreeMap<i64, Vec<u8>>,
    highest_finished: Option<i64>,
}

/// The job for a held retry record.
fn job_of(held: &Held, bodies: Option<&BodyStore>) -> Result<Job, Undeliverable> {
    let p = &held.parked;
    let mut job = decode_value(
        bodies,
        held.token.clone(),
        p.source_topic.clone(),
        p.key.clone(),
        p.value.clone(),
    )?;
    job.prior = Some(Prior {
        attempt: u32::try_from(p.attempt).unwrap_or(0),
        first_failure_ms: p.first_failure_ms,
    });
    job.replay = p.replay_of.clone().map(|dead_letter| super::Replay {
        dead_letter,
        attempts: 0,
    });
    Ok(job)
}

/// The wait before try number `attempt + 1` (see [`RetryConfig::wait`]).
#[must_use]
pub fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    retry.wait(attempt)
}

/// Learn which keys have unfinished records on the retry topic (its tail past the retry
/// group's commit point), before any record of the source topics is read: a key parked
/// before a crash stays parked, so its later records keep their place behind.
pub(super) async fn scan_parked<B: Bus>(
    bus: &B,
    subscription: &str,
    parking: &Mutex<Parking>,
    cancel: &CancellationToken,
) -> Result<usize, BusError> {
    let topic = topics::retry(subscription);
    let group = topics::retry_group(subscription);
    let parts = while_unavailable(cancel, || bus.lag(&group, &topic)).await?;
    let mut found = 0;
    for (partition, committed, end) in parts {
        for offset in committed..end {
            if let Some(r) =
                while_unavailable(cancel, || bus.read_at(&topic, partition, offset)).await?
            {
                lock(parking).park(&r.key);
                found += 1;
            }
        }
    }
    Ok(found)
}

impl Loop {
    /// A lane's report: finished records wait for [`finish`]; a retry head that failed
    /// again stays held with its next attempt time.
    pub(super) fn report(&mut self, r: Report) {
        match r {
            Report::Done(d) => {
                if d.token.topic == self.retry_topic && d.park.is_none() {
                    let key = self
                        .retry_parts
                        .get(&d.token.partition)
                        .and_then(|p| p.held.get(&d.token.offset))
                        .cloned();
                    if let Some(key) = key {
                        let mut parking = lock(&self.parking);
                        if let Some(ks) = parking.keys.get_mut(&key)
                            && ks.queue.front().is_some_and(|h| h.token == d.token)
                        {
                            ks.queue.pop_front();
                            ks.busy = false;
                        }
                        parking.tidy(&key);
                    }
                }
                self.finished.push(*d);
            }
            Report::Again(a) => {
                let mut parking = lock(&self.parking);
                if let Some(ks) = parking.keys.get_mut(&a.key) {
                    if let Some(h) = ks.queue.front_mut().filter(|h| h.token == a.token) {
                        h.parked.attempt = i32::try_from(a.attempt).unwrap_or(i32::MAX);
                        h.parked.first_failure_ms = Some(a.first_failure_ms);
                        h.parked.next_attempt_ms = a.next_attempt_ms;
                        h.parked.reason = Some(a.reason);
                        h.parked.detail = Some(a.detail);
                    }
                    ks.busy = false;
                }
            }
        }
    }

    /// A record read from the retry topic joins its key's queue.
    pub(super) fn read_back(&mut self, record: &Record) {
        self.held += 1;
        let token = record.ack_token();
        self.retry_parts
            .entry(record.partition)
            .or_default()
            .held
            .insert(record.offset, record.key.clone());
        let mut parking = lock(&self.parking);
        let ks = parking.keys.entry(record.key.clone()).or_default();
        ks.pending = ks.pending.saturating_sub(1);
        match RetryRecord::from_avro(&record.value) {
            Ok(parked) => ks.queue.push_back(Held {
                token,
                since_ms: parked.first_failure_ms.unwrap_or(record.timestamp_ms),
                parked,
            }),
            Err(e) => {
                parking.tidy(&record.key);
                drop(parking);
                let key = String::from_utf8_lossy(&record.key).into_owned();
                let u = Undeliverable {
                    record_id: key.clone(),
                    envelope_id: key,
                    reason: "undecodable_record",
                    detail: e.to_string(),
                };
                self.finished.push(u.done(
                    token,
                    (
                        record.topic.clone(),
                        record.key.clone(),
                        record.value.clone(),
                    ),
                ));
            }
        }
    }

    /// Hand every key's head whose time has come to its lane; the earliest time a waiting
    /// head comes due.
    pub(super) fn schedule(&mut self) -> Option<i64> {
        let now = now_ms();
        let mut next: Option<i64> = None;
        let mut undecodable = Vec::new();
        let mut parking = lock(&self.parking);
        for (key, ks) in &mut parking.keys {
            if ks.busy {
                continue;
            }
            let Some(head) = ks.queue.front() else {
                continue;
            };
            let due = head.parked.next_attempt_ms;
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            match job_of(head, self.bodies.as_ref()) {
                Ok(job) => {
                    let lane = partition_for(key, u32::try_from(self.lane_txs.len()).unwrap_or(1))
                        as usize;
                    // Lanes have room for every held record; a full one is tried next round.
                    if self.lane_txs[lane].try_send(job).is_ok() {
                        ks.busy = true;
                    } else {
                        next = Some(now + 50);
                    }
                }
                Err(u) => {
                    let h = ks.queue.pop_front().expect("a head");
                    let p = h.parked;
                    undecodable.push(u.done(h.token, (p.source_topic, p.key, p.value)));
                    next = Some(now);
                }
            }
        }
        parking.keys.retain(|_, ks| !ks.idle());
        drop(parking);
        self.finished.extend(undecodable);
        next
    }

    /// Re-park every key whose held records keep a retry partition's commit point behind a
    /// finished record, when none of its records is between publish and read-back.
    pub(super) fn repark_blocking(&mut self) {
        let mut keys = HashSet::new();
        for part in self.retry_parts.values() {
            if let Some(high) = part.highest_finished {
                keys.extend(part.held.range(..high).map(|(_, k)| k.clone()));
            }
        }
        if keys.is_empty() {
            return;
        }
        let mut parking = lock(&self.parking);
        for key in keys {
            let Some(ks) = parking.keys.get_mut(&key) else {
                continue;
            };
            if ks.busy || ks.pending > 0 || ks.queue.is_empty() {
                continue;
            }
            ks.pending += ks.queue.len();
            for h in ks.queue.drain(..) {
                self.finished.push(Done {
                    token: h.token,
                    record_id: h.parked.record_id.clone(),
                    envelope_id: h.parked.envelope_id.clone(),
                    kind: "unknown",
                    attempt: 0,
                    outcome: Outcome::Retrying,
                    error: None,
                    dead_letter: None,
                    audit: Vec::new(),
                    park: Some(h.parked),
                    resolves: None,
                    origin: None,
                });
            }
        }
    }

    /// Tell the watcher (at most once a second) since when the oldest parked record of each
    /// source topic is undelivered: it counts in that topic's oldest undelivered age. And
    /// count the held records that failed, by the reason of their last attempt (read back
    /// from the retry topic, so the count is whole again after a restart).
    pub(super) fn report_parked(&mut self) {
        if self.parked_reported.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.parked_reported = Instant::now();
        let parking = lock(&self.parking);
        let mut oldest: HashMap<&str, i64> = HashMap::new();
        for h in parking.keys.values().flat_map(|ks| ks.queue.iter()) {
            let e = oldest
                .entry(h.parked.source_topic.as_str())
                .or_insert(h.since_ms);
            *e = (*e).min(h.since_ms);
        }
        crate::observe::metrics::retrying_records(
            &self.name,
            parking
                .keys
                .values()
                .flat_map(|ks| ks.queue.iter())
                .filter_map(|h| h.parked.reason.as_deref()),
        );
        for t in &self.source_topics {
            let since = oldest.get(t.as_str()).copied().unwrap_or(0);
            crate::observe::watch::parked_since(&self.name, t, since);
        }
    }

    /// After a batch is on disk and acknowledged: retry records it finished are no longer held.
    pub(super) fn finished_retry(&mut self, tokens: &[AckToken]) {
        for t in tokens {
            self.held = self.held.saturating_sub(1);
            let part = self.retry_parts.entry(t.partition).or_default();
            part.held.remove(&t.offset);
            part.highest_finished =
                Some(part.highest_finished.map_or(t.offset, |h| h.max(t.offset)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            give_up_after: Duration::from_secs(60),
        };
        for _ in 0..200 {
            let b1 = backoff(&r, 1);
            assert!(
                b1 >= Duration::from_millis(100) && b1 <= Duration::from_millis(125),
                "{b1:?}"
            );
            let b3 = backoff(&r, 3);
            assert!(
                b3 >= Duration::from_millis(400) && b3 <= Duration::from_millis(500),
                "{b3:?}"
            );
            let b40 = backoff(&r, 40);
            assert_eq!(b40, Duration::from_secs(1), "capped at max");
        }
    }

    /// The first retry never comes before `initial`, whatever the jitter draws, also when
    /// `max` equals `initial`.
    #[test]
    fn the_first_retry_never_comes_before_initial() {
        for (initial, max) in [(500, 300_000), (500, 500), (1, 2), (7, 9)] {
            let r = RetryConfig {
                initial: Duration::from_millis(initial),
                max: Duration::from_millis(max),
                give_up_after: Duration::from_secs(60),
            };
            for attempt in 0..4 {
                for _ in 0..500 {
                    let b = backoff(&r, attempt);
                    assert!(b >= r.initial, "attempt {attempt}: {b:?} < {:?}", r.initial);
                    assert!(b <= r.max, "attempt {attempt}: {b:?} > {:?}", r.max);
                }
            }
        }
    }
}
