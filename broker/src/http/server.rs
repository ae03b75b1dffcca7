//! The HTTP listener's transport: TLS (rustls) with optional client certificates (mTLS),
//! and the limits every connection lives under (connections, header count and size, time).
//!
//! A small accept loop over hyper's HTTP/1 connection builder rather than `axum::serve` or
//! `axum-server`: it is the one place that sees both the TLS session and the request, so it
//! hands the client certificate's fingerprint to the handlers as a request extension, and
//! it sets hyper's header limits and timeouts, which `axum::serve` does not expose.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// `[http.tls]`: TLS on the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that sign client certificates. With it, clients
    /// are asked for a certificate (mTLS); senders and operators can then be identified by
    /// `cert_sha256`.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse connections without a valid client certificate
    /// (`true`, the default) or let them through to bearer-token authentication (`false`).
    #[serde(default = "yes")]
    pub require_client_cert: bool,
}

fn yes() -> bool {
    true
}

/// `[http.limits]`: what one client may take from the listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections at once; a connection past it gets `503` (plain HTTP) or is closed.
    pub max_connections: usize,
    /// Header fields in one request; more get `431`.
    pub max_headers: usize,
    /// Bytes of the request line and headers together (at least 8 KiB); more get `431`.
    pub max_header_bytes: bytesize::ByteSize,
    /// Time for the TLS handshake and for a request's headers to arrive; the connection is
    /// closed after it.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time for a whole request, body included, to be read and answered; past it `408`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_headers: 64,
            max_header_bytes: bytesize::ByteSize::kib(16),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Problems with these limits as (key under `http.limits`, message).
    #[must_use]
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            p.push((
                "max_connections".into(),
                "must be between 1 and 1000000".into(),
            ));
        }
        if self.max_headers == 0 || self.max_headers > 10_000 {
            p.push(("max_headers".into(), "must be between 1 and 10000".into()));
        }
        if self.max_header_bytes.as_u64() < 8192 {
            p.push(("max_header_bytes".into(), "must be at least 8 KiB".into()));
        }
        if self.header_timeout.is_zero() {
            p.push(("header_timeout".into(), "must be more than 0".into()));
        }
        if self.request_timeout.is_zero() {
            p.push(("request_timeout".into(), "must be more than 0".into()));
        }
        p
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{key}: {message}")]
    File {
        /// Config key naming the file (`cert_file`, `key_file`, `client_ca_file`).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination.
    #[error("{key}: {message}")]
    Rustls {
        /// Config key most likely at fault.
        key: &'static str,
        /// rustls's message.
        message: String,
    },
}

impl TlsError {
    /// The config key under `http.tls` this is about.
    #[must_use]
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::File { key, .. } | TlsError::Rustls { key, .. } => key,
        }
    }

    /// Without working TLS the listener cannot start.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        ketenbus_connectors::ErrorKind::Fatal
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read every certificate of a PEM file.
///
/// # Errors
/// When it cannot be read or holds no certificate.
pub fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File { key, message };
    let bytes = std::fs::read(path)
        .map_err(|e| file_error(format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(file_error(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The rustls server configuration for `cfg`.
///
/// # Errors
/// When a file is unreadable or rustls refuses the certificate, key or CA.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs("cert_file", &cfg.cert_file)?;
    let key_bytes = std::fs::read(&cfg.key_file).map_err(|e| TlsError::File {
        key: "key_file",
        message: format!("cannot read {}: {e}", cfg.key_file.display()),
    })?;
    // The key's own error text could quote key material: name the file only.
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| TlsError::File {
        key: "key_file",
        message: format!("{} holds no PEM private key", cfg.key_file.display()),
    })?;
    let rustls_error = |key: &'static str| {
        move |e: rustls::Error| TlsError::Rustls {
            key,
            message: e.to_string(),
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error("cert_file"))?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("client_ca_file", ca)? {
                roots.add(c).map_err(rustls_error("client_ca_file"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            );
            let verifier = if cfg.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError::Rustls {
                key: "client_ca_file",
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(rustls_error("key_file"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid() {
        assert!(Limits::default().problems().is_empty());
        let bad = Limits {
            max_header_bytes: bytesize::ByteSize::kib(1),
            max_connections: 0,
            ..Limits::default()
        };
        let keys: Vec<String> = bad.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["max_connections", "max_header_bytes"]);
    }

    #[test]
    fn tls_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        let mut cfg = TlsConfig {
            cert_file: c.clone(),
            key_file: k.clone(),
            client_ca_file: None,
            require_client_cert: true,
        };
        server_config(&cfg).expect("a self-signed pair works");
        cfg.client_ca_file = Some(c.clone());
        server_config(&cfg).expect("with a client CA");
        cfg.key_file = c.clone();
        let e = server_config(&cfg).unwrap_err();
        assert_eq!(e.key(), "key_file");
        assert!(!e.to_string().contains("BEGIN"), "{e}");
        cfg.cert_file = dir.path().join("missing.pem");
        assert_eq!(server_config(&cfg).unwrap_err().key(), "cert_file");
    }
}
