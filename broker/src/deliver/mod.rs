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

pub mod backoff;
pub mod backport;
pub mod config;
pub mod consent;
mod decode;
pub mod dlq;
mod finish;
mod in_flight;
mod lanes;
pub mod mcsd;
pub mod mitz;
pub mod pause;
pub mod pull;
pub mod resources;
mod retry;
pub mod sink;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ketenbus_connectors::{DeliveryError, Payload, Sink};
use ketenbus_schemas::{Outcome, RetryRecord, topics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{AckToken, Bus, BusError, Consumer, Record, partition_for};
use crate::deliver::config::Subscription;
use crate::observe::health::{Health, State};
use crate::observe::lineage::{self, Lineage};
use ketenbus_schemas::now_ms;

use decode::{decode, passes};
use finish::{Consumers, ack, write};
pub use lanes::Hooks;
use lanes::{Lane, lane};
pub use retry::backoff;
use retry::{Parking, RetryPart, scan_parked};

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
    /// A replayed dead letter: its id, and the attempts made before it was dead-lettered
    /// (the attempt count goes on from there).
    replay: Option<Replay>,
}

/// Where a replayed record comes from.
#[derive(Clone)]
struct Replay {
    /// The dead letter's id.
    dead_letter: String,
    /// Attempts made before it was dead-lettered.
    attempts: u32,
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
    audit: Vec<crate::observe::audit::Entry>,
    /// Not finished but parked: published to the retry topic before the ack, no outcome.
    park: Option<RetryRecord>,
    /// Finished from a replay: the dead letter it resolves (id) and the record key.
    resolves: Option<(String, Vec<u8>)>,
    /// Delivered: where the sink's address came from (the delivery step's detail).
    origin: Option<String>,
}

impl Done {
    /// A record let through untried: a filter miss (no `error`), or withheld for want of
    /// consent (`error` and `audit` say so).
    fn filtered(
        job: Job,
        error: Option<DeliveryError>,
        audit: Vec<crate::observe::audit::Entry>,
    ) -> Done {
        Done {
            token: job.token,
            record_id: job.record_id,
            envelope_id: job.envelope_id,
            kind: job.kind,
            attempt: 0,
            outcome: Outcome::Filtered,
            error,
            dead_letter: None,
            audit,
            park: None,
            resolves: None,
            origin: None,
        }
    }
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
            resolves: None,
            origin: None,
        }
    }
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
    in_flight: in_flight::InFlight,
    /// Records read from the retry topic and not finished.
    held: usize,
    retry_parts: HashMap<u32, RetryPart>,
    finished: Vec<Done>,
    /// Where the engine keeps large bodies of raw envelopes.
    bodies: Option<crate::bus::bodies::BodyStore>,
}

impl Loop {
    fn lane_of(&self, key: &[u8]) -> usize {
        partition_for(key, u32::try_from(self.lane_txs.len()).unwrap_or(1)) as usize
    }
}

/// The next record when the loop has room for one. Without room, or paused, the consumer
/// idles instead: it stays a live member of its group, so a node that joins or leaves gets
/// its partitions without waiting for this one to have room.
async fn poll_or_idle<C: Consumer>(
    consumer: &mut C,
    room: bool,
) -> Result<Option<Record>, BusError> {
    let wait = Duration::from_millis(500);
    if room {
        consumer.poll(wait).await
    } else {
        consumer.idle(wait).await.map(|()| None)
    }
}

/// A batch's [`write`] in progress.
type WriteBatch<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<AckToken>, BusError>> + Send + 'a>,
>;

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
            .subscribe(&topics::subscription_group(&sub.name), &sub.source_topics())
            .await?;
        let retry = bus
            .subscribe(&topics::retry_group(&sub.name), &[topics::retry(&sub.name)])
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
        source_topics: sub.source_topics(),
        parked_reported: Instant::now(),
        retry_topic: topics::retry(&name),
        parking,
        lane_txs,
        in_flight: in_flight::InFlight::default(),
        held: 0,
        retry_parts: HashMap::new(),
        finished: Vec::new(),
        bodies: bus.bodies().cloned(),
    };
    let mut tracked = crate::observe::watch::InFlight::new(&sub.name);
    // The batch being written, and which of its records came from the retry topic.
    let mut writing: Option<(WriteBatch<'_>, Vec<AckToken>)> = None;
    // Acknowledged since the last commit: committed when the subscription is idle.
    let mut uncommitted = false;
    // While paused, nothing new is read (the lanes finish nothing either): see `pause`.
    let mut switch = hooks.pauses.as_ref().map_or_else(
        || tokio::sync::watch::channel(false).1,
        |p| p.watch(&sub.name),
    );
    while !cancel.is_cancelled() {
        let paused = *switch.borrow_and_update();
        if paused && uncommitted && st.finished.is_empty() && writing.is_none() {
            // What was finished before the pause is committed now, not after the resume.
            uncommitted = consumer.commit().await.is_err() | retry_consumer.commit().await.is_err();
        }
        while let Ok(r) = done_rx.try_recv() {
            st.report(r);
        }
        let wake = st.schedule();
        st.repark_blocking();
        st.report_parked();
        // One batch is written at a time (outcomes in order); meanwhile the loop reads on
        // and lanes deliver, and what finishes waits for the next batch.
        if !st.finished.is_empty() && writing.is_none() {
            let batch = std::mem::take(&mut st.finished);
            let retried: Vec<AckToken> = batch
                .iter()
                .filter(|d| d.token.topic == st.retry_topic)
                .map(|d| d.token.clone())
                .collect();
            for d in batch.iter().filter(|d| d.token.topic != st.retry_topic) {
                st.in_flight.finished(&d.token);
            }
            tracked.finished(batch.iter().map(|d| &d.token));
            let written = write(
                bus.as_ref(),
                &name,
                batch,
                &lineage,
                &cancel,
                hooks.audit.as_ref(),
            );
            writing = Some((Box::pin(written), retried));
            continue;
        }
        let sleep = wake.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))
        });
        // Wait for whichever comes first: a lane's report, a parked record's time, or (with
        // room) a new record from the source topics or the retry topic.
        let (polled, from_retry) = tokio::select! {
            () = cancel.cancelled() => break,
            written = async {
                match writing.as_mut() {
                    Some((w, _)) => w.await,
                    None => std::future::pending().await,
                }
            } => {
                let retried = writing.take().map(|(_, r)| r).unwrap_or_default();
                let consumers = Consumers {
                    main: &mut consumer,
                    retry: &mut retry_consumer,
                    retry_topic: &st.retry_topic,
                };
                if let Err(e) = async { ack(consumers, written?).await }.await {
                    tracing::error!(subscription = %name, error = %e, "subscription stopped");
                    health.set(&component, State::Failed(e.to_string()));
                    return;
                }
                st.finished_retry(&retried);
                uncommitted = true;
                continue;
            }
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
            _ = switch.changed(), if paused => continue,
            r = poll_or_idle(&mut consumer, st.in_flight.room(cap) && !paused) => (r, false),
            r = poll_or_idle(&mut retry_consumer, st.held < retry_cap && !paused) => (r, true),
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
        let weight = if record.topic == topics::RAW {
            crate::bus::bodies::weight(&record.value)
        } else {
            record.value.len()
        };
        st.in_flight.started(record.ack_token(), weight);
        match decode(&record, &name, st.bodies.as_ref()) {
            Err(u) => {
                let source = (
                    record.topic.clone(),
                    record.key.clone(),
                    record.value.clone(),
                );
                st.finished.push(u.done(record.ack_token(), source));
            }
            Ok(job) if !passes(&sub.filter, &job.payload) => {
                st.finished.push(Done::filtered(job, None, Vec::new()));
            }
            Ok(job) => {
                if let Some(r) = &job.replay {
                    let mut step = lineage::Step::new(
                        now_ms(),
                        ketenbus_schemas::lineage::Stage::DeadLettered,
                        ketenbus_schemas::lineage::StepOutcome::Replayed,
                    );
                    step.subscription = Some(name.to_string());
                    step.record_id = Some(job.record_id.clone());
                    step.kind = Some(job.kind.to_owned());
                    step.attempt = Some(r.attempts);
                    step.detail = Some(format!("dead letter {} replayed", r.dead_letter));
                    lineage.step(&job.envelope_id, step).await;
                }
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
    if let Some((w, retried)) = writing.take()
        && let Ok(tokens) = w.await
    {
        let consumers = Consumers {
            main: &mut consumer,
            retry: &mut retry_consumer,
            retry_topic: &st.retry_topic,
        };
        let _ = ack(consumers, tokens).await;
        st.finished_retry(&retried);
    }
    let _ = consumer.commit().await;
    let _ = retry_consumer.commit().await;
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Mutex;

    use ketenbus_connectors::{BoxFuture, Delivery, Receipt};
    use ketenbus_schemas::event::{EventHeader, LetterEvent};
    use ketenbus_schemas::{AvroRecord, DeliveryOutcome, EventKind};

    use super::*;
    use crate::bus::embedded::{EmbeddedBus, EmbeddedConfig};
    use crate::bus::{OutRecord, TopicSpec};
    use crate::deliver::config::Sink as SinkConfig;
    use crate::deliver::config::Source;
    use crate::deliver::config::{FilterConfig, RetryConfig};
    use crate::deliver::sink::webhook::Webhook;

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
                    origin: None,
                })
            })
        }
    }

    /// Every topic a subscription reads and writes.
    fn specs_for(sub: &Subscription, partitions: u32) -> Vec<TopicSpec> {
        let mut names = sub.source_topics();
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
        let e = LetterEvent::new(header);
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
                    origin: None,
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
            sink: SinkConfig::new(Webhook {
                url: ketenbus_connectors::address_book::Destination::Fixed(
                    "http://127.0.0.1:1/".parse().unwrap(),
                ),
                secret: None,
                timeout: Duration::from_secs(1),
                ca_file: None,
                batch: None,
            }),
            retry,
            concurrency,
        }
    }

    /// Retries 50 ms apart at first, at most `max_ms` apart, for a day.
    fn quick_retry(max_ms: u64) -> RetryConfig {
        RetryConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(max_ms),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }

    /// Run `sub` on `bus` into `sink`, with the lineage in `dir`, until `cancel`.
    fn spawn_run(
        bus: &Arc<EmbeddedBus>,
        sub: &Subscription,
        sink: Arc<dyn Sink>,
        dir: &std::path::Path,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(
            Arc::clone(bus),
            sub.clone(),
            sink,
            Lineage::open(dir).unwrap(),
            Arc::new(Health::default()),
            cancel,
        ))
    }

    /// One patient's records fail for a long time: every other patient's arrive at once, the
    /// failing patient's arrive in order after it recovers, also across a stop and start of
    /// the subscription, and nothing finished is delivered twice.
    #[tokio::test]
    async fn one_failing_patient_holds_up_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        let sub = letter_subscription("lab", quick_retry(200), 2);
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
            spawn_run(
                &bus,
                &sub,
                Arc::clone(&sink) as Arc<dyn Sink>,
                dir.path(),
                cancel,
            )
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
        let sub = letter_subscription("lab", quick_retry(100), 2);
        // One partition: every parked record shares one retry partition.
        bus.ensure_topics(&specs_for(&sub, 1)).await.unwrap();
        let sink = Arc::new(FailsForOnePatient {
            patient: "patient-x".into(),
            failing: std::sync::atomic::AtomicBool::new(true),
            fail_once: Mutex::new((0..10).map(|i| format!("patient-{i}")).collect()),
            got: Mutex::new(Vec::new()),
        });
        let start = |cancel: CancellationToken| {
            spawn_run(
                &bus,
                &sub,
                Arc::clone(&sink) as Arc<dyn Sink>,
                dir.path(),
                cancel,
            )
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

    impl crate::deliver::consent::ConsentRegistry for DenyAll {
        fn lookup<'a>(
            &'a self,
            _q: crate::deliver::consent::ConsentQuery<'a>,
        ) -> BoxFuture<
            'a,
            Result<crate::deliver::consent::Answer, crate::deliver::consent::ConsentError>,
        > {
            Box::pin(async { Ok(crate::deliver::consent::Answer::Denied) })
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
        let e = LetterEvent::new(header);
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
        let key =
            crate::observe::audit::AuditKey::new(b"audit-key-for-unit-tests-0123456789".to_vec());
        let audit = crate::observe::audit::Audit::open(dir.path(), key.unwrap()).unwrap();
        let hooks = Hooks {
            consent: Some(Arc::new(crate::deliver::consent::ConsentCheck {
                registry: Arc::new(DenyAll),
                policy: crate::deliver::consent::SubscriptionConsent {
                    party: Some("agb:01234567".into()),
                    purpose: "treatment".into(),
                    default: crate::deliver::consent::DefaultDecision::Allow,
                },
            })),
            audit: Some(audit),
            receiver_is_party: false,
            raw_patients: None,
            pauses: None,
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
        let trail = std::fs::read_to_string(crate::observe::audit::path_in(dir.path())).unwrap();
        assert!(
            trail.contains("\"action\":\"delivery_withheld\""),
            "{trail}"
        );
        assert!(trail.contains("\"patient\":\"pk-1\""), "{trail}");
    }

    /// A real sink that fails the first `fails` attempts for now, and records the attempt
    /// number of every try.
    struct FailsFirst {
        fails: std::sync::atomic::AtomicU32,
        attempts: Mutex<Vec<u32>>,
    }

    impl Sink for FailsFirst {
        fn deliver<'a>(&'a self, d: &'a Delivery) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
            Box::pin(async move {
                self.attempts.lock().unwrap().push(d.attempt);
                let left = self.fails.load(std::sync::atomic::Ordering::SeqCst);
                if left > 0 {
                    self.fails
                        .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                    return Err(DeliveryError::Retryable {
                        reason: "http_503".into(),
                        detail: "503 Service Unavailable".into(),
                    });
                }
                Ok(Receipt {
                    detail: "ok".into(),
                    origin: None,
                })
            })
        }
    }

    /// A replayed dead letter that fails again is retried from the retry topic, its attempts
    /// counting on from the dead letter's; once delivered, the dead letter is resolved.
    #[tokio::test]
    async fn a_replay_counts_attempts_on_and_resolves_its_dead_letter_after_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        let sub = letter_subscription("gp", quick_retry(100), 2);
        bus.ensure_topics(&specs_for(&sub, 1)).await.unwrap();
        let original = letter("patient-r", 0);
        let mut dl = ketenbus_schemas::DeadLetter::new(
            "gp",
            ("env-patient-r-0.0", "env-patient-r-0"),
            1_764_000_000_000,
            "exhausted",
            None,
            (
                original.topic.clone(),
                original.key.clone(),
                original.value.clone(),
            ),
        );
        dl.attempt = Some(3);
        bus.publish(vec![OutRecord {
            topic: topics::dead_letters("gp"),
            key: dl.key.clone(),
            value: dl.to_avro().unwrap(),
        }])
        .await
        .unwrap();
        let replay_all = async || {
            dlq::replay(
                bus.as_ref(),
                "gp",
                &dlq::Selection::default(),
                None,
                "operator:t",
            )
            .await
            .unwrap()
        };
        let n = replay_all().await;
        assert_eq!(n, 1);
        let sink = Arc::new(FailsFirst {
            fails: std::sync::atomic::AtomicU32::new(1),
            attempts: Mutex::new(Vec::new()),
        });
        let cancel = CancellationToken::new();
        let task = spawn_run(
            &bus,
            &sub,
            Arc::clone(&sink) as Arc<dyn Sink>,
            dir.path(),
            cancel.clone(),
        );
        let began = std::time::Instant::now();
        let mut left = usize::MAX;
        while began.elapsed() < Duration::from_secs(10) {
            left = dlq::list(bus.as_ref(), "gp", &dlq::Selection::default())
                .await
                .unwrap()
                .len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(*sink.attempts.lock().unwrap(), vec![4, 5]);
        assert_eq!(left, 0, "resolved, no longer listed");
        let all = dlq::list_with_resolved(bus.as_ref(), "gp", &dlq::Selection::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0.id, dl.id);
        assert!(all[0].1.is_some(), "resolved at a time");
        let again = replay_all().await;
        assert_eq!(again, 0, "a resolved dead letter is not replayed again");
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
                let e = LetterEvent::new(header);
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
}
