//! The router: reads raw envelopes, normalises them into events (pure functions from the
//! connectors), publishes the events on their kind's topic, dead-letters what cannot be
//! normalised, and records each step in the lineage. One consumer group, batch by batch:
//! a batch's events are published in one durable write before its envelopes are acked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::{Normalize, NormalizeError};
use ketenbus_schemas::{topics, AvroRecord, DeadLetter, Format, RawEnvelope};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Consumer, OutRecord, Record};
use crate::health::{Health, State};
use crate::keys::PatientKeyer;
use crate::lineage::{Lineage, Step};
use crate::{now_ms, publish_retrying};

/// Consumer group of the router.
pub const GROUP: &str = "ketenbus.router";
const BATCH: usize = 256;

/// Normalisers by format; a format without one is recorded as `unsupported_format`.
pub type Normalizers = HashMap<Format, Box<dyn Normalize>>;

/// The normalisers this build has.
#[must_use]
pub fn normalizers() -> Normalizers {
    HashMap::new()
}

/// What the router decided for one raw record.
struct Routed {
    out: Vec<OutRecord>,
    steps: Vec<(String, Step)>,
}

/// Run the router until `cancel`.
pub async fn run<B: Bus>(
    bus: Arc<B>,
    normalizers: Arc<Normalizers>,
    keyer: PatientKeyer,
    lineage: Lineage,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    const NAME: &str = "router";
    health.set(NAME, State::Starting);
    let mut consumer = match bus.subscribe(GROUP, &[topics::RAW.to_owned()]).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "router cannot subscribe to the raw topic");
            health.set(NAME, State::Failed(e.to_string()));
            return;
        }
    };
    health.set(NAME, State::Ready);
    while !cancel.is_cancelled() {
        match route_batch(bus.as_ref(), &mut consumer, &normalizers, &keyer, &lineage, &cancel).await {
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
    normalizers: &Normalizers,
    keyer: &PatientKeyer,
    lineage: &Lineage,
    cancel: &CancellationToken,
) -> Result<(), BusError> {
    let Some(first) = consumer.poll(Duration::from_millis(200)).await? else {
        return Ok(());
    };
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match consumer.poll(Duration::ZERO).await? {
            Some(r) => batch.push(r),
            None => break,
        }
    }
    let mut out = Vec::new();
    let mut steps = Vec::new();
    for record in &batch {
        let routed = route_one(record, normalizers, keyer);
        out.extend(routed.out);
        steps.extend(routed.steps);
    }
    publish_retrying(bus, out, cancel).await?;
    for (id, step) in steps {
        crate::telemetry::routed(&step);
        lineage.step(&id, step).await;
    }
    for record in &batch {
        consumer.ack(record.ack_token()).await?;
    }
    Ok(())
}

fn route_one(record: &Record, normalizers: &Normalizers, keyer: &PatientKeyer) -> Routed {
    let at = now_ms();
    let envelope = match RawEnvelope::from_avro(&record.value) {
        Ok(e) => e,
        Err(e) => {
            // Not ours to read: keep it whole, with where it came from.
            let id = String::from_utf8_lossy(&record.key).into_owned();
            let dl = dead_letter(&id, &id, record, at, "undecodable_envelope", Some(e.to_string()));
            let mut step = Step::new(at, "normalise", "rejected");
            step.reason = Some("undecodable_envelope".into());
            return Routed { out: vec![dl], steps: vec![(id, step)] };
        }
    };
    let result = match normalizers.get(&envelope.format) {
        Some(n) => n.normalize(&envelope),
        None => Err(NormalizeError::UnsupportedFormat { format: envelope.format.as_str() }),
    };
    match result {
        Ok(events) => {
            let mut out = Vec::with_capacity(events.len());
            let mut steps = Vec::with_capacity(events.len());
            for mut event in events {
                let key = keyer.key_for(&event);
                let header = event.header_mut();
                header.patient_key.clone_from(&key);
                if header.sender.is_none() {
                    header.sender.clone_from(&envelope.sender);
                }
                if header.receiver.is_none() {
                    header.receiver.clone_from(&envelope.receiver);
                }
                let mut step = Step::new(at, "normalised", "normalised");
                step.record_id = Some(event.header().id.clone());
                step.kind = Some(event.kind().as_str().to_owned());
                match event.to_avro() {
                    Ok(value) => out.push(OutRecord {
                        topic: topics::events(event.kind()),
                        key: key.unwrap_or_else(|| envelope.id.clone()).into_bytes(),
                        value,
                    }),
                    Err(e) => {
                        // A mapping produced a value its schema refuses: a bug, kept for replay.
                        tracing::error!(envelope = %envelope.id, error = %e, "event does not fit its schema");
                        step.outcome = "rejected".into();
                        step.reason = Some("schema_mismatch".into());
                        out.push(dead_letter(&envelope.id, &envelope.id, record, at, "schema_mismatch", Some(e.to_string())));
                    }
                }
                steps.push((envelope.id.clone(), step));
            }
            if steps.is_empty() {
                steps.push((envelope.id.clone(), Step::new(at, "normalised", "no_events")));
            }
            Routed { out, steps }
        }
        Err(NormalizeError::UnsupportedFormat { format }) => {
            let mut step = Step::new(at, "normalise", "unsupported_format");
            step.reason = Some("unsupported_format".into());
            step.detail = Some(format!("no normaliser for {format} yet; raw subscribers still receive it"));
            Routed { out: Vec::new(), steps: vec![(envelope.id.clone(), step)] }
        }
        Err(e) => {
            let mut step = Step::new(at, "normalise", "rejected");
            step.reason = Some(e.reason().to_owned());
            step.detail = Some(e.to_string());
            let dl = dead_letter(&envelope.id, &envelope.id, record, at, e.reason(), Some(e.to_string()));
            Routed { out: vec![dl], steps: vec![(envelope.id.clone(), step)] }
        }
    }
}

fn dead_letter(record_id: &str, envelope_id: &str, record: &Record, at: i64, reason: &str, detail: Option<String>) -> OutRecord {
    let dl = DeadLetter {
        id: format!("{record_id}@{at}"),
        stage: "router".into(),
        record_id: record_id.to_owned(),
        envelope_id: envelope_id.to_owned(),
        at_ms: at,
        reason: reason.to_owned(),
        detail,
        source_topic: record.topic.clone(),
        key: record.key.clone(),
        value: record.value.clone(),
    };
    OutRecord {
        topic: topics::ROUTER_DEAD_LETTERS.to_owned(),
        key: record.key.clone(),
        value: dl.to_avro().expect("dead letters fit their schema"),
    }
}
