//! The `kms-server` binary: configuration errors name file and field, and dev mode serves
//! what its banner promises (the printed curl commands are run as pasted).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kms-server");

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
fn bad_config_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["c.pem", "k.pem", "ca.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[store]\npath = \"s.redb\"\n[seal]\nmethod = \"key-file\"\nkey_file = \"m.key\"\n\
         [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\nmin_version = \"1.0\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("tls.min_version"),
        "{err}"
    );
    // serve refuses the same file before doing anything.
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.min_version"));
}

/// `kms-server dev` on free ports under `data`; returns (command ready to spawn, api, ops).
fn dev_command(data: &std::path::Path) -> (Command, u16, u16) {
    let (api, ops) = (free_port(), free_port());
    let mut c = Command::new(BIN);
    c.arg("dev")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{api}"))
        .arg("--ops-listen")
        .arg(format!("127.0.0.1:{ops}"))
        .stdout(Stdio::null());
    (c, api, ops)
}

#[test]
fn dev_mode_banner_commands_work_when_pasted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let (mut cmd, _api, ops) = dev_command(&data);
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "dev mode did not become ready: {banner:?}"
        );
        while let Ok(l) = rx.try_recv() {
            banner.push(l);
        }
        if http_get(ops, "/readyz")
            .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(l) = rx.try_recv() {
        banner.push(l);
    }
    let text = banner.join("\n");
    assert!(text.contains("NOT FOR PRODUCTION"), "{text}");
    let datakey = banner
        .iter()
        .find(|l| l.trim_start().starts_with("W=$("))
        .expect(&text);
    let unwrap = banner
        .iter()
        .find(|l| l.contains("/v1/unwrap"))
        .expect(&text);
    let script = format!("set -e\n{}\n{}\n", datakey.trim(), unwrap.trim());
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env_remove("CURL_CA_BUNDLE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"plaintext\""), "{stdout}");
    assert!(stdout.contains("\"key\":\"demo\""), "{stdout}");
    // The admin listing command works too.
    let list = banner
        .iter()
        .find(|l| l.trim_end().ends_with("/v1/keys") && l.contains("admin.pem"))
        .expect(&text);
    let out = Command::new("sh")
        .arg("-c")
        .arg(list.trim())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"name\":\"demo\""));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn deploy_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kms-server.toml"
    ))
    .unwrap()
    .replace("/etc/keyhold/", &format!("{root}/etc/"))
    .replace("/var/lib/keyhold/", &format!("{root}/var/"));
    std::fs::create_dir_all(dir.path().join("etc/tls")).unwrap();
    for f in ["server.pem", "server-key.pem", "client-ca.pem"] {
        std::fs::write(dir.path().join("etc/tls").join(f), "x").unwrap();
    }
    let path = dir.path().join("kms-server.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The KEK versions in a stopped server's store, decrypted with its key file: the bytes a
/// leak would show. Reads the records as documented in `keyring.rs` (an independent
/// reader: version material sealed under the master key with AAD tenant ‖ id ‖ version).
fn kek_versions(store_path: &std::path::Path, key_file: &std::path::Path) -> Vec<Vec<u8>> {
    use kms_server::keystore::{self, Engine, Table};
    use kms_server::seal::{KeyFileSealer, Sealer};
    let store = keystore::open(Engine::Redb, store_path).unwrap();
    let keyring = kms_server::keyring::Keyring::new(store.clone());
    let sealed = keyring.sealed_master_key().unwrap().unwrap();
    let master = KeyFileSealer::new(key_file).unseal(&sealed).unwrap();
    let unhex = |h: &str| -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    };
    let mut out = Vec::new();
    for (id, record) in store.scan_prefix(Table::Keys, b"").unwrap() {
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        let tenant = record["tenant"].as_str().unwrap();
        for (_, v) in store.scan_prefix(Table::Versions, &id).unwrap() {
            let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
            let version = v["version"].as_u64().unwrap() as u32;
            let mut aad = (tenant.len() as u32).to_be_bytes().to_vec();
            aad.extend_from_slice(tenant.as_bytes());
            aad.extend_from_slice(&id);
            aad.extend_from_slice(&version.to_be_bytes());
            let kek = kms_server::crypto::open_box(
                &master,
                b"keyhold/kek-version/v1",
                &aad,
                &unhex(v["material"].as_str().unwrap()),
            )
            .unwrap();
            out.push(kek.expose_secret().to_vec());
        }
    }
    out.push(master.expose_secret().to_vec());
    out
}

/// No key material anywhere it could leak: run dev mode with the most verbose logging, get
/// and unwrap data keys (and rotate, so there are several KEK versions) with curl, then
/// look for every DEK and every KEK version (and the master key) — raw, base64 and hex —
/// in the log, the audit records (API and chain file), the metrics page and the store
/// file; and for whole wrapped DEKs in the log and the audit records.
#[test]
fn no_key_material_in_logs_audit_metrics_or_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (mut cmd, api, ops) = dev_command(&data);
    let mut child = cmd.env("RUST_LOG", "trace").stderr(log).spawn().unwrap();
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
        let start = json.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
        json[start..].split('"').next().unwrap().to_owned()
    };
    let mut deks = Vec::new();
    let mut wrapped_all = Vec::new();
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
        let un = curl(
            "app",
            "/v1/unwrap",
            Some(&format!(
                r#"{{"wrapped":"{wrapped}","context":{{"n":"{i}"}}}}"#
            )),
        );
        assert_eq!(field(&un, "plaintext"), field(&dk, "plaintext"));
        // A rewrap, a wrap of a caller DEK, and a denied call, for variety in the trail.
        curl(
            "app",
            "/v1/rewrap",
            Some(&format!(
                r#"{{"wrapped":"{wrapped}","context":{{"n":"{i}"}}}}"#
            )),
        );
        if i < 3 {
            // (Not more: five denials would lock the admin out.)
            curl(
                "admin",
                "/v1/unwrap",
                Some(&format!(r#"{{"wrapped":"{wrapped}"}}"#)),
            );
        }
        deks.push(field(&dk, "plaintext"));
        wrapped_all.push(wrapped);
    }
    let audit = curl("auditor", "/v1/audit?after=0&limit=1000", None);
    assert!(audit.contains("\"records\""), "{audit}");
    let metrics = http_get(ops, "/metrics").unwrap();
    assert!(metrics.contains("keyhold_"), "{metrics}");
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read(&log_path).unwrap();
    assert!(log.len() > 1000, "the trace log should not be empty");
    let store_path = data.join("keyhold.redb");
    let store = std::fs::read(&store_path).unwrap();
    let chain = std::fs::read(data.join("keyhold.audit")).unwrap();
    let key_file = data.join("master.key");
    let keks = kek_versions(&store_path, &key_file);
    assert_eq!(
        keks.len(),
        4,
        "two rotations: three KEK versions, and the master key"
    );
    let places: [(&str, &[u8]); 5] = [
        ("log", &log),
        ("store", &store),
        ("audit chain file", &chain),
        ("audit API page", audit.as_bytes()),
        ("metrics page", metrics.as_bytes()),
    ];
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let forms = |raw: &[u8]| -> Vec<Vec<u8>> {
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        vec![raw.to_vec(), b64_encode(raw).into_bytes(), hex.into_bytes()]
    };
    let secrets = deks.iter().map(|b| ("a DEK", b64_decode(b))).chain(
        keks.iter()
            .map(|k| ("a KEK version or the master key", k.clone())),
    );
    // Positive controls: the scan does find what is there.
    assert!(contains(&chain, b"POST /v1/unwrap"));
    assert!(contains(&store, b"demo"));
    assert!(contains(&log, b"/v1/rewrap"));
    let mut checked = 0;
    for (what, raw) in secrets {
        for form in forms(&raw) {
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

fn b64_encode(raw: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = T.iter().position(|&t| t == c).unwrap() as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}
