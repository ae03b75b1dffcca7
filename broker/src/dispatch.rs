//! Dispatch: one task per subscription, with its own consumer group, retries and dead
//! letters, so one subscriber never slows another. Records are spread over lanes by key
//! (the patient key), each lane delivering in order, so one patient's events arrive in
//! order while other patients' go ahead. A finished record's outcome (and its dead letter)
//! is published before its offset may be committed.
//!
//! # Parking: one failing record never holds up other patients
//!
//! A lane tries a record once. When that attempt fails and may be retried, the record is
//! *parked*: published whole to the subscription's retry topic `ketenbus.retry.<name>`
//! (key = the record key, so one patient's parked records share one partition, in order),
//! with its attempt count, first-failure time and next-attempt time ([`RetryRecord`]). Only
//! once that is durable is the record acknowledged on its source topic, so the source's
//! commit point moves on and the lane is free at once. While a key has records parked
//! (published and not yet read back, or read back and not finished), every later record of
//! that key is parked behind them untried, in order; records of other keys are delivered
//! as usual.
//!
//! The retry topic is read by a second consumer group, `ketenbus.sub.<name>.retry`. What it
//! reads is held in memory per key in offset order; a key's head goes to the key's lane when
//! its next-attempt time has come. Delivered, dead-lettered (reason `exhausted` once
//! `give_up_after` has passed since its first failure) or withheld, the head's outcome is
//! published and only then its retry offset acknowledged; when the head fails again it stays
//! held with the next attempt time. A held record that keeps the retry partition's commit
//! point behind a finished one is *re-parked*: its key's whole queue is published again at
//! the tail, in order, and the old copies acknowledged, so a restart re-delivers nothing
//! that was finished. A key is re-parked only when none of its records is between publish
//! and read-back, so its order holds.
//!
//! Crash points: parked but not yet acknowledged on the source, the record is read again
//! after a restart and parked again behind its first copy (a duplicate with the same id,
//! never a loss, never out of order). Before reading anything at start, the subscription
//! reads the unfinished tail of its retry topic, so every key with parked records is known
//! to be parked before its later records are read from the source.
//!
//! All of this uses the `Bus` contract only, so both engines behave alike.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ketenbus_connectors::{Delivery, DeliveryError, Payload, Sink};
use ketenbus_schemas::{
    AvroRecord, DeadLetter, DeliveryOutcome, Event, EventKind, Outcome, RawEnvelope, RetryRecord,
    topics,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{AckToken, Bus, BusError, Consumer, OutRecord, Record, embedded::partition_for};
use crate::config::{FilterConfig, RetryConfig, Source, Subscription};
use crate::health::{Health, State};
use crate::lineage::{Lineage, Step};
use crate::telemetry;
use crate::{now_ms, publish_retrying, while_unavailable};

/// Consumer group of a subscription.
#[must_use]
pub fn group(subscription: &str) -> String {
    format!("ketenbus.sub.{subscription}")
}

/// Consumer group that reads a subscription's retry topic.
#[must_use]
pub fn retry_group(subscription: &str) -> String {
    format!("ketenbus.sub.{subscription}.retry")
}

/// The topics a subscription reads.
#[must_use]
pub fn source_topics(sub: &Subscription) -> Vec<String> {
    let mut t: Vec<String> = sub
        .sources
        .iter()
        .map(|s| match s {
            Source::Raw => topics::RAW.to_owned(),
            Source::Events(kind) => topics::events(*kind),
        })
        .collect();
    t.push(topics::replay(&sub.name));
    t
}

/// What earlier attempts of a record left (records read from the retry topic).
#[derive(Clone, Copy)]
struct Prior {
    attempt: u32,
    first_failure_ms: Option<i64>,
}

/// A record decoded for delivery.
struct Job {
    token: AckToken,
    record_id: String,
    envelope_id: String,
    kind: &'static str,
    payload: Payload,
    /// Where the original record lives, kept for a dead letter.
    source_topic: String,
    key: Vec<u8>,
    value: Vec<u8>,
    /// Set when the job comes from the retry topic.
    prior: Option<Prior>,
}

/// A finished record.
struct Done {
    token: AckToken,
    record_id: String,
    envelope_id: String,
    kind: &'static str,
    attempt: u32,
    outcome: Outcome,
    error: Option<DeliveryError>,
    dead_letter: Option<(String, Vec<u8>, Vec<u8>)>,
    /// The audit records to append before the ack (deliveries and withheld deliveries).
    audit: Vec<crate::audit::Entry>,
    /// Not finished but parked: published to the retry topic before the ack, no outcome.
    park: Option<RetryRecord>,
}

/// A held retry record that failed again: it stays held until `next_attempt_ms`.
struct Again {
    token: AckToken,
    key: Vec<u8>,
    attempt: u32,
    first_failure_ms: i64,
    next_attempt_ms: i64,
    reason: String,
    detail: String,
}

/// What a lane reports back.
enum Report {
    Done(Box<Done>),
    Again(Again),
}

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
struct Parking {
    keys: HashMap<Vec<u8>, KeyState>,
}

impl Parking {
    fn is_parked(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key)
    }

    /// One more record of `key` is on its way to the retry topic.
    fn park(&mut self, key: &[u8]) {
        self.keys.entry(key.to_vec()).or_default().pending += 1;
    }

    fn tidy(&mut self, key: &[u8]) {
        if self.keys.get(key).is_some_and(KeyState::idle) {
            self.keys.remove(key);
        }
    }
}

fn lock(p: &Mutex<Parking>) -> MutexGuard<'_, Parking> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Per retry partition: offsets read and not finished (with their key), and the highest
/// finished offset, to tell which held records keep the commit point behind.
#[derive(Default)]
struct RetryPart {
    held: BTreeMap<i64, Vec<u8>>,
    highest_finished: Option<i64>,
}

/// What a subscription checks and records around each delivery: consent before, the
/// audit trail after.
#[derive(Default, Clone)]
pub struct Hooks {
    /// Deliver only what consent allows.
    pub consent: Option<Arc<crate::consent::ConsentCheck>>,
    /// Append an audit record per delivery; acked only once it is on disk.
    pub audit: Option<crate::audit::Audit>,
    /// The sink sends each record to its receiver (address book), or the subscription takes
    /// only records for the receivers it names: the audit names the record's receiver as
    /// the party that got it.
    pub receiver_is_party: bool,
    /// For a subscription of raw messages: finds the patients (and receiver) a message
    /// declares, so its audit records name them.
    pub raw_patients: Option<Arc<crate::keys::RawPatients>>,
}

impl Hooks {
    /// The patients (and receiver) a raw message declares, read once for its consent check
    /// and its audit records; nothing for an event or without a reader.
    async fn raw_declared(&self, payload: &Payload) -> crate::keys::Declared {
        match (payload, &self.raw_patients) {
            (Payload::Raw(env), Some(raw)) if self.consent.is_some() || self.audit.is_some() => {
                // Normalising is parsing: off the async workers.
                let (raw, env) = (Arc::clone(raw), Arc::clone(env));
                tokio::task::spawn_blocking(move || raw.declared(&env))
                    .await
                    .unwrap_or_default()
            }
            _ => crate::keys::Declared::default(),
        }
    }

    /// The audit records of one delivery (or withheld delivery): one per patient the record
    /// concerns (a raw message may declare several), none without an audit trail.
    async fn audit_entries(
        &self,
        subscription: &str,
        action: &str,
        job: &Job,
        raw: &crate::keys::Declared,
    ) -> Vec<crate::audit::Entry> {
        if self.audit.is_none() {
            return Vec::new();
        }
        let (patients, event_id, receiver) = match &job.payload {
            Payload::Event(e) => (
                e.header().patient_key.clone().into_iter().collect(),
                Some(job.record_id.clone()),
                e.header().receiver.clone(),
            ),
            Payload::Raw(env) => (
                raw.patients.clone(),
                None,
                env.receiver.clone().or(raw.receiver.clone()),
            ),
        };
        let party = self
            .consent
            .as_ref()
            .and_then(|c| c.policy.party.clone())
            .or(receiver.filter(|_| self.receiver_is_party));
        let entry = |patient: Option<String>| crate::audit::Entry {
            action: action.to_owned(),
            actor: format!("subscription:{subscription}"),
            party: party.clone(),
            patient,
            event_id: event_id.clone(),
            envelope_id: Some(job.envelope_id.clone()),
            purpose: self.consent.as_ref().map(|c| c.policy.purpose.clone()),
        };
        if patients.is_empty() {
            vec![entry(None)]
        } else {
            patients.into_iter().map(|p| entry(Some(p))).collect()
        }
    }
}

/// Why a record could not even be turned into a delivery.
struct Undeliverable {
    record_id: String,
    envelope_id: String,
    reason: &'static str,
    detail: String,
}

impl Undeliverable {
    /// Its dead letter, finished like any other.
    fn done(self, token: AckToken, source: (String, Vec<u8>, Vec<u8>)) -> Done {
        Done {
            token,
            record_id: self.record_id,
            envelope_id: self.envelope_id,
            kind: "unknown",
            attempt: 0,
            outcome: Outcome::DeadLettered,
            error: Some(DeliveryError::Rejected {
                reason: self.reason.into(),
                detail: self.detail,
            }),
            dead_letter: Some(source),
            audit: Vec::new(),
            park: None,
        }
    }
}

fn decode(record: &Record, subscription: &str) -> Result<Job, Undeliverable> {
    // Replayed dead letters carry the original record and its topic.
    if record.topic == topics::replay(subscription) {
        let dl = DeadLetter::from_avro(&record.value).map_err(|e| Undeliverable {
            record_id: String::from_utf8_lossy(&record.key).into_owned(),
            envelope_id: String::from_utf8_lossy(&record.key).into_owned(),
            reason: "undecodable_replay",
            detail: e.to_string(),
        })?;
        return decode_value(record.ack_token(), dl.source_topic, dl.key, dl.value);
    }
    decode_value(
        record.ack_token(),
        record.topic.clone(),
        record.key.clone(),
        record.value.clone(),
    )
}

fn decode_value(
    token: AckToken,
    topic: String,
    key: Vec<u8>,
    value: Vec<u8>,
) -> Result<Job, Undeliverable> {
    let undecodable = |e: &dyn std::fmt::Display| Undeliverable {
        record_id: String::from_utf8_lossy(&key).into_owned(),
        envelope_id: String::from_utf8_lossy(&key).into_owned(),
        reason: "undecodable_record",
        detail: e.to_string(),
    };
    let (record_id, envelope_id, kind, payload) = if topic == topics::RAW {
        let env = RawEnvelope::from_avro(&value).map_err(|e| undecodable(&e))?;
        (
            env.id.clone(),
            env.id.clone(),
            "raw",
            Payload::Raw(Arc::new(env)),
        )
    } else {
        let kind = topic
            .strip_prefix("ketenbus.events.")
            .and_then(EventKind::parse)
            .ok_or_else(|| undecodable(&format!("no event kind for topic {topic}")))?;
        let event = Event::from_avro(kind, &value).map_err(|e| undecodable(&e))?;
        let h = event.header();
        (
            h.id.clone(),
            h.envelope_id.clone(),
            kind.as_str(),
            Payload::Event(Arc::new(event)),
        )
    };
    Ok(Job {
        token,
        record_id,
        envelope_id,
        kind,
        payload,
        source_topic: topic,
        key,
        value,
        prior: None,
    })
}

/// The job for a held retry record.
fn job_of(held: &Held) -> Result<Job, Undeliverable> {
    let p = &held.parked;
    let mut job = decode_value(
        held.token.clone(),
        p.source_topic.clone(),
        p.key.clone(),
        p.value.clone(),
    )?;
    job.prior = Some(Prior {
        attempt: u32::try_from(p.attempt).unwrap_or(0),
        first_failure_ms: p.first_failure_ms,
    });
    Ok(job)
}

fn passes(filter: &FilterConfig, payload: &Payload) -> bool {
    // A raw message is for every receiver its transport names (each mail recipient).
    let (sender, receivers) = match payload {
        Payload::Event(e) => (
            e.header().sender.as_deref(),
            e.header().receiver.iter().cloned().collect(),
        ),
        Payload::Raw(env) => (
            env.sender.as_deref(),
            ketenbus_connectors::party::transport_receivers(env),
        ),
    };
    let sender_ok =
        filter.senders.is_empty() || sender.is_some_and(|v| filter.senders.iter().any(|x| x == v));
    let receiver_ok =
        filter.receivers.is_empty() || receivers.iter().any(|r| filter.receivers.contains(r));
    sender_ok && receiver_ok
}

/// The wait before try number `attempt + 1`: exponential from `initial`, capped at `max`,
/// with jitter in [50%, 100%] so retries of many records spread out.
#[must_use]
pub fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    let exp = retry.initial.saturating_mul(
        1u32.checked_shl(attempt.saturating_sub(1).min(30))
            .unwrap_or(u32::MAX),
    );
    let capped = exp.min(retry.max);
    capped.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Learn which keys have unfinished records on the retry topic (its tail past the retry
/// group's commit point), before any record of the source topics is read: a key parked
/// before a crash stays parked, so its later records keep their place behind.
async fn scan_parked<B: Bus>(
    bus: &B,
    subscription: &str,
    parking: &Mutex<Parking>,
    cancel: &CancellationToken,
) -> Result<usize, BusError> {
    let topic = topics::retry(subscription);
    let group = retry_group(subscription);
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

/// Run one subscription until `cancel`, without consent checks or audit trail.
pub async fn run<B: Bus>(
    bus: Arc<B>,
    sub: Subscription,
    sink: Arc<dyn Sink>,
    lineage: Lineage,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    run_with(bus, sub, sink, lineage, health, cancel, Hooks::default()).await;
}

/// The state of one subscription's loop besides its consumers.
struct Loop {
    name: String,
    source_topics: Vec<String>,
    retry_topic: String,
    /// When parked records' age was last told to the watcher.
    parked_reported: Instant,
    parking: Arc<Mutex<Parking>>,
    lane_txs: Vec<mpsc::Sender<Job>>,
    /// Records read from the source topics and not finished.
    in_flight: usize,
    /// Records read from the retry topic and not finished.
    held: usize,
    retry_parts: HashMap<u32, RetryPart>,
    finished: Vec<Done>,
}

impl Loop {
    fn lane_of(&self, key: &[u8]) -> usize {
        partition_for(key, u32::try_from(self.lane_txs.len()).unwrap_or(1)) as usize
    }

    /// A lane's report: finished records wait for [`finish`]; a retry head that failed
    /// again stays held with its next attempt time.
    fn report(&mut self, r: Report) {
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
    fn read_back(&mut self, record: &Record) {
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
    fn schedule(&mut self) -> Option<i64> {
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
            match job_of(head) {
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
    fn repark_blocking(&mut self) {
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
                });
            }
        }
    }

    /// Tell the watcher (at most once a second) since when the oldest parked record of each
    /// source topic is undelivered: it counts in that topic's oldest undelivered age.
    fn report_parked(&mut self) {
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
        for t in &self.source_topics {
            let since = oldest.get(t.as_str()).copied().unwrap_or(0);
            telemetry::parked_since(&self.name, t, since);
        }
    }

    /// After a batch is on disk and acknowledged: retry records it finished are no longer held.
    fn finished_retry(&mut self, tokens: &[AckToken]) {
        for t in tokens {
            self.held = self.held.saturating_sub(1);
            let part = self.retry_parts.entry(t.partition).or_default();
            part.held.remove(&t.offset);
            part.highest_finished =
                Some(part.highest_finished.map_or(t.offset, |h| h.max(t.offset)));
        }
    }
}

/// Run one subscription until `cancel`, with consent checks and audit trail from `hooks`.
pub async fn run_with<B: Bus>(
    bus: Arc<B>,
    sub: Subscription,
    sink: Arc<dyn Sink>,
    lineage: Lineage,
    health: Arc<Health>,
    cancel: CancellationToken,
    hooks: Hooks,
) {
    let hooks = Arc::new(hooks);
    let component = format!("subscription {}", sub.name);
    health.set(&component, State::Starting);
    let parking = Arc::new(Mutex::new(Parking::default()));
    // Parked keys first, then the source topics: see the module documentation.
    let started = async {
        let found = scan_parked(bus.as_ref(), &sub.name, &parking, &cancel).await?;
        if found > 0 {
            tracing::info!(subscription = %sub.name, parked = found, "records waiting on the retry topic");
        }
        let consumer = bus
            .subscribe(&group(&sub.name), &source_topics(&sub))
            .await?;
        let retry = bus
            .subscribe(&retry_group(&sub.name), &[topics::retry(&sub.name)])
            .await?;
        Ok::<_, BusError>((consumer, retry))
    };
    let (mut consumer, mut retry_consumer) = match started.await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(subscription = %sub.name, error = %e, "cannot subscribe");
            health.set(&component, State::Failed(e.to_string()));
            return;
        }
    };
    health.set(&component, State::Ready);
    let name: Arc<str> = Arc::from(sub.name.as_str());
    let lanes = sub.concurrency;
    let cap = lanes * 32;
    // At most `cap` source records and `retry_cap` held retry records are in the lanes or
    // their reports at any time, so lanes and the report channel have room for all of them:
    // nobody waits on a full channel.
    let retry_cap = cap * 8;
    let (done_tx, mut done_rx) = mpsc::channel::<Report>(cap + retry_cap + lanes);
    let mut lane_txs = Vec::with_capacity(lanes);
    let mut lane_tasks = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel::<Job>(cap + retry_cap);
        lane_txs.push(tx);
        lane_tasks.spawn(lane(
            rx,
            Lane {
                sink: Arc::clone(&sink),
                subscription: Arc::clone(&name),
                retry: sub.retry.clone(),
                done: done_tx.clone(),
                lineage: lineage.clone(),
                cancel: cancel.clone(),
                hooks: Arc::clone(&hooks),
                parking: Arc::clone(&parking),
            },
        ));
    }
    let mut st = Loop {
        name: sub.name.clone(),
        source_topics: source_topics(&sub),
        parked_reported: Instant::now(),
        retry_topic: topics::retry(&name),
        parking,
        lane_txs,
        in_flight: 0,
        held: 0,
        retry_parts: HashMap::new(),
        finished: Vec::new(),
    };
    let mut tracked = telemetry::InFlight::new(&sub.name);
    // Acknowledged since the last commit: committed when the subscription is idle.
    let mut uncommitted = false;
    while !cancel.is_cancelled() {
        while let Ok(r) = done_rx.try_recv() {
            st.report(r);
        }
        let wake = st.schedule();
        st.repark_blocking();
        st.report_parked();
        if !st.finished.is_empty() {
            let batch = std::mem::take(&mut st.finished);
            let retried: Vec<AckToken> = batch
                .iter()
                .filter(|d| d.token.topic == st.retry_topic)
                .map(|d| d.token.clone())
                .collect();
            st.in_flight -= batch.len() - retried.len();
            tracked.finished(batch.iter().map(|d| &d.token));
            let consumers = Consumers {
                main: &mut consumer,
                retry: &mut retry_consumer,
                retry_topic: &st.retry_topic,
            };
            if let Err(e) = finish(
                bus.as_ref(),
                consumers,
                &name,
                batch,
                &lineage,
                &cancel,
                hooks.audit.as_ref(),
            )
            .await
            {
                tracing::error!(subscription = %name, error = %e, "subscription stopped");
                health.set(&component, State::Failed(e.to_string()));
                return;
            }
            st.finished_retry(&retried);
            uncommitted = true;
            continue;
        }
        let sleep = wake.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))
        });
        // Wait for whichever comes first: a lane's report, a parked record's time, or (with
        // room) a new record from the source topics or the retry topic.
        let (polled, from_retry) = tokio::select! {
            () = cancel.cancelled() => break,
            r = done_rx.recv() => {
                if let Some(r) = r {
                    st.report(r);
                }
                continue;
            }
            Some(ended) = lane_tasks.join_next(), if !cancel.is_cancelled() => {
                if cancel.is_cancelled() {
                    break; // lanes stop on cancel
                }
                // A lane ends before cancel only by a panic: this subscription ends with it.
                tracing::error!(subscription = %name, "a delivery lane stopped; the subscription stops");
                health.set(&component, State::Failed("a delivery lane stopped".into()));
                match ended {
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    _ => return,
                }
            }
            () = tokio::time::sleep(sleep) => continue,
            r = consumer.poll(Duration::from_millis(500)), if st.in_flight < cap => (r, false),
            r = retry_consumer.poll(Duration::from_millis(500)), if st.held < retry_cap => (r, true),
        };
        let record = match polled {
            Ok(Some(r)) => r,
            Ok(None) => {
                if uncommitted {
                    uncommitted = false;
                    let committed = async {
                        consumer.commit().await?;
                        retry_consumer.commit().await
                    };
                    if let Err(e) = committed.await {
                        tracing::warn!(subscription = %name, error = %e, "commit failed, trying again later");
                        uncommitted = true;
                    }
                }
                continue;
            }
            Err(e) if e.kind() == ketenbus_connectors::ErrorKind::Retryable => {
                tracing::warn!(subscription = %name, error = %e, "waiting for the log");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => {
                tracing::error!(subscription = %name, error = %e, "subscription stopped");
                health.set(&component, State::Failed(e.to_string()));
                return;
            }
        };
        tracked.started(&record);
        if from_retry {
            st.read_back(&record);
            continue;
        }
        st.in_flight += 1;
        match decode(&record, &name) {
            Err(u) => {
                let source = (
                    record.topic.clone(),
                    record.key.clone(),
                    record.value.clone(),
                );
                st.finished.push(u.done(record.ack_token(), source));
            }
            Ok(job) if !passes(&sub.filter, &job.payload) => {
                st.finished.push(Done {
                    token: job.token,
                    record_id: job.record_id,
                    envelope_id: job.envelope_id,
                    kind: job.kind,
                    attempt: 0,
                    outcome: Outcome::Filtered,
                    error: None,
                    dead_letter: None,
                    audit: Vec::new(),
                    park: None,
                });
            }
            Ok(job) => {
                // Also a record of a parked key goes to its lane: the lane parks it behind,
                // after whatever of that key it has in hand.
                let lane = st.lane_of(&job.key);
                if st.lane_txs[lane].send(job).await.is_err() {
                    return; // lanes stop only on cancel
                }
            }
        }
    }
    lane_tasks.detach_all(); // each ends on cancel, after its delivery in flight
    let _ = consumer.commit().await;
    let _ = retry_consumer.commit().await;
}

/// The two consumers of a subscription, and which topic the second reads.
struct Consumers<'a, C> {
    main: &'a mut C,
    retry: &'a mut C,
    retry_topic: &'a str,
}

/// Publish outcomes, dead letters and parked records of finished records, record lineage,
/// then ack.
async fn finish<B: Bus>(
    bus: &B,
    consumers: Consumers<'_, B::Consumer>,
    subscription: &str,
    batch: Vec<Done>,
    lineage: &Lineage,
    cancel: &CancellationToken,
    audit: Option<&crate::audit::Audit>,
) -> Result<(), BusError> {
    let at = now_ms();
    let mut out = Vec::with_capacity(batch.len() * 2);
    for d in &batch {
        if let Some(parked) = &d.park {
            out.push(OutRecord {
                topic: topics::retry(subscription),
                key: parked.key.clone(),
                value: parked.to_avro().expect("retry records fit their schema"),
            });
            continue;
        }
        let (reason, detail) = match &d.error {
            Some(e) => (Some(e.reason().to_owned()), Some(e.detail().to_owned())),
            None => (None, None),
        };
        if let Some((source_topic, key, value)) = &d.dead_letter {
            let dl = DeadLetter {
                id: format!("{}@{at}", d.record_id),
                stage: subscription.to_owned(),
                record_id: d.record_id.clone(),
                envelope_id: d.envelope_id.clone(),
                at_ms: at,
                reason: reason.clone().unwrap_or_else(|| "unknown".into()),
                detail: detail.clone(),
                source_topic: source_topic.clone(),
                key: key.clone(),
                value: value.clone(),
            };
            out.push(OutRecord {
                topic: topics::dead_letters(subscription),
                key: key.clone(),
                value: dl.to_avro().expect("dead letters fit their schema"),
            });
        }
        // A filter miss is not news; a delivery withheld for want of consent is.
        if d.outcome != Outcome::Filtered || d.error.is_some() {
            let o = DeliveryOutcome {
                subscription: subscription.to_owned(),
                record_id: d.record_id.clone(),
                envelope_id: d.envelope_id.clone(),
                at_ms: at,
                attempt: i32::try_from(d.attempt).unwrap_or(i32::MAX),
                outcome: d.outcome,
                reason: reason.clone(),
                detail: detail.clone(),
            };
            out.push(OutRecord {
                topic: topics::DELIVERY_OUTCOMES.to_owned(),
                key: d.envelope_id.clone().into_bytes(),
                value: o.to_avro().expect("outcomes fit their schema"),
            });
        }
    }
    // Outcomes, parked records and audit records go to disk side by side; all before the ack.
    let entries: Vec<_> = batch.iter().flat_map(|d| d.audit.iter().cloned()).collect();
    let (published, audited) = tokio::join!(publish_retrying(bus, out, cancel), async {
        match audit {
            Some(a) => a.append(entries).await,
            None => Ok(()),
        }
    });
    published?;
    audited.map_err(|e| BusError::Fatal(e.to_string()))?;
    for d in batch {
        let consumer = if d.token.topic == consumers.retry_topic {
            &mut *consumers.retry
        } else {
            &mut *consumers.main
        };
        if d.park.is_some() {
            // Parked, not finished: its lineage step ("retrying") came from its lane.
            consumer.ack(d.token).await?;
            continue;
        }
        let mut step = Step::new(at, "delivery", d.outcome.as_str());
        if d.outcome == Outcome::DeadLettered {
            step.stage = "dead_lettered".into();
        }
        step.subscription = Some(subscription.to_owned());
        step.record_id = Some(d.record_id.clone());
        step.kind = Some(d.kind.to_owned());
        step.attempt = (d.attempt > 0).then_some(d.attempt);
        if let Some(e) = &d.error {
            step.reason = Some(e.reason().to_owned());
            step.detail = Some(e.detail().to_owned());
        }
        match (d.outcome, &d.error) {
            (Outcome::DeadLettered, e) => telemetry::dead_lettered(
                subscription,
                e.as_ref().map_or("unknown", DeliveryError::reason),
            ),
            (Outcome::Filtered, _) => telemetry::filtered(subscription),
            _ => {} // delivered: counted by the lane, with its latency
        }
        lineage.step(&d.envelope_id, step).await;
        consumer.ack(d.token).await?;
    }
    Ok(())
}

/// One lane's whole context.
struct Lane {
    sink: Arc<dyn Sink>,
    subscription: Arc<str>,
    retry: RetryConfig,
    done: mpsc::Sender<Report>,
    lineage: Lineage,
    cancel: CancellationToken,
    hooks: Arc<Hooks>,
    parking: Arc<Mutex<Parking>>,
}

/// A record parked on the retry topic, not (yet) tried again.
fn parked_done(
    token: AckToken,
    record_id: String,
    envelope_id: String,
    kind: &'static str,
    parked: RetryRecord,
) -> Done {
    Done {
        token,
        record_id,
        envelope_id,
        kind,
        attempt: u32::try_from(parked.attempt).unwrap_or(0),
        outcome: Outcome::Retrying,
        error: None,
        dead_letter: None,
        audit: Vec::new(),
        park: Some(parked),
    }
}

/// Deliver the jobs of this lane's keys in order, one attempt each: a record that fails for
/// now is parked (or, from the retry topic, stays held), never waited for here.
async fn lane(mut rx: mpsc::Receiver<Job>, l: Lane) {
    let Lane {
        sink,
        subscription,
        retry,
        done,
        lineage,
        cancel,
        hooks,
        parking,
    } = l;
    while let Some(job) = rx.recv().await {
        #[cfg(debug_assertions)] // KETENBUS_FAULT=lane_panic_after:N (tests only)
        crate::fault::hit("lane_panic_after");
        let behind = job.prior.is_none() && {
            let mut p = lock(&parking);
            let parked = p.is_parked(&job.key);
            if parked {
                p.park(&job.key);
            }
            parked
        };
        if behind {
            // Behind an earlier record of its key: parked untried, in order.
            let parked = RetryRecord {
                record_id: job.record_id.clone(),
                envelope_id: job.envelope_id.clone(),
                attempt: 0,
                first_failure_ms: None,
                next_attempt_ms: now_ms(),
                reason: None,
                detail: None,
                source_topic: job.source_topic,
                key: job.key,
                value: job.value,
            };
            let d = parked_done(job.token, job.record_id, job.envelope_id, job.kind, parked);
            if done.send(Report::Done(Box::new(d))).await.is_err() {
                return;
            }
            continue;
        }
        let raw = hooks.raw_declared(&job.payload).await;
        if let Some(consent) = &hooks.consent {
            let Some(verdict) =
                consent_verdict(consent, &job.payload, &raw.patients, &subscription, &cancel).await
            else {
                return; // cancelled: not acked, checked again after restart
            };
            if let crate::consent::Verdict::Withhold(detail) = verdict {
                let audit = hooks
                    .audit_entries(&subscription, "delivery_withheld", &job, &raw)
                    .await;
                let d = Done {
                    token: job.token,
                    record_id: job.record_id,
                    envelope_id: job.envelope_id,
                    kind: job.kind,
                    attempt: 0,
                    outcome: Outcome::Filtered,
                    error: Some(DeliveryError::Rejected {
                        reason: "no_consent".into(),
                        detail,
                    }),
                    dead_letter: None,
                    audit,
                    park: None,
                };
                if done.send(Report::Done(Box::new(d))).await.is_err() {
                    return;
                }
                continue;
            }
        }
        let audit = hooks
            .audit_entries(&subscription, "delivery", &job, &raw)
            .await;
        let attempt_started = now_ms();
        let prior = job.prior;
        let delivery = Delivery {
            subscription: Arc::clone(&subscription),
            record_id: job.record_id.clone(),
            payload: job.payload,
            attempt: prior.map_or(1, |p| p.attempt + 1),
        };
        let (outcome, error) = match sink.deliver(&delivery).await {
            Ok(_receipt) => {
                telemetry::delivered(
                    &subscription,
                    job.kind,
                    telemetry::since_received(&delivery.payload),
                );
                (Outcome::Delivered, None)
            }
            Err(e @ DeliveryError::Rejected { .. }) => (Outcome::DeadLettered, Some(e)),
            Err(e) => {
                let first_failure = prior
                    .and_then(|p| p.first_failure_ms)
                    .unwrap_or(attempt_started);
                let now = now_ms();
                let give_up_ms = i64::try_from(retry.give_up_after.as_millis()).unwrap_or(i64::MAX);
                let elapsed = now.saturating_sub(first_failure);
                if elapsed >= give_up_ms {
                    let exhausted = DeliveryError::Rejected {
                        reason: "exhausted".into(),
                        detail: format!("gave up after {} attempts; last: {e}", delivery.attempt),
                    };
                    (Outcome::DeadLettered, Some(exhausted))
                } else {
                    telemetry::retrying(&subscription, delivery.attempt, &e);
                    let mut step = Step::new(now, "delivery", "retrying");
                    step.subscription = Some(subscription.to_string());
                    step.record_id = Some(job.record_id.clone());
                    step.kind = Some(job.kind.to_owned());
                    step.attempt = Some(delivery.attempt);
                    step.reason = Some(e.reason().to_owned());
                    step.detail = Some(e.detail().to_owned());
                    lineage.step(&job.envelope_id, step).await;
                    let wait = backoff(&retry, delivery.attempt);
                    let wait_ms = i64::try_from(wait.as_millis())
                        .unwrap_or(i64::MAX)
                        .min(give_up_ms - elapsed);
                    let next_attempt_ms = now.saturating_add(wait_ms);
                    let report = if prior.is_some() {
                        Report::Again(Again {
                            token: job.token,
                            key: job.key,
                            attempt: delivery.attempt,
                            first_failure_ms: first_failure,
                            next_attempt_ms,
                            reason: e.reason().to_owned(),
                            detail: e.detail().to_owned(),
                        })
                    } else {
                        // Parked before this lane takes its next job, so that job (maybe
                        // the same patient's next record) sees it.
                        lock(&parking).park(&job.key);
                        let parked = RetryRecord {
                            record_id: job.record_id.clone(),
                            envelope_id: job.envelope_id.clone(),
                            attempt: i32::try_from(delivery.attempt).unwrap_or(i32::MAX),
                            first_failure_ms: Some(first_failure),
                            next_attempt_ms,
                            reason: Some(e.reason().to_owned()),
                            detail: Some(e.detail().to_owned()),
                            source_topic: job.source_topic.clone(),
                            key: job.key.clone(),
                            value: job.value.clone(),
                        };
                        Report::Done(Box::new(parked_done(
                            job.token,
                            job.record_id,
                            job.envelope_id,
                            job.kind,
                            parked,
                        )))
                    };
                    if done.send(report).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        };
        let dead_letter = (outcome == Outcome::DeadLettered)
            .then(|| (job.source_topic.clone(), job.key.clone(), job.value.clone()));
        let d = Done {
            token: job.token,
            record_id: job.record_id,
            envelope_id: job.envelope_id,
            kind: job.kind,
            attempt: delivery.attempt,
            outcome,
            error,
            dead_letter,
            audit: if outcome == Outcome::Delivered {
                audit
            } else {
                Vec::new()
            },
            park: None,
        };
        if done.send(Report::Done(Box::new(d))).await.is_err() {
            return;
        }
    }
}

/// Ask the consent registry, waiting while it cannot answer; `None` when cancelled.
async fn consent_verdict(
    consent: &crate::consent::ConsentCheck,
    payload: &Payload,
    raw_patients: &[String],
    subscription: &str,
    cancel: &CancellationToken,
) -> Option<crate::consent::Verdict> {
    loop {
        match consent.verdict(payload, raw_patients).await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(subscription = %subscription, error = %e, "waiting for the consent registry");
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Mutex;

    use ketenbus_connectors::{BoxFuture, Receipt};
    use ketenbus_schemas::event::{EventHeader, LetterEvent};

    use super::*;
    use crate::bus::TopicSpec;
    use crate::bus::embedded::{EmbeddedBus, EmbeddedConfig};
    use crate::config::Sink as SinkConfig;

    /// A real sink that takes its time: records what arrives, in arrival order.
    struct SlowRecorder {
        got: Mutex<Vec<(String, i32)>>,
    }

    impl Sink for SlowRecorder {
        fn deliver<'a>(&'a self, d: &'a Delivery) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
            Box::pin(async move {
                let Payload::Event(e) = &d.payload else {
                    panic!("events only")
                };
                let h = e.header();
                // Uneven delays make lanes race each other.
                let jitter = u64::from(h.id.bytes().map(u32::from).sum::<u32>() % 4);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                self.got
                    .lock()
                    .unwrap()
                    .push((h.patient_key.clone().unwrap(), h.index));
                Ok(Receipt {
                    detail: "ok".into(),
                })
            })
        }
    }

    /// Every topic a subscription reads and writes.
    fn specs_for(sub: &Subscription, partitions: u32) -> Vec<TopicSpec> {
        let mut names = source_topics(sub);
        names.push(topics::DELIVERY_OUTCOMES.into());
        names.push(topics::dead_letters(&sub.name));
        names.push(topics::retry(&sub.name));
        names
            .into_iter()
            .map(|name| TopicSpec { name, partitions })
            .collect()
    }

    fn letter(patient: &str, index: i32) -> OutRecord {
        let mut header = EventHeader::new(
            EventKind::Letter,
            &format!("env-{patient}-{index}"),
            index,
            "edifact",
        );
        header.patient_key = Some(patient.to_owned());
        let e = LetterEvent {
            header,
            patient: None,
            author: None,
            author_organization: None,
            recipient: None,
            date: None,
            title: None,
            text: None,
            attachments: vec![],
        };
        OutRecord {
            topic: topics::events(EventKind::Letter),
            key: patient.as_bytes().to_vec(),
            value: e.to_avro().unwrap(),
        }
    }

    /// A real sink whose receiver answers 503 for one patient while `failing` is set, and
    /// records what it accepted, in arrival order.
    struct FailsForOnePatient {
        patient: String,
        failing: std::sync::atomic::AtomicBool,
        /// Patients whose next attempt fails once.
        fail_once: Mutex<BTreeSet<String>>,
        got: Mutex<Vec<(String, i32)>>,
    }

    impl Sink for FailsForOnePatient {
        fn deliver<'a>(&'a self, d: &'a Delivery) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
            Box::pin(async move {
                let Payload::Event(e) = &d.payload else {
                    panic!("events only")
                };
                let h = e.header();
                let key = h.patient_key.clone().unwrap();
                let once = self.fail_once.lock().unwrap().remove(&key);
                if once
                    || key == self.patient && self.failing.load(std::sync::atomic::Ordering::SeqCst)
                {
                    return Err(DeliveryError::Retryable {
                        reason: "http_503".into(),
                        detail: "503 Service Unavailable".into(),
                    });
                }
                self.got.lock().unwrap().push((key, h.index));
                Ok(Receipt {
                    detail: "ok".into(),
                })
            })
        }
    }

    /// A subscription of letter events to a webhook nobody answers (the tests give it a sink).
    fn letter_subscription(name: &str, retry: RetryConfig, concurrency: usize) -> Subscription {
        Subscription {
            name: name.into(),
            sources: BTreeSet::from([Source::Events(EventKind::Letter)]),
            filter: FilterConfig::default(),
            sink: SinkConfig::Webhook {
                url: ketenbus_connectors::address_book::Destination::Fixed(
                    "http://127.0.0.1:1/".parse().unwrap(),
                ),
                secret: None,
                timeout: Duration::from_secs(1),
                ca_file: None,
            },
            retry,
            concurrency,
        }
    }

    /// One patient's records fail for a long time: every other patient's arrive at once, the
    /// failing patient's arrive in order after it recovers, also across a stop and start of
    /// the subscription, and nothing finished is delivered twice.
    #[tokio::test]
    async fn one_failing_patient_holds_up_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        let sub = letter_subscription(
            "lab",
            RetryConfig {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                give_up_after: Duration::from_secs(24 * 3600),
            },
            2,
        );
        bus.ensure_topics(&specs_for(&sub, 2)).await.unwrap();
        // The failing patient's records come first and among everyone else's.
        let mut records = Vec::new();
        for i in 0..40 {
            if i % 8 == 0 {
                records.push(letter("patient-x", i / 8));
            }
            records.push(letter(&format!("patient-{i}"), 0));
        }
        bus.publish(records).await.unwrap();
        let sink = Arc::new(FailsForOnePatient {
            patient: "patient-x".into(),
            failing: std::sync::atomic::AtomicBool::new(true),
            fail_once: Mutex::new(BTreeSet::new()),
            got: Mutex::new(Vec::new()),
        });
        let start = |cancel: CancellationToken| {
            tokio::spawn(run(
                Arc::clone(&bus),
                sub.clone(),
                Arc::clone(&sink) as Arc<dyn Sink>,
                Lineage::open(dir.path()).unwrap(),
                Arc::new(Health::default()),
                cancel,
            ))
        };
        let cancel = CancellationToken::new();
        let task = start(cancel.clone());
        let began = std::time::Instant::now();
        while sink.got.lock().unwrap().len() < 40 && began.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let others = sink.got.lock().unwrap().len();
        assert_eq!(others, 40, "every other patient's record arrived");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        // Stop while the failing patient's records are parked; start again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
        task.await.unwrap();
        let cancel = CancellationToken::new();
        let task = start(cancel.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        sink.failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let began = std::time::Instant::now();
        while sink.got.lock().unwrap().len() < 45 && began.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
        task.await.unwrap();
        let got = sink.got.lock().unwrap().clone();
        let x: Vec<i32> = got
            .iter()
            .filter(|(k, _)| k == "patient-x")
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(
            x,
            vec![0, 1, 2, 3, 4],
            "the failing patient's records, in order"
        );
        assert_eq!(got.len(), 45, "nothing delivered twice: {got:?}");
    }

    /// A record held on the retry topic does not keep the commit point behind records that
    /// were retried and delivered after it: after a restart none of them comes again.
    #[tokio::test]
    async fn a_held_record_is_parked_again_so_finished_retries_are_not_delivered_twice() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        let sub = letter_subscription(
            "lab",
            RetryConfig {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(100),
                give_up_after: Duration::from_secs(24 * 3600),
            },
            2,
        );
        // One partition: every parked record shares one retry partition.
        bus.ensure_topics(&specs_for(&sub, 1)).await.unwrap();
        let sink = Arc::new(FailsForOnePatient {
            patient: "patient-x".into(),
            failing: std::sync::atomic::AtomicBool::new(true),
            fail_once: Mutex::new((0..10).map(|i| format!("patient-{i}")).collect()),
            got: Mutex::new(Vec::new()),
        });
        let start = |cancel: CancellationToken| {
            tokio::spawn(run(
                Arc::clone(&bus),
                sub.clone(),
                Arc::clone(&sink) as Arc<dyn Sink>,
                Lineage::open(dir.path()).unwrap(),
                Arc::new(Health::default()),
                cancel,
            ))
        };
        let mut records = vec![letter("patient-x", 0)];
        records.extend((0..10).map(|i| letter(&format!("patient-{i}"), 0)));
        bus.publish(records).await.unwrap();
        let cancel = CancellationToken::new();
        let task = start(cancel.clone());
        let began = std::time::Instant::now();
        while sink.got.lock().unwrap().len() < 10 && began.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sink.got.lock().unwrap().len(), 10, "each retried once");
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
        task.await.unwrap();
        let cancel = CancellationToken::new();
        let task = start(cancel.clone());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sink.failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let began = std::time::Instant::now();
        while sink.got.lock().unwrap().len() < 11 && began.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
        task.await.unwrap();
        let got = sink.got.lock().unwrap().clone();
        assert_eq!(
            got.len(),
            11,
            "nothing finished was delivered again: {got:?}"
        );
        assert_eq!(got.last().unwrap().0, "patient-x");
    }

    /// A registry where every patient denies everything.
    struct DenyAll;

    impl crate::consent::ConsentRegistry for DenyAll {
        fn lookup<'a>(
            &'a self,
            _q: crate::consent::ConsentQuery<'a>,
        ) -> BoxFuture<'a, Result<crate::consent::Answer, crate::consent::ConsentError>> {
            Box::pin(async { Ok(crate::consent::Answer::Denied) })
        }
    }

    #[tokio::test]
    async fn a_delivery_without_consent_is_an_outcome_and_an_audit_record() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        let sub = letter_subscription("gp", RetryConfig::default(), 2);
        bus.ensure_topics(&specs_for(&sub, 1)).await.unwrap();
        let mut header = EventHeader::new(EventKind::Letter, "env-1", 0, "edifact");
        header.patient_key = Some("pk-1".into());
        let e = LetterEvent {
            header,
            patient: None,
            author: None,
            author_organization: None,
            recipient: None,
            date: None,
            title: None,
            text: None,
            attachments: vec![],
        };
        bus.publish(vec![OutRecord {
            topic: topics::events(EventKind::Letter),
            key: b"pk-1".to_vec(),
            value: e.to_avro().unwrap(),
        }])
        .await
        .unwrap();
        // A sink that must never be called.
        let sink = Arc::new(SlowRecorder {
            got: Mutex::new(Vec::new()),
        });
        let key = crate::audit::AuditKey::new(b"audit-key-for-unit-tests-0123456789".to_vec());
        let audit = crate::audit::Audit::open(dir.path(), key.unwrap()).unwrap();
        let hooks = Hooks {
            consent: Some(Arc::new(crate::consent::ConsentCheck {
                registry: Arc::new(DenyAll),
                policy: crate::consent::SubscriptionConsent {
                    party: Some("agb:01234567".into()),
                    purpose: "treatment".into(),
                    default: crate::consent::DefaultDecision::Allow,
                },
            })),
            audit: Some(audit),
            receiver_is_party: false,
            raw_patients: None,
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_with(
            Arc::clone(&bus),
            sub,
            Arc::clone(&sink) as Arc<dyn Sink>,
            Lineage::open(dir.path()).unwrap(),
            Arc::new(Health::default()),
            cancel.clone(),
            hooks,
        ));
        let mut outcomes = bus
            .subscribe("reader", &[topics::DELIVERY_OUTCOMES.to_owned()])
            .await
            .unwrap();
        let mut found = None;
        for _ in 0..40 {
            if let Some(r) = outcomes.poll(Duration::from_millis(250)).await.unwrap() {
                found = Some(DeliveryOutcome::from_avro(&r.value).unwrap());
                break;
            }
        }
        cancel.cancel();
        task.await.unwrap();
        let o = found.expect("an outcome on the delivery-outcomes topic");
        assert_eq!(o.outcome, Outcome::Filtered);
        assert_eq!(o.reason.as_deref(), Some("no_consent"));
        assert_eq!(o.envelope_id, "env-1");
        assert!(sink.got.lock().unwrap().is_empty(), "never delivered");
        let trail = std::fs::read_to_string(crate::audit::path_in(dir.path())).unwrap();
        assert!(
            trail.contains("\"action\":\"delivery_withheld\""),
            "{trail}"
        );
        assert!(trail.contains("\"patient\":\"pk-1\""), "{trail}");
    }

    #[tokio::test]
    async fn one_patients_events_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        let sub = letter_subscription("ordered", RetryConfig::default(), 4);
        bus.ensure_topics(&specs_for(&sub, 3)).await.unwrap();
        let mut records = Vec::new();
        for i in 0..40 {
            for p in 0..6 {
                let mut header =
                    EventHeader::new(EventKind::Letter, &format!("env-{p}-{i}"), i, "edifact");
                header.patient_key = Some(format!("patient-{p}"));
                let e = LetterEvent {
                    header,
                    patient: None,
                    author: None,
                    author_organization: None,
                    recipient: None,
                    date: None,
                    title: None,
                    text: None,
                    attachments: vec![],
                };
                records.push(OutRecord {
                    topic: topics::events(EventKind::Letter),
                    key: format!("patient-{p}").into_bytes(),
                    value: e.to_avro().unwrap(),
                });
            }
        }
        bus.publish(records).await.unwrap();
        let sink = Arc::new(SlowRecorder {
            got: Mutex::new(Vec::new()),
        });
        let lineage = Lineage::open(dir.path()).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::clone(&bus),
            sub,
            Arc::clone(&sink) as Arc<dyn Sink>,
            lineage,
            Arc::new(Health::default()),
            cancel.clone(),
        ));
        for _ in 0..200 {
            if sink.got.lock().unwrap().len() >= 240 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cancel.cancel();
        task.await.unwrap();
        let got = sink.got.lock().unwrap().clone();
        assert_eq!(got.len(), 240);
        let mut per_key: HashMap<String, Vec<i32>> = HashMap::new();
        for (k, i) in got {
            per_key.entry(k).or_default().push(i);
        }
        for (k, seq) in per_key {
            assert_eq!(seq, (0..40).collect::<Vec<_>>(), "order of {k}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            give_up_after: Duration::from_secs(60),
        };
        for _ in 0..50 {
            let b1 = backoff(&r, 1);
            assert!(
                b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100),
                "{b1:?}"
            );
            let b3 = backoff(&r, 3);
            assert!(
                b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400),
                "{b3:?}"
            );
            let b40 = backoff(&r, 40);
            assert!(
                b40 >= Duration::from_millis(500) && b40 <= Duration::from_secs(1),
                "{b40:?}"
            );
        }
    }

    #[test]
    fn filters_match_party_ids() {
        let env = RawEnvelope {
            id: "m".into(),
            received_at_ms: 0,
            connector: "http".into(),
            format: ketenbus_schemas::Format::Edifact,
            content_type: "application/EDIFACT".into(),
            sender: Some("mailbox:500001234".into()),
            receiver: None,
            body: vec![],
            attributes: Default::default(),
        };
        let p = Payload::Raw(Arc::new(env));
        assert!(passes(&FilterConfig::default(), &p));
        assert!(passes(
            &FilterConfig {
                senders: vec!["mailbox:500001234".into()],
                receivers: vec![]
            },
            &p
        ));
        assert!(!passes(
            &FilterConfig {
                senders: vec!["agb:1".into()],
                receivers: vec![]
            },
            &p
        ));
        assert!(
            !passes(
                &FilterConfig {
                    senders: vec![],
                    receivers: vec!["agb:1".into()]
                },
                &p
            ),
            "unknown receiver fails a receiver filter"
        );
    }
}
