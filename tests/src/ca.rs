//! Test certificates made at run time (rcgen): no key material is committed.

#![allow(clippy::unwrap_used)] // test support: a failing unwrap is a failing test

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// A CA in `dir` that issues PEM certificate/key pairs.
pub struct Ca {
    dir: PathBuf,
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({})", self.name)
    }
}

impl Ca {
    /// A CA named `name`, its certificate in `dir/<name>-ca.pem`.
    ///
    /// # Panics
    /// When the files cannot be written.
    #[must_use]
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} root"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).unwrap();
        Ca {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
            issuer,
        }
    }

    /// Its certificate file.
    #[must_use]
    pub fn file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// (certificate file, key file) for `cn`, a server certificate for 127.0.0.1 or a
    /// client certificate.
    ///
    /// # Panics
    /// When the files cannot be written.
    pub fn issue(&self, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let sans = if server {
            vec!["127.0.0.1".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{cn}.crt")),
            self.dir.join(format!("{cn}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(self.dir.join(format!("{cn}.der")), cert.der()).unwrap();
        (c, k)
    }

    /// Hex SHA-256 of the DER certificate issued for `cn`: what `cert_sha256` names.
    ///
    /// # Panics
    /// When no certificate was issued for `cn`.
    #[must_use]
    pub fn fingerprint(&self, cn: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(self.dir.join(format!("{cn}.der"))).unwrap(),
        ))
    }

    /// A client identity (certificate and key) for reqwest, for `cn` issued before.
    ///
    /// # Panics
    /// When no certificate was issued for `cn`.
    #[must_use]
    pub fn identity(&self, cn: &str) -> reqwest::Identity {
        let mut pem = std::fs::read(self.dir.join(format!("{cn}.crt"))).unwrap();
        pem.extend(std::fs::read(self.dir.join(format!("{cn}.key"))).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }
}
