//! TLS settings for the mail connectors: rustls with the ring provider, certificates from
//! PEM files, the web PKI roots plus an optional extra CA file.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::mail::MailError;

/// A server configuration from a PEM certificate chain and key.
///
/// # Errors
/// [`MailError::Config`] when a file cannot be read or holds no usable certificate or key.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, MailError> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| MailError::Config(format!("{}: no private key: {e}", key_file.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| MailError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| MailError::Config(format!("{}: {e}", cert_file.display())))?;
    Ok(Arc::new(config))
}

/// A client configuration trusting the web PKI roots and the certificates in `ca_file`.
///
/// # Errors
/// [`MailError::Config`] when `ca_file` cannot be read.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, MailError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra_roots(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| MailError::Config(format!("ca_file: {e}")))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| MailError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificates in `ca_file` (none without one).
///
/// # Errors
/// [`MailError::Config`] when the file cannot be read or holds no certificate.
pub fn extra_roots(ca_file: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, MailError> {
    match ca_file {
        None => Ok(Vec::new()),
        Some(f) => read_certs(f),
    }
}

fn read_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, MailError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(file)
        .map_err(|e| MailError::Config(format!("{}: {e}", file.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| MailError::Config(format!("{}: {e}", file.display())))?;
    if certs.is_empty() {
        return Err(MailError::Config(format!(
            "{}: no certificate",
            file.display()
        )));
    }
    Ok(certs)
}
