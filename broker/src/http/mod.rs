//! The HTTP side: the listener (TLS, limits), authentication, the memory budget, the REST
//! and FHIR write routes, the operator API and the metrics route.

pub mod api;
pub mod auth;
pub mod budget;
pub mod config;
pub mod console;
pub mod fhir;
pub mod idempotency;
pub mod pull;
pub mod server;
pub mod state;
pub mod subscription;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::observe::metrics;
use state::ApiState;

/// Every route the broker serves: the REST API, the FHIR endpoints and `GET /metrics`.
pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.max_body;
    Router::new()
        .merge(api::routes())
        .merge(fhir::routes())
        .merge(pull::routes())
        .route("/metrics", get(metrics_text))
        .route(
            crate::deliver::mitz::NOTIFY_PATH,
            axum::routing::post(mitz_notify),
        )
        // One byte over the limit is enough to know it is too large.
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .with_state(state)
}

/// `POST /consent/mitz/notify`: a consent change notification from Mitz (a FHIR Bundle
/// naming the patient). Authenticated by the `Authorization: Bearer` secret ketenbus put in
/// the subscription's `channel.header`; the cached answers of the patient are dropped.
async fn mitz_notify(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use axum::http::StatusCode;
    let Some(mitz) = &state.mitz else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match mitz.notified(auth, &body) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e @ crate::deliver::mitz::NotifyError::Unauthorized) => {
            tracing::warn!(error = %e, "refused a consent change notification");
            (StatusCode::UNAUTHORIZED, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

/// `GET /metrics`: every metric in the Prometheus text format (version 0.0.4).
async fn metrics_text() -> Response {
    let mut resp = metrics::render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
