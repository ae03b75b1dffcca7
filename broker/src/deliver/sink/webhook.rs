//! The `webhook` sink: a JSON POST of each event (original bytes for `raw`), signed; or,
//! with `batch`, many events in one POST of a JSON array (see
//! [`ketenbus_connectors::webhook::batch`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::address_book::{Channel, Destination};
use ketenbus_connectors::webhook::WebhookSink;
use ketenbus_connectors::webhook::batch::{BatchLimits, BatchWebhookSink};
use serde::Deserialize;

use super::{BuildError, BuildSink, Found, Secret, Sink, SinkConfigure, SinkContext};

/// `[subscriptions.sink]` with `type = "webhook"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint URL; when absent, each record's receiver's `webhook` address from
    /// `[address_book]`.
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable with the HMAC-SHA256 signing secret.
    pub secret_env: Option<String>,
    /// Per-request timeout.
    #[serde(default = "super::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// PEM file of the CA certificates to trust for this endpoint, instead of the
    /// public roots (a private care-network CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow an `http://` URL to a non-loopback host (unencrypted). Loopback needs no flag.
    #[serde(default)]
    pub allow_plain_http: bool,
    /// Send events in batches: one POST of a JSON array (needs `url`). Off when absent.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
}

/// `batch = { max_events, max_bytes, max_wait }` of a webhook sink: a batch is sent when it
/// holds `max_events`, when the next event would take its body past `max_bytes`, or
/// `max_wait` after its first event, whichever comes first.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events in one POST (1 to 1000). The subscription runs at least this many lanes.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Longest body of a batch of two or more events (at least the largest message ketenbus
    /// accepts, at most 256 MiB); one event longer than this goes alone.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: bytesize::ByteSize,
    /// The longest a batch waits for more events after its first (at most 10 s).
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
}

fn default_max_events() -> usize {
    100
}

fn default_max_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(32)
}

fn default_max_wait() -> Duration {
    Duration::from_millis(50)
}

/// Most events in one batch.
pub const MAX_EVENTS: usize = 1000;
/// Longest batch body.
pub const MAX_BYTES: bytesize::ByteSize = bytesize::ByteSize::mib(256);
/// Longest wait for more events.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

impl BatchConfig {
    /// The problems of these settings, as (key below the sink, message).
    fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.max_events == 0 || self.max_events > MAX_EVENTS {
            p.push((
                "batch.max_events".into(),
                format!("must be between 1 and {MAX_EVENTS}"),
            ));
        }
        if self.max_bytes.as_u64() < 1024 || self.max_bytes > MAX_BYTES {
            p.push((
                "batch.max_bytes".into(),
                "must be between 1 KiB and 256 MiB".into(),
            ));
        }
        if self.max_wait > MAX_WAIT {
            p.push((
                "batch.max_wait".into(),
                format!("must be at most {}", humantime::format_duration(MAX_WAIT)),
            ));
        }
        p
    }

    /// The limits the sink sends by.
    #[must_use]
    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_events: self.max_events,
            max_bytes: usize::try_from(self.max_bytes.as_u64()).unwrap_or(usize::MAX),
            max_wait: self.max_wait,
        }
    }
}

/// Problems of batch webhooks against the largest message ketenbus accepts (`largest`, with
/// the key that sets it): each must fit a batch's `max_bytes`, so the receiver's limit is
/// known to take every message.
#[must_use]
pub fn batch_problems(
    subscriptions: &[crate::deliver::config::SubscriptionConfig],
    largest: Option<(&'static str, bytesize::ByteSize)>,
) -> Vec<crate::env::Problem> {
    let Some((key, largest)) = largest else {
        return Vec::new();
    };
    subscriptions
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match &s.sink {
            crate::deliver::config::SinkConfig::Webhook(WebhookConfig {
                batch: Some(b), ..
            }) if b.max_bytes < largest => Some(crate::env::Problem::new(
                format!("subscriptions[{i}].sink.batch.max_bytes"),
                format!(
                    "must be at least the largest message ketenbus accepts ({key} = {largest}), or the receiver may refuse a batch of one such message"
                ),
            )),
            _ => None,
        })
        .collect()
}

/// A validated webhook sink: its secret read.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Endpoint, fixed or from the address book.
    pub url: Destination<reqwest::Url>,
    /// Signing secret (never printed).
    pub secret: Option<Secret>,
    /// Request timeout.
    pub timeout: Duration,
    /// CA bundle to trust instead of the public roots.
    pub ca_file: Option<PathBuf>,
    /// Batches, when on.
    pub batch: Option<BatchLimits>,
}

impl SinkConfigure for WebhookConfig {
    fn has_fixed_destination(&self) -> bool {
        self.url.is_some()
    }

    fn check(&self, found: &mut Found<'_>) -> Option<Sink> {
        let url = found.destination("url", &self.url, self.allow_plain_http, Channel::Webhook);
        let secret = found.secret("secret_env", self.secret_env.as_ref());
        found.timeout(self.timeout);
        if let Some(ca) = &self.ca_file
            && let Err(e) = crate::tls::read_certs("ca_file", ca)
        {
            found.push("ca_file", e.to_string());
        }
        if let Some(b) = &self.batch {
            found.extend(b.problems());
            if self.url.is_none() {
                found.push(
                    "batch",
                    "needs url: batches go to one endpoint, not to each record's receiver",
                );
            }
        }
        url.map(|url| {
            Sink::new(Webhook {
                url,
                secret,
                timeout: self.timeout,
                ca_file: self.ca_file.clone(),
                batch: self.batch.as_ref().map(BatchConfig::limits),
            })
        })
    }
}

impl BuildSink for Webhook {
    fn build(&self, _: &SinkContext) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError> {
        let ca = self
            .ca_file
            .as_ref()
            .map(|f| {
                std::fs::read(f).map_err(|error| BuildError::Read {
                    path: f.display().to_string(),
                    error,
                })
            })
            .transpose()?;
        if let (Some(limits), Destination::Fixed(url)) = (self.batch, &self.url) {
            let s = BatchWebhookSink::new(
                url.clone(),
                self.secret.as_ref().map(|s| s.0.clone()),
                self.timeout,
                ca.as_deref(),
                limits,
            )
            .map_err(BuildError::Webhook)?;
            return Ok(Arc::new(s));
        }
        let s = WebhookSink::with_roots(
            self.url.clone(),
            self.secret.as_ref().map(|s| s.0.clone()),
            self.timeout,
            ca.as_deref(),
        )
        .map_err(BuildError::Webhook)?;
        Ok(Arc::new(s))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::env::Env;

    fn env() -> Env {
        Env::from_fn(|k| (k == "KETENBUS_AUDIT_KEY").then(|| "k".repeat(32)))
    }

    fn sub(batch: &str) -> String {
        format!(
            "[[subscriptions]]\nname = \"b\"\nkinds = [\"lab_result\"]\n\
             sink = {{ type = \"webhook\", url = \"http://127.0.0.1:1/\", batch = {batch} }}\n"
        )
    }

    /// The `path: message` lines of a config that must not validate.
    fn problems(text: &str) -> Vec<String> {
        Config::from_toml(text)
            .unwrap()
            .validate(&env())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn batch_settings_are_bounded_and_fit_the_largest_message() {
        for (batch, path, says) in [
            (
                "{ max_events = 0 }",
                "batch.max_events",
                "between 1 and 1000",
            ),
            (
                "{ max_events = 1001 }",
                "batch.max_events",
                "between 1 and 1000",
            ),
            (
                "{ max_bytes = \"512 B\" }",
                "batch.max_bytes",
                "between 1 KiB",
            ),
            ("{ max_bytes = \"300 MiB\" }", "batch.max_bytes", "256 MiB"),
            ("{ max_wait = \"11s\" }", "batch.max_wait", "at most 10s"),
            (
                "{ max_bytes = \"1 MiB\" }",
                "batch.max_bytes",
                "largest message ketenbus accepts (http.max_body = ",
            ),
        ] {
            let found = problems(&sub(batch));
            assert!(
                found
                    .iter()
                    .any(|p| p.starts_with(&format!("subscriptions[0].sink.{path}"))
                        && p.contains(says)),
                "{batch}: {found:?}"
            );
        }
        // A smaller http.max_body lets a smaller max_bytes through.
        let small = format!(
            "[http]\nmax_body = \"1 MiB\"\n{}",
            sub("{ max_bytes = \"1 MiB\" }")
        );
        assert!(Config::from_toml(&small).unwrap().validate(&env()).is_ok());
        // Unknown keys are refused when read.
        assert!(Config::from_toml(&sub("{ max_events = 5, size = 3 }")).is_err());
    }

    #[test]
    fn a_batch_needs_a_fixed_url() {
        let text = "[[subscriptions]]\nname = \"b\"\nkinds = [\"lab_result\"]\n\
                    sink = { type = \"webhook\", batch = {} }\n\
                    [address_book.\"agb:01234567\"]\nwebhook = \"https://a.example.test/in\"\n";
        let found = problems(text);
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("subscriptions[0].sink.batch") && p.contains("needs url")),
            "{found:?}"
        );
    }

    /// Defaults: 100 events, 32 MiB, 50 ms; the subscription gets at least 100 lanes.
    #[test]
    fn batch_defaults_and_lanes() {
        let s = Config::from_toml(&sub("{}"))
            .unwrap()
            .validate(&env())
            .unwrap();
        let w = s.subscriptions[0].sink.get::<super::Webhook>().unwrap();
        let limits = w.batch.unwrap();
        assert_eq!(limits.max_events, 100);
        assert_eq!(limits.max_bytes, 32 << 20);
        assert_eq!(limits.max_wait, std::time::Duration::from_millis(50));
        assert_eq!(s.subscriptions[0].concurrency, 100);
        let more = sub("{ max_events = 10 }").replace("kinds =", "concurrency = 40\nkinds =");
        let s = Config::from_toml(&more).unwrap().validate(&env()).unwrap();
        assert_eq!(s.subscriptions[0].concurrency, 40);
    }
}
