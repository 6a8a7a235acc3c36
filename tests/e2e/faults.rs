//! Faults from the network: clients that stall (slowloris: before the TLS handshake,
//! mid-headers, mid-body) and a flood of idle connections. The server sheds them on its
//! timeouts and keeps serving everyone else meanwhile. And faults between a client and
//! the server (a fault proxy on loopback): a hung endpoint, lost answers, slow and
//! truncated answers, met by `kms_client`'s timeouts, retries and failover.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold_tests::fault_proxy::{Fault, FaultProxy};
use keyhold_tests::TestServer;
use kms_client::api::Context;
use kms_client::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{create_key, post};

/// A server with 2-second handshake and body timeouts, a key, and the body of an unwrap
/// request for a DEK under it.
async fn impatient_server() -> (TestServer, serde_json::Value) {
    let mut s = TestServer::start_with_tls("handshake_timeout_secs = 2\n").await;
    s.stop().await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replacen("ops_listen = ", "body_timeout_secs = 2\nops_listen = ", 1);
    std::fs::write(&s.config, text).unwrap();
    s.start_again().await;
    create_key(&s, "admin-a", "k").await;
    let ctx = json!({"c": "1"});
    let (_, dk) = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/k/datakey"),
        json!({"context": ctx}),
    )
    .await;
    let body = json!({"wrapped": dk["wrapped"], "context": ctx});
    (s, body)
}

/// `n` unwraps by a well-behaved client; each must succeed within `limit`.
async fn serve_meanwhile(s: &TestServer, body: &serde_json::Value, n: usize, limit: Duration) {
    let app = s.client(Some("app-a"));
    for _ in 0..n {
        let t = Instant::now();
        let (st, r) = post(&app, &s.url("/v1/unwrap"), body.clone()).await;
        assert_eq!(st, 200, "{r}");
        assert!(
            t.elapsed() < limit,
            "an unwrap took {:?} while stalled clients were connected",
            t.elapsed()
        );
    }
}

async fn tls_stream(s: &TestServer) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_stream_from(s, [127, 0, 0, 1]).await
}

async fn tls_stream_from(
    s: &TestServer,
    from: [u8; 4],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut cfg = keyhold_tests::rustls_client(&s.pki, Some("app-a"));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = keyhold_tests::connect_from(from, s.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_shed_and_others_are_served() {
    let (s, body) = impatient_server().await;

    // 50 TCP connections that never start TLS, 20 that stop mid-headers, 20 mid-body.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    let mut mid_headers = Vec::new();
    for _ in 0..20 {
        let mut t = tls_stream(&s).await;
        t.write_all(b"POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\ncontent-ty")
            .await
            .unwrap();
        t.flush().await.unwrap();
        mid_headers.push(t);
    }
    let mut mid_body = Vec::new();
    for _ in 0..20 {
        let mut t = tls_stream(&s).await;
        t.write_all(
            b"POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"wrapped\":",
        )
        .await
        .unwrap();
        t.flush().await.unwrap();
        mid_body.push(t);
    }
    // Everyone else is served meanwhile, promptly.
    serve_meanwhile(&s, &body, 50, Duration::from_secs(1)).await;

    // The stalled body gets 408 with the error body once the body timeout passes.
    let started = Instant::now();
    for mut t in mid_body {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a stalled body was not shed within 10 s");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(
            text.contains("\"code\":\"InvalidRequest\"")
                && text.contains("did not arrive within 2 s"),
            "{text}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // Connections that never finished the handshake are closed after its timeout.
    for mut c in silent {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection stayed open: {r:?}"
        );
    }
    // Mid-headers: the header timeout (10 s by default) closes them; they hold nothing
    // else. They are still open here, and the server still serves.
    serve_meanwhile(&s, &body, 10, Duration::from_secs(1)).await;
    drop(mid_headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_stop_service_and_memory_stays_bounded() {
    let (s, body) = impatient_server().await;
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .unwrap()
    };
    // Both ends live in this process: 4 descriptors per connection. Raise the soft limit
    // to the hard one and size the flood to fit (1 000 + 1 000 on most machines).
    let per_kind = {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
        let have = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        usize::try_from(have.saturating_sub(512) / 4)
            .unwrap_or(1000)
            .min(1000)
    };
    assert!(per_kind >= 100, "too few file descriptors for a flood test");
    let before = rss();
    // Connections at once, half of them through a full mTLS handshake, then idle, from
    // many sources (100 per address: one source gets a bounded share, `connections.rs`).
    let source = |i: usize, net: u8| [127, net, (i / 100) as u8, 2];
    let mut idle = Vec::new();
    for i in 0..per_kind {
        idle.push(
            keyhold_tests::connect_from(source(i, 1), s.addr)
                .await
                .unwrap(),
        );
    }
    let mut tls = Vec::new();
    for i in 0..per_kind {
        tls.push(tls_stream_from(&s, source(i, 2)).await);
    }
    serve_meanwhile(&s, &body, 50, Duration::from_secs(2)).await;
    let during = rss();
    let grown_mib = during.saturating_sub(before) / 1024;
    eprintln!(
        "connection flood: RSS {} MiB -> {} MiB (+{grown_mib} MiB for {} connections, both ends in this process)",
        before / 1024,
        during / 1024,
        2 * per_kind
    );
    assert!(
        grown_mib < 256,
        "{} idle connections cost {grown_mib} MiB",
        2 * per_kind
    );
    drop(idle);
    drop(tls);
    serve_meanwhile(&s, &body, 10, Duration::from_secs(1)).await;
}

// ---- faults between client and server (the loopback fault proxy) ----

/// A server with key `k`, a DEK under it, and a proxy in front of the server.
async fn behind_proxy() -> (TestServer, FaultProxy, kms_client::api::DatakeyResponse) {
    let s = TestServer::start().await;
    s.kms_client("admin-a")
        .create_key(&keyhold_tests::create_granted("k", keyhold_tests::APP_A))
        .await
        .unwrap();
    let dk = s
        .kms_client("app-a")
        .datakey("k", &Context::new())
        .await
        .unwrap();
    let proxy = FaultProxy::start(s.addr).await;
    (s, proxy, dk)
}

fn via(s: &TestServer, who: &str, endpoints: &[String], request_timeout: Duration) -> Client {
    Client::builder()
        .endpoints(endpoints.iter().cloned())
        .ca_pem_file(s.pki.ca())
        .unwrap()
        .identity_pem_files(s.pki.cert(who), s.pki.key(who))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(request_timeout)
        // One request per connection at a time: the next server bytes on a kept-alive
        // connection are the next answer (HTTP/2 could send a window update first).
        .http1_only(true)
        .build()
        .unwrap()
}

/// Audit records of `operation` so far.
async fn audited(s: &TestServer, operation: &str) -> usize {
    let auditor = s.kms_client("auditor-a");
    let page = auditor.audit_page(0, 1000).await.unwrap();
    page.records
        .iter()
        .filter(|r| r.operation == operation)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_is_left_for_the_next_one_within_the_connect_timeout() {
    let (s, proxy, dk) = behind_proxy().await;
    proxy.set(Fault::Blackhole);
    let app = via(
        &s,
        "app-a",
        &[proxy.url(""), s.url("")],
        Duration::from_secs(5),
    );
    let t = Instant::now();
    let u = app
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .expect("the second endpoint answers");
    assert_eq!(u.plaintext, dk.plaintext);
    let first = t.elapsed();
    // One connect timeout (1 s: TCP connects, the TLS handshake never completes), then B.
    assert!(
        first >= Duration::from_millis(900) && first < Duration::from_secs(4),
        "{first:?}"
    );
    assert!(proxy.connections() >= 1);
    // The client now prefers the endpoint that answered: no more waiting.
    let t = Instant::now();
    for _ in 0..20 {
        app.unwrap(dk.wrapped.as_bytes(), &Context::new())
            .await
            .unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_repeated_only_for_operations_safe_to_repeat() {
    let (s, proxy, dk) = behind_proxy().await;
    let app = via(&s, "app-a", &[proxy.url("")], Duration::from_secs(5));
    let admin = via(&s, "admin-a", &[proxy.url("")], Duration::from_secs(5));
    // Kept-alive connections through the proxy first, so the next server bytes on them are
    // the answer to the next request.
    app.unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    admin.get_key("k").await.unwrap();
    let unwraps = audited(&s, "POST /v1/unwrap").await;

    // Unwrap: executed, answer lost, repeated by the client, answered.
    proxy.cut_next_responses(1);
    let u = app
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .expect("unwrap is safe to repeat");
    assert_eq!(u.plaintext, dk.plaintext);
    // The server ran it twice and audited both.
    assert_eq!(audited(&s, "POST /v1/unwrap").await, unwraps + 2);

    // Rotate: executed, answer lost, *not* repeated: the caller gets a transport error
    // and the key was rotated exactly once.
    proxy.cut_next_responses(1);
    let e = admin.rotate_key("k").await.unwrap_err();
    assert!(
        matches!(e, kms_client::Error::Transport { .. }),
        "a lost rotate answer is reported, not retried: {e:?}"
    );
    assert_eq!(
        s.kms_client("admin-a")
            .get_key("k")
            .await
            .unwrap()
            .current_version,
        2
    );

    // Create: the same. (The cut connection is gone: open a new one first, or the cut
    // would hit its handshake, which the client may always retry.)
    admin.get_key("k").await.unwrap();
    proxy.cut_next_responses(1);
    let e = admin
        .create_key(&keyhold_tests::create_granted("k2", keyhold_tests::APP_A))
        .await
        .unwrap_err();
    assert!(matches!(e, kms_client::Error::Transport { .. }), "{e:?}");
    let keys = s.kms_client("admin-a").list_keys().await.unwrap();
    assert_eq!(keys.iter().filter(|k| k.name == "k2").count(), 1);
    // And the caller can see what happened and carry on: the key exists.
    let e = admin
        .create_key(&keyhold_tests::create_granted("k2", keyhold_tests::APP_A))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(kms_client::api::ErrorCode::AlreadyExists));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_truncated_answers_end_in_typed_errors_and_the_server_keeps_serving() {
    let (s, proxy, dk) = behind_proxy().await;
    let direct = s.kms_client("app-a");

    // 300 ms each way per chunk: within a 5 s request timeout it works, slowly. (Its
    // connection is made while the path is fast: a handshake's three flights would take
    // about the 1 s connect timeout.)
    let patient = via(&s, "app-a", &[proxy.url("")], Duration::from_secs(5));
    patient
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    proxy.set(Fault::Delay(Duration::from_millis(300)));
    let t = Instant::now();
    let u = patient
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    assert_eq!(u.plaintext, dk.plaintext);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );

    // With a 200 ms request timeout every round times out: a typed timeout, bounded.
    let hasty = via(&s, "app-a", &[proxy.url("")], Duration::from_millis(200));
    // Its connection is made while the path is fast.
    proxy.set(Fault::None);
    hasty
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    proxy.set(Fault::Delay(Duration::from_millis(300)));
    let t = Instant::now();
    let e = hasty
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap_err();
    assert!(matches!(e, kms_client::Error::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The direct path was never affected.
    direct
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();

    // Answers cut after 100 bytes (mid-TLS-record; new connections then fail in the
    // handshake): never a wrong DEK, a transport error once the retries are spent.
    proxy.set(Fault::None);
    let cut = via(&s, "app-a", &[proxy.url("")], Duration::from_secs(5));
    cut.unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    proxy.set(Fault::Truncate(100));
    let e = cut
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            kms_client::Error::Transport { .. } | kms_client::Error::Unreachable { .. }
        ),
        "{e:?}"
    );
    direct
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();

    // Fault gone: the same clients work again, and the server's trail is intact.
    proxy.set(Fault::None);
    for c in [&patient, &hasty, &cut] {
        let u = c
            .unwrap(dk.wrapped.as_bytes(), &Context::new())
            .await
            .unwrap();
        assert_eq!(u.plaintext, dk.plaintext);
    }
    assert!(s
        .kms_client("auditor-a")
        .audit_verify(true)
        .await
        .unwrap()
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_request_in_flight_and_refuses_new_connections() {
    let (s, body) = impatient_server().await;
    let body = serde_json::to_vec(&body).unwrap();
    let addr = s.addr;
    // A request in flight: headers and half of the body sent.
    let mut tls = tls_stream(&s).await;
    let head = format!(
        "POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    tls.write_all(&body[..half]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Shutdown begins (SIGTERM in the binary; the same future here).
    let mut s = s;
    let stopping = tokio::spawn(async move {
        s.stop().await;
        s
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "the server stopped with a request in flight"
    );
    // Draining: new connections are refused.
    let e = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("a new connection was accepted while draining");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // The request in flight completes normally.
    tls.write_all(&body[half..]).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
        .await
        .expect("the drained connection closes after its answer")
        .ok();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"plaintext\""), "{text}");
    // Then the server is down, and its audit trail holds the drained request.
    let s = tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("shutdown finishes once drained")
        .unwrap();
    let chain = std::fs::read_to_string(s.dir.path().join("store.audit")).unwrap_or_default();
    assert!(
        chain.matches("\"POST /v1/unwrap\"").count() >= 1,
        "the drained unwrap is in the audit file"
    );
}
