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

/// The host name a connection's client asked for in its TLS handshake (SNI), a request
/// extension on each of its requests: a request whose `Host` names another is 421.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName(pub Option<String>);

impl ServerName {
    /// What `conn`'s handshake asked for.
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        Self(conn.server_name().map(str::to_ascii_lowercase))
    }
}

/// The routes of every configured protocol, each under its prefix, and on its own host
/// name when it has one (`[dke] host`, `[ekm] host`): a request goes to the protocols of
/// the name it asks for (its `Host`, which must agree with its SNI), or to those without
/// one.
pub fn router(
    state: &Arc<AppState>,
    settings: &crate::app::config::Settings,
) -> Result<Router, crate::adapters::SetupError> {
    let mut hosts = Hosts::default();
    if let Some(dke_settings) = &settings.dke {
        let dke = Arc::new(crate::adapters::dke::Dke::new(state.clone(), dke_settings)?);
        let routes = crate::adapters::dke::router(dke, &dke_settings.mount);
        hosts.add(dke_settings.host.as_deref(), routes);
    }
    if let Some(cse) = &settings.cse {
        let cse = Arc::new(crate::adapters::cse::Cse::new(state.clone(), cse)?);
        hosts.add(None, crate::adapters::cse::router(cse));
    }
    if let Some(ekm_settings) = &settings.ekm {
        let ekm = Arc::new(crate::adapters::ekm::Ekm::new(state.clone(), ekm_settings));
        let routes = crate::adapters::ekm::router(ekm, &ekm_settings.mount);
        hosts.add(ekm_settings.host.as_deref(), routes);
    }
    if let Some(sf) = &settings.salesforce {
        let sf = Arc::new(crate::adapters::salesforce::Salesforce::new(
            state.clone(),
            sf,
        )?);
        hosts.add(None, crate::adapters::salesforce::router(sf));
    }
    if let Some(public) = &settings.public {
        for (host, setting) in [
            (
                settings.dke.as_ref().and_then(|d| d.host.as_deref()),
                "dke.host",
            ),
            (
                settings.ekm.as_ref().and_then(|k| k.host.as_deref()),
                "ekm.host",
            ),
        ] {
            if let Some(host) = host {
                certificate_names(&public.cert, host)
                    .map_err(|m| crate::adapters::SetupError::new(setting, m))?;
            }
        }
    }
    let router = if hosts.named.is_empty() {
        with_fallback(hosts.default)
    } else {
        let hosts = Arc::new(Hosts {
            default: with_fallback(hosts.default),
            named: hosts
                .named
                .into_iter()
                .map(|(h, r)| (h, with_fallback(r)))
                .collect(),
        });
        Router::new().fallback(move |req: axum::extract::Request| dispatch(hosts.clone(), req))
    };
    Ok(router.layer(axum::middleware::map_response(browser_headers)))
}

/// The protocols' routes by host name: those without one in `default`.
#[derive(Default)]
struct Hosts {
    default: Router,
    named: Vec<(String, Router)>,
}

impl Hosts {
    fn add(&mut self, host: Option<&str>, routes: Router) {
        match host {
            None => self.default = std::mem::take(&mut self.default).merge(routes),
            Some(h) => match self.named.iter_mut().find(|(n, _)| n == h) {
                Some((_, r)) => *r = std::mem::take(r).merge(routes),
                None => self.named.push((h.to_owned(), routes)),
            },
        }
    }
}

fn with_fallback(router: Router) -> Router {
    router.fallback(|| async {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such endpoint"})),
        )
            .into_response()
    })
}

/// One request to the routes of the host name it asks for. The name is the request's
/// authority (HTTP/2) or `Host` (HTTP/1.1), without its port; one that differs from the
/// connection's SNI is 421 Misdirected Request (RFC 9110, 15.5.20), so a connection made
/// for one protocol's name cannot reach another's.
async fn dispatch(hosts: Arc<Hosts>, req: axum::extract::Request) -> axum::response::Response {
    use tower::ServiceExt as _;
    let asked = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            let host = req.headers().get(axum::http::header::HOST)?.to_str().ok()?;
            let name = match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host,
            };
            Some(name.to_owned())
        })
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase());
    let sni = req
        .extensions()
        .get::<ServerName>()
        .and_then(|s| s.0.clone());
    if let (Some(sni), Some(asked)) = (&sni, &asked) {
        if sni != asked {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                Json(serde_json::json!({
                    "error": "the request's host is not the one this connection was opened for"
                })),
            )
                .into_response();
        }
    }
    let name = asked.or(sni);
    let router = name
        .and_then(|n| hosts.named.iter().find(|(h, _)| *h == n))
        .map_or(&hosts.default, |(_, r)| r);
    match router.clone().oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Checks that the listener's certificate names `host` (a DNS name among its subject
/// alternative names, or a wildcard one level above it): a protocol on its own name
/// would otherwise fail every handshake.
fn certificate_names(cert: &Path, host: &str) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let certs = crate::base::pem::load_certs(cert).map_err(|e| e.to_string())?;
    let der = certs
        .first()
        .ok_or_else(|| format!("{}: no certificate", cert.display()))?;
    let (_, leaf) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| format!("{}: not an X.509 certificate", cert.display()))?;
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let covered = names.iter().any(|n| {
        n == host
            || n.strip_prefix("*.")
                .is_some_and(|parent| host.split_once('.').is_some_and(|(_, rest)| rest == parent))
    });
    if covered {
        Ok(())
    } else {
        Err(format!(
            "{host} is not among the [public] certificate's names ({}): add it to the certificate",
            names.join(", ")
        ))
    }
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

    /// Which routes a request reaches: by its authority (HTTP/2) or `Host` (any case, a
    /// port or a trailing dot ignored), 421 when that is not the connection's SNI.
    #[tokio::test]
    async fn requests_reach_the_routes_of_the_name_they_ask_for() {
        let named = |name: &'static str| {
            Router::new().route("/x", axum::routing::get(move || async move { name }))
        };
        let hosts = Arc::new(Hosts {
            default: with_fallback(named("default")),
            named: vec![("dke.example.com".into(), with_fallback(named("dke")))],
        });
        let ask = |uri: &str, host: Option<&str>, sni: Option<&str>| {
            let mut req = axum::http::Request::builder().uri(uri);
            if let Some(h) = host {
                req = req.header(axum::http::header::HOST, h);
            }
            let mut req = req.body(axum::body::Body::empty()).unwrap();
            req.extensions_mut()
                .insert(ServerName(sni.map(str::to_owned)));
            let hosts = hosts.clone();
            async move {
                let resp = dispatch(hosts, req).await;
                let status = resp.status().as_u16();
                let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let ok = |s: &str| (200, s.to_owned());
        assert_eq!(ask("/x", Some("dke.example.com"), None).await, ok("dke"));
        assert_eq!(
            ask("/x", Some("DKE.Example.com.:8444"), None).await,
            ok("dke")
        );
        assert_eq!(
            ask("https://dke.example.com/x", None, None).await,
            ok("dke")
        );
        assert_eq!(ask("/x", None, Some("dke.example.com")).await, ok("dke"));
        assert_eq!(
            ask("/x", Some("dke.example.com"), Some("dke.example.com")).await,
            ok("dke")
        );
        assert_eq!(
            ask("/x", Some("other.example.com"), None).await,
            ok("default")
        );
        assert_eq!(ask("/x", Some("[::1]:8444"), None).await, ok("default"));
        assert_eq!(ask("/x", None, None).await, ok("default"));
        assert_eq!(
            ask("/x", Some("ekm.example.com"), Some("dke.example.com"))
                .await
                .0,
            421
        );
        assert_eq!(ask("/y", Some("dke.example.com"), None).await.0, 404);
    }

    #[test]
    fn a_host_must_be_among_the_certificate_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::tools::pki::Pki::generate("test CA").unwrap();
        let issued = ca
            .issue_server(&["dke.example.com", "*.kms.example.com", "127.0.0.1"])
            .unwrap();
        let cert = dir.path().join("server.pem");
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        for good in ["dke.example.com", "ekm.kms.example.com"] {
            certificate_names(&cert, good).unwrap();
        }
        for bad in ["ekm.example.com", "kms.example.com", "a.b.kms.example.com"] {
            let e = certificate_names(&cert, bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("dke.example.com"), "{e}");
        }
    }
}
