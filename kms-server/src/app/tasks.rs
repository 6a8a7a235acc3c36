//! The server's background tasks: the reloaders (CRLs, XKS credentials and TLS files, on a
//! file change or SIGHUP) and the key sweep (usage counters, deletions due, rotations due).

use std::sync::Arc;
use std::time::Duration;

use crate::keyring::Keyring;
use crate::security::tls;

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
pub(super) async fn tls_reloader(
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
pub(super) async fn key_sweeper(
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

/// Reloads XKS credentials when their files change (poll) and on SIGHUP, and the XKS TLS
/// files on SIGHUP. A failed reload keeps what was in force, logs, and raises
/// `xks_reload_failed`.
pub(super) async fn xks_reloader(
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
