//! TLS for the API listener: rustls with the aws-lc-rs provider (X25519MLKEM768 hybrid key
//! exchange offered first), TLS 1.3 only unless 1.2 is allowed, client certificates
//! required and verified against the configured CA (and its CRLs), ALPN `h2` and
//! `http/1.1`. The reading of a verified client certificate's identity. And [`TlsReloader`]:
//! CRL files re-read on change or SIGHUP, without a restart.
//!
//! Revocation works at two points. New handshakes use a rustls configuration built with
//! the current CRLs, so a revoked certificate's handshake fails. Connections opened before
//! the revocation (keep-alive) are caught per request: each connection carries its leaf
//! certificate's (issuer, serial) and every request is checked against the current revoked
//! set, so a revoked client is refused from the reload on, not from its next reconnect.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::access::policy::IdentitySource;
use crate::base::pem::{load_certs, load_key};

/// TLS files and policy.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to, PEM.
    pub client_ca: PathBuf,
    /// Allow TLS 1.2 (default: 1.3 only).
    pub allow_tls12: bool,
    /// Handshake deadline.
    pub handshake_timeout: std::time::Duration,
    /// Certificate revocation lists (PEM or DER) for client certificates, re-read on
    /// change and on SIGHUP.
    pub crls: Vec<PathBuf>,
    /// How often the CRL files are checked for change; `None`: only on SIGHUP.
    pub crl_poll: Option<std::time::Duration>,
}

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

impl From<crate::base::pem::PemError> for TlsError {
    fn from(e: crate::base::pem::PemError) -> Self {
        TlsError::File {
            path: e.path,
            reason: e.reason,
        }
    }
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads every CRL in a file: PEM (`X509 CRL` blocks), else the whole file as DER.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    parse_crls(bytes).map_err(|e| file_err(path, e))
}

/// Parses CRLs from a file's bytes: PEM (`X509 CRL` blocks), else the whole as DER. Each
/// is parsed now, so that a damaged file is refused with its name rather than later.
pub fn parse_crls(bytes: Vec<u8>) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let crls = if pem.is_empty() {
        vec![CertificateRevocationListDer::from(bytes)]
    } else {
        pem
    };
    for crl in &crls {
        x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
            .map_err(|e| format!("not a CRL: {e}"))?;
    }
    Ok(crls)
}

/// The revocation key of a certificate: its issuer's DER name, then its serial.
fn revocation_key(issuer: &[u8], serial: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + issuer.len() + serial.len());
    k.extend_from_slice(&(issuer.len() as u16).to_be_bytes());
    k.extend_from_slice(issuer);
    k.extend_from_slice(serial);
    k
}

/// The name a revoked certificate's denials are counted and alerted under:
/// `revoked-certificate:<serial in hex>@<hash of the issuer>`.
pub fn revoked_certificate_name(key: &[u8]) -> String {
    let issuer_len = key
        .get(..2)
        .map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
    let (issuer, serial) = key
        .get(2..)
        .unwrap_or_default()
        .split_at(issuer_len.min(key.len().saturating_sub(2)));
    let issuer = ring::digest::digest(&ring::digest::SHA256, issuer);
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "revoked-certificate:{}@{}",
        hex(serial),
        hex(&issuer.as_ref()[..6])
    )
}

/// The revocation key of a (verified) leaf certificate.
pub fn leaf_revocation_key(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    Some(revocation_key(
        cert.issuer().as_raw(),
        cert.tbs_certificate.raw_serial(),
    ))
}

/// The earliest `nextUpdate` of `crls` (a CRL without one never expires).
pub fn crls_valid_until(crls: &[CertificateRevocationListDer<'_>]) -> Option<SystemTime> {
    crls.iter()
        .filter_map(|crl| {
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
                    .ok()?;
            let next = crl.next_update()?.timestamp();
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(next).ok()?))
        })
        .min()
}

/// The revocation keys of every certificate the CRLs list.
pub fn revoked_set(crls: &[CertificateRevocationListDer<'_>]) -> HashSet<Vec<u8>> {
    let mut set = HashSet::new();
    for crl in crls {
        if let Ok((_, crl)) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
        {
            let issuer = crl.issuer().as_raw();
            for revoked in crl.iter_revoked_certificates() {
                set.insert(revocation_key(issuer, revoked.raw_serial()));
            }
        }
    }
    set
}

/// The rustls server configuration for the API listener.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let crls = settings
        .crls
        .iter()
        .map(|p| load_crls(p))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    server_config_with(settings, crls)
}

/// The trust roots in the PEM bundle at `path`.
pub fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

fn server_config_with(
    settings: &TlsSettings,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = client_verifier(&settings.client_ca, crls, false, provider.clone())?;
    let versions: &[&rustls::SupportedProtocolVersion] = if settings.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&settings.cert)?, load_key(&settings.key)?)?;
    finish_server_config(&mut config);
    Ok(Arc::new(config))
}

/// The verifier of client certificates chaining to the CA bundle at `ca`, checked against
/// `crls`; `optional`: a client may also present none.
pub fn client_verifier(
    ca: &Path,
    crls: Vec<CertificateRevocationListDer<'static>>,
    optional: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider);
    if !crls.is_empty() {
        // Leaf certificates only: the CA itself is trusted by configuration.
        // A CRL past its nextUpdate says nothing about certificates revoked since:
        // handshakes fail until a fresh one is loaded (fail closed).
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .enforce_revocation_expiration();
    }
    if optional {
        builder = builder.allow_unauthenticated();
    }
    builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// What every Keyhold listener's TLS does: HTTP/2 and HTTP/1.1 by ALPN; the server's
/// order of cipher suites, not the client's (AES-256-GCM first, as the provider lists
/// them); and no session resumption — a resumed session would skip the
/// client-certificate check (and the CRL check): keep-alive connections carry the load
/// instead.
pub fn finish_server_config(config: &mut ServerConfig) {
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// What builds a listener's TLS configuration with the CRLs in force.
pub type BuildConfig = dyn Fn(Vec<CertificateRevocationListDer<'static>>) -> Result<Arc<ServerConfig>, TlsError>
    + Send
    + Sync;

/// The listener's TLS configuration and revoked set, swapped whole on reload.
pub struct TlsReloader {
    crls: Vec<PathBuf>,
    build: Box<BuildConfig>,
    config: RwLock<Arc<ServerConfig>>,
    revoked: Arc<RwLock<Arc<Revoked>>>,
    /// Counts reloads (established connections re-check their certificates on each).
    reloads: tokio::sync::watch::Sender<u64>,
    /// (modified, length) of each CRL file at the last load.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// What the CRLs in force say.
struct Revoked {
    keys: HashSet<Vec<u8>>,
    valid_until: Option<SystemTime>,
}

impl TlsReloader {
    /// Loads the mTLS API's configuration and CRLs.
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        let s = settings.clone();
        Self::with_builder(
            settings.crls.clone(),
            Box::new(move |crls| server_config_with(&s, crls)),
        )
    }

    /// Loads the CRLs at `crls` and the configuration `build` makes with them.
    pub fn with_builder(crls: Vec<PathBuf>, build: Box<BuildConfig>) -> Result<Self, TlsError> {
        let stamps = crls.iter().map(stamp).collect();
        let (config, revoked) = Self::load(&crls, &build)?;
        Ok(Self {
            crls,
            build,
            config: RwLock::new(config),
            revoked: Arc::new(RwLock::new(Arc::new(revoked))),
            reloads: tokio::sync::watch::channel(0).0,
            stamps: Mutex::new(stamps),
        })
    }

    fn load(
        paths: &[PathBuf],
        build: &BuildConfig,
    ) -> Result<(Arc<ServerConfig>, Revoked), TlsError> {
        let crls = paths
            .iter()
            .map(|p| load_crls(p))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let revoked = Revoked {
            keys: revoked_set(&crls),
            valid_until: crls_valid_until(&crls),
        };
        if revoked.valid_until.is_some_and(|t| t <= SystemTime::now()) {
            tracing::error!("a certificate revocation list is past its nextUpdate: every client certificate is refused until a fresh one is loaded");
        }
        Ok((build(crls)?, revoked))
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a connection's leaf certificate (by [`leaf_revocation_key`]) is revoked now,
    /// or cannot be known not to be: the CRLs in force are past their `nextUpdate`.
    pub fn is_revoked(&self, key: &[u8]) -> bool {
        revoked_in(&self.revoked, key)
    }

    /// Whether a CRL file changed since the last load.
    pub fn changed(&self) -> bool {
        let now: Vec<_> = self.crls.iter().map(stamp).collect();
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) != now
    }

    /// Re-reads the CRLs (and certificates). On error the previous configuration stays in
    /// force (and the files are not retried until they change again). Returns how many
    /// certificates are revoked.
    pub fn reload(&self) -> Result<usize, TlsError> {
        let stamps: Vec<_> = self.crls.iter().map(stamp).collect();
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = stamps;
        let (config, revoked) = Self::load(&self.crls, &self.build)?;
        let n = revoked.keys.len();
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
        *self.revoked.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(revoked);
        self.reloads.send_modify(|n| *n += 1);
        Ok(n)
    }
}

fn revoked_in(revoked: &RwLock<Arc<Revoked>>, key: &[u8]) -> bool {
    let r = revoked
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    r.valid_until.is_some_and(|t| t <= SystemTime::now())
        || (!r.keys.is_empty() && r.keys.contains(key))
}

impl crate::transport::listen::Revoker for TlsReloader {
    fn revoked(&self, leaf: &[u8]) -> Box<dyn Fn() -> bool + Send + Sync> {
        let revoked = self.revoked.clone();
        match leaf_revocation_key(leaf) {
            Some(key) => Box::new(move || revoked_in(&revoked, &key)),
            // Verified in the handshake, so it parses; if not, it cannot be checked.
            None => Box::new(|| true),
        }
    }

    fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }
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
            return Some(canonical_identity(*source, &id));
        }
    }
    None
}

/// The name an identity read from `source` goes by, so that the three sources never share
/// a name: the value itself when its shape is that of its source (a URI, `scheme:...`, from
/// the URI SAN; a dotted host name from the DNS SAN; anything else from the common name),
/// else the value prefixed with its source (`subject-cn:`, `dns-san:`, `uri-san:`). A
/// common name `spiffe://bank/admin` is thus `subject-cn:spiffe://bank/admin`, never the
/// URI identity; a value that itself starts with one of the prefixes is always prefixed.
/// Configured identities, grants and lockouts use these names.
pub fn canonical_identity(source: IdentitySource, value: &str) -> String {
    if shape_of(value) == Some(source) {
        value.to_owned()
    } else {
        format!("{}:{value}", source_prefix(source))
    }
}

/// The source a certificate must carry `name` in to go by it (see [`canonical_identity`]).
pub fn source_of_name(name: &str) -> IdentitySource {
    shape_of(name).unwrap_or_else(|| {
        [
            IdentitySource::UriSan,
            IdentitySource::DnsSan,
            IdentitySource::SubjectCn,
        ]
        .into_iter()
        .find(|s| name.starts_with(&format!("{}:", source_prefix(*s))))
        .unwrap_or(IdentitySource::SubjectCn)
    })
}

fn source_prefix(source: IdentitySource) -> &'static str {
    match source {
        IdentitySource::UriSan => "uri-san",
        IdentitySource::DnsSan => "dns-san",
        IdentitySource::SubjectCn => "subject-cn",
    }
}

/// The source whose names look like `value`; `None` for a value that starts with a source
/// prefix.
fn shape_of(value: &str) -> Option<IdentitySource> {
    let sources = [
        IdentitySource::UriSan,
        IdentitySource::DnsSan,
        IdentitySource::SubjectCn,
    ];
    if sources
        .iter()
        .any(|s| value.starts_with(&format!("{}:", source_prefix(*s))))
    {
        return None;
    }
    let scheme = value.split_once(':').map(|(scheme, _)| scheme);
    if scheme.is_some_and(|s| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    }) {
        return Some(IdentitySource::UriSan);
    }
    let host = value.strip_suffix('.').unwrap_or(value);
    let labels: Vec<&str> = host.split('.').collect();
    if labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
        })
    {
        return Some(IdentitySource::DnsSan);
    }
    Some(IdentitySource::SubjectCn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::pki::Pki;

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

    #[test]
    fn the_three_sources_never_share_a_name() {
        let ca = Pki::generate("test ca").unwrap();
        let all = [
            IdentitySource::UriSan,
            IdentitySource::DnsSan,
            IdentitySource::SubjectCn,
        ];
        // A common name shaped like a URI identity or a host name is not that identity.
        for (cn, name) in [
            ("spiffe://t/admin", "subject-cn:spiffe://t/admin"),
            ("db.bank.example", "subject-cn:db.bank.example"),
            (
                "dns-san:db.bank.example",
                "subject-cn:dns-san:db.bank.example",
            ),
            ("app", "app"),
        ] {
            let cert = ca.issue_client(cn, None).unwrap().cert_der().unwrap();
            assert_eq!(identity_of(&cert, &all).as_deref(), Some(name), "{cn}");
        }
        use IdentitySource::*;
        assert_eq!(
            canonical_identity(UriSan, "spiffe://t/app"),
            "spiffe://t/app"
        );
        assert_eq!(canonical_identity(UriSan, "urn:uuid:1"), "urn:uuid:1");
        assert_eq!(
            canonical_identity(UriSan, "subject-cn:app"),
            "uri-san:subject-cn:app"
        );
        assert_eq!(
            canonical_identity(DnsSan, "db.bank.example"),
            "db.bank.example"
        );
        assert_eq!(canonical_identity(DnsSan, "localhost"), "dns-san:localhost");
        assert_eq!(
            canonical_identity(SubjectCn, "Payments App"),
            "Payments App"
        );
        for s in all {
            for v in ["a", "a.b", "x:y", "subject-cn:a"] {
                assert_eq!(source_of_name(&canonical_identity(s, v)), s, "{s:?} {v}");
            }
        }
        // No two (source, value) pairs share a name.
        let values = [
            "a",
            "a.b",
            "x:y",
            "subject-cn:a",
            "dns-san:a.b",
            "uri-san:x:y",
        ];
        let mut seen = std::collections::HashMap::new();
        for s in all {
            for v in values {
                if let Some(prev) = seen.insert(canonical_identity(s, v), (s, v)) {
                    panic!("{prev:?} and {:?} share a name", (s, v));
                }
            }
        }
    }
}
