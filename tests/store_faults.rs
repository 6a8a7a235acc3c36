//! Faults in the server's own storage, injected with fail points (`kms-server` feature
//! `failpoints`): the key store's commits fail as on a full or read-only disk, the audit
//! file's appends fail or stall. The server must fail closed (no answer it could not make
//! durable, no half-made change), say so clearly, keep serving what needs no write, and
//! work again once the fault is gone — for the audit file, after a restart reopens it.
//! Its own test binary: fail points are process-wide.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keyhold_tests::{create_granted, TestServer, APP_A};
use kms_client::api::{Context, ErrorCode, KeyState};

/// One test at a time touches the fail points.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ctx() -> Context {
    [("doc".to_string(), "1".to_string())].into()
}

/// A server with key `k` granted to app-a, admin and app clients, and a DEK under `k`.
async fn server_with_key() -> (
    TestServer,
    kms_client::Client,
    kms_client::Client,
    kms_client::api::DatakeyResponse,
) {
    let s = TestServer::start().await;
    let admin = s.kms_client("admin-a");
    admin.create_key(&create_granted("k", APP_A)).await.unwrap();
    let app = s.kms_client("app-a");
    let dk = app.datakey("k", &ctx()).await.unwrap();
    (s, admin, app, dk)
}

/// The audit chain verifies strictly (links, hashes, head MAC, no findings).
async fn assert_chain_verifies(s: &TestServer) {
    let verdict = s.kms_client("auditor-a").audit_verify(true).await.unwrap();
    assert_eq!(verdict.map(|_| ()), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_fails_closed_and_recovers_without_a_restart() {
    let _one = FAULTS.lock().await;
    let (s, admin, app, dk) = server_with_key().await;
    let before = admin.list_keys().await.unwrap();

    fail::cfg("store-commit", "return").unwrap();
    // Writes: 503 with a clear message, nothing changed.
    for result in [
        admin
            .create_key(&create_granted("new", APP_A))
            .await
            .map(|_| ()),
        admin.rotate_key("k").await.map(|_| ()),
        admin.disable_key("k").await.map(|_| ()),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::StorageUnavailable), "{e}");
        assert!(e.to_string().contains("nothing was changed"), "{e}");
    }
    // What needs no store write keeps working: unwrap and datakey of a cached key.
    let un = app.unwrap(dk.wrapped.as_bytes(), &ctx()).await.unwrap();
    assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
    app.datakey("k", &ctx()).await.unwrap();
    fail::cfg("store-commit", "off").unwrap();

    // Fixed: the same requests succeed, and nothing of the failed ones was half-applied.
    let mid = admin.list_keys().await.unwrap();
    assert_eq!(
        mid.iter()
            .map(|k| (&k.name, k.current_version, k.state))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|k| (&k.name, k.current_version, k.state))
            .collect::<Vec<_>>()
    );
    admin
        .create_key(&create_granted("new", APP_A))
        .await
        .unwrap();
    assert_eq!(admin.rotate_key("k").await.unwrap().current_version, 2);
    assert_eq!(
        admin.disable_key("k").await.unwrap().state,
        KeyState::Disabled
    );
    // The audit chain saw every request, failed ones included, and verifies.
    assert_chain_verifies(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_file_fails_closed_until_reopened() {
    let _one = FAULTS.lock().await;
    let (mut s, _, app, dk) = server_with_key().await;

    fail::cfg("audit-append", "return").unwrap();
    // No key use is answered without its durable audit record: the DEK is not released.
    let e = app.unwrap(dk.wrapped.as_bytes(), &ctx()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StorageUnavailable), "{e}");
    assert!(!format!("{e:?}").contains(&format!("{:?}", dk.plaintext.expose_secret())));
    fail::cfg("audit-append", "off").unwrap();
    // The file stays closed for writing (a failed append may have left it anywhere) ...
    let e = app.unwrap(dk.wrapped.as_bytes(), &ctx()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StorageUnavailable), "{e}");
    // ... until a restart reopens it: then everything works and the chain verifies.
    s.restart().await;
    let app = s.kms_client("app-a");
    let un = app.unwrap(dk.wrapped.as_bytes(), &ctx()).await.unwrap();
    assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
    assert_chain_verifies(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_audit_file_slows_answers_but_loses_nothing() {
    let _one = FAULTS.lock().await;
    let (s, _, app, dk) = server_with_key().await;

    fail::cfg("audit-append", "sleep(300)").unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            let w = dk.wrapped.clone();
            tokio::spawn(async move { app.unwrap(w.as_bytes(), &ctx()).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    fail::cfg("audit-append", "off").unwrap();
    // 20 concurrent unwraps share batches: far less than 20 × 300 ms, at least one stall.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let t = Instant::now();
    app.unwrap(dk.wrapped.as_bytes(), &ctx()).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "still slow: {:?}",
        t.elapsed()
    );
    assert_chain_verifies(&s).await;
}
