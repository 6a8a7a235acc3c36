//! A client we did not write: the `curl` binary, over mTLS, datakey then unwrap.

use std::process::Command;

use keyhold_tests::TestServer;
use serde_json::Value;

use crate::create_key;

fn curl(s: &TestServer, who: &str, path: &str, body: &str) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--fail-with-body", "--cacert"])
        .arg(s.pki.ca())
        .arg("--cert")
        .arg(s.pki.cert(who))
        .arg("--key")
        .arg(s.pki.key(who))
        .args(["-H", "content-type: application/json", "-d", body])
        .arg(s.url(path))
        .env_remove("CURL_CA_BUNDLE")
        .output()
        .expect("the curl binary must be installed (apt-get install curl)");
    assert!(
        out.status.success(),
        "curl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_datakey_then_unwrap() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let s2 = std::sync::Arc::new(s);
    let s3 = s2.clone();
    let (dk, un) = tokio::task::spawn_blocking(move || {
        let dk = curl(
            &s3,
            "app-a",
            "/v1/keys/k/datakey",
            r#"{"context":{"doc":"42"}}"#,
        );
        let body = format!(
            r#"{{"wrapped":"{}","context":{{"doc":"42"}}}}"#,
            dk["wrapped"].as_str().unwrap()
        );
        let un = curl(&s3, "app-a", "/v1/unwrap", &body);
        (dk, un)
    })
    .await
    .unwrap();
    assert_eq!(dk["plaintext"].as_str().unwrap().len(), 44);
    assert_eq!(un["plaintext"], dk["plaintext"]);
    // And curl without a client certificate is refused at the handshake.
    let s4 = s2.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(s4.pki.ca())
            .arg(s4.url("/v1/keys"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    // curl reports the refused handshake as 35, 55 or 56 depending on timing; no body.
    assert!(matches!(out.status.code(), Some(35 | 55 | 56)), "{out:?}");
    assert!(out.stdout.is_empty());
}
