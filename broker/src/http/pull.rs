//! Reading what ketenbus holds, the FHIR way (issue 14, items 3 and 4):
//!
//! - `GET /fhir/{Type}/{id}`: one resource of an event (`deliver/resources.rs`), read-only.
//! - `GET /fhir/{Type}?_id={id}[&_include=*]`: the same as a `searchset` Bundle, with
//!   `_include=*` every other resource of its event (`include` mode): the query a Notified Pull
//!   notification announces.
//! - `POST /notified-pull/token`: an authorization-base for a short-lived JWT.
//!
//! Who reads what: an operator reads every resource; a sender reads the resources of events
//! whose receiver is one of its party ids; a Notified Pull token reads the resources (and
//! the workflow Task) of its one exchange.
//!
//! - A bad token (expired, another key, another audience) hears **401** with an
//!   OperationOutcome.
//! - A good token hears **403** with an OperationOutcome for everything outside its
//!   exchange: another exchange's Task or resources, and equally an id that exists nowhere,
//!   so a token holder learns nothing about what else this node holds (no existence oracle).
//! - A sender hears **404** for what is not its own and for what does not exist alike, so a
//!   party cannot learn which ids exist for others. (Resource ids derive from event ids, not
//!   from patient data; the answer is the same either way.)
//! - **404** for an operator means the thing does not exist.
//! - A resource whose event retention removed is **410 Gone**, to a reader who may read it.
//!
//! Every read that returns a resource is audited (`fhir_read`, the patient's pseudonym, the
//! reader) by the gate before the answer leaves.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ketenbus_connectors::fhir::{Object, Value};
use ketenbus_schemas::Format;

use crate::deliver::pull::{Claims, PullError};
use crate::deliver::resources::{Found, Located};
use crate::http::auth::{AuthenticatedOperator, AuthenticatedSender, ReadAudit, is_jwt};
use crate::http::fhir::{answer_format, issue, respond};
use crate::http::state::ApiState;
use crate::observe::audit::Entry;

/// The read and token routes, to merge into the API router.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/fhir/{resource_type}/{id}", get(read))
        .route("/fhir/{resource_type}", get(search))
        .route(crate::deliver::pull::TOKEN_PATH, post(token))
}

/// Who is reading.
enum Reader {
    /// An operator, or anyone when no operators are configured.
    Operator(String),
    /// A sender: the events addressed to its parties.
    Party(String, Vec<String>),
    /// A Notified Pull token: its exchange's event.
    Exchange(Claims),
}

impl Reader {
    fn actor(&self) -> String {
        match self {
            Reader::Operator(n) => n.clone(),
            Reader::Party(n, _) => format!("sender:{n}"),
            Reader::Exchange(c) => format!("notified-pull:{}", c.exchange),
        }
    }

    fn may_read(&self, at: &Located) -> bool {
        match self {
            Reader::Operator(_) => true,
            Reader::Party(_, parties) => at
                .receiver
                .as_ref()
                .is_some_and(|r| parties.iter().any(|p| p == r)),
            Reader::Exchange(c) => c.event == at.event_id,
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(out: Format, e: &PullError) -> Response {
    crate::observe::metrics::rejected("fhir", "pull_token_refused");
    let mut resp = issue(
        StatusCode::UNAUTHORIZED,
        out,
        "error",
        "login",
        &e.to_string(),
        None,
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    resp
}

fn not_found(out: Format, ty: &str, id: &str) -> Response {
    issue(
        StatusCode::NOT_FOUND,
        out,
        "error",
        "not-found",
        &format!("{ty}/{id} is not known"),
        None,
    )
}

fn unavailable(out: Format, e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "fhir read: the index or the log cannot be read");
    issue(
        StatusCode::SERVICE_UNAVAILABLE,
        out,
        "error",
        "transient",
        "the resource cannot be read now; retry later",
        None,
    )
}

/// The reader of a request, or the answer refusing it.
fn reader(
    st: &ApiState,
    headers: &HeaderMap,
    sender: Option<&AuthenticatedSender>,
    operator: Option<&AuthenticatedOperator>,
    out: Format,
) -> Result<Reader, Box<Response>> {
    if is_jwt(headers) {
        let Some(pull) = &st.pull else {
            return Err(Box::new(unauthorized(out, &PullError::Invalid)));
        };
        let token = bearer(headers).unwrap_or_default();
        return pull
            .verify(token)
            .map(Reader::Exchange)
            .map_err(|e| Box::new(unauthorized(out, &e)));
    }
    Ok(match (sender, operator) {
        (Some(s), _) => Reader::Party(s.0.name.clone(), s.0.party_ids.clone()),
        (None, Some(o)) => Reader::Operator(format!("operator:{}", o.0.name)),
        // The gate let it through without anyone: no operators are configured.
        (None, None) => Reader::Operator("anonymous".into()),
    })
}

fn audit_entry(reader: &Reader, at: &Located) -> ReadAudit {
    ReadAudit(Entry {
        action: "fhir_read".into(),
        actor: reader.actor(),
        party: at.receiver.clone(),
        patient: at.patient.clone(),
        event_id: Some(at.event_id.clone()),
        ..Entry::default()
    })
}

/// The reader of a request and the format to answer in, or the answer refusing it.
fn asked(
    st: &ApiState,
    headers: &HeaderMap,
    sender: Option<&AuthenticatedSender>,
    operator: Option<&AuthenticatedOperator>,
) -> Result<(Reader, Format), Box<Response>> {
    let out = answer_format(headers, Format::FhirJson);
    reader(st, headers, sender, operator, out).map(|r| (r, out))
}

/// 403: a good token, asking for something outside its exchange (whether or not it exists).
fn other_exchange(out: Format) -> Response {
    crate::observe::metrics::rejected("fhir", "pull_outside_exchange");
    issue(
        StatusCode::FORBIDDEN,
        out,
        "error",
        "forbidden",
        "the token is for another exchange: it reads only its own exchange's Task and resources",
        None,
    )
}

type Sender = Option<axum::Extension<AuthenticatedSender>>;
type Operator = Option<axum::Extension<AuthenticatedOperator>>;

async fn read(
    State(st): State<Arc<ApiState>>,
    Path((ty, id)): Path<(String, String)>,
    sender: Sender,
    operator: Operator,
    headers: HeaderMap,
) -> Response {
    let (who, out) = match asked(&st, &headers, sender.as_deref(), operator.as_deref()) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    // The exchange's workflow Task, to its token holder.
    if let (Reader::Exchange(c), Some(pull)) = (&who, &st.pull)
        && ty == "Task"
        && id == c.exchange
    {
        return match pull.workflow_task(&id) {
            Ok(Some(task)) => respond(StatusCode::OK, out, &task),
            Ok(None) => not_found(out, &ty, &id),
            Err(e) => unavailable(out, &e),
        };
    }
    let exchange = matches!(who, Reader::Exchange(_));
    let Some(resources) = &st.resources else {
        return if exchange {
            other_exchange(out)
        } else {
            not_found(out, &ty, &id)
        };
    };
    match resources.read(&ty, &id).await {
        Ok(Found::Resource(r, at)) if who.may_read(&at) => {
            let mut resp = respond(StatusCode::OK, out, &r);
            resp.extensions_mut().insert(audit_entry(&who, &at));
            resp
        }
        Ok(Found::Gone(at)) if who.may_read(&at) => issue(
            StatusCode::GONE,
            out,
            "error",
            "deleted",
            &format!("{ty}/{id} is no longer held (its event was removed by retention)"),
            None,
        ),
        // Outside the token's exchange, known here or not: one answer.
        Ok(_) if exchange => other_exchange(out),
        Ok(_) => not_found(out, &ty, &id),
        Err(e) => unavailable(out, &e),
    }
}

/// `GET /fhir/{Type}?_id=..[&_include=*]`.
async fn search(
    State(st): State<Arc<ApiState>>,
    Path(ty): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    sender: Sender,
    operator: Operator,
    headers: HeaderMap,
) -> Response {
    let (who, out) = match asked(&st, &headers, sender.as_deref(), operator.as_deref()) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let mut id = None;
    let mut include = false;
    for (k, v) in &q {
        match (k.as_str(), v.as_str()) {
            ("_id", v) => id = Some(v.to_owned()),
            ("_include", "*") => include = true,
            _ => {
                return issue(
                    StatusCode::BAD_REQUEST,
                    out,
                    "error",
                    "not-supported",
                    &format!(
                        "search parameter {k} is not supported here (only _id and _include=*)"
                    ),
                    None,
                );
            }
        }
    }
    let Some(id) = id else {
        return issue(
            StatusCode::BAD_REQUEST,
            out,
            "error",
            "required",
            "a search here needs _id",
            None,
        );
    };
    let exchange = matches!(who, Reader::Exchange(_));
    let Some(resources) = &st.resources else {
        if exchange {
            return other_exchange(out);
        }
        return respond(StatusCode::OK, out, &searchset(Vec::new()));
    };
    let (found, at) = match resources.read(&ty, &id).await {
        Ok(Found::Resource(r, at)) if who.may_read(&at) => (r, at),
        // Its own exchange's resource, removed by retention: found no more.
        Ok(Found::Gone(at)) if who.may_read(&at) => {
            return respond(StatusCode::OK, out, &searchset(Vec::new()));
        }
        // Outside the token's exchange, known here or not: one answer.
        Ok(_) if exchange => return other_exchange(out),
        Ok(_) => return respond(StatusCode::OK, out, &searchset(Vec::new())),
        Err(e) => return unavailable(out, &e),
    };
    let mut entries = vec![(found.clone(), "match")];
    if include {
        match resources.of_event(&at.event_id).await {
            Ok(all) => entries.extend(
                all.into_iter()
                    .filter(|r| *r != found)
                    .map(|r| (r, "include")),
            ),
            Err(e) => return unavailable(out, &e),
        }
    }
    let base = st.pull.as_ref().map(|p| p.base_url().to_owned());
    let mut resp = respond(StatusCode::OK, out, &searchset_at(entries, base.as_deref()));
    resp.extensions_mut().insert(audit_entry(&who, &at));
    resp
}

fn searchset(entries: Vec<(Value, &str)>) -> Value {
    searchset_at(entries, None)
}

fn searchset_at(entries: Vec<(Value, &str)>, base: Option<&str>) -> Value {
    let total = entries.iter().filter(|(_, m)| *m == "match").count();
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(r, mode)| {
            let url = base.and_then(|b| {
                Some(format!(
                    "{b}/{}/{}",
                    r.get("resourceType")?.as_str()?,
                    r.get("id")?.as_str()?
                ))
            });
            Object::new()
                .with_opt("fullUrl", url)
                .with("resource", r)
                .with("search", Object::new().with("mode", mode))
                .into()
        })
        .collect();
    Object::new()
        .with("resourceType", "Bundle")
        .with("type", "searchset")
        .with("total", Value::Number(total.to_string()))
        .with_array("entry", entries)
        .into()
}

/// `POST /notified-pull/token`: `grant_type=client_credentials&authorization_base=…`
/// (form-encoded) for a token answer (RFC 6749 section 5.1), or `400 invalid_grant`.
async fn token(State(st): State<Arc<ApiState>>, body: Bytes) -> Response {
    let oauth_error = |status: StatusCode, error: &str, text: &str| {
        (
            status,
            axum::Json(serde_json::json!({ "error": error, "error_description": text })),
        )
            .into_response()
    };
    let Some(pull) = &st.pull else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let form: Vec<(String, String)> = form_urlencoded(&body);
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if field("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    let Some(base) = field("authorization_base").filter(|b| !b.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "authorization_base is required",
        );
    };
    match pull.token(base) {
        Ok(answer) => {
            let mut resp = axum::Json(answer).into_response();
            resp.headers_mut().insert(
                header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("no-store"),
            );
            resp
        }
        Err(PullError::Store(e)) => {
            tracing::error!(error = %e, "notified pull: token store failed");
            oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "retry later",
            )
        }
        Err(e) => {
            crate::observe::metrics::rejected("fhir", "pull_grant_refused");
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &e.to_string())
        }
    }
}

/// Name/value pairs of an `application/x-www-form-urlencoded` body.
fn form_urlencoded(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&s[i + 1..(i + 3).min(s.len())], 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies_decode() {
        let f = form_urlencoded(b"grant_type=client_credentials&authorization_base=a%2Bb+c");
        assert_eq!(f[0], ("grant_type".into(), "client_credentials".into()));
        assert_eq!(f[1], ("authorization_base".into(), "a+b c".into()));
    }
}
