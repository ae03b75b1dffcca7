//! The `webhook` sink: a JSON POST of each event (original bytes for `raw`), signed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::address_book::{Channel, Destination};
use ketenbus_connectors::webhook::WebhookSink;
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
        url.map(|url| {
            Sink::new(Webhook {
                url,
                secret,
                timeout: self.timeout,
                ca_file: self.ca_file.clone(),
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
