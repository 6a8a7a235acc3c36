//! The public HTTPS listener (`[public]`) for the end-user protocols of issue 11: clients
//! that are people's Office apps and browsers, not provider services, so no client
//! certificate (they authenticate with bearer tokens), TLS 1.2 or 1.3 with the configured
//! server certificate, and one route prefix per protocol: `/dke` (Microsoft Double Key
//! Encryption, [`crate::dke`]), `/cse` (Google Workspace client-side encryption,
//! [`crate::cse`]), `/ekm` (Google Cloud External Key Manager, [`crate::ekm`]) and
//! `/salesforce` (Salesforce cache-only keys, [`crate::salesforce`]). A protocol is served only when its table is configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde::Deserialize;

use crate::routes::AppState;

/// `[public]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilePublic {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
}

/// `[public]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicSettings {
    /// Listener.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM): for production, a public CA's, for the host name
    /// the protocols' URLs name.
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
}

impl FilePublic {
    /// Validates; errors are (dotted field under `public`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<PublicSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("public.{f}"), m.to_owned()));
        let Ok(listen) = self.listen.parse::<SocketAddr>() else {
            return e("listen", "must be host:port");
        };
        let (cert, key) = (resolve(&self.cert), resolve(&self.key));
        for (f, p) in [("cert", &cert), ("key", &key)] {
            if !p.is_file() {
                return e(f, &format!("{} is not a readable file", p.display()));
            }
        }
        Ok(PublicSettings { listen, cert, key })
    }
}

/// The bearer token of a request (`Authorization: Bearer <token>`, the scheme in any
/// case), trimmed; `None` without one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// A protocol's own URL from the configuration (`[dke] url`, `[cse] kacls_url`,
/// `[ekm] url`): an `https://` URL with a host, without a trailing slash.
pub(crate) fn service_url(value: &str) -> Option<String> {
    let url = value.trim_end_matches('/');
    let host = url.strip_prefix("https://")?;
    (!host.is_empty()).then(|| url.to_owned())
}

/// TLS of the public listener: its server certificate, TLS 1.2 and 1.3. With
/// `client_ca` (a route prefix that wants client certificates, e.g. `[salesforce]
/// client_ca`), a client *may* present a certificate, and one it presents must chain to
/// `client_ca` and not be revoked by `crls`; whether a route requires one is the route's check ([`ClientCertificate`]).
/// Without it, no certificate is asked for.
pub fn server_config(
    settings: &PublicSettings,
    client_ca: Option<&std::path::Path>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, crate::tls::TlsError> {
    use crate::tls::{load_certs, load_key};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder
            .with_client_cert_verifier(crate::tls::client_verifier(ca, crls, true, provider)?),
    };
    let mut config =
        builder.with_single_cert(load_certs(&settings.cert)?, load_key(&settings.key)?)?;
    crate::tls::finish_server_config(&mut config);
    Ok(Arc::new(config))
}

/// The client certificate a public-listener connection presented (verified against the
/// listener's client CA during the handshake), as the SHA-256 of its DER; a request
/// extension on every request of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate(pub Option<[u8; 32]>);

impl ClientCertificate {
    /// What `conn`'s handshake presented.
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        Self(
            conn.peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| {
                    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
                    let mut out = [0u8; 32];
                    out.copy_from_slice(digest.as_ref());
                    out
                }),
        )
    }
}

/// The routes of every configured protocol, each under its prefix.
pub fn router(state: &Arc<AppState>) -> Result<Router, String> {
    let mut router = Router::new();
    if let Some(dke) = &state.settings.dke {
        let dke = Arc::new(crate::dke::Dke::new(state.clone(), dke)?);
        router = router.merge(crate::dke::router(dke));
    }
    if let Some(cse) = &state.settings.cse {
        let cse = Arc::new(crate::cse::Cse::new(state.clone(), cse)?);
        router = router.merge(crate::cse::router(cse));
    }
    if let Some(ekm) = &state.settings.ekm {
        let ekm = Arc::new(crate::ekm::Ekm::new(state.clone(), ekm));
        router = router.merge(crate::ekm::router(ekm));
    }
    if let Some(sf) = &state.settings.salesforce {
        let sf = Arc::new(crate::salesforce::Salesforce::new(state.clone(), sf)?);
        router = router.merge(crate::salesforce::router(sf));
    }
    Ok(router
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": "no such endpoint"})),
            )
                .into_response()
        })
        .layer(axum::middleware::map_response(browser_headers)))
}

/// Browsers call this listener (Google CSE from the Workspace web apps): HTTPS only from
/// now on for this host (HSTS, one year; not its subdomains, which are the customer's),
/// and no content sniffing of the answers.
async fn browser_headers(mut resp: axum::response::Response) -> axum::response::Response {
    let headers = resp.headers_mut();
    headers.insert(
        axum::http::header::STRICT_TRANSPORT_SECURITY,
        axum::http::HeaderValue::from_static("max-age=31536000"),
    );
    headers.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_and_service_urls() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for (value, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ] {
            h.insert(
                axum::http::header::AUTHORIZATION,
                axum::http::HeaderValue::from_static(value),
            );
            assert_eq!(bearer(&h).as_deref(), want, "{value}");
        }
        assert_eq!(
            service_url("https://kms.example/dke/").as_deref(),
            Some("https://kms.example/dke")
        );
        assert_eq!(service_url("https://"), None);
        assert_eq!(service_url("http://kms.example"), None);
    }
}
