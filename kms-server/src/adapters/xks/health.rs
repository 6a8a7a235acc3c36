//! GetHealthStatus: a deep check ([`crate::keyring::Keyring::self_test`]: unsealed, a
//! store read, a seal/open round trip on a dedicated test key) run at most once per
//! `health_cache_secs` (at most 60 s, as the specification allows) and shared by the
//! requests that arrive meanwhile. Never a key of a KMS key, so no CloudTrail-less crypto
//! shows up on customer keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::api::{FleetMember, HealthResponse};
use crate::keyring::Keyring;

/// The cached result.
pub struct HealthCache {
    ttl: Duration,
    fleet_size: u32,
    node_id: String,
    model: String,
    last: tokio::sync::Mutex<Option<(Instant, &'static str)>>,
}

impl HealthCache {
    /// A cache whose results live `ttl`.
    pub fn new(ttl: Duration, fleet_size: u32, node_id: String, engine: &str) -> Self {
        Self {
            ttl,
            fleet_size,
            node_id,
            model: format!("Keyhold {} ({engine} store)", env!("CARGO_PKG_VERSION")),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// This node's status: `ACTIVE` when the deep check passes, else `UNAVAILABLE`
    /// (sealed, store unreadable, crypto failing: the log says which).
    pub async fn status(&self, keyring: &Arc<Keyring>) -> &'static str {
        // One check at a time; the others wait and reuse it.
        let mut last = self.last.lock().await;
        if let Some((at, status)) = *last {
            if at.elapsed() < self.ttl {
                return status;
            }
        }
        let k = keyring.clone();
        let status = match tokio::task::spawn_blocking(move || k.self_test()).await {
            Ok(Ok(())) => "ACTIVE",
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "XKS health: the deep check failed");
                "UNAVAILABLE"
            }
            Err(_) => "UNAVAILABLE",
        };
        *last = Some((Instant::now(), status));
        status
    }

    /// The answer for this node's `status`. On a shared store (`cluster`), the fleet is
    /// the nodes seen in the last 10 s (at most 10 listed, this node first): each other
    /// node is `ACTIVE` if it reported in the last 3 s, else `DEGRADED`.
    pub fn response(
        &self,
        status: &'static str,
        cluster: Option<&kms_client::api::ClusterStatus>,
    ) -> HealthResponse {
        let me = FleetMember {
            id: self.node_id.clone(),
            model: self.model.clone(),
            health_status: status,
        };
        let (size, details) = match cluster {
            Some(c) if !c.peers.is_empty() => {
                let mut details = vec![FleetMember {
                    id: c.node.clone(),
                    ..me
                }];
                details.extend(c.peers.iter().filter(|p| p.id != c.node).take(9).map(|p| {
                    FleetMember {
                        id: p.id.clone(),
                        model: format!("Keyhold {}", p.version),
                        health_status: if p.seen_ms_ago < 3000 {
                            "ACTIVE"
                        } else {
                            "DEGRADED"
                        },
                    }
                }));
                (u32::try_from(c.peers.len()).unwrap_or(u32::MAX), details)
            }
            _ => (self.fleet_size, vec![me]),
        };
        HealthResponse {
            xks_proxy_fleet_size: size,
            xks_proxy_vendor: "Keyhold",
            xks_proxy_model: format!("Keyhold XKS {}", env!("CARGO_PKG_VERSION")),
            ekm_vendor: "Keyhold",
            ekm_fleet_details: details,
        }
    }
}
