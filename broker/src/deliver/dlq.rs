//! Dead letters: list them, replay them into one subscription and purge them (`ketenbus dlq`).
//! Replay publishes the dead letter onto `ketenbus.replay.<subscription>`, which only that
//! subscription reads, so other subscriptions do not receive it twice. Dead letters are never
//! removed by retention: only [`purge`] removes them, after writing an audit record for each.

use ketenbus_schemas::{AvroRecord, DeadLetter, topics};

use crate::bus::{Bus, BusError, OutRecord};
use crate::observe::audit::{Audit, AuditError, Entry};

/// Which dead letters.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these dead-letter ids or record ids (empty: all).
    pub ids: Vec<String>,
    /// Only those dead-lettered at or after this time, ms since the epoch.
    pub since_ms: Option<i64>,
    /// Only those dead-lettered before this time, ms since the epoch.
    pub before_ms: Option<i64>,
}

impl Selection {
    fn matches(&self, dl: &DeadLetter) -> bool {
        (self.ids.is_empty()
            || self
                .ids
                .iter()
                .any(|i| *i == dl.id || *i == dl.record_id || *i == dl.envelope_id))
            && self.since_ms.is_none_or(|t| dl.at_ms >= t)
            && self.before_ms.is_none_or(|t| dl.at_ms < t)
    }
}

/// Dead letters of `stage` (a subscription name, or `router`) that match.
///
/// # Errors
/// When the log cannot be read; undecodable records are skipped with a warning.
pub async fn list<B: Bus>(
    bus: &B,
    stage: &str,
    sel: &Selection,
) -> Result<Vec<DeadLetter>, BusError> {
    Ok(select(bus, stage, sel)
        .await?
        .into_iter()
        .map(|(dl, _)| dl)
        .collect())
}

fn topic_of(stage: &str) -> String {
    if stage == "router" {
        topics::ROUTER_DEAD_LETTERS.to_owned()
    } else {
        topics::dead_letters(stage)
    }
}

/// Matching dead letters of `stage` with their positions (partition, offset).
async fn select<B: Bus>(
    bus: &B,
    stage: &str,
    sel: &Selection,
) -> Result<Vec<(DeadLetter, (u32, i64))>, BusError> {
    let topic = topic_of(stage);
    let mut out = Vec::new();
    for r in bus.read_all(&topic).await? {
        match DeadLetter::from_avro(&r.value) {
            Ok(dl) if sel.matches(&dl) => out.push((dl, (r.partition, r.offset))),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(topic = %topic, offset = r.offset, error = %e, "skipping an undecodable dead letter")
            }
        }
    }
    Ok(out)
}

/// Replay matching dead letters of `subscription` to it; returns how many. With `audit`, an
/// audit record per dead letter (action `dlq_replay`) is on disk first.
///
/// # Errors
/// When the log cannot be read or written, or the audit record cannot be written (then
/// nothing is replayed).
pub async fn replay<B: Bus>(
    bus: &B,
    subscription: &str,
    sel: &Selection,
    audit: Option<&Audit>,
    actor: &str,
) -> Result<usize, PurgeError> {
    let letters = list(bus, subscription, sel).await?;
    if let Some(audit) = audit {
        audit
            .append(audit_entries("dlq_replay", actor, letters.iter()))
            .await?;
    }
    let records: Vec<OutRecord> = letters
        .iter()
        .map(|dl| OutRecord {
            topic: topics::replay(subscription),
            key: dl.key.clone(),
            value: dl.to_avro().expect("dead letters fit their schema"),
        })
        .collect();
    let n = records.len();
    bus.publish(records).await?;
    Ok(n)
}

/// One audit record per dead letter an operator worked on: the operator as actor, the record
/// and message ids, the patient pseudonym for events (their key).
pub fn audit_entries<'a>(
    action: &str,
    actor: &str,
    letters: impl Iterator<Item = &'a DeadLetter>,
) -> Vec<Entry> {
    letters
        .map(|dl| Entry {
            action: action.to_owned(),
            actor: actor.to_owned(),
            party: None,
            patient: dl
                .source_topic
                .starts_with("ketenbus.events.")
                .then(|| String::from_utf8(dl.key.clone()).ok())
                .flatten(),
            event_id: Some(dl.record_id.clone()),
            envelope_id: Some(dl.envelope_id.clone()),
            purpose: None,
        })
        .collect()
}

/// Why a replay or a purge stopped.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// The log could not be read or the records not removed.
    #[error("dead letters: {0}")]
    Bus(#[from] BusError),
    /// The audit record could not be written: nothing was removed.
    #[error("dead letters: {0}")]
    Audit(#[from] AuditError),
}

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Dead letters that matched (each has an audit record).
    pub selected: usize,
    /// Dead letters removed from the log (fewer than `selected` only on Kafka, which removes
    /// a partition's oldest records only).
    pub removed: u64,
}

/// Remove matching dead letters of `stage` (a subscription, or `router`) from the log. First
/// an audit record per dead letter (action `dlq_purge`, the operator as actor, the record and
/// message ids, the patient pseudonym for events) is on disk, then they are removed.
///
/// # Errors
/// When the log cannot be read or written, or the audit record cannot be written (then
/// nothing is removed).
pub async fn purge<B: Bus>(
    bus: &B,
    stage: &str,
    sel: &Selection,
    audit: Option<&Audit>,
    actor: &str,
) -> Result<Purged, PurgeError> {
    let letters = select(bus, stage, sel).await?;
    if letters.is_empty() {
        return Ok(Purged {
            selected: 0,
            removed: 0,
        });
    }
    if let Some(audit) = audit {
        audit
            .append(audit_entries(
                "dlq_purge",
                actor,
                letters.iter().map(|(dl, _)| dl),
            ))
            .await?;
    }
    let positions: Vec<(u32, i64)> = letters.iter().map(|(_, p)| *p).collect();
    let removed = bus.remove(&topic_of(stage), &positions).await?;
    Ok(Purged {
        selected: letters.len(),
        removed,
    })
}
