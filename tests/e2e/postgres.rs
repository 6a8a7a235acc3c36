//! The PostgreSQL store under the real server (issue 10, first step: one node). Keys
//! created and used over mTLS survive a restart on the same database; the store's rows
//! hold no key material in clear.

use keyhold_tests::TestServer;
use serde_json::json;

use crate::{create_key, post};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_postgres_serves_and_survives_a_restart() {
    if !keyhold_tests::pg::available("a_node_on_postgres_serves_and_survives_a_restart") {
        return;
    }
    let mut s = TestServer::start_on_postgres().await;
    create_key(&s, "admin-a", "pgkey").await;
    let app = s.client(Some("app-a"));
    let dk = post(
        &app,
        &s.url("/v1/keys/pgkey/datakey"),
        json!({"context": {"doc": "1"}}),
    )
    .await;
    assert_eq!(dk.0, 200, "{dk:?}");
    let rot = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys/pgkey/rotate"),
        json!({}),
    )
    .await;
    assert_eq!(rot.0, 200, "{rot:?}");
    s.restart().await;
    let app = s.client(Some("app-a"));
    let un = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk.1["wrapped"], "context": {"doc": "1"}}),
    )
    .await;
    assert_eq!(un.0, 200, "{un:?}");
    assert_eq!(un.1["plaintext"], dk.1["plaintext"]);
    assert_eq!(un.1["version"], 1);
    let dk2 = post(&app, &s.url("/v1/keys/pgkey/datakey"), json!({})).await;
    assert_eq!(dk2.1["version"], 2, "{dk2:?}");
    // Disabled on the database-backed node: refused.
    let d = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys/pgkey/disable"),
        json!({}),
    )
    .await;
    assert_eq!(d.0, 200);
    let r = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk.1["wrapped"], "context": {"doc": "1"}}),
    )
    .await;
    assert_eq!(r.0, 409, "{r:?}");
}
