//! From a record to a job: records of the source topics, and dead letters replayed onto
//! `ketenbus.replay.<subscription>` (which carry the original record and its topic); and the
//! subscription's filter.

use std::sync::Arc;

use ketenbus_connectors::Payload;
use ketenbus_schemas::{AvroRecord, DeadLetter, Event, EventKind, topics};

use super::{Job, Replay, Undeliverable};
use crate::bus::bodies::{BodyStore, decode_raw};
use crate::bus::{AckToken, Record};
use crate::deliver::config::FilterConfig;

pub(super) fn decode(
    record: &Record,
    subscription: &str,
    bodies: Option<&BodyStore>,
) -> Result<Job, Undeliverable> {
    // Replayed dead letters carry the original record and its topic.
    if record.topic == topics::replay(subscription) {
        let dl = DeadLetter::from_avro(&record.value).map_err(|e| Undeliverable {
            record_id: String::from_utf8_lossy(&record.key).into_owned(),
            envelope_id: String::from_utf8_lossy(&record.key).into_owned(),
            reason: "undecodable_replay",
            detail: e.to_string(),
        })?;
        let mut job = decode_value(
            bodies,
            record.ack_token(),
            dl.source_topic,
            dl.key,
            dl.value,
        )?;
        job.replay = Some(Replay {
            dead_letter: dl.id,
            attempts: dl.attempt.and_then(|a| u32::try_from(a).ok()).unwrap_or(0),
        });
        return Ok(job);
    }
    decode_value(
        bodies,
        record.ack_token(),
        record.topic.clone(),
        record.key.clone(),
        record.value.clone(),
    )
}

/// The job for a record `value` of `topic`; a raw envelope gets its body back from `bodies`.
pub(super) fn decode_value(
    bodies: Option<&BodyStore>,
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
        let env = decode_raw(bodies, &value).map_err(|e| undecodable(&e))?;
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
        replay: None,
    })
}

pub(super) fn passes(filter: &FilterConfig, payload: &Payload) -> bool {
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
    // A patient filter passes only events whose patient key is one of its keys.
    let patient_ok = filter.patients.is_empty()
        || matches!(payload, Payload::Event(e) if e.header().patient_key.as_ref()
            .is_some_and(|k| filter.patients.contains(k)));
    sender_ok && receiver_ok && patient_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_party_ids() {
        let env = ketenbus_schemas::RawEnvelope {
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
                receivers: vec![],
                patients: vec![]
            },
            &p
        ));
        assert!(!passes(
            &FilterConfig {
                senders: vec!["agb:1".into()],
                receivers: vec![],
                patients: vec![]
            },
            &p
        ));
        assert!(
            !passes(
                &FilterConfig {
                    senders: vec![],
                    receivers: vec!["agb:1".into()],
                    patients: vec![]
                },
                &p
            ),
            "unknown receiver fails a receiver filter"
        );
        assert!(
            !passes(
                &FilterConfig {
                    patients: vec!["0123456789abcdef0123456789abcdef".into()],
                    ..FilterConfig::default()
                },
                &p
            ),
            "a message without a patient key fails a patient filter"
        );
    }
}
