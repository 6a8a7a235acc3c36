//! Issue 24: Cloud EKM's bodies as protobuf's own JSON mapping writes and reads them.
//! `tests/fixtures/ekm/confidential_wrap.proto` holds the wrap/unwrap messages of
//! GoogleCloudPlatform/stet's `proto/confidential_wrap.proto` (source and commit named
//! there); `tests/fixtures/ekm/protojson_client.py` generates Python stubs from it with
//! grpcio-tools, writes each request with `json_format.MessageToJson` (lowerCamelCase, and
//! snake_case with `preserving_proto_field_name`; empty fields left out, as proto3 does)
//! and parses each answer with `json_format.Parse`, which refuses a field the proto does
//! not define or a `Duration` in the wrong form. A client Keyhold did not write.

use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

const AGENT: &str = "service-123456@gcp-sa-ekms.iam.gserviceaccount.com";
const EKM_IDENTITY: &str = "spiffe://test/acme/ekm";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ekm_speaks_protobufs_json_mapping_of_the_stet_messages() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import grpc_tools, google.protobuf"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(have, "CI must install grpcio-tools (.ci/run does)");
    let dir = tempfile::tempdir().unwrap();
    let google = keyhold_tests::TokenIssuer::new("g1");
    google.write_jwks(&dir.path().join("google.json"));
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[ekm]
url = "https://ekm.test/ekm"
jwks = "{g}"
tenant = "acme"
identity = "{EKM_IDENTITY}"

[[ekm.keys]]
path = "v0/payments"
key = "ekm-kek"
callers = ["{AGENT}"]
allowed_reasons = ["CUSTOMER_INITIATED_ACCESS"]
cache_secs = 300
"#,
        g = dir.path().join("google.json").display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "ekm-kek", "grants": [{"identity": EKM_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = google.sign(&json!({"iss": "https://accounts.google.com",
        "aud": "https://ekm.test", "email": AGENT, "iat": now, "exp": now + 600}));
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ekm");
    let out = std::process::Command::new("python3")
        .arg(fixtures.join("protojson_client.py"))
        .arg(&fixtures)
        .arg(dir.path())
        .arg(format!(
            "https://localhost:{}",
            s.public_addr.unwrap().port()
        ))
        .arg(s.pki.ca())
        .arg(&token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the protojson client failed (an answer the proto's JSON mapping refuses?)\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {stdout}"))
            .clone()
    };
    for ok in ["wrap", "unwrap", "wrap-empty", "unwrap-empty"] {
        assert_eq!(step(ok)["status"], 200, "{ok}: {}", step(ok));
    }
    assert_eq!(step("cache")["seconds"], 300);
    // Refusals in Google's error shape: the AAD differs; a reason not allowed (never
    // PERMISSION_DENIED, which Cloud KMS takes as permanent: docs/google-cloud-ekm.md).
    for (name, status) in [
        ("unwrap-other-aad", "INVALID_ARGUMENT"),
        ("unwrap-refused-reason", "FAILED_PRECONDITION"),
    ] {
        let st = step(name);
        assert!(st["status"].as_u64().unwrap() >= 400, "{st}");
        assert_eq!(st["body"]["error"]["status"], status, "{name}: {st}");
    }
}
