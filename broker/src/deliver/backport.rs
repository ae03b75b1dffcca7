//! FHIR subscribers that subscribe themselves: topic-based Subscriptions the way the HL7
//! "Subscriptions R5 Backport" IG (STU 1.1.0) lays them out for R4.
//!
//! A client POSTs a `Subscription` whose `criteria` is one of ketenbus's topic canonicals
//! ([`topic`]), with its filters (receiver, sender, patient) in the `backport-filter-criteria`
//! extension and a `rest-hook` channel. ketenbus checks it ([`parse`]), keeps it in the data
//! directory ([`store`]) and runs it as a subscription like a configured one: its own
//! consumer group, lanes, retries, dead letters, lineage, consent and audit (`deliver::run_with`),
//! with a sink ([`notify`]) that writes each event as a `history` notification Bundle whose
//! first entry is the status `Parameters`. Each event gets its number when it is first
//! tried; the number is kept in the store with the event, so a retry, a replay or a restart
//! sends it under the same number, and numbers have no gaps. [`manage`] starts and stops
//! these subscriptions while the broker runs and sends handshakes and heartbeats.

pub mod manage;
pub mod notify;
pub mod parse;
pub mod seal;
pub mod store;
pub mod topic;

use std::time::Duration;

use ketenbus_schemas::EventKind;
use serde::{Deserialize, Serialize};

pub use manage::Registry;

/// Profile of a Backport Subscription.
pub const PROFILE_SUBSCRIPTION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
/// Profile of the status `Parameters` first in every notification.
pub const PROFILE_STATUS: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";
/// Extension on `Subscription.criteria`: one filter.
pub const EXT_FILTER: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
/// Extension on `Subscription.channel.payload`: how much each notification carries.
pub const EXT_CONTENT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
/// Extension on `Subscription.channel`: seconds between heartbeats.
pub const EXT_HEARTBEAT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period";
/// Extension on `Subscription.channel`: seconds a notification may take.
pub const EXT_TIMEOUT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout";
/// Extension on `Subscription.channel`: most events in one notification.
pub const EXT_MAX_COUNT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count";
/// Extension on the CapabilityStatement's `Subscription` resource: a topic it serves.
pub const EXT_TOPIC_CANONICAL: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical";

/// How much a notification carries (`backport-payload-content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Only the status: the client asks `$events` or reads what it needs.
    #[serde(rename = "empty")]
    Empty,
    /// The status and the `fullUrl` of each resource of the event.
    #[serde(rename = "id-only")]
    IdOnly,
    /// The status and the event's nl-core resources.
    #[serde(rename = "full-resource")]
    FullResource,
}

impl Content {
    /// The code.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Content::Empty => "empty",
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
        }
    }

    /// From its code.
    #[must_use]
    pub fn parse(code: &str) -> Option<Content> {
        match code {
            "empty" => Some(Content::Empty),
            "id-only" => Some(Content::IdOnly),
            "full-resource" => Some(Content::FullResource),
            _ => None,
        }
    }
}

/// `Subscription.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Asked for, not yet confirmed by a handshake.
    Requested,
    /// Notifications go out.
    Active,
    /// A notification failed: none go out until the client resets the status (events wait
    /// in the log, numbered, and are retried after the reset).
    Error,
    /// Switched off by the client: nothing goes out, events wait in the log.
    Off,
}

impl Status {
    /// The code.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Active => "active",
            Status::Error => "error",
            Status::Off => "off",
        }
    }
}

/// One Subscription as ketenbus keeps it: what the client asked, checked. Its `Debug`
/// leaves out the endpoint and the header values (credentials).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Server-assigned id (`Subscription.id`).
    pub id: String,
    /// The topic's event kind.
    pub kind: EventKind,
    /// The receiver party id the Subscription is for (its `receiver` filter).
    pub receiver: String,
    /// Sender party ids (`sender` filters; empty: every sender).
    pub senders: Vec<String>,
    /// The patient filter as the patient's pseudonym (the patient key), never a BSN.
    #[serde(default)]
    pub patient: Option<String>,
    /// Where notifications go.
    pub endpoint: String,
    /// How much each notification carries.
    pub content: Content,
    /// `channel.header`: headers sent with every notification (`Name: value`).
    pub headers: Vec<String>,
    /// Seconds between heartbeats when idle.
    pub heartbeat_secs: Option<u32>,
    /// Seconds a notification may take.
    pub timeout_secs: u32,
    /// Most events per notification (ketenbus sends one).
    pub max_count: u32,
    /// `Subscription.reason`.
    pub reason: String,
    /// `Subscription.end`, as given.
    pub end: Option<String>,
    /// The status.
    pub status: Status,
    /// Why the status is `error`.
    pub error: Option<String>,
    /// Who made it (`operator:<name>`, `sender:<name>` or `anonymous`).
    pub owner: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("receiver", &self.receiver)
            .field("headers", &self.headers.len())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// The name of its ketenbus subscription (topics, consumer group, metrics, audit).
    #[must_use]
    pub fn subscription_name(&self) -> String {
        subscription_name(&self.id)
    }

    /// Whether its `end` has passed at `now_ms` (ms since the epoch).
    #[must_use]
    pub fn ended(&self, now_ms: i64) -> bool {
        self.end
            .as_deref()
            .and_then(crate::deliver::mcsd::instant)
            .is_some_and(|end| end.saturating_mul(1000) <= now_ms)
    }
}

pub use crate::deliver::config::FHIR_NAME_PREFIX as NAME_PREFIX;

/// The ketenbus subscription name of the Subscription `id`.
#[must_use]
pub fn subscription_name(id: &str) -> String {
    format!("{NAME_PREFIX}{id}")
}

/// `[fhir_subscriptions]`: FHIR clients that subscribe themselves (`/fhir/Subscription`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirSubscriptionsConfig {
    /// ketenbus's FHIR base as subscribers reach it (`https://ketenbus.example.nl/fhir`):
    /// the Subscription and focus references and the `fullUrl`s of id-only notifications
    /// start with it. Absent: `http://<http.listen>/fhir`.
    pub base_url: Option<String>,
    /// Retry policy of every Subscription made through the API (a key left out: as in
    /// [`fhir_retry`]).
    #[serde(deserialize_with = "fhir_retry_table")]
    pub retry: crate::deliver::config::RetryConfig,
    /// Most Subscriptions at once.
    pub max: usize,
    /// Longest `backport-timeout` a client may ask for; also the timeout when it asks none.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Shortest `backport-heartbeat-period` a client may ask for.
    #[serde(with = "humantime_serde")]
    pub min_heartbeat: Duration,
    /// Check consent before each notification when `[consent]` has a registry (the party is
    /// the Subscription's receiver).
    pub consent: Option<FhirConsent>,
    /// Environment variable with the secret (at least 32 bytes) that `channel.header` values
    /// are sealed with at rest (AES-256-GCM). Not set: Subscriptions with headers are refused.
    pub header_key_env: String,
    /// Receiver party ids whose Subscriptions may filter by patient (a `patient` filter with
    /// the BSN, kept only as the patient's pseudonym); for any other receiver such a
    /// Subscription is refused with 403. Empty (the default): nobody.
    pub patient_filter_receivers: Vec<String>,
}

impl Default for FhirSubscriptionsConfig {
    fn default() -> Self {
        FhirSubscriptionsConfig {
            base_url: None,
            retry: fhir_retry(),
            max: 100,
            max_timeout: Duration::from_secs(30),
            min_heartbeat: Duration::from_secs(1),
            consent: None,
            header_key_env: "KETENBUS_FHIR_HEADER_KEY".into(),
            patient_filter_receivers: Vec::new(),
        }
    }
}

/// `[fhir_subscriptions.retry]`'s defaults, key by key: 1 s, at most 60 s, 24 h.
#[must_use]
pub fn fhir_retry() -> crate::deliver::config::RetryConfig {
    crate::deliver::config::RetryConfig {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        give_up_after: Duration::from_secs(24 * 3600),
    }
}

fn fhir_retry_table<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<crate::deliver::config::RetryConfig, D::Error> {
    crate::deliver::config::RetryConfig::with_defaults(d, fhir_retry())
}

/// `[fhir_subscriptions.consent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConsent {
    /// Purpose of the exchange, as consent is recorded (e.g. `treatment`).
    #[serde(default = "treatment")]
    pub purpose: String,
    /// Without a recorded decision: `deny` (the default) or `allow`.
    #[serde(default = "deny")]
    pub default: crate::deliver::consent::DefaultDecision,
}

fn treatment() -> String {
    "treatment".into()
}

fn deny() -> crate::deliver::consent::DefaultDecision {
    crate::deliver::consent::DefaultDecision::Deny
}

impl FhirSubscriptionsConfig {
    /// Problems, each at its key path.
    #[must_use]
    pub fn problems(&self) -> Vec<crate::env::Problem> {
        let mut p = Vec::new();
        let at = |k: &str| format!("fhir_subscriptions.{k}");
        if let Some(b) = &self.base_url
            && let Err(m) = crate::deliver::sink::endpoint_url(b, true)
        {
            p.push(crate::env::Problem::new(at("base_url"), m));
        }
        if self.retry.initial.is_zero() {
            p.push(crate::env::Problem::new(
                at("retry.initial"),
                "must be more than 0",
            ));
        }
        if self.retry.max < self.retry.initial {
            p.push(crate::env::Problem::new(
                at("retry.max"),
                "must not be less than retry.initial",
            ));
        }
        if self.max_timeout.is_zero() {
            p.push(crate::env::Problem::new(
                at("max_timeout"),
                "must be more than 0",
            ));
        }
        if self.min_heartbeat.is_zero() {
            p.push(crate::env::Problem::new(
                at("min_heartbeat"),
                "must be more than 0",
            ));
        }
        p
    }
}
