//! Dispatch: one task per subscription, with its own consumer group, retries and dead
//! letters, so one subscriber never slows another. Records are spread over lanes by key
//! (the patient key), each lane delivering in order, so one patient's events arrive in
//! order while other patients' go ahead. A finished record's outcome (and its dead letter)
//! is published before its offset may be committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ketenbus_connectors::sink::{Delivery, DeliveryError, Payload, Sink};
use ketenbus_schemas::{
    AvroRecord, DeadLetter, DeliveryOutcome, Event, EventKind, Outcome, RawEnvelope, topics,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{AckToken, Bus, BusError, Consumer, OutRecord, Record, embedded::partition_for};
use crate::config::{FilterConfig, RetryConfig, Source, Subscription};
use crate::health::{Health, State};
use crate::lineage::{Lineage, Step};
use crate::telemetry;
use crate::{now_ms, publish_retrying};

/// Consumer group of a subscription.
#[must_use]
pub fn group(subscription: &str) -> String {
    format!("ketenbus.sub.{subscription}")
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
    /// The audit records of one delivery (or withheld delivery): one per patient the record
    /// concerns (a raw message may declare several), none without an audit trail.
    async fn audit_entries(
        &self,
        subscription: &str,
        action: &str,
        job: &Job,
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
            Payload::Raw(env) => {
                let declared = match &self.raw_patients {
                    // Normalising is parsing: off the async workers.
                    Some(raw) => {
                        let (raw, env) = (Arc::clone(raw), Arc::clone(env));
                        tokio::task::spawn_blocking(move || raw.declared(&env))
                            .await
                            .unwrap_or_default()
                    }
                    None => crate::keys::Declared::default(),
                };
                (
                    declared.patients,
                    None,
                    env.receiver.clone().or(declared.receiver),
                )
            }
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

fn decode(record: &Record, subscription: &str) -> Result<Job, Undeliverable> {
    // Replayed dead letters carry the original record and its topic.
    let (topic, key, value) = if record.topic == topics::replay(subscription) {
        let dl = DeadLetter::from_avro(&record.value).map_err(|e| Undeliverable {
            record_id: String::from_utf8_lossy(&record.key).into_owned(),
            envelope_id: String::from_utf8_lossy(&record.key).into_owned(),
            reason: "undecodable_replay",
            detail: e.to_string(),
        })?;
        (dl.source_topic, dl.key, dl.value)
    } else {
        (
            record.topic.clone(),
            record.key.clone(),
            record.value.clone(),
        )
    };
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
        token: record.ack_token(),
        record_id,
        envelope_id,
        kind,
        payload,
        source_topic: topic,
        key,
        value,
    })
}

fn passes(filter: &FilterConfig, payload: &Payload) -> bool {
    let (sender, receiver) = match payload {
        Payload::Event(e) => (e.header().sender.as_deref(), e.header().receiver.as_deref()),
        Payload::Raw(env) => (env.sender.as_deref(), env.receiver.as_deref()),
    };
    let ok = |list: &[String], v: Option<&str>| {
        list.is_empty() || v.is_some_and(|v| list.iter().any(|x| x == v))
    };
    ok(&filter.senders, sender) && ok(&filter.receivers, receiver)
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
    let mut consumer = match bus.subscribe(&group(&sub.name), &source_topics(&sub)).await {
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
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(cap + lanes);
    let mut lane_txs = Vec::with_capacity(lanes);
    let mut lane_tasks = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel::<Job>(cap);
        lane_txs.push(tx);
        lane_tasks.spawn(lane(
            rx,
            Arc::clone(&sink),
            Arc::clone(&name),
            sub.retry.clone(),
            done_tx.clone(),
            lineage.clone(),
            cancel.clone(),
            Arc::clone(&hooks),
        ));
    }
    let mut in_flight = 0usize;
    let mut finished = Vec::new();
    let mut tracked = telemetry::InFlight::new(&sub.name);
    while !cancel.is_cancelled() {
        while let Ok(d) = done_rx.try_recv() {
            finished.push(d);
        }
        if !finished.is_empty() {
            in_flight -= finished.len();
            let batch = std::mem::take(&mut finished);
            tracked.finished(batch.iter().map(|d| &d.token));
            if let Err(e) = finish(
                bus.as_ref(),
                &mut consumer,
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
        }
        // Wait for whichever comes first: a finished delivery, or (with room) a new record.
        let polled = tokio::select! {
            () = cancel.cancelled() => break,
            d = done_rx.recv() => {
                finished.extend(d);
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
            r = consumer.poll(Duration::from_millis(500)), if in_flight < cap => r,
        };
        let record = match polled {
            Ok(Some(r)) => r,
            Ok(None) => continue,
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
        in_flight += 1;
        tracked.started(&record);
        match decode(&record, &name) {
            Err(u) => {
                finished.push(Done {
                    token: record.ack_token(),
                    record_id: u.record_id,
                    envelope_id: u.envelope_id,
                    kind: "unknown",
                    attempt: 0,
                    outcome: Outcome::DeadLettered,
                    error: Some(DeliveryError::Rejected {
                        reason: u.reason.into(),
                        detail: u.detail,
                    }),
                    dead_letter: Some((
                        record.topic.clone(),
                        record.key.clone(),
                        record.value.clone(),
                    )),
                    audit: Vec::new(),
                });
            }
            Ok(job) if !passes(&sub.filter, &job.payload) => {
                finished.push(Done {
                    token: job.token,
                    record_id: job.record_id,
                    envelope_id: job.envelope_id,
                    kind: job.kind,
                    attempt: 0,
                    outcome: Outcome::Filtered,
                    error: None,
                    dead_letter: None,
                    audit: Vec::new(),
                });
            }
            Ok(job) => {
                let lane = partition_for(&job.key, u32::try_from(lanes).unwrap_or(1)) as usize;
                if lane_txs[lane].send(job).await.is_err() {
                    return; // lanes stop only on cancel
                }
            }
        }
    }
    lane_tasks.detach_all(); // each ends on cancel, after its delivery in flight
    let _ = consumer.commit().await;
}

/// Publish outcomes and dead letters of finished records, record lineage, then ack.
async fn finish<B: Bus>(
    bus: &B,
    consumer: &mut B::Consumer,
    subscription: &str,
    batch: Vec<Done>,
    lineage: &Lineage,
    cancel: &CancellationToken,
    audit: Option<&crate::audit::Audit>,
) -> Result<(), BusError> {
    let at = now_ms();
    let mut out = Vec::with_capacity(batch.len() * 2);
    for d in &batch {
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
    // Outcomes and audit records go to disk side by side; both before the ack.
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

// One lane's whole context; a struct for it would only rename the list.
#[allow(clippy::too_many_arguments)]
async fn lane(
    mut rx: mpsc::Receiver<Job>,
    sink: Arc<dyn Sink>,
    subscription: Arc<str>,
    retry: RetryConfig,
    done: mpsc::Sender<Done>,
    lineage: Lineage,
    cancel: CancellationToken,
    hooks: Arc<Hooks>,
) {
    while let Some(job) = rx.recv().await {
        #[cfg(debug_assertions)] // KETENBUS_FAULT=lane_panic_after:N (tests only)
        crate::fault::hit("lane_panic_after");
        if let Some(consent) = &hooks.consent {
            let Some(verdict) =
                consent_verdict(consent, &job.payload, &subscription, &cancel).await
            else {
                return; // cancelled: not acked, checked again after restart
            };
            if let crate::consent::Verdict::Withhold(detail) = verdict {
                let audit = hooks
                    .audit_entries(&subscription, "delivery_withheld", &job)
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
                };
                if done.send(d).await.is_err() {
                    return;
                }
                continue;
            }
        }
        let audit = hooks.audit_entries(&subscription, "delivery", &job).await;
        let started = Instant::now();
        let mut delivery = Delivery {
            subscription: Arc::clone(&subscription),
            record_id: job.record_id.clone(),
            payload: job.payload,
            attempt: 1,
        };
        let (outcome, error) = loop {
            match sink.deliver(&delivery).await {
                Ok(_receipt) => {
                    telemetry::delivered(
                        &subscription,
                        job.kind,
                        telemetry::since_received(&delivery.payload),
                    );
                    break (Outcome::Delivered, None);
                }
                Err(e @ DeliveryError::Rejected { .. }) => break (Outcome::DeadLettered, Some(e)),
                Err(e) => {
                    if started.elapsed() >= retry.give_up_after {
                        let exhausted = DeliveryError::Rejected {
                            reason: "exhausted".into(),
                            detail: format!(
                                "gave up after {} attempts; last: {e}",
                                delivery.attempt
                            ),
                        };
                        break (Outcome::DeadLettered, Some(exhausted));
                    }
                    telemetry::retrying(&subscription, delivery.attempt, &e);
                    let mut step = Step::new(now_ms(), "delivery", "retrying");
                    step.subscription = Some(subscription.to_string());
                    step.record_id = Some(job.record_id.clone());
                    step.kind = Some(job.kind.to_owned());
                    step.attempt = Some(delivery.attempt);
                    step.reason = Some(e.reason().to_owned());
                    step.detail = Some(e.detail().to_owned());
                    lineage.step(&job.envelope_id, step).await;
                    let wait = backoff(&retry, delivery.attempt)
                        .min(retry.give_up_after.saturating_sub(started.elapsed()));
                    tokio::select! {
                        () = cancel.cancelled() => return, // not acked: delivered again after restart
                        () = tokio::time::sleep(wait) => {}
                    }
                    delivery.attempt += 1;
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
        };
        if done.send(d).await.is_err() {
            return;
        }
    }
}

/// Ask the consent registry, waiting while it cannot answer; `None` when cancelled.
async fn consent_verdict(
    consent: &crate::consent::ConsentCheck,
    payload: &Payload,
    subscription: &str,
    cancel: &CancellationToken,
) -> Option<crate::consent::Verdict> {
    loop {
        match consent.verdict(payload).await {
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

    use ketenbus_connectors::sink::{BoxFuture, Receipt};
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
        let sub = Subscription {
            name: "gp".into(),
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
            retry: RetryConfig::default(),
            concurrency: 2,
        };
        let mut names = source_topics(&sub);
        names.push(topics::DELIVERY_OUTCOMES.into());
        names.push(topics::dead_letters("gp"));
        let specs: Vec<TopicSpec> = names
            .into_iter()
            .map(|name| TopicSpec {
                name,
                partitions: 1,
            })
            .collect();
        bus.ensure_topics(&specs).await.unwrap();
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
        let sub = Subscription {
            name: "ordered".into(),
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
            retry: RetryConfig::default(),
            concurrency: 4,
        };
        let mut specs: Vec<TopicSpec> = source_topics(&sub)
            .into_iter()
            .map(|name| TopicSpec {
                name,
                partitions: 3,
            })
            .collect();
        specs.push(TopicSpec {
            name: topics::DELIVERY_OUTCOMES.into(),
            partitions: 3,
        });
        specs.push(TopicSpec {
            name: topics::dead_letters("ordered"),
            partitions: 3,
        });
        bus.ensure_topics(&specs).await.unwrap();
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
