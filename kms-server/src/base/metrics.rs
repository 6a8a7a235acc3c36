//! Prometheus metrics: request counts and latency histograms per route and outcome, and
//! the seal state. Served on the ops listener at `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    outcome: String,
}

/// The method label: a closed set, so a caller cannot grow the label sets (each kept until
/// the process ends) or the scrape by sending made-up methods.
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("other")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The audit writer's counters (`keyhold_audit_batches_total`, `_records_total`,
/// `_flushes_total`): how well group commit groups, and what the durability mode flushes.
#[derive(Clone, Debug, Default)]
pub struct AuditCounters {
    /// Batches committed.
    pub batches: Counter,
    /// Records committed.
    pub records: Counter,
    /// Flushes to disk (`fdatasync`, or a synchronous commit on PostgreSQL).
    pub flushes: Counter,
}

/// The server's metrics.
pub struct Metrics {
    audit: AuditCounters,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RequestLabels, Histogram>,
    sealed: Gauge<i64, std::sync::atomic::AtomicI64>,
    cluster_nodes: Gauge<i64, std::sync::atomic::AtomicI64>,
    erasure_rotation_pending: Gauge<i64, std::sync::atomic::AtomicI64>,
    erasure_epochs_retained: Gauge<i64, std::sync::atomic::AtomicI64>,
    integrity_events: Family<KindLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyhold");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let sealed = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "requests",
            "API requests by route and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "API request latency by route and outcome",
            latency.clone(),
        );
        registry.register("sealed", "1 while the server is sealed", sealed.clone());
        let cluster_nodes = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "cluster_nodes",
            "Nodes of the shared store seen in the last 10 s (0: not a shared store)",
            cluster_nodes.clone(),
        );
        let erasure_rotation_pending = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "erasure_rotation_pending",
            "1 while a destruction on the shared store awaits its erasure epoch rotation",
            erasure_rotation_pending.clone(),
        );
        let erasure_epochs_retained = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "erasure_epochs_retained",
            "Retired erasure epochs whose HSM key is kept for the retention (destructions in them are not final yet)",
            erasure_epochs_retained.clone(),
        );
        let integrity_events = Family::<KindLabel, Counter>::default();
        registry.register(
            "integrity_events",
            "Stored records refused by the keyring: KEK versions that do not open, records that fail authentication (by kind)",
            integrity_events.clone(),
        );
        let audit = AuditCounters::default();
        registry.register(
            "audit_batches",
            "Audit batches committed (group commit: one write for the records of concurrent requests)",
            audit.batches.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records committed",
            audit.records.clone(),
        );
        registry.register(
            "audit_flushes",
            "Audit flushes to disk (per request: one per batch; bounded lag: key changes, and the lag's)",
            audit.flushes.clone(),
        );
        Self {
            audit,
            integrity_events,
            registry,
            requests,
            latency,
            sealed,
            cluster_nodes,
            erasure_rotation_pending,
            erasure_epochs_retained,
        }
    }

    /// The audit writer's counters.
    pub fn audit_counters(&self) -> AuditCounters {
        self.audit.clone()
    }

    /// Sets the erasure gauges from the shared store's erasure status.
    pub fn set_erasure(&self, status: &kms_client::api::ErasureStatus) {
        self.erasure_rotation_pending
            .set(i64::from(status.rotation_pending));
        self.erasure_epochs_retained
            .set(i64::try_from(status.retained_epochs.len()).unwrap_or(i64::MAX));
    }

    /// Records one request.
    pub fn observe(&self, route: &str, method: &str, outcome: &str, elapsed: Duration) {
        let labels = RequestLabels {
            route: route.to_owned(),
            method: method_label(method),
            outcome: outcome.to_owned(),
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one integrity event of `kind` (a fixed set: see `keyring`).
    pub fn integrity_event(&self, kind: &'static str) {
        self.integrity_events
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// Sets the cluster-size gauge.
    pub fn set_cluster_nodes(&self, n: usize) {
        self.cluster_nodes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the seal gauge.
    pub fn set_sealed(&self, sealed: bool) {
        self.sealed.set(i64::from(sealed));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
