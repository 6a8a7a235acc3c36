//! The Rust client against the real server: typed errors, the remote envelope provider,
//! and failover between two servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyhold_tests::TestServer;
use kms_client::api::{Context, CreateKeyRequest, ErrorCode};
use kms_client::Client;

fn client_for(servers: &[&TestServer], who: &str, extra_first: Option<String>) -> Client {
    let endpoints: Vec<String> = extra_first
        .into_iter()
        .chain(servers.iter().map(|s| s.url("")))
        .collect();
    keyhold_tests::kms_client_for(&servers[0].pki, who, &endpoints)
}

fn create(name: &str) -> CreateKeyRequest {
    keyhold_tests::create_granted(name, keyhold_tests::APP_A)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_typed_errors() {
    let s = TestServer::start().await;
    let admin = client_for(&[&s], "admin-a", None);
    let app = client_for(&[&s], "app-a", None);
    let info = admin.create_key(&create("k")).await.unwrap();
    assert_eq!(info.current_version, 1);
    let e = admin.create_key(&create("k")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyExists));
    assert_eq!(admin.list_keys().await.unwrap().len(), 1);
    assert_eq!(admin.get_key("k").await.unwrap().name, "k");
    let ctx: Context = [("a".to_string(), "1".to_string())].into_iter().collect();
    let dk = app.datakey("k", &ctx).await.unwrap();
    assert_eq!(dk.plaintext.len(), 32);
    assert!(format!("{dk:?}").contains("REDACTED"));
    let un = app.unwrap(dk.wrapped.as_bytes(), &ctx).await.unwrap();
    assert_eq!(un.plaintext, dk.plaintext);
    let w = app.wrap("k", &[5u8; 32], &ctx).await.unwrap();
    assert_eq!(admin.rotate_key("k").await.unwrap().current_version, 2);
    let rw = app.rewrap(w.wrapped.as_bytes(), &ctx).await.unwrap();
    assert_eq!(rw.version, 2);
    let items = vec![kms_client::api::BatchItem::Unwrap {
        wrapped: rw.wrapped.clone(),
        context: ctx.clone(),
    }];
    assert_eq!(app.batch(items).await.unwrap().len(), 1);
    assert_eq!(
        admin.disable_key("k").await.unwrap().state,
        kms_client::api::KeyState::Disabled
    );
    let e = app.unwrap(dk.wrapped.as_bytes(), &ctx).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::KeyDisabled));
    admin.enable_key("k").await.unwrap();
    let e = app
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DecryptFailed));
    let e = app.list_keys().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
    let sys = client_for(&[&s], "sys", None);
    assert!(!admin.sys_status().await.unwrap().sealed);
    assert!(sys.seal().await.unwrap().sealed);
    let e = app.datakey("k", &ctx).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Sealed));
    assert!(!sys.unseal(None).await.unwrap().sealed);
    // Client-side validation: a name that could escape the path never leaves.
    assert!(matches!(
        app.datakey("../sys/seal", &ctx).await,
        Err(kms_client::Error::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_seal_open_through_the_remote_provider() {
    let s = TestServer::start().await;
    client_for(&[&s], "admin-a", None)
        .create_key(&create("docs"))
        .await
        .unwrap();
    let app = client_for(&[&s], "app-a", None);
    let ctx: Context = [("tenant".to_string(), "acme".to_string())]
        .into_iter()
        .collect();
    let plaintext = vec![42u8; 200_000];
    let sealed = envelope::seal(&app, "docs", &plaintext, &ctx)
        .await
        .unwrap();
    assert_eq!(
        envelope::open(&app, &sealed, &ctx).await.unwrap(),
        plaintext
    );
    // Wrong context: refused by the envelope before the server is asked; the server would
    // refuse too.
    assert!(matches!(
        envelope::open(&app, &sealed, &Context::new()).await,
        Err(envelope::Error::DecryptFailed)
    ));
    // Another tenant's identity cannot open it.
    let other = client_for(&[&s], "app-b", None);
    assert!(matches!(
        envelope::open(&other, &sealed, &ctx).await,
        Err(envelope::Error::DecryptFailed)
    ));
    // Disabling the KEK at the server stops reads: crypto-shredding's first step.
    client_for(&[&s], "admin-a", None)
        .disable_key("docs")
        .await
        .unwrap();
    match envelope::open(&app, &sealed, &ctx).await {
        Err(envelope::Error::Provider(p)) => {
            assert_eq!(p.kind(), envelope::ProviderErrorKind::KeyDisabled)
        }
        other => panic!("expected KeyDisabled, got {:?}", other.map(|v| v.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_first_endpoint_refuses_or_dies() {
    // Two servers with the same keys: copy a stopped server's data dir.
    let mut a = TestServer::start().await;
    client_for(&[&a], "admin-a", None)
        .create_key(&create("k"))
        .await
        .unwrap();
    let dk = client_for(&[&a], "app-a", None)
        .datakey("k", &Context::new())
        .await
        .unwrap();
    a.stop().await;
    let b = a.copy_of().await;
    a.start_again().await;
    // A closed port first, then A, then B.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("https://127.0.0.1:{port}")
    };
    let app = client_for(&[&a, &b], "app-a", Some(closed));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let app = app.clone();
        let wrapped = dk.wrapped.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut done = 0u32;
            while !stop.load(Ordering::Relaxed) || done < 200 {
                let u = app.unwrap(wrapped.as_bytes(), &Context::new()).await?;
                assert_eq!(u.version, 1);
                done += 1;
                if done >= 2000 {
                    break;
                }
            }
            Ok::<u32, kms_client::Error>(done)
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.stop().await; // A dies mid-run
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    let done = worker
        .await
        .unwrap()
        .expect("no error may reach the caller");
    assert!(done >= 200, "{done}");
    // And it keeps working on B alone.
    let u = app
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    assert_eq!(u.plaintext, dk.plaintext);
}
