//! Settings of the `kafka` engine (`[bus.kafka]`) and the librdkafka configuration every
//! client shares.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use serde::Deserialize;

use crate::env::Env;

/// librdkafka properties an operator may not set through `properties` or
/// `secret_properties`: they have their own keys or would weaken the delivery guarantees.
const REFUSED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "group.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "allow.auto.create.topics",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "group.instance.id",
    "message.max.bytes",
];

/// Whether a librdkafka property carries a secret (and so belongs in `secret_properties`).
fn is_secret_property(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key.ends_with(".pem")
        || key == "sasl.oauthbearer.config"
}

/// Settings of the `kafka` engine (`[bus.kafka]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers: `host:port` pairs separated by commas, e.g. `"kafka-1:9092,kafka-2:9092"`.
    pub bootstrap_servers: String,
    /// Client id the cluster sees in its request logs and quotas.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Partitions of a topic created at start-up when the topic list does not say (0).
    #[serde(default = "default_partitions")]
    pub default_partitions: u32,
    /// Replication factor of topics created at start-up: 3 on a production cluster (with
    /// `acks=all`, a record is acknowledged once every in-sync replica holds it); 1 only for a
    /// single test broker.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: u16,
    /// Topic-level settings of topics created at start-up, e.g.
    /// `{ "min.insync.replicas" = "2", "retention.ms" = "604800000" }`. With
    /// `replication_factor = 3`, `min.insync.replicas = 2` keeps every acknowledged record on
    /// two brokers at least. Topics that exist already are left as they are. Set
    /// `retention.ms` longer than the longest outage a subscriber may have: Kafka deletes
    /// by age whether or not a group has read the record. Dead-letter topics
    /// (`ketenbus.dlq.*`) always get `retention.ms = -1` and `retention.bytes = -1`.
    #[serde(default)]
    pub topic_config: BTreeMap<String, String>,
    /// How long a published record may take to be acknowledged by the cluster before
    /// `publish` gives up and the sender hears "try again", e.g. `"30s"`.
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Timeout of admin, metadata and offset requests and of synchronous commits, e.g. `"10s"`.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Consumer group session timeout: a member not heard from this long loses its
    /// partitions to the other members, e.g. `"30s"`.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Finished offsets are committed at least this often while records are being
    /// acknowledged, e.g. `"200ms"`.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Finished offsets are also committed after this many acknowledgements, whichever
    /// comes first.
    #[serde(default = "default_commit_every")]
    pub commit_every: u32,
    /// Extra librdkafka properties for every client, e.g. `"security.protocol" = "sasl_ssl"`,
    /// `"sasl.mechanism" = "SCRAM-SHA-512"`, `"sasl.username" = "ketenbus"`, `"linger.ms" = "5"`.
    /// Refused: properties with their own key above, secrets (use `secret_properties`), and
    /// those that would weaken the delivery guarantees.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values come from environment variables, property name to
    /// variable name, e.g. `{ "sasl.password" = "KETENBUS_KAFKA_PASSWORD" }`: secrets never go
    /// in the config file.
    #[serde(default)]
    pub secret_properties: BTreeMap<String, String>,
    /// This node's stable name in its consumer groups (Kafka static membership,
    /// `group.instance.id`): a node restarted under the same name, also after a crash, takes
    /// its partitions back at once instead of after `session_timeout`. Give each node its own
    /// (letters, digits, `-`, `_`, `.`); unset, membership is dynamic.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Largest record ketenbus writes: `http.max_body` plus room for the envelope around it,
    /// set from the rest of the config (not a key of its own). The producer's
    /// `message.max.bytes`, the consumers' fetch sizes and the `max.message.bytes` of topics
    /// ketenbus creates follow it, so every message the listener takes fits the log.
    #[serde(skip, default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
    /// The values of `secret_properties`, read from the environment by [`Self::resolve`]
    /// (not a key of its own; never printed).
    #[serde(skip)]
    secrets: Secrets,
}

/// Secret property values by property name; `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Room for what a record adds around a message body (envelope fields, a dead letter's
/// reason): generous, so a body of `http.max_body` always fits.
pub const RECORD_OVERHEAD: u64 = 1024 * 1024;

fn default_max_record_bytes() -> u64 {
    25 * 1024 * 1024 + RECORD_OVERHEAD
}

/// librdkafka's default `fetch.max.bytes`.
pub(super) const DEFAULT_FETCH_MAX_BYTES: u64 = 52_428_800;

fn default_client_id() -> String {
    "ketenbus".to_owned()
}
fn default_partitions() -> u32 {
    6
}
fn default_replication_factor() -> u16 {
    3
}
fn default_delivery_timeout() -> Duration {
    // Below http.ingest_timeout's default (10 s): the sender hears the producer's verdict.
    Duration::from_secs(8)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_commit_every() -> u32 {
    500
}

impl KafkaConfig {
    /// The defaults, with `bootstrap_servers` set.
    #[must_use]
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            client_id: default_client_id(),
            default_partitions: default_partitions(),
            replication_factor: default_replication_factor(),
            topic_config: BTreeMap::new(),
            delivery_timeout: default_delivery_timeout(),
            request_timeout: default_request_timeout(),
            session_timeout: default_session_timeout(),
            commit_interval: default_commit_interval(),
            commit_every: default_commit_every(),
            properties: BTreeMap::new(),
            secret_properties: BTreeMap::new(),
            instance_id: None,
            max_record_bytes: default_max_record_bytes(),
            secrets: Secrets::default(),
        }
    }

    /// Read the value of every `secret_properties` variable from `env`, for the clients.
    pub fn resolve(&mut self, env: &Env) {
        self.secrets = Secrets(
            self.secret_properties
                .iter()
                .filter_map(|(key, var)| env.var(var).map(|v| (key.clone(), v)))
                .collect(),
        );
    }

    /// Every problem with these settings under `env`, each as `key: what is wrong` (keys
    /// relative to the `kafka` section). Empty when the settings are usable.
    #[must_use]
    pub fn problems(&self, env: &Env) -> Vec<String> {
        let mut resolved = self.clone();
        resolved.resolve(env);
        resolved.resolved_problems()
    }

    /// Every problem with these settings and the secrets [`Self::resolve`] read.
    pub(super) fn resolved_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(id) = &self.instance_id
            && (id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            out.push("instance_id: must be letters, digits, '-', '_' or '.'".to_owned());
        }
        let servers: Vec<&str> = self.bootstrap_servers.split(',').map(str::trim).collect();
        if servers.iter().any(|s| s.is_empty()) {
            out.push("bootstrap_servers: expected host:port pairs separated by commas".to_owned());
        } else {
            for s in &servers {
                let port_ok = s
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !port_ok {
                    out.push(format!("bootstrap_servers: {s:?} is not host:port"));
                }
            }
        }
        if self.client_id.trim().is_empty() {
            out.push("client_id: must not be empty".to_owned());
        }
        if self.default_partitions == 0 || i32::try_from(self.default_partitions).is_err() {
            out.push("default_partitions: must be at least 1".to_owned());
        }
        if self.replication_factor == 0 {
            out.push("replication_factor: must be at least 1".to_owned());
        }
        for (key, value, min) in [
            (
                "delivery_timeout",
                self.delivery_timeout,
                Duration::from_secs(1),
            ),
            (
                "request_timeout",
                self.request_timeout,
                Duration::from_millis(100),
            ),
            (
                "session_timeout",
                self.session_timeout,
                Duration::from_secs(1),
            ),
            (
                "commit_interval",
                self.commit_interval,
                Duration::from_millis(1),
            ),
        ] {
            if value < min {
                out.push(format!(
                    "{key}: must be at least {}",
                    humantime::format_duration(min)
                ));
            } else if i32::try_from(value.as_millis()).is_err() {
                out.push(format!("{key}: too long"));
            }
        }
        if self.commit_every == 0 {
            out.push("commit_every: must be at least 1".to_owned());
        }
        for key in self.properties.keys() {
            if REFUSED_PROPERTIES.contains(&key.as_str()) {
                out.push(format!(
                    "properties.\"{key}\": not settable here (has its own key or weakens delivery guarantees)"
                ));
            } else if is_secret_property(key) {
                out.push(format!(
                    "properties.\"{key}\": a secret; name its environment variable in secret_properties"
                ));
            }
        }
        for (key, var) in &self.secret_properties {
            if REFUSED_PROPERTIES.contains(&key.as_str()) {
                out.push(format!(
                    "secret_properties.\"{key}\": not settable here (has its own key or weakens delivery guarantees)"
                ));
            } else if !self.secrets.0.contains_key(key) {
                out.push(format!(
                    "secret_properties.\"{key}\": environment variable {var} is not set"
                ));
            }
        }
        if out.is_empty() {
            // librdkafka itself judges the remaining property names and values.
            match self.client_config().create_native_config() {
                Ok(_) => {}
                Err(KafkaError::ClientConfig(_, _, key, _))
                    if self.secret_properties.contains_key(&key) =>
                {
                    // librdkafka's description may quote the value.
                    out.push(format!(
                        "secret_properties.\"{key}\": refused by librdkafka"
                    ));
                }
                Err(KafkaError::ClientConfig(_, description, key, _)) => {
                    out.push(format!(
                        "properties.\"{key}\": {}",
                        description.to_lowercase()
                    ));
                }
                Err(e) => out.push(format!("properties: {e}")),
            }
        }
        out
    }

    /// Settings shared by every client.
    pub(super) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            .set_log_level(RDKafkaLogLevel::Info);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        for (k, value) in &self.secrets.0 {
            c.set(k, value);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::KafkaConfig;
    use crate::bus::BusError;
    use crate::bus::kafka::KafkaBus;
    use crate::env::Env;

    #[test]
    fn config_reads_human_durations_and_refuses_unknown_keys() {
        let config: KafkaConfig = toml::from_str(
            r#"
            bootstrap_servers = "kafka-1:9092,kafka-2:9092"
            delivery_timeout = "45s"
            commit_interval = "250ms"
            properties = { "security.protocol" = "plaintext", "linger.ms" = "2" }
            "#,
        )
        .expect("valid config");
        assert_eq!(config.delivery_timeout, Duration::from_secs(45));
        assert_eq!(config.commit_interval, Duration::from_millis(250));
        assert_eq!(config.replication_factor, 3);
        assert_eq!(config.problems(&Env::empty()), Vec::<String>::new());

        let err = toml::from_str::<KafkaConfig>("bootstrap_servers = \"k:9092\"\npartitions = 3\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `partitions`"),
            "{err}"
        );

        let mut bad = KafkaConfig::new("k:9092, nohost");
        bad.properties.insert("acks".into(), "1".into());
        bad.properties.insert("sasl.password".into(), "x".into());
        bad.secret_properties.insert(
            "sasl.password".into(),
            "KETENBUS_TEST_NO_SUCH_VARIABLE".into(),
        );
        bad.commit_every = 0;
        let problems = bad.problems(&Env::empty());
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("bootstrap_servers: \"nohost\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("properties.\"acks\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("properties.\"sasl.password\": a secret")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p
                == "secret_properties.\"sasl.password\": environment variable KETENBUS_TEST_NO_SUCH_VARIABLE is not set"),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("commit_every")),
            "{problems:?}"
        );
        assert!(matches!(KafkaBus::new(&bad), Err(BusError::Fatal(_))));

        // A secret comes from the named environment variable, read through the Env.
        let mut with_secret = KafkaConfig::new("k:9092");
        let env =
            Env::from_fn(|v| (v == "KETENBUS_TEST_SECRET").then(|| "s3cr3t-value".to_owned()));
        with_secret
            .secret_properties
            .insert("sasl.password".into(), "KETENBUS_TEST_SECRET".into());
        assert_eq!(with_secret.problems(&env), Vec::<String>::new());
        with_secret.resolve(&env);
        assert_eq!(
            with_secret.client_config().get("sasl.password"),
            Some("s3cr3t-value")
        );
        assert!(!format!("{with_secret:?}").contains("s3cr3t-value"));

        let mut unknown_property = KafkaConfig::new("k:9092");
        unknown_property
            .properties
            .insert("no.such.property".into(), "1".into());
        let problems = unknown_property.problems(&Env::empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("properties.\"no.such.property\""),
            "{problems:?}"
        );
    }
}
