//! A receiver of batch webhooks on loopback: records every POST (its JSON array's ids) and
//! answers as the test tells it, per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use tokio::sync::Notify;

/// One POST a batch receiver got.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Request headers (lower-case names).
    pub headers: HashMap<String, String>,
    /// The body as sent (what the signature covers).
    pub body: Bytes,
    /// The elements of the array, parsed.
    pub elements: Vec<serde_json::Value>,
    /// When it arrived (before any answer delay).
    pub at: Instant,
    /// Which request this was (0 for the first).
    pub index: usize,
}

impl Batch {
    /// The record ids of its events, in order.
    #[must_use]
    pub fn ids(&self) -> Vec<String> {
        self.elements
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// A header value.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How to answer one POST.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Body (JSON for a 207).
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// A `Location` header (for a redirect).
    pub location: Option<String>,
}

impl Reply {
    /// `status` with an empty body, at once.
    #[must_use]
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            ..Reply::default()
        }
    }

    /// A `207` naming each `(id, status)`.
    #[must_use]
    pub fn per_event(outcomes: &[(String, u16)]) -> Reply {
        let results: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|(id, s)| serde_json::json!({"id": id, "status": s, "detail": format!("receiver says {s}")}))
            .collect();
        Reply {
            status: 207,
            body: serde_json::to_vec(&serde_json::json!({ "results": results }))
                .unwrap_or_default(),
            ..Reply::default()
        }
    }
}

/// How a batch receiver answers: from the batch it got.
pub type Answer = Arc<dyn Fn(&Batch) -> Reply + Send + Sync>;

struct St {
    got: Mutex<Vec<Batch>>,
    answer: Mutex<Answer>,
    notify: Notify,
}

/// A batch webhook receiver on loopback.
#[derive(Clone)]
pub struct BatchReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    st: Arc<St>,
}

impl std::fmt::Debug for BatchReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchReceiver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl BatchReceiver {
    /// A receiver answering each batch with `answer`.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start(answer: impl Fn(&Batch) -> Reply + Send + Sync + 'static) -> BatchReceiver {
        let st = Arc::new(St {
            got: Mutex::new(Vec::new()),
            answer: Mutex::new(Arc::new(answer)),
            notify: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind batch receiver");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/{*path}", post(take))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(Arc::clone(&st));
        tokio::spawn(async move { axum::serve(listener, app).await });
        BatchReceiver { addr, st }
    }

    /// A receiver answering `200` to every batch.
    pub async fn ok() -> BatchReceiver {
        BatchReceiver::start(|_| Reply::status(200)).await
    }

    /// Its URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}/batch", self.addr)
    }

    /// Answer from now on with `answer`.
    pub fn answer_with(&self, answer: impl Fn(&Batch) -> Reply + Send + Sync + 'static) {
        *self.st.answer.lock().expect("lock") = Arc::new(answer);
    }

    /// Every POST so far, whatever it was answered.
    #[must_use]
    pub fn batches(&self) -> Vec<Batch> {
        self.st.got.lock().expect("lock").clone()
    }

    /// Wait until `check` holds for the batches so far, or `timeout`; the batches then.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        check: impl Fn(&[Batch]) -> bool,
    ) -> Vec<Batch> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.st.notify.notified();
            let got = self.batches();
            if check(&got) || tokio::time::Instant::now() >= deadline {
                return got;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

async fn take(State(st): State<Arc<St>>, headers: HeaderMap, body: Bytes) -> Response {
    let elements = serde_json::from_slice::<Vec<serde_json::Value>>(&body).unwrap_or_default();
    let batch = {
        let mut got = st.got.lock().expect("lock");
        let b = Batch {
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body,
            elements,
            at: Instant::now(),
            index: got.len(),
        };
        got.push(b.clone());
        b
    };
    st.notify.notify_waiters();
    let answer = Arc::clone(&st.answer.lock().expect("lock"));
    let reply = answer(&batch);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, reply.body).into_response();
    if reply.status == 207 {
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(l) = reply.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(axum::http::header::LOCATION, l);
    }
    resp
}
