//! Alerts reach a local HTTP receiver (and a command) within 2 seconds.

use std::time::{Duration, Instant};

use keyhold_tests::{TestSeal, TestServer, ADMIN_A, APP_A};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::{create_key, get, post};

/// A minimal HTTP receiver: every POST body is sent on the channel, answered 200.
pub(crate) async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            let body = &buf[end + 4..end + 4 + len];
                            let _ = tx.send(serde_json::from_slice(body).unwrap_or(Value::Null));
                            let _ = sock
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            buf.drain(..end + 4 + len);
                        }
                    }
                }
            });
        }
    });
    (url, rx)
}

pub(crate) async fn expect(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    kind: &str,
    started: Instant,
) -> Value {
    loop {
        let left = Duration::from_secs(2).saturating_sub(started.elapsed());
        let ev = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no `{kind}` alert within 2 s"))
            .unwrap();
        if ev["kind"] == kind {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_seal_and_disable_reach_the_webhook_within_two_seconds() {
    let (url, mut rx) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("alerts.jsonl");
    let extra = format!(
        "[alerts]\nwebhook = \"{url}\"\ncommand = [\"sh\", \"-c\", \"cat >> {}; echo >> {}\"]\n",
        log.display(),
        log.display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let app = s.client(Some("app-a"));
    let t = Instant::now();
    let (st, _) = get(&app, &s.url("/v1/keys")).await;
    assert_eq!(st, 403);
    let ev = expect(&mut rx, "denied", t).await;
    assert_eq!(ev["identity"], APP_A);
    assert_eq!(ev["detail"], "GET /v1/keys");
    create_key(&s, "admin-a", "k").await;
    let admin = s.client(Some("admin-a"));
    let t = Instant::now();
    post(&admin, &s.url("/v1/keys/k/disable"), json!({})).await;
    let ev = expect(&mut rx, "key_disabled", t).await;
    assert_eq!(
        (ev["identity"].clone(), ev["detail"].clone()),
        (json!(ADMIN_A), json!("k"))
    );
    let t = Instant::now();
    post(&admin, &s.url("/v1/sys/seal"), json!({})).await;
    expect(&mut rx, "sealed", t).await;
    // The command got the same events.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // One command per event, run concurrently: any order, all within the deadline.
        if ["\"sealed\"", "\"denied\"", "\"key_disabled\""]
            .iter()
            .all(|k| text.contains(k))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the command did not receive the alerts: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_policy_changes_and_audit_chain_findings_raise_alerts() {
    let (url, mut rx) = receiver().await;
    let mut s = TestServer::start_with(
        TestSeal::KeyFile,
        &format!("[alerts]\nwebhook = \"{url}\"\n"),
    )
    .await;
    create_key(&s, "admin-a", "k").await;
    let admin = s.client(Some("admin-a"));
    let t = Instant::now();
    let (st, _) = post(
        &admin,
        &s.url("/v1/keys/k/schedule-deletion"),
        json!({"pending_days": 7}),
    )
    .await;
    assert_eq!(st, 200);
    let ev = expect(&mut rx, "key_deletion_scheduled", t).await;
    assert_eq!(ev["identity"], ADMIN_A);
    let t = Instant::now();
    s.kms_client("admin-a")
        .set_identity("spiffe://test/acme/new", kms_client::api::Role::App)
        .await
        .unwrap();
    expect(&mut rx, "identity_changed", t).await;
    // Cut the last audit record while stopped: the server finds it at start, records the
    // finding in the chain and raises an alert.
    s.stop().await;
    let path = s.dir.path().join("store.audit");
    let bytes = std::fs::read(&path).unwrap();
    let used = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let last_line = bytes[..used - 1].iter().rposition(|b| *b == b'\n').unwrap() + 1;
    let mut cut = bytes[..last_line].to_vec();
    cut.resize(bytes.len(), 0);
    std::fs::write(&path, cut).unwrap();
    let t = Instant::now();
    s.start_again().await;
    // The finding is written (and alerted) with the next batch.
    get(&s.client(Some("admin-a")), &s.url("/v1/keys")).await;
    let ev = expect(&mut rx, "audit_chain", t).await;
    assert!(
        ev["detail"].as_str().unwrap().contains("head-mismatch"),
        "{ev}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_disk_under_the_audit_file_is_alerted() {
    let (url, mut rx) = receiver().await;
    // A threshold no disk meets: the watcher's first look (at start) raises the alert.
    let started = Instant::now();
    let s = TestServer::start_with(
        TestSeal::KeyFile,
        &format!("[alerts]\nwebhook = \"{url}\"\n[audit]\nmin_free_mib = 1000000000\n"),
    )
    .await;
    let ev = expect(&mut rx, "audit_disk_low", started).await;
    let detail = ev["detail"].as_str().unwrap();
    assert!(
        detail.contains("MiB free on the audit file's filesystem"),
        "{ev}"
    );
    assert!(detail.contains("threshold 1000000000 MiB"), "{ev}");
    // Once, not every check.
    let again = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(again.is_err(), "alerted twice: {again:?}");
    drop(s);
}
