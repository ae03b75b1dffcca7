//! Records the broker writes about its own work: delivery outcomes, dead letters and records
//! parked for a later attempt.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::AvroRecord;

/// What a delivery attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The receiver accepted it.
    Delivered,
    /// It failed and will be tried again.
    Retrying,
    /// It failed for good and went to the subscription's dead letters.
    DeadLettered,
    /// The subscription's filter (or consent) did not let it through.
    Filtered,
}

impl Outcome {
    /// The schema symbol, also a metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retrying => "retrying",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Filtered => "filtered",
        }
    }
}

/// One delivery attempt's result. Schema: `avro/delivery_outcome.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryOutcome {
    /// Subscription name.
    pub subscription: String,
    /// Event id, or envelope id for raw subscriptions.
    pub record_id: String,
    /// The envelope the record came from.
    pub envelope_id: String,
    /// When the attempt ended, ms since the epoch.
    pub at_ms: i64,
    /// 1 for the first try.
    pub attempt: i32,
    /// What it came to.
    pub outcome: Outcome,
    /// Reason code when not delivered.
    pub reason: Option<String>,
    /// Receiver's status line or error text; never payload.
    pub detail: Option<String>,
}

impl AvroRecord for DeliveryOutcome {
    const SCHEMA_JSON: &'static str = include_str!("../avro/delivery_outcome.avsc");
    crate::compiled_schema!();
}

/// A record that could not be processed, kept whole for replay. Schema: `avro/dead_letter.avsc`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Dead letter id.
    pub id: String,
    /// `router`, or the subscription name.
    pub stage: String,
    /// Event id, or envelope id for raw records.
    pub record_id: String,
    /// The envelope the record came from.
    pub envelope_id: String,
    /// When it was dead-lettered, ms since the epoch.
    pub at_ms: i64,
    /// Reason code from a closed set.
    pub reason: String,
    /// Human detail without payload.
    pub detail: Option<String>,
    /// Topic the record came from.
    pub source_topic: String,
    /// The record key.
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub key: Vec<u8>,
    /// The record value exactly as it was on the source topic.
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub value: Vec<u8>,
    /// Delivery attempts made before it was dead-lettered; a replay counts on from here.
    /// `None` for the router and records never tried.
    pub attempt: Option<i32>,
    /// Set on a resolution record only: the dead letter with this id was replayed and then
    /// delivered at this time, ms since the epoch. A resolution record carries no value.
    pub resolved_at_ms: Option<i64>,
}

impl DeadLetter {
    /// What `stage` (`router`, or a subscription name) gives up on at `at_ms`: record
    /// `record_id` of envelope `envelope_id`, kept whole as it was on its source topic (topic,
    /// key, value), for `reason` (a reason code) and `detail` (no payload).
    /// Its id is `<record id>@<at_ms>`.
    #[must_use]
    pub fn new(
        stage: &str,
        (record_id, envelope_id): (&str, &str),
        at_ms: i64,
        reason: &str,
        detail: Option<String>,
        (source_topic, key, value): (String, Vec<u8>, Vec<u8>),
    ) -> DeadLetter {
        DeadLetter {
            id: format!("{record_id}@{at_ms}"),
            stage: stage.to_owned(),
            record_id: record_id.to_owned(),
            envelope_id: envelope_id.to_owned(),
            at_ms,
            reason: reason.to_owned(),
            detail,
            source_topic,
            key,
            value,
            attempt: None,
            resolved_at_ms: None,
        }
    }

    /// The resolution record of this dead letter: it was replayed and delivered at `at_ms`.
    /// Same id, stage, record and time; no value.
    #[must_use]
    pub fn resolution(&self, at_ms: i64) -> DeadLetter {
        DeadLetter {
            id: self.id.clone(),
            stage: self.stage.clone(),
            record_id: self.record_id.clone(),
            envelope_id: self.envelope_id.clone(),
            at_ms: self.at_ms,
            reason: self.reason.clone(),
            detail: None,
            source_topic: self.source_topic.clone(),
            key: self.key.clone(),
            value: Vec::new(),
            attempt: self.attempt,
            resolved_at_ms: Some(at_ms),
        }
    }
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("id", &self.id)
            .field("stage", &self.stage)
            .field("record_id", &self.record_id)
            .field("reason", &self.reason)
            .field("value_len", &self.value.len())
            .finish_non_exhaustive()
    }
}

impl AvroRecord for DeadLetter {
    const SCHEMA_JSON: &'static str = include_str!("../avro/dead_letter.avsc");
    crate::compiled_schema!();
}

/// A record one subscription parked for a later attempt, kept whole. Schema:
/// `avro/retry_record.avsc`; topic `ketenbus.retry.<subscription>`, key = the original key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryRecord {
    /// Event id, or envelope id for raw records.
    pub record_id: String,
    /// The envelope the record came from.
    pub envelope_id: String,
    /// Delivery attempts made so far; 0 when parked behind an earlier record of its key.
    pub attempt: i32,
    /// When its first attempt failed, ms since the epoch; `None` until it was tried.
    pub first_failure_ms: Option<i64>,
    /// Not tried again before this time, ms since the epoch.
    pub next_attempt_ms: i64,
    /// Reason code of the last failed attempt.
    pub reason: Option<String>,
    /// Human detail of the last failed attempt, without payload.
    pub detail: Option<String>,
    /// Topic the record came from.
    pub source_topic: String,
    /// The record key.
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub key: Vec<u8>,
    /// The record value exactly as it was on the source topic.
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub value: Vec<u8>,
    /// Id of the dead letter this record was replayed from: its delivery resolves it.
    pub replay_of: Option<String>,
}

impl fmt::Debug for RetryRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryRecord")
            .field("record_id", &self.record_id)
            .field("attempt", &self.attempt)
            .field("next_attempt_ms", &self.next_attempt_ms)
            .field("value_len", &self.value.len())
            .finish_non_exhaustive()
    }
}

impl AvroRecord for RetryRecord {
    const SCHEMA_JSON: &'static str = include_str!("../avro/retry_record.avsc");
    crate::compiled_schema!();
}
