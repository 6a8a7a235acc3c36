//! TLS of the XKS listener: the proxy's server certificate (for AWS: issued by a public CA
//! for the proxy's host name), TLS 1.2 and 1.3, and optional mTLS — the client certificate
//! must chain to the configured CA *and* carry the configured subject common name
//! (`cks.kms.<region>.amazonaws.com`); anything else ends the handshake.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::settings::XksSettings;
use crate::base::pem::{load_certs, load_key};
use crate::security::tls::TlsError;

/// Chain verification by webpki, then the subject common name.
#[derive(Debug)]
struct SubjectVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    subject: String,
}

/// The subject common names of a DER certificate.
fn common_names(der: &[u8]) -> Vec<String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| {
            c.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl ClientCertVerifier for SubjectVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = common_names(end_entity);
        if names.contains(&self.subject) {
            Ok(verified)
        } else {
            tracing::warn!(
                presented = ?names,
                required = %self.subject,
                "XKS client certificate refused: wrong subject common name"
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The XKS listener's rustls configuration (read from the files now).
pub fn server_config(settings: &XksSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Verifier(format!("{}: {e}", ca.display())))?;
            }
            let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            let verifier: Arc<dyn ClientCertVerifier> = match &settings.client_subject {
                Some(subject) => Arc::new(SubjectVerifier {
                    inner: chain,
                    subject: subject.clone(),
                }),
                None => chain,
            };
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_single_cert(load_certs(&settings.cert)?, load_key(&settings.key)?)?;
    crate::security::tls::finish_server_config(&mut config);
    Ok(Arc::new(config))
}
