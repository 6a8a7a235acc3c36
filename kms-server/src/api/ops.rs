//! The ops listener: plain HTTP, bound to 127.0.0.1 by default, for probes and scraping.
//! `/healthz` (the process answers), `/readyz` (200 only when unsealed and, on a shared
//! store, in step with it), `/metrics`.
//! It serves no key operation and reveals no key data.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::base::metrics::Metrics;
use crate::keyring::Keyring;

struct OpsState {
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
}

/// The ops router.
pub fn router(keyring: Arc<Keyring>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::new(OpsState { keyring, metrics }))
}

async fn readyz(State(s): State<Arc<OpsState>>) -> impl IntoResponse {
    if s.keyring.is_sealed() {
        (StatusCode::SERVICE_UNAVAILABLE, "sealed\n")
    } else if !s.keyring.is_fresh() {
        // A shared store whose change feed this node cannot read: key use fails closed.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "shared store unreachable\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics_text(State(s): State<Arc<OpsState>>) -> impl IntoResponse {
    s.metrics.set_sealed(s.keyring.is_sealed());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
