//! The REST API: message ingest, lineage, health.
//!
//! `POST /api/v1/messages` answers `202` only after the envelope is durable on the raw topic.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ketenbus_connectors::IngestError;
use ketenbus_connectors::party;
use ketenbus_schemas::{Format, RawEnvelope};
use serde_json::json;

use crate::http::idempotency::{NotTaken, idempotency_key, idempotency_refusal};
use crate::http::state::ApiState;
use crate::observe::lineage::ListQuery;
use ketenbus_schemas::now_ms;

/// The REST routes: messages, lineage, health.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/messages", post(post_message))
        .route("/api/v1/messages", get(list_messages))
        .route("/api/v1/messages/{id}", get(get_message))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn post_message(
    State(st): State<Arc<ApiState>>,
    authenticated: Option<axum::Extension<crate::http::auth::AuthenticatedSender>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(format) = Format::from_media_type(content_type) else {
        crate::observe::metrics::rejected("http", "unsupported_media_type");
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/EDIFACT, application/fhir+json, application/fhir+xml or message/rfc822",
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return too_large(st.max_body),
        Err(e) => return problem(e.status(), "unreadable_body", &e.body_text()),
    };
    if body.is_empty() {
        crate::observe::metrics::rejected("http", "empty_body");
        return problem(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "the message body is empty",
        );
    }
    if body.len() > st.max_body {
        return too_large(st.max_body);
    }
    // One read of what the message declares (off the async workers: it may be large) gives
    // the parties for the envelope and, for an authenticated sender, the check that it posts
    // only in the name of its own parties.
    let declared = {
        let body = body.clone();
        match tokio::task::spawn_blocking(move || party::declared(format, &body)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "reading the message's parties failed");
                return problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ingest_failed",
                    "the message could not be read",
                );
            }
        }
    };
    let mut attributes = BTreeMap::new();
    let mut scope = "anonymous".to_owned();
    let sender = match authenticated {
        Some(axum::Extension(s)) => {
            attributes.insert("authenticated_sender".to_owned(), s.0.name.clone());
            scope.clone_from(&s.0.name);
            match s.check(&declared) {
                Ok(party) => party,
                Err(e) => return crate::http::auth::sender_mismatch(&e),
            }
        }
        None => declared.sender().map(str::to_owned),
    };
    // A retry with the same Idempotency-Key gets the first answer's id.
    let receiver = declared.receiver().map(str::to_owned);
    let taken = st
        .idempotency
        .accept_once(
            st.ingest.as_ref(),
            idempotency_key(&headers),
            &scope,
            &body,
            |id| RawEnvelope {
                id,
                received_at_ms: now_ms(),
                connector: "http".into(),
                format,
                content_type: content_type.to_owned(),
                sender,
                receiver,
                body: body.to_vec(),
                attributes,
            },
        )
        .await;
    match taken {
        Ok(id) => accepted(&id),
        Err(NotTaken::Key(e)) => {
            let (status, code) = idempotency_refusal(&e);
            problem(status, code, &e.to_string())
        }
        Err(NotTaken::Ingest(IngestError::Unavailable(e))) => unavailable(&e),
        Err(NotTaken::Ingest(IngestError::Refused {
            reason: "too_large",
            ..
        })) => too_large(st.max_body),
        Err(NotTaken::Ingest(e)) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ingest_failed",
            &e.to_string(),
        ),
    }
}

/// `202 {"id","location"}` with `Location`.
fn accepted(id: &str) -> Response {
    let location = format!("/api/v1/messages/{id}");
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "location": location })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn too_large(max: usize) -> Response {
    crate::observe::metrics::rejected("http", "too_large");
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        &format!("the message is larger than {max} bytes (http.max_body)"),
    )
}

fn unavailable(e: &str) -> Response {
    tracing::warn!(error = %e, "ingest refused: log unavailable");
    let mut resp = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "log_unavailable",
        "the log cannot take the message now; retry later",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

async fn list_messages(
    State(st): State<Arc<ApiState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "bad_query", &e.body_text()),
    };
    search(&st, q).await
}

/// One page of the messages matching `q`: `GET /api/v1/messages` and the console's search
/// (which takes the filters in a request body, so a patient's BSN is never in a URL).
pub(crate) async fn search(st: &ApiState, q: ListQuery) -> Response {
    match st.lineage.list(q).await {
        Ok(page) => Json(page).into_response(),
        Err(e) => problem(StatusCode::BAD_REQUEST, "bad_query", &e),
    }
}

async fn get_message(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match st.lineage.get(&id).await {
        Ok(Some(l)) => Json(l).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not_found",
            "no message with that id",
        ),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "lineage", &e.to_string()),
    }
}

async fn healthz(State(st): State<Arc<ApiState>>) -> Response {
    let status = if st.health.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "healthy": status == StatusCode::OK, "components": st.health.snapshot() })),
    )
        .into_response()
}

async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    let status = if st.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": status == StatusCode::OK, "components": st.health.snapshot() })),
    )
        .into_response()
}
