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
    // The wrong passphrase, no passphrase, an app and a tenant admin are all refused:
    // unsealing is the sys role's.
    let r = post(
        &s.client(Some("sys")),
        &s.url("/v1/sys/unseal"),
        json!({"passphrase": "wrong horse"}),
    )
    .await;
    assert_error(&r, 400, "InvalidRequest");
    assert!(!r.1.to_string().contains("wrong horse"));
    assert_error(
        &post(&s.client(Some("sys")), &s.url("/v1/sys/unseal"), json!({})).await,
        400,
        "InvalidRequest",
    );
    for not_sys in [&app, &admin] {
        assert_error(
            &post(
                not_sys,
                &s.url("/v1/sys/unseal"),
                json!({"passphrase": TEST_PASSPHRASE}),
            )
            .await,
            403,
            "PermissionDenied",
        );
    }
    // The right one unseals.
    let (st, status) = post(
        &s.client(Some("sys")),
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
    let (st, status) = post(&s.client(Some("sys")), &s.url("/v1/sys/seal"), json!({})).await;
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
        &s.client(Some("sys")),
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
        let (st, status) = post(
            &s.client(Some("sys")),
            &s.url("/v1/sys/unseal"),
            unseal(share),
        )
        .await;
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
    let dup = post(
        &s.client(Some("sys")),
        &s.url("/v1/sys/unseal"),
        unseal(&s.shares[1]),
    )
    .await;
    assert_error(&dup, 400, "InvalidRequest");
    assert!(dup.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already given"));
    let (_, foreign) = kms_server::crypto::seal::ShamirSealer::deal(5, 3).unwrap();
    let other = post(
        &s.client(Some("sys")),
        &s.url("/v1/sys/unseal"),
        unseal(&foreign[2]),
    )
    .await;
    assert_error(&other, 400, "InvalidRequest");
    assert!(other.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another set"));
    assert_error(
        &post(
            &s.client(Some("sys")),
            &s.url("/v1/sys/unseal"),
            unseal("not a share"),
        )
        .await,
        400,
        "InvalidRequest",
    );
    // Only the sys role submits shares (a tenant admin is refused).
    assert_error(
        &post(
            &s.client(Some("admin-a")),
            &s.url("/v1/sys/unseal"),
            unseal(&s.shares[3]),
        )
        .await,
        403,
        "PermissionDenied",
    );
    // Sealing while sealed discards the shares received so far (a reset); give them again.
    let (_, status) = post(&s.client(Some("sys")), &s.url("/v1/sys/seal"), json!({})).await;
    assert_eq!(status["unseal_progress"]["received"], 0, "{status}");
    for share in &s.shares[..2] {
        let (st, _) = post(
            &s.client(Some("sys")),
            &s.url("/v1/sys/unseal"),
            unseal(share),
        )
        .await;
        assert_eq!(st, 200);
    }
    // The third distinct share unseals.
    let (st, status) = post(
        &s.client(Some("sys")),
        &s.url("/v1/sys/unseal"),
        unseal(&s.shares[4]),
    )
    .await;
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
                s.pki.cert("sys").display().to_string(),
                "--tls-key".into(),
                s.pki.key("sys").display().to_string(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rotation_keeps_every_dek_and_survives_restarts() {
    use kms_client::api::Context;
    // Key-file server.
    let mut s = TestServer::start().await;
    for k in ["a", "b"] {
        crate::create_key(&s, "admin-a", k).await;
    }
    let admin = s.kms_client("admin-a");
    admin.rotate_key("a").await.unwrap();
    let app = s.kms_client("app-a");
    let ctx: Context = [("n".to_string(), "1".to_string())].into_iter().collect();
    let before = [
        app.datakey("a", &ctx).await.unwrap(),
        app.datakey("b", &ctx).await.unwrap(),
    ];
    let sealed_before = std::fs::read(s.dir.path().join("store.redb"))
        .unwrap()
        .len();
    assert!(sealed_before > 0);
    let n = s.kms_client("sys").rotate_master(None).await.unwrap();
    assert_eq!(n, 3, "a has two versions, b one");
    for dk in &before {
        let un = app.unwrap(dk.wrapped.as_bytes(), &ctx).await.unwrap();
        assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
    }
    // After a restart the key file unseals the new master key; the audit chain still
    // verifies strictly (its head was re-MACed under the new key).
    s.restart().await;
    let app = s.kms_client("app-a");
    for dk in &before {
        assert!(app.unwrap(dk.wrapped.as_bytes(), &ctx).await.is_ok());
    }
    let verified = s.kms_client("auditor-a").audit_verify(true).await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");

    // Passphrase server: the passphrase must open the current key (no lock-out by typo).
    let mut p = TestServer::start_with(TestSeal::Passphrase, "").await;
    let psys = p.kms_client("sys");
    psys.unseal(Some(TEST_PASSPHRASE)).await.unwrap();
    crate::create_key(&p, "admin-a", "k").await;
    let pdk = p.kms_client("app-a").datakey("k", &ctx).await.unwrap();
    let e = psys.rotate_master(Some("wrong horse")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(kms_client::api::ErrorCode::InvalidRequest),
        "{e}"
    );
    assert_eq!(psys.rotate_master(Some(TEST_PASSPHRASE)).await.unwrap(), 1);
    p.restart().await;
    let psys = p.kms_client("sys");
    psys.unseal(Some(TEST_PASSPHRASE)).await.unwrap();
    let un = p
        .kms_client("app-a")
        .unwrap(pdk.wrapped.as_bytes(), &ctx)
        .await
        .unwrap();
    assert_eq!(un.plaintext.expose_secret(), pdk.plaintext.expose_secret());
}

/// Issue 22: a wrong passphrase (to unseal or to rotate the master key) and a bad unseal
/// share count toward the caller's lockout, as denials do; before, they were 400s that
/// never counted, so the passphrase could be guessed at the server's speed.
#[tokio::test]
async fn wrong_passphrases_count_toward_the_lockout() {
    let s = TestServer::start_with(TestSeal::Passphrase, "[lockout]\nthreshold = 3\n").await;
    let sys = s.client(Some("sys"));
    let unseal = |p: &str| json!({ "passphrase": p });
    for guess in ["guess one", "guess two"] {
        assert_error(
            &post(&sys, &s.url("/v1/sys/unseal"), unseal(guess)).await,
            400,
            "InvalidRequest",
        );
    }
    // Unsealed with the right one (a failure count is not a lockout yet).
    let (st, body) = post(&sys, &s.url("/v1/sys/unseal"), unseal(TEST_PASSPHRASE)).await;
    assert_eq!(st, 200, "{body}");
    // The third wrong one (to rotate-master this time) locks the identity out: even the
    // right passphrase is refused now.
    assert_error(
        &post(&sys, &s.url("/v1/sys/rotate-master"), unseal("guess three")).await,
        400,
        "InvalidRequest",
    );
    assert_error(
        &post(
            &sys,
            &s.url("/v1/sys/rotate-master"),
            unseal(TEST_PASSPHRASE),
        )
        .await,
        429,
        "LockedOut",
    );
}
