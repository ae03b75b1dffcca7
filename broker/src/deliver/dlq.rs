//! Dead letters: list them, replay them into one subscription and purge them (`ketenbus dlq`,
//! and the console's operator endpoints: both call these functions).
//! Replay publishes the dead letter onto `ketenbus.replay.<subscription>`, which only that
//! subscription reads, so other subscriptions do not receive it twice. The subscription
//! records a `replayed` lineage step, counts attempts on from those the dead letter records,
//! and once the replayed record is delivered (or dead-lettered again, under a new id) it
//! publishes a *resolution record* onto the dead-letter topic: the same id with
//! `resolved_at_ms` set and no value. A resolved dead letter is no longer listed or replayed
//! ([`list_with_resolved`] shows it). Dead letters are never removed by retention: only
//! [`purge`] removes them (with their resolution records), after writing an audit record for
//! each.

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

/// Dead letters of `stage` (a subscription name, or `router`) that match and are not
/// resolved.
///
/// # Errors
/// When the log cannot be read; undecodable records are skipped with a warning.
pub async fn list<B: Bus>(
    bus: &B,
    stage: &str,
    sel: &Selection,
) -> Result<Vec<DeadLetter>, BusError> {
    Ok(list_with_resolved(bus, stage, sel)
        .await?
        .into_iter()
        .filter(|(_, resolved)| resolved.is_none())
        .map(|(dl, _)| dl)
        .collect())
}

/// Dead letters of `stage` that match, resolved ones too, each with when it was resolved
/// (replayed and finished), if it was.
///
/// # Errors
/// When the log cannot be read; undecodable records are skipped with a warning.
pub async fn list_with_resolved<B: Bus>(
    bus: &B,
    stage: &str,
    sel: &Selection,
) -> Result<Vec<(DeadLetter, Option<i64>)>, BusError> {
    let (letters, resolutions): (Vec<_>, Vec<_>) = select(bus, stage, sel)
        .await?
        .into_iter()
        .map(|(dl, _)| dl)
        .partition(|dl| dl.resolved_at_ms.is_none());
    let resolved: std::collections::HashMap<String, i64> = resolutions
        .into_iter()
        .filter_map(|r| r.resolved_at_ms.map(|t| (r.id, t)))
        .collect();
    Ok(letters
        .into_iter()
        .map(|dl| {
            let at = resolved.get(&dl.id).copied();
            (dl, at)
        })
        .collect())
}

/// The resolution record of dead letter `id` of `subscription` (record and envelope ids,
/// record key), resolved at `at_ms`: published onto the dead-letter topic once a replay of it
/// is delivered or dead-lettered again.
#[must_use]
pub fn resolution(
    subscription: &str,
    id: &str,
    (record_id, envelope_id): (&str, &str),
    key: &[u8],
    at_ms: i64,
) -> OutRecord {
    // The id is `<record id>@<dead-lettered at>`: the record keeps that time, so --since and
    // --before select a dead letter and its resolution together.
    let dead_lettered_at = id
        .rsplit_once('@')
        .and_then(|(_, t)| t.parse().ok())
        .unwrap_or(at_ms);
    let mut r = DeadLetter::new(
        subscription,
        (record_id, envelope_id),
        dead_lettered_at,
        "resolved",
        None,
        (String::new(), key.to_vec(), Vec::new()),
    );
    id.clone_into(&mut r.id);
    r.resolved_at_ms = Some(at_ms);
    OutRecord {
        topic: topics::dead_letters(subscription),
        key: key.to_vec(),
        value: r.to_avro().expect("dead letters fit their schema"),
    }
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
    let records = select(bus, stage, sel).await?;
    // Resolution records go with their dead letters; the audit names the dead letters.
    let letters: Vec<&DeadLetter> = records
        .iter()
        .map(|(dl, _)| dl)
        .filter(|dl| dl.resolved_at_ms.is_none())
        .collect();
    if records.is_empty() {
        return Ok(Purged {
            selected: 0,
            removed: 0,
        });
    }
    if let Some(audit) = audit {
        audit
            .append(audit_entries("dlq_purge", actor, letters.iter().copied()))
            .await?;
    }
    let positions: Vec<(u32, i64)> = records.iter().map(|(_, p)| *p).collect();
    let removed = bus.remove(&topic_of(stage), &positions).await?;
    Ok(Purged {
        selected: letters.len(),
        removed: removed.min(letters.len() as u64),
    })
}
