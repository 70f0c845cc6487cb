//! TLS client configuration shared by the HTTP and WebSocket clients: the
//! system's trusted roots (plus Mozilla's bundled list) and, optionally, the
//! certificates of a PEM file, e.g. a private CA.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use thiserror::Error;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("CA file {path} holds no certificate")]
    EmptyCaFile { path: String },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// The system's roots and the bundled Mozilla roots, loaded once per process.
fn default_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        roots
    })
}

/// A client configuration trusting the default roots and, when given, every
/// certificate in `ca_file` (PEM).
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = default_roots().clone();
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::CaFile {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::EmptyCaFile { path: shown });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::CaFile {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
