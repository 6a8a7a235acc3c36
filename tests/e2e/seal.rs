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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shamir_server_unseals_with_exactly_m_shares_over_mtls() {
    let mut s = TestServer::start_with(TestSeal::Shamir, "").await;
    assert_eq!(s.shares.len(), 5);
    let admin = s.client(Some("admin-a"));
    let unseal = |share: &str| json!({ "share": share });
    let (_, status) = get(&admin, &s.url("/v1/sys/status")).await;
    assert_eq!(status["sealed"], true, "{status}");
    assert_eq!(status["seal_method"], "shamir");
    assert_eq!(
        status["unseal_progress"],
        json!({"received": 0, "threshold": 3})
    );
    // Two shares (M-1): still sealed; the second counts.
    for (i, share) in s.shares[..2].iter().enumerate() {
        let (st, status) = post(&admin, &s.url("/v1/sys/unseal"), unseal(share)).await;
        assert_eq!(st, 200, "{status}");
        assert_eq!(status["sealed"], true);
        assert_eq!(status["unseal_progress"]["received"], i + 1);
    }
    assert_error(
        &post(
            &s.client(Some("app-a")),
            &s.url("/v1/keys/k/datakey"),
            json!({}),
        )
        .await,
        503,
        "Sealed",
    );
    // A duplicate and a share of another set are refused and do not count.
    let dup = post(&admin, &s.url("/v1/sys/unseal"), unseal(&s.shares[1])).await;
    assert_error(&dup, 400, "InvalidRequest");
    assert!(dup.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already given"));
    let (_, foreign) = kms_server::seal::ShamirSealer::deal(5, 3).unwrap();
    let other = post(&admin, &s.url("/v1/sys/unseal"), unseal(&foreign[2])).await;
    assert_error(&other, 400, "InvalidRequest");
    assert!(other.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another set"));
    assert_error(
        &post(&admin, &s.url("/v1/sys/unseal"), unseal("not a share")).await,
        400,
        "InvalidRequest",
    );
    // Only admins submit shares.
    assert_error(
        &post(
            &s.client(Some("app-a")),
            &s.url("/v1/sys/unseal"),
            unseal(&s.shares[3]),
        )
        .await,
        403,
        "PermissionDenied",
    );
    // Sealing while sealed discards the shares received so far (a reset); give them again.
    let (_, status) = post(&admin, &s.url("/v1/sys/seal"), json!({})).await;
    assert_eq!(status["unseal_progress"]["received"], 0, "{status}");
    for share in &s.shares[..2] {
        let (st, _) = post(&admin, &s.url("/v1/sys/unseal"), unseal(share)).await;
        assert_eq!(st, 200);
    }
    // The third distinct share unseals.
    let (st, status) = post(&admin, &s.url("/v1/sys/unseal"), unseal(&s.shares[4])).await;
    assert_eq!(
        (st, status["sealed"].clone()),
        (200, json!(false)),
        "{status}"
    );
    assert!(status.get("unseal_progress").is_none());
    crate::create_key(&s, "admin-a", "k").await;
    let (st, _) = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/k/datakey"),
        json!({}),
    )
    .await;
    assert_eq!(st, 200);
    // After a restart it starts sealed again; any other three shares unseal, with kmsctl.
    s.restart().await;
    let admin = s.client(Some("admin-a"));
    assert_eq!(
        get(&admin, &s.url("/v1/sys/status")).await.1["sealed"],
        true
    );
    let dir = tempfile::tempdir().unwrap();
    for (i, share) in [&s.shares[0], &s.shares[2], &s.shares[3]]
        .into_iter()
        .enumerate()
    {
        let file = dir.path().join(format!("share{i}"));
        std::fs::write(&file, format!("{share}\n")).unwrap();
        let out = tokio::task::spawn_blocking({
            let args: Vec<String> = vec![
                "--endpoint".into(),
                s.url(""),
                "--tls-ca".into(),
                s.pki.ca().display().to_string(),
                "--tls-cert".into(),
                s.pki.cert("admin-a").display().to_string(),
                "--tls-key".into(),
                s.pki.key("admin-a").display().to_string(),
                "--output".into(),
                "json".into(),
                "sys".into(),
                "unseal".into(),
                "--share".into(),
                file.display().to_string(),
            ];
            move || {
                std::process::Command::new(keyhold_tests::workspace_bin("kmsctl"))
                    .args(args)
                    .env("XDG_CONFIG_HOME", "/nonexistent")
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["sealed"], i < 2, "{status}");
    }
    let (st, _) = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/k/datakey"),
        json!({}),
    )
    .await;
    assert_eq!(st, 200);
}
