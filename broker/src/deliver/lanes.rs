//! Lanes: each delivers the records of its keys in order, one attempt each, with the
//! consent check before and the audit records after; what fails for now is parked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ketenbus_connectors::{Delivery, DeliveryError, LogPosition, Payload, Sink};
use ketenbus_schemas::lineage::{Stage, StepOutcome};
use ketenbus_schemas::{Outcome, RetryRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::retry::{Parking, backoff, lock};
use super::{Again, Done, Job, Report};
use crate::bus::AckToken;
use crate::deliver::config::RetryConfig;
use crate::observe::lineage::{Lineage, Step};
use crate::observe::metrics;
use ketenbus_schemas::now_ms;

/// What a subscription checks and records around each delivery: consent before, the
/// audit trail after.
#[derive(Default, Clone)]
pub struct Hooks {
    /// Deliver only what consent allows.
    pub consent: Option<Arc<crate::deliver::consent::ConsentCheck>>,
    /// Append an audit record per delivery; acked only once it is on disk.
    pub audit: Option<crate::observe::audit::Audit>,
    /// The sink sends each record to its receiver (address book), or the subscription takes
    /// only records for the receivers it names: the audit names the record's receiver as
    /// the party that got it.
    pub receiver_is_party: bool,
    /// For a subscription of raw messages: finds the patients (and receiver) a message
    /// declares, so its audit records name them.
    pub raw_patients: Option<Arc<crate::route::keys::RawPatients>>,
    /// Paused subscriptions: while this one is paused its lanes deliver nothing and its
    /// loop reads nothing, so it keeps its place in the log.
    pub pauses: Option<crate::deliver::pause::Pauses>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("receiver_is_party", &self.receiver_is_party)
            .finish_non_exhaustive()
    }
}

/// Largest raw body a lane reads for its patients on the async worker itself: parsing
/// 16 KiB takes about as long as handing it to the blocking pool and back.
const INLINE_READ: usize = 16 * 1024;

impl Hooks {
    /// The patients (and receiver) a raw message declares, read once for its consent check
    /// and its audit records; nothing for an event or without a reader.
    async fn raw_declared(&self, payload: &Payload) -> crate::route::keys::Declared {
        match (payload, &self.raw_patients) {
            (Payload::Raw(env), Some(raw)) if self.consent.is_some() || self.audit.is_some() => {
                // The router's reading of the same bytes, when it came first.
                if let Some(d) = raw.remembered(&env.id) {
                    return d;
                }
                // Normalising is parsing: a small message here (a thread handoff costs more),
                // a larger one off the async workers.
                if env.body.len() <= INLINE_READ {
                    return raw.declared(env);
                }
                let (raw, env) = (Arc::clone(raw), Arc::clone(env));
                tokio::task::spawn_blocking(move || raw.declared(&env))
                    .await
                    .unwrap_or_default()
            }
            _ => crate::route::keys::Declared::default(),
        }
    }

    /// The audit records of one delivery (or withheld delivery): one per patient the record
    /// concerns (a raw message may declare several), none without an audit trail.
    async fn audit_entries(
        &self,
        subscription: &str,
        action: &str,
        job: &Job,
        raw: &crate::route::keys::Declared,
    ) -> Vec<crate::observe::audit::Entry> {
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
        let entry = |patient: Option<String>| crate::observe::audit::Entry {
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

/// One lane's whole context.
pub(super) struct Lane {
    pub(super) sink: Arc<dyn Sink>,
    pub(super) subscription: Arc<str>,
    pub(super) retry: RetryConfig,
    pub(super) done: mpsc::Sender<Report>,
    pub(super) lineage: Lineage,
    pub(super) cancel: CancellationToken,
    pub(super) hooks: Arc<Hooks>,
    pub(super) parking: Arc<Mutex<Parking>>,
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
        resolves: None,
        origin: None,
    }
}

/// Deliver the jobs of this lane's keys in order, one attempt each: a record that fails for
/// now is parked (or, from the retry topic, stays held), never waited for here.
pub(super) async fn lane(mut rx: mpsc::Receiver<Job>, l: Lane) {
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
    let mut paused = hooks.pauses.as_ref().map(|p| p.watch(&subscription));
    while let Some(job) = rx.recv().await {
        if let Some(switch) = paused.as_mut()
            && !crate::deliver::pause::wait_resumed(switch, &cancel).await
        {
            return; // cancelled while paused: not acked, delivered after a restart
        }
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
            // A replayed record keeps its attempt count and the dead letter it resolves.
            let parked = RetryRecord {
                record_id: job.record_id.clone(),
                envelope_id: job.envelope_id.clone(),
                attempt: job
                    .replay
                    .as_ref()
                    .map_or(0, |r| i32::try_from(r.attempts).unwrap_or(i32::MAX)),
                first_failure_ms: None,
                next_attempt_ms: now_ms(),
                reason: None,
                detail: None,
                source_topic: job.source_topic,
                key: job.key,
                value: job.value,
                replay_of: job.replay.map(|r| r.dead_letter),
            };
            let d = parked_done(job.token, job.record_id, job.envelope_id, job.kind, parked);
            if done.send(Report::Done(Box::new(d))).await.is_err() {
                return;
            }
            continue;
        }
        let raw = hooks.raw_declared(&job.payload).await;
        // Consent could not be asked and the default is deny: tried again later.
        let mut consent_later = None;
        if let Some(consent) = &hooks.consent {
            let verdict =
                match consent_verdict(consent, &job.payload, &raw.patients, &subscription, &cancel)
                    .await
                {
                    Some(Ok(v)) => v,
                    Some(Err(e)) => {
                        consent_later = Some(e);
                        crate::deliver::consent::Verdict::Deliver
                    }
                    None => return, // cancelled: not acked, checked again after restart
                };
            if let crate::deliver::consent::Verdict::Withhold(detail) = verdict {
                let audit = hooks
                    .audit_entries(&subscription, "delivery_withheld", &job, &raw)
                    .await;
                let withheld = DeliveryError::Rejected {
                    reason: "no_consent".into(),
                    detail,
                };
                let d = Done::filtered(job, Some(withheld), audit);
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
        // Read straight from its source topic: the sink may keep where it is.
        let position = (job.token.topic == job.source_topic).then(|| LogPosition {
            topic: job.token.topic.clone(),
            partition: job.token.partition,
            offset: job.token.offset,
        });
        let delivery = Delivery {
            subscription: Arc::clone(&subscription),
            record_id: job.record_id.clone(),
            payload: job.payload,
            // A replayed dead letter counts on from the attempts made before it.
            attempt: prior.map_or_else(
                || job.replay.as_ref().map_or(0, |r| r.attempts) + 1,
                |p| p.attempt + 1,
            ),
            position,
        };
        let result = match consent_later {
            Some(e) => Err(e),
            None => sink.deliver(&delivery).await,
        };
        let mut origin = None;
        let (outcome, error) = match result {
            Ok(receipt) => {
                metrics::delivered(
                    &subscription,
                    job.kind,
                    metrics::since_received(&delivery.payload),
                );
                origin = receipt.origin;
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
                    let mut step = Step::new(now, Stage::Delivery, StepOutcome::Retrying);
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
                    metrics::retrying(
                        &subscription,
                        &job.record_id,
                        delivery.attempt,
                        &e,
                        Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)),
                    );
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
                            replay_of: job.replay.as_ref().map(|r| r.dead_letter.clone()),
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
            origin,
            // Delivered, or dead-lettered again under a new id: the replayed dead letter is done.
            resolves: job.replay.map(|r| (r.dead_letter, job.key.clone())),
        };
        if done.send(Report::Done(Box::new(d))).await.is_err() {
            return;
        }
    }
}

/// Ask the consent registry. When it cannot answer now, the subscription's default decides:
/// `allow` delivers, `deny` answers a retryable `consent_unavailable` error, so the record
/// is parked and tried again rather than filtered for good. `None` when cancelled.
async fn consent_verdict(
    consent: &crate::deliver::consent::ConsentCheck,
    payload: &Payload,
    raw_patients: &[String],
    subscription: &str,
    cancel: &CancellationToken,
) -> Option<Result<crate::deliver::consent::Verdict, DeliveryError>> {
    use crate::deliver::consent::{DefaultDecision, Verdict};
    let verdict = tokio::select! {
        () = cancel.cancelled() => return None,
        v = consent.verdict(payload, raw_patients) => v,
    };
    Some(match verdict {
        Ok(v) => Ok(v),
        Err(e) if consent.policy.default == DefaultDecision::Allow => {
            metrics::consent_unavailable("allow");
            tracing::warn!(subscription = %subscription, error = %e, "consent registry unavailable: delivering by the subscription's default allow");
            Ok(Verdict::Deliver)
        }
        Err(e) => {
            metrics::consent_unavailable("retry");
            tracing::warn!(subscription = %subscription, error = %e, "consent registry unavailable: the delivery waits for a retry (default deny)");
            Err(DeliveryError::Retryable {
                reason: "consent_unavailable".into(),
                detail: e.to_string(),
            })
        }
    })
}
