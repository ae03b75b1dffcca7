//! The operators' web console at `/console/`: overview, message search, a message's lineage
//! with its raw form on request, dead letters (replay, purge) and subscriptions (pause,
//! resume). Served by the broker itself; the three asset files are compiled into the binary
//! with `include_str!` (three small files need no embedding crate), written by hand without a
//! framework, fetch nothing from elsewhere and use relative links only, so the console works
//! behind a path prefix and over TLS.
//!
//! Access: an operator logs in with an operator token, or on an mTLS listener with the
//! client certificate configured as the operator's `cert_sha256`, and gets a session cookie (see
//! [`session`]). Every `api/` call needs a live session (else `401`); every state-changing
//! call (all are `POST`) also needs the session's CSRF token in `X-CSRF-Token` and no foreign
//! `Origin` / `Sec-Fetch-Site` (else `403`). Pages without a session redirect to the login
//! page. Reads of message data and every action are audited with the operator's name.
//! Patient data never goes into a URL: searches are `POST`s with the filters in the body.

pub mod ops;
pub mod session;

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::deliver::config::Subscription;
use crate::deliver::dlq::Selection;
use crate::deliver::pause::Pauses;
use crate::http::auth::{AuthError, Authenticator};
use crate::http::config::ConsoleConfig;
use crate::http::server::ClientCert;
use crate::http::state::ApiState;
use crate::observe::audit::{Audit, Entry};
use crate::route::keys::RawPatients;
use ops::Operations;
use session::{CSRF_HEADER, Session, Sessions};

const INDEX: &str = include_str!("console/assets/index.html");
const LOGIN: &str = include_str!("console/assets/login.html");
const SCRIPT: &str = include_str!("console/assets/console.js");
const STYLE: &str = include_str!("console/assets/console.css");

/// What the console's handlers share.
pub struct Console {
    /// The API's state: lineage and search.
    pub api: Arc<ApiState>,
    /// Who the operators are.
    pub auth: Authenticator,
    /// Live sessions.
    pub sessions: Sessions,
    /// The audit trail, when there is one.
    pub audit: Option<Audit>,
    /// Dead letters and raw reads on the log.
    pub ops: Arc<dyn Operations>,
    /// The configured subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// Paused subscriptions.
    pub pauses: Pauses,
    /// Reads a raw message's events and patients again, as the router did.
    pub raw_patients: Arc<RawPatients>,
    /// The session cookie's `Path`.
    pub cookie_path: String,
    /// The listener speaks TLS: the cookie is `Secure` (see [`Console::secure`]).
    pub tls: bool,
    /// Subscriptions made through `/fhir/Subscription`, listed and worked as `fhir-<id>`.
    pub fhir: Option<Arc<crate::deliver::backport::Registry>>,
}

impl Console {
    /// The console's state from its config.
    #[must_use]
    #[allow(clippy::too_many_arguments)] // each is one part of the broker the console shows
    pub fn new(
        cfg: &ConsoleConfig,
        api: Arc<ApiState>,
        auth: Authenticator,
        audit: Option<Audit>,
        ops: Arc<dyn Operations>,
        subscriptions: Vec<Subscription>,
        (pauses, raw_patients): (Pauses, Arc<RawPatients>),
        tls: bool,
    ) -> Console {
        Console {
            api,
            auth,
            sessions: Sessions::new(cfg.idle_timeout, cfg.absolute_timeout),
            audit,
            ops,
            subscriptions,
            pauses,
            raw_patients,
            cookie_path: cfg.cookie_path(),
            tls,
            fhir: None,
        }
    }

    /// With the Subscriptions made through `/fhir/Subscription`.
    #[must_use]
    pub fn with_fhir(mut self, registry: Arc<crate::deliver::backport::Registry>) -> Console {
        self.fhir = Some(registry);
        self
    }

    /// The configured subscriptions, then those made through `/fhir/Subscription` with
    /// their Subscription (id, receiver, status).
    fn all(&self) -> Vec<(Subscription, Option<crate::deliver::backport::Registration>)> {
        let mut out: Vec<_> = self
            .subscriptions
            .iter()
            .map(|s| (s.clone(), None))
            .collect();
        if let Some(r) = &self.fhir {
            out.extend(
                r.all()
                    .into_iter()
                    .map(|reg| (r.subscription(&reg), Some(reg))),
            );
        }
        out
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("cookie_path", &self.cookie_path)
            .finish_non_exhaustive()
    }
}

/// The console's routes, under `/console`.
pub fn router(console: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/console/api/session", get(session_info))
        .route("/console/api/logout", post(logout))
        .route("/console/api/overview", get(overview))
        .route("/console/api/search", post(search))
        .route("/console/api/messages/{id}", get(message))
        .route("/console/api/messages/{id}/raw", post(raw))
        .route("/console/api/subscriptions", get(subscriptions))
        .route(
            "/console/api/subscriptions/{name}/dead-letters",
            get(dead_letters),
        )
        .route(
            "/console/api/subscriptions/{name}/dead-letters/{action}",
            post(dead_letter_action),
        )
        .route(
            "/console/api/subscriptions/{name}/{state}",
            post(set_paused),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&console),
            guard,
        ));
    Router::new()
        .route("/console", get(|| async { redirect("console/") }))
        .route("/console/", get(index))
        .route("/console/login", get(|| async { page(LOGIN) }))
        .route(
            "/console/assets/console.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/assets/console.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/console/api/login", post(login))
        .merge(api)
        .layer(axum::middleware::from_fn(headers))
        .with_state(console)
}

fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// A refusal of a request, answered like [`problem`] (small, unlike a `Response`).
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        problem(self.status, self.code, &self.message)
    }
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

fn page(html: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

fn asset(text: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// Headers on every console answer: no caching, no framing, scripts and styles only from the
/// console itself, no referrer.
async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in [
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

/// The app page: only with a live session, else to the login page.
async fn index(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match session::cookie_id(&headers).and_then(|id| c.sessions.touch(&id)) {
        Some(_) => page(INDEX),
        None => redirect("login"),
    }
}

/// Every `api/` call: a live session; a `POST` also the CSRF token and no foreign origin.
async fn guard(State(c): State<Arc<Console>>, mut req: Request, next: Next) -> Response {
    let Some(s) = session::cookie_id(req.headers()).and_then(|id| c.sessions.touch(&id)) else {
        crate::observe::metrics::rejected("http", "unauthenticated");
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "no live console session: log in",
        );
    };
    if req.method() != axum::http::Method::GET {
        let token = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !session::csrf_matches(&s, token) || !session::same_origin(req.headers()) {
            crate::observe::metrics::rejected("http", "forbidden");
            tracing::warn!(operator = %s.operator, "console request refused: CSRF token or origin wrong");
            return problem(
                StatusCode::FORBIDDEN,
                "csrf",
                "the request did not come from the console (CSRF token or origin)",
            );
        }
    }
    req.extensions_mut().insert(s);
    next.run(req).await
}

impl Console {
    /// Append audit records; `Err` with the answer to give when the trail cannot be written.
    async fn audit(&self, entries: Vec<Entry>) -> Result<(), Response> {
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        audit.append(entries).await.map_err(|e| {
            tracing::error!(error = %e, "audit trail unavailable; console action refused");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the audit trail cannot be written; try again later",
            )
        })
    }

    /// Whether the session cookie is `Secure`: on a TLS listener, and behind a proxy that
    /// took the request over HTTPS (`X-Forwarded-Proto: https`). The header can only add the
    /// attribute, never take it away.
    fn secure(&self, headers: &HeaderMap) -> bool {
        self.tls
            || headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| p.eq_ignore_ascii_case("https"))
    }

    fn subscription(&self, name: &str) -> Result<Subscription, Refusal> {
        self.all()
            .into_iter()
            .map(|(s, _)| s)
            .find(|s| s.name == name)
            .ok_or_else(|| Refusal {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "no such subscription".into(),
            })
    }
}

fn actor(s: &Session) -> String {
    format!("operator:{}", s.operator)
}

fn entry(action: &str, s: &Session) -> Entry {
    Entry {
        action: action.to_owned(),
        actor: actor(s),
        ..Entry::default()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    /// An operator token; without one, the operator is named by the connection's client
    /// certificate.
    #[serde(default)]
    token: Option<String>,
}

/// Log in with an operator token, or, without one, with the client certificate the TLS
/// connection presented (mTLS) when it is an operator's `cert_sha256`: a sender's
/// certificate, or none, is refused. Each login is audited with the operator's name and the
/// way in (`console_login_token`, `console_login_certificate`).
async fn login(
    State(c): State<Arc<Console>>,
    cert: Option<Extension<ClientCert>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !session::same_origin(&headers) {
        crate::observe::metrics::rejected("http", "forbidden");
        return problem(
            StatusCode::FORBIDDEN,
            "csrf",
            "log in from the console's own page",
        );
    }
    let Ok(Login { token }) = serde_json::from_slice(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "send {\"token\": ...}, or {} to log in with your client certificate",
        );
    };
    let by_certificate = token.is_none();
    let found = match &token {
        Some(t) => c.auth.operator_token(Some(t)),
        None => match cert {
            Some(Extension(cert)) => c.auth.operator(&HeaderMap::new(), Some(&cert)),
            None => Err(AuthError::Unauthenticated("no client certificate")),
        },
    };
    let operator = match found {
        Ok(Some(p)) => p.name.clone(),
        Ok(None) => {
            return problem(
                StatusCode::FORBIDDEN,
                "no_operators",
                "no [[operators]] are configured: the console needs one to log in",
            );
        }
        Err(_) if by_certificate => {
            crate::observe::metrics::rejected("http", "unauthenticated");
            tracing::warn!("console login refused: no client certificate of an operator");
            return problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "this connection has no client certificate of an operator: log in with an operator token",
            );
        }
        Err(_) => {
            crate::observe::metrics::rejected("http", "unauthenticated");
            tracing::warn!("console login refused: not an operator token");
            return problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "that is not an operator token",
            );
        }
    };
    let (id, s) = c.sessions.create(&operator);
    let action = if by_certificate {
        "console_login_certificate"
    } else {
        "console_login_token"
    };
    if let Err(refused) = c.audit(vec![entry(action, &s)]).await {
        c.sessions.remove(&id);
        return refused;
    }
    tracing::info!(operator = %operator, by_certificate, "console login");
    let mut resp = Json(json!({ "operator": s.operator, "csrf": s.csrf })).into_response();
    let cookie = session::set_cookie(&id, &c.cookie_path, c.secure(&headers));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_id(&headers) {
        c.sessions.remove(&id);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let cookie = session::clear_cookie(&c.cookie_path, c.secure(&headers));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn session_info(Extension(s): Extension<Session>) -> Response {
    Json(json!({ "operator": s.operator, "csrf": s.csrf })).into_response()
}

/// The metrics as JSON, from the same registry as `/metrics`.
async fn overview() -> Response {
    Json(crate::observe::metrics::snapshot()).into_response()
}

/// A search: the filters in the body (never in a URL), answered by the API's own search.
async fn search(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    body: axum::body::Bytes,
) -> Response {
    let q = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "bad_query", &e.to_string()),
    };
    let resp = crate::http::api::search(&c.api, q).await;
    let record = match resp
        .extensions()
        .get::<crate::http::auth::PatientSearched>()
    {
        Some(p) => Entry {
            patient: Some(p.0.clone()),
            ..entry("patient_search", &s)
        },
        None => entry("lineage_list", &s),
    };
    if resp.status().is_success()
        && let Err(r) = c.audit(vec![record]).await
    {
        return r;
    }
    resp
}

async fn message(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    match c.api.lineage.get(&id).await {
        Ok(Some(l)) => {
            let read = Entry {
                envelope_id: Some(id),
                ..entry("lineage_read", &s)
            };
            if let Err(r) = c.audit(vec![read]).await {
                return r;
            }
            Json(l).into_response()
        }
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not_found",
            "no message with that id",
        ),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "lineage", &e.to_string()),
    }
}

/// Largest raw message shown in the console.
const RAW_SHOWN: usize = 1024 * 1024;

/// The raw message and its events, on request: an audited read (action `raw_read`, one
/// record per patient the message concerns) before anything is answered.
async fn raw(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let l = match c.api.lineage.get(&id).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "no message with that id",
            );
        }
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "lineage", &e.to_string()),
    };
    let Some(at) = l.received.raw else {
        return problem(
            StatusCode::CONFLICT,
            "not_routed",
            "the message's position in the log is known once it is routed; try again shortly",
        );
    };
    let env = match c.ops.raw(at.partition, at.offset).await {
        Ok(Some(env)) if env.id == id => env,
        Ok(_) => {
            return problem(
                StatusCode::GONE,
                "gone",
                "the message is no longer in the log (retention)",
            );
        }
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "log", &e),
    };
    // Normalising is parsing: off the async workers.
    let (raw_patients, env) = (Arc::clone(&c.raw_patients), Arc::new(env));
    let read = Arc::clone(&env);
    let events = tokio::task::spawn_blocking(move || raw_patients.events(&read))
        .await
        .unwrap_or_default();
    let mut patients: Vec<Option<String>> = Vec::new();
    for key in events.iter().map(|e| e.header().patient_key.clone()) {
        if key.is_some() && !patients.contains(&key) {
            patients.push(key);
        }
    }
    if patients.is_empty() {
        patients.push(None);
    }
    let records = patients
        .into_iter()
        .map(|patient| Entry {
            envelope_id: Some(id.clone()),
            patient,
            ..entry("raw_read", &s)
        })
        .collect();
    if let Err(r) = c.audit(records).await {
        return r;
    }
    let shown = &env.body[..env.body.len().min(RAW_SHOWN)];
    Json(json!({
        "id": env.id,
        "content_type": env.content_type,
        "size": env.body.len(),
        "truncated": env.body.len() > RAW_SHOWN,
        "text": String::from_utf8_lossy(shown),
        "events": events,
    }))
    .into_response()
}

async fn subscriptions(State(c): State<Arc<Console>>) -> Response {
    let mut out = Vec::new();
    for (sub, reg) in c.all() {
        let dead = c
            .ops
            .dead_letters(&sub.name, &Selection::default())
            .await
            .map(|d| d.len());
        // No endpoint, no headers: those may carry the subscriber's credentials.
        let fhir = reg.map(|r| {
            json!({
                "id": r.id,
                "receiver": r.receiver,
                "status": r.status.code(),
                "topic": crate::deliver::backport::topic::Topic::of(r.kind).canonical(),
            })
        });
        out.push(json!({
            "name": sub.name,
            "origin": if fhir.is_some() { "fhir" } else { "config" },
            "fhir_subscription": fhir,
            "paused": c.pauses.is_paused(&sub.name),
            "topics": sub.source_topics(),
            "concurrency": sub.concurrency,
            "retry": {
                "initial": humantime::format_duration(sub.retry.initial).to_string(),
                "max": humantime::format_duration(sub.retry.max).to_string(),
                "give_up_after": humantime::format_duration(sub.retry.give_up_after).to_string(),
            },
            "dead_letters": dead.ok(),
        }));
    }
    Json(out).into_response()
}

async fn dead_letters(State(c): State<Arc<Console>>, Path(name): Path<String>) -> Response {
    if let Err(r) = c.subscription(&name) {
        return r.into_response();
    }
    match c.ops.dead_letters(&name, &Selection::default()).await {
        Ok(letters) => Json(
            letters
                .iter()
                .map(|dl| {
                    json!({
                        "id": dl.id,
                        "record_id": dl.record_id,
                        "envelope_id": dl.envelope_id,
                        "at_ms": dl.at_ms,
                        "reason": dl.reason,
                        "detail": dl.detail,
                        "source_topic": dl.source_topic,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "log", &e.to_string()),
    }
}

/// Which dead letters an action is for: ids, or all since / before a time, or all.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Which {
    /// Dead-letter, record or message ids.
    #[serde(default)]
    ids: Vec<String>,
    /// RFC 3339: those dead-lettered at or after it.
    #[serde(default)]
    since: Option<String>,
    /// RFC 3339: those dead-lettered before it.
    #[serde(default)]
    before: Option<String>,
    /// Every dead letter (needed when no ids and no time are given).
    #[serde(default)]
    all: bool,
}

fn ms(t: &str, key: &str) -> Result<i64, Refusal> {
    humantime::parse_rfc3339_weak(t)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .ok_or_else(|| Refusal::bad_request(format!("{key}: not an RFC 3339 time")))
}

impl Which {
    fn selection(body: &[u8]) -> Result<Selection, Refusal> {
        let w: Which =
            serde_json::from_slice(body).map_err(|e| Refusal::bad_request(e.to_string()))?;
        if w.ids.is_empty() && w.since.is_none() && w.before.is_none() && !w.all {
            return Err(Refusal::bad_request(
                "name ids, a time (since/before) or all: true",
            ));
        }
        Ok(Selection {
            ids: w.ids,
            since_ms: w.since.as_deref().map(|t| ms(t, "since")).transpose()?,
            before_ms: w.before.as_deref().map(|t| ms(t, "before")).transpose()?,
        })
    }
}

/// Replay or purge dead letters (`action`): through `deliver::dlq`, which audits each one
/// with the operator as actor before it acts.
async fn dead_letter_action(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    Path((name, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = c.subscription(&name) {
        return r.into_response();
    }
    let sel = match Which::selection(&body) {
        Ok(sel) => sel,
        Err(r) => return r.into_response(),
    };
    let work = match action.as_str() {
        "replay" => ops::Work::Replay,
        "purge" => ops::Work::Purge,
        _ => return problem(StatusCode::NOT_FOUND, "not_found", "replay or purge"),
    };
    let done = c.ops.work(work, &name, &sel, &actor(&s)).await;
    match done {
        Ok(answer) => {
            tracing::info!(operator = %s.operator, subscription = %name, action = %action, "dead letters worked from the console");
            Json(answer).into_response()
        }
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "dlq", &e.to_string()),
    }
}

/// `pause` or `resume` (`state`) a subscription: the audit record first, then the paused
/// set on disk, then in effect.
async fn set_paused(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    Path((name, state)): Path<(String, String)>,
) -> Response {
    let paused = match state.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return problem(StatusCode::NOT_FOUND, "not_found", "pause or resume"),
    };
    if let Err(r) = c.subscription(&name) {
        return r.into_response();
    }
    let action = if paused {
        "subscription_pause"
    } else {
        "subscription_resume"
    };
    let record = Entry {
        party: Some(format!("subscription:{name}")),
        ..entry(action, &s)
    };
    if let Err(r) = c.audit(vec![record]).await {
        return r;
    }
    if let Err(e) = c.pauses.set(&name, paused) {
        tracing::error!(error = %e, "pausing or resuming a subscription failed");
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "pause", &e.to_string());
    }
    tracing::info!(operator = %s.operator, subscription = %name, paused, "subscription paused or resumed from the console");
    Json(json!({ "name": name, "paused": paused })).into_response()
}
