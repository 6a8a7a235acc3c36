//! datakey, wrap, unwrap, rewrap, batch over mTLS.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::TestServer;
use serde_json::json;

use crate::{assert_error, create_key, get, post};

#[tokio::test]
async fn datakey_then_unwrap_round_trip() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "orders").await;
    let app = s.client(Some("app-a"));
    let (st, dk) = post(&app, &s.url("/v1/keys/orders/datakey"), json!({})).await;
    assert_eq!(st, 200, "{dk}");
    let dek = B64.decode(dk["plaintext"].as_str().unwrap()).unwrap();
    assert_eq!(dek.len(), 32);
    assert_eq!(dk["key"], "orders");
    assert_eq!(dk["version"], 1);
    let (st, un) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({ "wrapped": dk["wrapped"] }),
    )
    .await;
    assert_eq!(st, 200, "{un}");
    assert_eq!(un["plaintext"], dk["plaintext"]);
    assert_eq!(un["key"], "orders");
    // Two datakeys differ.
    let (_, dk2) = post(&app, &s.url("/v1/keys/orders/datakey"), json!({})).await;
    assert_ne!(dk2["plaintext"], dk["plaintext"]);
}

#[tokio::test]
async fn wrap_unwrap_with_context_and_wrong_context_fails() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let dek = B64.encode([0x11u8; 32]);
    let ctx = json!({"tenant": "acme", "object": "invoices/7"});
    let (st, w) = post(
        &app,
        &s.url("/v1/keys/k/wrap"),
        json!({"plaintext": dek, "context": ctx}),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let (st, u) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": w["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(u["plaintext"], dek);
    for wrong in [
        json!({}),
        json!({"tenant": "acme"}),
        json!({"tenant": "acme", "object": "invoices/8"}),
        json!({"tenant": "acme", "object": "invoices/7", "extra": ""}),
    ] {
        let r = post(
            &app,
            &s.url("/v1/unwrap"),
            json!({"wrapped": w["wrapped"], "context": wrong}),
        )
        .await;
        assert_error(&r, 400, "DecryptFailed");
    }
}

#[tokio::test]
async fn rotate_then_unwrap_old_and_rewrap_to_new() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let admin = s.client(Some("admin-a"));
    let ctx = json!({"a": "b"});
    let (_, v1) = post(&app, &s.url("/v1/keys/k/datakey"), json!({"context": ctx})).await;
    assert_eq!(v1["version"], 1);
    let (st, info) = post(&admin, &s.url("/v1/keys/k/rotate"), json!({})).await;
    assert_eq!(st, 200, "{info}");
    assert_eq!(info["current_version"], 2);
    assert_eq!(info["versions"].as_array().unwrap().len(), 2);
    // The old wrapped DEK still unwraps.
    let (st, u) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": v1["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(u["version"], 1);
    assert_eq!(u["plaintext"], v1["plaintext"]);
    // Rewrap moves it to version 2, same DEK, same context; no plaintext in the response.
    let (st, rw) = post(
        &app,
        &s.url("/v1/rewrap"),
        json!({"wrapped": v1["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!(st, 200, "{rw}");
    assert_eq!(rw["version"], 2);
    assert!(rw.get("plaintext").is_none());
    let (_, u2) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": rw["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!(u2["plaintext"], v1["plaintext"]);
    assert_eq!(u2["version"], 2);
    // New datakeys use version 2.
    let (_, v2) = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_eq!(v2["version"], 2);
    // Rewrap with the wrong context fails like unwrap.
    let r = post(
        &app,
        &s.url("/v1/rewrap"),
        json!({"wrapped": v1["wrapped"], "context": {}}),
    )
    .await;
    assert_error(&r, 400, "DecryptFailed");
}

#[tokio::test]
async fn disable_refuses_then_enable_works() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let admin = s.client(Some("admin-a"));
    let (_, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    let (st, info) = post(&admin, &s.url("/v1/keys/k/disable"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(info["state"], "disabled");
    let r = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_error(&r, 409, "KeyDisabled");
    let r = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_error(&r, 409, "KeyDisabled");
    let r = post(
        &app,
        &s.url("/v1/rewrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_error(&r, 409, "KeyDisabled");
    let (st, info) = post(&admin, &s.url("/v1/keys/k/enable"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(info["state"], "enabled");
    let (st, u) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(u["plaintext"], dk["plaintext"]);
}

#[tokio::test]
async fn tenant_b_cannot_unwrap_or_see_tenant_a() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "shared-name").await;
    create_key(&s, "admin-b", "shared-name").await;
    let app_a = s.client(Some("app-a"));
    let app_b = s.client(Some("app-b"));
    let (_, dk) = post(&app_a, &s.url("/v1/keys/shared-name/datakey"), json!({})).await;
    let r = post(
        &app_b,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_error(&r, 400, "DecryptFailed");
    let r = post(
        &app_b,
        &s.url("/v1/rewrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_error(&r, 400, "DecryptFailed");
    // Same name, different keys: B's datakey is B's.
    let (_, dkb) = post(&app_b, &s.url("/v1/keys/shared-name/datakey"), json!({})).await;
    let r = post(
        &app_a,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dkb["wrapped"]}),
    )
    .await;
    assert_error(&r, 400, "DecryptFailed");
    // B's admin cannot see or manage A's key, which looks missing.
    create_key(&s, "admin-a", "only-a").await;
    let admin_b = s.client(Some("admin-b"));
    assert_error(
        &get(&admin_b, &s.url("/v1/keys/only-a")).await,
        404,
        "NotFound",
    );
    assert_error(
        &post(&admin_b, &s.url("/v1/keys/only-a/disable"), json!({})).await,
        404,
        "NotFound",
    );
    let r = post(&app_b, &s.url("/v1/keys/only-a/datakey"), json!({})).await;
    assert_error(&r, 404, "NotFound");
    let (_, list) = get(&admin_b, &s.url("/v1/keys")).await;
    let names: Vec<_> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("shared-name")]);
}

#[tokio::test]
async fn restart_then_unwrap_what_was_wrapped_before() {
    let mut s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let (_, dk) = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/k/datakey"),
        json!({"context": {"x": "y"}}),
    )
    .await;
    post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys/k/rotate"),
        json!({}),
    )
    .await;
    s.restart().await;
    let app = s.client(Some("app-a"));
    let (st, u) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"], "context": {"x": "y"}}),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(u["plaintext"], dk["plaintext"]);
    let (_, info) = get(&s.client(Some("admin-a")), &s.url("/v1/keys/k")).await;
    assert_eq!(info["current_version"], 2);
}

#[tokio::test]
async fn batch_mixes_results_per_item() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let (_, dk) = post(
        &app,
        &s.url("/v1/keys/k/datakey"),
        json!({"context": {"c": "1"}}),
    )
    .await;
    let (st, b) = post(
        &app,
        &s.url("/v1/batch"),
        json!({"items": [
            {"op": "unwrap", "wrapped": dk["wrapped"], "context": {"c": "1"}},
            {"op": "unwrap", "wrapped": dk["wrapped"], "context": {"c": "2"}},
            {"op": "datakey", "key": "k"},
            {"op": "datakey", "key": "missing"},
            {"op": "wrap", "key": "k", "plaintext": B64.encode([1u8; 16])},
            {"op": "rewrap", "wrapped": dk["wrapped"], "context": {"c": "1"}},
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let r = b["results"].as_array().unwrap();
    assert_eq!(r.len(), 6);
    assert_eq!(r[0]["unwrap"]["plaintext"], dk["plaintext"]);
    assert_eq!(r[1]["error"]["code"], "DecryptFailed");
    assert!(r[2]["datakey"]["wrapped"].is_string());
    assert_eq!(r[3]["error"]["code"], "NotFound");
    assert!(r[4]["wrap"]["wrapped"].is_string());
    assert!(r[5]["rewrap"]["wrapped"].is_string());
    // 100-item batch of unwraps (the load shape) works.
    let items: Vec<_> = (0..100)
        .map(|_| json!({"op": "unwrap", "wrapped": dk["wrapped"], "context": {"c": "1"}}))
        .collect();
    let (st, b) = post(&app, &s.url("/v1/batch"), json!({ "items": items })).await;
    assert_eq!(st, 200);
    assert_eq!(b["results"].as_array().unwrap().len(), 100);
    let r = post(&app, &s.url("/v1/batch"), json!({"items": []})).await;
    assert_error(&r, 400, "InvalidRequest");
}
