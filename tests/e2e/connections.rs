//! Issue 22: connections from a hostile network are bounded on every listener (the mTLS
//! API, the public listener, the XKS listener, the plain-HTTP ops listener and, since
//! issue 27, the KMIP listener): a source
//! that opens thousands of idle connections gets a bounded share, and a connection that
//! stalls (no handshake, headers never finished, a body never sent, a keep-alive or
//! HTTP/2 connection left idle) is closed after its timeout.
//!
//! The junk comes from 127.0.0.2 (Linux routes all of 127/8 to loopback) and the
//! legitimate client from 127.0.0.1: two sources, as on a real network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold_tests::{connect_from, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server with every listener: the mTLS API, ops, public (DKE) and XKS, with `limits`
/// among its top-level settings and `tls_extra` in its `[tls]` table.
async fn every_listener(limits: &str, tls_extra: &str) -> (TestServer, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let jwks = files.path().join("jwks.json");
    keyhold_tests::TokenIssuer::new("issuer-1").write_jwks(&jwks);
    let creds = files.path().join("xks-credentials.toml");
    keyhold_tests::xks::write_credentials(
        &creds,
        &[(keyhold_tests::xks::ACCESS_KEY, keyhold_tests::xks::SECRET)],
    );
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[dke]
url = "https://localhost/dke"
issuers = ["https://sts.windows.net/test-tenant/"]
jwks = "{jwks}"
tenant = "acme"
identity = "spiffe://test/acme/dke"

[[dke.keys]]
name = "finance"
key = "finance-dke"
emails = ["alice@example.com"]

{xks}

[kmip]
listen = "127.0.0.1:0"
"#,
        jwks = jwks.display(),
        xks = keyhold_tests::xks::config(&creds, 1000, "", ""),
    );
    let mut s = TestServer::start_with_both(&extra, tls_extra).await;
    if !limits.is_empty() {
        s.stop().await;
        let text = std::fs::read_to_string(&s.config).unwrap();
        let text = text.replacen("ops_listen = ", &format!("{limits}\nops_listen = "), 1);
        std::fs::write(&s.config, text).unwrap();
        s.start_again().await;
    }
    s.wait_ready().await;
    (s, files)
}

/// Raises this process's open-file limit to its hard limit (both ends of every connection
/// live in this process) and returns how many connections at once fit, keeping 1 024
/// descriptors for the rest of the suite.
fn connections_that_fit(wanted: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
    let have = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let fit = usize::try_from(have.saturating_sub(1024) / 2).unwrap_or(wanted);
    assert!(
        fit >= 600,
        "too few file descriptors ({have}) for this test"
    );
    wanted.min(fit)
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    Api,
    Public,
    Xks,
    Ops,
    Kmip,
}

const LISTENERS: [Listener; 5] = [
    Listener::Api,
    Listener::Public,
    Listener::Xks,
    Listener::Ops,
    Listener::Kmip,
];

/// The listeners with TLS.
const TLS_LISTENERS: [Listener; 4] = [
    Listener::Api,
    Listener::Public,
    Listener::Xks,
    Listener::Kmip,
];

fn addr_of(s: &TestServer, l: Listener) -> SocketAddr {
    match l {
        Listener::Api => s.addr,
        Listener::Public => s.public_addr.unwrap(),
        Listener::Xks => s.xks_addr.unwrap(),
        Listener::Ops => s.ops_addr,
        Listener::Kmip => s.kmip_addr.unwrap(),
    }
}

const JUNK: [u8; 4] = [127, 0, 0, 2];
const LEGIT: [u8; 4] = [127, 0, 0, 1];

/// A stream the tests write requests to and read answers from: TLS or plain.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// How to reach one listener: its address, and the client's TLS settings when it has TLS
/// (the app's certificate on the mTLS API).
#[derive(Clone)]
struct Dial {
    listener: Listener,
    addr: SocketAddr,
    tls: Option<rustls::ClientConfig>,
}

fn dial(s: &TestServer, l: Listener) -> Dial {
    let who = match l {
        Listener::Api | Listener::Kmip => Some("app-a"),
        _ => None,
    };
    Dial {
        listener: l,
        addr: addr_of(s, l),
        tls: (!matches!(l, Listener::Ops)).then(|| keyhold_tests::rustls_client(&s.pki, who)),
    }
}

impl Dial {
    /// A connection from `from`, through the TLS handshake when the listener has TLS,
    /// offering `alpn`.
    async fn open(&self, from: [u8; 4], alpn: &[u8]) -> Box<dyn Io> {
        let tcp = connect_from(from, self.addr).await.unwrap();
        let Some(config) = &self.tls else {
            return Box::new(tcp);
        };
        let mut config = config.clone();
        config.alpn_protocols = if alpn.is_empty() {
            Vec::new()
        } else {
            vec![alpn.to_vec()]
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        Box::new(tls)
    }
}

/// Whether the server closes `io` within `within` (reading and discarding what it sends).
async fn closed_within(io: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A KMIP Discover Versions request.
fn kmip_request() -> Vec<u8> {
    use kms_server::adapters::kmip::{message::Version, tags as t};
    crate::kmip::one_item(Version::new(1, 4), t::OP_DISCOVER_VERSIONS, Vec::new())
}

/// One HTTP/1.1 request from `from`; the status code of the answer. On the KMIP listener:
/// one Discover Versions, 200 for a Response Message.
async fn status_of(d: &Dial, from: [u8; 4]) -> u16 {
    if let Listener::Kmip = d.listener {
        let mut io = d.open(from, b"").await;
        io.write_all(&kmip_request()).await.unwrap();
        let mut head = [0u8; 8];
        io.read_exact(&mut head)
            .await
            .unwrap_or_else(|e| panic!("Kmip: no answer: {e}"));
        assert_eq!(
            head[..4],
            [0x42, 0x00, 0x7B, 0x01],
            "Kmip: not a Response Message"
        );
        return 200;
    }
    let mut io = d.open(from, b"http/1.1").await;
    io.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = io.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{:?}: no HTTP answer: {text:?}", d.listener))
}

/// Thousands of idle TCP connections from one source (no TLS handshake, no request) do not
/// keep another source out of any listener. Before, a connection permit was taken before
/// the TLS handshake, so 4 096 idle connections held every slot of a listener until their
/// handshake timed out (60 s here), and the ops listener had no bound at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_from_one_source_do_not_keep_another_out() {
    let (s, _files) = every_listener("", "handshake_timeout_secs = 60").await;
    let idle = connections_that_fit(4200);
    for l in LISTENERS {
        let to = addr_of(&s, l);
        let mut junk = Vec::with_capacity(idle);
        for _ in 0..idle {
            // Refused or reset at once past the source's share: that is the point.
            if let Ok(c) = connect_from(JUNK, to).await {
                junk.push(c);
            }
        }
        let t0 = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(20), status_of(&dial(&s, l), LEGIT))
            .await
            .unwrap_or_else(|_| {
                panic!("{l:?}: the legitimate client waited 20 s behind {idle} idle connections")
            });
        assert!(status > 0, "{l:?}");
        eprintln!(
            "{l:?}: served in {:?} beside {idle} idle connections",
            t0.elapsed()
        );
        drop(junk);
    }
}

/// More idle connections than the handshake budget (1 024), from many sources (each
/// under its share): a new client is still served at once, on every TLS listener. The
/// oldest handshake still in progress gives up its place; before, with the budget spent,
/// every new connection was closed until the idle ones timed out (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_many_sources_do_not_keep_a_new_client_out() {
    let (s, _files) = every_listener("", "handshake_timeout_secs = 60").await;
    const IDLE: usize = 1100;
    assert_eq!(
        connections_that_fit(IDLE),
        IDLE,
        "too few file descriptors for this test"
    );
    for l in TLS_LISTENERS {
        let to = addr_of(&s, l);
        let mut junk = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            // 100 per source address: 127.0.1.0, 127.0.1.1, ...
            let from = [127, 0, 1, (i / 100) as u8];
            if let Ok(c) = connect_from(from, to).await {
                junk.push(c);
            }
        }
        // Old enough to give way.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(20), status_of(&dial(&s, l), LEGIT))
            .await
            .unwrap_or_else(|_| panic!("{l:?}: no answer within 20 s"));
        assert!(status > 0, "{l:?}");
        eprintln!(
            "{l:?}: served in {:?} beside {} idle connections from 11 sources",
            t0.elapsed(),
            junk.len()
        );
        drop(junk);
    }
}

/// A connection that stalls is closed after its timeout, on every listener: no TLS
/// handshake; request headers never finished; a body announced and never sent; an
/// HTTP/1.1 keep-alive connection left idle after an answer; an HTTP/2 connection with no
/// stream. Before: the ops listener closed none of them, a stalled body was held for as
/// long as the client liked on every listener, and an idle HTTP/2 connection (pinged and
/// answering) was never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_idle_connections_are_closed_on_every_listener() {
    let limits = "header_timeout_secs = 2\nbody_timeout_secs = 2\nidle_timeout_secs = 2";
    let (s, _files) = every_listener(limits, "handshake_timeout_secs = 2").await;
    // The timeouts are 2 s, and a connection asked to close gets 5 s more (an HTTP/2
    // client that never acknowledges the GOAWAY's ping): one still open 15 s later is
    // held. Every case at once, each on its own connection.
    let bound = Duration::from_secs(15);
    let mut cases = tokio::task::JoinSet::new();
    for l in LISTENERS {
        let d = dial(&s, l);
        let mut kinds = vec![
            "no handshake",
            "headers never finished",
            "a body never sent",
            "idle keep-alive",
        ];
        match l {
            Listener::Ops => {}
            Listener::Kmip => {
                kinds = vec![
                    "no handshake",
                    "a KMIP message never finished",
                    "idle after a KMIP answer",
                ]
            }
            _ => kinds.push("idle HTTP/2"),
        }
        for kind in kinds {
            let d = d.clone();
            cases.spawn(async move {
                let closed = match kind {
                    "no handshake" => {
                        let mut tcp = connect_from(LEGIT, d.addr).await.unwrap();
                        closed_within(&mut tcp, bound).await
                    }
                    "idle HTTP/2" => {
                        let mut io = d.open(LEGIT, b"h2").await;
                        // The client preface and an empty SETTINGS frame; then nothing.
                        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                            .await
                            .unwrap();
                        closed_within(&mut io, bound).await
                    }
                    "a KMIP message never finished" => {
                        let mut io = d.open(LEGIT, b"").await;
                        let request = kmip_request();
                        io.write_all(&request[..request.len() - 8]).await.unwrap();
                        closed_within(&mut io, bound).await
                    }
                    "idle after a KMIP answer" => {
                        let mut io = d.open(LEGIT, b"").await;
                        io.write_all(&kmip_request()).await.unwrap();
                        let mut head = [0u8; 8];
                        io.read_exact(&mut head).await.unwrap();
                        closed_within(&mut io, bound).await
                    }
                    _ => {
                        let request: &[u8] = match kind {
                            "headers never finished" => b"POST /v1/unwrap HTTP/1.1\r\nHost: localhost\r\n",
                            "a body never sent" => b"POST /v1/unwrap HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"wrap",
                            _ => b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
                        };
                        let mut io = d.open(LEGIT, b"http/1.1").await;
                        io.write_all(request).await.unwrap();
                        closed_within(&mut io, bound).await
                    }
                };
                (!closed).then(|| format!("{:?}: {kind}", d.listener))
            });
        }
    }
    let held: Vec<String> = cases.join_all().await.into_iter().flatten().collect();
    assert!(
        held.is_empty(),
        "still open after {bound:?}:\n{}",
        held.join("\n")
    );
}

/// Every connection slot taken (`max_connections = 200`) by established connections that
/// hold it for nothing, half idle after their handshake and half stalled in a request
/// body, with every timeout far away: a new client is still served at once, on every
/// listener. The connection that has held its slot for nothing the longest (at least
/// `listen::EVICT_SLOT_AFTER`) is closed and hands its slot over. Before, the new client
/// waited for a slot until its handshake deadline (60 s here) and was then closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_set_of_slots_makes_room_for_a_new_client() {
    let (s, _files) = every_listener(
        "max_connections = 200\nper_source_connections = 100\nmax_handshakes = 200\nheader_timeout_secs = 120\nbody_timeout_secs = 120\nidle_timeout_secs = 600",
        "handshake_timeout_secs = 60",
    )
    .await;
    for (l, stalled) in LISTENERS.into_iter().flat_map(|l| [(l, false), (l, true)]) {
        let d = dial(&s, l);
        let mut held = Vec::new();
        for i in 0..200usize {
            // 50 per source address, under the per-source share.
            let from = [127, 0, 2, (i / 50) as u8];
            let kmip = matches!(l, Listener::Kmip);
            let mut io = d.open(from, if kmip { b"" } else { b"http/1.1" }).await;
            if stalled && kmip {
                // A message head and half its body.
                let request = kmip_request();
                io.write_all(&request[..request.len() / 2]).await.unwrap();
            } else if stalled {
                io.write_all(
                    b"POST /v1/unwrap HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"wrapped\":",
                )
                .await
                .unwrap();
            }
            held.push(io);
        }
        // Long enough to be evicted.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t0 = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(10), status_of(&d, LEGIT))
            .await
            .unwrap_or_else(|_| {
                panic!("{l:?}, stalled bodies {stalled}: the new client waited 10 s for one of 200 slots held for nothing")
            });
        assert!(status > 0, "{l:?}");
        eprintln!(
            "{l:?}, stalled bodies {stalled}: served in {:?} with every slot held",
            t0.elapsed()
        );
        drop(held);
        // The server lets go of the dropped ones before the next listener's round.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
