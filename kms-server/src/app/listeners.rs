//! Starting the listeners besides the API's: the XKS listener and the public one, each with
//! its TLS configuration and its reloader.

use std::sync::Arc;

use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::api::{AppState, PeerIdentity};
use crate::app::config::Settings;
use crate::security::tls;

use super::server::StartError;
use super::tasks::{tls_reloader, xks_reloader};

/// Starts the XKS listener ([`crate::adapters::xks`]) and its reloader (credential files on change
/// and SIGHUP; the TLS files on SIGHUP). Fails when a credentials file or the TLS files do
/// not load.
pub(super) fn start_xks(
    listener: TcpListener,
    settings: &crate::adapters::xks::settings::XksSettings,
    state: Arc<AppState>,
    limits: crate::transport::listen::Limits,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let xks = Arc::new(crate::adapters::xks::Xks::new(state.clone(), settings)?);
    let config = Arc::new(std::sync::RwLock::new(
        crate::adapters::xks::tls::server_config(settings)?,
    ));
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        stores = settings.stores.len(),
        mtls = settings.client_ca.is_some(),
        "listening (AWS XKS)"
    );
    tokio::spawn(xks_reloader(
        xks.clone(),
        config.clone(),
        settings.clone(),
        state.alerts.clone(),
        stop_rx.clone(),
    ));
    let current = config.clone();
    let mut rx = stop_rx;
    Ok(tokio::spawn(crate::transport::listen::serve(
        listener,
        crate::transport::listen::Tls(
            move || {
                current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            },
            None,
        ),
        limits,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
        crate::transport::listen::Http::new(
            &limits,
            move |_: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
                crate::adapters::xks::service::service(xks.clone())
            },
        ),
    )))
}

/// Starts the public listener ([`crate::app::public`]) with the configured protocols. Fails
/// when its TLS files do not load.
pub(super) fn start_public(
    listener: TcpListener,
    settings: &crate::app::public::PublicSettings,
    config: &Settings,
    state: Arc<AppState>,
    limits: crate::transport::listen::Limits,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let app = crate::app::public::router(&state, config)?;
    let salesforce = config.salesforce.as_ref();
    let client_ca = salesforce.and_then(|sf| sf.client_ca.clone());
    let crls = salesforce
        .map(|sf| sf.client_crls.clone())
        .unwrap_or_default();
    // Reloaded like the API's: on a CRL change and SIGHUP; a reload closes the open
    // connections of the certificates it revokes.
    let tls = {
        let settings = settings.clone();
        Arc::new(tls::TlsReloader::with_builder(
            crls,
            Box::new(move |crls| {
                crate::app::public::server_config(&settings, client_ca.as_deref(), crls)
            }),
        )?)
    };
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        dke = config.dke.is_some(),
        "listening (public: end-user protocols)"
    );
    tokio::spawn(tls_reloader(
        tls.clone(),
        config.tls.crl_poll,
        state.alerts.clone(),
        stop_rx.clone(),
    ));
    let mut rx = stop_rx;
    let current = tls.clone();
    Ok(tokio::spawn(crate::transport::listen::serve(
        listener,
        crate::transport::listen::Tls(
            move || current.config(),
            Some(tls as Arc<dyn crate::transport::listen::Revoker>),
        ),
        limits,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
        crate::transport::listen::Http::new(
            &limits,
            move |tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
                let app = app.clone();
                let presented = crate::adapters::ClientCertificate::of(tls.get_ref().1);
                let server_name = crate::app::public::ServerName::of(tls.get_ref().1);
                hyper::service::service_fn(
                    move |mut req: hyper::Request<crate::transport::request_body::RequestBody>| {
                        req.extensions_mut().insert(presented);
                        req.extensions_mut().insert(server_name.clone());
                        app.clone().oneshot(req)
                    },
                )
            },
        ),
    )))
}

/// Starts one Kubernetes KMS v2 plugin socket per `[[kubernetes]]` table
/// ([`crate::adapters::kubernetes`]). Fails when a socket cannot be bound.
pub(super) fn start_kubernetes(
    config: &Settings,
    state: &Arc<AppState>,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    use crate::adapters::kubernetes::{socket, Plugin};
    let mut tasks = Vec::with_capacity(config.kubernetes.len());
    for k in &config.kubernetes {
        let plugin = Arc::new(Plugin::new(state.clone(), k.clone()));
        let listener = socket::bind(&plugin)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", k.socket.display())))?;
        tracing::info!(socket = %k.socket.display(), key = %k.key, "listening (Kubernetes KMS v2)");
        tasks.push(tokio::spawn(socket::serve(
            listener,
            plugin,
            stop_rx.clone(),
        )));
    }
    Ok(tasks)
}

/// Starts the KMIP listener ([`crate::adapters::kmip`]) on the API's TLS (its client CA,
/// CRLs and reloads), within the server's `limits` as `[kmip]` adjusts them.
pub(super) fn start_kmip(
    listener: TcpListener,
    settings: &crate::adapters::kmip::KmipSettings,
    state: Arc<AppState>,
    sources: Arc<[crate::access::policy::IdentitySource]>,
    limits: crate::transport::listen::Limits,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "listening (KMIP)");
    let tls = state.tls.clone();
    let current = tls.clone();
    let kmip = crate::adapters::kmip::Kmip::new(state, settings, sources, limits.body_timeout);
    let mut rx = stop_rx;
    tokio::spawn(crate::transport::listen::serve(
        listener,
        crate::transport::listen::Tls(
            move || current.config(),
            Some(tls as Arc<dyn crate::transport::listen::Revoker>),
        ),
        settings.limits(limits),
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
        kmip,
    ))
}

/// Starts the plain-HTTP ops listener (`/healthz`, `/readyz`, `/metrics`).
pub(super) fn start_ops(
    listener: TcpListener,
    state: &AppState,
    limits: crate::transport::listen::Limits,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let router = crate::api::ops::router(state.keyring.clone(), state.metrics.clone());
    let mut rx = stop_rx;
    tokio::spawn(crate::transport::listen::serve(
        listener,
        crate::transport::listen::Plain,
        limits,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
        crate::transport::listen::Http::new(&limits, move |_: &tokio::net::TcpStream| {
            let router = router.clone();
            hyper::service::service_fn(
                move |req: hyper::Request<crate::transport::request_body::RequestBody>| {
                    router.clone().oneshot(req)
                },
            )
        }),
    ))
}

/// Serves the native API on the mTLS listener until `stop` completes: each connection's
/// client certificate becomes the [`PeerIdentity`] its requests carry.
pub(super) async fn serve_api(
    listener: TcpListener,
    state: Arc<AppState>,
    tls: Arc<tls::TlsReloader>,
    sources: Arc<[crate::access::policy::IdentitySource]>,
    limits: crate::transport::listen::Limits,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let app = crate::api::router(state, crate::adapters::transit::routes());
    let api_tls = tls.clone();
    crate::transport::listen::serve(
        listener,
        crate::transport::listen::Tls(
            move || api_tls.config(),
            Some(tls as Arc<dyn crate::transport::listen::Revoker>),
        ),
        limits,
        stop,
        crate::transport::listen::Http::new(
            &limits,
            move |tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
                let conn = tls.get_ref().1;
                let leaf = conn.peer_certificates().and_then(|chain| chain.first());
                let peer_identity = PeerIdentity {
                    identity: leaf
                        .and_then(|leaf| tls::identity_of(leaf, &sources))
                        .map(Arc::<str>::from),
                    revocation_key: leaf
                        .and_then(|leaf| tls::leaf_revocation_key(leaf))
                        .map(Arc::<[u8]>::from),
                };
                let app = app.clone();
                hyper::service::service_fn(
                    move |mut req: hyper::Request<crate::transport::request_body::RequestBody>| {
                        req.extensions_mut().insert(peer_identity.clone());
                        app.clone().oneshot(req)
                    },
                )
            },
        ),
    )
    .await;
}
