//! A small PKI for dev mode and tests: a CA, a server certificate, client certificates.
//! Not for production; `deploy/` documents how to use your own CA.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use zeroize::Zeroizing;

/// PKI failures.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct PkiError(#[from] rcgen::Error);

/// A certificate and its private key, PEM.
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (zeroized on drop).
    pub key_pem: Zeroizing<String>,
}

impl Issued {
    /// The certificate, DER.
    pub fn cert_der(&self) -> Option<Vec<u8>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .ok()
            .map(|c| c.to_vec())
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { cert_pem, key_pem: [REDACTED] }")
    }
}

/// A certificate authority.
pub struct Pki {
    cert: Certificate,
    key: KeyPair,
}

impl Pki {
    /// A fresh self-signed CA (ECDSA P-256).
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = dn(common_name);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = dn("keyhold server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with subject CN `common_name` and, optionally, a URI SAN.
    pub fn issue_client(&self, common_name: &str, uri: Option<&str>) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// A CRL (PEM) revoking the certificates given as PEM, valid for a day, with CRL number
    /// `number` (increase it with every new list).
    pub fn revocation_list(&self, revoked_pems: &[&str], number: u64) -> Result<String, PkiError> {
        let now = std::time::SystemTime::now();
        self.revocation_list_between(
            revoked_pems,
            number,
            now,
            now + std::time::Duration::from_secs(86_400),
        )
    }

    /// [`Pki::revocation_list`] with its own `thisUpdate` and `nextUpdate`.
    pub fn revocation_list_between(
        &self,
        revoked_pems: &[&str],
        number: u64,
        this_update: std::time::SystemTime,
        next_update: std::time::SystemTime,
    ) -> Result<String, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let (this_update, next_update) = (
            time::OffsetDateTime::from(this_update),
            time::OffsetDateTime::from(next_update),
        );
        let now = this_update;
        let mut revoked_certs = Vec::new();
        for pem in revoked_pems {
            let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| PkiError(rcgen::Error::CouldNotParseCertificate))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|_| PkiError(rcgen::Error::CouldNotParseCertificate))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(cert.tbs_certificate.raw_serial()),
                revocation_time: now,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<Issued, PkiError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
