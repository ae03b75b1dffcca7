//! The words of a message's lineage: the stages it passes and what each came to. The lineage
//! API and `ketenbus inspect` show them as these snake_case names, the lineage index stores
//! them so, and the router's metrics take their labels from them: one closed set each.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;

/// Where in its life a message was when a lineage step was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Accepted onto the log.
    Received,
    /// The router could not make events of it (rejected, unsupported format) or had nothing
    /// to make (an acknowledgement of ours on its way out).
    Normalise,
    /// The router made an event of it, or found none in it.
    Normalised,
    /// The router sent a CONTRL acknowledgement for it.
    Acknowledge,
    /// A delivery status notification about one of its deliveries came back (or was ignored).
    DeliveryReport,
    /// A subscription's delivery attempt.
    Delivery,
    /// A subscription gave up on it.
    DeadLettered,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 7] = [
        Stage::Received,
        Stage::Normalise,
        Stage::Normalised,
        Stage::Acknowledge,
        Stage::DeliveryReport,
        Stage::Delivery,
        Stage::DeadLettered,
    ];

    /// The name the API shows and the index stores.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::Normalise => "normalise",
            Stage::Normalised => "normalised",
            Stage::Acknowledge => "acknowledge",
            Stage::DeliveryReport => "delivery_report",
            Stage::Delivery => "delivery",
            Stage::DeadLettered => "dead_lettered",
        }
    }
}

/// What a lineage step came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// Received: on the log.
    Accepted,
    /// An event was made.
    Normalised,
    /// Nothing inside to make an event of.
    NoEvents,
    /// No normaliser for its format yet; raw subscribers still receive it.
    UnsupportedFormat,
    /// Dead-lettered by the router.
    Rejected,
    /// Our own CONTRL on its way out: nothing to normalise.
    Acknowledgement,
    /// A CONTRL acknowledgement was made for it.
    Contrl,
    /// The receiver accepted it (a delivery, or a delivery report saying so).
    Delivered,
    /// A delivery report: the mail is delayed.
    Delayed,
    /// A delivery report: the mail failed for good.
    Failed,
    /// A delivery report that counts for nothing (wrong source, no token of ours).
    Ignored,
    /// A delivery failed and will be tried again.
    Retrying,
    /// A subscription dead-lettered it.
    DeadLettered,
    /// A subscription's filter (or consent) did not let it through.
    Filtered,
    /// An operator replayed its dead letter to the subscription (stage `dead_lettered`).
    Replayed,
}

impl StepOutcome {
    /// Every outcome.
    pub const ALL: [StepOutcome; 15] = [
        StepOutcome::Accepted,
        StepOutcome::Normalised,
        StepOutcome::NoEvents,
        StepOutcome::UnsupportedFormat,
        StepOutcome::Rejected,
        StepOutcome::Acknowledgement,
        StepOutcome::Contrl,
        StepOutcome::Delivered,
        StepOutcome::Delayed,
        StepOutcome::Failed,
        StepOutcome::Ignored,
        StepOutcome::Retrying,
        StepOutcome::DeadLettered,
        StepOutcome::Filtered,
        StepOutcome::Replayed,
    ];

    /// The name the API shows and the index stores.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Accepted => "accepted",
            StepOutcome::Normalised => "normalised",
            StepOutcome::NoEvents => "no_events",
            StepOutcome::UnsupportedFormat => "unsupported_format",
            StepOutcome::Rejected => "rejected",
            StepOutcome::Acknowledgement => "acknowledgement",
            StepOutcome::Contrl => "contrl",
            StepOutcome::Delivered => "delivered",
            StepOutcome::Delayed => "delayed",
            StepOutcome::Failed => "failed",
            StepOutcome::Ignored => "ignored",
            StepOutcome::Retrying => "retrying",
            StepOutcome::DeadLettered => "dead_lettered",
            StepOutcome::Filtered => "filtered",
            StepOutcome::Replayed => "replayed",
        }
    }
}

impl From<Outcome> for StepOutcome {
    fn from(o: Outcome) -> StepOutcome {
        match o {
            Outcome::Delivered => StepOutcome::Delivered,
            Outcome::Retrying => StepOutcome::Retrying,
            Outcome::DeadLettered => StepOutcome::DeadLettered,
            Outcome::Filtered => StepOutcome::Filtered,
        }
    }
}

/// A stage or outcome name that is none of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lineage {what} {name:?}")]
pub struct UnknownName {
    /// `stage` or `outcome`.
    pub what: &'static str,
    /// The name as found.
    pub name: String,
}

/// The one of `all` named `name`.
fn named<T: Copy>(
    all: &[T],
    name: &str,
    as_str: fn(T) -> &'static str,
    what: &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == name)
        .ok_or_else(|| UnknownName {
            what,
            name: name.to_owned(),
        })
}

impl FromStr for Stage {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Stage, UnknownName> {
        named(&Stage::ALL, s, Stage::as_str, "stage")
    }
}

impl FromStr for StepOutcome {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<StepOutcome, UnknownName> {
        named(&StepOutcome::ALL, s, StepOutcome::as_str, "outcome")
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One lineage write as it crosses the topic [`crate::topics::LINEAGE`]. Schema:
/// `avro/lineage_record.avsc`; key = [`LineageRecord::key`].
///
/// Why one record per step, keyed by step: the topic is compacted, and compaction keeps only
/// the latest record of each key. Steps of one message are written by different nodes (node A
/// takes it in and normalises it, node B delivers it), so no writer knows a message's whole
/// lineage to publish it as one latest value; a key per step (`<message id>/<step id>`, the
/// step id unique per writer process and sequence) means compaction never drops a step, only
/// the same step published twice (a publish retried after a lost answer), which the index
/// also applies once. [`LineageReceived`] and [`LineageStep`] are records of their own, so
/// adding an optional field to either later is a compatible schema change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageRecord {
    /// The message (envelope) id.
    pub message_id: String,
    /// Empty for the received write; `<writer instance>.<sequence>` for a step.
    pub step_id: String,
    /// Set on the write that records the message as received.
    pub received: Option<LineageReceived>,
    /// Set on every other write.
    pub step: Option<LineageStep>,
}

impl LineageRecord {
    /// The topic key: `<message id>/<step id>`, one per step (see the type's doc).
    #[must_use]
    pub fn key(&self) -> Vec<u8> {
        format!("{}/{}", self.message_id, self.step_id).into_bytes()
    }
}

/// What ketenbus knows of a message when it was received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageReceived {
    /// When, ms since the epoch.
    pub received_at_ms: i64,
    /// Connector.
    pub connector: String,
    /// Format.
    pub format: String,
    /// Declared media type.
    pub content_type: String,
    /// Body size in bytes.
    pub size: i64,
    /// Sender party id.
    pub sender: Option<String>,
    /// Receiver party id.
    pub receiver: Option<String>,
    /// Partition of the envelope on the raw topic.
    pub raw_partition: i32,
    /// Offset of the envelope on the raw topic.
    pub raw_offset: i64,
    /// The inbox file it came from: its name, never a path.
    pub file: Option<String>,
    /// The id the message gives itself (UNB control reference, MessageHeader or Bundle id,
    /// mail Message-ID).
    pub source_id: Option<String>,
}

/// One step in a message's life; stage and outcome by name ([`Stage::as_str`],
/// [`StepOutcome::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageStep {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Stage name.
    pub stage: String,
    /// Subscription, for delivery steps.
    pub subscription: Option<String>,
    /// Event id (or envelope id for raw deliveries).
    pub record_id: Option<String>,
    /// Event kind, or raw.
    pub kind: Option<String>,
    /// Attempt number of a delivery.
    pub attempt: Option<i32>,
    /// Outcome name.
    pub outcome: String,
    /// Reason code.
    pub reason: Option<String>,
    /// Detail without payload.
    pub detail: Option<String>,
    /// The patient pseudonym (patient key) of a normalised event; never a BSN.
    pub patient: Option<String>,
}

impl crate::codec::AvroRecord for LineageRecord {
    const SCHEMA_JSON: &'static str = include_str!("../avro/lineage_record.avsc");
    crate::compiled_schema!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are what the lineage API has always shown; serde and `as_str` agree, and
    /// every name reads back as itself.
    #[test]
    fn names_are_fixed_and_read_back() {
        let stages: Vec<&str> = Stage::ALL.map(Stage::as_str).to_vec();
        assert_eq!(
            stages,
            [
                "received",
                "normalise",
                "normalised",
                "acknowledge",
                "delivery_report",
                "delivery",
                "dead_lettered"
            ]
        );
        let outcomes: Vec<&str> = StepOutcome::ALL.map(StepOutcome::as_str).to_vec();
        assert_eq!(
            outcomes,
            [
                "accepted",
                "normalised",
                "no_events",
                "unsupported_format",
                "rejected",
                "acknowledgement",
                "contrl",
                "delivered",
                "delayed",
                "failed",
                "ignored",
                "retrying",
                "dead_lettered",
                "filtered",
                "replayed"
            ]
        );
        for s in Stage::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
            assert_eq!(s.as_str().parse::<Stage>(), Ok(s));
        }
        for o in StepOutcome::ALL {
            assert_eq!(
                serde_json::to_value(o).unwrap(),
                serde_json::json!(o.as_str())
            );
            assert_eq!(o.as_str().parse::<StepOutcome>(), Ok(o));
        }
        assert!("normalize".parse::<Stage>().is_err());
    }

    #[test]
    fn delivery_outcomes_keep_their_names() {
        for o in [
            Outcome::Delivered,
            Outcome::Retrying,
            Outcome::DeadLettered,
            Outcome::Filtered,
        ] {
            assert_eq!(StepOutcome::from(o).as_str(), o.as_str());
        }
    }
}
