//! Finishing a batch: outcomes, dead letters and parked records published, audit records
//! appended, lineage recorded and on the lineage topic, and only then the records
//! acknowledged: a node killed in between leaves them to be delivered, and recorded, again
//! by whichever node takes its partitions.

use ketenbus_connectors::DeliveryError;
use ketenbus_schemas::lineage::Stage;
use ketenbus_schemas::{AvroRecord, DeadLetter, DeliveryOutcome, Outcome, topics};
use tokio_util::sync::CancellationToken;

use super::Done;
use crate::bus::{AckToken, Bus, BusError, Consumer, OutRecord, publish_retrying};
use crate::observe::lineage::{Lineage, Step};
use crate::observe::metrics;
use ketenbus_schemas::now_ms;

/// The two consumers of a subscription, and which topic the second reads.
pub(super) struct Consumers<'a, C> {
    pub(super) main: &'a mut C,
    pub(super) retry: &'a mut C,
    pub(super) retry_topic: &'a str,
}

/// Acknowledge what [`write`] wrote.
pub(super) async fn ack<C: Consumer>(
    consumers: Consumers<'_, C>,
    tokens: Vec<AckToken>,
) -> Result<(), BusError> {
    for token in tokens {
        let consumer = if token.topic == consumers.retry_topic {
            &mut *consumers.retry
        } else {
            &mut *consumers.main
        };
        consumer.ack(token).await?;
    }
    Ok(())
}

/// Publish outcomes, dead letters and parked records of finished records, their lineage
/// steps and audit records, all on disk when it returns the tokens to [`ack`]. It needs no
/// consumer: the subscription's loop goes on reading and handing out while it writes.
pub(super) async fn write<B: Bus>(
    bus: &B,
    subscription: &str,
    batch: Vec<Done>,
    lineage: &Lineage,
    cancel: &CancellationToken,
    audit: Option<&crate::observe::audit::Audit>,
) -> Result<Vec<AckToken>, BusError> {
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
            let mut dl = DeadLetter::new(
                subscription,
                (&d.record_id, &d.envelope_id),
                at,
                reason.as_deref().unwrap_or("unknown"),
                detail.clone(),
                (source_topic.clone(), key.clone(), value.clone()),
            );
            dl.attempt = Some(i32::try_from(d.attempt).unwrap_or(i32::MAX));
            out.push(OutRecord {
                topic: topics::dead_letters(subscription),
                key: key.clone(),
                value: dl.to_avro().expect("dead letters fit their schema"),
            });
        }
        if let Some((id, key)) = &d.resolves
            && d.outcome != Outcome::Filtered
        {
            out.push(crate::deliver::dlq::resolution(
                subscription,
                id,
                (&d.record_id, &d.envelope_id),
                key,
                at,
            ));
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
    // The lineage steps of finished records go in the same append as their outcomes: one
    // group commit, and no wait for the lineage publisher (parked records got their step,
    // "retrying", from their lane).
    let steps: Vec<(String, Step)> = batch
        .iter()
        .filter(|d| d.park.is_none())
        .map(|d| (d.envelope_id.clone(), step_of(d, subscription, at)))
        .collect();
    let folded = lineage.records(&steps);
    let folds = folded.is_some();
    let lineage_from = out.len();
    out.extend(folded.into_iter().flatten());
    // Outcomes, parked records, lineage steps and audit records go to disk side by side;
    // all before the ack.
    let entries: Vec<_> = batch.iter().flat_map(|d| d.audit.iter().cloned()).collect();
    let (published, audited) = tokio::join!(publish_retrying(bus, out, cancel), async {
        match audit {
            Some(a) => a.append(entries).await,
            None => Ok(()),
        }
    });
    let positions = published?;
    audited.map_err(|e| BusError::Fatal(e.to_string()))?;
    if folds {
        lineage.published_at(positions.get(lineage_from..).unwrap_or_default());
    } else {
        // The lineage on a log of its own (tests of the stages): through its publisher.
        for (id, step) in steps {
            lineage.step(&id, step).await;
        }
        let _ = lineage.published().await.await;
    }
    // Written and on disk, not yet acknowledged: a kill here leaves the batch to be
    // delivered (and recorded) again. KETENBUS_FAULT=finish_kill_after:N (tests only)
    #[cfg(debug_assertions)]
    crate::fault::hit("finish_kill_after");
    let mut tokens = Vec::with_capacity(batch.len());
    for d in batch {
        if d.park.is_none() {
            match (d.outcome, &d.error) {
                (Outcome::DeadLettered, e) => metrics::dead_lettered(
                    subscription,
                    &d.record_id,
                    d.attempt,
                    e.as_ref().map_or("unknown", DeliveryError::reason),
                ),
                (Outcome::Filtered, _) => metrics::filtered(subscription),
                _ => {} // delivered: counted by the lane, with its latency
            }
        }
        tokens.push(d.token);
    }
    Ok(tokens)
}

/// The lineage step of a finished (not parked) record.
fn step_of(d: &Done, subscription: &str, at: i64) -> Step {
    let stage = if d.outcome == Outcome::DeadLettered {
        Stage::DeadLettered
    } else {
        Stage::Delivery
    };
    let mut step = Step::new(at, stage, d.outcome.into());
    step.subscription = Some(subscription.to_owned());
    step.record_id = Some(d.record_id.clone());
    step.kind = Some(d.kind.to_owned());
    step.attempt = (d.attempt > 0).then_some(d.attempt);
    if let Some(e) = &d.error {
        step.reason = Some(e.reason().to_owned());
        step.detail = Some(e.detail().to_owned());
    } else if let Some(origin) = &d.origin {
        step.detail = Some(format!("address from {origin}"));
    }
    step
}
