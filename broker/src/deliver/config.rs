//! `[[subscriptions]]`: who gets what, and how. Each subscription's config is checked into
//! a validated [`Subscription`] (secrets read, destinations resolved), whose [`Sink`] builds
//! the webhook, FHIR or mail client. Adding a sink is one file in `deliver/sink/` and one
//! arm of [`SinkConfig`].

use std::collections::BTreeSet;
use std::sync::Arc;

use ketenbus_connectors::address_book::AddressBook;
use ketenbus_schemas::EventKind;
use serde::Deserialize;

use crate::deliver::sink::{self, Found, SinkConfigure};
pub use crate::deliver::sink::{Secret, Sink, SinkContext};
use crate::env::{Env, Problem};

/// `[[subscriptions]]`: one receiver and what it gets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Unique name: letters, digits, `-` and `_`. Used in topic and group names and metrics.
    pub name: String,
    /// Event kinds to deliver: lab_result, letter, acute_handover, handover_notification, or
    /// `raw` for envelopes exactly as received.
    pub kinds: Vec<String>,
    /// Only records whose sender/receiver party ids match.
    #[serde(default)]
    pub filter: FilterConfig,
    /// Where to deliver.
    pub sink: SinkConfig,
    /// Retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Deliveries in flight at once; records with one patient key stay in order. With a
    /// batch webhook, at least `batch.max_events`.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Deliver only what the patient's consent allows (`[subscriptions.consent]`).
    #[serde(default)]
    pub consent: Option<crate::deliver::consent::SubscriptionConsent>,
}

fn default_concurrency() -> usize {
    16
}

/// `[subscriptions.filter]`: empty lists let everything through.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Sender party ids (`scheme:value`, e.g. `agb:01234567`, `mailbox:500001234`).
    pub senders: Vec<String>,
    /// Receiver party ids.
    pub receivers: Vec<String>,
    /// Patient keys (pseudonyms) the event must be about; not a config key: set only by a
    /// FHIR Subscription's patient filter.
    #[serde(skip)]
    pub patients: Vec<String>,
}

/// `[subscriptions.sink]`, tagged by `type`: one arm per kind of sink, each in its own file
/// under `deliver/sink/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON POST of each event (original bytes for `raw`).
    Webhook(sink::webhook::WebhookConfig),
    /// Secure mail through an SMTP submission server (`ketenbus_connectors::mail::MailSinkConfig`).
    Mail(ketenbus_connectors::mail::MailSinkConfig),
    /// A FHIR R4 endpoint: each event as nl-core resources in one Bundle.
    Fhir(sink::fhir::FhirConfig),
    /// Notified Pull: a notification Task to the receiver, which pulls the resources.
    #[serde(rename = "notified-pull")]
    NotifiedPull(sink::notified_pull::NotifiedPullSinkConfig),
}

impl SinkConfig {
    /// The arm's own configuration.
    fn arm(&self) -> &dyn SinkConfigure {
        match self {
            SinkConfig::Webhook(c) => c,
            SinkConfig::Mail(c) => c,
            SinkConfig::Fhir(c) => c,
            SinkConfig::NotifiedPull(c) => c,
        }
    }

    /// The environment variables the sink reads its secrets from (what it sends with).
    #[must_use]
    pub fn secret_vars(&self) -> Vec<&str> {
        match self {
            SinkConfig::Webhook(c) => c.secret_env.as_deref().into_iter().collect(),
            SinkConfig::Mail(c) => c.password_env.as_deref().into_iter().collect(),
            SinkConfig::Fhir(c) => c.token_env.as_deref().into_iter().collect(),
            SinkConfig::NotifiedPull(c) => c.token_env.as_deref().into_iter().collect(),
        }
    }

    /// Whether the sink names where it sends (else: each record's receiver, address book).
    #[must_use]
    pub fn has_fixed_destination(&self) -> bool {
        self.arm().has_fixed_destination()
    }

    /// Check the sink at key path `at` into a validated one: its destination (fixed, or
    /// the address book's for its channel), its secrets read through `env`.
    ///
    /// # Errors
    /// Every problem found, each at its key path under `at`.
    pub fn check(
        &self,
        at: &str,
        book: &Arc<AddressBook>,
        env: &Env,
    ) -> Result<Sink, Vec<Problem>> {
        let mut found = Found::new(at, book, env);
        match self.arm().check(&mut found) {
            Some(sink) if found.is_clean() => Ok(sink),
            _ => Err(found.into_problems()),
        }
    }
}

pub use super::backoff::RetryConfig;

/// How the ketenbus subscription names of Subscriptions made through `/fhir/Subscription`
/// start (`fhir-<id>`); a configured subscription may not take such a name, so operators
/// tell the two apart in every listing.
pub const FHIR_NAME_PREFIX: &str = "fhir-";

/// What a subscription takes from the log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Raw envelopes.
    Raw,
    /// Events of one kind.
    Events(EventKind),
}

/// A validated subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Name.
    pub name: String,
    /// What it reads.
    pub sources: BTreeSet<Source>,
    /// Filter.
    pub filter: FilterConfig,
    /// Sink.
    pub sink: Sink,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Lanes.
    pub concurrency: usize,
}

impl Subscription {
    /// The topics it reads: its event kinds or raw, and its replay topic.
    #[must_use]
    pub fn source_topics(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .sources
            .iter()
            .map(|s| match s {
                Source::Raw => ketenbus_schemas::topics::RAW.to_owned(),
                Source::Events(kind) => ketenbus_schemas::topics::events(*kind),
            })
            .collect();
        t.push(ketenbus_schemas::topics::replay(&self.name));
        t
    }
}

impl SubscriptionConfig {
    /// Check the `i`th subscription (`seen`: the names of those before it) into a validated
    /// one; environment variables named by the sink are read through `env`.
    ///
    /// # Errors
    /// Every problem found, each at its key path under `subscriptions[i]`.
    pub fn check(
        &self,
        i: usize,
        seen: &mut BTreeSet<String>,
        book: &Arc<AddressBook>,
        env: &Env,
    ) -> Result<Subscription, Vec<Problem>> {
        let s = self;
        let at = |k: &str| format!("subscriptions[{i}].{k}");
        let mut problems = Vec::new();
        let mut p = |path: String, message: String| problems.push(Problem { path, message });
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p(at("name"), "must be letters, digits, '-' or '_'".into());
        } else if s.name.starts_with(FHIR_NAME_PREFIX) {
            p(
                at("name"),
                "names starting with \"fhir-\" are those of Subscriptions made through /fhir/Subscription".into(),
            );
        } else if !seen.insert(s.name.clone()) {
            p(
                at("name"),
                format!("duplicate subscription name {}", s.name),
            );
        }
        let mut sources = BTreeSet::new();
        if s.kinds.is_empty() {
            p(at("kinds"), "name at least one kind".into());
        }
        for (j, k) in s.kinds.iter().enumerate() {
            if k == "raw" {
                sources.insert(Source::Raw);
            } else if let Some(kind) = EventKind::parse(k) {
                sources.insert(Source::Events(kind));
            } else {
                p(
                    format!("subscriptions[{i}].kinds[{j}]"),
                    format!(
                        "unknown kind {k:?}; use raw, lab_result, letter, acute_handover or handover_notification"
                    ),
                );
            }
        }
        if s.concurrency == 0 || s.concurrency > 1024 {
            p(at("concurrency"), "must be between 1 and 1024".into());
        }
        if s.retry.initial.is_zero() {
            p(at("retry.initial"), "must be more than 0".into());
        }
        if s.retry.max < s.retry.initial {
            p(
                at("retry.max"),
                "must not be less than retry.initial".into(),
            );
        }
        let sink = s.sink.check(&at("sink"), book, env);
        match sink {
            Ok(sink) if problems.is_empty() => Ok(Subscription {
                name: s.name.clone(),
                sources,
                filter: s.filter.clone(),
                retry: s.retry.clone(),
                // A batch fills from one record per lane.
                concurrency: sink
                    .get::<sink::webhook::Webhook>()
                    .and_then(|w| w.batch)
                    .map_or(s.concurrency, |b| s.concurrency.max(b.max_events)),
                sink,
            }),
            Ok(_) => Err(problems),
            Err(found) => {
                problems.extend(found);
                Err(problems)
            }
        }
    }
}

/// Check every subscription (names unique across them) into validated ones.
///
/// # Errors
/// Every problem found, each at its key path.
pub fn check_all(
    subscriptions: &[SubscriptionConfig],
    book: &Arc<AddressBook>,
    env: &Env,
) -> Result<Vec<Subscription>, Vec<Problem>> {
    let mut seen = BTreeSet::new();
    let mut valid = Vec::new();
    let mut problems = Vec::new();
    for (i, s) in subscriptions.iter().enumerate() {
        match s.check(i, &mut seen, book, env) {
            Ok(sub) => valid.push(sub),
            Err(found) => problems.extend(found),
        }
    }
    if problems.is_empty() {
        Ok(valid)
    } else {
        Err(problems)
    }
}

/// Problems with `[consent]` and the consent tables of `subscriptions`.
#[must_use]
pub fn consent_problems(
    consent: &crate::deliver::consent::ConsentConfig,
    subscriptions: &[SubscriptionConfig],
) -> Vec<Problem> {
    let with_consent: Vec<_> = subscriptions
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.consent
                .as_ref()
                .map(|c| (i, c, !s.sink.has_fixed_destination()))
        })
        .collect();
    consent.problems(&with_consent)
}

/// Problems with `[address_book]`: its entries, and its webhook and FHIR addresses as
/// endpoints a sink may send to.
#[must_use]
pub fn address_book_problems(book: &AddressBook) -> Vec<Problem> {
    let mut p = Problem::all(book.problems());
    for (party, entry) in &book.0 {
        for (key, url) in [("webhook", &entry.webhook), ("fhir", &entry.fhir)] {
            if let Some(Err(m)) = url.as_deref().map(|u| sink::endpoint_url(u, false)) {
                p.push(Problem::new(format!("address_book.{party:?}.{key}"), m));
            }
        }
    }
    p
}
