//! The HTTP listener's transport: TLS (rustls) with optional client certificates (mTLS),
//! and the limits every connection lives under (connections, header count and size, time).
//!
//! A small accept loop over hyper's HTTP/1 connection builder rather than `axum::serve` or
//! `axum-server`: it is the one place that sees both the TLS session and the request, so it
//! hands the client certificate's fingerprint to the handlers as a request extension, and
//! it sets hyper's header limits and timeouts, which `axum::serve` does not expose.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::http::config::Limits;

/// The client certificate a request came with: hex SHA-256 of its DER bytes, the
/// identity `[[senders]]` and `[[operators]]` name as `cert_sha256`. Present as a request
/// extension only on TLS connections that presented a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Lower-case hex SHA-256 of the leaf certificate.
    pub sha256: String,
}

/// Hex SHA-256 of a certificate's DER bytes (what `cert_sha256` holds).
#[must_use]
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Serve `app` on `listener` until `cancel`, with TLS when `tls` is given and within
/// `limits`. Open connections get up to 10 s to finish after `cancel`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    cancel: CancellationToken,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let limits = Arc::new(limits);
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            crate::observe::metrics::rejected("http", "too_many_connections");
            tracing::debug!(
                max = limits.max_connections,
                "connection refused: too many open"
            );
            let plain = acceptor.is_none();
            tokio::spawn(refuse(tcp, plain));
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, limits, cancel) = (
            app.clone(),
            acceptor.clone(),
            Arc::clone(&limits),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                None => connection(tcp, None, app, &limits, &cancel).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| ClientCert {
                                    sha256: cert_fingerprint(c),
                                });
                            connection(stream, cert, app, &limits, &cancel).await;
                        }
                        Ok(Err(e)) => {
                            crate::observe::metrics::rejected("http", "tls_handshake");
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            crate::observe::metrics::rejected("http", "tls_handshake_timeout");
                            tracing::debug!("TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
    // Wait (bounded) for open connections to finish their requests.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await;
}

/// One HTTP/1 connection under the limits.
async fn connection<I>(
    io: I,
    cert: Option<ClientCert>,
    app: Router,
    limits: &Limits,
    cancel: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request_timeout = limits.request_timeout;
    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        if let Some(c) = &cert {
            req.extensions_mut().insert(c.clone());
        }
        let mut app = app.clone();
        async move {
            let req = req.map(Body::new);
            match tokio::time::timeout(request_timeout, app.call(req)).await {
                Ok(r) => r,
                Err(_) => {
                    crate::observe::metrics::rejected("http", "request_timeout");
                    Ok(request_timed_out(request_timeout))
                }
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(
            usize::try_from(limits.max_header_bytes.as_u64())
                .unwrap_or(usize::MAX)
                .max(8192),
        );
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn request_timed_out(after: Duration) -> Response<Body> {
    let body = serde_json::json!({
        "error": "request_timeout",
        "message": format!(
            "the request was not read and answered within {} (http.limits.request_timeout)",
            humantime::format_duration(after)
        ),
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::REQUEST_TIMEOUT;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

/// Answer a connection past `max_connections`: a 503 on plain HTTP, a close on TLS.
async fn refuse(mut tcp: tokio::net::TcpStream, plain: bool) {
    if plain {
        let body = r#"{"error":"too_many_connections","message":"the listener has http.limits.max_connections open; retry later"}"#;
        let resp = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(resp.as_bytes())).await;
        let _ = tcp.shutdown().await;
    }
}
