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
//!   refused);
//! - on an engine with a body store, a message posted to `POST /api/v1/messages` past
//!   `bus.embedded.large_body` is written to the store as it arrives ([`Spool`]) instead of
//!   being held: only the piece being written counts against the budget, and the handler
//!   finds the body as a [`SpooledBody`] extension (the request body is then empty). Four
//!   25 MiB posts at once hold a few MiB, not 100.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::body::HttpBody as _;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::BytesMut;
use ketenbus_connectors::budget::{Budget, Reservation};

use crate::bus::bodies::{BodyStore, Spool, Spooled};
use crate::http::idempotency::SpooledBody;

/// Threads of the pool that handles requests with a body.
const INGEST_THREADS: usize = 2;

/// Bytes gathered before each write of a spooled body (and all a spool holds in memory).
const SPOOL_WRITE: usize = 1 << 20;

/// The route whose bodies are spooled: the one that takes a message as it is, whole.
const SPOOLED_ROUTE: &str = "/api/v1/messages";

/// What the layer needs.
struct Gate {
    budget: Budget,
    max_body: usize,
    /// Where large message bodies are written as they arrive (engines with a body store).
    bodies: Option<BodyStore>,
}

/// `app` with every request body held against `budget` and handled off the main workers;
/// message bodies past the threshold of `bodies` written there instead of held.
pub fn protect(app: Router, budget: Budget, max_body: usize, bodies: Option<BodyStore>) -> Router {
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(Gate {
            budget,
            max_body,
            bodies,
        }),
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
    retry_later(
        "busy",
        "the broker holds as many incoming messages as it may (limits.ingest_memory); retry later",
    )
}

/// `503` with `Retry-After: 1`: nothing was kept, the sender may try again.
fn retry_later(code: &str, message: &str) -> Response {
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": code, "message": message })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

async fn hold(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let mut held = gate.budget.reserve(0).expect("nothing always fits");
    let limit = gate.max_body.saturating_add(1);
    let spool_to = gate
        .bodies
        .as_ref()
        .filter(|_| parts.method == axum::http::Method::POST && parts.uri.path() == SPOOLED_ROUTE);
    // Sized once from a declared length (hyper holds the body to it), so a large body is
    // not copied from buffer to ever larger buffer while it arrives.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(0, |n| n.min(limit));
    let mut reading = Reading {
        bytes: BytesMut::new(),
        spool: None,
        len: 0,
    };
    if let Some(store) = spool_to.filter(|s| s.takes(declared)) {
        if let Err(resp) = reading.start_spool(store, &mut held, &gate.budget).await {
            return resp;
        }
    } else {
        if held.grow_to(declared).is_err() {
            return over_budget(&gate.budget);
        }
        reading.bytes.reserve(declared);
    }
    let mut body = body;
    while reading.len < limit {
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
        let keep = chunk.len().min(limit - reading.len);
        reading.len += keep;
        if reading.spool.is_none()
            && let Some(store) = spool_to.filter(|s| s.takes(reading.len))
            && let Err(resp) = reading.start_spool(store, &mut held, &gate.budget).await
        {
            return resp;
        }
        if reading.spool.is_none() && held.grow_to(reading.len).is_err() {
            return over_budget(&gate.budget);
        }
        reading.bytes.extend_from_slice(&chunk[..keep]);
        if reading.spool.is_some()
            && reading.bytes.len() >= SPOOL_WRITE
            && let Err(resp) = reading.write().await
        {
            return resp;
        }
    }
    let has_body = reading.len > 0;
    if reading.spool.is_some() && reading.len > gate.max_body {
        // The message route's answer, without making durable what is refused.
        return crate::http::api::too_large(gate.max_body);
    }
    let bytes = match reading.finish().await {
        Ok(Read::Held(bytes)) => bytes,
        Ok(Read::Spooled(spooled)) => {
            parts.extensions.insert(SpooledBody(Arc::new(spooled)));
            BytesMut::new()
        }
        Err(resp) => return resp,
    };
    drop(body);
    let req = Request::from_parts(parts, Body::from(bytes.freeze()));
    if !has_body {
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

/// A request body being read: held in memory, or past the threshold of the body store
/// written there, `bytes` then holding only what waits for the next write.
struct Reading {
    bytes: BytesMut,
    spool: Option<Spool>,
    /// Bytes read so far.
    len: usize,
}

/// A body read whole.
enum Read {
    Held(BytesMut),
    Spooled(Spooled),
}

fn spool_failed(e: &std::io::Error) -> Response {
    tracing::warn!(error = %e, "large body not written");
    crate::observe::metrics::rejected("http", "body_file");
    retry_later(
        "unavailable",
        "the message body could not be stored; retry later",
    )
}

impl Reading {
    /// Go on in a spool of `store`, writing what is held so far; the reservation shrinks to
    /// one write's worth.
    async fn start_spool(
        &mut self,
        store: &BodyStore,
        held: &mut Reservation,
        budget: &Budget,
    ) -> Result<(), Response> {
        let store = store.clone();
        let spool = tokio::task::spawn_blocking(move || store.spool())
            .await
            .map_err(|e| spool_failed(&std::io::Error::other(e.to_string())))?
            .map_err(|e| spool_failed(&e))?;
        self.spool = Some(spool);
        self.write().await?;
        held.release_to(0);
        held.grow_to(SPOOL_WRITE).map_err(|_| over_budget(budget))
    }

    /// Write what is held to the spool, off the async workers.
    async fn write(&mut self) -> Result<(), Response> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let Some(mut spool) = self.spool.take() else {
            return Ok(());
        };
        let bytes = std::mem::take(&mut self.bytes).freeze();
        let (spool, wrote) = tokio::task::spawn_blocking(move || {
            let wrote = spool.write(&bytes);
            (spool, wrote)
        })
        .await
        .map_err(|e| spool_failed(&std::io::Error::other(e.to_string())))?;
        wrote.map_err(|e| spool_failed(&e))?;
        self.spool = Some(spool);
        self.bytes = BytesMut::with_capacity(SPOOL_WRITE);
        Ok(())
    }

    /// The body, whole: held, or written out and durable.
    async fn finish(mut self) -> Result<Read, Response> {
        if self.spool.is_none() {
            return Ok(Read::Held(self.bytes));
        }
        self.write().await?;
        let spool = self.spool.take().expect("spooling");
        let spooled = tokio::task::spawn_blocking(move || spool.finish())
            .await
            .map_err(|e| spool_failed(&std::io::Error::other(e.to_string())))?
            .map_err(|e| spool_failed(&e))?;
        Ok(Read::Spooled(spooled))
    }
}
