//! `[[subscriptions]]`: who gets what, and how. Each subscription's config is checked into
//! a validated [`Subscription`] (secrets read, destinations resolved), whose [`Sink`] builds
//! the webhook, FHIR or mail client. Adding a sink is one arm here and its client in
//! `ketenbus_connectors`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ketenbus_connectors::address_book::{AddressBook, Channel, Destination};
use ketenbus_connectors::webhook::WebhookSink;
use ketenbus_schemas::EventKind;
use serde::Deserialize;

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
    /// Deliveries in flight at once; records with one patient key stay in order.
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
}

/// `[subscriptions.sink]`, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON POST of each event (original bytes for `raw`).
    Webhook {
        /// Endpoint URL; when absent, each record's receiver's `webhook` address from
        /// `[address_book]`.
        #[serde(default)]
        url: Option<String>,
        /// Environment variable with the HMAC-SHA256 signing secret.
        secret_env: Option<String>,
        /// Per-request timeout.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// PEM file of the CA certificates to trust for this endpoint, instead of the
        /// public roots (a private care-network CA).
        #[serde(default)]
        ca_file: Option<PathBuf>,
        /// Allow an `http://` URL to a non-loopback host (unencrypted). Loopback needs no flag.
        #[serde(default)]
        allow_plain_http: bool,
    },
    /// Secure mail through an SMTP submission server (`ketenbus_connectors::mail::MailSinkConfig`).
    Mail(ketenbus_connectors::mail::MailSinkConfig),
    /// A FHIR R4 endpoint: each event as nl-core resources in one Bundle.
    Fhir {
        /// The subscriber's FHIR base URL; when absent, each record's receiver's `fhir`
        /// address from `[address_book]`.
        #[serde(default)]
        base_url: Option<String>,
        /// `transaction` (POST to the base) or `message` (POST to `[base]/$process-message`).
        #[serde(default)]
        style: ketenbus_connectors::fhir::BundleStyle,
        /// ketenbus's own FHIR base, written into `MessageHeader.source.endpoint`.
        #[serde(default)]
        source_endpoint: Option<String>,
        /// Environment variable holding a bearer token for the endpoint.
        #[serde(default)]
        token_env: Option<String>,
        /// Per-request timeout.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// Allow an `http://` base URL to a non-loopback host (unencrypted). Loopback needs no flag.
        #[serde(default)]
        allow_plain_http: bool,
    },
}

impl SinkConfig {
    /// Whether the sink names where it sends (else: each record's receiver, address book).
    #[must_use]
    pub fn has_fixed_destination(&self) -> bool {
        match self {
            SinkConfig::Webhook { url, .. } => url.is_some(),
            SinkConfig::Fhir { base_url, .. } => base_url.is_some(),
            SinkConfig::Mail(m) => m.to.is_some(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[subscriptions.retry]`: exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest wait between tries.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// After this long since the first try, the record goes to the dead letters.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a subscription takes from the log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Raw envelopes.
    Raw,
    /// Events of one kind.
    Events(EventKind),
}

/// A validated sink.
#[derive(Debug, Clone)]
pub enum Sink {
    /// Webhook with its secret resolved.
    Webhook {
        /// Endpoint, fixed or from the address book.
        url: Destination<reqwest::Url>,
        /// Signing secret (never printed).
        secret: Option<Secret>,
        /// Request timeout.
        timeout: Duration,
        /// CA bundle to trust instead of the public roots.
        ca_file: Option<PathBuf>,
    },
    /// FHIR endpoint with its token resolved.
    Fhir {
        /// Base URL, fixed or from the address book.
        base: Destination<reqwest::Url>,
        /// Transaction or message Bundle.
        style: ketenbus_connectors::fhir::BundleStyle,
        /// `MessageHeader.source.endpoint`.
        source_endpoint: Option<String>,
        /// Bearer token (never printed).
        token: Option<Secret>,
        /// Request timeout.
        timeout: Duration,
    },
    /// Secure mail with its password resolved.
    Mail {
        /// The sink's settings.
        config: ketenbus_connectors::mail::MailSinkConfig,
        /// Submission password (never printed).
        password: Option<Secret>,
    },
}

/// A secret value: prints as `***`.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
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
                sink,
                retry: s.retry.clone(),
                concurrency: s.concurrency,
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
            if let Some(Err(m)) = url.as_deref().map(|u| endpoint_url(u, false)) {
                p.push(Problem::new(format!("address_book.{party:?}.{key}"), m));
            }
        }
    }
    p
}

/// What a sink's check found: its problems, each at its key under the sink's key path.
struct Found<'a> {
    at: &'a str,
    book: &'a Arc<AddressBook>,
    env: &'a Env,
    problems: Vec<Problem>,
}

impl Found<'_> {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.problems
            .push(Problem::new(format!("{}.{key}", self.at), message));
    }

    /// The endpoint at `key`: `url` when given (plain http only as allowed), else each
    /// record's receiver's address for `channel`, which the address book must serve.
    fn destination(
        &mut self,
        key: &str,
        url: Option<&str>,
        allow_plain_http: bool,
        channel: Channel,
    ) -> Option<Destination<reqwest::Url>> {
        let book = self.book;
        let found = match url {
            Some(u) => endpoint_url(u, allow_plain_http).map(Destination::Fixed),
            None if book.serves(channel) => Ok(Destination::Receiver(Arc::clone(book))),
            None => Err(format!(
                "required unless [address_book] has {} addresses",
                channel.key()
            )),
        };
        found.map_err(|m| self.push(key, m)).ok()
    }

    /// The secret in the environment variable `var` names, if it names one; a problem at
    /// `key` when that variable is unset or empty.
    fn secret(&mut self, key: &str, var: Option<&String>) -> Option<Secret> {
        let var = var?;
        match self.env.var(var) {
            Some(v) if !v.is_empty() => Some(Secret(v.into_bytes())),
            _ => {
                self.push(key, format!("environment variable {var} is not set"));
                None
            }
        }
    }

    /// A problem at `timeout` when it is zero.
    fn timeout(&mut self, timeout: Duration) {
        if timeout.is_zero() {
            self.push("timeout", "must be more than 0");
        }
    }
}

impl SinkConfig {
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
        let mut found = Found {
            at,
            book,
            env,
            problems: Vec::new(),
        };
        let sink = match self {
            SinkConfig::Webhook {
                url,
                secret_env,
                timeout,
                ca_file,
                allow_plain_http,
            } => {
                let url =
                    found.destination("url", url.as_deref(), *allow_plain_http, Channel::Webhook);
                let secret = found.secret("secret_env", secret_env.as_ref());
                found.timeout(*timeout);
                if let Some(ca) = ca_file
                    && let Err(e) = crate::tls::read_certs("ca_file", ca)
                {
                    found.push("ca_file", e.to_string());
                }
                url.map(|url| Sink::Webhook {
                    url,
                    secret,
                    timeout: *timeout,
                    ca_file: ca_file.clone(),
                })
            }
            SinkConfig::Fhir {
                base_url,
                style,
                source_endpoint,
                token_env,
                timeout,
                allow_plain_http,
            } => {
                let base = found.destination(
                    "base_url",
                    base_url.as_deref(),
                    *allow_plain_http,
                    Channel::Fhir,
                );
                let token = found.secret("token_env", token_env.as_ref());
                found.timeout(*timeout);
                base.map(|base| Sink::Fhir {
                    base,
                    style: *style,
                    source_endpoint: source_endpoint.clone(),
                    token,
                    timeout: *timeout,
                })
            }
            SinkConfig::Mail(config) => {
                found
                    .problems
                    .extend(Problem::under(at, config.problems(book, env.lookup())));
                let password = config
                    .password_env
                    .as_ref()
                    .and_then(|v| env.var(v))
                    .map(|v| Secret(v.into_bytes()));
                Some(Sink::Mail {
                    config: config.clone(),
                    password,
                })
            }
        };
        match sink {
            Some(sink) if found.problems.is_empty() => Ok(sink),
            _ => Err(found.problems),
        }
    }
}

/// What a sink is built with besides its own settings.
#[derive(Clone)]
pub struct SinkContext {
    /// Where a sink without a fixed destination finds each record's receiver.
    pub book: Arc<AddressBook>,
    /// The documents events refer to (attachments).
    pub content: Arc<dyn ketenbus_connectors::mail::ContentStore>,
    /// The key delivery reports are tokened with (mail sinks).
    pub report_key: Vec<u8>,
}

impl std::fmt::Debug for SinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkContext(..)")
    }
}

impl Sink {
    /// The sink itself: the webhook, FHIR or mail client.
    ///
    /// # Errors
    /// The client cannot be made (a CA file unreadable, a TLS or mail setting refused).
    pub fn build(&self, ctx: &SinkContext) -> anyhow::Result<Arc<dyn ketenbus_connectors::Sink>> {
        match self {
            Sink::Mail { config, password } => {
                let password = password
                    .as_ref()
                    .map(|p| String::from_utf8_lossy(&p.0).into_owned());
                let s = ketenbus_connectors::mail::MailSink::new(
                    config.clone(),
                    password,
                    Arc::clone(&ctx.book),
                    Some(Arc::clone(&ctx.content)),
                )
                .context("building the mail sink")?
                .with_report_key(ctx.report_key.clone());
                Ok(Arc::new(s))
            }
            Sink::Fhir {
                base,
                style,
                source_endpoint,
                token,
                timeout,
            } => {
                let store = Arc::clone(&ctx.content);
                let s = ketenbus_connectors::fhir::FhirSink::new(
                    base.clone(),
                    *style,
                    source_endpoint.clone(),
                    *timeout,
                )
                .map_err(|e| anyhow::anyhow!("building the FHIR sink: {e}"))?
                .with_bearer(
                    token
                        .as_ref()
                        .map(|t| String::from_utf8_lossy(&t.0).into_owned()),
                )
                .with_attachments(Arc::new(move |hash: &str| store.get(hash).ok().flatten()));
                Ok(Arc::new(s))
            }
            Sink::Webhook {
                url,
                secret,
                timeout,
                ca_file,
            } => {
                let ca = ca_file
                    .as_ref()
                    .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
                    .transpose()?;
                let s = WebhookSink::with_roots(
                    url.clone(),
                    secret.as_ref().map(|s| s.0.clone()),
                    *timeout,
                    ca.as_deref(),
                )
                .context("building the webhook client")?;
                Ok(Arc::new(s))
            }
        }
    }
}

/// A URL whose host is this machine (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An http(s) endpoint URL; plain http only to loopback unless explicitly allowed.
fn endpoint_url(url: &str, allow_plain_http: bool) -> Result<reqwest::Url, String> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" && !allow_plain_http && !is_loopback(&u) => Err(
            "plain http to a non-loopback host: use https, or set allow_plain_http = true".into(),
        ),
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(u),
        Ok(_) => Err("must be an http or https URL".into()),
        Err(e) => Err(format!("not a URL: {e}")),
    }
}
