//! The batch webhook: the events of many deliveries in one signed POST of a JSON array, and
//! per-event outcomes when the receiver reports them.
//!
//! Each delivery still comes from its own lane and gets its own result, so everything a
//! subscription does per event (order per patient, consent, lineage, audit, retries, dead
//! letters, metrics) stays as it is for a single webhook: the sink only gathers what the
//! lanes hand it at the same time. The first delivery to arrive opens a batch and *leads*
//! it: it waits until the batch is full (`max_events`, or the next event would take the
//! body past `max_bytes`) or `max_wait` has passed, then posts it and hands every member its
//! outcome. No task of its own: a batch lives in the futures of its members.
//!
//! The body is `[element, ...]`, each element
//! `{"id": <record id>, "envelope_id", "kind", "attempt", "event": <the event's JSON>}`
//! (`"content_type"` and `"body_base64"` instead of `"event"` for raw messages). The answer:
//! - `207` with `{"results": [{"id": <record id>, "status": <HTTP status>, "detail": "..."}]}`:
//!   each named event's status is classified like a single webhook's answer (2xx delivered;
//!   408, 429 and 5xx retried; 3xx `redirect` and other 4xx dead-lettered, reason
//!   `http_<status>`); an event the answer does not name is retried (`batch_unanswered`);
//!   ids that were not in the batch are ignored; a status outside 200-599 retries that event
//!   (`batch_answer`). A body that is not that JSON, or longer than [`MAX_ANSWER_BYTES`],
//!   retries the whole batch (`batch_answer`).
//! - any other status, a timeout or a network error: counts for every event of the batch as
//!   it would for a single webhook (so 5xx, 408, 429, timeouts retry the whole batch).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use super::{
    SIGNATURE_HEADER, answer_excerpt, classify_status, outcome_of, signature, status_line,
    transport_error,
};
use crate::contract::sink::{BoxFuture, Delivery, DeliveryError, Payload, Receipt, Sink};

/// Header carrying the number of events in the body.
pub const BATCH_HEADER: &str = "Ketenbus-Batch-Size";

/// The longest per-event answer (`207`) read: more is a malformed answer, the batch retried.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Reason of an event the receiver's `207` did not name: retried.
pub const REASON_UNANSWERED: &str = "batch_unanswered";

/// Reason of events whose per-event answer could not be read: retried.
pub const REASON_BAD_ANSWER: &str = "batch_answer";

/// When a batch is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// At most this many events in one POST.
    pub max_events: usize,
    /// A body of two or more events stays at most this long; one event larger than this
    /// goes alone.
    pub max_bytes: usize,
    /// The longest a batch waits for more events after its first.
    pub max_wait: Duration,
}

/// A webhook endpoint that takes events in batches.
pub struct BatchWebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
    limits: BatchLimits,
    /// The batch open for more events.
    open: Mutex<Option<Arc<Gathering>>>,
}

impl std::fmt::Debug for BatchWebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchWebhookSink")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// One member of a batch: its element of the body and where its outcome goes.
struct Member {
    id: String,
    element: Vec<u8>,
    outcome: oneshot::Sender<Result<Receipt, DeliveryError>>,
}

/// A batch being gathered.
#[derive(Default)]
struct Gathering {
    members: Mutex<Vec<Member>>,
    /// Body bytes so far (elements, commas and brackets).
    bytes: Mutex<usize>,
    /// Told when the batch is closed before its time: full, or the next event did not fit.
    closed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One event as an element of a batch body.
#[derive(Serialize)]
struct Element<'a> {
    id: &'a str,
    envelope_id: &'a str,
    kind: &'a str,
    attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a ketenbus_schemas::Event>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

/// The element of `delivery` in a batch body.
///
/// # Errors
/// When the event cannot be written as JSON (not expected for the event types).
pub fn element_of(delivery: &Delivery) -> Result<Vec<u8>, DeliveryError> {
    use base64::Engine as _;
    let e = match &delivery.payload {
        Payload::Event(event) => Element {
            id: &delivery.record_id,
            envelope_id: &event.header().envelope_id,
            kind: event.kind().as_str(),
            attempt: delivery.attempt,
            event: Some(event.as_ref()),
            content_type: None,
            body_base64: None,
        },
        Payload::Raw(env) => Element {
            id: &delivery.record_id,
            envelope_id: &env.id,
            kind: "raw",
            attempt: delivery.attempt,
            event: None,
            content_type: Some(&env.content_type),
            body_base64: Some(base64::engine::general_purpose::STANDARD.encode(&env.body)),
        },
    };
    serde_json::to_vec(&e).map_err(|e| DeliveryError::Rejected {
        reason: "encode".into(),
        detail: e.to_string(),
    })
}

/// A receiver's per-event answer (`207`).
#[derive(Deserialize)]
struct Answer {
    results: Vec<EventAnswer>,
}

/// One event's outcome in a receiver's answer.
#[derive(Deserialize)]
struct EventAnswer {
    id: String,
    status: u16,
    #[serde(default)]
    detail: Option<String>,
}

impl BatchWebhookSink {
    /// A sink posting batches to `url`, signing each body with `secret` when given, trusting
    /// only the CA certificates in `ca_pem` when given.
    ///
    /// # Errors
    /// When the bundle holds no usable certificate or the client cannot be built.
    pub fn new(
        url: reqwest::Url,
        secret: Option<Vec<u8>>,
        timeout: Duration,
        ca_pem: Option<&[u8]>,
        limits: BatchLimits,
    ) -> Result<BatchWebhookSink, reqwest::Error> {
        let client = super::client(timeout, ca_pem)?;
        Ok(BatchWebhookSink {
            client,
            url,
            secret,
            limits,
            open: Mutex::new(None),
        })
    }

    /// Add an element to the open batch (or open one); the batch and whether this call
    /// leads it (opened it, so waits for it and posts it).
    fn join(&self, member: Member) -> (Arc<Gathering>, bool) {
        let size = member.element.len();
        let mut open = lock(&self.open);
        if let Some(g) = open.as_ref() {
            let mut bytes = lock(&g.bytes);
            if *bytes + 1 + size <= self.limits.max_bytes {
                *bytes += 1 + size;
                drop(bytes);
                let mut members = lock(&g.members);
                members.push(member);
                let full = members.len() >= self.limits.max_events;
                drop(members);
                let g = Arc::clone(g);
                if full {
                    *open = None;
                    g.closed.notify_one();
                }
                return (g, false);
            }
            drop(bytes);
            // The next event does not fit: that batch goes now, this one opens the next.
            if let Some(g) = open.take() {
                g.closed.notify_one();
            }
        }
        let g = Arc::new(Gathering::default());
        *lock(&g.bytes) = 2 + size;
        lock(&g.members).push(member);
        if self.limits.max_events > 1 && 2 + size < self.limits.max_bytes {
            *open = Some(Arc::clone(&g));
        } else {
            g.closed.notify_one(); // nothing more fits: it goes at once
        }
        (g, true)
    }

    /// Lead batch `g`: wait until it is closed or `max_wait` has passed, then post it.
    async fn lead(&self, g: Arc<Gathering>) {
        let _ = tokio::time::timeout(self.limits.max_wait, g.closed.notified()).await;
        {
            let mut open = lock(&self.open);
            if open.as_ref().is_some_and(|o| Arc::ptr_eq(o, &g)) {
                *open = None;
            }
        }
        let members = std::mem::take(&mut *lock(&g.members));
        self.post(members).await;
    }

    /// Post `members` as one body; each gets its outcome.
    async fn post(&self, members: Vec<Member>) {
        let mut body =
            Vec::with_capacity(members.iter().map(|m| m.element.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&m.element);
        }
        body.push(b']');
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(BATCH_HEADER, members.len().to_string());
        if let Some(secret) = &self.secret {
            req = req.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        let outcome = match req.body(body).send().await {
            Ok(resp) => answer(resp).await,
            Err(e) => Outcome::Whole(Err(transport_error(&e))),
        };
        match outcome {
            Outcome::Whole(result) => {
                for m in members {
                    let _ = m.outcome.send(result.clone());
                }
            }
            Outcome::PerEvent(mut answers) => {
                for m in members {
                    let result = answers.remove(&m.id).unwrap_or_else(|| {
                        Err(DeliveryError::Retryable {
                            reason: REASON_UNANSWERED.into(),
                            detail: "207 Multi-Status: the answer does not name this event".into(),
                        })
                    });
                    let _ = m.outcome.send(result);
                }
            }
        }
    }
}

/// What a receiver's answer means for the events of a batch.
enum Outcome {
    /// The same for each.
    Whole(Result<Receipt, DeliveryError>),
    /// Per record id, from a `207`.
    PerEvent(std::collections::HashMap<String, Result<Receipt, DeliveryError>>),
}

/// Read a receiver's answer to a batch.
async fn answer(mut resp: reqwest::Response) -> Outcome {
    let status = resp.status();
    if status.as_u16() != 207 {
        return Outcome::Whole(outcome_of(resp).await);
    }
    let line = status_line(status);
    // A per-event answer: read at most MAX_ANSWER_BYTES of it.
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Outcome::Whole(Err(DeliveryError::Retryable {
                        reason: REASON_BAD_ANSWER.into(),
                        detail: format!(
                            "{line}: the per-event answer is longer than {MAX_ANSWER_BYTES} bytes"
                        ),
                    }));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Outcome::Whole(Err(transport_error(&e))),
        }
    }
    let parsed: Answer = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return Outcome::Whole(Err(DeliveryError::Retryable {
                reason: REASON_BAD_ANSWER.into(),
                detail: format!("{line}: the per-event answer is not ketenbus's batch answer: {e}"),
            }));
        }
    };
    let mut answers = std::collections::HashMap::with_capacity(parsed.results.len());
    for a in parsed.results {
        if answers.contains_key(&a.id) {
            continue; // the first answer for an id counts
        }
        let detail = match a.detail.as_deref().map(|d| answer_excerpt(d.as_bytes())) {
            Some(d) if !d.is_empty() => format!("{line}: event {}: {d}", a.status),
            _ => format!("{line}: event {}", a.status),
        };
        let result = if (200..=599).contains(&a.status) {
            classify_status(a.status, detail.clone()).map(|()| Receipt {
                detail,
                origin: Some(crate::address_book::Origin::Fixed.to_string()),
            })
        } else {
            Err(DeliveryError::Retryable {
                reason: REASON_BAD_ANSWER.into(),
                detail: format!("{detail}: not an HTTP status"),
            })
        };
        answers.insert(a.id, result);
    }
    Outcome::PerEvent(answers)
}

impl Sink for BatchWebhookSink {
    fn deliver<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
        Box::pin(async move {
            let element = element_of(delivery)?;
            let (tx, rx) = oneshot::channel();
            let (g, leads) = self.join(Member {
                id: delivery.record_id.clone(),
                element,
                outcome: tx,
            });
            if leads {
                self.lead(g).await;
            }
            rx.await.unwrap_or_else(|_| {
                Err(DeliveryError::Retryable {
                    reason: REASON_UNANSWERED.into(),
                    detail: "the batch was not sent (stopping)".into(),
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test
    use super::*;

    fn sink(max_events: usize, max_bytes: usize) -> BatchWebhookSink {
        BatchWebhookSink::new(
            "http://127.0.0.1:1/".parse().unwrap(),
            None,
            Duration::from_secs(1),
            None,
            BatchLimits {
                max_events,
                max_bytes,
                max_wait: Duration::from_secs(1),
            },
        )
        .unwrap()
    }

    fn member(len: usize) -> Member {
        Member {
            id: String::new(),
            element: vec![b'x'; len],
            outcome: oneshot::channel().0,
        }
    }

    /// Full at `max_events`: the batch is closed (its leader told) and the next opens anew.
    #[tokio::test]
    async fn a_batch_closes_at_max_events() {
        let s = sink(3, 1 << 20);
        let (first, leads) = s.join(member(10));
        assert!(leads);
        assert!(!s.join(member(10)).1);
        let (same, leads) = s.join(member(10));
        assert!(!leads && Arc::ptr_eq(&first, &same));
        assert!(s.open.lock().unwrap().is_none(), "closed when full");
        tokio::time::timeout(Duration::from_millis(50), first.closed.notified())
            .await
            .expect("its leader is told at once");
        assert_eq!(first.members.lock().unwrap().len(), 3);
        assert!(s.join(member(10)).1, "the next event leads a new batch");
    }

    /// `max_bytes` counts the brackets and commas: `[a,b]` with 10-byte elements is 23 bytes.
    #[tokio::test]
    async fn a_batch_closes_before_max_bytes_and_a_large_event_goes_alone() {
        let s = sink(100, 23);
        let (first, _) = s.join(member(10));
        assert!(!s.join(member(10)).1, "23 bytes fit");
        let (second, leads) = s.join(member(10));
        assert!(leads, "34 bytes do not: a new batch");
        assert!(!Arc::ptr_eq(&first, &second));
        tokio::time::timeout(Duration::from_millis(50), first.closed.notified())
            .await
            .expect("the full one goes now");
        assert_eq!(*first.bytes.lock().unwrap(), 23);
        // Larger than max_bytes alone: a batch of one, closed at birth.
        let (alone, leads) = s.join(member(50));
        assert!(leads);
        tokio::time::timeout(Duration::from_millis(50), alone.closed.notified())
            .await
            .expect("sent at once");
        assert!(s.open.lock().unwrap().is_none());
        assert!(s.join(member(1)).1);
    }

    /// An event's element: its id, envelope, kind and attempt, and the event's own JSON.
    #[test]
    fn an_element_carries_the_single_webhooks_json() {
        let header = ketenbus_schemas::EventHeader::new(
            ketenbus_schemas::EventKind::Letter,
            "env-1",
            0,
            "edifact",
        );
        let event =
            ketenbus_schemas::Event::Letter(ketenbus_schemas::event::LetterEvent::new(header));
        let d = Delivery {
            subscription: Arc::from("s"),
            record_id: "env-1.0".into(),
            payload: Payload::Event(Arc::new(event.clone())),
            attempt: 2,
            position: None,
        };
        let e: serde_json::Value = serde_json::from_slice(&element_of(&d).unwrap()).unwrap();
        assert_eq!(e["id"], "env-1.0");
        assert_eq!(e["envelope_id"], "env-1");
        assert_eq!(e["kind"], "letter");
        assert_eq!(e["attempt"], 2);
        let single: serde_json::Value =
            serde_json::from_slice(&super::super::body_of(&d.payload).unwrap().0).unwrap();
        assert_eq!(e["event"], single);
    }
}
