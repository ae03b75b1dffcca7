//! The `fhir` sink: each event as nl-core resources in one Bundle, to a FHIR R4 endpoint.

use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::address_book::{Channel, Destination};
use ketenbus_connectors::fhir::{BundleStyle, FhirSink};
use serde::Deserialize;

use super::{BuildError, BuildSink, Found, Secret, Sink, SinkConfigure, SinkContext};

/// `[subscriptions.sink]` with `type = "fhir"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// The subscriber's FHIR base URL; when absent, each record's receiver's `fhir`
    /// address from `[address_book]`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// `transaction` (POST to the base) or `message` (POST to `[base]/$process-message`).
    #[serde(default)]
    pub style: BundleStyle,
    /// ketenbus's own FHIR base, written into `MessageHeader.source.endpoint`.
    #[serde(default)]
    pub source_endpoint: Option<String>,
    /// Environment variable holding a bearer token for the endpoint.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Per-request timeout.
    #[serde(default = "super::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Allow an `http://` base URL to a non-loopback host (unencrypted). Loopback needs no flag.
    #[serde(default)]
    pub allow_plain_http: bool,
}

/// A validated FHIR sink: its token read.
#[derive(Debug, Clone)]
pub struct Fhir {
    /// Base URL, fixed or from the address book.
    pub base: Destination<reqwest::Url>,
    /// Transaction or message Bundle.
    pub style: BundleStyle,
    /// `MessageHeader.source.endpoint`.
    pub source_endpoint: Option<String>,
    /// Bearer token (never printed).
    pub token: Option<Secret>,
    /// Request timeout.
    pub timeout: Duration,
}

impl SinkConfigure for FhirConfig {
    fn has_fixed_destination(&self) -> bool {
        self.base_url.is_some()
    }

    fn check(&self, found: &mut Found<'_>) -> Option<Sink> {
        let base = found.destination(
            "base_url",
            &self.base_url,
            self.allow_plain_http,
            Channel::Fhir,
        );
        let token = found.secret("token_env", self.token_env.as_ref());
        found.timeout(self.timeout);
        base.map(|base| {
            Sink::new(Fhir {
                base,
                style: self.style,
                source_endpoint: self.source_endpoint.clone(),
                token,
                timeout: self.timeout,
            })
        })
    }
}

impl BuildSink for Fhir {
    fn build(&self, ctx: &SinkContext) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError> {
        let store = Arc::clone(&ctx.content);
        let s = FhirSink::new(
            self.base.clone(),
            self.style,
            self.source_endpoint.clone(),
            self.timeout,
        )
        .map_err(BuildError::Fhir)?
        .with_bearer(self.token.as_ref().map(Secret::text))
        .with_attachments(Arc::new(move |hash: &str| store.get(hash).ok().flatten()));
        Ok(Arc::new(s))
    }
}
