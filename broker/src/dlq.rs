//! Dead letters: list them and replay them into one subscription (`ketenbus dlq`).
//! Replay publishes the dead letter onto `ketenbus.replay.<subscription>`, which only that
//! subscription reads, so other subscriptions do not receive it twice.

use ketenbus_schemas::{AvroRecord, DeadLetter, topics};

use crate::bus::{Bus, BusError, OutRecord};

/// Which dead letters.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these dead-letter ids or record ids (empty: all).
    pub ids: Vec<String>,
    /// Only those dead-lettered at or after this time, ms since the epoch.
    pub since_ms: Option<i64>,
}

impl Selection {
    fn matches(&self, dl: &DeadLetter) -> bool {
        (self.ids.is_empty()
            || self
                .ids
                .iter()
                .any(|i| *i == dl.id || *i == dl.record_id || *i == dl.envelope_id))
            && self.since_ms.is_none_or(|t| dl.at_ms >= t)
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
    let topic = if stage == "router" {
        topics::ROUTER_DEAD_LETTERS.to_owned()
    } else {
        topics::dead_letters(stage)
    };
    let mut out = Vec::new();
    for r in bus.read_all(&topic).await? {
        match DeadLetter::from_avro(&r.value) {
            Ok(dl) if sel.matches(&dl) => out.push(dl),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(topic = %topic, offset = r.offset, error = %e, "skipping an undecodable dead letter")
            }
        }
    }
    Ok(out)
}

/// Replay matching dead letters of `subscription` to it; returns how many.
///
/// # Errors
/// When the log cannot be read or written.
pub async fn replay<B: Bus>(
    bus: &B,
    subscription: &str,
    sel: &Selection,
) -> Result<usize, BusError> {
    let letters = list(bus, subscription, sel).await?;
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
