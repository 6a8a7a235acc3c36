//! Running the service: [`run`] takes bound listeners, settings and a shutdown future, so
//! the binary and the tests start it the same way (tests bind port 0).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use zeroize::Zeroizing;

use crate::api::{self, AppState, SealerFactory};
use crate::app::config::{SealSettings, Settings};
use crate::base::error::Error;
use crate::base::metrics::Metrics;
use crate::crypto::seal::{KeyFileSealer, PassphraseSealer, SealMethod, Sealer};
use crate::keyring::Keyring;
use crate::security::tls::{self, TlsError};
use crate::storage::{self, StoreError};

use super::{follower, listeners, tasks};

/// On a store shared by several nodes: how long a change made by one node may stay
/// unseen by another before the other fails closed (key use answers 503).
pub const SHARED_STORE_BOUND: Duration = Duration::from_secs(1);

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
    /// The KMIP listener (None: off; needs `[kmip]`).
    pub kmip: Option<TcpListener>,
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
    /// An adapter could not start (a credentials file, a signing key, a certificate).
    #[error(transparent)]
    Adapter(#[from] crate::adapters::SetupError),
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
    let pool = store.cluster().map(|c| c.pool());
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
    unseal_at_start(&keyring, factory(None)).await;
    let node_id = settings.store.node_id.clone().unwrap_or_else(|| {
        let host = crate::base::process::hostname();
        let port = listeners.api.local_addr().map(|a| a.port()).unwrap_or(0);
        format!("{host}:{port}")
    });
    let state = build_state(&settings, keyring.clone(), tls.clone(), factory, &node_id)?;
    let audit = state.audit.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = start_background(&settings, &state, tls.clone(), node_id, &stop_rx);
    let limits = crate::transport::listen::Limits {
        max_connections: settings.max_connections,
        max_handshakes: settings.max_handshakes,
        per_source: settings.per_source_connections,
        handshake_timeout: settings.tls.handshake_timeout,
        header_timeout: settings.header_timeout,
        body_timeout: settings.body_timeout,
        idle_timeout: settings.idle_timeout,
    };
    if let Some(ops) = listeners.ops {
        tasks.push(listeners::start_ops(ops, &state, limits, stop_rx.clone()));
    }
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
    if let (Some(listener), Some(public_settings)) = (
        start("public", listeners.public, settings.public.is_some()),
        &settings.public,
    ) {
        tasks.push(listeners::start_public(
            listener,
            public_settings,
            &settings,
            state.clone(),
            limits,
            stop_rx.clone(),
        )?);
    }
    if let (Some(listener), Some(xks_settings)) = (
        start("xks", listeners.xks, settings.xks.is_some()),
        &settings.xks,
    ) {
        tasks.push(listeners::start_xks(
            listener,
            xks_settings,
            state.clone(),
            limits,
            stop_rx.clone(),
        )?);
    }
    tasks.extend(listeners::start_kubernetes(&settings, &state, &stop_rx)?);
    if let (Some(listener), Some(kmip)) = (
        start("kmip", listeners.kmip, settings.kmip.is_some()),
        &settings.kmip,
    ) {
        tasks.push(listeners::start_kmip(
            listener,
            kmip,
            state.clone(),
            settings.identity_sources.clone().into(),
            limits,
            stop_rx.clone(),
        ));
    }
    tracing::info!(addr = ?listeners.api.local_addr().ok(), "listening (mTLS)");
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: draining connections");
        let _ = stop_tx.send(true);
    };
    let sources: Arc<[crate::access::policy::IdentitySource]> =
        settings.identity_sources.clone().into();
    listeners::serve_api(listeners.api, state, tls, sources, limits, stop).await;
    for t in tasks {
        let _ = t.await;
    }
    keyring.seal();
    let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    Ok(())
}

/// Unseals from the configured source when it can; else the server starts sealed and says
/// why.
async fn unseal_at_start(keyring: &Arc<Keyring>, sealer: Box<dyn Sealer>) {
    let k = keyring.clone();
    match tokio::task::spawn_blocking(move || k.unseal(sealer.as_ref())).await {
        Ok(Ok(())) => tracing::info!("unsealed from the configured source"),
        Ok(Err(Error::Seal(e)))
            if e.is_bad_secret() && matches!(e, crate::crypto::seal::SealError::NoSecret(_)) =>
        {
            tracing::warn!("starting sealed: no unseal secret given; POST /v1/sys/unseal to unseal")
        }
        // The seal error itself says what failed (a wrong PIN, a missing file); the
        // `Error` around it only says "unseal failed".
        Ok(Err(Error::Seal(e))) => {
            tracing::error!(error = %e, "starting sealed: unseal from the configured source failed")
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "starting sealed: unseal from the configured source failed")
        }
        Err(_) => tracing::error!("starting sealed: unseal task failed"),
    }
}

/// The state every request sees: the keyring with its hooks, the audit trail, the alerts,
/// the identity policy and the lockouts (shared on a PostgreSQL store).
fn build_state(
    settings: &Settings,
    keyring: Arc<Keyring>,
    tls: Arc<tls::TlsReloader>,
    factory: Box<SealerFactory>,
    node_id: &str,
) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
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
    {
        // The exfiltration brake: charged by every unwrap; a breach is alerted when it
        // begins.
        let alerts = alerts.clone();
        let brake = crate::access::brake::Brake::new(settings.brake.clone(), move |b| {
            let who = match &b.subject {
                crate::access::brake::Subject::Identity { identity, .. } => Some(identity.as_str()),
                crate::access::brake::Subject::Key { .. } => None,
            };
            tracing::warn!(subject = %b.subject, response = b.response, "exfiltration brake");
            alerts.raise(crate::security::alert::AlertEvent::new(
                crate::base::event::AlertKind::ExfiltrationSuspected,
                who,
                format!("{}: {}: {}", b.subject, b.cause, b.response),
            ));
        });
        if let Some(brake) = brake {
            keyring.set_brake(brake);
        }
    }
    let audit = if settings.audit_enabled {
        crate::security::audit::AuditLog::start_with(
            keyring.store().clone(),
            keyring.clone(),
            &settings.audit_path,
            &settings.audit_sink,
            alerts.clone(),
            Some(node_id.to_owned()),
            crate::security::audit::AuditOptions {
                policy: settings.audit_policy,
                counters: metrics.audit_counters(),
            },
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
            metrics,
            sealer: factory,
            audit,
            tls,
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
    Ok(state)
}

/// The tasks that run beside the listeners until the stop signal: the CRL reloader, the
/// key sweep, the cluster follower (PostgreSQL) and the audit disk watcher (a local chain).
fn start_background(
    settings: &Settings,
    state: &Arc<AppState>,
    tls: Arc<tls::TlsReloader>,
    node_id: String,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(tasks::tls_reloader(
            tls,
            settings.tls.crl_poll,
            state.alerts.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(tasks::key_sweeper(
            state.keyring.clone(),
            settings.sweep_interval,
            state.audit.clone(),
            state.alerts.clone(),
            stop_rx.clone(),
        )),
    ];
    if let (Some(retention), true) = (&settings.audit_retention, settings.audit_enabled) {
        tasks.push(tokio::spawn(crate::security::audit::retention::run(
            retention.clone(),
            state.audit.clone(),
            state.keyring.clone(),
            settings.audit_export.clone(),
            stop_rx.clone(),
        )));
    }
    for target in &settings.audit_export {
        tasks.push(tokio::spawn(crate::security::audit::export::run(
            target.clone(),
            state.audit.clone(),
            state.keyring.store().clone(),
            state.alerts.clone(),
            node_id.clone(),
            stop_rx.clone(),
        )));
    }
    if settings.store.engine == storage::Engine::Postgres {
        tasks.push(tokio::spawn(follower::change_follower(
            state.clone(),
            state.metrics.clone(),
            node_id,
            stop_rx.clone(),
        )));
    } else if settings.audit_enabled {
        // A shared store's chain is in the database: only a local file is watched.
        tasks.push(tokio::spawn(crate::security::audit::watch_disk(
            settings.audit_path.clone(),
            settings.audit_min_free,
            state.alerts.clone(),
            stop_rx.clone(),
        )));
    }
    tasks
}
