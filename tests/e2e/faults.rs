//! Faults from the network: clients that stall (slowloris: before the TLS handshake,
//! mid-headers, mid-body) and a flood of idle connections. The server sheds them on its
//! timeouts and keeps serving everyone else meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold_tests::TestServer;
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
    let mut cfg = keyhold_tests::rustls_client(&s.pki, Some("app-a"));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
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
    // Mid-headers: hyper's header timeout (30 s) closes them; they hold nothing else. They
    // are still open here, and the server still serves.
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
    // Connections at once, half of them through a full mTLS handshake, then idle.
    let mut idle = Vec::new();
    for _ in 0..per_kind {
        idle.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    let mut tls = Vec::new();
    for _ in 0..per_kind {
        tls.push(tls_stream(&s).await);
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
