//! Issue 24: two protocols at the root of one listener, each on its own host name.
//! Microsoft's DKE checklist wants the key URL at the root of its host; Cloud EKM over a
//! VPC calls `https://<hostname>/<key path>` from the root. `[dke] host` and `[ekm] host`
//! give each its name on the same `[public]` listener (one certificate naming both); a
//! request goes to the protocol of the name it asks for, and one whose `Host` is not
//! the name its TLS connection was opened for (SNI) is 421. Driven by curl, which sets
//! SNI from the URL and lets the test send another `Host`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

const DKE_IDENTITY: &str = "spiffe://test/acme/dke";
const EKM_IDENTITY: &str = "spiffe://test/acme/ekm";
const AGENT: &str = "service-1@gcp-sa-ekms.iam.gserviceaccount.com";

/// `curl` to `https://<host>:<port><path>` resolved to the listener: (status, body).
fn curl(ca: &std::path::Path, port: u16, host: &str, path: &str, extra: &[&str]) -> (u16, Value) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        code.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dke_and_ekm_share_the_root_on_two_host_names() {
    let dir = tempfile::tempdir().unwrap();
    // One certificate naming both hosts (and localhost), from a CA of the test's own.
    let ca = kms_server::tools::pki::Pki::generate("public CA").unwrap();
    let issued = ca
        .issue_server(&["dke.test", "ekm.test", "localhost"])
        .unwrap();
    let (ca_pem, cert, key) = (
        dir.path().join("public-ca.pem"),
        dir.path().join("public.pem"),
        dir.path().join("public-key.pem"),
    );
    std::fs::write(&ca_pem, ca.ca_pem()).unwrap();
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
    let dke_issuer = keyhold_tests::TokenIssuer::new("ms1");
    dke_issuer.write_jwks(&dir.path().join("ms.json"));
    let google = keyhold_tests::TokenIssuer::new("g1");
    google.write_jwks(&dir.path().join("google.json"));
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"

[dke]
url = "https://dke.test"
mount = "/"
host = "dke.test"
issuers = ["https://sts.windows.net/t/"]
jwks = "{ms}"
tenant = "acme"
identity = "{DKE_IDENTITY}"

[[dke.keys]]
name = "finance"
key = "finance-dke"
emails = ["alice@example.com"]

[ekm]
url = "https://ekm.test"
mount = "/"
host = "ekm.test"
jwks = "{g}"
tenant = "acme"
identity = "{EKM_IDENTITY}"

[[ekm.keys]]
path = "v0/cryptospaces/payments/keys/k1"
key = "ekm-kek"
callers = ["{AGENT}"]
allow_missing_reason = true
"#,
        cert = cert.display(),
        key = key.display(),
        ms = dir.path().join("ms.json").display(),
        g = dir.path().join("google.json").display(),
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let admin = s.client(Some("admin-a"));
    for (name, body) in [
        (
            "finance-dke",
            json!({"algorithm": "rsa-oaep-2048-sha256",
                   "grants": [{"identity": DKE_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
        ),
        (
            "ekm-kek",
            json!({"grants": [{"identity": EKM_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
        ),
    ] {
        let mut body = body;
        body["name"] = json!(name);
        let r = post(&admin, &s.url("/v1/keys"), body).await;
        assert_eq!(r.0, 201, "{r:?}");
    }
    let port = s.public_addr.unwrap().port();

    // DKE at the root of dke.test.
    let (st, got) = curl(&ca_pem, port, "dke.test", "/finance", &[]);
    assert_eq!(st, 200, "{got}");
    assert!(got["key"]["kid"]
        .as_str()
        .unwrap()
        .starts_with("https://dke.test/finance/"));

    // EKM at the root of ekm.test: wrap, then unwrap.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = google.sign(
        &json!({"iss": "https://accounts.google.com", "aud": "https://ekm.test",
        "email": AGENT, "iat": now, "exp": now + 600}),
    );
    let auth = format!("authorization: Bearer {token}");
    let post_json = |body: &Value| {
        vec![
            "-H".to_owned(),
            auth.clone(),
            "-H".to_owned(),
            "content-type: application/json".to_owned(),
            "--data".to_owned(),
            body.to_string(),
        ]
    };
    let wrap = post_json(&json!({"plaintext": B64.encode([7u8; 32])}));
    let args: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let (st, w) = curl(
        &ca_pem,
        port,
        "ekm.test",
        "/v0/cryptospaces/payments/keys/k1:wrap",
        &args,
    );
    assert_eq!(st, 200, "{w}");
    let unwrap = post_json(&json!({"wrappedBlob": w["wrappedBlob"]}));
    let args: Vec<&str> = unwrap.iter().map(String::as_str).collect();
    let (st, u) = curl(
        &ca_pem,
        port,
        "ekm.test",
        "/v0/cryptospaces/payments/keys/k1:unwrap",
        &args,
    );
    assert_eq!(st, 200, "{u}");
    assert_eq!(u["plaintext"], B64.encode([7u8; 32]));

    // Each protocol only on its name: DKE's key URL on ekm.test, EKM's path on dke.test,
    // either on another name the certificate carries: not served.
    // (EKM's root route takes POST only: a GET there is 405, not DKE's key.)
    let on_ekm = curl(&ca_pem, port, "ekm.test", "/finance", &[]);
    assert!(matches!(on_ekm.0, 404 | 405), "{on_ekm:?}");
    assert!(on_ekm.1.get("key").is_none(), "{on_ekm:?}");
    let wrap = post_json(&json!({"plaintext": B64.encode([7u8; 32])}));
    let args: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let on_dke = curl(
        &ca_pem,
        port,
        "dke.test",
        "/v0/cryptospaces/payments/keys/k1:wrap",
        &args,
    );
    assert_eq!(on_dke.0, 404, "{on_dke:?}");
    assert_eq!(curl(&ca_pem, port, "localhost", "/finance", &[]).0, 404);

    // A connection opened for dke.test asking for ekm.test's routes: 421.
    let (st, e) = curl(
        &ca_pem,
        port,
        "dke.test",
        "/v0/cryptospaces/payments/keys/k1:wrap",
        &[&args[..], &["-H", "host: ekm.test"]].concat(),
    );
    assert_eq!(st, 421, "{e}");
    // The same Host with its port is the same name.
    let (st, _) = curl(
        &ca_pem,
        port,
        "dke.test",
        "/finance",
        &["-H", &format!("host: DKE.test:{port}")],
    );
    assert_eq!(st, 200);
}
