//! PEM files for TLS: reading certificates (the listener's, a client CA, a sink's CA), and
//! why TLS could not be set up, naming the config key at fault.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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
