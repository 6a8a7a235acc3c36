//! Hostile and malformed input: every case gets a 4xx with the error body, never a 5xx,
//! and the store is unchanged afterwards.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::TestServer;
use serde_json::{json, Value};

use crate::{assert_error, create_key, get, post};

async fn raw(
    c: &reqwest::Client,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = c.post(url).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        st,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn every_bad_input_gets_a_4xx_and_changes_nothing() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    create_key(&s, "admin-a", "off").await;
    create_key(&s, "admin-b", "theirs").await;
    let admin = s.client(Some("admin-a"));
    let app = s.client(Some("app-a"));
    post(&admin, &s.url("/v1/keys/off/disable"), json!({})).await;
    let ctx = json!({"c": "1"});
    let (_, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({"context": ctx})).await;
    let (_, dk_off) = {
        post(&admin, &s.url("/v1/keys/off/enable"), json!({})).await;
        let r = post(&app, &s.url("/v1/keys/off/datakey"), json!({})).await;
        post(&admin, &s.url("/v1/keys/off/disable"), json!({})).await;
        r
    };
    let app_b = s.client(Some("app-b"));
    let (_, dk_b) = post(&app_b, &s.url("/v1/keys/theirs/datakey"), json!({})).await;
    let wrapped = B64.decode(dk["wrapped"].as_str().unwrap()).unwrap();
    let (_, before) = get(&admin, &s.url("/v1/keys")).await;

    let unwrap_url = s.url("/v1/unwrap");
    let wrap_url = s.url("/v1/keys/k/wrap");
    let json_ct = Some("application/json");

    // Malformed JSON, in several ways.
    for body in [
        &b"{"[..],
        b"not json",
        b"[]",
        b"{\"wrapped\": 5}",
        b"\xff\xfe",
        b"",
    ] {
        let r = raw(&app, &unwrap_url, json_ct, body.to_vec()).await;
        assert_error(&r, 400, "InvalidRequest");
    }
    // Missing content type.
    let r = raw(&app, &unwrap_url, None, b"{}".to_vec()).await;
    assert_error(&r, 415, "UnsupportedMediaType");
    // Unknown fields.
    let r = post(
        &app,
        &unwrap_url,
        json!({"wrapped": dk["wrapped"], "context": ctx, "debug": true}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");
    assert!(
        r.1["error"]["message"].as_str().unwrap().contains("debug"),
        "{r:?}"
    );
    let r = post(
        &admin,
        &s.url("/v1/keys"),
        json!({"name": "x", "size": 512}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");
    // Bad base64; the message does not echo it.
    let r = post(&app, &unwrap_url, json!({"wrapped": "!!not*base64!!"})).await;
    assert_error(&r, 400, "InvalidRequest");
    assert!(!r.1.to_string().contains("not*base64"));
    let r = post(&app, &wrap_url, json!({"plaintext": "%%%"})).await;
    assert_error(&r, 400, "InvalidRequest");
    // A DEK of the wrong size.
    for len in [0usize, 1, 15, 65, 1000] {
        let r = post(
            &app,
            &wrap_url,
            json!({"plaintext": B64.encode(vec![7u8; len])}),
        )
        .await;
        assert_error(&r, 400, "InvalidRequest");
    }
    // An oversized body (limit 64 KiB).
    let big = json!({"wrapped": B64.encode(vec![0u8; 70 * 1024])});
    let r = post(&app, &unwrap_url, big).await;
    assert_error(&r, 413, "PayloadTooLarge");
    // Context over the limits.
    let huge_ctx: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let r = post(
        &app,
        &unwrap_url,
        json!({"wrapped": dk["wrapped"], "context": huge_ctx}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");
    // Truncated and tampered wrapped keys, and every single-byte change.
    for cut in [0, 1, 4, 24, 56, wrapped.len() - 1] {
        let r = post(
            &app,
            &unwrap_url,
            json!({"wrapped": B64.encode(&wrapped[..cut]), "context": ctx}),
        )
        .await;
        assert_error(&r, 400, "DecryptFailed");
    }
    for i in 0..wrapped.len() {
        let mut bad = wrapped.clone();
        bad[i] ^= 0x20;
        let r = post(
            &app,
            &unwrap_url,
            json!({"wrapped": B64.encode(&bad), "context": ctx}),
        )
        .await;
        assert_error(&r, 400, "DecryptFailed");
    }
    // The wrong context.
    let r = post(
        &app,
        &unwrap_url,
        json!({"wrapped": dk["wrapped"], "context": {"c": "2"}}),
    )
    .await;
    assert_error(&r, 400, "DecryptFailed");
    // An unknown key, by name and by wrapped DEK.
    let r = post(&app, &s.url("/v1/keys/nope/datakey"), json!({})).await;
    assert_error(&r, 404, "NotFound");
    let mut unknown = wrapped.clone();
    unknown[4..20].copy_from_slice(&[0xEE; 16]);
    let r = post(
        &app,
        &unwrap_url,
        json!({"wrapped": B64.encode(&unknown), "context": ctx}),
    )
    .await;
    assert_error(&r, 400, "DecryptFailed");
    // Another tenant's key: looks missing by name, opaque by wrapped DEK.
    let r = post(&app, &s.url("/v1/keys/theirs/datakey"), json!({})).await;
    assert_error(&r, 404, "NotFound");
    let r = post(&app, &unwrap_url, json!({"wrapped": dk_b["wrapped"]})).await;
    assert_error(&r, 400, "DecryptFailed");
    // A disabled key.
    let r = post(&app, &unwrap_url, json!({"wrapped": dk_off["wrapped"]})).await;
    assert_error(&r, 409, "KeyDisabled");
    let r = post(
        &app,
        &s.url("/v1/keys/off/wrap"),
        json!({"plaintext": B64.encode([1u8; 32])}),
    )
    .await;
    assert_error(&r, 409, "KeyDisabled");
    // Bad key names, bad routes, bad methods.
    let r = post(&admin, &s.url("/v1/keys"), json!({"name": "has space"})).await;
    assert_error(&r, 400, "InvalidRequest");
    let r = post(&admin, &s.url("/v1/keys"), json!({"name": "x".repeat(129)})).await;
    assert_error(&r, 400, "InvalidRequest");
    let r = post(
        &admin,
        &s.url("/v1/keys"),
        json!({"name": "r", "rotation_period": "1s"}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");
    let r = post(&app, &s.url("/v1/keys/bad%20name/datakey"), json!({})).await;
    assert_error(&r, 400, "InvalidRequest");
    let r = post(&app, &s.url("/v1/nothing-here"), json!({})).await;
    assert_error(&r, 404, "NotFound");
    let r = get(&app, &s.url("/v1/unwrap")).await;
    assert_error(&r, 405, "MethodNotAllowed");
    // Batch: too many items, unknown op.
    let items: Vec<_> = (0..1001)
        .map(|_| json!({"op": "datakey", "key": "k"}))
        .collect();
    let r = post(&app, &s.url("/v1/batch"), json!({ "items": items })).await;
    assert_error(&r, 400, "InvalidRequest");
    let r = post(
        &app,
        &s.url("/v1/batch"),
        json!({"items": [{"op": "destroy", "key": "k"}]}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");

    // The store is unchanged and the good wrapped DEK still unwraps.
    let (_, after) = get(&admin, &s.url("/v1/keys")).await;
    assert_eq!(before, after);
    let (st, u) = post(
        &app,
        &unwrap_url,
        json!({"wrapped": dk["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(u["plaintext"], dk["plaintext"]);
    // And nothing above was a server error.
    let metrics = reqwest::get(s.ops_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("outcome=\"Internal\""), "{metrics}");
}
