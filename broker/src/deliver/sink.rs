//! Sinks as a subscription configures them: each kind in its own file with its config
//! (`[subscriptions.sink]`, one arm of `SinkConfig` in `deliver/config.rs`),
//! its check into a validated [`Sink`], and the `build` that makes its client from
//! `ketenbus_connectors`. Adding a sink is one file here and one arm there.

pub mod fhir;
pub mod mail;
pub mod notified_pull;
pub mod webhook;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::address_book::{AddressBook, Channel, Destination};

use crate::env::{Env, Problem};

/// A sink's configuration: checked once at start-up into a validated [`Sink`].
pub trait SinkConfigure {
    /// Whether the sink names where it sends (else: each record's receiver, address book).
    fn has_fixed_destination(&self) -> bool;

    /// The validated sink, or `None` with the problems pushed on `found`.
    fn check(&self, found: &mut Found<'_>) -> Option<Sink>;
}

/// A validated sink: settings checked, secrets read; it makes the sink's client.
pub trait BuildSink: std::fmt::Debug + Send + Sync + Any {
    /// The sink's client.
    ///
    /// # Errors
    /// The client cannot be made (a CA file unreadable, a TLS or mail setting refused).
    fn build(&self, ctx: &SinkContext) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError>;

    /// Whether delivery reports (DSNs) may come back for what it sends.
    fn gets_delivery_reports(&self) -> bool {
        false
    }
}

/// A validated sink of any kind.
#[derive(Debug, Clone)]
pub struct Sink(Arc<dyn BuildSink>);

impl Sink {
    /// The validated sink `sink`.
    pub fn new(sink: impl BuildSink) -> Sink {
        Sink(Arc::new(sink))
    }

    /// The sink's client.
    ///
    /// # Errors
    /// The client cannot be made (a CA file unreadable, a TLS or mail setting refused).
    pub fn build(
        &self,
        ctx: &SinkContext,
    ) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError> {
        self.0.build(ctx)
    }

    /// Whether delivery reports (DSNs) may come back for what it sends: a mail sink.
    #[must_use]
    pub fn gets_delivery_reports(&self) -> bool {
        self.0.gets_delivery_reports()
    }

    /// The validated sink as its own kind, if it is a `T`.
    #[must_use]
    pub fn get<T: BuildSink>(&self) -> Option<&T> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref()
    }
}

/// Why a sink's client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file the sink names cannot be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// The webhook's HTTP client (its TLS roots) was refused.
    #[error("building the webhook client")]
    Webhook(#[source] reqwest::Error),
    /// The FHIR sink's client was refused.
    #[error("building the FHIR sink: {0}")]
    Fhir(String),
    /// The mail sink's settings were refused.
    #[error("building the mail sink")]
    Mail(#[source] ketenbus_connectors::mail::MailError),
}

impl BuildError {
    /// A sink that cannot be made stops the start: an operator acts.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Fatal
    }
}

/// What a sink is built with besides its own settings.
#[derive(Clone)]
pub struct SinkContext {
    /// Where a sink without a fixed destination finds each record's receiver.
    pub book: Arc<AddressBook>,
    /// The documents events refer to (attachments).
    pub content: Arc<dyn ketenbus_connectors::ContentStore>,
    /// The key delivery reports are tokened with (mail sinks).
    pub report_key: Vec<u8>,
    /// This node's Notified Pull (`[notified_pull]`), for `notified-pull` sinks.
    pub pull: Option<Arc<crate::deliver::pull::NotifiedPull>>,
}

impl std::fmt::Debug for SinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkContext(..)")
    }
}

/// A secret value: prints as `***`.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// As text (a password or token).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// What a sink's check reads (the address book, the environment) and what it found: its
/// problems, each at its key under the sink's key path.
#[derive(Debug)]
pub struct Found<'a> {
    at: &'a str,
    book: &'a Arc<AddressBook>,
    env: &'a Env,
    problems: Vec<Problem>,
}

impl<'a> Found<'a> {
    /// A check of the sink at key path `at`.
    #[must_use]
    pub fn new(at: &'a str, book: &'a Arc<AddressBook>, env: &'a Env) -> Found<'a> {
        Found {
            at,
            book,
            env,
            problems: Vec::new(),
        }
    }

    /// What was found.
    #[must_use]
    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }

    /// Whether nothing was found.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The address book records are sent through.
    #[must_use]
    pub fn book(&self) -> &'a Arc<AddressBook> {
        self.book
    }

    /// The environment secrets are read from.
    #[must_use]
    pub fn env(&self) -> &'a Env {
        self.env
    }

    /// A problem at `key` below the sink.
    pub fn push(&mut self, key: &str, message: impl Into<String>) {
        self.problems
            .push(Problem::new(format!("{}.{key}", self.at), message));
    }

    /// Problems given as (key below the sink, message).
    pub fn extend(&mut self, found: Vec<(String, String)>) {
        self.problems.extend(Problem::under(self.at, found));
    }

    /// The endpoint at `key`: `url` when given (plain http only as allowed), else each
    /// record's receiver's address for `channel`, which the address book must serve.
    pub fn destination(
        &mut self,
        key: &str,
        url: &Option<String>,
        allow_plain_http: bool,
        channel: Channel,
    ) -> Option<Destination<reqwest::Url>> {
        let book = self.book;
        let found = match url.as_deref() {
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
    pub fn secret(&mut self, key: &str, var: Option<&String>) -> Option<Secret> {
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
    pub fn timeout(&mut self, timeout: Duration) {
        if timeout.is_zero() {
            self.push("timeout", "must be more than 0");
        }
    }
}

/// A per-request timeout's default.
pub(crate) fn default_timeout() -> Duration {
    Duration::from_secs(10)
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
///
/// # Errors
/// Not a URL, not http(s), or plain http to another host without `allow_plain_http`.
pub fn endpoint_url(url: &str, allow_plain_http: bool) -> Result<reqwest::Url, String> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" && !allow_plain_http && !is_loopback(&u) => Err(
            "plain http to a non-loopback host: use https, or set allow_plain_http = true".into(),
        ),
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(u),
        Ok(_) => Err("must be an http or https URL".into()),
        Err(e) => Err(format!("not a URL: {e}")),
    }
}
