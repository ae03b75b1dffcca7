//! FHIR sink: delivers events to a subscriber's FHIR endpoint as nl-core resources in a
//! transaction Bundle (`POST [base]`) or a message Bundle (`POST [base]/$process-message`).
//! Answers are classified like the webhook sink's; a returned OperationOutcome's issues
//! become the failure detail.

use std::time::Duration;

use ketenbus_schemas::Format;

use base64::Engine as _;

use super::emit::{BundleStyle, CONTENT_URN, EmitOptions, to_bundle};
use super::outcome::issue_text;
use super::value::Value;
use super::{MEDIA_JSON, MEDIA_XML};
use crate::address_book::{Channel, Destination, Origin};
use crate::contract::sink::{BoxFuture, Delivery, DeliveryError, Payload, Receipt, Sink};
use crate::webhook::{ATTEMPT_HEADER, IDEMPOTENCY_HEADER, KIND_HEADER, classify_status};

/// A subscriber's FHIR endpoint.
pub struct FhirSink {
    client: reqwest::Client,
    base: Destination<reqwest::Url>,
    style: BundleStyle,
    source_endpoint: Option<String>,
    bearer: Option<String>,
    attachments: Option<AttachmentSource>,
}

/// Looks up attachment bytes by hex SHA-256 (the content store), so the Bundle can carry
/// them inline instead of ketenbus's `urn:ketenbus:content:sha256:` pointer.
pub type AttachmentSource = std::sync::Arc<dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync>;

impl std::fmt::Debug for FhirSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = match &self.base {
            Destination::Fixed(u) => u.as_str(),
            Destination::Receiver(_) => "<receiver's address-book entry>",
        };
        f.debug_struct("FhirSink")
            .field("base", &base)
            .field("style", &self.style)
            .finish()
    }
}

impl FhirSink {
    /// A sink posting to the FHIR server at `base` (fixed, or the receiver's `fhir`
    /// address) in `style`. `source_endpoint` is ketenbus's own FHIR base, written into
    /// message headers.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend).
    pub fn new(
        base: Destination<reqwest::Url>,
        style: BundleStyle,
        source_endpoint: Option<String>,
        timeout: Duration,
    ) -> Result<FhirSink, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(64)
            // A 3xx is a failed delivery (`redirect`), never followed: see the webhook sink.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ketenbus/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(FhirSink {
            client,
            base,
            style,
            source_endpoint,
            bearer: None,
            attachments: None,
        })
    }

    /// Send `Authorization: Bearer <token>` (the token comes from the environment, never
    /// from the config file).
    #[must_use]
    pub fn with_bearer(mut self, token: Option<String>) -> FhirSink {
        self.bearer = token;
        self
    }

    /// Inline attachments found through `source` (bytes by hex SHA-256).
    #[must_use]
    pub fn with_attachments(mut self, source: AttachmentSource) -> FhirSink {
        self.attachments = Some(source);
        self
    }

    /// Replace content pointers by the bytes, where the source has them.
    fn inline_attachments(&self, bundle: &mut Value) {
        if let Some(source) = &self.attachments {
            inline_attachments(bundle, source);
        }
    }
}

/// Replace the content pointers of a Bundle's DocumentReferences by the bytes, where
/// `source` has them: a pointer means nothing outside this broker (and a receiving ketenbus
/// refuses one).
pub(crate) fn inline_attachments(bundle: &mut Value, source: &AttachmentSource) {
    let Value::Object(b) = bundle else { return };
    let Some(Value::Array(entries)) = b.get_mut("entry") else {
        return;
    };
    for entry in entries {
        if let Value::Object(e) = entry
            && let Some(res) = e.get_mut("resource")
        {
            inline_resource_attachments(res, source);
        }
    }
}

/// Replace the content pointers of one DocumentReference by the bytes, where `source` has
/// them (a resource served on its own carries its document as a Bundle entry would).
pub fn inline_resource_attachments(resource: &mut Value, source: &AttachmentSource) {
    let Value::Object(res) = resource else { return };
    let Some(Value::Array(content)) = res.get_mut("content") else {
        return;
    };
    for c in content {
        let Some(Value::Object(att)) = (match c {
            Value::Object(c) => c.get_mut("attachment"),
            _ => None,
        }) else {
            continue;
        };
        let Some(hash) = att
            .str("url")
            .and_then(|u| u.strip_prefix(CONTENT_URN))
            .map(str::to_owned)
        else {
            continue;
        };
        if let Some(bytes) = source(&hash) {
            att.remove("url");
            att.insert(
                "data",
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
    }
}

impl FhirSink {
    /// Where a delivery goes, and how its Bundle names that endpoint.
    fn target(
        &self,
        delivery: &Delivery,
    ) -> Result<(reqwest::Url, EmitOptions, Origin), DeliveryError> {
        let (base, origin) = self
            .base
            .resolve(delivery, Channel::Fhir, |s| reqwest::Url::parse(s).ok())?;
        let base_str = base.as_str().trim_end_matches('/').to_owned();
        let url = match self.style {
            BundleStyle::Transaction => Some(base),
            BundleStyle::Message => {
                reqwest::Url::parse(&format!("{base_str}/$process-message")).ok()
            }
        }
        .ok_or_else(|| DeliveryError::Rejected {
            reason: "no_address".into(),
            detail: "the FHIR base URL cannot take $process-message".into(),
        })?;
        let opts = EmitOptions {
            style: self.style,
            source_endpoint: self.source_endpoint.clone(),
            destination_endpoint: Some(base_str),
        };
        Ok((url, opts, origin))
    }

    /// Body and media type for a delivery.
    fn body(
        &self,
        payload: &Payload,
        opts: &EmitOptions,
    ) -> Result<(Vec<u8>, &'static str), DeliveryError> {
        match payload {
            Payload::Event(e) => {
                let mut bundle = to_bundle(e, opts).map_err(|e| DeliveryError::Rejected {
                    reason: "no_fhir_form".into(),
                    detail: e.to_string(),
                })?;
                self.inline_attachments(&mut bundle);
                Ok((super::json::to_vec(&bundle), MEDIA_JSON))
            }
            Payload::Raw(env) => match env.format {
                Format::FhirJson => Ok((env.body.clone(), MEDIA_JSON)),
                Format::FhirXml => Ok((env.body.clone(), MEDIA_XML)),
                other => Err(DeliveryError::Rejected {
                    reason: "not_fhir".into(),
                    detail: format!(
                        "raw {} envelopes cannot go to a FHIR endpoint",
                        other.as_str()
                    ),
                }),
            },
        }
    }
}

/// Classify a FHIR server's answer: the HTTP status first, then a message response's
/// `MessageHeader.response.code` (`transient-error` retries, `fatal-error` rejects).
///
/// # Errors
/// The classified failure, with the OperationOutcome's issues as detail when there are any.
pub fn classify_answer(status: u16, body: &[u8]) -> Result<String, DeliveryError> {
    let parsed = super::json::parse(body)
        .ok()
        .or_else(|| super::xml::parse(body).ok());
    let line = format!(
        "{status} {}",
        reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
    )
    .trim_end()
    .to_owned();
    let issues = parsed.as_ref().and_then(|v| {
        issue_text(v).or_else(|| {
            // A response Bundle may carry the outcome in its entries.
            v.get("entry")?
                .as_array()?
                .iter()
                .filter_map(|e| e.get("resource"))
                .find_map(issue_text)
        })
    });
    let detail = issues
        .as_ref()
        .map_or_else(|| line.clone(), |i| format!("{line}: {i}"));
    classify_status(status, detail.clone())?;
    if let Some(v) = &parsed {
        let code = v
            .get("entry")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
            .and_then(|e| e.get("resource"))
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("MessageHeader"))
            .and_then(|mh| mh.get("response"))
            .and_then(|r| r.get("code"))
            .and_then(Value::as_str);
        match code {
            Some("transient-error") => {
                return Err(DeliveryError::Retryable {
                    reason: "fhir_transient_error".into(),
                    detail,
                });
            }
            Some("fatal-error") => {
                return Err(DeliveryError::Rejected {
                    reason: "fhir_fatal_error".into(),
                    detail,
                });
            }
            _ => {}
        }
    }
    Ok(line)
}

impl Sink for FhirSink {
    fn deliver<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
        Box::pin(async move {
            let (url, opts, origin) = self.target(delivery)?;
            let (body, media) = self.body(&delivery.payload, &opts)?;
            let kind = match &delivery.payload {
                Payload::Event(e) => e.kind().as_str(),
                Payload::Raw(_) => "raw",
            };
            let mut req = self.client.post(url);
            if let Some(token) = &self.bearer {
                req = req.bearer_auth(token);
            }
            let resp = req
                .header(reqwest::header::CONTENT_TYPE, media)
                .header(reqwest::header::ACCEPT, MEDIA_JSON)
                .header(IDEMPOTENCY_HEADER, &delivery.record_id)
                .header(KIND_HEADER, kind)
                .header(ATTEMPT_HEADER, delivery.attempt.to_string())
                .body(body)
                .send()
                .await
                .map_err(|e| transport_error(&e))?;
            let status = resp.status().as_u16();
            let answer = resp.bytes().await.unwrap_or_default();
            let line = classify_answer(status, &answer)?;
            Ok(Receipt {
                detail: line,
                origin: Some(origin.to_string()),
            })
        })
    }
}

fn transport_error(e: &reqwest::Error) -> DeliveryError {
    let reason = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "network"
    };
    let mut detail = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        detail.push_str(": ");
        detail.push_str(&inner.to_string());
        cur = inner.source();
    }
    DeliveryError::Retryable {
        reason: reason.into(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ketenbus_schemas::Event;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn answers_are_classified_with_the_outcome_as_detail() {
        let oo = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"Observation.code is required"}]}"#;
        let err = classify_answer(422, oo).unwrap_err();
        assert_eq!(err.reason(), "http_422");
        assert!(matches!(err, DeliveryError::Rejected { .. }));
        assert_eq!(
            err.detail(),
            "422 Unprocessable Entity: error invalid: Observation.code is required"
        );
        assert!(matches!(
            classify_answer(503, b""),
            Err(DeliveryError::Retryable { .. })
        ));
        assert!(matches!(
            classify_answer(429, oo),
            Err(DeliveryError::Retryable { .. })
        ));
        assert_eq!(
            classify_answer(
                200,
                br#"{"resourceType":"Bundle","type":"transaction-response"}"#
            )
            .unwrap(),
            "200 OK"
        );
        let transient = br#"{"resourceType":"Bundle","type":"message","entry":[{"resource":{"resourceType":"MessageHeader","response":{"identifier":"x","code":"transient-error"}}}]}"#;
        assert_eq!(
            classify_answer(200, transient).unwrap_err().reason(),
            "fhir_transient_error"
        );
    }

    /// A one-shot HTTP server on loopback: answers `status` with `body`, hands back the request.
    async fn serve_once(
        status: u16,
        body: &'static str,
    ) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req);
                if let Some(h) = text.find("\r\n\r\n") {
                    let len = text[..h]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if req.len() >= h + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
            req
        });
        (format!("http://{addr}/fhir"), task)
    }

    fn delivery() -> Delivery {
        let env = crate::fhir::golden_tests::az_envelope();
        let events = crate::Normalise::normalise(&crate::fhir::FhirNormaliser, &env).unwrap();
        Delivery {
            subscription: "hap".into(),
            record_id: events[0].header().id.clone(),
            payload: Payload::Event(Arc::new(events[0].clone())),
            attempt: 1,
            position: None,
        }
    }

    #[tokio::test]
    async fn posts_a_message_bundle_to_process_message() {
        let (base, server) = serve_once(200, r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#).await;
        let sink = FhirSink::new(
            Destination::Fixed(base.parse().unwrap()),
            BundleStyle::Message,
            Some("https://ketenbus.example/fhir".into()),
            Duration::from_secs(5),
        )
        .unwrap();
        let receipt = sink.deliver(&delivery()).await.unwrap();
        assert_eq!(receipt.detail, "200 OK");
        let req = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(
            req.starts_with("POST /fhir/$process-message HTTP/1.1"),
            "{}",
            &req[..60]
        );
        assert!(
            req.to_ascii_lowercase()
                .contains("content-type: application/fhir+json")
        );
        let body = &req[req.find("\r\n\r\n").unwrap() + 4..];
        let bundle = crate::fhir::json::parse(body.as_bytes()).unwrap();
        assert_eq!(bundle.get("type").and_then(Value::as_str), Some("message"));
    }

    #[test]
    fn attachments_are_inlined_from_the_content_store() {
        let sink = FhirSink::new(
            Destination::Fixed("http://127.0.0.1:9/fhir".parse().unwrap()),
            BundleStyle::Message,
            None,
            Duration::from_secs(1),
        )
        .unwrap()
        .with_attachments(Arc::new(|hash: &str| {
            (hash == hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"%PDF-1.4\n")))
                .then(|| b"%PDF-1.4\n".to_vec())
        }));
        let (_, opts, _) = sink.target(&delivery()).unwrap();
        let (body, _) = sink.body(&delivery().payload, &opts).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains(r#""data":"JVBERi0xLjQK""#), "{text}");
        assert!(!text.contains("urn:ketenbus:content"));
        // Read back, the attachment has the same hash and size as the original message's.
        let events = crate::fhir::inbound::events_from(
            &crate::fhir::json::parse(&body).unwrap(),
            "x",
            "fhir_json",
        )
        .unwrap();
        let Event::AcuteHandover(h) = &events[0] else {
            panic!("handover expected")
        };
        assert_eq!(h.attachments[0].size, 9);
    }

    #[tokio::test]
    async fn a_refusal_carries_the_receivers_issue_text() {
        let (base, server) = serve_once(422, r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"unknown patient"}]}"#).await;
        let sink = FhirSink::new(
            Destination::Fixed(base.parse().unwrap()),
            BundleStyle::Transaction,
            None,
            Duration::from_secs(5),
        )
        .unwrap()
        .with_bearer(Some("t0ken".into()));
        let err = sink.deliver(&delivery()).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Rejected { .. }));
        assert_eq!(
            err.detail(),
            "422 Unprocessable Entity: error processing: unknown patient"
        );
        let req = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(req.starts_with("POST /fhir HTTP/1.1"));
        assert!(
            req.to_ascii_lowercase()
                .contains("authorization: bearer t0ken")
        );
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let sink = FhirSink::new(
            Destination::Fixed(format!("http://{addr}/fhir").parse().unwrap()),
            BundleStyle::Transaction,
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        let err = sink.deliver(&delivery()).await.unwrap_err();
        assert_eq!(err.reason(), "connect");
    }
}
