//! Certificates and private keys read from PEM files: the one reader every TLS user of
//! the crate shares (the listeners, the PostgreSQL client, the outbound HTTPS client).
//! The bottom layer: it imports no other module of the crate.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be read or holds nothing usable.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct PemError {
    /// The file.
    pub path: String,
    /// Why.
    pub reason: String,
}

fn file_err(path: &Path, reason: impl ToString) -> PemError {
    PemError {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}
