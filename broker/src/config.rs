//! Configuration: documented serde structs (the operator's reference, mirrored in
//! `ops/ketenbus.example.toml`), validated once into [`Settings`]. `ketenbus check-config`
//! runs the same validation and prints every problem with its key path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::bus::{BusConfig, Engine};
use crate::deliver::config::{Subscription, SubscriptionConfig};
pub use crate::env::{Env, Problem};
use crate::http::config::HttpConfig;
use crate::ingest::limits::LimitsConfig;
use crate::route::edifact::EdifactConfig;
use crate::route::keys::KeysConfig;

mod read;

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
    /// mCSD directories replicated as the address book behind `[address_book]`
    /// (`[[mcsd]]`).
    pub mcsd: Vec<crate::deliver::mcsd::McsdConfig>,
    /// FHIR clients that subscribe themselves through `/fhir/Subscription`
    /// (`[fhir_subscriptions]`).
    pub fhir_subscriptions: crate::deliver::backport::FhirSubscriptionsConfig,
    /// Notified Pull (`[notified_pull]`): the token endpoint and pulls from partners.
    pub notified_pull: Option<crate::deliver::pull::NotifiedPullConfig>,
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
            mcsd: Vec::new(),
            fhir_subscriptions: crate::deliver::backport::FhirSubscriptionsConfig::default(),
            notified_pull: None,
        }
    }
}

/// The validated configuration the runtime uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file as read.
    pub config: Config,
    /// Validated subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// The replica of each `[[mcsd]]` directory (in its order), behind the address book
    /// the subscriptions' sinks resolve receivers in; loaded and synced by the runtime.
    pub replicas: Vec<Arc<crate::deliver::mcsd::Replica>>,
    /// The environment it was validated with, for what is read at start-up.
    pub env: Env,
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
            directories: self.config.mcsd.iter().map(|d| d.name.clone()).collect(),
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
    /// The file cannot be read (one problem without a key path: the caller names the file),
    /// or every syntax and type error found in it, each with its key path.
    pub fn from_file(path: &Path) -> Result<Config, Vec<Problem>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![Problem::new("", format!("cannot read the file: {e}"))])?;
        Config::from_toml(&text)
    }

    /// Parse TOML text.
    ///
    /// # Errors
    /// Every syntax error the TOML parser finds, or else every type error in it: each
    /// section, array element and key is read on its own, so one error does not hide
    /// another. Each names its key path and line; type errors an example of a good value.
    pub fn from_toml(text: &str) -> Result<Config, Vec<Problem>> {
        read::read(text)
    }

    /// Check everything serde cannot, collecting every problem: the sum of each section's
    /// problems. Environment variables are read through `env`, so tests need not touch the
    /// process environment.
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn validate(self, env: &Env) -> Result<Settings, Vec<Problem>> {
        let loopback = self.http.listen.ip().is_loopback();
        let replicas = crate::deliver::mcsd::replicas(&self.data_dir, &self.mcsd);
        let book = Arc::new(
            self.address_book.clone().with_directories(
                replicas
                    .iter()
                    .map(|r| Arc::clone(r) as Arc<dyn ketenbus_connectors::address_book::Directory>)
                    .collect(),
            ),
        );
        // Sections in the order `check-config` has always listed their problems.
        let mut problems = self.partitions_problems();
        problems.extend(self.http.problems());
        problems.extend(self.limits.problems(self.largest_message()));
        problems.extend(crate::deliver::sink::webhook::batch_problems(
            &self.subscriptions,
            self.largest_message(),
        ));
        problems.extend(self.engine_problems(env));
        problems.extend(self.keys.problems(env));
        problems.extend(self.audit.problems(&self.data_dir, loopback, env));
        problems.extend(Problem::under("mail", self.mail.problems(env.lookup())));
        problems.extend(crate::deliver::config::address_book_problems(&book));
        problems.extend(crate::deliver::mcsd::problems(&self.mcsd));
        problems.extend(self.fhir_subscriptions.problems());
        if let Err(p) =
            crate::deliver::backport::seal::key_from(&self.fhir_subscriptions.header_key_env, env)
        {
            problems.push(p);
        }
        problems.extend(crate::http::auth::problems(&self.senders, &self.operators));
        problems.extend(crate::deliver::config::consent_problems(
            &self.consent,
            &self.subscriptions,
        ));
        if let Some(mitz) = &self.consent.mitz {
            problems.extend(mitz.problems(env));
        }
        for (i, inbox) in self.inbox.iter().enumerate() {
            problems.extend(Problem::under(&format!("inbox[{i}]"), inbox.problems()));
        }
        problems.extend(self.notified_pull_problems(env));
        let subscriptions = crate::deliver::config::check_all(&self.subscriptions, &book, env)
            .map_err(|found| problems.extend(found))
            .unwrap_or_default();
        if problems.is_empty() {
            Ok(Settings {
                config: self,
                subscriptions,
                replicas,
                env: env.clone(),
            })
        } else {
            Err(problems)
        }
    }

    /// Problems of `[notified_pull]`, and `notified-pull` sinks without it.
    fn notified_pull_problems(&self, env: &Env) -> Vec<Problem> {
        let mut problems = self
            .notified_pull
            .as_ref()
            .map(|n| {
                n.problems(env, |u, plain| {
                    crate::deliver::sink::endpoint_url(u, plain).map(|_| ())
                })
            })
            .unwrap_or_default();
        for (i, s) in self.subscriptions.iter().enumerate() {
            if matches!(s.sink, crate::deliver::config::SinkConfig::NotifiedPull(_))
                && self.notified_pull.is_none()
            {
                problems.push(Problem::new(
                    format!("subscriptions[{i}].sink"),
                    "a notified-pull sink needs [notified_pull]",
                ));
            }
        }
        problems
    }

    /// The problem with `bus.partitions`, if any.
    fn partitions_problems(&self) -> Vec<Problem> {
        if self.bus.partitions.is_some_and(|n| n == 0 || n > 1024) {
            vec![Problem::new("bus.partitions", "must be between 1 and 1024")]
        } else {
            Vec::new()
        }
    }

    /// Problems with the engine's settings, and the HTTP ingest timeout the Kafka engine's
    /// needs.
    fn engine_problems(&self, env: &Env) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut p = |path: &str, message: String| problems.push(Problem::new(path, message));
        match (&self.bus.engine, &self.bus.kafka) {
            (Engine::Kafka, None) => p("bus.kafka", "required when bus.engine = \"kafka\"".into()),
            (Engine::Kafka, Some(k)) => {
                for problem in k.problems(env) {
                    let (key, message) = problem.split_once(": ").unwrap_or(("", &problem));
                    p(&format!("bus.kafka.{key}"), message.to_owned());
                }
                // A 503 must mean "not stored": the producer's verdict comes before the answer.
                if k.delivery_timeout >= self.http.ingest_timeout {
                    p(
                        "http.ingest_timeout",
                        format!(
                            "must be longer than bus.kafka.delivery_timeout ({}), or a sender may hear 503 for a record that is stored after all",
                            humantime::format_duration(k.delivery_timeout)
                        ),
                    );
                }
            }
            _ => {}
        }
        problems
    }

    /// The largest message any way in accepts, with the key that sets it.
    fn largest_message(&self) -> Option<(&'static str, bytesize::ByteSize)> {
        [
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
        .max_by_key(|(_, size)| *size)
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
    use ketenbus_connectors::address_book::Destination;

    use super::*;
    use crate::deliver::config::Secret;
    use crate::deliver::sink::webhook::Webhook;

    fn no_env() -> Env {
        Env::empty()
    }

    /// The environment of a deployment: the audit key and nothing else.
    fn audit_key_only() -> Env {
        Env::from_fn(|k| (k == "KETENBUS_AUDIT_KEY").then(|| "k".repeat(32)))
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
        assert!(ok.validate(&no_env()).is_ok());
    }

    fn problems_of(text: &str) -> Vec<Problem> {
        Config::from_toml(text)
            .unwrap()
            .validate(&audit_key_only())
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
        let s = Config::default().validate(&audit_key_only()).unwrap();
        // On loopback the broker makes its own audit key; anywhere else it must be given.
        Config::default().validate(&no_env()).unwrap();
        let mut public = Config::default();
        public.http.listen = "0.0.0.0:8080".parse().unwrap();
        public.http.allow_plaintext = true;
        let missing = public.validate(&no_env()).unwrap_err();
        assert!(
            missing.iter().any(|p| p.path == "audit.key_env"),
            "the audit key is named: {missing:?}"
        );
        assert_eq!(s.config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.config.bus.engine, Engine::Embedded);
        assert_eq!(s.config.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn a_partly_written_retry_table_keeps_the_defaults_of_its_own_section() {
        use std::time::Duration;
        let c = Config::from_toml(
            "[notified_pull]\nbase_url = \"https://k.example.test/fhir\"\nkey_env = \"K\"\n\
             [notified_pull.retry]\ngive_up_after = \"1h\"\n\
             [fhir_subscriptions.retry]\ninitial = \"2s\"\n",
        )
        .unwrap();
        let pull = c.notified_pull.unwrap().retry;
        assert_eq!(pull.give_up_after, Duration::from_secs(3600));
        assert_eq!(
            pull.initial,
            Duration::from_secs(1),
            "notified_pull's own default"
        );
        assert_eq!(pull.max, Duration::from_secs(300));
        let fhir = c.fhir_subscriptions.retry;
        assert_eq!(fhir.initial, Duration::from_secs(2));
        assert_eq!(
            fhir.max,
            Duration::from_secs(60),
            "fhir_subscriptions' own default"
        );
        assert_eq!(fhir.give_up_after, Duration::from_secs(24 * 3600));
        let absent = Config::from_toml(
            "[notified_pull]\nbase_url = \"https://k.example.test/fhir\"\nkey_env = \"K\"\n",
        )
        .unwrap();
        assert_eq!(
            absent.notified_pull.unwrap().retry.initial,
            Duration::from_secs(1)
        );
        assert!(
            Config::from_toml("[fhir_subscriptions.retry]\ninitail = \"2s\"\n").is_err(),
            "an unknown key is refused"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../ops/ketenbus.example.toml");
        let config = Config::from_toml(text).expect("example parses");
        let env = Env::from_fn(|k| {
            (k == "KETENBUS_GP_WEBHOOK_SECRET" || k == "KETENBUS_PATIENT_KEY")
                .then(|| "0123456789abcdef0123".to_owned())
                .or_else(|| (k == "KETENBUS_AUDIT_KEY").then(|| "k".repeat(32)))
        });
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
            .validate(&audit_key_only())
            .expect("every channel has addresses");
        assert!(matches!(
            settings.subscriptions[0].sink.get::<Webhook>(),
            Some(Webhook {
                url: Destination::Receiver(_),
                ..
            })
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
        assert_eq!(err[0].path, "http.lsten");
        assert!(
            err[0].message.contains("unknown field"),
            "{}",
            err[0].message
        );
        let err = Config::from_toml("[[subscriptions]]\nname='a'\nkinds=['raw']\nsink={type='webhook',url='http://x/'}\n[subscriptions.retry]\ninitial = 'soon'\n").unwrap_err();
        assert_eq!(err[0].path, "subscriptions[0].retry.initial");
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret(b"hunter2".to_vec())), "Secret(***)");
    }
}
