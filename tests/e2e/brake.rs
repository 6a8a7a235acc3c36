//! The exfiltration brake (issue 28, `docs/brake.md`) through the real server: a bulk
//! unwrap by one identity gets its budget's worth and is then held (429) until an admin
//! releases it, alerted once; other identities go on; a key budget counts every identity;
//! a rewrap is not charged; a dry run alerts and refuses nothing.

use std::time::Instant;

use keyhold_tests::{TestSeal, TestServer, APP_A};
use kms_client::api::{BatchItem, BatchResult, Context, ErrorCode, ReleaseBrakeRequest};
use kms_client::Error;

use crate::alert::{expect, receiver};

const APP2_A: &str = "spiffe://test/acme/app2";

async fn server(
    brake: &str,
) -> (
    TestServer,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let (url, rx) = receiver().await;
    let extra = format!("[alerts]\nwebhook = \"{url}\"\n\n[brake]\n{brake}\n");
    (TestServer::start_with(TestSeal::KeyFile, &extra).await, rx)
}

/// Key `name` granted to app-a and app2-a, and `n` DEKs wrapped under it.
async fn wrapped_deks(s: &TestServer, name: &str, n: usize) -> Vec<Vec<u8>> {
    let admin = s.kms_client("admin-a");
    let mut req = keyhold_tests::create_granted(name, APP_A);
    req.grants.push(kms_client::api::Grant::new(
        APP2_A,
        &kms_client::api::GrantOperation::ALL,
    ));
    admin.create_key(&req).await.unwrap();
    let app = s.kms_client("app-a");
    let items = (0..n)
        .map(|_| BatchItem::Datakey {
            key: name.into(),
            context: Context::new(),
        })
        .collect();
    app.batch(items)
        .await
        .unwrap()
        .into_iter()
        .map(|r| match r {
            BatchResult::Datakey(d) => d.wrapped.into_bytes(),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn unwraps(deks: &[Vec<u8>]) -> Vec<BatchItem> {
    deks.iter()
        .map(|w| BatchItem::Unwrap {
            wrapped: w.clone().into(),
            context: Context::new(),
        })
        .collect()
}

fn held(r: Result<impl std::fmt::Debug, Error>) {
    match r {
        Err(Error::Api {
            status: 429,
            code: ErrorCode::LockedOut,
            message,
        }) => assert!(message.contains("exfiltration brake"), "{message}"),
        other => panic!("expected the brake's 429, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_unwrap_gets_its_budget_then_is_held_until_released() {
    let (s, mut rx) =
        server("mode = \"enforce\"\nidentity = [{ unwraps = 50, per_secs = 3600 }]").await;
    let deks = wrapped_deks(&s, "bulk", 120).await;
    let app = s.kms_client("app-a");
    // A rewrap keeps the DEK inside: not charged.
    for w in &deks[..60] {
        app.rewrap(w, &Context::new()).await.unwrap();
    }
    let started = Instant::now();
    let results = app.batch(unwraps(&deks)).await.unwrap();
    let got = results
        .iter()
        .filter(|r| matches!(r, BatchResult::Unwrap(_)))
        .count();
    assert_eq!(got, 50, "a bulk unwrap gets exactly its budget");
    assert!(results[50..]
        .iter()
        .all(|r| matches!(r, BatchResult::Error(e) if e.code == ErrorCode::LockedOut)));
    let alert = expect(&mut rx, "exfiltration_suspected", started).await;
    assert!(
        alert["detail"].as_str().unwrap().contains("held"),
        "{alert}"
    );
    assert_eq!(alert["identity"], APP_A, "{alert}");
    // Held: even a single unwrap, even later.
    held(app.unwrap(&deks[0], &Context::new()).await);
    // Another identity is not held.
    let app2 = s.kms_client("app2-a");
    app2.unwrap(&deks[0], &Context::new()).await.unwrap();
    // The admin sees and releases the hold; then app-a unwraps again.
    let admin = s.kms_client("admin-a");
    let status = admin.brake_status().await.unwrap();
    assert_eq!(
        (status.mode.as_str(), status.holds.len()),
        ("enforce", 1),
        "{status:?}"
    );
    assert_eq!(status.holds[0].name, APP_A);
    // Another tenant's admin sees nothing and releases nothing.
    let other = s.kms_client("admin-b");
    assert!(other.brake_status().await.unwrap().holds.is_empty());
    let release = ReleaseBrakeRequest {
        identity: Some(APP_A.into()),
        key: None,
    };
    assert!(!other.release_brake(&release).await.unwrap());
    held(app.unwrap(&deks[0], &Context::new()).await);
    assert!(admin.release_brake(&release).await.unwrap());
    app.unwrap(&deks[0], &Context::new()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_budget_counts_every_identity_and_a_dry_run_refuses_nothing() {
    let (s, _rx) = server(
        "mode = \"enforce\"\naction = \"throttle\"\nkey = [{ unwraps = 30, per_secs = 3600 }]",
    )
    .await;
    let deks = wrapped_deks(&s, "shared", 40).await;
    let (app, app2) = (s.kms_client("app-a"), s.kms_client("app2-a"));
    for w in &deks[..20] {
        app.unwrap(w, &Context::new()).await.unwrap();
    }
    for w in &deks[20..30] {
        app2.unwrap(w, &Context::new()).await.unwrap();
    }
    held(app2.unwrap(&deks[30], &Context::new()).await);
    // Throttled, not held: nothing to release.
    assert!(s
        .kms_client("admin-a")
        .brake_status()
        .await
        .unwrap()
        .holds
        .is_empty());

    let (s, mut rx) =
        server("mode = \"dry-run\"\nidentity = [{ unwraps = 5, per_secs = 3600 }]").await;
    let deks = wrapped_deks(&s, "dry", 20).await;
    let started = Instant::now();
    let results = s.kms_client("app-a").batch(unwraps(&deks)).await.unwrap();
    assert!(results.iter().all(|r| matches!(r, BatchResult::Unwrap(_))));
    let alert = expect(&mut rx, "exfiltration_suspected", started).await;
    assert!(
        alert["detail"].as_str().unwrap().contains("alerted"),
        "{alert}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_learns_an_identity_then_holds_a_bulk_unwrap_far_past_it() {
    let (s, mut rx) = server(
        "mode = \"enforce\"\n[brake.baseline]\nlearn_days = 1\nfactor = 3\nmin_per_minute = 30",
    )
    .await;
    let deks = wrapped_deks(&s, "learned", 300).await;
    let (app, app2) = (s.kms_client("app-a"), s.kms_client("app2-a"));
    // Day 0, learning: app-a's usual use is 20 unwraps a minute at this hour.
    let items = unwraps(&deks[..20]);
    let results = app.batch(items).await.unwrap();
    assert!(results.iter().all(|r| matches!(r, BatchResult::Unwrap(_))));
    // A day later, the same hour: three times the peak is allowed (60), not more.
    s.advance_clock(std::time::Duration::from_secs(86_400));
    let started = Instant::now();
    let results = app.batch(unwraps(&deks[20..])).await.unwrap();
    let got = results
        .iter()
        .take_while(|r| matches!(r, BatchResult::Unwrap(_)))
        .count();
    // 60 in the minute (up to twice that if the batch straddles a minute's end).
    assert!((60..=120).contains(&got), "{got} unwraps before the hold");
    assert!(results[got..]
        .iter()
        .all(|r| matches!(r, BatchResult::Error(e) if e.code == ErrorCode::LockedOut)));
    let alert = expect(&mut rx, "exfiltration_suspected", started).await;
    let detail = alert["detail"].as_str().unwrap();
    assert!(
        detail.contains("learned use at this hour (60)") && detail.contains("held"),
        "{alert}"
    );
    held(app.unwrap(&deks[0], &Context::new()).await);
    // The key's own use deviates too (everyone's unwraps together): held for app2-a.
    held(app2.unwrap(&deks[0], &Context::new()).await);
    // app2-a and a new key were never seen: they are learned first, not held.
    let fresh = wrapped_deks(&s, "fresh", 200).await;
    let results = app2.batch(unwraps(&fresh)).await.unwrap();
    assert!(results.iter().all(|r| matches!(r, BatchResult::Unwrap(_))));
}
