//! The TLS layer: client certificates required and verified, TLS 1.3 by default, HTTP/2.

use std::sync::Arc;

use keyhold_tests::{rustls_client, TestServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{create_key, post};

/// Connects with raw rustls and tries one HTTP/1.1 request; returns the response bytes or
/// the error.
async fn raw_request(s: &TestServer, config: rustls::ClientConfig) -> Result<Vec<u8>, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /v1/sys/status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    if buf.is_empty() {
        return Err("connection closed without a response".into());
    }
    Ok(buf)
}

#[tokio::test]
async fn handshake_refused_without_or_with_a_foreign_certificate() {
    let s = TestServer::start().await;
    let none = raw_request(&s, rustls_client(&s.pki, None)).await;
    let err = none.expect_err("no client certificate must be refused");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let foreign = raw_request(&s, rustls_client(&s.pki, Some("foreign"))).await;
    let err = foreign.expect_err("a certificate from another CA must be refused");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownCA"),
        "{err}"
    );
    // reqwest sees the same.
    assert!(s
        .client(None)
        .get(s.url("/v1/sys/status"))
        .send()
        .await
        .is_err());
    assert!(s
        .client(Some("foreign"))
        .get(s.url("/v1/sys/status"))
        .send()
        .await
        .is_err());
    // And a proper certificate on the same server works.
    let ok = raw_request(&s, rustls_client(&s.pki, Some("admin-a")))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ok).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );
}

#[tokio::test]
async fn tls12_only_client_refused_by_default() {
    let s = TestServer::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for c in kms_server::base::pem::load_certs(&s.pki.ca()).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        kms_server::base::pem::load_certs(&s.pki.cert("admin-a")).unwrap(),
        kms_server::base::pem::load_key(&s.pki.key("admin-a")).unwrap(),
    )
    .unwrap();
    assert!(raw_request(&s, config).await.is_err());
}

#[tokio::test]
async fn http2_and_keep_alive_both_work() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let h2 = s.client_h2(Some("app-a"));
    let r = h2
        .post(s.url("/v1/keys/k/datakey"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let h1 = s.client(Some("app-a"));
    for _ in 0..5 {
        let r = h1
            .post(s.url("/v1/keys/k/datakey"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_11);
        assert_eq!(r.status(), 200);
    }
    let (st, _) = post(&h2, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn post_quantum_hybrid_key_exchange_is_negotiated() {
    let s = TestServer::start().await;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&s.pki, Some("app-a"))));
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let conn = tls.get_ref().1;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
}

/// Polls `f` for up to 10 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Whether a request on `client`'s open connection is refused: a 403 naming the revoked
/// certificate (the per-request check), or the connection closed and a new handshake
/// refused.
async fn refused(client: &reqwest::Client, url: &str) -> bool {
    match client.post(url).json(&json!({})).send().await {
        Err(_) => true,
        Ok(r) if r.status() == 403 => {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("revoked") || message.contains("revocation"),
                "{body}"
            );
            true
        }
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_after_the_crl_changes_while_others_keep_working() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    create_key(&s, "admin-b", "k").await;
    // app-a holds a keep-alive connection opened before the revocation.
    let app_a = s.client(Some("app-a"));
    let app_b = s.client(Some("app-b"));
    let datakey = s.url("/v1/keys/k/datakey");
    assert_eq!(post(&app_a, &datakey, json!({})).await.0, 200);
    assert_eq!(post(&app_b, &datakey, json!({})).await.0, 200);

    s.pki.revoke(&["app-a"], 2);
    // The open connection is refused from the reload on (per-request check, then the
    // connection is closed) ...
    eventually("the open connection refused", || refused(&app_a, &datakey)).await;
    // ... and a new handshake with the revoked certificate fails.
    let err = raw_request(&s, rustls_client(&s.pki, Some("app-a")))
        .await
        .expect_err("a revoked certificate's handshake must fail");
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    // Everyone else keeps working, on old and new connections.
    assert_eq!(post(&app_b, &datakey, json!({})).await.0, 200);
    assert_eq!(
        post(&s.client(Some("app-b")), &datakey, json!({})).await.0,
        200
    );
    assert!(raw_request(&s, rustls_client(&s.pki, Some("admin-a")))
        .await
        .is_ok());
    // Lifting the revocation (a new CRL without it) lets app-a back in.
    s.pki.revoke(&[], 3);
    eventually("app-a back after the CRL lists nothing", || async {
        raw_request(&s, rustls_client(&s.pki, Some("app-a")))
            .await
            .is_ok()
    })
    .await;
    assert_eq!(post(&app_a, &datakey, json!({})).await.0, 200);
    // A damaged CRL is refused and the previous list stays in force.
    std::fs::write(s.pki.crl(), b"not a CRL").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(post(&app_a, &datakey, json!({})).await.0, 200);
}

/// The tests that send SIGHUP to this whole process take turns: one's signal would
/// reload the other's server in the middle of its "no reload without the signal" check.
static SIGHUP_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_crl() {
    let _turn = SIGHUP_TESTS.lock().await;
    // Polling off: only the signal reloads.
    let s = TestServer::start_with_tls("crl_poll_secs = 0\n").await;
    s.pki.revoke(&["app-a"], 2);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        raw_request(&s, rustls_client(&s.pki, Some("app-a")))
            .await
            .is_ok(),
        "no reload without the signal"
    );
    // SIGHUP to this process: every server in it reloads (tokio's handler is registered).
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("app-a refused after SIGHUP", || async {
        raw_request(&s, rustls_client(&s.pki, Some("app-a")))
            .await
            .is_err()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_server_certificate_and_the_client_ca() {
    let _turn = SIGHUP_TESTS.lock().await;
    // Polling off: only the signal reloads.
    let s = TestServer::start_with_tls("crl_poll_secs = 0\n").await;
    // A new CA, with a client certificate for app A under it, in a directory of its own.
    let new_ca = kms_server::tools::pki::Pki::generate("keyhold rotated CA").unwrap();
    let new_dir = s.dir.path().join("pki-new");
    std::fs::create_dir_all(&new_dir).unwrap();
    std::fs::write(new_dir.join("ca.pem"), new_ca.ca_pem()).unwrap();
    let new_ca = std::sync::Arc::new(new_ca);
    let new_pki = keyhold_tests::TestPki {
        dir: new_dir,
        ca: Some(new_ca.clone()),
    };
    new_pki.issue("app-a", keyhold_tests::APP_A);
    let fresh = || rustls_client(&new_pki, Some("app-a"));
    // And a client that trusts only the old CA (its own copy of the files).
    let old_dir = s.dir.path().join("pki-old-client");
    std::fs::create_dir_all(&old_dir).unwrap();
    for f in ["ca.pem", "app-a.pem", "app-a-key.pem"] {
        std::fs::copy(s.pki.dir.join(f), old_dir.join(f)).unwrap();
    }
    let old_pki = keyhold_tests::TestPki {
        dir: old_dir,
        ca: None,
    };
    assert!(raw_request(&s, rustls_client(&old_pki, Some("app-a")))
        .await
        .is_ok());
    assert!(
        raw_request(&s, fresh()).await.is_err(),
        "a client of the new CA only cannot talk to the server yet"
    );

    // The operator's rotation: new server certificate, both CAs trusted for clients during
    // the transition, a CRL from each; then `systemctl reload` (SIGHUP).
    let server = new_ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let dir = &s.pki.dir;
    std::fs::write(dir.join("server-key.pem"), server.key_pem.as_bytes()).unwrap();
    std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
    let old_ca = std::fs::read_to_string(s.pki.ca()).unwrap();
    std::fs::write(s.pki.ca(), format!("{old_ca}{}", new_ca.ca_pem())).unwrap();
    let old_crl = s.pki.ca.as_ref().unwrap().revocation_list(&[], 2).unwrap();
    let new_crl = new_ca.revocation_list(&[], 1).unwrap();
    std::fs::write(s.pki.crl(), format!("{old_crl}{new_crl}")).unwrap();
    // Nothing changes before the signal.
    assert!(raw_request(&s, fresh()).await.is_err());
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the new CA's client is served after SIGHUP", || async {
        raw_request(&s, fresh()).await.is_ok()
    })
    .await;
    // The server now presents the new certificate: a client trusting only the old CA
    // refuses it (clients are given the new CA before the switch, in a real rotation).
    assert!(raw_request(&s, rustls_client(&old_pki, Some("app-a")))
        .await
        .is_err());
    // Its client certificate still chains to a trusted CA (both are, in the transition):
    // with the new server CA added to its roots it is served again.
    let both = s.dir.path().join("pki-old-client/ca.pem");
    std::fs::write(&both, std::fs::read_to_string(s.pki.ca()).unwrap()).unwrap();
    assert!(raw_request(&s, rustls_client(&old_pki, Some("app-a")))
        .await
        .is_ok());
}

/// Issue 22: a CRL past its `nextUpdate` is not trusted. It says nothing about what was
/// revoked since, so every client certificate is refused, on new handshakes and on open
/// connections, until a fresh CRL is loaded. Before, an expired CRL kept serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_past_its_next_update_refuses_every_client_until_a_fresh_one() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app_a = s.client(Some("app-a"));
    let datakey = s.url("/v1/keys/k/datakey");
    assert_eq!(post(&app_a, &datakey, json!({})).await.0, 200);
    s.pki.expired_crl(2);
    eventually("the open connection refused", || refused(&app_a, &datakey)).await;
    assert!(
        raw_request(&s, rustls_client(&s.pki, Some("app-b")))
            .await
            .is_err(),
        "a new handshake under an expired CRL must fail"
    );
    // A fresh CRL: served again.
    s.pki.revoke(&[], 3);
    eventually("served again under a fresh CRL", || async {
        raw_request(&s, rustls_client(&s.pki, Some("app-b")))
            .await
            .is_ok()
    })
    .await;
    assert_eq!(post(&app_a, &datakey, json!({})).await.0, 200);
}

/// A stolen certificate, revoked: its open connection is closed at the CRL reload, and
/// what it tries meanwhile counts against that certificate, never against its identity,
/// so the certificate re-issued to the owner keeps working (issue 22, point 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_loses_its_connection_and_cannot_lock_out_the_reissued_one() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let stolen = s.client(Some("app-a"));
    let datakey = s.url("/v1/keys/k/datakey");
    assert_eq!(post(&stolen, &datakey, json!({})).await.0, 200);
    s.pki.issue("app-a-reissued", keyhold_tests::APP_A);
    s.pki.revoke(&["app-a"], 2);
    // The thief keeps asking on its open connection until the server closes it (and new
    // handshakes fail).
    let started = std::time::Instant::now();
    let mut denied = 0;
    let closed = loop {
        match stolen.post(&datakey).json(&json!({})).send().await {
            Err(_) => break true,
            Ok(r) => {
                if r.status() == 403 {
                    denied += 1;
                }
            }
        }
        if started.elapsed() > std::time::Duration::from_secs(15) {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        closed,
        "the revoked certificate's connection was still served 15 s after the revocation ({denied} denials)"
    );
    // The owner's new certificate works: the identity was never locked out.
    let reissued = s.client(Some("app-a-reissued"));
    assert_eq!(post(&reissued, &datakey, json!({})).await.0, 200);
    let (st, body) = crate::get(&s.client(Some("admin-a")), &s.url("/v1/sys/lockouts")).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        !body.to_string().contains(keyhold_tests::APP_A),
        "the identity is locked out: {body}"
    );
}
