//! `[http]`: the listener's address, body size, TLS and connection limits, and their check.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use crate::env::Problem;
use crate::tls::{TlsError, read_certs};

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest message body accepted; larger ones get 413.
    pub max_body: bytesize::ByteSize,
    /// Longest wait for the log to make a message durable before answering 503. On Kafka it
    /// must be longer than `bus.kafka.delivery_timeout`, so a 503 means "not stored".
    #[serde(with = "humantime_serde")]
    pub ingest_timeout: Duration,
    /// TLS on the listener (`[http.tls]`); without it the listener speaks plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Plain HTTP on a non-loopback address. Off by default: such a listener needs
    /// `[http.tls]` or this set to `true` (which logs a warning at start-up).
    pub allow_plaintext: bool,
    /// Connection, header and time limits (`[http.limits]`).
    pub limits: Limits,
    /// The operators' web console at `/console/` (`[http.console]`).
    pub console: ConsoleConfig,
}

/// `[http.console]`: the operators' web console, served at `/console/`. It needs
/// `[[operators]]`: an operator logs in with an operator token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// The path a reverse proxy serves the broker under (e.g. `"/ketenbus"` when the
    /// console is reached at `https://host/ketenbus/console/`); empty when served at the
    /// root. Only the session cookie's `Path` uses it: every link in the console is relative.
    pub path_prefix: String,
    /// A session ends after this long without a request.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A session ends this long after login, however active.
    #[serde(with = "humantime_serde")]
    pub absolute_timeout: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            path_prefix: String::new(),
            idle_timeout: Duration::from_secs(15 * 60),
            absolute_timeout: Duration::from_secs(8 * 3600),
        }
    }
}

impl ConsoleConfig {
    /// Problems: a prefix that is not an absolute path without a trailing `/`, a zero timeout.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let prefix = &self.path_prefix;
        if !prefix.is_empty()
            && (!prefix.starts_with('/')
                || prefix.ends_with('/')
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b)))
        {
            p.push(Problem::new(
                "http.console.path_prefix",
                "must start with '/', not end with '/', and hold letters, digits, '-', '_', '.', '~'",
            ));
        }
        for (key, d) in [
            ("idle_timeout", self.idle_timeout),
            ("absolute_timeout", self.absolute_timeout),
        ] {
            if d.is_zero() {
                p.push(Problem::new(
                    format!("http.console.{key}"),
                    "must be longer than 0s",
                ));
            }
        }
        p
    }

    /// The session cookie's `Path`: the console's path as the browser sees it.
    #[must_use]
    pub fn cookie_path(&self) -> String {
        format!("{}/console/", self.path_prefix)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body: bytesize::ByteSize::mib(25),
            ingest_timeout: Duration::from_secs(10),
            tls: None,
            allow_plaintext: false,
            limits: Limits::default(),
            console: ConsoleConfig::default(),
        }
    }
}

impl HttpConfig {
    /// Every problem in `[http]`: the body size, the limits, and TLS (or a non-loopback
    /// listener without it).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if self.max_body.as_u64() == 0 {
            p.push(Problem::new("http.max_body", "must be more than 0 bytes"));
        }
        p.extend(Problem::under("http.limits", self.limits.problems()));
        p.extend(self.console.problems());
        match &self.tls {
            Some(tls) => {
                if let Err(e) = tls.build() {
                    p.push(Problem::new(format!("http.tls.{}", e.key()), e.to_string()));
                }
            }
            None if !self.listen.ip().is_loopback() && !self.allow_plaintext => p.push(Problem::new(
                "http.listen",
                "a non-loopback address without [http.tls]: configure TLS, or set http.allow_plaintext = true",
            )),
            None => {}
        }
        p
    }

    /// The largest body the listener takes, in bytes.
    #[must_use]
    pub fn max_body_bytes(&self) -> usize {
        usize::try_from(self.max_body.as_u64()).unwrap_or(usize::MAX)
    }
}

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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfig {
    /// The rustls server configuration for these settings.
    ///
    /// # Errors
    /// When a file is unreadable or rustls refuses the certificate, key or CA.
    pub fn build(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let cfg = self;
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
        cfg.build().expect("a self-signed pair works");
        cfg.client_ca_file = Some(c.clone());
        cfg.build().expect("with a client CA");
        cfg.key_file = c.clone();
        let e = cfg.build().unwrap_err();
        assert_eq!(e.key(), "key_file");
        assert!(!e.to_string().contains("BEGIN"), "{e}");
        cfg.cert_file = dir.path().join("missing.pem");
        assert_eq!(cfg.build().unwrap_err().key(), "cert_file");
    }
}
