//! The secrets-leak test: run the `kms-server` binary in dev mode with the most verbose
//! logging, put it through a workload (datakey, unwrap, rewrap, rotations, denials), then
//! look for every DEK, every KEK version and the master key — raw, base64 and hex — in the
//! log, the audit records (API page and chain file), the metrics page, the store and the
//! erasure file; and for whole wrapped DEKs in the log and the audit records.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::forensics::{contains, encodings, keks};
use keyhold_tests::workspace_bin;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nhost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn no_key_material_in_logs_audit_metrics_or_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let log_path = dir.path().join("server.log");
    let (api, ops) = (free_port(), free_port());
    let mut child = Command::new(workspace_bin("kms-server"))
        .arg("dev")
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{api}"))
        .arg("--ops-listen")
        .arg(format!("127.0.0.1:{ops}"))
        .arg("--public-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(ops, "/readyz").is_some_and(|r| r.contains(" 200 ")) {
        assert!(Instant::now() < deadline, "dev mode did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pki = data.join("pki");
    let curl = |who: &str, path: &str, body: Option<&str>| -> String {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "20", "--cacert"])
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join(format!("{who}.pem")))
            .arg("--key")
            .arg(pki.join(format!("{who}-key.pem")))
            .args(["-H", "content-type: application/json"]);
        if let Some(b) = body {
            c.args(["-d", b]);
        }
        let out = c
            .arg(format!("https://127.0.0.1:{api}{path}"))
            .env_remove("CURL_CA_BUNDLE")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let field = |json: &str, name: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v[name].as_str().unwrap().to_owned()
    };
    let mut deks = Vec::new();
    let mut wrapped_all = Vec::new();
    // An RSA KEK too: its private key (PKCS#8) must not leak either.
    let r = curl(
        "admin",
        "/v1/keys",
        Some(
            r#"{"name":"rsa","algorithm":"rsa-oaep-3072-sha256","grants":[{"identity":"spiffe://keyhold.dev/app","operations":["datakey","unwrap","rewrap"]}]}"#,
        ),
    );
    assert!(r.contains("rsa-oaep-3072-sha256"), "{r}");
    for i in 0..4 {
        let dk = curl(
            "app",
            "/v1/keys/rsa/datakey",
            Some(&format!(r#"{{"context":{{"r":"{i}"}}}}"#)),
        );
        let wrapped = field(&dk, "wrapped");
        let body = format!(r#"{{"wrapped":"{wrapped}","context":{{"r":"{i}"}}}}"#);
        let un = curl("app", "/v1/unwrap", Some(&body));
        assert_eq!(field(&un, "plaintext"), field(&dk, "plaintext"));
        deks.push(B64.decode(field(&dk, "plaintext")).unwrap());
        wrapped_all.push(wrapped);
    }
    for i in 0..20 {
        if i % 7 == 6 {
            let r = curl("admin", "/v1/keys/demo/rotate", Some("{}"));
            assert!(r.contains("\"current_version\""), "{r}");
        }
        let dk = curl(
            "app",
            "/v1/keys/demo/datakey",
            Some(&format!(r#"{{"context":{{"n":"{i}"}}}}"#)),
        );
        let wrapped = field(&dk, "wrapped");
        let body = format!(r#"{{"wrapped":"{wrapped}","context":{{"n":"{i}"}}}}"#);
        let un = curl("app", "/v1/unwrap", Some(&body));
        assert_eq!(field(&un, "plaintext"), field(&dk, "plaintext"));
        curl("app", "/v1/rewrap", Some(&body));
        if i < 3 {
            // A denied call (not more: five denials would lock the admin out).
            curl("admin", "/v1/unwrap", Some(&body));
        }
        deks.push(B64.decode(field(&dk, "plaintext")).unwrap());
        wrapped_all.push(wrapped);
    }
    let audit = curl("auditor", "/v1/audit?after=0&limit=1000", None);
    assert!(audit.contains("\"records\""), "{audit}");
    let metrics = http_get(ops, "/metrics").unwrap();
    assert!(metrics.contains("keyhold_"), "{metrics}");
    child.kill().unwrap();
    child.wait().unwrap();

    let read = |name: &str| std::fs::read(data.join(name)).unwrap();
    let log = std::fs::read(&log_path).unwrap();
    let (store, chain, erasure) = (
        read("keyhold.redb"),
        read("keyhold.audit"),
        read("keyhold.erasure"),
    );
    let (found, master) = keks(&data.join("keyhold.redb"), &data.join("master.key"));
    let demo = found.iter().find(|k| k.name == "demo").unwrap();
    assert_eq!(demo.versions.len(), 3, "two rotations: three versions");
    let rsa = found.iter().find(|k| k.name == "rsa").unwrap();
    assert_eq!(rsa.versions.len(), 1);
    let places: [(&str, &[u8]); 6] = [
        ("log", &log),
        ("store", &store),
        ("audit chain file", &chain),
        ("audit API page", audit.as_bytes()),
        ("metrics page", metrics.as_bytes()),
        ("erasure file", &erasure),
    ];
    // Positive controls: the scan does find what is there.
    assert!(contains(&chain, b"POST /v1/unwrap"));
    assert!(contains(&store, b"demo"));
    assert!(contains(&log, b"/v1/rewrap"));
    assert!(contains(&erasure, demo.erasure_key.as_ref().unwrap()));
    let secrets = deks
        .iter()
        .map(|d| ("a DEK", d.clone()))
        .chain(demo.versions.iter().map(|k| ("a KEK version", k.clone())))
        .chain(
            rsa.versions
                .iter()
                .map(|k| ("an RSA private key", k.clone())),
        )
        .chain([("the master key", master)]);
    let mut checked = 0;
    for (what, raw) in secrets {
        for form in encodings(&raw) {
            for (place, hay) in places {
                assert!(!contains(hay, &form), "{what} is in the {place}");
                checked += 1;
            }
        }
    }
    for w in &wrapped_all {
        for (place, hay) in [("log", &log[..]), ("audit chain file", &chain[..])] {
            assert!(
                !contains(hay, w.as_bytes()),
                "a whole wrapped DEK is in the {place}"
            );
        }
    }
    eprintln!("secrets-leak scan: {checked} (secret, encoding, place) checks, none found");
}
