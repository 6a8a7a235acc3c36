//! The ops listener: health, readiness, metrics.

use keyhold_tests::TestServer;
use serde_json::json;

use crate::{create_key, post};

#[tokio::test]
async fn health_ready_and_metrics() {
    let s = TestServer::start().await;
    let h = reqwest::get(s.ops_url("/healthz")).await.unwrap();
    assert_eq!(h.status(), 200);
    let r = reqwest::get(s.ops_url("/readyz")).await.unwrap();
    assert_eq!(r.status(), 200);
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    post(&app, &s.url("/v1/unwrap"), json!({"wrapped": "AAAA"})).await;
    let m = reqwest::get(s.ops_url("/metrics")).await.unwrap();
    assert_eq!(m.status(), 200);
    let text = m.text().await.unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("keyhold_requests_total{")
                && l.contains("route=\"/v1/keys/{name}/datakey\"")
                && l.contains("outcome=\"ok\"")
                && l.ends_with(" 1")),
        "{text}"
    );
    assert!(text.contains("outcome=\"DecryptFailed\""), "{text}");
    assert!(
        text.contains("keyhold_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("keyhold_sealed 0"), "{text}");
    // No key material or wrapped keys in metrics.
    assert!(!text.contains("AAAA"));
}
