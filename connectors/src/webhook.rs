//! Webhook sink: a JSON POST per event (or the original bytes for raw subscriptions), with
//! `Idempotency-Key` = record id and an HMAC-SHA256 signature of the body; or, opted in,
//! many events in one POST ([`batch`]).

pub mod batch;

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::address_book::{Channel, Destination};
use crate::contract::sink::{BoxFuture, Delivery, DeliveryError, Payload, Receipt, Sink};

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>` keyed with the subscription secret.
pub const SIGNATURE_HEADER: &str = "Ketenbus-Signature";
/// Header carrying the record id; receivers drop duplicates on it.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Header carrying the envelope id, for correlation with the lineage API.
pub const ENVELOPE_HEADER: &str = "Ketenbus-Envelope-Id";
/// Header carrying the event kind, or `raw`.
pub const KIND_HEADER: &str = "Ketenbus-Kind";
/// Header carrying the attempt number.
pub const ATTEMPT_HEADER: &str = "Ketenbus-Attempt";

/// A webhook endpoint.
pub struct WebhookSink {
    client: reqwest::Client,
    url: Destination<reqwest::Url>,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink").finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// A sink posting to `url` (fixed, or the receiver's `webhook` address), signing with
    /// `secret` when given.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend).
    pub fn new(
        url: Destination<reqwest::Url>,
        secret: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<WebhookSink, reqwest::Error> {
        WebhookSink::with_roots(url, secret, timeout, None)
    }

    /// A sink posting to `url` that trusts only the CA certificates in `ca_pem` (a PEM
    /// bundle) when given, the public roots otherwise. Server certificates are always
    /// verified.
    ///
    /// # Errors
    /// When the bundle holds no usable certificate or the client cannot be built.
    pub fn with_roots(
        url: Destination<reqwest::Url>,
        secret: Option<Vec<u8>>,
        timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<WebhookSink, reqwest::Error> {
        let client = client(timeout, ca_pem)?;
        Ok(WebhookSink {
            client,
            url,
            secret,
        })
    }
}

/// The HTTP client of a webhook: `timeout` per request, redirects never followed, only the
/// CA certificates in `ca_pem` (a PEM bundle) trusted when given.
fn client(timeout: Duration, ca_pem: Option<&[u8]>) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(64)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("ketenbus/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca_pem {
        builder = builder.tls_built_in_root_certs(false);
        for cert in reqwest::Certificate::from_pem_bundle(pem)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build()
}

/// `sha256=<hex>` of the body keyed with `secret`: what [`SIGNATURE_HEADER`] carries.
#[must_use]
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Body and media type of a delivery as a webhook sends it. A raw message's body is not
/// copied: the buffer shares the envelope (a large message is in memory once per delivery).
///
/// # Errors
/// When the event cannot be written as JSON (not expected for the event types).
pub fn body_of(payload: &Payload) -> Result<(bytes::Bytes, String), DeliveryError> {
    match payload {
        Payload::Event(event) => serde_json::to_vec(event.as_ref())
            .map(|b| (b.into(), "application/json".to_owned()))
            .map_err(|e| DeliveryError::Rejected {
                reason: "encode".into(),
                detail: e.to_string(),
            }),
        Payload::Raw(env) => Ok((
            bytes::Bytes::from_owner(RawBody(std::sync::Arc::clone(env))),
            env.content_type.clone(),
        )),
    }
}

/// A raw envelope's body as the owner of a [`bytes::Bytes`].
struct RawBody(std::sync::Arc<ketenbus_schemas::RawEnvelope>);

impl AsRef<[u8]> for RawBody {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

/// Most bytes of a receiver's answer a failed delivery's detail keeps.
pub const ANSWER_EXCERPT_BYTES: usize = 1024;

/// At most [`ANSWER_EXCERPT_BYTES`] of a receiver's answer `body` as one line of text: cut at
/// a character boundary (never more bytes), invalid UTF-8 replaced, control characters as
/// spaces, surrounding space trimmed.
#[must_use]
pub fn answer_excerpt(body: &[u8]) -> String {
    let head = &body[..body.len().min(ANSWER_EXCERPT_BYTES + 4)];
    let mut out = String::new();
    for c in String::from_utf8_lossy(head).chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > ANSWER_EXCERPT_BYTES {
            break;
        }
        out.push(c);
    }
    out.trim().to_owned()
}

/// The first bytes of `resp`'s body, enough for [`answer_excerpt`]; the rest is not read.
async fn answer_head(mut resp: reqwest::Response) -> Vec<u8> {
    let mut head = Vec::new();
    while head.len() <= ANSWER_EXCERPT_BYTES + 4 {
        match resp.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            _ => break,
        }
    }
    head
}

/// Dead-letter reason of a delivery the receiver answered with a redirect (3xx). Sinks
/// never follow one: it would send the signed body, and patient data, to an address nobody
/// configured, past `allow_plain_http` and `ca_file`. A redirect is the receiver's
/// configuration to fix, so the record is dead-lettered (replay it once the address is right).
pub const REASON_REDIRECT: &str = "redirect";

/// Classify an HTTP status: 2xx ok, 408, 429 and 5xx retry, 3xx (`redirect`) and other 4xx
/// reject.
///
/// # Errors
/// The classified failure for anything but 2xx.
pub fn classify_status(status: u16, detail: String) -> Result<(), DeliveryError> {
    match status {
        200..=299 => Ok(()),
        300..=399 => Err(DeliveryError::Rejected {
            reason: REASON_REDIRECT.into(),
            detail: format!(
                "{detail}: the receiver redirects, and ketenbus does not follow redirects"
            ),
        }),
        429 | 500..=599 | 408 => Err(DeliveryError::Retryable {
            reason: format!("http_{status}"),
            detail,
        }),
        _ => Err(DeliveryError::Rejected {
            reason: format!("http_{status}"),
            detail,
        }),
    }
}

/// `"<code> <reason>"` of an answer's status, e.g. `503 Service Unavailable`.
fn status_line(status: reqwest::StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .trim_end()
    .to_owned()
}

/// What a receiver's answer means for what was sent: 2xx a receipt (the body drained so the
/// connection can be reused, its content not kept); else the classified failure, whose detail
/// keeps what the receiver said, bounded.
async fn outcome_of(resp: reqwest::Response) -> Result<Receipt, DeliveryError> {
    let status = resp.status();
    let line = status_line(status);
    if status.is_success() {
        let _ = resp.bytes().await;
        return Ok(Receipt {
            detail: line,
            origin: None,
        });
    }
    let excerpt = answer_excerpt(&answer_head(resp).await);
    let detail = if excerpt.is_empty() {
        line
    } else {
        format!("{line}: {excerpt}")
    };
    classify_status(status.as_u16(), detail.clone())?;
    Ok(Receipt {
        detail,
        origin: None,
    })
}

fn transport_error(e: &reqwest::Error) -> DeliveryError {
    let reason = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "network"
    };
    DeliveryError::Retryable {
        reason: reason.into(),
        detail: error_chain(e),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

impl Sink for WebhookSink {
    fn deliver<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
        Box::pin(async move {
            let (body, content_type) = body_of(&delivery.payload)?;
            let (kind, envelope_id) = match &delivery.payload {
                Payload::Event(e) => (e.kind().as_str(), e.header().envelope_id.as_str()),
                Payload::Raw(env) => ("raw", env.id.as_str()),
            };
            let (url, origin) = self
                .url
                .resolve(delivery, Channel::Webhook, |s| reqwest::Url::parse(s).ok())?;
            let origin = Some(origin.to_string());
            let mut req = self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .header(IDEMPOTENCY_HEADER, &delivery.record_id)
                .header(ENVELOPE_HEADER, envelope_id)
                .header(KIND_HEADER, kind)
                .header(ATTEMPT_HEADER, delivery.attempt.to_string());
            if let Some(secret) = &self.secret {
                req = req.header(SIGNATURE_HEADER, signature(secret, &body));
            }
            let resp = req
                .body(body)
                .send()
                .await
                .map_err(|e| transport_error(&e))?;
            let mut receipt = outcome_of(resp).await?;
            receipt.origin = origin;
            Ok(receipt)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_body_is_sent_from_the_envelopes_buffer_not_a_copy() {
        let env = std::sync::Arc::new(ketenbus_schemas::RawEnvelope {
            id: "m".into(),
            received_at_ms: 0,
            connector: "http".into(),
            format: ketenbus_schemas::Format::Rfc822,
            content_type: "message/rfc822".into(),
            sender: None,
            receiver: None,
            body: vec![b'x'; 1 << 20],
            attributes: std::collections::BTreeMap::new(),
        });
        let (body, content_type) = body_of(&Payload::Raw(std::sync::Arc::clone(&env))).unwrap();
        assert_eq!(content_type, "message/rfc822");
        assert_eq!(body.len(), env.body.len());
        assert_eq!(
            body.as_ptr(),
            env.body.as_ptr(),
            "one copy of a large body, not two"
        );
        drop(body);
        assert_eq!(
            std::sync::Arc::strong_count(&env),
            1,
            "the buffer goes with the send"
        );
    }

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// A receiver's answer is kept as one line of at most 1 KiB, cut between characters.
    #[test]
    fn answer_excerpts_are_bounded_and_whole_characters() {
        assert_eq!(
            answer_excerpt(b"  {\"error\":\n\"busy\"}\r\n"),
            "{\"error\": \"busy\"}"
        );
        assert_eq!(answer_excerpt(b""), "");
        // 3-byte characters: 1024 is no multiple of 3, so the cut falls inside one.
        let long = "\u{20ac}".repeat(2000);
        let e = answer_excerpt(long.as_bytes());
        assert!(e.len() <= ANSWER_EXCERPT_BYTES, "{}", e.len());
        assert_eq!(e.len(), 1023);
        assert!(e.chars().all(|c| c == '\u{20ac}'));
        let ascii = vec![b'x'; 5000];
        assert_eq!(answer_excerpt(&ascii).len(), ANSWER_EXCERPT_BYTES);
        let mut bad = vec![b'a'; 10];
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(answer_excerpt(&bad), "aaaaaaaaaa\u{fffd}\u{fffd}");
    }

    #[test]
    fn statuses_are_classified() {
        assert!(classify_status(204, String::new()).is_ok());
        assert!(matches!(
            classify_status(429, String::new()),
            Err(DeliveryError::Retryable { .. })
        ));
        assert!(matches!(
            classify_status(503, String::new()),
            Err(DeliveryError::Retryable { .. })
        ));
        let err = classify_status(404, "404 Not Found".into()).unwrap_err();
        assert_eq!(err.reason(), "http_404");
        assert!(matches!(err, DeliveryError::Rejected { .. }));
        for status in [301, 302, 303, 307, 308] {
            let err = classify_status(status, format!("{status}")).unwrap_err();
            assert_eq!(err.reason(), REASON_REDIRECT);
            assert!(matches!(err, DeliveryError::Rejected { .. }));
        }
    }
}
