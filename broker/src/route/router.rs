//! The router: reads raw envelopes, normalises them into events (pure functions from the
//! connectors), publishes the events on their kind's topic, dead-letters what cannot be
//! normalised, and records each step in the lineage. One consumer group, batch by batch:
//! the documents a batch's events refer to are kept in the content store, then its events
//! and its lineage records are published in one durable write, and its envelopes are acked
//! right after, so a node killed in between leaves them to be routed, and recorded, again.
//!
//! A delivery status notification saying a mail subscription's delivery failed for good
//! dead-letters that delivery: the router reads the delivered envelope again by its
//! position on the raw topic (the lineage keeps it) and normalises it again, which, being
//! pure, gives the very record the subscription delivered. A report counts only when it
//! came through a source in `mail.bounce_sources` and its envelope id carries the token the
//! mail sink made for that delivery ([`dsn::lineage_of`]); any other report changes
//! nothing but its own lineage (`delivery_report` / `ignored`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::ContentStore;
use ketenbus_connectors::mail::dsn::{self, LineageReport};
use ketenbus_connectors::{NormaliseError, edifact};
use ketenbus_schemas::lineage::{Stage, StepOutcome};
use ketenbus_schemas::{AvroRecord, DeadLetter, Event, Format, RawEnvelope, topics};
use tokio_util::sync::CancellationToken;

use crate::bus::bodies::{BodyStore, decode_raw, weight};
use crate::bus::{Bus, BusError, Consumer, OutRecord, Position, Record};
use crate::bus::{publish_retrying, while_unavailable};
use crate::observe::health::{Health, State};
use crate::observe::lineage::{Lineage, Received, SETTLE, Step};
use crate::route::keys::{Declared, PatientKeyer, RawPatients};
use crate::route::normalise::{Normalisers, events_of};
use ketenbus_schemas::now_ms;

/// Consumer group of the router.
const BATCH: usize = 256;
/// Most raw bytes in one batch (besides its first record), bodies kept in files included:
/// a batch of large messages is cut short rather than hold them (and the documents taken
/// out of them, kept until the batch is published) in memory at once.
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Everything the router decides with: normalisers, the patient keyer, the EDIFACT
/// partners that asked for a CONTRL acknowledgement of each interchange, where documents
/// are kept, and how delivery reports are checked.
pub struct Routing {
    /// Normalisers by format.
    pub normalisers: Normalisers,
    /// Makes patient keys.
    pub keyer: PatientKeyer,
    /// UNB sender party ids (`mailbox:…`) that get a CONTRL back.
    pub contrl_partners: HashSet<String>,
    /// Where attachment bytes are kept; `None` keeps only their hashes (tests, inspect).
    pub content: Option<Arc<dyn ContentStore>>,
    /// Which delivery reports count: their sources, the token key and the mail
    /// subscriptions a report can be about (and a bounce dead-letter into).
    pub reports: dsn::ReportCheck,
    /// Where the engine keeps large bodies of raw envelopes (`None`: it keeps none).
    pub bodies: Option<BodyStore>,
    /// Raw subscriptions name a message's patients in their audit: the router hands them its
    /// reading of each envelope, so they need not normalise it again (`None`: no such ones).
    pub raw_patients: Option<Arc<RawPatients>>,
    /// The largest event record the engine takes (`None`: no limit). A message that maps
    /// into a larger event (mapping can make a message grow) is dead-lettered whole as
    /// `event_too_large` rather than stopping the router; raw subscribers still get it.
    pub max_event_bytes: Option<u64>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("contrl_partners", &self.contrl_partners)
            .finish_non_exhaustive()
    }
}

/// Dead-letter reason of a delivery whose mail bounced for good.
pub const REASON_BOUNCED: &str = "bounced";

/// Dead-letter reason of a message whose event is larger than the log takes.
pub const REASON_EVENT_TOO_LARGE: &str = "event_too_large";

/// Room a record needs beside its key and value (headers, batch framing).
const RECORD_FRAMING: u64 = 64 * 1024;

/// Whether `record` is past `max` bytes with its framing.
fn too_large(record: &OutRecord, max: Option<u64>) -> bool {
    max.is_some_and(|max| (record.value.len() + record.key.len()) as u64 + RECORD_FRAMING > max)
}

/// What the router decided for one raw record.
struct Routed {
    out: Vec<OutRecord>,
    steps: Vec<(String, Step)>,
    /// Envelopes the router made (CONTRL), indexed in `out`, for the lineage.
    made: Vec<(usize, RawEnvelope)>,
    /// Documents the events refer to by hash, for the content store.
    content: Vec<Vec<u8>>,
    /// Deliveries a mail server reported failed for good.
    bounced: Vec<LineageReport>,
    /// The envelope as received, recorded again: the node that took it in may have died
    /// before its own lineage write was published (the index applies it once).
    seen: Option<Received>,
}

impl Routed {
    fn steps(steps: Vec<(String, Step)>) -> Routed {
        Routed {
            out: Vec::new(),
            steps,
            made: Vec::new(),
            content: Vec::new(),
            bounced: Vec::new(),
            seen: None,
        }
    }
}

/// Run the router until `cancel`.
pub async fn run<B: Bus>(
    bus: Arc<B>,
    routing: Arc<Routing>,
    lineage: Lineage,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    const NAME: &str = "router";
    health.set(NAME, State::Starting);
    let mut consumer = match bus
        .subscribe(topics::ROUTER_GROUP, &[topics::RAW.to_owned()])
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "router cannot subscribe to the raw topic");
            health.set(NAME, State::Failed(e.to_string()));
            return;
        }
    };
    health.set(NAME, State::Ready);
    while !cancel.is_cancelled() {
        match route_batch(bus.as_ref(), &mut consumer, &routing, &lineage, &cancel).await {
            Ok(()) => {}
            Err(e) if e.kind() == ketenbus_connectors::ErrorKind::Retryable => {
                tracing::warn!(error = %e, "router waits for the log");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "router stopped");
                health.set(NAME, State::Failed(e.to_string()));
                return;
            }
        }
    }
    let _ = consumer.commit().await;
}

async fn route_batch<B: Bus>(
    bus: &B,
    consumer: &mut B::Consumer,
    routing: &Arc<Routing>,
    lineage: &Lineage,
    cancel: &CancellationToken,
) -> Result<(), BusError> {
    let Some(first) = consumer.poll(Duration::from_millis(200)).await? else {
        return Ok(());
    };
    let mut bytes = weight(&first.value);
    let mut batch = vec![first];
    while batch.len() < BATCH && bytes < BATCH_BYTES {
        match consumer.poll(Duration::ZERO).await? {
            Some(r) => {
                bytes += weight(&r.value);
                batch.push(r);
            }
            None => break,
        }
    }
    // Parsing and mapping is CPU work that grows with the messages: it runs on the blocking
    // pool, so the async workers (HTTP health, ingest, delivery) are never held up by it.
    let (batch, routed) = {
        let routing = Arc::clone(routing);
        tokio::task::spawn_blocking(move || {
            let routed: Vec<Routed> = batch.iter().map(|r| route_one(r, &routing)).collect();
            (batch, routed)
        })
        .await
        .map_err(|e| BusError::Fatal(format!("router task: {e}")))?
    };
    let mut out = Vec::new();
    let mut steps = Vec::new();
    let mut made = Vec::new();
    let mut content = Vec::new();
    let mut bounced = Vec::new();
    let mut seen = Vec::new();
    for routed in routed {
        #[cfg(debug_assertions)] // KETENBUS_FAULT=router_panic_after:N (tests only)
        crate::fault::hit("router_panic_after");
        made.extend(routed.made.into_iter().map(|(i, r)| (out.len() + i, r)));
        out.extend(routed.out);
        steps.extend(routed.steps);
        content.extend(routed.content);
        bounced.extend(routed.bounced);
        seen.extend(routed.seen);
    }
    if let Some(store) = &routing.content {
        keep_content(store, content, cancel).await?;
    }
    for report in bounced {
        let at = now_ms();
        if let Some(dl) = bounce_dead_letter(bus, routing, lineage, &report, at).await? {
            crate::observe::metrics::dead_lettered(
                &report.subscription,
                &report.record_id,
                0,
                REASON_BOUNCED,
            );
            let mut step = Step::new(at, Stage::DeliveryReport, StepOutcome::DeadLettered);
            step.subscription = Some(report.subscription.clone());
            step.record_id = Some(report.record_id.clone());
            step.reason = Some(REASON_BOUNCED.to_owned());
            steps.push((report.envelope_id.clone(), step));
            out.push(dl);
        }
    }
    // The lineage records go in the same write as the events: durable before the ack, with
    // no wait for the lineage publisher. A CONTRL made here is recorded as received, without
    // its position, which its own routing records.
    let contrl: Vec<Received> = made.iter().map(|(_, e)| Received::of(e, None)).collect();
    let folded = lineage.writes(&[seen.as_slice(), &contrl].concat(), &steps);
    let folds = folded.is_some();
    let lineage_from = out.len();
    out.extend(folded.into_iter().flatten());
    let positions = publish_retrying(bus, out, cancel).await?;
    if folds {
        lineage.published_at(positions.get(lineage_from..).unwrap_or_default());
    } else {
        // The lineage on a log of its own (tests of the stages): through its publisher.
        let made = made
            .iter()
            .map(|(i, e)| Received::of(e, positions.get(*i).copied()));
        for received in seen.into_iter().chain(made) {
            lineage.received(received).await;
        }
    }
    for (id, step) in steps {
        crate::observe::metrics::routed(
            &id,
            step.stage,
            step.outcome,
            step.kind.as_deref(),
            step.reason.as_deref(),
        );
        if !folds {
            lineage.step(&id, step).await;
        }
    }
    // Routed, and recorded, on disk: a node killed before the ack leaves the batch to be
    // routed (and recorded) again by whichever node reads next.
    for record in &batch {
        consumer.ack(record.ack_token()).await?;
    }
    Ok(())
}

/// Keep documents in the content store before the events that refer to them are published;
/// a store that cannot write holds the batch back (nothing is acked) until it can.
async fn keep_content(
    store: &Arc<dyn ContentStore>,
    content: Vec<Vec<u8>>,
    cancel: &CancellationToken,
) -> Result<(), BusError> {
    if content.is_empty() {
        return Ok(());
    }
    let content = Arc::new(content);
    while_unavailable(cancel, || {
        let (store, docs) = (Arc::clone(store), Arc::clone(&content));
        async move {
            tokio::task::spawn_blocking(move || {
                docs.iter().try_for_each(|d| store.put(d).map(drop))
            })
            .await
            .map_err(|e| BusError::Fatal(format!("content store task: {e}")))?
            .map_err(|e| BusError::Unavailable(format!("content store: {e}")))
        }
    })
    .await
}

/// The dead letter for a delivery whose mail bounced for good: the record the subscription
/// delivered, found again from its envelope's position on the raw topic. `None` (with a
/// warning) when the subscription is no mail subscription here or the envelope is gone.
async fn bounce_dead_letter<B: Bus>(
    bus: &B,
    routing: &Arc<Routing>,
    lineage: &Lineage,
    report: &LineageReport,
    at: i64,
) -> Result<Option<OutRecord>, BusError> {
    let sub = report.subscription.as_str();
    if !routing.reports.subscriptions.iter().any(|s| s == sub) {
        tracing::warn!(record = %report.record_id, "a bounce names no mail subscription configured here; recorded in the lineage only");
        return Ok(None);
    }
    // Another node may have taken the message in: its lineage comes through the topic.
    let found = match lineage.find(&report.envelope_id, SETTLE).await {
        Ok(Some(m)) => match m.received.raw {
            Some(raw) => bus.read_at(topics::RAW, raw.partition, raw.offset).await?,
            None => None,
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "lineage unreadable");
            None
        }
    };
    let Some(raw) = found else {
        tracing::warn!(record = %report.record_id, subscription = sub, "a bounced delivery's envelope is not in the log (unknown to the lineage, or past retention); recorded in the lineage only");
        return Ok(None);
    };
    let delivered = if report.record_id == report.envelope_id {
        Some(OutRecord {
            topic: raw.topic.clone(),
            key: raw.key.clone(),
            value: raw.value.clone(),
        })
    } else {
        // Normalising again is parsing: off the async workers.
        let (routing, value, record_id) = (
            Arc::clone(routing),
            raw.value.clone(),
            report.record_id.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let envelope = decode_raw(routing.bodies.as_ref(), &value).ok()?;
            let event = events_of(&routing.normalisers, &envelope)
                .ok()?
                .into_iter()
                .find(|e| e.header().id == record_id)?;
            let key = routing.keyer.key_for(&event);
            event_record(event, key, &envelope).ok()
        })
        .await
        .map_err(|e| BusError::Fatal(format!("router task: {e}")))?
    };
    let Some(delivered) = delivered else {
        tracing::warn!(record = %report.record_id, subscription = sub, "a bounced delivery's record cannot be made again; recorded in the lineage only");
        return Ok(None);
    };
    let detail = [Some(report.reason.as_str()), report.detail.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
    let dl = DeadLetter::new(
        sub,
        (&report.record_id, &report.envelope_id),
        at,
        REASON_BOUNCED,
        Some(detail),
        (delivered.topic, delivered.key.clone(), delivered.value),
    );
    Ok(Some(OutRecord {
        topic: topics::dead_letters(sub),
        key: delivered.key,
        value: dl.to_avro().expect("dead letters fit their schema"),
    }))
}

/// An event as the router publishes it: patient key (`key`, the keyer's for the event) and
/// transport parties filled in, on its kind's topic, keyed by patient (or by envelope without
/// one).
fn event_record(
    mut event: Event,
    key: Option<String>,
    envelope: &RawEnvelope,
) -> Result<OutRecord, ketenbus_schemas::codec::CodecError> {
    let header = event.header_mut();
    header.patient_key.clone_from(&key);
    if header.sender.is_none() {
        header.sender.clone_from(&envelope.sender);
    }
    if header.receiver.is_none() {
        header.receiver.clone_from(&envelope.receiver);
    }
    Ok(OutRecord {
        topic: topics::events(event.kind()),
        key: key.unwrap_or_else(|| envelope.id.clone()).into_bytes(),
        value: event.to_avro()?,
    })
}

fn route_one(record: &Record, routing: &Routing) -> Routed {
    let at = now_ms();
    let envelope = match decode_raw(routing.bodies.as_ref(), &record.value) {
        Ok(e) => e,
        Err(e) => {
            // Not ours to read: keep it whole, with where it came from.
            let id = String::from_utf8_lossy(&record.key).into_owned();
            let dl = dead_letter(
                &id,
                &id,
                record,
                at,
                "undecodable_envelope",
                Some(e.to_string()),
            );
            let mut step = Step::new(at, Stage::Normalise, StepOutcome::Rejected);
            step.reason = Some("undecodable_envelope".into());
            return Routed {
                out: vec![dl],
                ..Routed::steps(vec![(id, step)])
            };
        }
    };
    let seen = Some(Received::of(
        &envelope,
        Some(Position {
            partition: record.partition,
            offset: record.offset,
        }),
    ));
    if envelope.connector == edifact::CONTRL_CONNECTOR {
        // Our own acknowledgement on its way out: nothing clinical to normalise.
        let step = Step::new(at, Stage::Normalise, StepOutcome::Acknowledgement);
        return Routed {
            seen,
            ..Routed::steps(vec![(envelope.id.clone(), step)])
        };
    }
    let mut routed = normalise(record, &envelope, routing, at);
    routed.seen = seen;
    if let Some(contrl) = edifact::reply(&envelope, &routing.contrl_partners) {
        let mut step = Step::new(at, Stage::Acknowledge, StepOutcome::Contrl);
        step.record_id = Some(contrl.id.clone());
        routed.steps.push((envelope.id.clone(), step));
        routed.made.push((routed.out.len(), contrl.clone()));
        routed.out.push(OutRecord {
            topic: topics::RAW.to_owned(),
            key: contrl.id.clone().into_bytes(),
            value: contrl.to_avro().expect("envelopes fit their schema"),
        });
    }
    routed
}

/// Normalise one envelope into event records, or a dead letter.
fn normalise(record: &Record, envelope: &RawEnvelope, routing: &Routing, at: i64) -> Routed {
    // What `RawPatients::declared` finds: the events' patient keys and first receiver
    // (nothing for a message that does not normalise), for the raw deliveries.
    let mut declared = Declared::default();
    let routed = normalise_reading(record, envelope, routing, at, &mut declared);
    if let Some(raw) = &routing.raw_patients {
        raw.remember(&envelope.id, declared);
    }
    routed
}

fn normalise_reading(
    record: &Record,
    envelope: &RawEnvelope,
    routing: &Routing,
    at: i64,
    declared: &mut Declared,
) -> Routed {
    let normaliser = routing.normalisers.get(&envelope.format);
    match events_of(&routing.normalisers, envelope) {
        Ok(events) => {
            // Ask for document bytes only when an event refers to documents.
            let content = match normaliser {
                Some(n) if events.iter().any(|e| !e.attachments().is_empty()) => {
                    n.content(envelope)
                }
                _ => Vec::new(),
            };
            let mut out = Vec::with_capacity(events.len());
            let mut steps = Vec::with_capacity(events.len());
            for event in events {
                let mut step = Step::new(at, Stage::Normalised, StepOutcome::Normalised);
                step.record_id = Some(event.header().id.clone());
                step.kind = Some(event.kind().as_str().to_owned());
                let key = routing.keyer.key_for(&event);
                declared.add(key.as_deref(), event.header().receiver.as_deref());
                step.patient.clone_from(&key);
                if !event.warnings().is_empty() {
                    step.reason = Some("mapped_with_warnings".into());
                    step.detail = Some(event.warnings().join("; "));
                }
                match event_record(event, key, envelope) {
                    Ok(r) if too_large(&r, routing.max_event_bytes) => {
                        let detail = format!(
                            "the {} event is {} bytes, past the log's {} per record",
                            step.kind.as_deref().unwrap_or_default(),
                            r.value.len(),
                            routing.max_event_bytes.unwrap_or_default()
                        );
                        tracing::warn!(envelope = %envelope.id, %detail, "event too large for the log");
                        step.outcome = StepOutcome::Rejected;
                        step.reason = Some(REASON_EVENT_TOO_LARGE.into());
                        step.detail = Some(detail.clone());
                        out.push(dead_letter(
                            &envelope.id,
                            &envelope.id,
                            record,
                            at,
                            REASON_EVENT_TOO_LARGE,
                            Some(detail),
                        ));
                    }
                    Ok(r) => out.push(r),
                    Err(e) => {
                        // A mapping produced a value its schema refuses: a bug, kept for replay.
                        tracing::error!(envelope = %envelope.id, error = %e, "event does not fit its schema");
                        step.outcome = StepOutcome::Rejected;
                        step.reason = Some("schema_mismatch".into());
                        out.push(dead_letter(
                            &envelope.id,
                            &envelope.id,
                            record,
                            at,
                            "schema_mismatch",
                            Some(e.to_string()),
                        ));
                    }
                }
                steps.push((envelope.id.clone(), step));
            }
            let mut bounced = Vec::new();
            if steps.is_empty() {
                steps.push((
                    envelope.id.clone(),
                    Step::new(at, Stage::Normalised, StepOutcome::NoEvents),
                ));
                // A delivery status notification about a mail the mail sink sent: the
                // delivery's lineage shows delivered / delayed / failed, and a failure
                // dead-letters it. A report from elsewhere, or without our token, changes
                // nothing but its own lineage.
                if envelope.format == Format::Rfc822 {
                    match dsn::lineage_of(envelope, &routing.reports) {
                        Ok(Some(r)) => {
                            let outcome = report_outcome(r.outcome);
                            let mut step = Step::new(at, Stage::DeliveryReport, outcome);
                            step.subscription = Some(r.subscription.clone());
                            step.record_id = Some(r.record_id.clone());
                            step.reason = Some(r.reason.clone());
                            step.detail.clone_from(&r.detail);
                            steps.push((r.envelope_id.clone(), step));
                            if r.bounced() {
                                bounced.push(r);
                            }
                        }
                        Ok(None) => {}
                        Err(ignored) => {
                            tracing::debug!(envelope = %envelope.id, reason = ignored.reason(), "a delivery report was ignored");
                            let mut step =
                                Step::new(at, Stage::DeliveryReport, StepOutcome::Ignored);
                            step.reason = Some(ignored.reason().to_owned());
                            steps.push((envelope.id.clone(), step));
                        }
                    }
                }
            }
            Routed {
                out,
                steps,
                made: Vec::new(),
                content,
                bounced,
                seen: None,
            }
        }
        Err(NormaliseError::UnsupportedFormat { format }) => {
            let mut step = Step::new(at, Stage::Normalise, StepOutcome::UnsupportedFormat);
            step.reason = Some("unsupported_format".into());
            step.detail = Some(format!(
                "no normaliser for {format} yet; raw subscribers still receive it"
            ));
            Routed::steps(vec![(envelope.id.clone(), step)])
        }
        Err(e) => {
            let mut step = Step::new(at, Stage::Normalise, StepOutcome::Rejected);
            step.reason = Some(e.reason().to_owned());
            step.detail = Some(e.to_string());
            let dl = dead_letter(
                &envelope.id,
                &envelope.id,
                record,
                at,
                e.reason(),
                Some(e.to_string()),
            );
            Routed {
                out: vec![dl],
                ..Routed::steps(vec![(envelope.id.clone(), step)])
            }
        }
    }
}

/// A delivery report's outcome in the lineage: the connectors hand over the DSN action's
/// outcome by its name, `delivered`, `delayed` or `failed`.
fn report_outcome(name: &str) -> StepOutcome {
    match name {
        "delivered" => StepOutcome::Delivered,
        "delayed" => StepOutcome::Delayed,
        _ => StepOutcome::Failed,
    }
}

fn dead_letter(
    record_id: &str,
    envelope_id: &str,
    record: &Record,
    at: i64,
    reason: &str,
    detail: Option<String>,
) -> OutRecord {
    let source = (
        record.topic.clone(),
        record.key.clone(),
        record.value.clone(),
    );
    let dl = DeadLetter::new(
        "router",
        (record_id, envelope_id),
        at,
        reason,
        detail,
        source,
    );
    OutRecord {
        topic: topics::ROUTER_DEAD_LETTERS.to_owned(),
        key: record.key.clone(),
        value: dl.to_avro().expect("dead letters fit their schema"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::route::normalise::{normalisers, per_receiver};
    use std::collections::BTreeMap;

    use ketenbus_schemas::event::EventKind;

    use super::*;

    fn raw_record(format: Format, body: &[u8]) -> Record {
        let env = RawEnvelope {
            id: "env-1".into(),
            received_at_ms: 0,
            connector: "http".into(),
            format,
            content_type: "application/EDIFACT".into(),
            sender: Some("mailbox:500001234".into()),
            receiver: None,
            body: body.to_vec(),
            attributes: std::collections::BTreeMap::new(),
        };
        Record {
            topic: topics::RAW.into(),
            partition: 0,
            offset: 0,
            key: b"env-1".to_vec(),
            value: env.to_avro().unwrap(),
            timestamp_ms: 0,
        }
    }

    fn two_partitions<const N: usize>(names: [String; N]) -> Vec<crate::bus::TopicSpec> {
        names
            .into_iter()
            .map(|name| crate::bus::TopicSpec {
                name,
                partitions: 2,
            })
            .collect()
    }

    fn envelope_record(env: &RawEnvelope) -> Record {
        Record {
            topic: topics::RAW.into(),
            partition: 0,
            offset: 0,
            key: env.id.clone().into_bytes(),
            value: env.to_avro().unwrap(),
            timestamp_ms: 0,
        }
    }

    #[tokio::test]
    async fn a_bounce_dead_letters_the_very_record_the_subscription_delivered() {
        use crate::bus::embedded::{EmbeddedBus, EmbeddedConfig};

        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap();
        bus.ensure_topics(&two_partitions([
            topics::RAW.to_owned(),
            topics::events(EventKind::Letter),
            topics::dead_letters("gp-by-mail"),
            topics::LINEAGE.to_owned(),
        ]))
        .await
        .unwrap();
        // Node A takes the letter in; node B, on the same log, gets the bounce.
        let (node_a, node_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let lineage = Lineage::start(node_a.path(), Arc::new(bus.clone()))
            .await
            .unwrap();
        let on_b = Lineage::start(node_b.path(), Arc::new(bus.clone()))
            .await
            .unwrap();
        let mut r = routing(normalisers(), &[]);
        r.reports.subscriptions.push("gp-by-mail".into());
        let r = Arc::new(r);

        // A PDF letter came in and was routed: its event refers to the PDF by hash, and
        // the router is handed the PDF's bytes to keep.
        let letter = RawEnvelope {
            id: "env-9".into(),
            received_at_ms: 1_764_000_000_000,
            connector: "smtp".into(),
            format: Format::Rfc822,
            content_type: "message/rfc822".into(),
            sender: None,
            receiver: Some("mailbox:500005678".into()),
            body: include_bytes!("../../../connectors/testdata/mail/letter-pdf.eml").to_vec(),
            attributes: BTreeMap::new(),
        };
        let position = bus
            .publish(vec![OutRecord {
                topic: topics::RAW.into(),
                key: letter.id.clone().into_bytes(),
                value: letter.to_avro().unwrap(),
            }])
            .await
            .unwrap()[0];
        lineage
            .received(Received::of(&letter, Some(position)))
            .await;
        let first = route_one(&envelope_record(&letter), &r);
        assert_eq!(first.out.len(), 1);
        assert_eq!(first.content.len(), 1, "the PDF goes to the content store");

        // Reports that must change nothing: the fixture as it is (no token), one naming the
        // delivery as the sink did before tokens, and a genuine one posted over HTTP.
        let fixture = String::from_utf8(
            include_bytes!("../../../connectors/testdata/mail/dsn-failed.eml").to_vec(),
        )
        .unwrap();
        let with_envid = |envid: &str| {
            fixture.replace(
                "Original-Envelope-Id: 0193a1b2-0000-7000-8000-000000000001.0",
                &format!("Original-Envelope-Id: {envid}"),
            )
        };
        let genuine = with_envid(&dsn::envelope_id(&r.reports.key, "gp-by-mail", "env-9.0"));
        for (connector, body) in [
            ("smtp", fixture.clone()),
            ("smtp", with_envid("gp-by-mail/env-9.0")),
            ("http", genuine.clone()),
        ] {
            let mut record = raw_record(Format::Rfc822, body.as_bytes());
            let mut env = RawEnvelope::from_avro(&record.value).unwrap();
            env.connector = connector.into();
            record.value = env.to_avro().unwrap();
            let routed = route_one(&record, &r);
            assert!(routed.out.is_empty() && routed.bounced.is_empty());
            assert!(
                routed.steps.iter().all(|(id, _)| id == "env-1"),
                "only the report's own lineage"
            );
            let (_, step) = routed.steps.last().unwrap();
            assert_eq!(
                (step.stage.as_str(), step.outcome.as_str()),
                ("delivery_report", "ignored")
            );
        }

        // The mail server bounces the delivery of event env-9.0 for good.
        let mut report = raw_record(Format::Rfc822, genuine.as_bytes());
        let mut env = RawEnvelope::from_avro(&report.value).unwrap();
        env.connector = "smtp".into();
        report.value = env.to_avro().unwrap();
        let routed = route_one(&report, &r);
        assert!(routed.out.is_empty());
        assert_eq!(routed.bounced.len(), 1);
        let step = &routed.steps.last().unwrap();
        assert_eq!(
            step.0, "env-9",
            "the step lands in the delivered message's lineage"
        );
        assert_eq!(step.1.outcome.as_str(), "failed");

        let dl = bounce_dead_letter(&bus, &r, &on_b, &routed.bounced[0], 7)
            .await
            .unwrap()
            .expect("a dead letter");
        assert_eq!(dl.topic, topics::dead_letters("gp-by-mail"));
        let letter_dl = DeadLetter::from_avro(&dl.value).unwrap();
        assert_eq!(
            letter_dl.value, first.out[0].value,
            "the record as delivered"
        );
        assert_eq!(letter_dl.key, first.out[0].key);
        assert_eq!(letter_dl.source_topic, topics::events(EventKind::Letter));
        assert_eq!(letter_dl.record_id, "env-9.0");
        assert_eq!(letter_dl.envelope_id, "env-9");
        assert_eq!(letter_dl.reason, REASON_BOUNCED);
        let detail = letter_dl.detail.unwrap();
        assert!(
            detail.starts_with("dsn_5.1.1: ") && detail.contains("user unknown"),
            "{detail}"
        );

        // A bounce for a subscription not configured here is only recorded.
        let r = Arc::new(routing(normalisers(), &[]));
        assert!(
            bounce_dead_letter(&bus, &r, &lineage, &routed.bounced[0], 8)
                .await
                .unwrap()
                .is_none()
        );
    }

    fn routing(normalisers: Normalisers, contrl_partners: &[&str]) -> Routing {
        Routing {
            normalisers,
            keyer: PatientKeyer::new(b"0123456789abcdef".to_vec()),
            contrl_partners: contrl_partners.iter().map(|p| (*p).to_owned()).collect(),
            content: None,
            bodies: None,
            raw_patients: None,
            max_event_bytes: None,
            reports: dsn::ReportCheck {
                key: b"report key for the router tests".to_vec(),
                subscriptions: Vec::new(),
                sources: dsn::ReportSources {
                    smtp: true,
                    imap: std::collections::BTreeSet::new(),
                },
            },
        }
    }

    const MEDLAB: &str = "UNB+UNOA:1+500001234+500005678+261101:0815+IC0042'UNH+M0042+MEDLAB:1'\
ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567'PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'\
DET+26:11:01+07:40'IDE+J+L2611017+bloed'SEC+CHEMIE'BEP+0+Kalium+5.9++mmol/l+>+3.5+5.0+K'UNT+8+M0042'UNZ+1+IC0042'";

    /// A routed batch's lineage records (the envelope as received, where it was read, and
    /// its events) are on the log when its raw records are acked, in the same write as the
    /// events: a node killed right after the ack leaves nothing of them in its memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_acked_with_its_lineage_on_the_log() {
        use crate::bus::test_log;

        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(test_log(dir.path(), "log.db"));
        bus.ensure_topics(&two_partitions([
            topics::RAW.to_owned(),
            topics::events(EventKind::LabResult),
            topics::ROUTER_DEAD_LETTERS.to_owned(),
            topics::LINEAGE.to_owned(),
        ]))
        .await
        .unwrap();
        let lineage = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        let raw = raw_record(Format::Edifact, MEDLAB.as_bytes());
        let at = bus
            .publish(vec![OutRecord {
                topic: raw.topic,
                key: raw.key,
                value: raw.value,
            }])
            .await
            .unwrap()[0];
        let mut consumer = bus
            .subscribe(topics::ROUTER_GROUP, &[topics::RAW.to_owned()])
            .await
            .unwrap();
        let routing = Arc::new(routing(normalisers(), &[]));
        let cancel = CancellationToken::new();
        route_batch(bus.as_ref(), &mut consumer, &routing, &lineage, &cancel)
            .await
            .unwrap();
        consumer.commit().await.unwrap();
        let lag = bus.lag(topics::ROUTER_GROUP, topics::RAW).await.unwrap();
        assert!(
            lag.iter().all(|(_, committed, end)| committed == end),
            "acked: {lag:?}"
        );
        let on_log = crate::observe::lineage::on_topic(bus.as_ref()).await;
        let seen = on_log
            .iter()
            .find_map(|r| r.received.as_ref())
            .expect("the envelope recorded as received");
        assert_eq!(
            (i64::from(seen.raw_partition), seen.raw_offset),
            (i64::from(at.partition), at.offset)
        );
        assert!(
            on_log
                .iter()
                .filter_map(|r| r.step.as_ref())
                .any(|s| s.outcome == "normalised"),
            "its event recorded"
        );
    }

    #[test]
    fn the_reading_handed_to_raw_deliveries_is_the_one_they_would_make() {
        let keyer = PatientKeyer::new(b"0123456789abcdef".to_vec());
        let raw = Arc::new(RawPatients::new(keyer));
        let mut r = routing(normalisers(), &[]);
        r.raw_patients = Some(Arc::clone(&raw));
        let two_patients = format!(
            "UNB+UNOA:1+500001234+500005678+261101:0815+IC0043'{}{}UNZ+2+IC0043'",
            MEDLAB
                .trim_start_matches("UNB+UNOA:1+500001234+500005678+261101:0815+IC0042'")
                .trim_end_matches("UNZ+1+IC0042'"),
            MEDLAB
                .trim_start_matches("UNB+UNOA:1+500001234+500005678+261101:0815+IC0042'")
                .trim_end_matches("UNZ+1+IC0042'")
                .replace("M0042", "M0043")
                .replace("BSN999911120", "BSN999990007"),
        );
        // A wrong UNT count: dead-lettered, so it declares no one.
        let miscounted = MEDLAB.replace("UNT+8", "UNT+3");
        let bodies: [(Format, &[u8]); 4] = [
            (Format::Edifact, MEDLAB.as_bytes()),
            (Format::Edifact, two_patients.as_bytes()),
            (Format::Edifact, miscounted.as_bytes()),
            (Format::FhirJson, b"{\"resourceType\": \"Bundle\"}"),
        ];
        let mut with_patients = 0;
        for (format, body) in bodies {
            let record = raw_record(format, body);
            route_one(&record, &r);
            let envelope = decode_raw(None, &record.value).unwrap();
            let handed = raw.remembered(&envelope.id).expect("the router's reading");
            assert_eq!(handed, raw.declared(&envelope), "{format:?}");
            with_patients += usize::from(!handed.patients.is_empty());
        }
        assert_eq!(with_patients, 2, "the readings compared are not all empty");
        assert_eq!(
            raw.remembered("env-1").unwrap().patients.len(),
            0,
            "the latest reading of an id wins"
        );
    }

    #[test]
    fn mapping_warnings_reach_the_lineage_step() {
        let routed = route_one(
            &raw_record(
                Format::Edifact,
                include_bytes!("../../../connectors/testdata/edifact/ketenbus/mrpn32-fidelity.edi"),
            ),
            &routing(normalisers(), &[]),
        );
        assert_eq!(routed.out.len(), 1);
        let step = &routed.steps[0].1;
        assert_eq!(step.outcome.as_str(), "normalised");
        assert_eq!(step.reason.as_deref(), Some("mapped_with_warnings"));
        let detail = step.detail.as_deref().unwrap();
        assert!(detail.contains("investigation has no code"), "{detail}");
        assert!(
            detail.contains("reference range low 5,0 above high 3,5"),
            "{detail}"
        );
    }

    #[test]
    fn a_format_without_normaliser_is_recorded_not_dropped() {
        let routed = route_one(
            &raw_record(Format::Rfc822, b"Subject: x\r\n\r\nhi"),
            &routing(HashMap::new(), &[]),
        );
        assert!(
            routed.out.is_empty(),
            "raw subscribers read the raw topic; nothing else to publish"
        );
        assert_eq!(routed.steps.len(), 1);
        assert_eq!(routed.steps[0].1.outcome.as_str(), "unsupported_format");
        assert_eq!(
            routed.steps[0].1.reason.as_deref(),
            Some("unsupported_format")
        );
    }

    /// The router records each envelope as received again, from where it read it: the node
    /// that took it in may have died before its own lineage write was published.
    #[test]
    fn every_routed_envelope_is_recorded_as_received_where_it_was_read() {
        let mut record = raw_record(Format::Rfc822, b"Subject: x\r\n\r\nhi");
        (record.partition, record.offset) = (2, 41);
        let routed = route_one(&record, &routing(normalisers(), &[]));
        let seen = routed.seen.expect("recorded as received");
        assert_eq!(
            (seen.id.as_str(), seen.raw),
            (
                "env-1",
                Some(Position {
                    partition: 2,
                    offset: 41
                })
            )
        );
        assert_eq!(seen.connector, "http");
    }

    #[test]
    fn what_cannot_be_normalised_is_dead_lettered_whole() {
        let record = raw_record(Format::Edifact, b"this is not edifact");
        let routed = route_one(&record, &routing(normalisers(), &[]));
        assert_eq!(routed.out.len(), 1);
        assert_eq!(routed.out[0].topic, topics::ROUTER_DEAD_LETTERS);
        let dl = DeadLetter::from_avro(&routed.out[0].value).unwrap();
        assert_eq!(dl.value, record.value, "the original record is kept whole");
        assert_eq!(dl.reason, routed.steps[0].1.reason.clone().unwrap());
        assert_eq!(routed.steps[0].1.outcome.as_str(), "rejected");
    }

    /// Mapping can make a message grow: one whose event is past the log's record limit is
    /// dead-lettered whole (it fits: it came off the log), with the sizes in its reason,
    /// instead of a publish the log refuses, which would stop the router for every message.
    #[test]
    fn a_message_whose_event_is_past_the_log_limit_is_dead_lettered_whole() {
        let record = raw_record(Format::Edifact, MEDLAB.as_bytes());
        let mut r = routing(normalisers(), &[]);
        let fits = route_one(&record, &r);
        assert!(
            fits.out
                .iter()
                .all(|o| o.topic == topics::events(EventKind::LabResult)),
            "one lab-result event"
        );
        let event_bytes = (fits.out[0].value.len() + fits.out[0].key.len()) as u64;
        r.max_event_bytes = Some(event_bytes + RECORD_FRAMING);
        assert_eq!(
            route_one(&record, &r).out[0].topic,
            fits.out[0].topic,
            "at the limit"
        );
        r.max_event_bytes = Some(event_bytes + RECORD_FRAMING - 1);
        let routed = route_one(&record, &r);
        assert_eq!(routed.out.len(), 1);
        assert_eq!(routed.out[0].topic, topics::ROUTER_DEAD_LETTERS);
        let dl = DeadLetter::from_avro(&routed.out[0].value).unwrap();
        assert_eq!(dl.value, record.value, "the original record is kept whole");
        assert_eq!(dl.reason, REASON_EVENT_TOO_LARGE);
        let step = &routed.steps[0].1;
        assert_eq!(step.outcome.as_str(), "rejected");
        assert_eq!(step.reason.as_deref(), Some(REASON_EVENT_TOO_LARGE));
        assert!(
            step.detail
                .as_deref()
                .unwrap()
                .contains("lab_result event is"),
            "{step:?}"
        );
    }

    #[test]
    fn events_get_a_patient_key_and_the_transport_parties() {
        let routed = route_one(
            &raw_record(Format::Edifact, MEDLAB.as_bytes()),
            &routing(normalisers(), &[]),
        );
        assert!(
            !routed.out.is_empty(),
            "{:?}",
            routed.steps.iter().map(|s| &s.1).collect::<Vec<_>>()
        );
        let rec = &routed.out[0];
        assert_eq!(rec.topic, topics::events(EventKind::LabResult));
        let event = ketenbus_schemas::Event::from_avro(EventKind::LabResult, &rec.value).unwrap();
        let key = event.header().patient_key.clone().expect("patient key");
        assert_eq!(rec.key, key.as_bytes());
        assert!(!key.contains("999911120"));
        assert!(event.header().sender.is_some());
        assert_eq!(routed.steps[0].1.outcome.as_str(), "normalised");
    }

    #[test]
    fn a_letter_to_two_recipients_is_one_event_per_recipient_with_stable_ids() {
        let mut header =
            ketenbus_schemas::EventHeader::new(EventKind::Letter, "env-9", 0, "rfc822");
        header.id = "env-9.0".into();
        let letter = Event::Letter(ketenbus_schemas::event::LetterEvent {
            text: Some("zie bijlage".into()),
            ..ketenbus_schemas::event::LetterEvent::new(header)
        });
        let envelope = RawEnvelope {
            id: "env-9".into(),
            received_at_ms: 0,
            connector: "smtp".into(),
            format: Format::Rfc822,
            content_type: "message/rfc822".into(),
            sender: None,
            receiver: Some("mailbox:500005678".into()),
            body: Vec::new(),
            attributes: BTreeMap::from([(
                "mail.rcpt_to".to_owned(),
                "500005678@lms.example.test,500009876@lms.example.test".to_owned(),
            )]),
        };
        let out = per_receiver(vec![letter.clone()], &envelope);
        let got: Vec<(String, Option<String>)> = out
            .iter()
            .map(|e| (e.header().id.clone(), e.header().receiver.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("env-9.0".to_owned(), Some("mailbox:500005678".to_owned())),
                ("env-9.1".to_owned(), Some("mailbox:500009876".to_owned())),
            ]
        );
        assert_eq!(
            per_receiver(vec![letter], &envelope).len(),
            2,
            "normalising again gives the same"
        );
    }

    #[test]
    fn a_partner_that_asked_gets_a_contrl_addressed_to_it() {
        let r = routing(normalisers(), &["mailbox:500001234"]);
        let routed = route_one(&raw_record(Format::Edifact, MEDLAB.as_bytes()), &r);
        let (i, made) = routed.made.first().expect("a CONTRL was made");
        let rec = &routed.out[*i];
        assert_eq!(rec.topic, topics::RAW);
        let contrl = RawEnvelope::from_avro(&rec.value).unwrap();
        assert_eq!(
            contrl.id, "env-1.contrl",
            "derived from the envelope: a replay makes the same"
        );
        assert_eq!(made.id, contrl.id);
        assert_eq!(contrl.connector, edifact::CONTRL_CONNECTOR);
        assert_eq!(contrl.receiver.as_deref(), Some("mailbox:500001234"));
        assert_eq!(contrl.sender.as_deref(), Some("mailbox:500005678"));
        assert_eq!(contrl.attributes["in_reply_to"], "env-1");
        let doc = edifact::parse(&contrl.body).expect("the CONTRL parses");
        let text = String::from_utf8_lossy(&contrl.body);
        assert!(text.contains("CONTRL"), "{text}");
        assert!(
            text.contains("UCI+IC0042+500001234"),
            "answers the interchange: {text}"
        );
        assert_eq!(doc.messages().len(), 1);
        // Routing the CONTRL itself makes nothing further.
        let again = route_one(
            &Record {
                value: rec.value.clone(),
                ..raw_record(Format::Edifact, b"")
            },
            &r,
        );
        assert!(again.out.is_empty() && again.made.is_empty());
        assert_eq!(again.steps[0].1.outcome.as_str(), "acknowledgement");
        // Partners that did not ask get none.
        let none = route_one(
            &raw_record(Format::Edifact, MEDLAB.as_bytes()),
            &routing(normalisers(), &["mailbox:1"]),
        );
        assert!(none.made.is_empty());
    }
}
