//! The `kms-server` binary: configuration errors name file and field, and dev mode serves
//! what its banner promises (the printed curl commands are run as pasted). (The
//! secrets-leak scan of a dev-mode server is `tests/e2e/leak.rs`.)

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

#[test]
fn init_with_shamir_prints_the_shares_once() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["c.pem", "k.pem", "ca.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let path = dir.path().join("kms.toml");
    std::fs::write(
        &path,
        "[store]\npath = \"s.redb\"\n[seal]\nmethod = \"shamir\"\n\
         [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n\
         [process]\nallow_root = true\nmlock = \"best-effort\"\n",
    )
    .unwrap();
    let init = || {
        Command::new(BIN)
            .args(["init", "--shares", "4", "--threshold", "3", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = init();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shares: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(shares.len(), 4);
    assert!(shares.iter().all(|s| s.starts_with("khs1-")), "{shares:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("any 3 unseal"));
    // Nothing of them is kept on disk.
    let store = std::fs::read(dir.path().join("s.redb")).unwrap();
    for share in &shares {
        let b64 = share.rsplit('-').next().unwrap();
        assert!(!store.windows(b64.len()).any(|w| w == b64.as_bytes()));
    }
    // A second init refuses, and prints no new shares.
    let again = init();
    assert!(!again.status.success());
    assert!(again.stdout.is_empty());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already initialized"));
    // With --if-uninitialized (an init step run before every start) it succeeds and does
    // nothing: no new shares, the same sealed master key.
    let sealed = || {
        let store = kms_server::storage::open(
            kms_server::storage::Engine::Redb,
            &dir.path().join("s.redb"),
        )
        .unwrap();
        let sealed = kms_server::keyring::Keyring::new(store)
            .sealed_master_key()
            .unwrap();
        serde_json::to_string(&sealed).unwrap()
    };
    let before = sealed();
    let skip = Command::new(BIN)
        .args(["init", "--if-uninitialized", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        skip.status.success(),
        "{}",
        String::from_utf8_lossy(&skip.stderr)
    );
    assert!(skip.stdout.is_empty());
    assert!(String::from_utf8_lossy(&skip.stderr).contains("nothing to do"));
    assert_eq!(sealed(), before, "the master key must not change");
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
        .arg("--public-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
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
    // DKE on the public listener: the anonymous key GET, and a dev token that the
    // decrypt endpoint accepts (a wrong blob: 400, not 401).
    let dke_get = banner
        .iter()
        .find(|l| l.contains("/dke/demo-dke"))
        .expect(&text);
    // What a person pasting the banner's commands runs (curl's CA from the command).
    let sh = |script: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .env_remove("CURL_CA_BUNDLE")
            .output()
            .unwrap()
    };
    let out = sh(dke_get.trim());
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).expect(dke_get);
    assert_eq!(key["key"]["kty"], "RSA", "{key}");
    let token_line = banner
        .iter()
        .find(|l| l.contains("dev token"))
        .expect(&text);
    let token_cmd = token_line
        .trim()
        .trim_start_matches("T=$(")
        .trim_end_matches(')')
        .replacen("kms-server", BIN, 1);
    let out = Command::new("sh")
        .arg("-c")
        .arg(&token_cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let kid = key["key"]["kid"].as_str().unwrap();
    let decrypt = format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' --cacert {d}/pki/ca.pem -H 'authorization: Bearer {token}' -H 'content-type: application/json' -d '{{\"alg\":\"RSA-OAEP-256\",\"value\":\"AAAA\"}}' {kid}/decrypt",
        d = data.display()
    );
    let out = sh(&decrypt);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400", "{decrypt}");
    let no_token = decrypt.replace(&format!("-H 'authorization: Bearer {token}' "), "");
    let out = sh(&no_token);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // The CSE wrap line: dev tokens for a writer, through curl.
    let cse_wrap = banner
        .iter()
        .find(|l| l.contains("/cse/wrap"))
        .expect(&text)
        .trim()
        .replacen("kms-server", BIN, 1);
    let out = sh(&cse_wrap);
    let wrapped: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&cse_wrap);
    assert!(wrapped["wrapped_key"].is_string(), "{wrapped}");
    // The EKM wrap line: a dev token for the service agent, through curl.
    let ekm_wrap = banner
        .iter()
        .find(|l| l.contains("/ekm/"))
        .expect(&text)
        .trim()
        .replacen("kms-server", BIN, 1);
    let out = sh(&ekm_wrap);
    let blob: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&ekm_wrap);
    assert!(blob["wrappedBlob"].is_string(), "{blob}");
    // The Salesforce callout line.
    let callout = banner
        .iter()
        .find(|l| l.contains("/salesforce/"))
        .expect(&text);
    let out = sh(callout.trim());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect(callout);
    assert_eq!(answer["kid"], "dev-sf-1", "{answer}");
    assert_eq!(answer["jwe"].as_str().unwrap().split('.').count(), 5);
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

#[test]
fn json_logs_are_one_object_per_line_without_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let log = dir.path().join("server.log");
    let (mut cmd, _api, ops) = dev_command(&data);
    let mut child = cmd
        .arg("--log-format")
        .arg("json")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(ops, "/readyz").is_some_and(|r| r.contains(" 200 ")) {
        assert!(Instant::now() < deadline, "dev mode did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    // The dev banner is plain text for people; every log event is one JSON object.
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(events.len() >= 3, "{text}");
    for e in &events {
        assert!(e["timestamp"].is_string() && e["level"].is_string(), "{e}");
        assert!(e["fields"]["message"].is_string(), "{e}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "process hardening applied"),
        "{text}"
    );
    // The master key file's bytes never appear in the logs.
    let key = std::fs::read(data.join("master.key")).unwrap();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!text.contains(&hex));
}
