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

/// TLS of the public listener: its server certificate, TLS 1.2 and 1.3, no client
/// certificate.
pub fn server_config(
    settings: &PublicSettings,
) -> Result<Arc<rustls::ServerConfig>, crate::tls::TlsError> {
    use crate::tls::{load_certs, load_key};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(load_certs(&settings.cert)?, load_key(&settings.key)?)?;
    crate::tls::finish_server_config(&mut config);
    Ok(Arc::new(config))
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
    Ok(router.fallback(|| async {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such endpoint"})),
        )
            .into_response()
    }))
}
