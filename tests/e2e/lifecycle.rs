//! Key lifecycle on the server's clock: automatic rotation when the rotation period has
//! passed, destruction when the deletion window ends (crypto-shredding), both found by the
//! key sweep and audited as system records.

use std::time::Duration;

use keyhold_tests::{TestSeal, TestServer, APP_A};
use serde_json::{json, Value};

use crate::{assert_error, create_key, get, post};

const DAY: Duration = Duration::from_secs(86_400);

/// Polls `GET /v1/keys/{name}` until `pred` holds (the sweep runs every second here).
async fn key_until(s: &TestServer, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let admin = s.client(Some("admin-a"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (st, info) = get(&admin, &s.url(&format!("/v1/keys/{name}"))).await;
        assert_eq!(st, 200, "{info}");
        if pred(&info) {
            return info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_periods_and_deletion_windows_pass_on_the_servers_clock() {
    let mut s =
        TestServer::start_with(TestSeal::KeyFile, "[keys]\nsweep_interval_secs = 1\n").await;
    let admin = s.client(Some("admin-a"));
    let app = s.client(Some("app-a"));
    let (st, info) = post(
        &admin,
        &s.url("/v1/keys"),
        json!({"name": "auto", "rotation_period": "30d", "grants": [
            {"identity": APP_A, "operations": ["datakey", "unwrap"]}]}),
    )
    .await;
    assert_eq!(st, 201, "{info}");
    create_key(&s, "admin-a", "doomed").await;
    let ctx = json!({"doc": "1"});
    let (_, old) = post(
        &app,
        &s.url("/v1/keys/auto/datakey"),
        json!({"context": ctx}),
    )
    .await;
    let (_, doomed) = post(
        &app,
        &s.url("/v1/keys/doomed/datakey"),
        json!({"context": ctx}),
    )
    .await;

    // 29 days: not yet.
    s.advance_clock(29 * DAY);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, info) = get(&admin, &s.url("/v1/keys/auto")).await;
    assert_eq!(info["current_version"], 1, "{info}");
    // 31 days: rotated once, by the sweep.
    s.advance_clock(2 * DAY);
    key_until(&s, "auto", "automatic rotation", |k| {
        k["current_version"] == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, info) = get(&admin, &s.url("/v1/keys/auto")).await;
    assert_eq!(
        info["current_version"], 2,
        "once per period, not every sweep: {info}"
    );
    let (st, un) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": old["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!((st, un["version"].clone()), (200, json!(1)), "{un}");
    let (_, new) = post(
        &app,
        &s.url("/v1/keys/auto/datakey"),
        json!({"context": ctx}),
    )
    .await;
    assert_eq!(new["version"], 2);

    // Deletion: unusable at once, destroyed when the window ends, not before.
    let (st, info) = post(
        &admin,
        &s.url("/v1/keys/doomed/schedule-deletion"),
        json!({"pending_days": 7}),
    )
    .await;
    assert_eq!(
        (st, info["state"].clone()),
        (200, json!("pending-deletion"))
    );
    let unwrap_doomed = json!({"wrapped": doomed["wrapped"], "context": ctx});
    assert_error(
        &post(&app, &s.url("/v1/unwrap"), unwrap_doomed.clone()).await,
        409,
        "KeyDisabled",
    );
    // What a leak of the destroyed key would look like: its KEK versions and erasure key,
    // read from the files while the server is stopped.
    s.stop().await;
    let store_path = s.dir.path().join("store.redb");
    let key_file = s.dir.path().join("master.key");
    let (before, _) = keyhold_tests::forensics::keks(&store_path, &key_file);
    let doomed_on_disk = before.iter().find(|k| k.name == "doomed").unwrap();
    let doomed_secrets: Vec<Vec<u8>> = doomed_on_disk
        .versions
        .iter()
        .cloned()
        .chain(doomed_on_disk.erasure_key.clone())
        .collect();
    assert_eq!(doomed_secrets.len(), 2, "one version and its erasure key");
    s.start_again().await;
    let (admin, app) = (s.client(Some("admin-a")), s.client(Some("app-a")));
    s.advance_clock(6 * DAY);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, info) = get(&admin, &s.url("/v1/keys/doomed")).await;
    assert_eq!(info["state"], "pending-deletion", "{info}");
    s.advance_clock(2 * DAY);
    let info = key_until(&s, "doomed", "destruction", |k| k["state"] == "destroyed").await;
    assert_eq!(info["versions"], json!([]), "no version survives: {info}");
    assert_error(
        &post(&app, &s.url("/v1/unwrap"), unwrap_doomed.clone()).await,
        409,
        "KeyDisabled",
    );
    assert_error(
        &post(&admin, &s.url("/v1/keys/doomed/cancel-deletion"), json!({})).await,
        409,
        "InvalidState",
    );
    // Crypto-shredding: none of its material is anywhere in the data directory.
    s.stop().await;
    keyhold_tests::forensics::assert_shredded(
        s.dir.path(),
        &store_path,
        &key_file,
        "doomed",
        &doomed_secrets,
    );
    s.start_again().await;
    // Both were audited as system records.
    let (_, page) = get(
        &s.client(Some("auditor-a")),
        &s.url("/v1/audit?after=0&limit=1000"),
    )
    .await;
    let ops: Vec<(String, String)> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["operation"].as_str().unwrap().starts_with("SYSTEM"))
        .map(|r| {
            (
                r["operation"].as_str().unwrap().to_owned(),
                r["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("SYSTEM rotate-key".to_string(), "auto".to_string()),
            ("SYSTEM destroy-key".to_string(), "doomed".to_string())
        ]
    );
    // Destroyed stays destroyed across a restart.
    s.restart().await;
    let app = s.client(Some("app-a"));
    assert_error(
        &post(&app, &s.url("/v1/unwrap"), unwrap_doomed).await,
        409,
        "KeyDisabled",
    );
    let (st, _) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": old["wrapped"], "context": ctx}),
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counters_and_the_min_decrypt_version_dry_run() {
    let mut s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let mut v1 = Vec::new();
    for _ in 0..3 {
        let (_, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
        v1.push(dk["wrapped"].clone());
    }
    for w in &v1[..2] {
        let (st, _) = post(&app, &s.url("/v1/unwrap"), json!({"wrapped": w})).await;
        assert_eq!(st, 200);
    }
    post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys/k/rotate"),
        json!({}),
    )
    .await;
    // A rewrap counts as an unwrap of v1 and a wrap under v2.
    let (_, re) = post(&app, &s.url("/v1/rewrap"), json!({"wrapped": v1[2]})).await;
    assert_eq!(re["version"], 2);
    let (_, info) = get(&s.client(Some("auditor-a")), &s.url("/v1/keys/k")).await;
    let counts = |info: &Value| -> Vec<(u64, u64, bool)> {
        info["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["wraps"].as_u64().unwrap(),
                    v["unwraps"].as_u64().unwrap(),
                    v["last_used_at"].is_string(),
                )
            })
            .collect()
    };
    assert_eq!(counts(&info), [(3, 3, true), (1, 0, true)], "{info}");
    // The dry run (auditors may ask): retiring v1 would have refused its 3 unwraps.
    let dry = |version: u32, window: u32| {
        let c = s.client(Some("auditor-a"));
        let url = s.url("/v1/keys/k/min-decrypt-version/dry-run");
        async move { post(&c, &url, json!({"version": version, "window_days": window})).await }
    };
    let (st, report) = dry(2, 7).await;
    assert_eq!(st, 200, "{report}");
    assert_eq!(report["unwraps_refused"], 3);
    assert_eq!(report["by_version"], json!([{"version": 1, "unwraps": 3}]));
    assert_eq!(dry(1, 7).await.1["unwraps_refused"], 0);
    assert_error(&dry(3, 7).await, 400, "InvalidRequest");
    assert_error(&dry(2, 31).await, 400, "InvalidRequest");
    // Nothing changed, and the counters survive a restart.
    s.restart().await;
    let (_, info) = get(&s.client(Some("auditor-a")), &s.url("/v1/keys/k")).await;
    assert_eq!(info["min_decrypt_version"], 1);
    assert_eq!(counts(&info), [(3, 3, true), (1, 0, true)], "{info}");
    // Eight days later those unwraps are outside a 7-day window, inside a 30-day one.
    s.advance_clock(8 * DAY);
    let dry = |window: u32| {
        let c = s.client(Some("auditor-a"));
        let url = s.url("/v1/keys/k/min-decrypt-version/dry-run");
        async move { post(&c, &url, json!({"version": 2, "window_days": window})).await }
    };
    assert_eq!(dry(7).await.1["unwraps_refused"], 0);
    assert_eq!(dry(30).await.1["unwraps_refused"], 3);
    // A batch's unwraps are counted per version once the request is done (not per
    // item): v1, v2, v1, a failing item, v1.
    let app = s.client(Some("app-a"));
    let item = |w: &Value| json!({"op": "unwrap", "wrapped": w});
    let (st, batch) = post(
        &app,
        &s.url("/v1/batch"),
        json!({"items": [item(&v1[0]), item(&re["wrapped"]), item(&v1[1]),
                         item(&json!("AAAA")), item(&v1[2])]}),
    )
    .await;
    assert_eq!(st, 200, "{batch}");
    let versions: Vec<Value> = batch["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["unwrap"]["version"].clone())
        .collect();
    assert_eq!(
        versions,
        [json!(1), json!(2), json!(1), Value::Null, json!(1)]
    );
    let (_, info) = get(&s.client(Some("auditor-a")), &s.url("/v1/keys/k")).await;
    assert_eq!(counts(&info), [(3, 6, true), (1, 1, true)], "{info}");
    assert_eq!(dry(7).await.1["unwraps_refused"], 3);
}
