//! `/fhir/Subscription` (create, read, search, update, delete, `$status`, `$events`) and the
//! topics at `/fhir/Basic`, in `application/fhir+json`.
//!
//! Who may: an operator (or anyone, when no operators are configured and the request
//! carries no sender credentials) for every receiver; an authenticated sender only for
//! Subscriptions whose receiver is one of its own party ids. Everything else hears `403`
//! with an OperationOutcome, as does every other refusal.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ketenbus_connectors::fhir::outcome;
use serde_json::{Value, json};

use crate::deliver::backport::notify::searchset;
use crate::deliver::backport::parse::{self, Refusal};
use crate::deliver::backport::topic::{TOPICS, Topic, notified_pull};
use crate::deliver::backport::{Content, Registration, Registry};
use crate::http::auth::{AuthenticatedOperator, AuthenticatedSender};

/// The routes (their own state: the registry).
pub fn routes(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/fhir/Subscription", get(search).post(create))
        .route(
            "/fhir/Subscription/{id}",
            get(read).put(update).delete(delete),
        )
        .route("/fhir/Subscription/{id}/{operation}", get(operation))
        .route("/fhir/Basic", get(topics))
        .route("/fhir/Basic/{id}", get(topic))
        .with_state(registry)
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, serde_json::to_vec(body).unwrap_or_default()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    resp
}

fn refuse(r: &Refusal) -> Response {
    crate::observe::metrics::rejected("fhir", "subscription_refused");
    let oo = outcome::outcome("error", r.code, &r.text, r.at);
    let body: Value = serde_json::from_slice(&ketenbus_connectors::fhir::json::to_vec(&oo))
        .unwrap_or(Value::Null);
    fhir_json(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
        &body,
    )
}

/// Who asks: a sender's party ids, or `None` for an operator (or open access).
struct Who {
    actor: String,
    parties: Option<Vec<String>>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Who {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Who, Self::Rejection> {
        let operator = parts.extensions.get::<AuthenticatedOperator>();
        let sender = parts.extensions.get::<AuthenticatedSender>();
        Ok(match (operator, sender) {
            (Some(o), _) => Who {
                actor: format!("operator:{}", o.0.name),
                parties: None,
            },
            (None, Some(s)) => Who {
                actor: format!("sender:{}", s.0.name),
                parties: Some(s.0.party_ids.clone()),
            },
            (None, None) => Who {
                actor: "anonymous".into(),
                parties: None,
            },
        })
    }
}

impl Who {
    fn may(&self, receiver: &str) -> Result<(), Refusal> {
        match &self.parties {
            Some(p) if !p.iter().any(|x| x == receiver) => {
                crate::observe::metrics::rejected("fhir", "forbidden");
                Err(Refusal::new(
                    403,
                    "forbidden",
                    "a sender may subscribe only for its own receiver id",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The body as a checked registration.
fn asked(registry: &Registry, headers: &HeaderMap, body: &[u8]) -> Result<Registration, Refusal> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence != "application/fhir+json" && essence != "application/json" {
        return Err(Refusal::new(
            415,
            "not-supported",
            "Content-Type must be application/fhir+json",
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            400,
            "structure",
            format!(
                "the body is not JSON: line {} column {}",
                e.line(),
                e.column()
            ),
        )
    })?;
    registry.checked(&v)
}

async fn create(
    State(registry): State<Arc<Registry>>,
    who: Who,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let asked = asked(&registry, &headers, &body)?;
        who.may(&asked.receiver)?;
        registry.create(asked, &who.actor).await
    }
    .await;
    match result {
        Ok(reg) => {
            let mut resp = fhir_json(StatusCode::CREATED, &parse::subscription(&reg));
            if let Ok(v) =
                HeaderValue::from_str(&format!("{}/Subscription/{}", registry.base(), reg.id))
            {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Err(r) => refuse(&r),
    }
}

/// The Subscription `id`, if `who` may see it.
fn owned(registry: &Registry, who: &Who, id: &str) -> Result<Registration, Refusal> {
    let reg = registry
        .get(id)
        .ok_or_else(|| Refusal::new(404, "not-found", "no such Subscription"))?;
    who.may(&reg.receiver)?;
    Ok(reg)
}

async fn read(State(registry): State<Arc<Registry>>, who: Who, Path(id): Path<String>) -> Response {
    match owned(&registry, &who, &id) {
        Ok(reg) => fhir_json(StatusCode::OK, &parse::subscription(&reg)),
        Err(r) => refuse(&r),
    }
}

async fn search(State(registry): State<Arc<Registry>>, who: Who) -> Response {
    let found = registry
        .all()
        .into_iter()
        .filter(|r| who.may(&r.receiver).is_ok())
        .map(|r| {
            (
                format!("{}/Subscription/{}", registry.base(), r.id),
                parse::subscription(&r),
            )
        })
        .collect();
    fhir_json(StatusCode::OK, &searchset(found))
}

async fn update(
    State(registry): State<Arc<Registry>>,
    who: Who,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        owned(&registry, &who, &id)?;
        let asked = asked(&registry, &headers, &body)?;
        who.may(&asked.receiver)?;
        registry.update(&id, asked, &who.actor).await
    }
    .await;
    match result {
        Ok(reg) => fhir_json(StatusCode::OK, &parse::subscription(&reg)),
        Err(r) => refuse(&r),
    }
}

async fn delete(
    State(registry): State<Arc<Registry>>,
    who: Who,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        owned(&registry, &who, &id)?;
        registry.delete(&id, &who.actor).await
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => refuse(&r),
    }
}

/// `$events` parameters.
#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    #[serde(rename = "eventsSinceNumber")]
    since: Option<u64>,
    #[serde(rename = "eventsUntilNumber")]
    until: Option<u64>,
    content: Option<String>,
}

async fn operation(
    State(registry): State<Arc<Registry>>,
    who: Who,
    Path((id, operation)): Path<(String, String)>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let result = async {
        let reg = owned(&registry, &who, &id)?;
        match operation.as_str() {
            "$status" => registry.status(&reg),
            "$events" => {
                let content = match q.content.as_deref() {
                    None => reg.content,
                    Some(c) => Content::parse(c).ok_or_else(|| {
                        Refusal::new(
                            400,
                            "invalid",
                            "content must be empty, id-only or full-resource",
                        )
                    })?,
                };
                let events = registry
                    .events(
                        &reg,
                        q.since.unwrap_or(1),
                        q.until.unwrap_or(u64::MAX),
                        content,
                    )
                    .await?;
                // What the events carry is patient data: no read without its audit record.
                if content != Content::Empty {
                    registry
                        .audit("fhir_subscription_events", &reg, &who.actor)
                        .await?;
                }
                Ok(events)
            }
            _ => Err(Refusal::new(
                404,
                "not-supported",
                "Subscription operations served: $status, $events",
            )),
        }
    }
    .await;
    match result {
        Ok(b) => fhir_json(StatusCode::OK, &b),
        Err(r) => refuse(&r),
    }
}

/// `GET /fhir/Basic`: the topics (every `Basic` here is a topic): one per event kind, and
/// the topic of Notified Pull notifications in the Backport form.
async fn topics() -> Response {
    let mut found: Vec<(String, Value)> = TOPICS
        .iter()
        .map(|t| (format!("Basic/{}", t.id), t.basic()))
        .collect();
    found.push((
        format!("Basic/{}", notified_pull::ID),
        notified_pull::basic_resource(),
    ));
    fhir_json(StatusCode::OK, &searchset(found))
}

/// `GET /fhir/Basic/{id}`: one topic.
async fn topic(Path(id): Path<String>) -> Response {
    if id == notified_pull::ID {
        return fhir_json(StatusCode::OK, &notified_pull::basic_resource());
    }
    match TOPICS.iter().find(|t: &&Topic| t.id == id) {
        Some(t) => fhir_json(StatusCode::OK, &t.basic()),
        None => refuse(&Refusal::new(404, "not-found", "no such topic")),
    }
}

/// The `Subscription` entry of the CapabilityStatement: the interactions, the Backport
/// profile, each topic's canonical (the Backport extension) and the operations.
#[must_use]
pub fn capability() -> ketenbus_connectors::fhir::Value {
    let interactions: Vec<Value> = ["create", "read", "update", "delete", "search-type"]
        .iter()
        .map(|c| json!({ "code": c }))
        .collect();
    let v = json!({
        "extension": TOPICS.iter().map(|t| json!({
            "url": crate::deliver::backport::EXT_TOPIC_CANONICAL,
            "valueCanonical": t.canonical(),
        })).collect::<Vec<_>>(),
        "type": "Subscription",
        "supportedProfile": [crate::deliver::backport::PROFILE_SUBSCRIPTION],
        "interaction": interactions,
        "operation": [
            { "name": "status", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status" },
            { "name": "events", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events" },
        ],
    });
    ketenbus_connectors::fhir::json::parse(&serde_json::to_vec(&v).unwrap_or_default())
        .unwrap_or(ketenbus_connectors::fhir::Value::Null)
}

/// The `Basic` entry of the CapabilityStatement: the topics, read and searched.
#[must_use]
pub fn topics_capability() -> ketenbus_connectors::fhir::Value {
    let v = json!({
        "type": "Basic",
        "interaction": [{ "code": "read" }, { "code": "search-type" }],
    });
    ketenbus_connectors::fhir::json::parse(&serde_json::to_vec(&v).unwrap_or_default())
        .unwrap_or(ketenbus_connectors::fhir::Value::Null)
}
