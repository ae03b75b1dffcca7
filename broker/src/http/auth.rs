//! Who may do what: senders (may post messages in the name of their own party ids) and
//! operators (may read lineage and work the dead letters), each identified by a bearer
//! token kept only as its SHA-256 hash in the config, or by a client certificate (mTLS).
//!
//! With no `[[senders]]` the API takes messages from anyone who can reach it (the loopback
//! quick start); with no `[[operators]]` lineage is open likewise. `check-config` warns when
//! that is so on a non-loopback listener.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use ketenbus_connectors::party::{self, Declared, SenderError};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::env::Problem;
use crate::http::server::ClientCert;
use crate::observe::audit::{Audit, Entry};

/// `[[senders]]`: a client that may post messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// Name in logs and audit records: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Hex SHA-256 of the sender's bearer token (`ketenbus token new` makes a token and its
    /// hash). The token itself is never in the config.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Hex SHA-256 of the sender's client certificate (DER), for mTLS.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// Party ids (`mailbox:…`, `agb:…`, `ura:…`, `endpoint:…`) this sender may send as. A
    /// message whose own sender (EDIFACT UNB, FHIR MessageHeader) is not among them is
    /// refused with 403.
    pub party_ids: Vec<String>,
}

/// `[[operators]]`: a person or tool that may read lineage and dead letters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Name in logs and audit records.
    pub name: String,
    /// Hex SHA-256 of the operator's bearer token.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Hex SHA-256 of the operator's client certificate (DER), for mTLS.
    #[serde(default)]
    pub cert_sha256: Option<String>,
}

/// Someone the broker knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Configured name.
    pub name: String,
    /// Party ids it may act for (empty for operators).
    pub party_ids: Vec<String>,
    token: Option<[u8; 32]>,
    cert: Option<[u8; 32]>,
}

/// The configured senders and operators.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    senders: Vec<Principal>,
    operators: Vec<Principal>,
}

/// Why a request is not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials nobody configured has: 401.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Known, but not allowed this: 403.
    #[error("{0}")]
    Forbidden(String),
}

fn hash32(hex_text: &str) -> Option<[u8; 32]> {
    let v = hex::decode(hex_text.trim()).ok()?;
    v.try_into().ok()
}

/// Hex SHA-256 of a bearer token: what `token_sha256` holds.
#[must_use]
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token (32 bytes, hex) and its hash.
#[must_use]
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("kb_{}", hex::encode(bytes));
    let hash = token_hash(&token);
    (token, hash)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether the bearer credential is a JWT (three base64url parts: a Notified Pull token),
/// not a sender's or operator's token.
#[must_use]
pub fn is_jwt(headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|t| t.split('.').count() == 3 && t.starts_with("eyJ"))
}

/// The principal in `list` whose hash equals `hash`. Every entry is compared in constant
/// time, so the answer's timing tells nothing about which bytes matched.
fn find<'a>(
    list: &'a [Principal],
    hash: &[u8; 32],
    field: fn(&Principal) -> Option<&[u8; 32]>,
) -> Option<&'a Principal> {
    let mut found = None;
    for p in list {
        if let Some(h) = field(p)
            && bool::from(h.ct_eq(hash))
        {
            found = found.or(Some(p));
        }
    }
    found
}

impl Authenticator {
    /// From the config (assumed validated; entries with unusable hashes are left out).
    #[must_use]
    pub fn new(senders: &[SenderConfig], operators: &[OperatorConfig]) -> Authenticator {
        Authenticator {
            senders: senders
                .iter()
                .map(|s| Principal {
                    name: s.name.clone(),
                    party_ids: s.party_ids.clone(),
                    token: s.token_sha256.as_deref().and_then(hash32),
                    cert: s.cert_sha256.as_deref().and_then(hash32),
                })
                .collect(),
            operators: operators
                .iter()
                .map(|o| Principal {
                    name: o.name.clone(),
                    party_ids: Vec::new(),
                    token: o.token_sha256.as_deref().and_then(hash32),
                    cert: o.cert_sha256.as_deref().and_then(hash32),
                })
                .collect(),
        }
    }

    /// Senders are configured: posting needs credentials.
    #[must_use]
    pub fn senders_required(&self) -> bool {
        !self.senders.is_empty()
    }

    /// Operators are configured: lineage and dead letters need the operator role.
    #[must_use]
    pub fn operators_required(&self) -> bool {
        !self.operators.is_empty()
    }

    fn identify<'a>(
        list: &'a [Principal],
        headers: &HeaderMap,
        cert: Option<&ClientCert>,
    ) -> Result<&'a Principal, AuthError> {
        if let Some(token) = bearer(headers) {
            let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            return find(list, &h, |p| p.token.as_ref())
                .ok_or(AuthError::Unauthenticated("the bearer token is not valid"));
        }
        if let Some(c) = cert.and_then(|c| hash32(&c.sha256)) {
            return find(list, &c, |p| p.cert.as_ref()).ok_or(AuthError::Unauthenticated(
                "the client certificate is not one of a known sender or operator",
            ));
        }
        Err(AuthError::Unauthenticated(
            "credentials required: Authorization: Bearer <token> or a client certificate",
        ))
    }

    /// The sender making this request; `Ok(None)` when no senders are configured.
    ///
    /// # Errors
    /// [`AuthError::Unauthenticated`] without valid sender credentials.
    pub fn sender(
        &self,
        headers: &HeaderMap,
        cert: Option<&ClientCert>,
    ) -> Result<Option<&Principal>, AuthError> {
        if self.senders.is_empty() {
            return Ok(None);
        }
        Self::identify(&self.senders, headers, cert).map(Some)
    }

    /// The operator making this request; `Ok(None)` when no operators are configured.
    ///
    /// # Errors
    /// [`AuthError::Unauthenticated`] without valid operator credentials.
    pub fn operator(
        &self,
        headers: &HeaderMap,
        cert: Option<&ClientCert>,
    ) -> Result<Option<&Principal>, AuthError> {
        if self.operators.is_empty() {
            return Ok(None);
        }
        Self::identify(&self.operators, headers, cert).map(Some)
    }

    /// The operator whose token this is, for the command line (`dlq`, `audit`);
    /// `Ok(None)` when no operators are configured.
    ///
    /// # Errors
    /// [`AuthError::Unauthenticated`] when operators are configured and the token is
    /// missing or unknown.
    pub fn operator_token(&self, token: Option<&str>) -> Result<Option<&Principal>, AuthError> {
        if self.operators.is_empty() {
            return Ok(None);
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(AuthError::Unauthenticated(
                "operators are configured: put an operator token in KETENBUS_OPERATOR_TOKEN",
            ));
        };
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        find(&self.operators, &h, |p| p.token.as_ref())
            .map(Some)
            .ok_or(AuthError::Unauthenticated(
                "the operator token is not valid",
            ))
    }
}

/// Problems with `[[senders]]` and `[[operators]]`.
#[must_use]
pub fn problems(senders: &[SenderConfig], operators: &[OperatorConfig]) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    let mut check = |at: String,
                     name: &str,
                     token: Option<&String>,
                     cert: Option<&String>,
                     out: &mut Vec<(String, String)>| {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            out.push((
                format!("{at}.name"),
                "must be letters, digits, '-', '_' or '.'".into(),
            ));
        } else if !names.insert(name.to_owned()) {
            out.push((format!("{at}.name"), format!("duplicate name {name}")));
        }
        if token.is_none() && cert.is_none() {
            out.push((at.clone(), "give token_sha256, cert_sha256 or both".into()));
        }
        for (key, v) in [("token_sha256", token), ("cert_sha256", cert)] {
            if let Some(v) = v
                && hash32(v).is_none()
            {
                // A value that is not a hash may be the token itself: never echo it.
                out.push((
                    format!("{at}.{key}"),
                    "must be 64 hex digits (a SHA-256), not the token itself".into(),
                ));
            }
        }
    };
    for (i, s) in senders.iter().enumerate() {
        let at = format!("senders[{i}]");
        check(
            at.clone(),
            &s.name,
            s.token_sha256.as_ref(),
            s.cert_sha256.as_ref(),
            &mut out,
        );
        if s.party_ids.is_empty() {
            out.push((
                format!("{at}.party_ids"),
                "name at least one party id".into(),
            ));
        }
        for (j, p) in s.party_ids.iter().enumerate() {
            if !p
                .split_once(':')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
            {
                out.push((
                    format!("{at}.party_ids[{j}]"),
                    "must be scheme:value, e.g. agb:01234567".into(),
                ));
            }
        }
    }
    for (i, o) in operators.iter().enumerate() {
        check(
            format!("operators[{i}]"),
            &o.name,
            o.token_sha256.as_ref(),
            o.cert_sha256.as_ref(),
            &mut out,
        );
    }
    Problem::all(out)
}

/// The authenticated sender of a request, put into its extensions by [`protect`].
#[derive(Debug, Clone)]
pub struct AuthenticatedSender(pub Principal);

/// The authenticated operator of a request, put into its extensions by [`protect`].
#[derive(Debug, Clone)]
pub struct AuthenticatedOperator(pub Principal);

impl AuthenticatedSender {
    /// Check every sender a message declares against this sender's parties, and name the
    /// envelope's sender: the declared one, else this sender's first party.
    ///
    /// # Errors
    /// [`SenderError`] when the message names another party, or cannot be read far enough
    /// to know whom it names.
    pub fn check(&self, declared: &Declared) -> Result<Option<String>, SenderError> {
        party::check_sender(declared, &self.0.name, &self.0.party_ids)
    }
}

/// The `403 sender_mismatch` answer (JSON; the FHIR endpoints answer an OperationOutcome).
#[must_use]
pub fn sender_mismatch(e: &SenderError) -> Response {
    crate::observe::metrics::rejected("http", "sender_mismatch");
    (
        StatusCode::FORBIDDEN,
        Json(serde_json::json!({ "error": "sender_mismatch", "message": e.to_string() })),
    )
        .into_response()
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Sender,
    Operator,
    /// An operator, or a sender (the handler limits it to its own parties).
    Either,
    /// A FHIR read of one resource or a search: an operator, a sender (for its own
    /// parties' resources) or a Notified Pull token (checked by the handler).
    Reader,
}

fn need(method: &Method, path: &str) -> Need {
    let api = path == "/api/v1/messages" || path.starts_with("/api/v1/messages/");
    let fhir = path == "/fhir" || path.starts_with("/fhir/");
    if !(api || fhir) || path == "/fhir/metadata" {
        return Need::Nothing; // health, readiness, metrics, capabilities: no patient data
    }
    if (path == "/fhir/Basic" || path.starts_with("/fhir/Basic/")) && method == Method::GET {
        return Need::Nothing; // the subscription topics: no patient data
    }
    if path == "/fhir/Subscription" || path.starts_with("/fhir/Subscription/") {
        return Need::Either; // each handler checks the receiver against a sender's parties
    }
    let resource_read = path
        .strip_prefix("/fhir/")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('$'));
    if (method == Method::GET || method == Method::HEAD) && resource_read {
        Need::Reader
    } else if method == Method::GET || method == Method::HEAD {
        Need::Operator
    } else {
        Need::Sender
    }
}

/// What the gate in front of the API holds.
struct Gate {
    auth: Authenticator,
    audit: Option<Audit>,
}

/// Wrap the API so that, when senders or operators are configured, posting needs a sender
/// and reading messages (lineage, FHIR reads) needs an operator. Health, readiness and
/// metrics stay open: they carry no patient data. With `audit`, every successful read of a
/// message (lineage or FHIR) is appended to the audit trail before it is answered.
///
/// The gate only says who is asking: each write handler checks the senders its message
/// declares ([`AuthenticatedSender::check`]) on the one parse it makes of the message, for
/// every media type it takes.
pub fn protect(app: Router, auth: Authenticator, audit: Option<Audit>) -> Router {
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(Gate { auth, audit }),
        gate,
    ))
}

/// Set by a search by patient on its answer: the pseudonym of the patient searched for, so
/// the audit record of the read names the patient (never the BSN).
#[derive(Debug, Clone)]
pub struct PatientSearched(pub String);

/// Set by a FHIR read on its answer: the audit record of that read (who, which event,
/// which patient's pseudonym), written by the gate before the answer leaves.
#[derive(Debug, Clone)]
pub struct ReadAudit(pub Entry);

/// The audit record of a successful read, if the path reads message data.
fn read_entry(
    path: &str,
    operator: Option<&Principal>,
    patient: Option<&PatientSearched>,
) -> Option<Entry> {
    let actor = operator.map_or_else(
        || "anonymous".to_owned(),
        |p| format!("operator:{}", p.name),
    );
    let entry = |action: &str| Entry {
        action: action.to_owned(),
        actor: actor.clone(),
        ..Entry::default()
    };
    if let Some(id) = path.strip_prefix("/api/v1/messages/") {
        return Some(Entry {
            envelope_id: Some(id.to_owned()),
            ..entry("lineage_read")
        });
    }
    if path == "/api/v1/messages" {
        return Some(match patient {
            Some(PatientSearched(p)) => Entry {
                patient: Some(p.clone()),
                ..entry("patient_search")
            },
            None => entry("lineage_list"),
        });
    }
    if path == "/fhir" || path.starts_with("/fhir/") {
        return Some(Entry {
            event_id: Some(path.to_owned()),
            ..entry("fhir_read")
        });
    }
    None
}

fn refuse(e: &AuthError) -> Response {
    let (status, code) = match e {
        AuthError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
    };
    crate::observe::metrics::rejected("http", code);
    let mut resp = (
        status,
        Json(serde_json::json!({ "error": code, "message": e.to_string() })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ketenbus\""),
        );
    }
    resp
}

async fn gate(State(gate): State<Arc<Gate>>, mut req: Request, next: Next) -> Response {
    let auth = &gate.auth;
    let cert = req.extensions().get::<ClientCert>().cloned();
    let need = need(req.method(), req.uri().path());
    let mut read_by = None;
    match need {
        Need::Nothing => {}
        Need::Sender => match auth.sender(req.headers(), cert.as_ref()) {
            Ok(Some(p)) => {
                req.extensions_mut().insert(AuthenticatedSender(p.clone()));
            }
            Ok(None) => {}
            Err(e) => return refuse(&e),
        },
        // A Notified Pull token is checked by the handler (it knows the exchange).
        Need::Reader if is_jwt(req.headers()) => {}
        Need::Reader
            if auth.senders_required() && auth.sender(req.headers(), cert.as_ref()).is_ok() =>
        {
            if let Ok(Some(p)) = auth.sender(req.headers(), cert.as_ref()) {
                req.extensions_mut().insert(AuthenticatedSender(p.clone()));
            }
        }
        Need::Operator | Need::Reader => match auth.operator(req.headers(), cert.as_ref()) {
            Ok(p) => {
                read_by = p.cloned();
                if let Some(p) = p {
                    req.extensions_mut()
                        .insert(AuthenticatedOperator(p.clone()));
                }
            }
            Err(e) => return refuse(&e),
        },
        Need::Either => match auth.operator(req.headers(), cert.as_ref()) {
            Ok(Some(p)) => {
                req.extensions_mut()
                    .insert(AuthenticatedOperator(p.clone()));
            }
            open_or_not => match (auth.sender(req.headers(), cert.as_ref()), open_or_not) {
                (Ok(Some(p)), _) => {
                    req.extensions_mut().insert(AuthenticatedSender(p.clone()));
                }
                // No operators configured: what operators may do is open.
                (_, Ok(None)) => {}
                (_, Err(e)) => return refuse(&e),
                (_, Ok(Some(_))) => unreachable!("matched above"),
            },
        },
    }
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let fhir_read = resp.extensions().get::<ReadAudit>().map(|a| a.0.clone());
    let audited = need == Need::Operator || fhir_read.is_some();
    if audited
        && resp.status().is_success()
        && let Some(audit) = &gate.audit
        && let Some(entry) =
            fhir_read.or_else(|| read_entry(&path, read_by.as_ref(), resp.extensions().get()))
        && let Err(e) = audit.append(vec![entry]).await
    {
        // No read of patient data without its audit record.
        tracing::error!(error = %e, "audit trail unavailable; read refused");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "error": "audit_unavailable",
                "message": "the audit trail cannot be written; reads are refused until it can",
            })),
        )
            .into_response();
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn tokens_match_by_hash_only() {
        let (token, hash) = new_token();
        let a = Authenticator::new(
            &[SenderConfig {
                name: "lab".into(),
                token_sha256: Some(hash.clone()),
                cert_sha256: None,
                party_ids: vec!["mailbox:500001234".into()],
            }],
            &[],
        );
        assert_eq!(
            a.sender(&headers(&token), None).unwrap().unwrap().name,
            "lab"
        );
        assert!(matches!(
            a.sender(&headers("kb_wrong"), None),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(a.sender(&HeaderMap::new(), None).is_err());
        assert!(a.operator(&HeaderMap::new(), None).unwrap().is_none());
        let p = AuthenticatedSender(a.sender(&headers(&token), None).unwrap().unwrap().clone());
        let declared = |s: &str| Declared {
            senders: [s.to_owned()].into(),
            ..Declared::default()
        };
        assert!(p.check(&declared("mailbox:500001234")).is_ok());
        let e = p.check(&declared("mailbox:500009999")).unwrap_err();
        assert!(e.to_string().contains("mailbox:500009999"), "{e}");
    }

    #[test]
    fn bad_entries_are_problems_without_echoing_values() {
        let p = problems(
            &[SenderConfig {
                name: "a b".into(),
                token_sha256: Some("hunter2".into()),
                cert_sha256: None,
                party_ids: vec!["nocolon".into()],
            }],
            &[OperatorConfig {
                name: "ops".into(),
                token_sha256: None,
                cert_sha256: None,
            }],
        );
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "senders[0].name",
                "senders[0].token_sha256",
                "senders[0].party_ids[0]",
                "operators[0]"
            ]
        );
        assert!(p.iter().all(|p| !p.message.contains("hunter2")));
    }
}
