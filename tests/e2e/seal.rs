//! Sealed start with the passphrase method, unseal and seal over the API.

use keyhold_tests::{TestSeal, TestServer, TEST_PASSPHRASE};
use serde_json::json;

use crate::{assert_error, get, post};

#[tokio::test]
async fn passphrase_server_starts_sealed_and_unseals_over_the_api() {
    let s = TestServer::start_with(TestSeal::Passphrase, "").await;
    let admin = s.client(Some("admin-a"));
    let app = s.client(Some("app-a"));
    assert_eq!(
        reqwest::get(s.ops_url("/readyz")).await.unwrap().status(),
        503
    );
    let (st, status) = get(&admin, &s.url("/v1/sys/status")).await;
    assert_eq!(st, 200);
    assert_eq!(status["sealed"], true);
    assert_eq!(status["seal_method"], "passphrase");
    assert_error(
        &post(&admin, &s.url("/v1/keys"), json!({"name": "k"})).await,
        503,
        "Sealed",
    );
    assert_error(
        &post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await,
        503,
        "Sealed",
    );
    // The wrong passphrase, no passphrase, and a non-admin are all refused.
    let r = post(
        &admin,
        &s.url("/v1/sys/unseal"),
        json!({"passphrase": "wrong horse"}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");
    assert!(!r.1.to_string().contains("wrong horse"));
    assert_error(
        &post(&admin, &s.url("/v1/sys/unseal"), json!({})).await,
        400,
        "InvalidRequest",
    );
    assert_error(
        &post(
            &app,
            &s.url("/v1/sys/unseal"),
            json!({"passphrase": TEST_PASSPHRASE}),
        )
        .await,
        403,
        "PermissionDenied",
    );
    // The right one unseals.
    let (st, status) = post(
        &admin,
        &s.url("/v1/sys/unseal"),
        json!({"passphrase": TEST_PASSPHRASE}),
    )
    .await;
    assert_eq!(st, 200, "{status}");
    assert_eq!(status["sealed"], false);
    assert_eq!(
        reqwest::get(s.ops_url("/readyz")).await.unwrap().status(),
        200
    );
    crate::create_key(&s, "admin-a", "k").await;
    let (st, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_eq!(st, 200);
    // Seal: key operations stop until the next unseal.
    let (st, status) = post(&admin, &s.url("/v1/sys/seal"), json!({})).await;
    assert_eq!((st, status["sealed"].clone()), (200, json!(true)));
    assert_error(
        &post(
            &app,
            &s.url("/v1/unwrap"),
            json!({"wrapped": dk["wrapped"]}),
        )
        .await,
        503,
        "Sealed",
    );
    post(
        &admin,
        &s.url("/v1/sys/unseal"),
        json!({"passphrase": TEST_PASSPHRASE}),
    )
    .await;
    let (st, u) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(u["plaintext"], dk["plaintext"]);
}
