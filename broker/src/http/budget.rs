//! The HTTP side of the ingest memory budget ([`ketenbus_connectors::budget`]), as one layer
//! around the whole app (put on where the app is assembled, inside authentication, which reads
//! headers only: a client without credentials hears 401 before a byte of its body is held):
//!
//! - request bodies are read here, frame by frame, and every byte is reserved against the
//!   budget as it arrives (chunked bodies have no `Content-Length` to trust); past the
//!   budget the client hears `503` with `Retry-After` and the rest is not read. A body past
//!   `http.max_body` is cut at one byte more, so the handlers answer `413` as before;
//! - a request with a body is then handled on a small pool of its own (`ketenbus-ingest`
//!   threads), so parsing and checking large messages never holds up the threads that answer
//!   `/healthz`, `/readyz` and `/metrics`;
//! - the reservation is given back once the answer is made (the message is durable or
//!   refused).

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::body::HttpBody as _;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::BytesMut;
use ketenbus_connectors::budget::Budget;

/// Threads of the pool that handles requests with a body.
const INGEST_THREADS: usize = 2;

/// What the layer needs.
struct Gate {
    budget: Budget,
    max_body: usize,
}

/// `app` with every request body held against `budget` and handled off the main workers.
pub fn protect(app: Router, budget: Budget, max_body: usize) -> Router {
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(Gate { budget, max_body }),
        hold,
    ))
}

/// The runtime requests with a body are handled on; it lives as long as the process.
fn ingest_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(INGEST_THREADS)
            // Its blocking work (reading a message's parties, writing a large body) holds a
            // whole message each: a few at once, not one thread per request.
            .max_blocking_threads(2 * INGEST_THREADS)
            .thread_keep_alive(std::time::Duration::from_secs(2))
            .thread_name("ketenbus-ingest")
            .enable_all()
            .build()
            .expect("the ingest thread pool starts")
    })
}

fn over_budget(budget: &Budget) -> Response {
    crate::observe::metrics::rejected("http", "memory_budget");
    tracing::debug!(
        limit = budget.limit(),
        "request refused: ingest memory budget in use"
    );
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({
            "error": "busy",
            "message": "the broker holds as many incoming messages as it may (limits.ingest_memory); retry later",
        })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

async fn hold(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let mut held = gate.budget.reserve(0).expect("nothing always fits");
    let limit = gate.max_body.saturating_add(1);
    // Sized once from a declared length (hyper holds the body to it), so a large body is
    // not copied from buffer to ever larger buffer while it arrives.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(0, |n| n.min(limit));
    if held.grow_to(declared).is_err() {
        return over_budget(&gate.budget);
    }
    let mut bytes = BytesMut::with_capacity(declared);
    let mut body = body;
    while bytes.len() < limit {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        let Some(frame) = frame else {
            break;
        };
        let chunk = match frame.map(|f| f.into_data()) {
            Ok(Ok(c)) => c,
            Ok(Err(_trailers)) => continue,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(serde_json::json!({
                        "error": "unreadable_body",
                        "message": format!("the request body could not be read: {e}"),
                    })),
                )
                    .into_response();
            }
        };
        let keep = chunk.len().min(limit - bytes.len());
        if held.grow_to(bytes.len() + keep).is_err() {
            return over_budget(&gate.budget);
        }
        bytes.extend_from_slice(&chunk[..keep]);
    }
    drop(body);
    let req = Request::from_parts(parts, Body::from(bytes.freeze()));
    if held.held() == 0 {
        // No body: nothing heavy to do (health, metrics, reads).
        return next.run(req).await;
    }
    let handled = ingest_runtime().spawn(async move {
        let resp = next.run(req).await;
        drop(held);
        resp
    });
    match handled.await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "a request handler failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
