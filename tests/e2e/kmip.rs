//! Issue 27: the KMIP listener, driven by a client Keyhold did not write: PyKMIP 0.11's
//! `ProxyKmipClient` (`tests/fixtures/kmip/pykmip_client.py`), with its own TTLV codec
//! and TLS, over mutual TLS with the test PKI's certificates.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::{TestServer, APP_A};
use serde_json::{json, Value};

use crate::{get, put};

/// A PyKMIP process speaking `version` (None: PyKMIP's default, 1.2).
struct PyKmip {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PyKmip {
    fn open(s: &TestServer, version: Option<&str>) -> PyKmip {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/kmip/pykmip_client.py"
        );
        let addr = s.kmip_addr.expect("[kmip] configured");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(s.pki.ca())
            .arg(&s.pki.dir);
        if let Some(v) = version {
            cmd.arg(v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (CI installs PyKMIP)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        PyKmip {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?} for {cmd}"))
    }
}

impl Drop for PyKmip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn refused(answer: &Value, reason: &str) {
    assert_eq!(answer["reason"], reason, "{answer}");
    assert_eq!(answer["status"], "OPERATION_FAILED", "{answer}");
}

/// The whole life of a key through PyKMIP, in the client's default version (1.2) and in
/// 1.4: create, locate, activate, encrypt and decrypt (by an app the admin granted),
/// attributes, Get refused, revoke, destroy; each refusal with its result reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pykmip_drives_a_key_through_its_life() {
    let s = TestServer::start_with(
        keyhold_tests::TestSeal::KeyFile,
        "[kmip]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    for version in [None, Some("1.4")] {
        let mut kmip = PyKmip::open(&s, version);
        let key = format!("pykmip-{}", version.unwrap_or("default").replace('.', "-"));
        let made = kmip.call(json!({"as": "admin-a", "op": "create", "name": key}));
        assert_eq!(made["uid"], key.as_str(), "{made}");
        // Only AES-256 here; an app cannot create.
        let small =
            kmip.call(json!({"as": "admin-a", "op": "create", "name": "small", "length": 128}));
        refused(&small, "INVALID_FIELD");
        refused(
            &kmip.call(json!({"as": "app-a", "op": "create", "name": "by-app"})),
            "PERMISSION_DENIED",
        );
        let again = kmip.call(json!({"as": "admin-a", "op": "create", "name": key}));
        let exists = if version == Some("1.4") {
            "OBJECT_ALREADY_EXISTS"
        } else {
            "INVALID_FIELD"
        };
        refused(&again, exists);

        // Pre-Active until activated: unusable.
        let attrs = kmip
            .call(json!({"as": "admin-a", "op": "get_attributes", "uid": key, "names": ["State"]}));
        assert_eq!(attrs["attributes"]["State"], "PRE_ACTIVE", "{attrs}");
        let pre =
            kmip.call(json!({"as": "admin-a", "op": "locate", "name": key, "state": "PRE_ACTIVE"}));
        assert_eq!(pre["uids"], json!([key]), "{pre}");
        kmip.call(json!({"as": "admin-a", "op": "activate", "uid": key}));
        let attrs = kmip.call(json!({"as": "admin-a", "op": "get_attributes", "uid": key}));
        let a = &attrs["attributes"];
        assert_eq!(a["State"], "ACTIVE", "{attrs}");
        assert_eq!(a["Cryptographic Algorithm"], "AES", "{attrs}");
        assert_eq!(a["Cryptographic Length"], 256, "{attrs}");
        assert_eq!(a["Name"], key.as_str(), "{attrs}");
        let names = kmip.call(json!({"as": "admin-a", "op": "get_attribute_list", "uid": key}));
        assert!(
            names["names"].as_array().unwrap().contains(&json!("State")),
            "{names}"
        );
        let active = kmip.call(json!({"as": "admin-a", "op": "locate", "state": "ACTIVE", "object_type": "SYMMETRIC_KEY"}));
        assert!(
            active["uids"].as_array().unwrap().contains(&json!(key)),
            "{active}"
        );

        // The app needs a grant (KMIP has no grant operation: the native API's).
        let data = B64.encode(b"a record the provider keeps encrypted");
        refused(
            &kmip.call(json!({"as": "app-a", "op": "encrypt", "uid": key, "data": data})),
            "PERMISSION_DENIED",
        );
        let r = put(
            &s.client(Some("admin-a")),
            &s.url(&format!("/v1/keys/{key}/grants")),
            json!({"grants": [{"identity": APP_A, "operations": ["wrap", "unwrap"]}]}),
        )
        .await;
        assert_eq!(r.0, 200, "{r:?}");
        let enc = kmip.call(json!({"as": "app-a", "op": "encrypt", "uid": key, "data": data}));
        assert!(enc["data"].is_string(), "{enc}");
        assert_ne!(enc["data"], data.as_str());
        let dec = kmip.call(json!({"as": "app-a", "op": "decrypt", "uid": key, "data": enc["data"], "iv": enc["iv"]}));
        assert_eq!(dec["data"], data.as_str(), "{dec}");
        // An altered ciphertext does not open.
        let mut bad = B64.decode(enc["data"].as_str().unwrap()).unwrap();
        bad[0] ^= 1;
        let tampered = kmip.call(json!({"as": "app-a", "op": "decrypt", "uid": key, "data": B64.encode(&bad), "iv": enc["iv"]}));
        refused(&tampered, "CRYPTOGRAPHIC_FAILURE");

        // Get: the material never leaves (Not Extractable from 1.4 on).
        let got = kmip.call(json!({"as": "admin-a", "op": "get", "uid": key}));
        let not_extractable = if version == Some("1.4") {
            "NOT_EXTRACTABLE"
        } else {
            "PERMISSION_DENIED"
        };
        refused(&got, not_extractable);

        // An active key cannot be destroyed; revoked, it can; then nothing opens.
        refused(
            &kmip.call(json!({"as": "admin-a", "op": "destroy", "uid": key})),
            "PERMISSION_DENIED",
        );
        kmip.call(json!({"as": "admin-a", "op": "revoke", "uid": key, "reason": "CESSATION_OF_OPERATION"}));
        let attrs = kmip
            .call(json!({"as": "admin-a", "op": "get_attributes", "uid": key, "names": ["State"]}));
        assert_eq!(attrs["attributes"]["State"], "DEACTIVATED", "{attrs}");
        refused(
            &kmip.call(json!({"as": "app-a", "op": "decrypt", "uid": key, "data": enc["data"], "iv": enc["iv"]})),
            "PERMISSION_DENIED",
        );
        let destroyed = kmip.call(json!({"as": "admin-a", "op": "destroy", "uid": key}));
        assert_eq!(destroyed, json!({}), "{destroyed}");
        let (st, info) = get(
            &s.client(Some("admin-a")),
            &s.url(&format!("/v1/keys/{key}")),
        )
        .await;
        assert_eq!(
            (st, info["state"].as_str()),
            (200, Some("pending-deletion")),
            "{info}"
        );
        refused(
            &kmip.call(json!({"as": "admin-a", "op": "get_attributes", "uid": "no-such-key"})),
            "ITEM_NOT_FOUND",
        );
    }

    // Every KMIP operation is in the audit trail, with its identity and key.
    let (status, audit) = get(&s.client(Some("auditor-a")), &s.url("/v1/audit?limit=1000")).await;
    assert_eq!(status, 200, "{audit}");
    let records = audit["records"].as_array().unwrap();
    for (op, who) in [
        ("KMIP Create", keyhold_tests::ADMIN_A),
        ("KMIP Activate", keyhold_tests::ADMIN_A),
        ("KMIP Encrypt", APP_A),
        ("KMIP Decrypt", APP_A),
        ("KMIP Get", keyhold_tests::ADMIN_A),
        ("KMIP Revoke", keyhold_tests::ADMIN_A),
        ("KMIP Destroy", keyhold_tests::ADMIN_A),
    ] {
        assert!(
            records
                .iter()
                .any(|r| r["operation"] == op && r["identity"] == who),
            "no audit record {op} by {who}"
        );
    }
}
