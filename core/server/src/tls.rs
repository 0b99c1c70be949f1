//! TLS for `stagely serve`: the certificate chain and key from `[tls] cert_file` /
//! `key_file`, served through rustls (aws-lc-rs), and reloaded in place (on SIGHUP) without
//! dropping connections: new handshakes get the new certificate, open connections keep theirs.
//! A reload that fails (unreadable file, no certificate, key not matching) keeps the
//! certificate in use and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be used. Names the file; never quotes its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {detail}")]
    Cert { path: String, detail: String },
    #[error("tls.key_file {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("tls.agent_ca_file {path}: {detail}")]
    AgentCa { path: String, detail: String },
}

/// The files `[tls]` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Reads the chain and key and checks that the key belongs to the first certificate.
pub fn load_certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let cert_error = |detail: String| TlsError::Cert {
        path: files.cert_file.display().to_string(),
        detail,
    };
    let key_error = |detail: String| TlsError::Key {
        path: files.key_file.display().to_string(),
        detail,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|error| cert_error(error.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|error| cert_error(error.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|error| key_error(format!("no usable PEM private key ({error})")))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => {
            key_error("does not match the certificate in tls.cert_file".into())
        }
        other => key_error(other.to_string()),
    })
}

/// Reads the CA certificate(s) agents should trust, checking it is PEM with at least one
/// certificate. The text is delivered to agents in their user-data.
pub fn load_agent_ca(path: &Path) -> Result<String, TlsError> {
    let error = |detail: String| TlsError::AgentCa {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let count = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?
        .len();
    if count == 0 {
        return Err(error("holds no PEM certificate".into()));
    }
    Ok(text)
}

/// The certificate in use, swapped by [`ReloadingCert::reload`].
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(files: TlsFiles) -> Result<Arc<ReloadingCert>, TlsError> {
        let key = load_certified_key(&files)?;
        Ok(Arc::new(ReloadingCert {
            files,
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// Reads the files again; on success new handshakes use them, on failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = Arc::new(load_certified_key(&self.files)?);
        if let Ok(mut current) = self.current.write() {
            *current = key;
        }
        Ok(())
    }

    /// A rustls server configuration that always serves the current certificate (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|current| current.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_matching_pair_loads_and_a_mismatched_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        load_certified_key(&a).unwrap();
        let mixed = TlsFiles {
            cert_file: a.cert_file.clone(),
            key_file: b.key_file.clone(),
        };
        let error = load_certified_key(&mixed).unwrap_err().to_string();
        assert!(error.starts_with("tls.key_file"), "{error}");
        assert!(error.contains("does not match"), "{error}");
    }

    #[test]
    fn errors_name_the_file_and_never_quote_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let key_text = std::fs::read_to_string(&a.key_file).unwrap();
        std::fs::write(&a.cert_file, &key_text).unwrap();
        let error = load_certified_key(&a).unwrap_err().to_string();
        assert!(error.starts_with("tls.cert_file"), "{error}");
        assert!(error.contains("no PEM certificate"), "{error}");
        let secret_line = key_text.lines().nth(1).unwrap();
        assert!(!error.contains(secret_line), "{error}");
        let missing = TlsFiles {
            cert_file: dir.path().join("nope.crt"),
            key_file: a.key_file.clone(),
        };
        let error = load_certified_key(&missing).unwrap_err().to_string();
        assert!(error.contains("nope.crt"), "{error}");
    }

    #[test]
    fn a_failed_reload_keeps_the_certificate_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let cert = ReloadingCert::load(a.clone()).unwrap();
        let before = cert.current.read().unwrap().cert[0].clone();
        std::fs::write(&a.cert_file, "garbage").unwrap();
        assert!(cert.reload().is_err());
        assert_eq!(cert.current.read().unwrap().cert[0], before);
        // A new valid pair in the same files is picked up.
        let b = write_pair(dir.path(), "b");
        std::fs::copy(&b.cert_file, &a.cert_file).unwrap();
        std::fs::copy(&b.key_file, &a.key_file).unwrap();
        cert.reload().unwrap();
        assert_ne!(cert.current.read().unwrap().cert[0], before);
    }

    #[test]
    fn the_agent_ca_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        assert!(
            load_agent_ca(&a.cert_file)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let error = load_agent_ca(&a.key_file).unwrap_err().to_string();
        assert!(error.starts_with("tls.agent_ca_file"), "{error}");
    }
}
