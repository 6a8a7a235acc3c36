//! Running the service: [`run`] takes bound listeners, settings and a shutdown future, so
//! the binary and the tests start it the same way (tests bind port 0).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tower::ServiceExt;
use zeroize::Zeroizing;

use crate::api::{self, AppState, PeerIdentity, SealerFactory};
use crate::app::config::{SealSettings, Settings};
use crate::base::error::Error;
use crate::base::metrics::Metrics;
use crate::crypto::seal::{KeyFileSealer, PassphraseSealer, SealMethod, Sealer};
use crate::keyring::Keyring;
use crate::security::tls::{self, TlsError};
use crate::storage::{self, StoreError};

/// On a store shared by several nodes: how long a change made by one node may stay
/// unseen by another before the other fails closed (key use answers 503).
pub const SHARED_STORE_BOUND: Duration = Duration::from_secs(1);
/// How often a node reads the shared store's change feed.
const CHANGE_POLL: Duration = Duration::from_millis(100);

/// Environment variable that may carry the unseal passphrase at start.
pub const PASSPHRASE_ENV: &str = "KEYHOLD_PASSPHRASE";

/// The listeners the server serves.
pub struct Listeners {
    /// The mTLS API.
    pub api: TcpListener,
    /// The plain-HTTP ops endpoints (None: off).
    pub ops: Option<TcpListener>,
    /// The AWS XKS endpoint (None: off; needs `[xks]`).
    pub xks: Option<TcpListener>,
    /// The public listener of the end-user protocols (None: off; needs `[public]`).
    pub public: Option<TcpListener>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be opened.
    #[error("opening the {engine} store at {path}")]
    Store {
        /// Engine.
        engine: String,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The store has no master key yet.
    #[error("the store at {0} is not initialized: run `kms-server init --config <file>` first")]
    NotInitialized(String),
    /// TLS files or settings.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A keyring failure at start.
    #[error(transparent)]
    Keyring(#[from] Error),
    /// I/O on a listener.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The XKS endpoint could not start (a credentials file).
    #[error("{0}")]
    Xks(String),
    /// The public listener could not start.
    #[error("{0}")]
    Public(String),
}

/// Opens the configured store.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn storage::KeyStore>, StartError> {
    // A new sled store only with the operator's acceptance; an existing one with a warning.
    #[cfg(feature = "sled")]
    if settings.store.engine == storage::Engine::Sled {
        storage::SledStore::check_store(&settings.store.path, settings.store.accept_sled_risks)
            .map_err(|source| StartError::Store {
                engine: "sled".into(),
                path: settings.store.path.display().to_string(),
                source,
            })?;
    }
    storage::open_with(
        settings.store.engine,
        &settings.store.path,
        settings.store.postgres.as_ref(),
    )
    .map_err(|source| StartError::Store {
        engine: format!("{:?}", settings.store.engine).to_lowercase(),
        path: settings.store.path.display().to_string(),
        source,
    })
}

/// The keyring over the configured store, with the erasure file beside it
/// (`<store path>.erasure`: see [`crate::storage::erasure`]) and `clock`.
pub fn open_keyring(
    settings: &Settings,
    clock: crate::base::clock::Clock,
) -> Result<Keyring, StartError> {
    let store = open_store(settings)?;
    let pool = store.postgres();
    let erasure =
        crate::storage::erasure::ErasureFile::open(&settings.store.path.with_extension("erasure"))?;
    let keyring = Keyring::with_clock(store, clock)
        .with_erasure(Arc::new(erasure))
        .with_cache_limit(settings.cache_keys);
    Ok(if settings.store.engine == storage::Engine::Postgres {
        // Shared by several nodes: a local erasure file would make new keys unreadable on
        // every other node, and a cached key must not outlive a change made elsewhere.
        let keyring = keyring
            .without_new_erasure_keys()
            .with_freshness_bound(SHARED_STORE_BOUND);
        match (settings.store.shared_erasure_retention_secs, pool) {
            (Some(retention), Some(pool)) => {
                let token =
                    crate::crypto::seal::Pkcs11Sealer::from_settings(settings.seal.pkcs11.clone());
                keyring.with_shared_erasure(crate::storage::erasure::SharedErasure::new(
                    pool, token, retention,
                ))
            }
            _ => {
                tracing::warn!(
                    "shared store without erasure keys ([store] erasure needs [seal] method = \"pkcs11\"): \
                     a destroyed key stays recoverable from database backups and WAL by whoever holds the master key, \
                     until they expire (docs/ha.md)"
                );
                keyring
            }
        }
    } else {
        keyring
    })
}

/// Reads the passphrase configured for start-up: the passphrase file, else the
/// environment. `None` when neither is set.
pub fn startup_passphrase(seal: &SealSettings) -> Result<Option<Zeroizing<String>>, Error> {
    if let Some(path) = &seal.passphrase_file {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            Error::Seal(crate::crypto::seal::SealError::KeyFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        })?);
        return Ok(Some(Zeroizing::new(
            text.trim_end_matches(['\n', '\r']).to_owned(),
        )));
    }
    Ok(std::env::var(PASSPHRASE_ENV).ok().map(Zeroizing::new))
}

/// The sealer for `seal` with an optional passphrase.
pub fn sealer_for(seal: &SealSettings, passphrase: Option<Zeroizing<String>>) -> Box<dyn Sealer> {
    match seal.method {
        SealMethod::KeyFile => Box::new(KeyFileSealer::new(
            seal.key_file.clone().unwrap_or_default(),
        )),
        SealMethod::Passphrase => Box::new(PassphraseSealer::new(passphrase, seal.argon2)),
        // Config validation requires [seal.pkcs11] for this method; without it every
        // token operation fails saying so.
        SealMethod::Pkcs11 => Box::new(crate::crypto::seal::Pkcs11Sealer::from_settings(
            seal.pkcs11.clone(),
        )),
        // Shares arrive one by one over `POST /v1/sys/unseal` (see `routes::sys`).
        _ => Box::new(crate::crypto::seal::ShamirSealer::from_shares(Vec::new())),
    }
}

fn sealer_factory(settings: &Settings) -> Box<SealerFactory> {
    let seal = settings.seal.clone();
    Box::new(move |given: Option<Zeroizing<String>>| {
        let passphrase = match given {
            Some(p) => Some(p),
            None => startup_passphrase(&seal).ok().flatten(),
        };
        sealer_for(&seal, passphrase)
    })
}

/// When a reloader looks again: on SIGHUP, or every `poll` (to see whether its files
/// changed).
struct ReloadTrigger {
    hup: Option<tokio::signal::unix::Signal>,
    poll: Option<Duration>,
}

impl ReloadTrigger {
    fn new(poll: Option<Duration>, what: &str) -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: {what} reload on file change only");
                None
            }
        };
        Self { hup, poll }
    }

    /// `Some(true)`: SIGHUP; `Some(false)`: the poll interval passed; `None`: stop.
    async fn next(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Option<bool> {
        let poll = self.poll;
        tokio::select! {
            Some(()) = async { match self.hup.as_mut() { Some(h) => h.recv().await, None => None } } => Some(true),
            () = async { match poll { Some(p) => tokio::time::sleep(p).await, None => std::future::pending().await } } => Some(false),
            _ = stop.wait_for(|s| *s) => None,
        }
    }
}

/// Reloads the CRLs when a file changes or on SIGHUP. A failed reload keeps the previous
/// configuration, logs and raises a `tls_reload_failed` alert.
async fn tls_reloader(
    tls: Arc<tls::TlsReloader>,
    poll: Option<Duration>,
    alerts: crate::security::alert::Alerter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut trigger = ReloadTrigger::new(poll, "CRLs");
    loop {
        let Some(by_signal) = trigger.next(&mut stop).await else {
            return;
        };
        if !by_signal && !tls.changed() {
            continue;
        }
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.reload()).await {
            Ok(Ok(n)) => tracing::info!(
                revoked = n,
                by_signal,
                "TLS configuration and CRLs reloaded"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "CRL reload failed; the previous CRLs stay in force");
                alerts.raise(crate::security::alert::AlertEvent::new(
                    crate::base::event::AlertKind::TlsReloadFailed,
                    None,
                    e.to_string(),
                ));
            }
            Err(_) => tracing::error!("CRL reload task failed"),
        }
    }
}

/// The key sweep: at start, then every `[keys] sweep_interval_secs`, saves the usage
/// counters that changed, destroys keys whose
/// deletion window has ended (once unsealed: a record must authenticate before a key is
/// erased, see `keyring::integrity`) and rotates keys whose rotation period has
/// passed (needs the master key). Each gets an audit record (`SYSTEM destroy-key`,
/// `SYSTEM rotate-key`); each destruction also a `key_destroyed` alert.
async fn key_sweeper(
    keyring: Arc<Keyring>,
    interval: Duration,
    audit: crate::security::audit::AuditLog,
    alerts: crate::security::alert::Alerter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let system_record = |operation: &str, tenant: &str, key: &str, version: Option<u32>| {
        crate::security::audit::AuditDraft {
            tenant: Some(tenant.to_owned()),
            operation: operation.to_owned(),
            key: Some(key.to_owned()),
            version,
            outcome: "ok".into(),
            ..Default::default()
        }
    };
    loop {
        let k = keyring.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let now = k.clock().now();
            if let Err(e) = k.flush_usage() {
                tracing::warn!(error = %e, "usage counters not saved; will retry");
            }
            let destroyed = k.destroy_due(now);
            // A destruction whose erasure epoch could not be rotated is committed but not
            // yet final (`erasure::shared`): say so every sweep until a rotation succeeds.
            let pending = k
                .shared_erasure()
                .and_then(|e| e.status().ok())
                .filter(|s| s.rotation_pending);
            (destroyed, k.rotate_due(now), pending)
        })
        .await;
        match swept {
            Ok((destroyed, rotated, pending)) => {
                if let Some(status) = pending {
                    tracing::error!(epoch = status.epoch, "erasure epoch rotation pending: destroyed keys stay recoverable from older database copies until it succeeds");
                    alerts.raise(crate::security::alert::AlertEvent::new(
                        crate::base::event::AlertKind::ErasureRotationPending,
                        None,
                        format!(
                            "erasure epoch {} awaits its rotation after a destruction; retrying every sweep",
                            status.epoch
                        ),
                    ));
                }
                match destroyed {
                    Ok(destroyed) => {
                        for (tenant, name) in destroyed {
                            tracing::warn!(%tenant, key = %name, "key destroyed: its deletion window ended");
                            let draft = system_record("SYSTEM destroy-key", &tenant, &name, None);
                            if let Err(e) = audit.append(draft).await {
                                tracing::error!(error = %e, "could not audit a key destruction");
                            }
                            alerts.raise(crate::security::alert::AlertEvent::new(
                                crate::base::event::AlertKind::KeyDestroyed,
                                None,
                                format!("{name} (tenant {tenant})"),
                            ));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "deletion sweep failed; will retry"),
                }
                match rotated {
                    Ok(rotated) => {
                        for (tenant, name, version) in rotated {
                            tracing::info!(%tenant, key = %name, version, "key rotated: its rotation period passed");
                            let draft =
                                system_record("SYSTEM rotate-key", &tenant, &name, Some(version));
                            if let Err(e) = audit.append(draft).await {
                                tracing::error!(error = %e, "could not audit a key rotation");
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "rotation sweep failed; will retry"),
                }
            }
            Err(_) => tracing::error!("key sweep task failed; will retry"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Serves the API (mTLS) and ops listeners until `shutdown` completes, then drains open
/// connections (up to 10 s) and returns, closing the store.
///
/// The store must be initialized. The server unseals from its configured source when it
/// can (key file; passphrase file or `KEYHOLD_PASSPHRASE`), else starts sealed and waits
/// for `POST /v1/sys/unseal`.
pub async fn run(
    listeners: Listeners,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    run_with_clock(
        listeners,
        settings,
        shutdown,
        crate::base::clock::Clock::system(),
    )
    .await
}

/// [`run`] on another clock (tests: automatic rotation and destruction without waiting).
pub async fn run_with_clock(
    listeners: Listeners,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
    clock: crate::base::clock::Clock,
) -> Result<(), StartError> {
    let keyring = Arc::new(open_keyring(&settings, clock)?);
    if keyring.sealed_master_key()?.is_none() {
        return Err(StartError::NotInitialized(
            settings.store.path.display().to_string(),
        ));
    }
    let tls = Arc::new(tls::TlsReloader::new(&settings.tls)?);
    let factory = sealer_factory(&settings);
    {
        let k = keyring.clone();
        let sealer = factory(None);
        match tokio::task::spawn_blocking(move || k.unseal(sealer.as_ref())).await {
            Ok(Ok(())) => tracing::info!("unsealed from the configured source"),
            Ok(Err(Error::Seal(e)))
                if e.is_bad_secret()
                    && matches!(e, crate::crypto::seal::SealError::NoSecret(_)) =>
            {
                tracing::warn!(
                    "starting sealed: no unseal secret given; POST /v1/sys/unseal to unseal"
                )
            }
            Ok(Err(Error::Seal(e))) => {
                tracing::error!(error = %e, "starting sealed: unseal from the configured source failed")
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "starting sealed: unseal from the configured source failed")
            }
            Err(_) => tracing::error!("starting sealed: unseal task failed"),
        }
    }
    let metrics = Arc::new(Metrics::new());
    let limits = crate::transport::listen::Limits {
        max_connections: settings.max_connections,
        max_handshakes: settings.max_handshakes,
        per_source: settings.per_source_connections,
        handshake_timeout: settings.tls.handshake_timeout,
        header_timeout: settings.header_timeout,
        body_timeout: settings.body_timeout,
        idle_timeout: settings.idle_timeout,
    };
    let sources = settings.identity_sources.clone();
    let alerts = crate::security::alert::Alerter::start(&settings.alerts);
    {
        // A stored record the keyring refuses (a version that does not open, a record
        // that fails authentication) is alerted and counted, at once.
        let (alerts, metrics) = (alerts.clone(), metrics.clone());
        keyring.on_integrity_event(Box::new(move |kind, detail| {
            metrics.integrity_event(kind.as_str());
            alerts.raise(crate::security::alert::AlertEvent::new(kind, None, detail));
        }));
    }
    let node_id = settings.store.node_id.clone().unwrap_or_else(|| {
        let host = crate::base::process::hostname();
        let port = listeners.api.local_addr().map(|a| a.port()).unwrap_or(0);
        format!("{host}:{port}")
    });
    let audit = if settings.audit_enabled {
        crate::security::audit::AuditLog::start(
            keyring.store().clone(),
            keyring.clone(),
            &settings.audit_path,
            &settings.audit_sink,
            alerts.clone(),
            Some(node_id.clone()),
        )?
    } else {
        tracing::warn!(
            "AUDIT TRAIL DISABLED ([audit] enabled = false): for cost measurements only"
        );
        crate::security::audit::AuditLog::disabled()
    };
    // Runtime identities and shared lockouts are signed and checked by the keyring.
    let signer: Arc<dyn crate::crypto::authstate::StateSigner> = keyring.clone();
    let policy = crate::access::policy::Policy::with_store(
        &settings.identities,
        keyring.store().clone(),
        signer.clone(),
    )?;
    let lockouts = crate::access::lockout::Lockouts::new(settings.lockout);
    let lockouts = if settings.store.engine == storage::Engine::Postgres {
        lockouts.shared(keyring.store().clone(), signer)?
    } else {
        lockouts
    };
    let api_settings = api::ApiSettings {
        max_body_bytes: settings.max_body_bytes,
        body_timeout: settings.body_timeout,
        max_batch_items: settings.max_batch_items,
        seal_method: settings.seal.method,
        store_engine: settings.store.engine,
    };
    let state = Arc::new(AppState::new(
        keyring.clone(),
        api_settings,
        api::Services {
            metrics: metrics.clone(),
            sealer: factory,
            audit: audit.clone(),
            tls: tls.clone(),
            policy,
            alerts,
            lockouts,
        },
    ));
    {
        // At each unseal: sign a store's runtime identities from before identity MACs,
        // and apply the stored lockouts a sealed node could not check.
        let state = Arc::downgrade(&state);
        keyring.on_unseal(Box::new(move || {
            let Some(state) = state.upgrade() else {
                return;
            };
            if let Err(e) = state.policy.sign_legacy() {
                tracing::error!(error = %e, "runtime identities not checked at unseal");
            }
            if let Err(e) = state.lockouts.reload() {
                tracing::error!(error = %e, "stored lockouts not read at unseal");
            }
        }));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reloader = tokio::spawn(tls_reloader(
        tls.clone(),
        settings.tls.crl_poll,
        state.alerts.clone(),
        stop_rx.clone(),
    ));
    let sweeper = tokio::spawn(key_sweeper(
        keyring.clone(),
        settings.sweep_interval,
        audit.clone(),
        state.alerts.clone(),
        stop_rx.clone(),
    ));
    let follower = (settings.store.engine == storage::Engine::Postgres).then(|| {
        tokio::spawn(change_follower(
            state.clone(),
            metrics.clone(),
            node_id,
            stop_rx.clone(),
        ))
    });
    // A shared store's chain is in the database: no local file to watch.
    let local_chain = settings.store.engine != storage::Engine::Postgres;
    let disk_watcher = (settings.audit_enabled && local_chain).then(|| {
        tokio::spawn(crate::security::audit::watch_disk(
            settings.audit_path.clone(),
            settings.audit_min_free,
            state.alerts.clone(),
            stop_rx.clone(),
        ))
    });
    let app = api::router(state.clone());
    let ops_task = listeners.ops.map(|ops| {
        let router = crate::api::ops::router(keyring.clone(), metrics.clone());
        let mut rx = stop_rx.clone();
        tokio::spawn(crate::transport::listen::serve(
            ops,
            crate::transport::listen::Plain,
            limits,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
            move |_: &tokio::net::TcpStream| {
                let router = router.clone();
                hyper::service::service_fn(
                    move |req: hyper::Request<crate::transport::request_body::RequestBody>| {
                        router.clone().oneshot(req)
                    },
                )
            },
        ))
    });
    // The other listeners: each started when both its table and its socket are there.
    let start =
        |table: &str, listener: Option<TcpListener>, configured: bool| match (listener, configured)
        {
            (Some(l), true) => Some(l),
            (None, true) => {
                tracing::warn!(
                    "[{table}] is configured but no listener was given for it: it is off"
                );
                None
            }
            _ => None,
        };
    let public_task = match (
        start("public", listeners.public, settings.public.is_some()),
        &settings.public,
    ) {
        (Some(listener), Some(public_settings)) => Some(start_public(
            listener,
            public_settings,
            &settings,
            state.clone(),
            limits,
            stop_rx.clone(),
        )?),
        _ => None,
    };
    let xks_task = match (
        start("xks", listeners.xks, settings.xks.is_some()),
        &settings.xks,
    ) {
        (Some(listener), Some(xks_settings)) => Some(start_xks(
            listener,
            xks_settings,
            state.clone(),
            limits,
            stop_rx.clone(),
        )?),
        _ => None,
    };
    let sources: Arc<[crate::access::policy::IdentitySource]> = sources.into();
    tracing::info!(addr = ?listeners.api.local_addr().ok(), "listening (mTLS)");
    let api_tls = tls.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: draining connections");
        let _ = stop_tx.send(true);
    };
    crate::transport::listen::serve(
        listeners.api,
        crate::transport::listen::Tls(
            move || api_tls.config(),
            Some(tls.clone() as Arc<dyn crate::transport::listen::Revoker>),
        ),
        limits,
        stop,
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
    )
    .await;
    if let Some(t) = public_task {
        let _ = t.await;
    }
    if let Some(t) = xks_task {
        let _ = t.await;
    }
    if let Some(t) = ops_task {
        let _ = t.await;
    }
    let _ = sweeper.await;
    if let Some(t) = follower {
        let _ = t.await;
    }
    let _ = reloader.await;
    if let Some(t) = disk_watcher {
        let _ = t.await;
    }
    keyring.seal();
    let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    Ok(())
}

/// On a store other nodes share: reads its change feed when notified (LISTEN/NOTIFY) and
/// at least every [`CHANGE_POLL`], drops
/// the keys other nodes changed from the cache, and confirms the cache fresh; if the
/// store cannot be read for [`SHARED_STORE_BOUND`], key use fails closed until it can.
/// Applies runtime-identity and lockout changes made on other nodes (`Meta` keys from the
/// change feed).
fn apply_meta_changes(state: &AppState, keys: &[Vec<u8>]) -> Result<(), Error> {
    if keys
        .iter()
        .any(|k| k.starts_with(storage::META_MASTER_PREFIX))
    {
        follow_master(state)?;
    }
    for key in keys {
        if let Some(id) = key.strip_prefix(storage::META_IDENTITY_PREFIX) {
            if let Ok(identity) = std::str::from_utf8(id) {
                state.policy.refresh(identity)?;
            }
        } else if let Some(id) = key.strip_prefix(storage::META_LOCKOUT_PREFIX) {
            if let Ok(identity) = std::str::from_utf8(id) {
                state.lockouts.refresh(identity)?;
            }
        }
    }
    Ok(())
}

/// The master key was rotated on another node (its epoch record changed): re-open the new
/// sealed master key with this node's configured seal source (key file, HSM, passphrase
/// file), or, when that cannot open it by itself (Shamir shares, a passphrase given at
/// unseal), seal this node and say why: until then its sealing writes are refused by the
/// store, never committed under the retired key.
fn follow_master(state: &AppState) -> Result<(), Error> {
    let sealer = (state.sealer)(None);
    match state.keyring.follow_master(sealer.as_ref()) {
        Ok(true) => state.alerts.raise(crate::security::alert::AlertEvent::new(
            crate::base::event::AlertKind::MasterKeyFollowed,
            None,
            "the master key was rotated on another node; this node re-opened it",
        )),
        Ok(false) => {}
        // The store could not be read: not a reason to seal; the follower tries again
        // (meanwhile the store refuses this node's sealing writes).
        Err(e @ Error::Storage(_)) => return Err(e),
        Err(e) => {
            tracing::error!(
                error = %e,
                "the master key was rotated on another node and this node's seal source cannot open the new one: sealing; unseal this node again"
            );
            state.keyring.seal();
            state.alerts.raise(crate::security::alert::AlertEvent::new(
                crate::base::event::AlertKind::Sealed,
                None,
                "the master key was rotated on another node; this node could not open the new one and sealed itself: unseal it",
            ));
        }
    }
    Ok(())
}

/// After a gap in the change feed: every runtime identity and lockout, from the store.
fn reload_meta(state: &AppState) -> Result<(), Error> {
    follow_master(state)?;
    let store = state.keyring.store();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for prefix in [storage::META_IDENTITY_PREFIX, storage::META_LOCKOUT_PREFIX] {
        keys.extend(
            store
                .scan_prefix(storage::Table::Meta, prefix)?
                .into_iter()
                .map(|(k, _)| k),
        );
    }
    // Removed ones are no longer in the store: those this node knows are checked too.
    keys.extend(state.policy.runtime_identities().into_iter().map(|id| {
        let mut k = storage::META_IDENTITY_PREFIX.to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }));
    keys.extend(state.lockouts.list().into_iter().map(|(id, _)| {
        let mut k = storage::META_LOCKOUT_PREFIX.to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }));
    apply_meta_changes(state, &keys)
}

async fn change_follower(
    state: Arc<AppState>,
    metrics: Arc<Metrics>,
    node_id: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let keyring = state.keyring.clone();
    let mut cursor: Option<u64> = None;
    let mut failing = false;
    let mut last_heartbeat: Option<std::time::Instant> = None;
    loop {
        // About once a second: say this node is alive, and learn who else is.
        if last_heartbeat.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_heartbeat = Some(std::time::Instant::now());
            let store = keyring.store().clone();
            let id = node_id.clone();
            let k = keyring.clone();
            let beat = tokio::task::spawn_blocking(move || {
                let erasure = k.shared_erasure().and_then(|e| e.status().ok());
                store
                    .heartbeat(&id, env!("CARGO_PKG_VERSION"))
                    .map(|peers| peers.map(|p| (p, erasure)))
            })
            .await;
            let cluster = match beat {
                Ok(Ok(Some((peers, erasure)))) => {
                    metrics.set_cluster_nodes(peers.len());
                    if let Some(e) = &erasure {
                        metrics.set_erasure(e);
                    }
                    Some(kms_client::api::ClusterStatus {
                        node: node_id.clone(),
                        peers: peers
                            .into_iter()
                            .map(|(id, version, seen_ms_ago)| kms_client::api::PeerStatus {
                                id,
                                version,
                                seen_ms_ago,
                            })
                            .collect(),
                        erasure,
                    })
                }
                _ => None,
            };
            *state
                .cluster
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = cluster;
        }
        let started = std::time::Instant::now();
        let store = keyring.store().clone();
        let at = cursor;
        let read = tokio::task::spawn_blocking(move || match at {
            None => store.change_cursor().map(|c| (c.unwrap_or(0), None)),
            Some(c) => store.changes_since(c),
        })
        .await;
        match read {
            Ok(Ok((next, changed))) => {
                match changed {
                    Some(records) => {
                        let ids: Vec<[u8; 16]> = records
                            .iter()
                            .filter(|(t, _)| *t == storage::Table::Keys)
                            .filter_map(|(_, k)| <[u8; 16]>::try_from(k.as_slice()).ok())
                            .collect();
                        if !ids.is_empty() {
                            tracing::debug!(keys = ids.len(), "keys changed on another node");
                            keyring.invalidate(&ids);
                        }
                        // Runtime identities and lockouts changed elsewhere: reloaded here
                        // before the feed position moves on (a failure retries them).
                        let others: Vec<Vec<u8>> = records
                            .into_iter()
                            .filter(|(t, _)| *t == storage::Table::Meta)
                            .map(|(_, k)| k)
                            .collect();
                        if !others.is_empty() {
                            let s = state.clone();
                            let applied = tokio::task::spawn_blocking(move || {
                                apply_meta_changes(&s, &others)
                            })
                            .await;
                            if !matches!(applied, Ok(Ok(()))) {
                                tracing::error!("identity or lockout change from another node not applied yet: retrying");
                                tokio::time::sleep(CHANGE_POLL).await;
                                continue;
                            }
                        }
                    }
                    // First read, or the feed no longer reaches back: forget everything.
                    None => {
                        keyring.invalidate_all();
                        // A master-key rotation committed between this node's unseal and
                        // the feed's first position is in no change it will read: look.
                        if cursor.is_none() {
                            let s = state.clone();
                            let followed =
                                tokio::task::spawn_blocking(move || follow_master(&s)).await;
                            if !matches!(followed, Ok(Ok(()))) {
                                tracing::error!(
                                    "the master key's epoch could not be read: retrying"
                                );
                                tokio::time::sleep(CHANGE_POLL).await;
                                continue;
                            }
                        }
                        if cursor.is_some() {
                            let s = state.clone();
                            let reloaded =
                                tokio::task::spawn_blocking(move || reload_meta(&s)).await;
                            if !matches!(reloaded, Ok(Ok(()))) {
                                tracing::error!("identities and lockouts not reloaded after a gap in the change feed: retrying");
                                tokio::time::sleep(CHANGE_POLL).await;
                                continue;
                            }
                        }
                    }
                }
                // A request found the store's master key newer than this node's, and no
                // change on the feed said so (a rotation while it was sealed): look now.
                if keyring.take_master_behind() {
                    let s = state.clone();
                    if !matches!(
                        tokio::task::spawn_blocking(move || follow_master(&s)).await,
                        Ok(Ok(()))
                    ) {
                        tracing::error!("the master key's epoch could not be read: retrying");
                    }
                }
                cursor = Some(next);
                keyring.confirm_fresh(started);
                if failing {
                    tracing::info!("shared store change feed readable again");
                    failing = false;
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::error!(error = %e, "shared store change feed unreadable: key use fails closed after {} ms", SHARED_STORE_BOUND.as_millis());
                    failing = true;
                }
            }
            Err(_) => tracing::error!("change feed task failed"),
        }
        // Until a notification (LISTEN) or the poll interval, whichever comes first: a
        // missed notification costs at most one interval.
        let store = keyring.store().clone();
        tokio::select! {
            _ = tokio::task::spawn_blocking(move || store.wait_for_change(CHANGE_POLL)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Starts the XKS listener ([`crate::adapters::xks`]) and its reloader (credential files on change
/// and SIGHUP; the TLS files on SIGHUP). Fails when a credentials file or the TLS files do
/// not load.
fn start_xks(
    listener: TcpListener,
    settings: &crate::adapters::xks::settings::XksSettings,
    state: Arc<AppState>,
    limits: crate::transport::listen::Limits,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let xks =
        Arc::new(crate::adapters::xks::Xks::new(state.clone(), settings).map_err(StartError::Xks)?);
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
        move |_: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
            crate::adapters::xks::service::service(xks.clone())
        },
    )))
}

/// Starts the public listener ([`crate::app::public`]) with the configured protocols. Fails
/// when its TLS files do not load.
fn start_public(
    listener: TcpListener,
    settings: &crate::app::public::PublicSettings,
    config: &Settings,
    state: Arc<AppState>,
    limits: crate::transport::listen::Limits,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let app = crate::app::public::router(&state, config).map_err(StartError::Public)?;
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
        move |tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
            let app = app.clone();
            let presented = crate::adapters::ClientCertificate::of(tls.get_ref().1);
            hyper::service::service_fn(
                move |mut req: hyper::Request<crate::transport::request_body::RequestBody>| {
                    req.extensions_mut().insert(presented);
                    app.clone().oneshot(req)
                },
            )
        },
    )))
}

/// Reloads XKS credentials when their files change (poll) and on SIGHUP, and the XKS TLS
/// files on SIGHUP. A failed reload keeps what was in force, logs, and raises
/// `xks_reload_failed`.
async fn xks_reloader(
    xks: Arc<crate::adapters::xks::Xks>,
    tls: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
    settings: crate::adapters::xks::settings::XksSettings,
    alerts: crate::security::alert::Alerter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut trigger = ReloadTrigger::new(settings.credentials_poll, "XKS credentials");
    let failed = |what: String| {
        tracing::error!(error = %what, "XKS reload failed; the previous configuration stays in force");
        alerts.raise(crate::security::alert::AlertEvent::new(
            crate::base::event::AlertKind::XksReloadFailed,
            None,
            what,
        ));
    };
    loop {
        let Some(by_signal) = trigger.next(&mut stop).await else {
            return;
        };
        for (name, set) in xks.credential_sets() {
            if !by_signal && !set.changed() {
                continue;
            }
            match set.reload() {
                Ok(ids) => {
                    tracing::info!(store = name, access_key_ids = ?ids, "XKS credentials reloaded")
                }
                Err(e) => failed(format!("store {name}: {e}")),
            }
        }
        if by_signal {
            match crate::adapters::xks::tls::server_config(&settings) {
                Ok(c) => {
                    *tls.write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = c;
                    tracing::info!("XKS TLS configuration reloaded");
                }
                Err(e) => failed(format!("TLS: {e}")),
            }
        }
    }
}
