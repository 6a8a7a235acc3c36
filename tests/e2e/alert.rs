//! Alerts reach a local HTTP receiver (and a command) within 2 seconds.

use std::time::{Duration, Instant};

use keyhold_tests::{TestSeal, TestServer, ADMIN_A, APP_A};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::{create_key, get, post};

/// A minimal HTTP receiver: every POST body is sent on the channel, answered 200.
pub(crate) async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    receiver_with(None).await
}

/// [`receiver`], over TLS with `tls` when given (the URL is then `https://localhost:…`).
async fn receiver_with(
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = match tls {
        Some(_) => format!("https://localhost:{port}/hook"),
        None => format!("http://127.0.0.1:{port}/hook"),
    };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut sock: Box<dyn AsyncStream> = match acceptor {
                    Some(a) => match a.accept(tcp).await {
                        Ok(t) => Box::new(t),
                        Err(_) => return,
                    },
                    None => Box::new(tcp),
                };
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

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

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
    post(&s.client(Some("sys")), &s.url("/v1/sys/seal"), json!({})).await;
    expect(&mut rx, "sealed", t).await;
    // The command got the same events.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // One command at a time, the kinds that matter first: all within the deadline.
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

/// Issue 22: a flood of events costs bounded alerts and processes, and the alerts that
/// matter still arrive. A thousand denials (an identity probing keys it has no grant for;
/// the same holds for unauthenticated XKS requests) send their kind's first events one by
/// one and count the rest into a summary (`count`, sample identities), so every denial is
/// accounted for; the alert command runs one at a time; and the `locked_out` and
/// `key_disabled` raised in the middle of the flood arrive. Before: one webhook call and
/// one concurrent child process per denial, and a full queue dropped whatever came next,
/// `sealed` and `locked_out` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_denials_is_counted_into_summaries_and_critical_alerts_still_arrive() {
    let (url, mut rx) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("alerts.jsonl");
    let procs = dir.path().join("procs");
    // Each run of the command marks its start (+) and end (-).
    let script = format!(
        "echo + >> {p}; cat >> {l}; echo >> {l}; sleep 0.02; echo - >> {p}",
        p = procs.display(),
        l = log.display()
    );
    let extra = format!(
        "[alerts]\nwebhook = \"{url}\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\n\n[lockout]\nthreshold = 1000\n"
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    create_key(&s, "admin-a", "k").await;
    // Denials from 8 clients at once until the identity is locked out.
    let denied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (app, url, denied) = (s.client(Some("app-a")), s.url("/v1/keys"), denied.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match get(&app, &url).await.0 {
                    403 => {
                        denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    429 => return,
                    other => panic!("{other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let denied = denied.load(std::sync::atomic::Ordering::Relaxed);
    assert!(denied >= 1000, "{denied}");
    let admin = s.client(Some("admin-a"));
    assert_eq!(
        post(&admin, &s.url("/v1/keys/k/disable"), json!({}))
            .await
            .0,
        200
    );

    // What one destination received: each denial accounted for, once, and few sent one
    // by one.
    fn tally(events: &[Value]) -> (u64, u64, bool, bool) {
        let (mut one_by_one, mut accounted) = (0, 0);
        for ev in events.iter().filter(|e| e["kind"] == "denied") {
            match ev["count"].as_u64() {
                Some(n) => accounted += n,
                None => {
                    one_by_one += 1;
                    accounted += 1;
                }
            }
        }
        let has = |k: &str| events.iter().any(|e| e["kind"] == k);
        (
            one_by_one,
            accounted,
            has("locked_out"),
            has("key_disabled"),
        )
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut hooked = Vec::new();
    loop {
        while let Ok(ev) = rx.try_recv() {
            hooked.push(ev);
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let commanded: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(
            commanded.len(),
            lines.len(),
            "commands running at once interleaved their events in the log"
        );
        let done = |t: (u64, u64, bool, bool)| t.1 >= denied && t.2 && t.3;
        if done(tally(&hooked)) && done(tally(&commanded)) {
            for (what, events) in [("webhook", &hooked), ("command", &commanded)] {
                let (one_by_one, accounted, _, _) = tally(events);
                assert_eq!(accounted, denied, "{what}: every denial counted once");
                assert!(
                    one_by_one <= 50,
                    "{what}: {one_by_one} of {denied} denials sent one by one"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 30 s: webhook {:?}, command {:?} (of {denied} denials)",
            tally(&hooked),
            tally(&commanded)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One command process at a time.
    let (mut running, mut most) = (0i32, 0i32);
    for mark in std::fs::read_to_string(&procs).unwrap().lines() {
        running += if mark == "+" { 1 } else { -1 };
        most = most.max(running);
    }
    assert_eq!(most, 1, "alert commands ran {most} at once");
}

/// Issue 22: alerts reach an `https://` webhook, checked against the configured CA (they
/// were `http://` only). A receiver whose certificate does not chain to that CA gets
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_an_https_webhook_that_chains_to_the_configured_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = keyhold_tests::generate_pki(pki_dir.path());
    let server_tls = || Some(std::sync::Arc::new(keyhold_tests::rustls_server(&pki)));
    let (url, mut rx) = receiver_with(server_tls()).await;
    let extra = format!(
        "[alerts]\nwebhook = \"{url}\"\nwebhook_ca = \"{}\"\n",
        pki.ca().display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let t = Instant::now();
    let (st, _) = get(&s.client(Some("app-a")), &s.url("/v1/keys")).await;
    assert_eq!(st, 403);
    let ev = expect(&mut rx, "denied", t).await;
    assert_eq!(ev["identity"], APP_A);

    // The same receiver, but the server trusts another CA (its own test PKI's).
    let (url, mut rx) = receiver_with(server_tls()).await;
    let extra = format!("[alerts]\nwebhook = \"{url}\"\nwebhook_ca = \"pki/ca.pem\"\n");
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let (st, _) = get(&s.client(Some("app-a")), &s.url("/v1/keys")).await;
    assert_eq!(st, 403);
    let got = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await;
    assert!(
        got.is_err(),
        "a webhook with an untrusted certificate got {got:?}"
    );
}
