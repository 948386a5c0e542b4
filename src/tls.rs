//! TLS configuration with rustls (the `ring` provider): the server's from a
//! PEM certificate chain and key, the client's from a PEM CA or the system's
//! roots. HTTP/1.1 only, as the server speaks nothing else.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it failed with.
        source: io::Error,
    },
    /// A certificate or key does not parse, or they do not belong together.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which one: "the TLS certificate", "the CA certificate", ...
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No CA was given and the system has no trusted root certificates.
    #[error("no trusted root certificates on this system; give the server's CA with --ca-cert")]
    NoRoots,
    /// rustls refused its own defaults.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

fn invalid(what: &'static str, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        what,
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM text, refusing one with none.
fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, format_args!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, "no certificate in it"));
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The server's TLS configuration from PEM texts: a certificate chain (the
/// server's own first) and its private key.
///
/// # Errors
/// When either does not parse or they do not belong together.
pub fn server_config_from_pem(
    cert_chain: &[u8],
    key: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates(cert_chain, "the TLS certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| invalid("the TLS key", format_args!("not a PEM private key: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid("the TLS certificate and key", e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`server_config_from_pem`] from files.
///
/// # Errors
/// When a file cannot be read, or as [`server_config_from_pem`].
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_from_pem(&read(cert)?, &read(key)?)
}

/// The client's TLS configuration: trusting the CA certificates of
/// `ca_pem`, or the system's roots without one.
///
/// # Errors
/// When the CA does not parse, or no root can be found.
pub fn client_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in certificates(pem, "the CA certificate")? {
                roots
                    .add(cert)
                    .map_err(|e| invalid("the CA certificate", e))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // A system root that rustls cannot use is skipped, as browsers do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::NoRoots);
            }
        }
    }
    client_config_with(roots)
}

/// A client configuration that trusts no server: for clients of `http://`
/// URLs, which never use it.
///
/// # Errors
/// When rustls refuses its own defaults.
pub(crate) fn client_config_without_roots() -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(RootCertStore::empty())
}

fn client_config_with(roots: RootCertStore) -> Result<rustls::ClientConfig, TlsError> {
    // No ALPN here: hyper-rustls sets it from the protocols it enables.
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
