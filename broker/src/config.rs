//! Configuration: documented serde structs (the operator's reference, mirrored in
//! `ops/ketenbus.example.toml`), validated once into [`Settings`]. `ketenbus check-config`
//! runs the same validation and prints every problem with its key path.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::address_book::{Channel, Destination};
use ketenbus_schemas::EventKind;
use serde::Deserialize;

use crate::bus::{BusConfig, Engine};

/// The whole configuration file. Every key has a default: no file at all is a valid setup.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the embedded log, the lineage index and the patient-key secret.
    pub data_dir: PathBuf,
    /// HTTP listener (API, health).
    pub http: HttpConfig,
    /// The log engine.
    pub bus: BusConfig,
    /// How patient keys are made.
    pub keys: KeysConfig,
    /// Secure mail: SMTP listener, IMAP pickups, content store.
    pub mail: ketenbus_connectors::mail::MailConfig,
    /// Party id -> mail, webhook and FHIR addresses (`[address_book."<party id>"]`): where
    /// a sink without a fixed destination sends each record's receiver.
    pub address_book: ketenbus_connectors::address_book::AddressBook,
    /// EDIFACT partner settings.
    pub edifact: EdifactConfig,
    /// Watched inbox folders (`[[inbox]]`), e.g. where a file transfer drops EDIFACT.
    pub inbox: Vec<ketenbus_connectors::inbox::InboxConfig>,
    /// Who gets what.
    pub subscriptions: Vec<SubscriptionConfig>,
    /// API clients that may post messages (`[[senders]]`). With none, anyone who can
    /// reach the listener may post.
    pub senders: Vec<crate::http::auth::SenderConfig>,
    /// Operators who may read lineage and dead letters (`[[operators]]`). With none,
    /// those are open to anyone who can reach the listener.
    pub operators: Vec<crate::http::auth::OperatorConfig>,
    /// Where consent is looked up (`[consent]`).
    pub consent: crate::deliver::consent::ConsentConfig,
    /// The audit trail (`[audit]`).
    pub audit: crate::observe::audit::AuditConfig,
    /// Limits across every way in (`[limits]`).
    pub limits: LimitsConfig,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most bytes of incoming messages held in memory at once, by all ways in together
    /// (HTTP bodies, SMTP DATA, inbox files, IMAP messages) until each is durable. Past it
    /// HTTP answers 503, SMTP `451 4.3.1`, and the inbox and IMAP pickup try again later.
    /// At least the largest message any way in accepts.
    pub ingest_memory: bytesize::ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            ingest_memory: bytesize::ByteSize::mib(256),
        }
    }
}

impl LimitsConfig {
    /// The budget every way in holds its message bytes against.
    #[must_use]
    pub fn budget(&self) -> ketenbus_connectors::budget::Budget {
        ketenbus_connectors::budget::Budget::new(
            usize::try_from(self.ingest_memory.as_u64()).unwrap_or(usize::MAX),
        )
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            http: HttpConfig::default(),
            bus: BusConfig::default(),
            keys: KeysConfig::default(),
            mail: ketenbus_connectors::mail::MailConfig::default(),
            address_book: ketenbus_connectors::address_book::AddressBook::default(),
            edifact: EdifactConfig::default(),
            inbox: Vec::new(),
            subscriptions: Vec::new(),
            senders: Vec::new(),
            operators: Vec::new(),
            consent: crate::deliver::consent::ConsentConfig::default(),
            audit: crate::observe::audit::AuditConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// `[edifact]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdifactConfig {
    /// Partners (UNB sender party ids, e.g. `mailbox:500001234`) that get a UN CONTRL
    /// acknowledgement of every interchange they send. The CONTRL goes on the raw topic
    /// addressed to them (receiver = their party id) for a raw subscription to send back.
    pub contrl_partners: Vec<String>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest message body accepted; larger ones get 413.
    pub max_body: bytesize::ByteSize,
    /// Longest wait for the log to make a message durable before answering 503. On Kafka it
    /// must be longer than `bus.kafka.delivery_timeout`, so a 503 means "not stored".
    #[serde(with = "humantime_serde")]
    pub ingest_timeout: Duration,
    /// TLS on the listener (`[http.tls]`); without it the listener speaks plain HTTP.
    pub tls: Option<crate::http::server::TlsConfig>,
    /// Plain HTTP on a non-loopback address. Off by default: such a listener needs
    /// `[http.tls]` or this set to `true` (which logs a warning at start-up).
    pub allow_plaintext: bool,
    /// Connection, header and time limits (`[http.limits]`).
    pub limits: crate::http::server::Limits,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body: bytesize::ByteSize::mib(25),
            ingest_timeout: Duration::from_secs(10),
            tls: None,
            allow_plaintext: false,
            limits: crate::http::server::Limits::default(),
        }
    }
}

/// `[keys]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Environment variable holding the secret for patient keys (keyed hash of the BSN).
    /// Every process sharing a Kafka cluster needs the same one. Without it, a random secret
    /// is generated once into `<data_dir>/patient-key.secret`.
    pub patient_key_secret_env: Option<String>,
}

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

/// A configuration problem at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `subscriptions[1].sink.url`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
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

/// The validated configuration the runtime uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file as read.
    pub config: Config,
    /// Validated subscriptions.
    pub subscriptions: Vec<Subscription>,
}

impl Settings {
    /// What metric labels may carry under this configuration: each subscription with the
    /// topics it reads, and the mail sources.
    #[must_use]
    pub fn metric_labels(&self) -> crate::observe::metrics::Configured {
        let mut sources: BTreeSet<String> = self
            .config
            .mail
            .imap
            .iter()
            .map(|m| format!("imap:{}", m.name))
            .collect();
        if self.config.mail.smtp.is_some() {
            sources.insert("smtp".to_owned());
        }
        crate::observe::metrics::Configured {
            subscriptions: self
                .subscriptions
                .iter()
                .map(|s| (s.name.clone(), s.source_topics()))
                .collect(),
            sources,
        }
    }
}

impl Config {
    /// What a config leaves open, for `check-config` and the start-up log.
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        let config = self;
        let mut w = Vec::new();
        if !config.http.listen.ip().is_loopback() {
            if config.senders.is_empty() {
                w.push(format!(
                    "http.listen {} is not loopback and no [[senders]] are configured: anyone who reaches it may post messages",
                    config.http.listen
                ));
            }
            if config.operators.is_empty() {
                w.push(format!(
                    "http.listen {} is not loopback and no [[operators]] are configured: anyone who reaches it may read lineage",
                    config.http.listen
                ));
            }
        }
        w
    }

    /// Read a TOML file.
    ///
    /// # Errors
    /// The file cannot be read or is not valid TOML for these structs (the message names the key).
    pub fn from_file(path: &Path) -> Result<Config, Problem> {
        let text = std::fs::read_to_string(path).map_err(|e| Problem {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Config::from_toml(&text)
    }

    /// Parse TOML text.
    ///
    /// # Errors
    /// When the text is not valid TOML for these structs.
    pub fn from_toml(text: &str) -> Result<Config, Problem> {
        toml::from_str(text).map_err(|e| {
            let path = e
                .span()
                .map_or_else(|| "(file)".to_owned(), |s| key_path_at(text, s.start));
            Problem {
                path,
                message: e.message().to_owned(),
            }
        })
    }

    /// Check everything serde cannot, collecting every problem; environment variables are
    /// read through `env` so tests need not touch the process environment.
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut p = |path: String, message: String| problems.push(Problem { path, message });
        if self.bus.partitions == 0 || self.bus.partitions > 1024 {
            p("bus.partitions".into(), "must be between 1 and 1024".into());
        }
        if self.http.max_body.as_u64() == 0 {
            p("http.max_body".into(), "must be more than 0 bytes".into());
        }
        let largest = [
            ("http.max_body", self.http.max_body),
            (
                "mail.smtp.max_message_size",
                self.mail
                    .smtp
                    .as_ref()
                    .map_or(bytesize::ByteSize::b(0), |s| s.max_message_size),
            ),
        ]
        .into_iter()
        .chain(self.inbox.iter().map(|i| ("inbox.max_size", i.max_size)))
        .chain(
            self.mail
                .imap
                .iter()
                .map(|i| ("mail.imap.max_message_size", i.max_message_size)),
        )
        .max_by_key(|(_, size)| *size);
        if let Some((key, size)) = largest
            && self.limits.ingest_memory < size
        {
            p(
                "limits.ingest_memory".into(),
                format!("must be at least {key} ({size}), or such a message is never taken"),
            );
        }
        for (k, m) in self.http.limits.problems() {
            p(format!("http.limits.{k}"), m);
        }
        match &self.http.tls {
            Some(tls) => {
                if let Err(e) = crate::http::server::server_config(tls) {
                    p(format!("http.tls.{}", e.key()), e.to_string());
                }
            }
            None if !self.http.listen.ip().is_loopback() && !self.http.allow_plaintext => p(
                "http.listen".into(),
                "a non-loopback address without [http.tls]: configure TLS, or set http.allow_plaintext = true".into(),
            ),
            None => {}
        }
        match (&self.bus.engine, &self.bus.kafka) {
            (Engine::Kafka, None) => p(
                "bus.kafka".into(),
                "required when bus.engine = \"kafka\"".into(),
            ),
            (Engine::Kafka, Some(k)) => {
                for problem in k.problems() {
                    let (key, message) = problem.split_once(": ").unwrap_or(("", &problem));
                    p(format!("bus.kafka.{key}"), message.to_owned());
                }
                // A 503 must mean "not stored": the producer's verdict comes before the answer.
                if k.delivery_timeout >= self.http.ingest_timeout {
                    p(
                        "http.ingest_timeout".into(),
                        format!(
                            "must be longer than bus.kafka.delivery_timeout ({}), or a sender may hear 503 for a record that is stored after all",
                            humantime::format_duration(k.delivery_timeout)
                        ),
                    );
                }
            }
            _ => {}
        }
        if let Some(var) = &self.keys.patient_key_secret_env {
            match env(var) {
                None => p(
                    "keys.patient_key_secret_env".into(),
                    format!("environment variable {var} is not set"),
                ),
                Some(v) if v.len() < 16 => {
                    p(
                        "keys.patient_key_secret_env".into(),
                        format!("environment variable {var} holds fewer than 16 bytes"),
                    );
                }
                Some(_) => {}
            }
        }
        // On loopback only, `ketenbus run` makes its own key when none is configured.
        let own_key = self.http.listen.ip().is_loopback()
            && self.audit.key_file.is_none()
            && env(&self.audit.key_env).is_none();
        if self.audit.enabled
            && !own_key
            && let Err((key, m)) = self.audit.key(&self.data_dir, env)
        {
            p(format!("audit.{key}"), m);
        }
        for (k, m) in self.mail.problems(env) {
            p(format!("mail.{k}"), m);
        }
        for (k, m) in self.address_book.problems() {
            p(k, m);
        }
        for (party, entry) in &self.address_book.0 {
            for (key, url) in [("webhook", &entry.webhook), ("fhir", &entry.fhir)] {
                if let Some(Err(m)) = url.as_deref().map(|u| endpoint_url(u, false)) {
                    p(format!("address_book.{party:?}.{key}"), m);
                }
            }
        }
        let book = Arc::new(self.address_book.clone());
        // A sink without a fixed destination needs the address book to serve its channel.
        let from_book = |channel: Channel| {
            if book.serves(channel) {
                Ok(Destination::Receiver(Arc::clone(&book)))
            } else {
                Err(format!(
                    "required unless [address_book] has {} addresses",
                    channel.key()
                ))
            }
        };
        for (k, m) in crate::http::auth::problems(&self.senders, &self.operators) {
            p(k, m);
        }
        let with_consent: Vec<_> = self
            .subscriptions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.consent
                    .as_ref()
                    .map(|c| (i, c, !s.sink.has_fixed_destination()))
            })
            .collect();
        for (k, m) in crate::deliver::consent::problems(&self.consent, &with_consent) {
            p(k, m);
        }
        for (i, inbox) in self.inbox.iter().enumerate() {
            for (k, m) in inbox.problems() {
                p(format!("inbox[{i}].{k}"), m);
            }
        }
        let mut names = BTreeSet::new();
        let mut subscriptions = Vec::new();
        for (i, s) in self.subscriptions.iter().enumerate() {
            let at = |k: &str| format!("subscriptions[{i}].{k}");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                p(at("name"), "must be letters, digits, '-' or '_'".into());
            } else if !names.insert(s.name.clone()) {
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
            let sink = match &s.sink {
                SinkConfig::Webhook {
                    url,
                    secret_env,
                    timeout,
                    ca_file,
                    allow_plain_http,
                } => {
                    let parsed = match url {
                        Some(u) => endpoint_url(u, *allow_plain_http).map(Destination::Fixed),
                        None => from_book(Channel::Webhook),
                    }
                    .map_err(|m| p(at("sink.url"), m))
                    .ok();
                    let secret = match secret_env {
                        None => None,
                        Some(var) => match env(var) {
                            Some(v) if !v.is_empty() => Some(Secret(v.into_bytes())),
                            _ => {
                                p(
                                    at("sink.secret_env"),
                                    format!("environment variable {var} is not set"),
                                );
                                None
                            }
                        },
                    };
                    if timeout.is_zero() {
                        p(at("sink.timeout"), "must be more than 0".into());
                    }
                    if let Some(ca) = ca_file
                        && let Err(e) = crate::http::server::read_certs("ca_file", ca)
                    {
                        p(at("sink.ca_file"), e.to_string());
                    }
                    parsed.map(|url| Sink::Webhook {
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
                    let base = match base_url {
                        Some(u) => endpoint_url(u, *allow_plain_http).map(Destination::Fixed),
                        None => from_book(Channel::Fhir),
                    }
                    .map_err(|m| p(at("sink.base_url"), m))
                    .ok();
                    let token = token_env.as_ref().and_then(|var| match env(var) {
                        Some(v) if !v.is_empty() => Some(Secret(v.into_bytes())),
                        _ => {
                            p(
                                at("sink.token_env"),
                                format!("environment variable {var} is not set"),
                            );
                            None
                        }
                    });
                    if timeout.is_zero() {
                        p(at("sink.timeout"), "must be more than 0".into());
                    }
                    base.map(|base| Sink::Fhir {
                        base,
                        style: *style,
                        source_endpoint: source_endpoint.clone(),
                        token,
                        timeout: *timeout,
                    })
                }
                SinkConfig::Mail(config) => {
                    let found = config.problems(&self.address_book, env);
                    let ok = found.is_empty();
                    for (k, m) in found {
                        p(at(&format!("sink.{k}")), m);
                    }
                    let password = config
                        .password_env
                        .as_ref()
                        .and_then(|v| env(v))
                        .map(|v| Secret(v.into_bytes()));
                    ok.then(|| Sink::Mail {
                        config: config.clone(),
                        password,
                    })
                }
            };
            if let Some(sink) = sink {
                subscriptions.push(Subscription {
                    name: s.name.clone(),
                    sources,
                    filter: s.filter.clone(),
                    sink,
                    retry: s.retry.clone(),
                    concurrency: s.concurrency,
                });
            }
        }
        if problems.is_empty() {
            Ok(Settings {
                config: self,
                subscriptions,
            })
        } else {
            Err(problems)
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

/// The dotted key path of the table and key at byte `offset` of a TOML text, best effort:
/// the last `[table]` or `[[array]]` header before it and the key on its line.
fn key_path_at(text: &str, offset: usize) -> String {
    let upto = &text[..offset.min(text.len())];
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in upto.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
            let n = counts.entry(name.trim().to_owned()).or_insert(0);
            table = format!("{}[{}]", name.trim(), *n);
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            // A sub-table of an array element keeps the element index.
            let name = name.trim();
            table = match counts
                .iter()
                .find(|(a, _)| name.starts_with(&format!("{a}.")))
            {
                Some((a, n)) => format!("{a}[{}]{}", n - 1, &name[a.len()..]),
                None => name.to_owned(),
            };
        }
    }
    let line_start = upto.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    match (table.is_empty(), key.is_empty() || key.starts_with('[')) {
        (true, true) => "(file)".to_owned(),
        (true, false) => key.to_owned(),
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The environment of a deployment: the audit key and nothing else.
    fn audit_key_only(k: &str) -> Option<String> {
        (k == "KETENBUS_AUDIT_KEY").then(|| "k".repeat(32))
    }

    /// Every problem in a config that must not validate.
    #[test]
    fn a_memory_budget_smaller_than_the_largest_message_is_a_problem() {
        let found = found_in("[limits]\ningest_memory = \"1 MiB\"\n");
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("limits.ingest_memory") && p.contains("http.max_body")),
            "{found:?}"
        );
        let ok = Config::from_toml("[limits]\ningest_memory = \"25 MiB\"\n").unwrap();
        assert!(ok.validate(&no_env).is_ok());
    }

    fn problems_of(text: &str) -> Vec<Problem> {
        Config::from_toml(text)
            .unwrap()
            .validate(&audit_key_only)
            .unwrap_err()
    }

    /// Their `path: message` lines.
    fn found_in(text: &str) -> Vec<String> {
        problems_of(text).iter().map(Problem::to_string).collect()
    }

    fn paths_of(text: &str) -> Vec<String> {
        problems_of(text).into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn no_file_is_a_valid_setup() {
        let s = Config::default().validate(&audit_key_only).unwrap();
        // On loopback the broker makes its own audit key; anywhere else it must be given.
        Config::default().validate(&no_env).unwrap();
        let mut public = Config::default();
        public.http.listen = "0.0.0.0:8080".parse().unwrap();
        public.http.allow_plaintext = true;
        let missing = public.validate(&no_env).unwrap_err();
        assert!(
            missing.iter().any(|p| p.path == "audit.key_env"),
            "the audit key is named: {missing:?}"
        );
        assert_eq!(s.config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.config.bus.engine, Engine::Embedded);
        assert_eq!(s.config.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../ops/ketenbus.example.toml");
        let config = Config::from_toml(text).expect("example parses");
        let env = |k: &str| {
            (k == "KETENBUS_GP_WEBHOOK_SECRET" || k == "KETENBUS_PATIENT_KEY")
                .then(|| "0123456789abcdef0123".to_owned())
                .or_else(|| (k == "KETENBUS_AUDIT_KEY").then(|| "k".repeat(32)))
        };
        let s = config.validate(&env).expect("example validates");
        assert!(!s.subscriptions.is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [bus]
            partitions = 0
            [[subscriptions]]
            name = "a b"
            kinds = ["lab_result", "pizza"]
            sink = { type = "webhook", url = "ftp://x", secret_env = "NOPE" }
            [[subscriptions]]
            name = "ok"
            kinds = []
            sink = { type = "webhook", url = "http://127.0.0.1:1/" }
            [subscriptions.retry]
            initial = "2s"
            max = "1s"
        "#;
        assert_eq!(
            paths_of(text),
            vec![
                "bus.partitions",
                "subscriptions[0].name",
                "subscriptions[0].kinds[1]",
                "subscriptions[0].sink.url",
                "subscriptions[0].sink.secret_env",
                "subscriptions[1].kinds",
                "subscriptions[1].retry.max",
            ]
        );
    }

    #[test]
    fn a_sink_without_a_destination_needs_the_address_book_for_its_channel() {
        let subs = r#"
            [[subscriptions]]
            name = "hooks"
            kinds = ["acute_handover"]
            sink = { type = "webhook" }
            [[subscriptions]]
            name = "fhir"
            kinds = ["lab_result"]
            sink = { type = "fhir" }
            [[subscriptions]]
            name = "mail"
            kinds = ["letter"]
            sink = { type = "mail", host = "smtp.example.test", from = "kb@example.test" }
        "#;
        assert_eq!(
            found_in(subs),
            [
                "subscriptions[0].sink.url: required unless [address_book] has webhook addresses",
                "subscriptions[1].sink.base_url: required unless [address_book] has fhir addresses",
                "subscriptions[2].sink.to: required unless [address_book] has mail addresses",
            ]
        );
        let book = r#"
            [address_book."agb:01234567"]
            mail = "hap@gp.example.test"
            webhook = "https://hap.example.test/in"
            fhir = "https://fhir.hap.example.test/r4"
        "#;
        let settings = Config::from_toml(&format!("{subs}{book}"))
            .unwrap()
            .validate(&audit_key_only)
            .expect("every channel has addresses");
        assert!(matches!(
            settings.subscriptions[0].sink,
            Sink::Webhook {
                url: Destination::Receiver(_),
                ..
            }
        ));
        // Consent without a party checks each record's receiver: only for such a sink.
        let consent = r#"
            [consent]
            file = "/dev/null"
            [[subscriptions]]
            name = "by-receiver"
            kinds = ["lab_result"]
            sink = { type = "webhook" }
            [subscriptions.consent]
            purpose = "treatment"
            [[subscriptions]]
            name = "fixed"
            kinds = ["lab_result"]
            sink = { type = "webhook", url = "https://his.example.test/in" }
            [subscriptions.consent]
            purpose = "treatment"
        "#;
        assert_eq!(
            found_in(&format!("{consent}{book}")),
            [
                "subscriptions[1].consent.party: required unless the sink sends each record to its receiver (address book)"
            ]
        );
        let bad = r#"
            [address_book."agb:1"]
            webhook = "http://his.example.test/in"
            fhir = "not a url"
        "#;
        assert_eq!(
            paths_of(bad),
            [
                "address_book.\"agb:1\".webhook",
                "address_book.\"agb:1\".fhir"
            ]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[http]\nlisten = \"127.0.0.1:1\"\nlsten = 3\n").unwrap_err();
        assert_eq!(err.path, "http.lsten");
        assert!(err.message.contains("unknown field"), "{}", err.message);
        let err = Config::from_toml("[[subscriptions]]\nname='a'\nkinds=['raw']\nsink={type='webhook',url='http://x/'}\n[subscriptions.retry]\ninitial = 'soon'\n").unwrap_err();
        assert_eq!(err.path, "subscriptions[0].retry.initial");
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret(b"hunter2".to_vec())), "Secret(***)");
    }
}
