//! Metrics: every metric ketenbus exports, and one function per thing that happens, which
//! bumps the metric and writes the DEBUG trace line together. `GET /metrics` serves them in
//! the Prometheus text format ([`render`]); the watcher (`observe::watch`) samples consumer
//! lag, the age of the oldest undelivered record and the log's size on disk. A leaf: it
//! imports nothing of the broker, so every stage may report here.
//!
//! Names follow `ketenbus_<stage>_<noun>_<unit>[_total]` in base units. Labels come from
//! small closed sets only (connector, format, kind, subscription, outcome, reason code):
//! never ids, addresses or anything from a payload. The sets are below ([`CONNECTORS`],
//! [`INGEST_REASONS`], [`ROUTER_REASONS`], [`SKIP_REASONS`], [`DELIVERY_REASONS`]; formats,
//! kinds and outcomes from the schemas; subscriptions and sources from the config), and
//! [`closed_label_values`] lists every label of every metric with the values it may take.
//! A value outside its set is counted as [`OTHER`]: a new reason code shows as `other`
//! until it is added to its list. Every series the dashboard and the alerts use is created
//! at zero by [`init`], so `increase()` sees the first dead letter.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;
use std::time::Duration;

use ketenbus_connectors::{DeliveryError, IngestError, Payload};
use ketenbus_schemas::lineage::{Stage, StepOutcome};
use ketenbus_schemas::{EventKind, Format, Outcome, topics};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use ketenbus_schemas::now_ms;

/// Messages accepted onto the log, per connector and format.
pub const INGEST_RECEIVED_MESSAGES: &str = "ketenbus_ingest_received_messages_total";
/// Body bytes accepted onto the log, per connector and format.
pub const INGEST_RECEIVED_BYTES: &str = "ketenbus_ingest_received_bytes_total";
/// Messages refused at ingest (the sender heard an error or "try again"), per connector and reason.
pub const INGEST_REJECTED_MESSAGES: &str = "ketenbus_ingest_rejected_messages_total";
/// When a connector last accepted a message (start-up time until the first one), per connector.
pub const INGEST_LAST_RECEIVED: &str = "ketenbus_ingest_last_received_timestamp_seconds";
/// 1 while a source (`smtp`, `imap:<name>`) can do its work, 0 while its peer is down.
pub const INGEST_SOURCE_UP: &str = "ketenbus_ingest_source_up";
/// Events the router made, per kind.
pub const ROUTER_NORMALISED_EVENTS: &str = "ketenbus_router_normalised_events_total";
/// Messages the router dead-lettered, per reason.
pub const ROUTER_DEAD_LETTERS: &str = "ketenbus_router_dead_letters_total";
/// Messages the router passed by without events (no normaliser yet, nothing inside), per reason.
pub const ROUTER_SKIPPED_MESSAGES: &str = "ketenbus_router_skipped_messages_total";
/// Raw records the router has not committed yet.
pub const ROUTER_CONSUMER_LAG: &str = "ketenbus_router_consumer_lag_records";
/// Records an index built from the log (`lineage`, `fhir_resources`) has not applied yet. The
/// indexes run behind the message path at lower priority: under load this rises, and falls
/// again when the load does.
pub const INDEX_LAG: &str = "ketenbus_log_index_lag_records";
/// Records finished by a subscription, per subscription and outcome (delivered, dead_lettered, filtered).
pub const DISPATCH_DELIVERY_OUTCOMES: &str = "ketenbus_dispatch_delivery_outcomes_total";
/// Seconds from the envelope's arrival to its successful delivery, per subscription.
pub const DISPATCH_DELIVERY_LATENCY: &str = "ketenbus_dispatch_delivery_latency_seconds";
/// Failed delivery attempts that will be tried again, per subscription and reason.
pub const DISPATCH_DELIVERY_RETRIES: &str = "ketenbus_dispatch_delivery_retries_total";
/// Records a subscription holds on its retry topic waiting for another attempt, per
/// subscription and the reason their last attempt failed. Rebuilt from the retry topic after
/// a restart.
pub const DISPATCH_RETRYING_RECORDS: &str = "ketenbus_dispatch_retrying_records";
/// Records a subscription dead-lettered, per subscription and reason.
pub const DISPATCH_DEAD_LETTERS: &str = "ketenbus_dispatch_dead_letters_total";
/// Records a subscription has not committed yet, per subscription and kind (source topic).
pub const DISPATCH_CONSUMER_LAG: &str = "ketenbus_dispatch_consumer_lag_records";
/// Age of the oldest record a subscription is still working on, per subscription and kind;
/// 0 when it is caught up.
pub const DISPATCH_OLDEST_UNDELIVERED_AGE: &str =
    "ketenbus_dispatch_oldest_undelivered_age_seconds";
/// Bytes the embedded log takes on disk (database plus write-ahead log).
pub const LOG_DISK_USAGE: &str = "ketenbus_log_disk_usage_bytes";
/// Bytes past `retention_max_bytes` that retention keeps in the fullest topic because not
/// every reader has finished them; 0 when every topic is within its limit.
pub const LOG_RETENTION_EXCESS: &str = "ketenbus_log_retention_excess_bytes";
/// Always 1, with the version as a label.
pub const BUILD_INFO: &str = "ketenbus_build_info";
/// Questions asked of the consent service (Mitz), by answer.
pub const CONSENT_QUESTIONS: &str = "ketenbus_dispatch_consent_question_outcomes_total";
/// Deliveries that needed consent while the consent service could not answer, by what was
/// done instead: `allow` (the subscription's default delivered) or `retry` (parked).
pub const CONSENT_UNAVAILABLE: &str = "ketenbus_dispatch_consent_unavailable_records_total";
/// The `answer` label of [`CONSENT_QUESTIONS`].
pub const CONSENT_ANSWERS: [&str; 5] = [
    "permit",
    "deny",
    "not_applicable",
    "indeterminate",
    "unavailable",
];
/// When each mCSD directory (`[[mcsd]]`, by name) last synced without error (unix
/// seconds; 0 before its first success).
pub const MCSD_LAST_SYNC: &str = "ketenbus_dispatch_mcsd_last_sync_timestamp_seconds";
/// Sync runs of each mCSD directory, by outcome (`ok`, `failed`: the replica kept serving).
pub const MCSD_SYNCS: &str = "ketenbus_dispatch_mcsd_sync_outcomes_total";
/// The `outcome` label of [`MCSD_SYNCS`].
pub const MCSD_OUTCOMES: [&str; 2] = ["ok", "failed"];
/// The `fallback` label of [`CONSENT_UNAVAILABLE`].
pub const CONSENT_FALLBACKS: [&str; 2] = ["allow", "retry"];

/// Every ketenbus metric name, for tests and tooling.
pub const NAMES: [&str; 24] = [
    INGEST_RECEIVED_MESSAGES,
    INGEST_RECEIVED_BYTES,
    INGEST_REJECTED_MESSAGES,
    INGEST_LAST_RECEIVED,
    INGEST_SOURCE_UP,
    ROUTER_NORMALISED_EVENTS,
    ROUTER_DEAD_LETTERS,
    ROUTER_SKIPPED_MESSAGES,
    ROUTER_CONSUMER_LAG,
    INDEX_LAG,
    DISPATCH_DELIVERY_OUTCOMES,
    DISPATCH_DELIVERY_LATENCY,
    DISPATCH_DELIVERY_RETRIES,
    DISPATCH_RETRYING_RECORDS,
    DISPATCH_DEAD_LETTERS,
    DISPATCH_CONSUMER_LAG,
    DISPATCH_OLDEST_UNDELIVERED_AGE,
    LOG_DISK_USAGE,
    LOG_RETENTION_EXCESS,
    BUILD_INFO,
    CONSENT_QUESTIONS,
    CONSENT_UNAVAILABLE,
    MCSD_LAST_SYNC,
    MCSD_SYNCS,
];

/// The indexes built from the log (`index` label of [`INDEX_LAG`]).
pub const INDEXES: [&str; 2] = ["lineage", "fhir_resources"];

/// What a label value outside its closed set is counted as.
pub const OTHER: &str = "other";

/// Connectors that take messages in (`connector` label).
pub const CONNECTORS: [&str; 5] = ["http", "fhir", "inbox", "smtp", "imap"];

/// Why a way in refused a message or set it aside (`reason` of [`INGEST_REJECTED_MESSAGES`]):
/// HTTP and FHIR answers, SMTP replies, inbox files moved to `failed/`, IMAP messages set aside.
pub const INGEST_REASONS: [&str; 32] = [
    "empty_body",
    "unsupported_media_type",
    "too_large",
    "sender_mismatch",
    "sender_not_allowed",
    "unauthenticated",
    "forbidden",
    "too_many_connections",
    "tls_handshake",
    "tls_handshake_timeout",
    "request_timeout",
    "log_unavailable",
    "log_failure",
    "memory_budget",
    "not_parseable",
    "unreadable",
    "refused",
    "max_attempts",
    "auth_required",
    "tls_required",
    "recipient_refused",
    "too_many_recipients",
    "line_too_long",
    "log_full",
    "unknown_resource",
    "invalid_message",
    "pull_token_refused",
    "pull_outside_exchange",
    "pull_grant_refused",
    "pull_unknown_partner",
    "pull_invalid_task",
    "pull_dead_letter",
];

/// Why the router dead-lettered a message (`reason` of [`ROUTER_DEAD_LETTERS`]): the
/// normalisers' reason codes and the router's own.
pub const ROUTER_REASONS: [&str; 10] = [
    "undecodable_envelope",
    "schema_mismatch",
    "event_too_large",
    "unsupported_message_type",
    "edifact_syntax",
    "fhir_syntax",
    "mime_syntax",
    "invalid_bsn",
    "missing_element",
    "invalid_element",
];

/// Why the router passed a message by without events (`reason` of
/// [`ROUTER_SKIPPED_MESSAGES`]).
pub const SKIP_REASONS: [&str; 3] = [
    StepOutcome::UnsupportedFormat.as_str(),
    StepOutcome::NoEvents.as_str(),
    StepOutcome::Acknowledgement.as_str(),
];

/// Why a subscription dead-lettered a record (`reason` of [`DISPATCH_DEAD_LETTERS`]). HTTP
/// and SMTP answers not named here count as `http_4xx` and `smtp_5xx`.
pub const DELIVERY_REASONS: [&str; 29] = [
    "exhausted",
    "bounced",
    "redirect",
    "no_address",
    "encode",
    "content_missing",
    "tls_config",
    "no_fhir_form",
    "not_fhir",
    "fhir_fatal_error",
    "undecodable_record",
    "undecodable_replay",
    "http_400",
    "http_401",
    "http_403",
    "http_404",
    "http_405",
    "http_409",
    "http_410",
    "http_413",
    "http_415",
    "http_422",
    "http_4xx",
    "smtp_550",
    "smtp_551",
    "smtp_552",
    "smtp_553",
    "smtp_554",
    "smtp_5xx",
];

/// Why a delivery attempt failed and will be tried again (`reason` of
/// [`DISPATCH_DELIVERY_RETRIES`] and [`DISPATCH_RETRYING_RECORDS`]). HTTP and SMTP answers
/// not named here count as `http_5xx` and `smtp_4xx`.
pub const RETRY_REASONS: [&str; 19] = [
    "timeout",
    "connect",
    "network",
    "tls",
    "content_store",
    "fhir_transient_error",
    "http_408",
    "http_429",
    "http_500",
    "http_502",
    "http_503",
    "http_504",
    "http_5xx",
    "smtp_421",
    "smtp_450",
    "smtp_451",
    "smtp_4xx",
    "batch_answer",
    "batch_unanswered",
];

/// `value` when `set` holds it, else [`OTHER`].
fn closed(value: &str, set: &[&'static str]) -> &'static str {
    set.iter().find(|v| **v == value).copied().unwrap_or(OTHER)
}

/// `reason` when `set` holds it; else the class label of the first of `classes` (prefix,
/// first digit, label) whose three-digit code it is (`http_418` as `http_4xx`); else
/// [`OTHER`].
fn coded(reason: &str, set: &[&'static str], classes: &[(&str, u8, &'static str)]) -> &'static str {
    let known = closed(reason, set);
    if known != OTHER {
        return known;
    }
    classes
        .iter()
        .find(|(prefix, first, _)| {
            reason.strip_prefix(prefix).is_some_and(|code| {
                code.len() == 3
                    && code.as_bytes()[0] == *first
                    && code.bytes().all(|b| b.is_ascii_digit())
            })
        })
        .map_or(OTHER, |(_, _, label)| label)
}

/// The `reason` label of a subscription's dead letter.
#[must_use]
pub fn delivery_reason(reason: &str) -> &'static str {
    coded(
        reason,
        &DELIVERY_REASONS,
        &[("http_", b'4', "http_4xx"), ("smtp_", b'5', "smtp_5xx")],
    )
}

/// The `reason` label of a failed attempt that will be tried again.
#[must_use]
pub fn retry_reason(reason: &str) -> &'static str {
    coded(
        reason,
        &RETRY_REASONS,
        &[("http_", b'5', "http_5xx"), ("smtp_", b'4', "smtp_4xx")],
    )
}

/// The `kind` labels of the topics subscriptions read: event kinds, `raw`, `replay`.
fn topic_kinds() -> impl Iterator<Item = &'static str> {
    EventKind::ALL
        .into_iter()
        .map(EventKind::as_str)
        .chain(["raw", "replay", OTHER])
}

fn owned<'a>(values: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    values.into_iter().map(str::to_owned).collect()
}

/// Label -> values, for one metric.
type LabelSets = BTreeMap<&'static str, BTreeSet<String>>;

fn label_sets(pairs: &[(&'static str, &BTreeSet<String>)]) -> LabelSets {
    pairs.iter().map(|(k, v)| (*k, (*v).clone())).collect()
}

/// What the configuration names that labels may carry: each subscription with the topics it
/// reads, and the mail sources (`smtp`, `imap:<name>`).
#[derive(Debug, Clone, Default)]
pub struct Configured {
    /// Subscription name and the topics it reads.
    pub subscriptions: Vec<(String, Vec<String>)>,
    /// Mail sources, as `ketenbus_ingest_source_up` names them.
    pub sources: BTreeSet<String>,
    /// mCSD directories (`[[mcsd]]` names).
    pub directories: BTreeSet<String>,
}

/// Every label of every ketenbus metric, with the values it may take under `configured`:
/// metric name -> label -> values. Subscriptions and sources are the configured ones; every
/// other set is fixed in code. A metric without labels is not listed.
#[must_use]
pub fn closed_label_values(configured: &Configured) -> BTreeMap<&'static str, LabelSets> {
    let with_other = |values: &[&'static str]| owned(values.iter().copied().chain([OTHER]));
    let connector = with_other(&CONNECTORS);
    let format = owned(Format::ALL.into_iter().map(Format::as_str));
    let subscription = owned(configured.subscriptions.iter().map(|(s, _)| s.as_str()));
    let source = configured.sources.clone();
    let kind = owned(topic_kinds());
    let outcome =
        owned([Outcome::Delivered, Outcome::DeadLettered, Outcome::Filtered].map(Outcome::as_str));
    let le: BTreeSet<String> = LATENCY_BUCKETS
        .iter()
        .map(|b| format!("{b}"))
        .chain(["+Inf".to_owned()])
        .collect();
    let ingest_reason = with_other(&INGEST_REASONS);
    let router_reason = with_other(&ROUTER_REASONS);
    let skip_reason = with_other(&SKIP_REASONS);
    let delivery_reason = with_other(&DELIVERY_REASONS);
    let retry_reason = with_other(&RETRY_REASONS);
    let event_kind = with_other(&EventKind::ALL.map(EventKind::as_str));
    let version = owned([env!("CARGO_PKG_VERSION")]);
    BTreeMap::from([
        (
            INGEST_RECEIVED_MESSAGES,
            label_sets(&[("connector", &connector), ("format", &format)]),
        ),
        (
            INGEST_RECEIVED_BYTES,
            label_sets(&[("connector", &connector), ("format", &format)]),
        ),
        (
            INGEST_REJECTED_MESSAGES,
            label_sets(&[("connector", &connector), ("reason", &ingest_reason)]),
        ),
        (
            INGEST_LAST_RECEIVED,
            label_sets(&[("connector", &connector)]),
        ),
        (INGEST_SOURCE_UP, label_sets(&[("source", &source)])),
        (
            ROUTER_NORMALISED_EVENTS,
            label_sets(&[("kind", &event_kind)]),
        ),
        (
            ROUTER_DEAD_LETTERS,
            label_sets(&[("reason", &router_reason)]),
        ),
        (
            ROUTER_SKIPPED_MESSAGES,
            label_sets(&[("reason", &skip_reason)]),
        ),
        (INDEX_LAG, label_sets(&[("index", &owned(INDEXES))])),
        (
            DISPATCH_DELIVERY_OUTCOMES,
            label_sets(&[("subscription", &subscription), ("outcome", &outcome)]),
        ),
        (
            DISPATCH_DELIVERY_LATENCY,
            label_sets(&[("subscription", &subscription), ("le", &le)]),
        ),
        (
            DISPATCH_DELIVERY_RETRIES,
            label_sets(&[("subscription", &subscription), ("reason", &retry_reason)]),
        ),
        (
            DISPATCH_RETRYING_RECORDS,
            label_sets(&[("subscription", &subscription), ("reason", &retry_reason)]),
        ),
        (
            DISPATCH_DEAD_LETTERS,
            label_sets(&[
                ("subscription", &subscription),
                ("reason", &delivery_reason),
            ]),
        ),
        (
            DISPATCH_CONSUMER_LAG,
            label_sets(&[("subscription", &subscription), ("kind", &kind)]),
        ),
        (
            DISPATCH_OLDEST_UNDELIVERED_AGE,
            label_sets(&[("subscription", &subscription), ("kind", &kind)]),
        ),
        (BUILD_INFO, label_sets(&[("version", &version)])),
        (
            CONSENT_QUESTIONS,
            label_sets(&[("answer", &owned(CONSENT_ANSWERS))]),
        ),
        (
            CONSENT_UNAVAILABLE,
            label_sets(&[("fallback", &owned(CONSENT_FALLBACKS))]),
        ),
        (
            MCSD_LAST_SYNC,
            label_sets(&[("directory", &configured.directories)]),
        ),
        (
            MCSD_SYNCS,
            label_sets(&[
                ("directory", &configured.directories),
                ("outcome", &owned(MCSD_OUTCOMES)),
            ]),
        ),
    ])
}

/// Latency buckets in seconds: sub-second webhooks up to a day of retries.
const LATENCY_BUCKETS: [f64; 18] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
    3600.0, 21600.0, 86400.0,
];

struct Metrics {
    received_messages: IntCounterVec,
    received_bytes: IntCounterVec,
    rejected_messages: IntCounterVec,
    last_received: GaugeVec,
    source_up: IntGaugeVec,
    normalised_events: IntCounterVec,
    router_dead_letters: IntCounterVec,
    router_skipped: IntCounterVec,
    router_lag: IntGauge,
    index_lag: IntGaugeVec,
    deliveries: IntCounterVec,
    latency: HistogramVec,
    retries: IntCounterVec,
    retrying: IntGaugeVec,
    dead_letters: IntCounterVec,
    lag: IntGaugeVec,
    oldest_age: GaugeVec,
    log_disk: IntGauge,
    log_excess: IntGauge,
    consent_questions: IntCounterVec,
    consent_unavailable: IntCounterVec,
    mcsd_last_sync: GaugeVec,
    mcsd_syncs: IntCounterVec,
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn int_gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    fn new(reg: &Registry) -> Metrics {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                DISPATCH_DELIVERY_LATENCY,
                "Seconds from the envelope's arrival to its successful delivery.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["subscription"],
        )
        .expect("valid metric");
        reg.register(Box::new(latency.clone()))
            .expect("metric registered once");
        let router_lag = IntGauge::new(
            ROUTER_CONSUMER_LAG,
            "Raw records the router has not committed yet.",
        )
        .expect("valid metric");
        reg.register(Box::new(router_lag.clone()))
            .expect("metric registered once");
        let log_disk = IntGauge::new(
            LOG_DISK_USAGE,
            "Bytes the embedded log takes on disk (database plus write-ahead log).",
        )
        .expect("valid metric");
        reg.register(Box::new(log_disk.clone()))
            .expect("metric registered once");
        let log_excess = IntGauge::new(
            LOG_RETENTION_EXCESS,
            "Bytes past retention_max_bytes kept in the fullest topic because not every reader has finished them.",
        )
        .expect("valid metric");
        reg.register(Box::new(log_excess.clone()))
            .expect("metric registered once");
        let build_info = int_gauge(
            reg,
            BUILD_INFO,
            "Always 1; the version is a label.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            received_messages: counter(
                reg,
                INGEST_RECEIVED_MESSAGES,
                "Messages accepted onto the log.",
                &["connector", "format"],
            ),
            received_bytes: counter(
                reg,
                INGEST_RECEIVED_BYTES,
                "Body bytes accepted onto the log.",
                &["connector", "format"],
            ),
            rejected_messages: counter(
                reg,
                INGEST_REJECTED_MESSAGES,
                "Messages refused at ingest; the sender heard an error or try again.",
                &["connector", "reason"],
            ),
            last_received: gauge(
                reg,
                INGEST_LAST_RECEIVED,
                "Unix time a connector last accepted a message (start-up time until the first one).",
                &["connector"],
            ),
            source_up: int_gauge(
                reg,
                INGEST_SOURCE_UP,
                "1 while a source (smtp, imap:<name>) can do its work, 0 while its peer is down.",
                &["source"],
            ),
            normalised_events: counter(
                reg,
                ROUTER_NORMALISED_EVENTS,
                "Events the router made.",
                &["kind"],
            ),
            router_dead_letters: counter(
                reg,
                ROUTER_DEAD_LETTERS,
                "Messages the router dead-lettered.",
                &["reason"],
            ),
            router_skipped: counter(
                reg,
                ROUTER_SKIPPED_MESSAGES,
                "Messages the router passed by without events.",
                &["reason"],
            ),
            router_lag,
            index_lag: int_gauge(
                reg,
                INDEX_LAG,
                "Records an index built from the log has not applied yet.",
                &["index"],
            ),
            deliveries: counter(
                reg,
                DISPATCH_DELIVERY_OUTCOMES,
                "Records finished by a subscription.",
                &["subscription", "outcome"],
            ),
            latency,
            retries: counter(
                reg,
                DISPATCH_DELIVERY_RETRIES,
                "Failed delivery attempts that will be tried again.",
                &["subscription", "reason"],
            ),
            retrying: int_gauge(
                reg,
                DISPATCH_RETRYING_RECORDS,
                "Records held on the retry topic waiting for another attempt, by the reason their last attempt failed.",
                &["subscription", "reason"],
            ),
            dead_letters: counter(
                reg,
                DISPATCH_DEAD_LETTERS,
                "Records a subscription dead-lettered.",
                &["subscription", "reason"],
            ),
            lag: int_gauge(
                reg,
                DISPATCH_CONSUMER_LAG,
                "Records a subscription has not committed yet.",
                &["subscription", "kind"],
            ),
            oldest_age: gauge(
                reg,
                DISPATCH_OLDEST_UNDELIVERED_AGE,
                "Age in seconds of the oldest record a subscription is still working on; 0 when caught up.",
                &["subscription", "kind"],
            ),
            log_disk,
            log_excess,
            consent_questions: counter(
                reg,
                CONSENT_QUESTIONS,
                "Closed questions asked of the consent service (Mitz), by answer.",
                &["answer"],
            ),
            consent_unavailable: counter(
                reg,
                CONSENT_UNAVAILABLE,
                "Deliveries needing consent while the consent service could not answer, by fallback (allow: delivered by the default; retry: parked).",
                &["fallback"],
            ),
            mcsd_last_sync: gauge(
                reg,
                MCSD_LAST_SYNC,
                "When each mCSD directory last synced without error (unix seconds; 0 before the first).",
                &["directory"],
            ),
            mcsd_syncs: counter(
                reg,
                MCSD_SYNCS,
                "Sync runs of each mCSD directory by outcome (ok, failed: the replica kept serving).",
                &["directory", "outcome"],
            ),
        }
    }
}

/// The metrics, registered in the default registry (which also carries the process
/// collector: RSS, CPU seconds, open file descriptors).
static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new(prometheus::default_registry()));

/// The `kind` label of a topic a subscription reads: the event kind, `raw` or `replay`.
#[must_use]
pub fn topic_kind(topic: &str) -> &'static str {
    if topic == topics::RAW {
        return "raw";
    }
    if topic.starts_with("ketenbus.replay.") {
        return "replay";
    }
    topic
        .strip_prefix("ketenbus.events.")
        .and_then(EventKind::parse)
        .map_or("other", EventKind::as_str)
}

fn unix_seconds(ms: i64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // ms since 1970 fit an f64 exactly until the year 287396
    let s = ms as f64 / 1000.0;
    s
}

/// Register everything and create the series operators expect to see at zero, so that
/// `increase()` and `rate()` see the first event: each connector's counters (every format,
/// every refusal reason) and its last-received time (set to now), the router's counters for
/// every kind and reason, each subscription's outcomes, retries, dead letters for every
/// reason, lag and age. Call once at start-up; calling again is harmless.
pub fn init(configured: &Configured, connectors: &[&str]) {
    let m = &*METRICS;
    let now = unix_seconds(now_ms());
    for connector in connectors {
        let connector = closed(connector, &CONNECTORS);
        for format in Format::ALL {
            m.received_messages
                .with_label_values(&[connector, format.as_str()]);
            m.received_bytes
                .with_label_values(&[connector, format.as_str()]);
        }
        for reason in INGEST_REASONS.into_iter().chain([OTHER]) {
            m.rejected_messages.with_label_values(&[connector, reason]);
        }
        m.last_received.with_label_values(&[connector]).set(now);
    }
    for kind in EventKind::ALL
        .map(EventKind::as_str)
        .into_iter()
        .chain([OTHER])
    {
        m.normalised_events.with_label_values(&[kind]);
    }
    for reason in ROUTER_REASONS.into_iter().chain([OTHER]) {
        m.router_dead_letters.with_label_values(&[reason]);
    }
    for index in INDEXES {
        m.index_lag.with_label_values(&[index]);
    }
    for reason in SKIP_REASONS.into_iter().chain([OTHER]) {
        m.router_skipped.with_label_values(&[reason]);
    }
    for answer in CONSENT_ANSWERS {
        m.consent_questions.with_label_values(&[answer]);
    }
    for fallback in CONSENT_FALLBACKS {
        m.consent_unavailable.with_label_values(&[fallback]);
    }
    for d in &configured.directories {
        m.mcsd_last_sync.with_label_values(&[d.as_str()]);
        for outcome in MCSD_OUTCOMES {
            m.mcsd_syncs.with_label_values(&[d.as_str(), outcome]);
        }
    }
    for (name, topics) in &configured.subscriptions {
        subscription_started(name, topics);
    }
}

/// Create the series of subscription `name` reading `topics` at zero (outcomes, dead letters
/// and retries by every reason, latency, lag and age per topic kind). [`init`] does it for
/// the configured subscriptions; a Subscription made through `/fhir/Subscription` does it
/// when it starts, and [`subscription_removed`] takes its series away when it is deleted, so
/// its series live as long as it does.
pub fn subscription_started(name: &str, topics: &[String]) {
    let m = &*METRICS;
    for outcome in [Outcome::Delivered, Outcome::DeadLettered, Outcome::Filtered] {
        m.deliveries.with_label_values(&[name, outcome.as_str()]);
    }
    for reason in DELIVERY_REASONS.into_iter().chain([OTHER]) {
        m.dead_letters.with_label_values(&[name, reason]);
    }
    for reason in RETRY_REASONS.into_iter().chain([OTHER]) {
        m.retries.with_label_values(&[name, reason]);
        m.retrying.with_label_values(&[name, reason]).set(0);
    }
    m.latency.with_label_values(&[name]);
    for topic in topics {
        let kind = topic_kind(topic);
        m.lag.with_label_values(&[name, kind]).set(0);
        m.oldest_age.with_label_values(&[name, kind]).set(0.0);
    }
}

/// Take away every series of subscription `name` reading `topics` (a deleted FHIR
/// Subscription): its labels come from closed sets, so these are all it can have.
pub fn subscription_removed(name: &str, topics: &[String]) {
    let m = &*METRICS;
    for outcome in [Outcome::Delivered, Outcome::DeadLettered, Outcome::Filtered] {
        let _ = m.deliveries.remove_label_values(&[name, outcome.as_str()]);
    }
    for reason in DELIVERY_REASONS.into_iter().chain([OTHER]) {
        let _ = m.dead_letters.remove_label_values(&[name, reason]);
    }
    for reason in RETRY_REASONS.into_iter().chain([OTHER]) {
        let _ = m.retries.remove_label_values(&[name, reason]);
        let _ = m.retrying.remove_label_values(&[name, reason]);
    }
    let _ = m.latency.remove_label_values(&[name]);
    for kind in topics.iter().map(|t| topic_kind(t)).chain(["replay"]) {
        let _ = m.lag.remove_label_values(&[name, kind]);
        let _ = m.oldest_age.remove_label_values(&[name, kind]);
    }
}

/// An mCSD directory (a configured name) synced at `unix_seconds`.
pub fn mcsd_synced(directory: &str, unix_seconds: i64) {
    #[allow(clippy::cast_precision_loss)] // seconds since 1970 fit an f64 exactly
    METRICS
        .mcsd_last_sync
        .with_label_values(&[directory])
        .set(unix_seconds as f64);
    METRICS
        .mcsd_syncs
        .with_label_values(&[directory, "ok"])
        .inc();
}

/// A sync run of an mCSD directory (a configured name) failed.
pub fn mcsd_failed(directory: &str) {
    METRICS
        .mcsd_syncs
        .with_label_values(&[directory, "failed"])
        .inc();
}

/// A connector accepted a message: it is durable on the raw topic.
pub fn received(connector: &str, format: Format, bytes: usize) {
    let m = &*METRICS;
    let connector = closed(connector, &CONNECTORS);
    m.received_messages
        .with_label_values(&[connector, format.as_str()])
        .inc();
    m.received_bytes
        .with_label_values(&[connector, format.as_str()])
        .inc_by(bytes as u64);
    m.last_received
        .with_label_values(&[connector])
        .set(unix_seconds(now_ms()));
    tracing::debug!(
        connector,
        format = format.as_str(),
        bytes,
        "message received"
    );
}

/// A source (`smtp`, `imap:<name>`: configured names only) can or cannot do its work.
pub fn source_up(source: &str, up: bool) {
    METRICS
        .source_up
        .with_label_values(&[source])
        .set(i64::from(up));
}

/// A connector refused a message; `reason` is a code from [`INGEST_REASONS`].
pub fn rejected(connector: &str, reason: &'static str) {
    let (connector, reason) = (
        closed(connector, &CONNECTORS),
        closed(reason, &INGEST_REASONS),
    );
    METRICS
        .rejected_messages
        .with_label_values(&[connector, reason])
        .inc();
    tracing::debug!(connector, reason, "message refused");
}

/// Count an ingest error (the log did not take the message) and hand it back.
#[must_use]
pub fn refused(connector: &str, error: IngestError) -> IngestError {
    let reason = match &error {
        IngestError::Unavailable(_) => "log_unavailable",
        IngestError::Refused {
            reason: "too_large",
            ..
        } => "too_large",
        _ => "log_failure",
    };
    rejected(connector, reason);
    error
}

/// A retention pass ran: how far the fullest topic stays past its size limit with records not
/// every reader has finished.
pub fn retention(deleted: u64, excess_bytes: u64) {
    METRICS
        .log_excess
        .set(i64::try_from(excess_bytes).unwrap_or(i64::MAX));
    tracing::debug!(deleted, excess_bytes, "retention pass");
}

/// The router recorded a lineage step for message `message_id` (normalised event, dead
/// letter or pass-by); a dead letter is a WARN line with its reason code. Steps of other
/// stages (CONTRL sent, delivery reports) are lineage only.
pub fn routed(
    message_id: &str,
    stage: Stage,
    outcome: StepOutcome,
    kind: Option<&str>,
    reason: Option<&str>,
) {
    let m = &*METRICS;
    if !matches!(stage, Stage::Normalise | Stage::Normalised) {
        return;
    }
    match outcome {
        StepOutcome::Normalised => {
            let kind = kind
                .and_then(EventKind::parse)
                .map_or(OTHER, EventKind::as_str);
            m.normalised_events.with_label_values(&[kind]).inc();
            tracing::debug!(kind, "event normalised");
        }
        StepOutcome::Rejected => {
            let label = closed(reason.unwrap_or(OTHER), &ROUTER_REASONS);
            m.router_dead_letters.with_label_values(&[label]).inc();
            tracing::warn!(
                message_id = %message_id,
                reason = %label,
                "message dead-lettered by the router"
            );
        }
        outcome => {
            let reason = closed(reason.unwrap_or(outcome.as_str()), &SKIP_REASONS);
            m.router_skipped.with_label_values(&[reason]).inc();
            tracing::debug!(reason, "message passed by without events");
        }
    }
}

/// How long ago the envelope behind `payload` arrived: the envelope's `received_at` for raw
/// deliveries, the time in the envelope id (UUIDv7) for events. `None` when unknown.
#[must_use]
pub fn since_received(payload: &Payload) -> Option<Duration> {
    let received_ms = match payload {
        Payload::Raw(env) => env.received_at_ms,
        Payload::Event(event) => {
            let id = uuid::Uuid::parse_str(&event.header().envelope_id).ok()?;
            let (secs, nanos) = id.get_timestamp()?.to_unix();
            i64::try_from(secs).ok()?.checked_mul(1000)? + i64::from(nanos / 1_000_000)
        }
    };
    u64::try_from(now_ms() - received_ms)
        .ok()
        .map(Duration::from_millis)
}

/// A subscription's sink accepted a record, `latency` after its envelope arrived.
pub fn delivered(subscription: &str, kind: &str, latency: Option<Duration>) {
    let m = &*METRICS;
    m.deliveries
        .with_label_values(&[subscription, Outcome::Delivered.as_str()])
        .inc();
    if let Some(l) = latency {
        m.latency
            .with_label_values(&[subscription])
            .observe(l.as_secs_f64());
    }
    tracing::debug!(
        subscription,
        kind,
        latency_ms = latency.map(|l| l.as_millis()),
        "delivered"
    );
}

/// Attempt `attempt` to deliver record `record_id` failed and will be tried again in
/// `retry_in`: counted by reason, and a WARN line with the reason code (never the detail,
/// which may quote the receiver).
pub fn retrying(
    subscription: &str,
    record_id: &str,
    attempt: u32,
    error: &DeliveryError,
    retry_in: Duration,
) {
    let reason = retry_reason(error.reason());
    METRICS
        .retries
        .with_label_values(&[subscription, reason])
        .inc();
    tracing::warn!(
        subscription = %subscription,
        record_id = %record_id,
        attempt,
        reason = %error.reason(),
        retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
        "delivery failed, retrying"
    );
}

/// How many records `subscription` holds for another attempt, per reason code of their last
/// failure (counted as [`retry_reason`]); reasons not given are 0.
pub fn retrying_records<'a>(subscription: &str, reasons: impl IntoIterator<Item = &'a str>) {
    let mut counts: BTreeMap<&'static str, i64> = RETRY_REASONS
        .into_iter()
        .chain([OTHER])
        .map(|r| (r, 0))
        .collect();
    for r in reasons {
        *counts.entry(retry_reason(r)).or_default() += 1;
    }
    for (reason, n) in counts {
        METRICS
            .retrying
            .with_label_values(&[subscription, reason])
            .set(n);
    }
}

/// A subscription dead-lettered record `record_id` after `attempt` attempts (0: none) for
/// `reason` (counted as [`delivery_reason`]): counted, and a WARN line with the reason code.
pub fn dead_lettered(subscription: &str, record_id: &str, attempt: u32, reason: &str) {
    let m = &*METRICS;
    let label = delivery_reason(reason);
    m.deliveries
        .with_label_values(&[subscription, Outcome::DeadLettered.as_str()])
        .inc();
    m.dead_letters
        .with_label_values(&[subscription, label])
        .inc();
    tracing::warn!(
        subscription = %subscription,
        record_id = %record_id,
        attempt,
        reason = %reason,
        "delivery failed for good: dead-lettered"
    );
}

/// The consent service answered a closed question with `answer` (one of
/// [`CONSENT_ANSWERS`]).
pub fn consent_question(answer: &str) {
    METRICS
        .consent_questions
        .with_label_values(&[closed(answer, &CONSENT_ANSWERS)])
        .inc();
}

/// A delivery needing consent met an unavailable consent service; `fallback` is one of
/// [`CONSENT_FALLBACKS`].
pub fn consent_unavailable(fallback: &str) {
    METRICS
        .consent_unavailable
        .with_label_values(&[closed(fallback, &CONSENT_FALLBACKS)])
        .inc();
}

/// A subscription's filter let a record pass by.
pub fn filtered(subscription: &str) {
    METRICS
        .deliveries
        .with_label_values(&[subscription, Outcome::Filtered.as_str()])
        .inc();
    tracing::debug!(subscription, "filtered out");
}

/// The router's consumer lag on the raw topic.
pub fn router_lag(records: i64) {
    METRICS.router_lag.set(records);
}

/// How many records `index` (one of [`INDEXES`]) has not applied yet.
pub fn index_lag(index: &str, records: i64) {
    METRICS
        .index_lag
        .with_label_values(&[closed(index, &INDEXES)])
        .set(records);
}

/// A subscription's consumer lag on the topics of one `kind` label.
pub fn consumer_lag(subscription: &str, kind: &str, records: i64) {
    METRICS
        .lag
        .with_label_values(&[subscription, kind])
        .set(records);
}

/// The age of a subscription's oldest undelivered record of one `kind` label.
pub fn oldest_undelivered(subscription: &str, kind: &str, age_ms: i64) {
    METRICS
        .oldest_age
        .with_label_values(&[subscription, kind])
        .set(unix_seconds(age_ms));
}

/// The log's size on disk.
pub fn log_disk(bytes: u64) {
    METRICS
        .log_disk
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// Everything in the default registry in the Prometheus text format (version 0.0.4).
#[must_use]
pub fn render() -> String {
    LazyLock::force(&METRICS);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&prometheus::gather(), &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// The ketenbus metrics as JSON, read from the same registry as [`render`] (the console's
/// overview): `{"at_ms", "metrics": {name: [{"labels": {..}, "value": n}]}}`. A histogram's
/// value is its count of observations, with `sum` beside it.
#[must_use]
pub fn snapshot() -> serde_json::Value {
    use prometheus::proto::MetricType;
    LazyLock::force(&METRICS);
    let mut metrics = serde_json::Map::new();
    for family in prometheus::gather() {
        if !family.name().starts_with("ketenbus_") {
            continue;
        }
        let series: Vec<serde_json::Value> = family
            .get_metric()
            .iter()
            .map(|m| {
                let labels: serde_json::Map<String, serde_json::Value> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().into()))
                    .collect();
                let (value, sum) = match family.get_field_type() {
                    MetricType::COUNTER => (m.get_counter().value(), None),
                    MetricType::GAUGE => (m.get_gauge().value(), None),
                    MetricType::HISTOGRAM => {
                        let h = m.get_histogram();
                        #[allow(clippy::cast_precision_loss)] // counts stay far below 2^52
                        let count = h.get_sample_count() as f64;
                        (count, Some(h.get_sample_sum()))
                    }
                    _ => (0.0, None),
                };
                let mut v = serde_json::json!({ "labels": labels, "value": value });
                if let Some(sum) = sum {
                    v["sum"] = sum.into();
                }
                v
            })
            .collect();
        metrics.insert(family.name().to_owned(), series.into());
    }
    serde_json::json!({ "at_ms": now_ms(), "metrics": metrics })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const STAGES: [&str; 5] = ["ingest", "router", "dispatch", "log", "build"];
    const UNITS: [&str; 8] = [
        "messages", "bytes", "events", "letters", "records", "seconds", "outcomes", "retries",
    ];

    /// The family of every metric in `text`, with its TYPE, checking the line grammar of the
    /// text exposition format on the way.
    fn parse(text: &str) -> BTreeMap<String, String> {
        let mut types = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                    "{line}"
                );
                assert!(
                    types.insert(name.to_owned(), ty.to_owned()).is_none(),
                    "TYPE twice: {line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "stray line {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').expect("series value");
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "{line}"
            );
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .expect("braces");
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(!v.contains('\n'), "{line}");
                }
            }
            samples.insert(name.to_owned());
        }
        for s in &samples {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    s.strip_suffix(suf)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(s);
            assert!(types.contains_key(family), "sample {s} without TYPE");
        }
        types
    }

    #[test]
    fn names_follow_the_rule() {
        for name in NAMES {
            let rest = name.strip_prefix("ketenbus_").expect("prefix");
            let stage = rest.split('_').next().unwrap();
            assert!(STAGES.contains(&stage), "{name}: stage {stage}");
            if name == BUILD_INFO || name == INGEST_SOURCE_UP {
                // Prometheus's own conventions: `_info` for a constant 1 with labels, `_up`
                // for a 1/0 state (like the scrape's `up`).
                continue;
            }
            let core = rest.strip_suffix("_total").unwrap_or(rest);
            let unit = core.rsplit('_').next().unwrap();
            assert!(UNITS.contains(&unit), "{name}: unit {unit}");
            assert!(
                core.matches('_').count() >= 2,
                "{name}: stage, noun and unit"
            );
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
    }

    /// Make every metric family show at least one series.
    fn touch_all() {
        received("http", Format::Edifact, 10);
        rejected("http", "too_large");
        for (outcome, reason) in [
            (StepOutcome::Normalised, None),
            (StepOutcome::Rejected, Some("edifact_syntax")),
            (StepOutcome::UnsupportedFormat, Some("unsupported_format")),
        ] {
            routed("m-1", Stage::Normalise, outcome, Some("letter"), reason);
        }
        filtered("t-sub");
        source_up("imap:t-hub", true);
        consent_question("permit");
        consent_unavailable("retry");
        mcsd_synced("lrza", 1);
        mcsd_failed("lrza");
        let m = &*METRICS;
        m.lag.with_label_values(&["t-sub", "raw"]).set(0);
        m.oldest_age.with_label_values(&["t-sub", "raw"]).set(0.0);
    }

    #[test]
    fn counters_end_in_total_and_nothing_else_does() {
        touch_all();
        retrying(
            "t-sub",
            "r-1",
            1,
            &DeliveryError::Retryable {
                reason: "http_503".into(),
                detail: String::new(),
            },
            Duration::from_millis(500),
        );
        retrying_records("t-sub", ["http_503"]);
        delivered("t-sub", "lab_result", Some(Duration::from_millis(1500)));
        dead_lettered("t-sub", "r-2", 3, "http_400");
        index_lag("lineage", 0);
        let types = parse(&render());
        for name in NAMES {
            let ty = types
                .get(name)
                .unwrap_or_else(|| panic!("{name} not exported"));
            assert_eq!(
                name.ends_with("_total"),
                ty == "counter",
                "{name} is a {ty}"
            );
        }
        for process in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(types.contains_key(process), "{process} missing");
        }
    }

    #[test]
    fn output_parses_and_carries_what_happened() {
        received("http", Format::FhirJson, 1234);
        rejected("http", "empty_body");
        delivered("t-out", "letter", Some(Duration::from_secs(2)));
        filtered("t-out");
        routed(
            "m-2",
            Stage::Normalised,
            StepOutcome::Normalised,
            Some("lab_result"),
            None,
        );
        let text = render();
        parse(&text);
        assert!(
            text.contains(
                r#"ketenbus_ingest_received_bytes_total{connector="http",format="fhir_json"}"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"ketenbus_dispatch_delivery_outcomes_total{outcome="filtered",subscription="t-out"} 1"#), "{text}");
        assert!(text.contains(r#"ketenbus_dispatch_delivery_latency_seconds_bucket{subscription="t-out",le="2.5"} 1"#), "{text}");
        assert!(
            text.contains(r#"ketenbus_router_normalised_events_total{kind="lab_result"}"#),
            "{text}"
        );
        assert!(text.contains(r#"ketenbus_build_info{version=""#), "{text}");
    }

    #[test]
    fn open_values_are_counted_as_a_fixed_code() {
        assert_eq!(delivery_reason("http_404"), "http_404");
        assert_eq!(delivery_reason("http_418"), "http_4xx");
        assert_eq!(delivery_reason("smtp_550"), "smtp_550");
        assert_eq!(delivery_reason("smtp_535"), "smtp_5xx");
        assert_eq!(retry_reason("http_503"), "http_503");
        assert_eq!(retry_reason("http_507"), "http_5xx");
        assert_eq!(retry_reason("smtp_452"), "smtp_4xx");
        assert_eq!(retry_reason("connect"), "connect");
        for open in ["http_404", "http_5001", "Jansen", ""] {
            assert_eq!(retry_reason(open), OTHER, "{open}");
        }
        for open in [
            "dsn_5.1.1-INJECTED-Jansen-999911120",
            "http_4044",
            "http_5xx",
            "smtp_4xx",
            "",
        ] {
            assert_eq!(delivery_reason(open), OTHER, "{open}");
        }
        dead_lettered("t-open", "r-3", 0, "dsn_5.1.1-INJECTED-Jansen-999911120");
        rejected("t-open-connector", "not-a-reason");
        routed(
            "m-3",
            Stage::DeliveryReport,
            StepOutcome::Failed,
            None,
            Some("dsn_5.1.1-INJECTED-Jansen-999911120"),
        );
        routed(
            "m-4",
            Stage::Normalise,
            StepOutcome::Rejected,
            None,
            Some("Jansen"),
        );
        let text = render();
        assert!(
            !text.contains("INJECTED") && !text.contains("Jansen"),
            "{text}"
        );
        assert!(text.contains(
            r#"ketenbus_dispatch_dead_letters_total{reason="other",subscription="t-open"} 1"#
        ));
        assert!(text.contains(
            r#"ketenbus_ingest_rejected_messages_total{connector="other",reason="other"}"#
        ));
    }

    #[test]
    fn every_labelled_metric_has_its_closed_sets() {
        let sets = closed_label_values(&Configured::default());
        for name in NAMES {
            if [ROUTER_CONSUMER_LAG, LOG_DISK_USAGE, LOG_RETENTION_EXCESS].contains(&name) {
                assert!(!sets.contains_key(name), "{name} has no labels");
            } else {
                assert!(sets.contains_key(name), "{name} has no closed label sets");
            }
        }
        assert!(sets[DISPATCH_DEAD_LETTERS]["reason"].contains("redirect"));
        assert!(sets[DISPATCH_DELIVERY_LATENCY]["le"].contains("0.01"));
        assert!(sets[DISPATCH_DELIVERY_LATENCY]["le"].contains("86400"));
    }

    #[test]
    fn kinds_of_topics() {
        assert_eq!(topic_kind(topics::RAW), "raw");
        assert_eq!(
            topic_kind(&topics::events(EventKind::AcuteHandover)),
            "acute_handover"
        );
        assert_eq!(topic_kind(&topics::replay("gp")), "replay");
    }
}
