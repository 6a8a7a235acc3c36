//! The cluster follower: on a store other nodes share, this node's view of what the others
//! changed (keys, runtime identities, lockouts, the master key) and its heartbeat.

use std::sync::Arc;
use std::time::Duration;

use crate::api::AppState;
use crate::base::error::Error;
use crate::base::metrics::Metrics;
use crate::storage;

use super::server::SHARED_STORE_BOUND;

/// How often the change feed is read when no notification comes.
const CHANGE_POLL: Duration = Duration::from_millis(100);

/// Applies runtime-identity and lockout changes made on other nodes (`Meta` keys from the
/// change feed), and follows a master-key rotation.
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

/// On a store other nodes share: reads its change feed when notified (LISTEN/NOTIFY) and
/// at least every [`CHANGE_POLL`], drops
/// the keys other nodes changed from the cache, and confirms the cache fresh; if the
/// store cannot be read for [`SHARED_STORE_BOUND`], key use fails closed until it can.
/// Applies runtime-identity and lockout changes made on other nodes.
pub(super) async fn change_follower(
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
            heartbeat(&state, &metrics, &node_id).await;
        }
        let started = std::time::Instant::now();
        let store = keyring.store().clone();
        let at = cursor;
        let read = tokio::task::spawn_blocking(move || match (store.cluster(), at) {
            // Not shared: nothing changes behind this node's back.
            (None, _) => Ok((0, Some(Vec::new()))),
            (Some(c), None) => c.change_cursor().map(|cursor| (cursor, None)),
            (Some(c), Some(cursor)) => c.changes_since(cursor),
        })
        .await;
        match read {
            Ok(Ok((next, changed))) => {
                if !apply_changes(&state, cursor.is_none(), changed).await {
                    tokio::time::sleep(CHANGE_POLL).await;
                    continue;
                }
                // A request found the store's master key newer than this node's, and no
                // change on the feed said so (a rotation while it was sealed): look now.
                if keyring.take_master_behind() && !blocking(&state, follow_master).await {
                    tracing::error!("the master key's epoch could not be read: retrying");
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
            _ = tokio::task::spawn_blocking(move || match store.cluster() {
                Some(c) => c.wait_for_change(CHANGE_POLL),
                None => std::thread::sleep(CHANGE_POLL),
            }) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Runs `f` on the blocking pool; true when it succeeded.
async fn blocking(state: &Arc<AppState>, f: fn(&AppState) -> Result<(), Error>) -> bool {
    let s = state.clone();
    matches!(tokio::task::spawn_blocking(move || f(&s)).await, Ok(Ok(())))
}

/// Says this node is alive and records who else is (and the erasure epoch's state) for
/// `GET /v1/sys/cluster` and the metrics.
async fn heartbeat(state: &AppState, metrics: &Metrics, node_id: &str) {
    let keyring = state.keyring.clone();
    let store = keyring.store().clone();
    let id = node_id.to_owned();
    let beat = tokio::task::spawn_blocking(move || {
        let erasure = keyring.shared_erasure().and_then(|e| e.status().ok());
        store.cluster().map(|c| {
            c.heartbeat(&id, env!("CARGO_PKG_VERSION"))
                .map(|peers| (peers, erasure))
        })
    })
    .await;
    let cluster = match beat {
        Ok(Some(Ok((peers, erasure)))) => {
            metrics.set_cluster_nodes(peers.len());
            if let Some(e) = &erasure {
                metrics.set_erasure(e);
            }
            Some(kms_client::api::ClusterStatus {
                node: node_id.to_owned(),
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

/// Applies what the change feed returned: `Some(records)`, the keys to drop from the cache
/// and the identity and lockout changes to reload; `None` (the first read, or the feed no
/// longer reaches back), everything. False when something could not be applied: the feed
/// position must not move on, the caller retries.
async fn apply_changes(
    state: &Arc<AppState>,
    first: bool,
    changed: Option<Vec<(storage::Table, Vec<u8>)>>,
) -> bool {
    let keyring = &state.keyring;
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
            // Runtime identities and lockouts changed elsewhere: reloaded here before the
            // feed position moves on (a failure retries them).
            let others: Vec<Vec<u8>> = records
                .into_iter()
                .filter(|(t, _)| *t == storage::Table::Meta)
                .map(|(_, k)| k)
                .collect();
            if !others.is_empty() {
                let s = state.clone();
                let applied =
                    tokio::task::spawn_blocking(move || apply_meta_changes(&s, &others)).await;
                if !matches!(applied, Ok(Ok(()))) {
                    tracing::error!(
                        "identity or lockout change from another node not applied yet: retrying"
                    );
                    return false;
                }
            }
        }
        None => {
            keyring.invalidate_all();
            // A master-key rotation committed between this node's unseal and the feed's
            // first position is in no change it will read: look.
            if first && !blocking(state, follow_master).await {
                tracing::error!("the master key's epoch could not be read: retrying");
                return false;
            }
            if !first && !blocking(state, reload_meta).await {
                tracing::error!(
                    "identities and lockouts not reloaded after a gap in the change feed: retrying"
                );
                return false;
            }
        }
    }
    true
}
