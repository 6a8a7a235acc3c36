//! The public HTTPS listener (`[public]`) for the end-user protocols of issue 11: clients
//! that are people's Office apps and browsers, not provider services, so no client
//! certificate (they authenticate with bearer tokens), TLS 1.2 or 1.3 with the configured
//! server certificate, and one route prefix per protocol: `/dke` (Microsoft Double Key
//! Encryption, [`crate::adapters::dke`]), `/cse` (Google Workspace client-side encryption,
//! [`crate::adapters::cse`]), `/ekm` (Google Cloud External Key Manager, [`crate::adapters::ekm`]) and
//! `/salesforce` (Salesforce cache-only keys, [`crate::adapters::salesforce`]). A protocol is served only when its table is configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde::Deserialize;

use crate::api::AppState;

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

/// TLS of the public listener: its server certificate, TLS 1.2 and 1.3. With
/// `client_ca` (a route prefix that wants client certificates, e.g. `[salesforce]
/// client_ca`), a client *may* present a certificate, and one it presents must chain to
/// `client_ca` and not be revoked by `crls`; whether a route requires one is the route's check ([`crate::adapters::ClientCertificate`]).
/// Without it, no certificate is asked for.
pub fn server_config(
    settings: &PublicSettings,
    client_ca: Option<&std::path::Path>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, crate::security::tls::TlsError> {
    use crate::base::pem::{load_certs, load_key};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(crate::security::tls::client_verifier(
            ca, crls, true, provider,
        )?),
    };
    let mut config =
        builder.with_single_cert(load_certs(&settings.cert)?, load_key(&settings.key)?)?;
    crate::security::tls::finish_server_config(&mut config);
    Ok(Arc::new(config))
}

/// The routes of every configured protocol, each under its prefix.
pub fn router(
    state: &Arc<AppState>,
    settings: &crate::app::config::Settings,
) -> Result<Router, crate::adapters::SetupError> {
    let mut router = Router::new();
    if let Some(dke_settings) = &settings.dke {
        let dke = Arc::new(crate::adapters::dke::Dke::new(state.clone(), dke_settings)?);
        router = router.merge(crate::adapters::dke::router(dke, &dke_settings.mount));
    }
    if let Some(cse) = &settings.cse {
        let cse = Arc::new(crate::adapters::cse::Cse::new(state.clone(), cse)?);
        router = router.merge(crate::adapters::cse::router(cse));
    }
    if let Some(ekm_settings) = &settings.ekm {
        let ekm = Arc::new(crate::adapters::ekm::Ekm::new(state.clone(), ekm_settings));
        router = router.merge(crate::adapters::ekm::router(ekm, &ekm_settings.mount));
    }
    if let Some(sf) = &settings.salesforce {
        let sf = Arc::new(crate::adapters::salesforce::Salesforce::new(
            state.clone(),
            sf,
        )?);
        router = router.merge(crate::adapters::salesforce::router(sf));
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
