//! Notified Pull (issue 14, item 4), both sides, after the Twiin TA Notified Pull v1.0.1 and
//! the Dutch generic-functions Notified Pull draft (see README "Notified Pull").
//!
//! **Sending** (a `notified-pull` subscription, `deliver/sink/notified_pull.rs`): for each
//! event ketenbus opens an *exchange*: a random authorization-base (32 bytes, sent once in the
//! notification Task, kept here only as its SHA-256) bound to that one event and receiver,
//! valid for `authorization_base_ttl`. The receiver presents it at
//! `POST /notified-pull/token` and gets a JWT (HS256, key from `key_env`) whose claims name the
//! exchange; with it, it reads that event's resources at `GET /fhir/{Type}/{id}` and
//! `GET /fhir/{Type}?_id=..&_include=*`, and nothing else.
//!
//! **Receiving**: a notification Task from a configured partner (`[[notified_pull.partners]]`),
//! POSTed as is or as the focus of a Backport notification Bundle ([`backport_notice`]), is
//! stored in `notified-pull.db` (synchronous, before the partner hears 202), then a worker
//! gets a token at the partner's token endpoint, pulls the announced resources and hands them
//! to ingest as one FHIR `collection` Bundle, which the router maps into `acute_handover` or
//! `lab_result` events like any FHIR message. A failed pull is retried with backoff
//! (`[notified_pull.retry]`); after `give_up_after` it becomes a dead letter on
//! `ketenbus.dlq.notified-pull` (the Task without its authorization-base).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ketenbus_connectors::Ingest;
use ketenbus_connectors::fhir::{Object, Value};
use ketenbus_schemas::{AvroRecord, DeadLetter, Format, RawEnvelope, now_ms, topics};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, OutRecord};
use crate::deliver::backoff::RetryConfig;
use crate::deliver::resources::Resources;
use crate::env::{Env, Problem};

/// `Task.code` system of the TA's notification Task.
pub const TASK_CODE_SYSTEM: &str = "http://fhir.nl/fhir/NamingSystem/TaskCode";
/// `Task.code` of the notification Task.
pub const PULL_NOTIFICATION: &str = "pull-notification";
/// `Task.input.type` system of the TA's inputs.
pub const TASK_PARAMETER: &str = "http://fhir.nl/fhir/NamingSystem/TaskParameter";
/// The stage name of the receiving side's dead letters (`ketenbus.dlq.notified-pull`).
pub const STAGE: &str = "notified-pull";
/// Where the token endpoint is served.
pub const TOKEN_PATH: &str = "/notified-pull/token";

/// `[notified_pull]`: this node's side of Notified Pull.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifiedPullConfig {
    /// This node's FHIR base as receivers reach it (e.g. `https://ketenbus.example.nl/fhir`):
    /// the URLs in notification Tasks, the tokens' issuer and audience.
    pub base_url: String,
    /// Environment variable holding the key tokens are signed with (HS256, at least 32 bytes).
    pub key_env: String,
    /// How long an authorization-base may be exchanged for a token.
    #[serde(default = "default_base_ttl", with = "humantime_serde")]
    pub authorization_base_ttl: Duration,
    /// How long a token is valid.
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Retries of a failed pull from a partner (waits doubling from `initial` to `max`);
    /// after `give_up_after` since the notification came, it is a dead letter.
    #[serde(default = "pull_retry", deserialize_with = "pull_retry_table")]
    pub retry: RetryConfig,
    /// Partners whose notification Tasks this node takes and pulls after.
    #[serde(default)]
    pub partners: Vec<PartnerConfig>,
}

/// `[notified_pull.retry]`'s defaults, key by key: first wait 1 s, at most 5 min, a dead
/// letter after 24 h.
fn pull_retry() -> RetryConfig {
    RetryConfig {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(300),
        give_up_after: Duration::from_secs(24 * 3600),
    }
}

/// `[notified_pull.retry]`, each key it leaves out as [`pull_retry`] has it.
fn pull_retry_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RetryConfig, D::Error> {
    RetryConfig::with_defaults(d, pull_retry())
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_base_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(5 * 60)
}

/// `[[notified_pull.partners]]`: a sender of notification Tasks and where to pull from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// Name in logs and dead letters: letters, digits, `-`, `_`.
    pub name: String,
    /// Party ids the partner notifies as (`Task.requester.identifier`, e.g. `ura:12345678`).
    pub party_ids: Vec<String>,
    /// The partner's token endpoint (OAuth 2.0 token request with the authorization-base).
    pub token_url: String,
    /// The partner's FHIR base: ketenbus pulls only URLs under it.
    pub fhir_base: String,
    /// Per-request timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Allow `http://` URLs to a non-loopback host (unencrypted). Loopback needs no flag.
    #[serde(default)]
    pub allow_plain_http: bool,
}

impl NotifiedPullConfig {
    /// Problems of `[notified_pull]`, at their key paths; `url` checks an endpoint URL
    /// (plain http allowed or not), as the sinks do.
    #[must_use]
    pub fn problems(
        &self,
        env: &Env,
        url: impl Fn(&str, bool) -> Result<(), String>,
    ) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut p = |k: &str, m: &str| out.push(Problem::new(format!("notified_pull.{k}"), m));
        if let Err(e) = url(&self.base_url, false) {
            p("base_url", &e);
        }
        match env.var(&self.key_env) {
            Some(k) if k.len() >= 32 => {}
            Some(_) => p("key_env", "the key must be at least 32 bytes"),
            None => p(
                "key_env",
                &format!("environment variable {} is not set", self.key_env),
            ),
        }
        if self.token_ttl.is_zero() || self.authorization_base_ttl.is_zero() {
            p(
                "token_ttl",
                "token_ttl and authorization_base_ttl must be more than 0",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, partner) in self.partners.iter().enumerate() {
            let at = format!("partners[{i}]");
            if partner.name.is_empty()
                || !partner
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                || !names.insert(partner.name.clone())
            {
                p(
                    &format!("{at}.name"),
                    "must be unique letters, digits, '-' or '_'",
                );
            }
            if partner.party_ids.is_empty() {
                p(&format!("{at}.party_ids"), "name at least one party id");
            }
            for (key, u) in [
                ("token_url", &partner.token_url),
                ("fhir_base", &partner.fhir_base),
            ] {
                if let Err(e) = url(u, partner.allow_plain_http) {
                    p(&format!("{at}.{key}"), &e);
                }
            }
        }
        out
    }
}

/// Why a pull credential is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// The authorization-base is unknown or expired.
    #[error("the authorization-base is unknown or expired")]
    InvalidGrant,
    /// The token's time is over.
    #[error("the token has expired")]
    Expired,
    /// The token was not signed by this node, or is not a token.
    #[error("the token is not one this node signed")]
    Invalid,
    /// The token is for another audience.
    #[error("the token is for another audience")]
    Audience,
    /// The store failed.
    #[error("notified pull store: {0}")]
    Store(String),
}

impl PullError {
    /// A store failure is worth another try; a refused credential never is.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        match self {
            PullError::Store(_) => ketenbus_connectors::ErrorKind::Retryable,
            _ => ketenbus_connectors::ErrorKind::Rejected,
        }
    }
}

impl From<rusqlite::Error> for PullError {
    fn from(e: rusqlite::Error) -> Self {
        PullError::Store(e.to_string())
    }
}

/// The claims of a pull token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// This node's FHIR base.
    pub iss: String,
    /// This node's FHIR base (the resource server).
    pub aud: String,
    /// The receiver party the exchange is for.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Token id.
    pub jti: String,
    /// The exchange this token reads.
    pub exchange: String,
    /// The event whose resources the exchange reads.
    pub event: String,
}

/// A token answer (RFC 6749 section 5.1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenAnswer {
    /// The JWT.
    pub access_token: String,
    /// `Bearer`.
    pub token_type: String,
    /// Seconds it is valid.
    pub expires_in: u64,
}

/// One exchange opened for a notification.
#[derive(Debug, Clone)]
pub struct Opened {
    /// Exchange id.
    pub exchange: String,
    /// The authorization-base, to send once in the Task (never stored).
    pub authorization_base: String,
}

/// An event's number among a subscription's Backport notifications.
#[derive(Debug, Clone, Copy)]
pub struct Numbered {
    /// Its number (from 1).
    pub number: u64,
    /// `events-since-subscription-start`: the highest number so far.
    pub since: u64,
    /// When it was numbered, ms since the epoch.
    pub at_ms: i64,
}

/// A partner, validated.
#[derive(Debug, Clone)]
struct Partner {
    cfg: PartnerConfig,
    client: reqwest::Client,
}

/// This node's Notified Pull: the exchanges it serves and the Tasks it pulls after.
pub struct NotifiedPull {
    base_url: String,
    key: Vec<u8>,
    base_ttl: Duration,
    token_ttl: Duration,
    retry: RetryConfig,
    partners: Vec<Partner>,
    conn: Mutex<Connection>,
    /// The resources served to token holders (set by the runtime).
    pub resources: Option<Resources>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for NotifiedPull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifiedPull")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

fn secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn i64_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl NotifiedPull {
    /// Open `notified-pull.db` in `data_dir` with the (validated) config.
    ///
    /// # Errors
    /// When the key is missing or the store cannot be opened.
    pub fn open(
        cfg: &NotifiedPullConfig,
        env: &Env,
        data_dir: &Path,
    ) -> Result<NotifiedPull, PullError> {
        let key = env
            .var(&cfg.key_env)
            .filter(|k| k.len() >= 32)
            .ok_or_else(|| PullError::Store(format!("{} is not set", cfg.key_env)))?;
        std::fs::create_dir_all(data_dir).map_err(|e| PullError::Store(e.to_string()))?;
        let conn = Connection::open(data_dir.join("notified-pull.db"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS exchanges (
                 id TEXT PRIMARY KEY, base_sha256 TEXT NOT NULL UNIQUE, event_id TEXT NOT NULL,
                 receiver TEXT NOT NULL, subscription TEXT NOT NULL,
                 created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL, task TEXT);
             CREATE TABLE IF NOT EXISTS inbox (
                 id TEXT PRIMARY KEY, partner TEXT NOT NULL, task TEXT NOT NULL,
                 accepted_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                 next_ms INTEGER NOT NULL, last_error TEXT);
             CREATE TABLE IF NOT EXISTS numbered (
                 subscription TEXT NOT NULL, event_id TEXT NOT NULL, number INTEGER NOT NULL,
                 at_ms INTEGER NOT NULL,
                 PRIMARY KEY (subscription, number), UNIQUE (subscription, event_id));",
        )?;
        let partners = cfg
            .partners
            .iter()
            .map(|p| {
                let client = reqwest::Client::builder()
                    .timeout(p.timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| PullError::Store(e.to_string()))?;
                Ok(Partner {
                    cfg: p.clone(),
                    client,
                })
            })
            .collect::<Result<Vec<_>, PullError>>()?;
        Ok(NotifiedPull {
            base_url: cfg.base_url.trim_end_matches('/').to_owned(),
            key: key.into_bytes(),
            base_ttl: cfg.authorization_base_ttl,
            token_ttl: cfg.token_ttl,
            retry: cfg.retry.clone(),
            partners,
            conn: Mutex::new(conn),
            resources: None,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// This node's FHIR base.
    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ---- sending side ----

    /// Open an exchange for `event_id` to `receiver`, from subscription `subscription`.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn open_exchange(
        &self,
        event_id: &str,
        receiver: &str,
        subscription: &str,
    ) -> Result<Opened, PullError> {
        let exchange = hex::encode(rand::random::<[u8; 16]>());
        let base = hex::encode(rand::random::<[u8; 32]>());
        let now = now_ms();
        self.db().execute(
            "INSERT INTO exchanges (id, base_sha256, event_id, receiver, subscription,
             created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                exchange,
                hash(&base),
                event_id,
                receiver,
                subscription,
                now,
                now.saturating_add(i64_ms(self.base_ttl))
            ],
        )?;
        Ok(Opened {
            exchange,
            authorization_base: base,
        })
    }

    /// The number of `event_id` among the Backport notifications of `subscription`: the next
    /// one when it is first notified, the same one on every retry; with the count so far and
    /// when it was numbered (ms since the epoch). Numbers have no gaps.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn number(&self, subscription: &str, event_id: &str) -> Result<Numbered, PullError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO numbered (subscription, event_id, number, at_ms)
             SELECT ?1, ?2, COALESCE(MAX(number), 0) + 1, ?3 FROM numbered WHERE subscription = ?1",
            params![subscription, event_id, now_ms()],
        )?;
        let (number, at_ms): (i64, i64) = tx.query_row(
            "SELECT number, at_ms FROM numbered WHERE subscription = ?1 AND event_id = ?2",
            params![subscription, event_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let since: i64 = tx.query_row(
            "SELECT MAX(number) FROM numbered WHERE subscription = ?1",
            [subscription],
            |r| r.get(0),
        )?;
        tx.commit()?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Numbered {
            number: n(number),
            since: n(since),
            at_ms,
        })
    }

    /// A token for the exchange the authorization-base `base` opens.
    ///
    /// # Errors
    /// [`PullError::InvalidGrant`] when it is unknown or expired.
    pub fn token(&self, base: &str) -> Result<TokenAnswer, PullError> {
        let found: Option<(String, String, String, i64)> = self
            .db()
            .query_row(
                "SELECT id, event_id, receiver, expires_ms FROM exchanges WHERE base_sha256 = ?1",
                [hash(base)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((exchange, event, receiver, expires_ms)) = found else {
            return Err(PullError::InvalidGrant);
        };
        if expires_ms <= now_ms() {
            return Err(PullError::InvalidGrant);
        }
        let now = std::time::SystemTime::now();
        let claims = Claims {
            iss: self.base_url.clone(),
            aud: self.base_url.clone(),
            sub: receiver,
            exp: secs(now + self.token_ttl),
            iat: secs(now),
            jti: hex::encode(rand::random::<[u8; 12]>()),
            exchange,
            event,
        };
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.key),
        )
        .map_err(|e| PullError::Store(e.to_string()))?;
        Ok(TokenAnswer {
            access_token: jwt,
            token_type: "Bearer".into(),
            expires_in: self.token_ttl.as_secs(),
        })
    }

    /// The claims of a token this node signed, for this node, not expired.
    ///
    /// # Errors
    /// [`PullError::Expired`], [`PullError::Audience`] or [`PullError::Invalid`].
    pub fn verify(&self, token: &str) -> Result<Claims, PullError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_audience(&[&self.base_url]);
        v.set_issuer(&[&self.base_url]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&self.key), &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => PullError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidAudience
                | jsonwebtoken::errors::ErrorKind::InvalidIssuer => PullError::Audience,
                _ => PullError::Invalid,
            })
    }

    /// The notification Task of an exchange (TA Notified Pull, R4): code `pull-notification`,
    /// the authorization-base, where to query and read the event's resources
    /// (`resources`: `Type/id`, the focus first) and that there is no workflow Task to get.
    #[must_use]
    pub fn task(
        &self,
        opened: &Opened,
        (requester, owner): (Option<&str>, &str),
        resources: &[String],
    ) -> Value {
        let param = |code: &str| -> Value {
            Object::new()
                .with(
                    "coding",
                    vec![
                        Object::new()
                            .with("system", TASK_PARAMETER)
                            .with("code", code)
                            .into(),
                    ],
                )
                .into()
        };
        let input = |code: &str, key: &str, v: Value| -> Value {
            Object::new().with("type", param(code)).with(key, v).into()
        };
        let mut inputs = vec![input(
            "authorization-base",
            "valueString",
            Value::from(opened.authorization_base.as_str()),
        )];
        // The workflow Task is this Task, served (without the credential) to the token holder.
        inputs.push(input(
            "get-workflow-task",
            "valueBoolean",
            Value::Bool(true),
        ));
        if let Some(focus) = resources.first() {
            let (ty, id) = focus.split_once('/').unwrap_or((focus.as_str(), ""));
            inputs.push(input(
                "query-available-resources",
                "valueUrl",
                Value::from(format!("{}/{ty}?_id={id}&_include=*", self.base_url)),
            ));
        }
        for r in resources {
            inputs.push(input(
                "read-available-resource",
                "valueUrl",
                Value::from(format!("{}/{r}", self.base_url)),
            ));
        }
        Object::new()
            .with("resourceType", "Task")
            .with("id", opened.exchange.as_str())
            .with("status", "requested")
            .with("intent", "proposal")
            .with(
                "code",
                Object::new().with(
                    "coding",
                    vec![
                        Object::new()
                            .with("system", TASK_CODE_SYSTEM)
                            .with("code", PULL_NOTIFICATION)
                            .into(),
                    ],
                ),
            )
            .with_opt(
                "requester",
                requester.map(ketenbus_connectors::fhir::emit::party_reference),
            )
            .with(
                "owner",
                ketenbus_connectors::fhir::emit::party_reference(owner),
            )
            .with(
                "authoredOn",
                ketenbus_connectors::fhir::emit::fhir_date_time(&iso_now()),
            )
            .with("input", inputs)
            .into()
    }

    /// Keep the exchange's Task (without its authorization-base) as its workflow Task.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn keep_task(&self, exchange: &str, task: &Value) -> Result<(), PullError> {
        let mut task = task.clone();
        strip_authorization_base(&mut task);
        let text = ketenbus_connectors::fhir::json::to_vec(&task);
        self.db().execute(
            "UPDATE exchanges SET task = ?2 WHERE id = ?1",
            params![exchange, String::from_utf8_lossy(&text)],
        )?;
        Ok(())
    }

    /// The workflow Task of an exchange.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn workflow_task(&self, exchange: &str) -> Result<Option<Value>, PullError> {
        let text: Option<Option<String>> = self
            .db()
            .query_row(
                "SELECT task FROM exchanges WHERE id = ?1",
                [exchange],
                |r| r.get(0),
            )
            .optional()?;
        Ok(text
            .flatten()
            .and_then(|t| ketenbus_connectors::fhir::json::parse(t.as_bytes()).ok()))
    }

    // ---- receiving side ----

    /// The partner whose party ids include `party`.
    fn partner_of(&self, party: &str) -> Option<&Partner> {
        self.partners
            .iter()
            .find(|p| p.cfg.party_ids.iter().any(|q| q == party))
    }

    /// Take a notification Task: durable in the store before this returns; `Ok(id)`.
    ///
    /// # Errors
    /// [`Refused`] when it is not a pull notification from a configured partner, or the
    /// store cannot take it.
    pub fn accept_task(&self, task: &Value) -> Result<String, Refused> {
        let requester = requester_party(task).ok_or(Refused::Requester)?;
        let partner = self.partner_of(&requester).ok_or(Refused::Partner)?;
        if authorization_base(task).is_none() {
            return Err(Refused::Missing("authorization-base"));
        }
        let urls = announced(task);
        if urls.is_empty() {
            return Err(Refused::Missing(
                "query-available-resources or read-available-resource",
            ));
        }
        if urls.iter().any(|u| !under(u, &partner.cfg.fhir_base)) {
            return Err(Refused::Foreign);
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let now = now_ms();
        let text =
            String::from_utf8_lossy(&ketenbus_connectors::fhir::json::to_vec(task)).into_owned();
        self.db()
            .execute(
                "INSERT INTO inbox (id, partner, task, accepted_ms, next_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![id, partner.cfg.name, text, now],
            )
            .map_err(|e| Refused::Store(e.to_string()))?;
        self.wake.notify_one();
        Ok(id)
    }

    /// Pull after every accepted Task until `cancel`: retries with backoff, a dead letter
    /// on `bus` after `give_up_after`. Tasks left by a crash are taken up at the start.
    pub async fn run<B: Bus>(
        self: Arc<Self>,
        bus: Arc<B>,
        ingest: Arc<dyn Ingest>,
        cancel: CancellationToken,
    ) {
        loop {
            let due: Vec<(String, String, String, i64, u32)> = {
                let db = self.db();
                let rows = db
                    .prepare(
                        "SELECT id, partner, task, accepted_ms, attempts FROM inbox
                         WHERE next_ms <= ?1 ORDER BY next_ms LIMIT 64",
                    )
                    .and_then(|mut s| {
                        s.query_map([now_ms()], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()
                    });
                rows.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "notified pull: reading the inbox failed");
                    Vec::new()
                })
            };
            for (id, partner, task, accepted_ms, attempts) in due {
                self.attempt(
                    &*bus,
                    &ingest,
                    (&id, &partner, &task),
                    accepted_ms,
                    attempts,
                )
                .await;
            }
            let next = self
                .db()
                .query_row("SELECT MIN(next_ms) FROM inbox", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .ok()
                .flatten();
            let wait = next.map_or(Duration::from_secs(60), |t| {
                Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0))
            });
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
            }
        }
    }

    async fn attempt<B: Bus>(
        &self,
        bus: &B,
        ingest: &Arc<dyn Ingest>,
        (id, partner, task): (&str, &str, &str),
        accepted_ms: i64,
        attempts: u32,
    ) {
        let Some(p) = self.partners.iter().find(|p| p.cfg.name == partner) else {
            // A partner removed from the config: nothing can pull it any more.
            self.dead(
                bus,
                (id, partner, task),
                "unknown_partner",
                "partner no longer configured",
            )
            .await;
            return;
        };
        let tree = ketenbus_connectors::fhir::json::parse(task.as_bytes()).unwrap_or(Value::Null);
        match pull(p, &tree).await {
            Ok(bundle) => {
                let env = RawEnvelope {
                    id: format!("pull-{id}"),
                    received_at_ms: now_ms(),
                    connector: "fhir".into(),
                    format: Format::FhirJson,
                    content_type: ketenbus_connectors::fhir::MEDIA_JSON.into(),
                    sender: requester_party(&tree),
                    receiver: owner_party(&tree),
                    body: ketenbus_connectors::fhir::json::to_vec(&bundle),
                    attributes: [
                        ("fhir_interaction".to_owned(), "notified-pull".to_owned()),
                        ("notified_pull_partner".to_owned(), partner.to_owned()),
                    ]
                    .into(),
                };
                match ingest.accept(env).await {
                    Ok(_) => {
                        let _ = self.db().execute("DELETE FROM inbox WHERE id = ?1", [id]);
                        tracing::info!(
                            partner,
                            attempts = attempts + 1,
                            "notified pull: pulled and taken in"
                        );
                    }
                    Err(e) => self.later(id, attempts, &format!("ingest: {e}")),
                }
            }
            Err(e) if now_ms() - accepted_ms >= i64_ms(self.retry.give_up_after) => {
                self.dead(bus, (id, partner, task), e.reason(), &e.to_string())
                    .await;
            }
            Err(e) => {
                tracing::warn!(partner, attempt = attempts + 1, error = %e, "notified pull failed, retrying");
                self.later(id, attempts, &e.to_string());
            }
        }
    }

    fn later(&self, id: &str, attempts: u32, error: &str) {
        let wait = self.retry.wait(attempts + 1);
        let _ = self.db().execute(
            "UPDATE inbox SET attempts = attempts + 1, next_ms = ?2, last_error = ?3 WHERE id = ?1",
            params![id, now_ms().saturating_add(i64_ms(wait)), error],
        );
    }

    async fn dead<B: Bus>(
        &self,
        bus: &B,
        (id, partner, task): (&str, &str, &str),
        reason: &str,
        detail: &str,
    ) {
        // The dead letter keeps the Task without its credential.
        let mut tree =
            ketenbus_connectors::fhir::json::parse(task.as_bytes()).unwrap_or(Value::Null);
        strip_authorization_base(&mut tree);
        let attempts: i64 = self
            .db()
            .query_row("SELECT attempts FROM inbox WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap_or(0);
        let dl = DeadLetter::new(
            STAGE,
            (id, id),
            now_ms(),
            reason,
            Some(format!("partner {partner}: {detail}")),
            (
                "notified-pull.inbox".to_owned(),
                id.as_bytes().to_vec(),
                ketenbus_connectors::fhir::json::to_vec(&tree),
            ),
        );
        let dl = DeadLetter {
            attempt: Some(i32::try_from(attempts + 1).unwrap_or(i32::MAX)),
            ..dl
        };
        let record = match dl.to_avro() {
            Ok(v) => OutRecord {
                topic: topics::dead_letters(STAGE),
                key: id.as_bytes().to_vec(),
                value: v,
            },
            Err(e) => {
                tracing::error!(error = %e, "notified pull: encoding a dead letter failed");
                return;
            }
        };
        match bus.publish(vec![record]).await {
            Ok(_) => {
                let _ = self.db().execute("DELETE FROM inbox WHERE id = ?1", [id]);
                crate::observe::metrics::rejected("fhir", "pull_dead_letter");
                tracing::error!(
                    partner,
                    reason,
                    "notified pull gave up: dead letter on ketenbus.dlq.notified-pull"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "notified pull: writing a dead letter failed; retrying");
                self.later(
                    id,
                    u32::try_from(attempts).unwrap_or(u32::MAX),
                    "dead letter not written",
                );
            }
        }
    }
}

/// Why a notification Task is refused (the partner hears 4xx with an OperationOutcome).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No requester party.
    #[error("the Task names no requester party (Task.requester.identifier)")]
    Requester,
    /// The requester is no configured partner.
    #[error("the requester is not a configured notified pull partner")]
    Partner,
    /// An input is missing.
    #[error("the Task has no {0} input")]
    Missing(&'static str),
    /// A URL outside the partner's FHIR base.
    #[error("the Task announces a URL outside the partner's FHIR base")]
    Foreign,
    /// The store failed.
    #[error("the notification could not be stored")]
    Store(String),
}

/// Why one pull failed.
#[derive(Debug, thiserror::Error)]
enum PullFailure {
    #[error("token request: {0}")]
    Token(String),
    #[error("pulling {what}: {detail}")]
    Read { what: &'static str, detail: String },
}

impl PullFailure {
    fn reason(&self) -> &'static str {
        match self {
            PullFailure::Token(_) => "token_refused",
            PullFailure::Read { .. } => "pull_failed",
        }
    }
}

/// Get a token and read what the Task announces into one `collection` Bundle.
async fn pull(p: &Partner, task: &Value) -> Result<Value, PullFailure> {
    let base = authorization_base(task)
        .ok_or_else(|| PullFailure::Token("no authorization-base".into()))?;
    let form = [
        ("grant_type", "client_credentials"),
        ("authorization_base", base.as_str()),
    ];
    let resp = p
        .client
        .post(&p.cfg.token_url)
        .form(&form)
        .send()
        .await
        .map_err(|e| PullFailure::Token(e.without_url().to_string()))?;
    if !resp.status().is_success() {
        return Err(PullFailure::Token(format!(
            "http {}",
            resp.status().as_u16()
        )));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| PullFailure::Token(e.without_url().to_string()))?;
    let answer: TokenAnswer =
        serde_json::from_slice(&bytes).map_err(|e| PullFailure::Token(e.to_string()))?;
    let get = |url: String| {
        let token = answer.access_token.clone();
        async move {
            let resp = p
                .client
                .get(&url)
                .bearer_auth(token)
                .header("accept", ketenbus_connectors::fhir::MEDIA_JSON)
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if !resp.status().is_success() {
                return Err(format!("http {}", resp.status().as_u16()));
            }
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            ketenbus_connectors::fhir::json::parse(&bytes).map_err(|e| e.to_string())
        }
    };
    let mut resources = Vec::new();
    if let Some(q) = input_value(task, "query-available-resources") {
        let set = get(q).await.map_err(|detail| PullFailure::Read {
            what: "query-available-resources",
            detail,
        })?;
        for e in set.get("entry").and_then(Value::as_array).unwrap_or(&[]) {
            if let Some(r) = e.get("resource") {
                resources.push(r.clone());
            }
        }
    } else {
        for url in inputs_of(task, "read-available-resource") {
            resources.push(get(url).await.map_err(|detail| PullFailure::Read {
                what: "read-available-resource",
                detail,
            })?);
        }
    }
    if resources.is_empty() {
        return Err(PullFailure::Read {
            what: "the announced resources",
            detail: "nothing returned".into(),
        });
    }
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let url = match (
                r.get("resourceType").and_then(Value::as_str),
                r.get("id").and_then(Value::as_str),
            ) {
                (Some(t), Some(i)) => format!("{}/{t}/{i}", p.cfg.fhir_base.trim_end_matches('/')),
                _ => String::new(),
            };
            Object::new()
                .with("fullUrl", url)
                .with("resource", r)
                .into()
        })
        .collect();
    Ok(Object::new()
        .with("resourceType", "Bundle")
        .with("type", "collection")
        .with("entry", entries)
        .into())
}

fn iso_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The party of a Reference by identifier.
fn party_of(reference: Option<&Value>) -> Option<String> {
    let id = reference?.get("identifier")?;
    let system = id.get("system")?.as_str()?;
    let value = id.get("value")?.as_str()?;
    Some(match system {
        s if s == ketenbus_schemas::event::systems::URA => format!("ura:{value}"),
        s if s == ketenbus_schemas::event::systems::AGB => format!("agb:{value}"),
        _ => value.to_owned(),
    })
}

fn requester_party(task: &Value) -> Option<String> {
    party_of(task.get("requester"))
}

fn owner_party(task: &Value) -> Option<String> {
    party_of(task.get("owner"))
}

/// Whether a resource is the TA's notification Task.
#[must_use]
pub fn is_pull_notification(tree: &Value) -> bool {
    tree.get("resourceType").and_then(Value::as_str) == Some("Task")
        && tree
            .get("code")
            .and_then(|c| c.get("coding"))
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("code").and_then(Value::as_str) == Some(PULL_NOTIFICATION))
            })
}

/// What a Backport notification Bundle (a `history` Bundle whose first entry is the
/// `SubscriptionStatus` Parameters) brings a Notified Pull receiver.
#[derive(Debug, Clone)]
pub enum BackportNotice {
    /// An event notification whose focus is a notification Task carried in the Bundle.
    Task(Value),
    /// A handshake or heartbeat (its type): nothing to pull.
    Nothing(String),
    /// A Backport notification ketenbus cannot pull after: why.
    Unusable(&'static str),
}

/// The Backport notification in `tree`, if it is one.
#[must_use]
pub fn backport_notice(tree: &Value) -> Option<BackportNotice> {
    if tree.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || tree.get("type").and_then(Value::as_str) != Some("history")
    {
        return None;
    }
    let entries = tree.get("entry").and_then(Value::as_array)?;
    let status = entries.first()?.get("resource")?;
    if status.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return None;
    }
    let parameters = status.get("parameter").and_then(Value::as_array)?;
    let named = |name: &'static str| {
        parameters
            .iter()
            .filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
    };
    let kind = named("type")
        .next()
        .and_then(|p| p.get("valueCode"))
        .and_then(Value::as_str)?;
    if kind != "event-notification" {
        return Some(BackportNotice::Nothing(kind.to_owned()));
    }
    let focus: Vec<&str> = named("notification-event")
        .filter_map(|e| e.get("part").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("name").and_then(Value::as_str) == Some("focus"))
        .filter_map(|p| p.get("valueReference")?.get("reference")?.as_str())
        .collect();
    let [focus] = focus.as_slice() else {
        return Some(BackportNotice::Unusable(
            "a Notified Pull notification has one notification-event with a focus",
        ));
    };
    let task = entries[1..]
        .iter()
        .find(|e| e.get("fullUrl").and_then(Value::as_str) == Some(*focus))
        .and_then(|e| e.get("resource"))
        .filter(|r| is_pull_notification(r));
    Some(task.map_or(
        BackportNotice::Unusable("the focus is no pull-notification Task carried in the Bundle"),
        |t| BackportNotice::Task(t.clone()),
    ))
}

fn input_type_is(input: &Value, code: &str) -> bool {
    input
        .get("type")
        .and_then(|t| t.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("code").and_then(Value::as_str) == Some(code))
        })
}

fn inputs_of(task: &Value, code: &str) -> Vec<String> {
    task.get("input")
        .and_then(Value::as_array)
        .unwrap_or(&[])
        .iter()
        .filter(|i| input_type_is(i, code))
        .filter_map(|i| {
            ["valueUrl", "valueString", "valueUri"]
                .iter()
                .find_map(|k| i.get(k).and_then(Value::as_str))
                .map(str::to_owned)
        })
        .collect()
}

fn input_value(task: &Value, code: &str) -> Option<String> {
    inputs_of(task, code).into_iter().next()
}

fn authorization_base(task: &Value) -> Option<String> {
    input_value(task, "authorization-base").filter(|b| !b.is_empty())
}

/// The URLs a Task announces.
fn announced(task: &Value) -> Vec<String> {
    let mut urls = inputs_of(task, "query-available-resources");
    urls.extend(inputs_of(task, "read-available-resource"));
    urls
}

/// Whether `url` lies under the FHIR base `base` (same scheme, host, port and path prefix).
fn under(url: &str, base: &str) -> bool {
    let (Ok(u), Ok(b)) = (reqwest::Url::parse(url), reqwest::Url::parse(base)) else {
        return false;
    };
    let prefix = format!("{}/", b.path().trim_end_matches('/'));
    u.scheme() == b.scheme()
        && u.host_str() == b.host_str()
        && u.port_or_known_default() == b.port_or_known_default()
        && u.path().starts_with(&prefix)
        && !u.path().contains("/../")
}

fn strip_authorization_base(task: &mut Value) {
    if let Value::Object(o) = task
        && let Some(Value::Array(inputs)) = o.get_mut("input")
    {
        inputs.retain(|i| !input_type_is(i, "authorization-base"));
    }
}

/// The resources a token holder may read: those of its exchange's event.
///
/// # Errors
/// When the resource index cannot be read.
pub async fn exchange_resources(
    resources: &Resources,
    claims: &Claims,
) -> Result<Vec<Value>, crate::deliver::resources::ResourceError> {
    resources.of_event(&claims.event).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(dir: &Path) -> NotifiedPull {
        let env =
            Env::from_fn(|n| (n == "PULL_KEY").then(|| "0123456789abcdef0123456789abcdef".into()));
        let cfg = NotifiedPullConfig {
            base_url: "http://127.0.0.1:1/fhir".into(),
            key_env: "PULL_KEY".into(),
            authorization_base_ttl: Duration::from_secs(60),
            token_ttl: Duration::from_secs(60),
            retry: pull_retry(),
            partners: vec![PartnerConfig {
                name: "a".into(),
                party_ids: vec!["ura:11111111".into()],
                token_url: "http://127.0.0.1:2/notified-pull/token".into(),
                fhir_base: "http://127.0.0.1:2/fhir".into(),
                timeout: Duration::from_secs(1),
                allow_plain_http: false,
            }],
        };
        let ok = |_: &str, _: bool| Ok(());
        assert!(
            cfg.problems(&env, ok).is_empty(),
            "{:?}",
            cfg.problems(&env, ok)
        );
        NotifiedPull::open(&cfg, &env, dir).unwrap()
    }

    #[test]
    fn a_token_reads_only_its_exchange_and_only_here() {
        let dir = tempfile::tempdir().unwrap();
        let p = pull(dir.path());
        let opened = p.open_exchange("env.0", "agb:01234567", "np").unwrap();
        assert_eq!(opened.authorization_base.len(), 64);
        let t = p.token(&opened.authorization_base).unwrap();
        let c = p.verify(&t.access_token).unwrap();
        assert_eq!(
            (c.event.as_str(), c.sub.as_str()),
            ("env.0", "agb:01234567")
        );
        assert_eq!(p.token("guess").err(), Some(PullError::InvalidGrant));
        // Signed with another key.
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(b"another key another key another key"),
        )
        .unwrap();
        assert_eq!(p.verify(&other), Err(PullError::Invalid));
        let foreign = Claims {
            aud: "https://elsewhere/fhir".into(),
            ..c.clone()
        };
        let foreign = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &foreign,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(p.verify(&foreign), Err(PullError::Audience));
        let old = Claims {
            exp: c.iat - 10,
            ..c
        };
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &old,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(p.verify(&old), Err(PullError::Expired));
    }

    #[test]
    fn tasks_from_strangers_or_pointing_elsewhere_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = pull(dir.path());
        let opened = Opened {
            exchange: "x".into(),
            authorization_base: "b".repeat(64),
        };
        let mut task = p.task(
            &opened,
            (Some("ura:11111111"), "agb:01234567"),
            &["ServiceRequest/s1".into()],
        );
        assert!(is_pull_notification(&task));
        // Ours points at our own base, which is not partner a's.
        assert_eq!(p.accept_task(&task), Err(Refused::Foreign));
        let text = String::from_utf8(ketenbus_connectors::fhir::json::to_vec(&task))
            .unwrap()
            .replace("127.0.0.1:1/fhir", "127.0.0.1:2/fhir");
        task = ketenbus_connectors::fhir::json::parse(text.as_bytes()).unwrap();
        assert!(p.accept_task(&task).is_ok());
        let stranger = String::from_utf8(ketenbus_connectors::fhir::json::to_vec(&task))
            .unwrap()
            .replace("11111111", "22222222");
        let stranger = ketenbus_connectors::fhir::json::parse(stranger.as_bytes()).unwrap();
        assert_eq!(p.accept_task(&stranger), Err(Refused::Partner));
        assert!(under("http://h:1/fhir/Task/1", "http://h:1/fhir"));
        assert!(!under("http://h:1/fhirx/Task/1", "http://h:1/fhir"));
        assert!(!under("http://h:2/fhir/Task/1", "http://h:1/fhir"));
        let mut stripped = task.clone();
        strip_authorization_base(&mut stripped);
        assert!(authorization_base(&stripped).is_none());
        assert!(authorization_base(&task).is_some());
    }

    #[test]
    fn backport_numbers_have_no_gaps_and_a_retry_keeps_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = pull(dir.path());
        let a = p.number("np", "e1").unwrap();
        let b = p.number("np", "e2").unwrap();
        let again = p.number("np", "e1").unwrap();
        let other = p.number("other", "e1").unwrap();
        assert_eq!((a.number, b.number, again.number), (1, 2, 1));
        assert_eq!((b.since, again.since), (2, 2));
        assert_eq!(again.at_ms, a.at_ms);
        assert_eq!((other.number, other.since), (1, 1));
        drop(p);
        let p = pull(dir.path());
        assert_eq!(
            p.number("np", "e3").unwrap().number,
            3,
            "kept across a reopen"
        );
    }

    #[test]
    fn a_backport_notification_gives_its_focus_task() {
        let bundle = |kind: &str, focus: &str, task_code: &str| -> Value {
            let text = format!(
                r#"{{"resourceType":"Bundle","type":"history","entry":[
                {{"fullUrl":"urn:uuid:1","resource":{{"resourceType":"Parameters","parameter":[
                  {{"name":"type","valueCode":"{kind}"}},
                  {{"name":"notification-event","part":[{{"name":"event-number","valueString":"1"}},
                    {{"name":"focus","valueReference":{{"reference":"{focus}"}}}}]}}]}}}},
                {{"fullUrl":"http://a/fhir/Task/x","resource":{{"resourceType":"Task",
                  "code":{{"coding":[{{"code":"{task_code}"}}]}}}}}}]}}"#
            );
            ketenbus_connectors::fhir::json::parse(text.as_bytes()).unwrap()
        };
        let got = |b: &Value| match backport_notice(b) {
            Some(BackportNotice::Task(_)) => "task",
            Some(BackportNotice::Nothing(_)) => "nothing",
            Some(BackportNotice::Unusable(_)) => "unusable",
            None => "none",
        };
        let task = bundle(
            "event-notification",
            "http://a/fhir/Task/x",
            PULL_NOTIFICATION,
        );
        assert_eq!(got(&task), "task");
        assert_eq!(got(&bundle("heartbeat", "", "")), "nothing");
        assert_eq!(
            got(&bundle(
                "event-notification",
                "http://a/fhir/Task/y",
                PULL_NOTIFICATION
            )),
            "unusable",
            "a focus not carried"
        );
        assert_eq!(
            got(&bundle(
                "event-notification",
                "http://a/fhir/Task/x",
                "other"
            )),
            "unusable",
            "a Task that is no pull notification"
        );
        let text = String::from_utf8(ketenbus_connectors::fhir::json::to_vec(&task))
            .unwrap()
            .replace("history", "transaction");
        let not = ketenbus_connectors::fhir::json::parse(text.as_bytes()).unwrap();
        assert_eq!(got(&not), "none");
    }
}
