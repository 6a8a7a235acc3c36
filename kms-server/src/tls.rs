//! TLS for the API listener: rustls with the aws-lc-rs provider (X25519MLKEM768 hybrid key
//! exchange offered first), TLS 1.3 only unless 1.2 is allowed, client certificates
//! required and verified against the configured CA, ALPN `h2` and `http/1.1`. And the
//! reading of a verified client certificate's identity.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::TlsSettings;
use crate::policy::IdentitySource;

/// TLS set-up failures, naming the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client CA: {0}")]
    Verifier(String),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

/// The rustls server configuration for the API listener.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&settings.client_ca)? {
        roots
            .add(cert)
            .map_err(|e| file_err(&settings.client_ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = if settings.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&settings.cert)?, load_key(&settings.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed session would skip the client-certificate check
    // (and, later, the CRL check). Keep-alive connections carry the load instead.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The identity of a verified end-entity certificate, read from `sources` in order.
pub fn identity_of(cert: &[u8], sources: &[IdentitySource]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    for source in sources {
        let found = match source {
            IdentitySource::UriSan => sans.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            }),
            IdentitySource::DnsSan => sans.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            }),
            IdentitySource::SubjectCn => cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
        };
        if let Some(id) = found.filter(|s| !s.is_empty()) {
            return Some(id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Pki;

    #[test]
    fn identity_order() {
        let ca = Pki::generate("test ca").unwrap();
        let both = ca.issue_client("app-cn", Some("spiffe://t/app")).unwrap();
        let der = both.cert_der().unwrap();
        let all = [
            IdentitySource::UriSan,
            IdentitySource::DnsSan,
            IdentitySource::SubjectCn,
        ];
        assert_eq!(identity_of(&der, &all).as_deref(), Some("spiffe://t/app"));
        assert_eq!(
            identity_of(&der, &[IdentitySource::SubjectCn]).as_deref(),
            Some("app-cn")
        );
        let cn_only = ca.issue_client("only-cn", None).unwrap();
        assert_eq!(
            identity_of(&cn_only.cert_der().unwrap(), &all).as_deref(),
            Some("only-cn")
        );
        assert_eq!(identity_of(b"not a cert", &all), None);
    }
}
