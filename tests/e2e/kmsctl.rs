//! `kmsctl` against the real server over mTLS: every subcommand, profiles and precedence,
//! file encryption with its failure modes, and snapshots of the human-readable output.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use keyhold_tests::{workspace_bin, TestPki, TestServer, APP_A};

/// How to run kmsctl, beyond its arguments.
#[derive(Default)]
struct Run {
    envs: Vec<(String, String)>,
    /// Its working directory (the test's when `None`).
    cwd: Option<PathBuf>,
    /// What it reads on stdin (nothing when `None`).
    stdin: Option<Vec<u8>>,
}

/// A kmsctl command with the test's environment cleaned of `KMSCTL_*` settings.
fn kmsctl_command(args: &[String]) -> std::process::Command {
    let mut c = std::process::Command::new(workspace_bin("kmsctl"));
    c.args(args)
        .env_remove("KMSCTL_ENDPOINT")
        .env_remove("KMSCTL_OUTPUT")
        .env_remove("KMSCTL_PROFILE")
        .env_remove("KMSCTL_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent-xdg-config-for-tests")
        .env("RUST_BACKTRACE", "0");
    c
}

/// Runs kmsctl (off the async runtime, which serves the server).
pub(crate) async fn kmsctl(args: Vec<String>, envs: Vec<(String, String)>) -> Output {
    kmsctl_run(
        args,
        Run {
            envs,
            ..Run::default()
        },
    )
    .await
}

async fn kmsctl_run(args: Vec<String>, run: Run) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = kmsctl_command(&args);
        for (k, v) in run.envs {
            c.env(k, v);
        }
        if let Some(dir) = &run.cwd {
            c.current_dir(dir);
        }
        let Some(input) = run.stdin else {
            return c.output().unwrap();
        };
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    })
    .await
    .unwrap()
}

pub(crate) fn conn(s: &TestServer, who: &str) -> Vec<String> {
    conn_to(&s.url(""), &s.pki, who)
}

fn conn_to(url: &str, pki: &TestPki, who: &str) -> Vec<String> {
    vec![
        "--endpoint".into(),
        url.into(),
        "--tls-ca".into(),
        pki.ca().display().to_string(),
        "--tls-cert".into(),
        pki.cert(who).display().to_string(),
        "--tls-key".into(),
        pki.key(who).display().to_string(),
    ]
}

async fn ok(s: &TestServer, who: &str, args: &[&str]) -> String {
    let mut a = conn(s, who);
    a.extend(args.iter().map(|x| x.to_string()));
    let out = kmsctl(a.clone(), vec![]).await;
    assert!(
        out.status.success(),
        "kmsctl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn fails(s: &TestServer, who: &str, args: &[&str]) -> String {
    let mut a = conn(s, who);
    a.extend(args.iter().map(|x| x.to_string()));
    let out = kmsctl(a, vec![]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "kmsctl {args:?} should fail with 1"
    );
    String::from_utf8(out.stderr).unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// Replaces what changes between runs (ids, times, base64 keys) for snapshots.
fn redact(s: &str) -> String {
    s.lines()
        .map(|line| {
            line.split(' ')
                .map(|tok| {
                    if tok.len() == 32 && tok.bytes().all(|b| b.is_ascii_hexdigit()) {
                        "[ID]".to_string()
                    } else if tok.len() == 20
                        && tok.ends_with('Z')
                        && tok.as_bytes().get(10) == Some(&b'T')
                    {
                        "[TIME]".to_string()
                    } else {
                        tok.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_subcommands_and_table_snapshots() {
    let s = TestServer::start().await;
    let created = ok(
        &s,
        "admin-a",
        &[
            "keys",
            "create",
            "orders",
            "--rotation-period",
            "90d",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(json(&created)["name"], "orders");
    ok(&s, "admin-a", &["keys", "create", "archive"]).await;
    insta::assert_snapshot!(
        "keys_list_table",
        redact(&ok(&s, "admin-a", &["keys", "list"]).await)
    );
    let rotated = ok(
        &s,
        "admin-a",
        &["keys", "rotate", "orders", "--output", "json"],
    )
    .await;
    assert_eq!(json(&rotated)["current_version"], 2);
    insta::assert_snapshot!(
        "keys_get_table",
        redact(&ok(&s, "admin-a", &["keys", "get", "orders"]).await)
    );
    let disabled = ok(
        &s,
        "admin-a",
        &["keys", "disable", "archive", "--output", "json"],
    )
    .await;
    assert_eq!(json(&disabled)["state"], "disabled");
    let enabled = ok(
        &s,
        "admin-a",
        &["keys", "enable", "archive", "--output", "json"],
    )
    .await;
    assert_eq!(json(&enabled)["state"], "enabled");
    let list = json(&ok(&s, "admin-a", &["keys", "list", "--output", "json"]).await);
    assert_eq!(list["keys"].as_array().unwrap().len(), 2);
    // Errors: clear message, hint, exit 1.
    let err = fails(&s, "admin-a", &["keys", "create", "orders"]).await;
    assert!(
        err.contains("AlreadyExists") && err.contains("hint:"),
        "{err}"
    );
    let err = fails(&s, "app-a", &["keys", "list"]).await;
    assert!(
        err.contains("PermissionDenied") && err.contains("admin certificate"),
        "{err}"
    );
    let err = fails(&s, "admin-a", &["keys", "get", "nope"]).await;
    assert!(err.contains("NotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_deletion_and_retirement_subcommands() {
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k"]).await;
    // Default deny, in words.
    insta::assert_snapshot!(
        "keys_grants_none",
        ok(&s, "admin-a", &["keys", "grants", "k"]).await
    );
    let err = fails(&s, "app-a", &["datakey", "--key", "k"]).await;
    assert!(err.contains("PermissionDenied"), "{err}");
    ok(
        &s,
        "admin-a",
        &[
            "keys",
            "grant",
            "k",
            APP_A,
            "--op",
            "datakey",
            "--op",
            "unwrap",
            "--context-subset",
            "dept=finance",
        ],
    )
    .await;
    ok(
        &s,
        "admin-a",
        &["keys", "grant", "k", "spiffe://test/acme/batch"],
    )
    .await;
    insta::assert_snapshot!(
        "keys_grants_table",
        ok(&s, "admin-a", &["keys", "grants", "k"]).await
    );
    // The constraint holds: finance yes, anything else no.
    let dk = json(
        &ok(
            &s,
            "app-a",
            &[
                "datakey",
                "--key",
                "k",
                "--context",
                "dept=finance",
                "--output",
                "json",
            ],
        )
        .await,
    );
    let err = fails(
        &s,
        "app-a",
        &["datakey", "--key", "k", "--context", "dept=hr"],
    )
    .await;
    assert!(err.contains("PermissionDenied"), "{err}");
    // ungrant removes every grant of that identity; a second time is an error.
    ok(
        &s,
        "admin-a",
        &["keys", "ungrant", "k", "spiffe://test/acme/batch"],
    )
    .await;
    let err = fails(
        &s,
        "admin-a",
        &["keys", "ungrant", "k", "spiffe://test/acme/batch"],
    )
    .await;
    assert!(err.contains("nothing to remove"), "{err}");
    // set-grants replaces the set from a file.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("grants.json"),
        format!(
            r#"{{"grants":[{{"identity":"{APP_A}","operations":["datakey","unwrap","rewrap"]}}]}}"#
        )
        .as_bytes(),
    );
    let set = json(
        &ok(
            &s,
            "admin-a",
            &[
                "keys",
                "set-grants",
                "k",
                "--in",
                file.to_str().unwrap(),
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(set["grants"].as_array().unwrap().len(), 1);
    assert_eq!(set["grants"][0]["operations"][2], "rewrap");
    let bad = write(
        &dir.path().join("bad.json"),
        br#"{"grants":[{"identity":"x"}]}"#,
    );
    let err = fails(
        &s,
        "admin-a",
        &["keys", "set-grants", "k", "--in", bad.to_str().unwrap()],
    )
    .await;
    assert!(err.contains("grants file"), "{err}");
    // Retire version 1.
    ok(&s, "admin-a", &["keys", "rotate", "k"]).await;
    let info = json(
        &ok(
            &s,
            "admin-a",
            &["keys", "min-decrypt-version", "k", "2", "--output", "json"],
        )
        .await,
    );
    assert_eq!(info["min_decrypt_version"], 2);
    let wrapped = dk["wrapped"].as_str().unwrap();
    let err = fails(
        &s,
        "app-a",
        &["unwrap", "--wrapped", wrapped, "--context", "dept=finance"],
    )
    .await;
    assert!(err.contains("DecryptFailed"), "{err}");
    let dry = ok(
        &s,
        "admin-a",
        &[
            "keys",
            "min-decrypt-version",
            "k",
            "2",
            "--dry-run",
            "--window-days",
            "7",
        ],
    )
    .await;
    assert!(dry.contains("would have refused"), "{dry}");
    let err = fails(&s, "admin-a", &["keys", "min-decrypt-version", "k", "3"]).await;
    assert!(err.contains("InvalidRequest"), "{err}");
    ok(&s, "admin-a", &["keys", "min-decrypt-version", "k", "1"]).await;
    // Schedule deletion: unusable at once; the window is validated; cancel → disabled.
    let err = fails(
        &s,
        "admin-a",
        &["keys", "schedule-deletion", "k", "--days", "3"],
    )
    .await;
    assert!(err.contains("between 7 and 30"), "{err}");
    let pending = json(
        &ok(
            &s,
            "admin-a",
            &[
                "keys",
                "schedule-deletion",
                "k",
                "--days",
                "7",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(pending["state"], "pending-deletion");
    assert!(pending["deletion_date"].is_string());
    let err = fails(
        &s,
        "app-a",
        &["unwrap", "--wrapped", wrapped, "--context", "dept=finance"],
    )
    .await;
    assert!(err.contains("KeyDisabled"), "{err}");
    let err = fails(&s, "admin-a", &["keys", "enable", "k"]).await;
    assert!(err.contains("cancel the deletion first"), "{err}");
    let back = json(
        &ok(
            &s,
            "admin-a",
            &["keys", "cancel-deletion", "k", "--output", "json"],
        )
        .await,
    );
    assert_eq!(back["state"], "disabled");
    assert!(back.get("deletion_date").is_none());
    ok(&s, "admin-a", &["keys", "enable", "k"]).await;
    ok(
        &s,
        "app-a",
        &["unwrap", "--wrapped", wrapped, "--context", "dept=finance"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_use_subcommands() {
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k", "--grant", APP_A]).await;
    let dk = json(
        &ok(
            &s,
            "app-a",
            &[
                "datakey",
                "--key",
                "k",
                "--context",
                "doc=7",
                "--output",
                "json",
            ],
        )
        .await,
    );
    let wrapped = dk["wrapped"].as_str().unwrap().to_string();
    let un = json(
        &ok(
            &s,
            "app-a",
            &[
                "unwrap",
                "--wrapped",
                &wrapped,
                "--context",
                "doc=7",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(un["plaintext"], dk["plaintext"]);
    let table = ok(
        &s,
        "app-a",
        &["unwrap", "--wrapped", &wrapped, "--context", "doc=7"],
    )
    .await;
    assert!(table.contains(dk["plaintext"].as_str().unwrap()));
    let mut args = conn(&s, "app-a");
    args.extend(
        [
            "wrap",
            "--key",
            "k",
            "--plaintext-file",
            "-",
            "--output",
            "json",
        ]
        .map(String::from),
    );
    let out = kmsctl_run(
        args,
        Run {
            stdin: Some(b"AAAAAAAAAAAAAAAAAAAAAA==\n".to_vec()),
            ..Run::default()
        },
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(w["version"], 1);
    ok(&s, "admin-a", &["keys", "rotate", "k"]).await;
    let rw = json(
        &ok(
            &s,
            "app-a",
            &[
                "rewrap",
                "--wrapped",
                &wrapped,
                "--context",
                "doc=7",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(rw["version"], 2);
    let err = fails(
        &s,
        "app-a",
        &["unwrap", "--wrapped", &wrapped, "--context", "doc=8"],
    )
    .await;
    assert!(
        err.contains("DecryptFailed") && err.contains("--context"),
        "{err}"
    );
    let err = fails(&s, "app-a", &["unwrap", "--wrapped", "not base64!"]).await;
    assert!(err.contains("--wrapped is not standard base64"), "{err}");
    // Batch from a file.
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("b.json");
    std::fs::write(
        &batch,
        format!(r#"{{"items":[{{"op":"unwrap","wrapped":"{wrapped}","context":{{"doc":"7"}}}},{{"op":"datakey","key":"nope"}}]}}"#),
    )
    .unwrap();
    let b = json(
        &ok(
            &s,
            "app-a",
            &["batch", "--in", batch.to_str().unwrap(), "--output", "json"],
        )
        .await,
    );
    assert_eq!(b["results"][0]["unwrap"]["plaintext"], dk["plaintext"]);
    assert_eq!(b["results"][1]["error"]["code"], "NotFound");
    insta::assert_snapshot!(
        "batch_table",
        ok(&s, "app-a", &["batch", "--in", batch.to_str().unwrap()]).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_public_key_and_offline_wrap() {
    let s = TestServer::start().await;
    let created = json(
        &ok(
            &s,
            "admin-a",
            &[
                "keys",
                "create",
                "r",
                "--algorithm",
                "rsa-oaep-3072-sha256",
                "--grant",
                APP_A,
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(created["algorithm"], "rsa-oaep-3072-sha256");
    let mut args = conn(&s, "admin-a");
    args.extend(["keys", "create", "x", "--algorithm", "rsa-1024"].map(String::from));
    let bad = kmsctl(args, vec![]).await;
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    let bad = String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad.contains("expected aes-256-gcm, rsa-oaep-3072-sha256"),
        "{bad}"
    );
    // PEM by default, everything with -o json.
    let pem = ok(&s, "app-a", &["keys", "public-key", "r"]).await;
    assert!(
        pem.starts_with("-----BEGIN PUBLIC KEY-----\n")
            && pem.ends_with("-----END PUBLIC KEY-----\n"),
        "{pem}"
    );
    let exported = ok(
        &s,
        "app-a",
        &["keys", "public-key", "r", "--output", "json"],
    )
    .await;
    assert_eq!(json(&exported)["pem"], pem.as_str());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.pub.json");
    std::fs::write(&file, &exported).unwrap();
    // Offline: no endpoint, no certificate, the server is not contacted.
    let dek = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let dek_file = write(&dir.path().join("dek.b64"), dek.as_bytes());
    let out = kmsctl(
        [
            "wrap",
            "--key",
            "r",
            "--plaintext-file",
            dek_file.to_str().unwrap(),
            "--context",
            "doc=9",
            "--public-key",
            file.to_str().unwrap(),
            "--output",
            "json",
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        (w["key"].as_str(), w["version"].as_u64()),
        (Some("r"), Some(1))
    );
    let wrapped = w["wrapped"].as_str().unwrap();
    let un = json(
        &ok(
            &s,
            "app-a",
            &[
                "unwrap",
                "--wrapped",
                wrapped,
                "--context",
                "doc=9",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(un["plaintext"], dek);
    // The key name must match the exported key's.
    let out = kmsctl(
        [
            "wrap",
            "--key",
            "other",
            "--plaintext-file",
            dek_file.to_str().unwrap(),
            "--public-key",
            file.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the public key of r, not of other"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_subcommands() {
    let s = TestServer::start().await;
    insta::assert_snapshot!(
        "sys_status_table",
        ok(&s, "admin-a", &["sys", "status"]).await
    );
    let sealed = json(&ok(&s, "sys", &["sys", "seal", "--output", "json"]).await);
    assert_eq!(sealed["sealed"], true);
    let err = fails(&s, "app-a", &["datakey", "--key", "k"]).await;
    assert!(
        err.contains("Sealed") && err.contains("sys unseal"),
        "{err}"
    );
    let unsealed = json(
        &ok(
            &s,
            "sys",
            &["sys", "unseal", "--no-passphrase", "--output", "json"],
        )
        .await,
    );
    assert_eq!(unsealed["sealed"], false);
    // The runtime identity policy.
    ok(
        &s,
        "admin-a",
        &[
            "sys",
            "set-identity",
            "spiffe://test/acme/billing",
            "--role",
            "app",
        ],
    )
    .await;
    insta::assert_snapshot!(
        "sys_identities_table",
        ok(&s, "admin-a", &["sys", "identities"]).await
    );
    let err = fails(
        &s,
        "admin-b",
        &["sys", "remove-identity", "spiffe://test/acme/billing"],
    )
    .await;
    assert!(err.contains("NotFound"), "{err}");
    let list = json(
        &ok(
            &s,
            "admin-a",
            &[
                "sys",
                "remove-identity",
                "spiffe://test/acme/billing",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert!(list["identities"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["identity"] != "spiffe://test/acme/billing"));
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_files_and_failures() {
    let s = TestServer::start().await;
    ok(
        &s,
        "admin-a",
        &["keys", "create", "files", "--grant", APP_A],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let input = write(&dir.path().join("in.bin"), &data);
    let sealed = dir.path().join("in.bin.khev");
    let out = dir.path().join("out.bin");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    ok(
        &s,
        "app-a",
        &[
            "encrypt",
            "--key",
            "files",
            "--in",
            &p(&input),
            "--out",
            &p(&sealed),
            "--context",
            "file=in.bin",
        ],
    )
    .await;
    ok(
        &s,
        "app-a",
        &[
            "decrypt",
            "--in",
            &p(&sealed),
            "--out",
            &p(&out),
            "--context",
            "file=in.bin",
        ],
    )
    .await;
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // The file is an envelope that the library opens too.
    let envelope_bytes = std::fs::read(&sealed).unwrap();
    assert_eq!(&envelope_bytes[..4], b"KHEV");
    // Wrong context: no output file, and no temporary file left behind.
    let bad_out = dir.path().join("bad.bin");
    let err = fails(
        &s,
        "app-a",
        &[
            "decrypt",
            "--in",
            &p(&sealed),
            "--out",
            &p(&bad_out),
            "--context",
            "file=other",
        ],
    )
    .await;
    assert!(err.contains("decryption failed"), "{err}");
    assert!(!bad_out.exists());
    // Tampered in the middle: the earlier segments authenticate, but nothing appears under
    // the output name.
    let mut tampered = envelope_bytes.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    let tampered_path = write(&dir.path().join("t.khev"), &tampered);
    let err = fails(
        &s,
        "app-a",
        &[
            "decrypt",
            "--in",
            &p(&tampered_path),
            "--out",
            &p(&bad_out),
            "--context",
            "file=in.bin",
        ],
    )
    .await;
    assert!(err.contains("damaged"), "{err}");
    assert!(!bad_out.exists());
    // Truncated (an interrupted copy): same.
    let cut = write(
        &dir.path().join("cut.khev"),
        &envelope_bytes[..envelope_bytes.len() - 100],
    );
    fails(
        &s,
        "app-a",
        &[
            "decrypt",
            "--in",
            &p(&cut),
            "--out",
            &p(&bad_out),
            "--context",
            "file=in.bin",
        ],
    )
    .await;
    assert!(!bad_out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Encrypting with a missing key fails cleanly and writes nothing.
    let nothing = dir.path().join("nothing.khev");
    let err = fails(
        &s,
        "app-a",
        &[
            "encrypt",
            "--key",
            "missing",
            "--in",
            &p(&input),
            "--out",
            &p(&nothing),
        ],
    )
    .await;
    assert!(err.contains("NotFound"), "{err}");
    assert!(!nothing.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_env_and_flag_precedence() {
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kmsctl.toml");
    std::fs::write(
        &cfg,
        format!(
            "default_profile = \"ops\"\n[profiles.ops]\nendpoints = [\"{}\"]\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\noutput = \"json\"\n\n[profiles.broken]\nendpoints = [\"https://127.0.0.1:1\"]\n",
            s.url(""),
            s.pki.ca().display(),
            s.pki.cert("admin-a").display(),
            s.pki.key("admin-a").display()
        ),
    )
    .unwrap();
    let cfg_env = ("KMSCTL_CONFIG".to_string(), cfg.display().to_string());
    // The default profile supplies everything (and JSON output).
    let out = kmsctl(vec!["keys".into(), "list".into()], vec![cfg_env.clone()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json(&String::from_utf8_lossy(&out.stdout))["keys"][0]["name"],
        "k"
    );
    // A flag beats the profile's output.
    let out = kmsctl(
        vec![
            "keys".into(),
            "list".into(),
            "--output".into(),
            "table".into(),
        ],
        vec![cfg_env.clone()],
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
    // The environment beats the profile: KMSCTL_ENDPOINT points at a dead port.
    let out = kmsctl(
        vec!["--timeout".into(), "5".into(), "keys".into(), "list".into()],
        vec![
            cfg_env.clone(),
            ("KMSCTL_ENDPOINT".into(), "https://127.0.0.1:1".into()),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no endpoint could be reached"));
    // A flag beats the environment.
    let out = kmsctl(
        vec!["--endpoint".into(), s.url(""), "keys".into(), "list".into()],
        vec![
            cfg_env.clone(),
            ("KMSCTL_ENDPOINT".into(), "https://127.0.0.1:1".into()),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown profile is named.
    let out = kmsctl(
        vec![
            "--profile".into(),
            "nope".into(),
            "keys".into(),
            "list".into(),
        ],
        vec![cfg_env],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no profile `nope`") && err.contains("ops"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_subcommands() {
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k", "--grant", APP_A]).await;
    ok(&s, "app-a", &["datakey", "--key", "k"]).await;
    let verified = ok(&s, "auditor-a", &["audit", "verify"]).await;
    assert!(
        verified.starts_with("audit chain verified: 2 records"),
        "{verified}"
    );
    let list = ok(&s, "auditor-a", &["audit", "list", "--limit", "2"]).await;
    assert!(list.starts_with("SEQ"), "{list}");
    assert!(
        list.contains("POST /v1/keys/{name}/datakey") && list.contains("k v1"),
        "{list}"
    );
    assert!(list.contains("head: record"), "{list}");
    let page = json(&ok(&s, "auditor-a", &["audit", "list", "--output", "json"]).await);
    assert_eq!(page["records"][0]["seq"], 1);
    let err = fails(&s, "admin-a", &["audit", "list"]).await;
    assert!(err.contains("PermissionDenied"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_rewrap_of_a_file_keeps_each_items_context() {
    use base64::Engine as _;
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k", "--grant", APP_A]).await;
    let app = s.kms_client("app-a");
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    let mut deks = Vec::new();
    for i in 0..250u32 {
        let ctx: kms_client::api::Context =
            [("row".to_string(), i.to_string())].into_iter().collect();
        let dk = app.datakey("k", &ctx).await.unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(dk.wrapped.as_bytes());
        // Line 7 claims the wrong context: that item fails, the others do not.
        let claimed = if i == 7 {
            "wrong".to_string()
        } else {
            i.to_string()
        };
        lines.push_str(&format!(
            "{{\"id\":\"r{i}\",\"wrapped\":\"{b64}\",\"context\":{{\"row\":\"{claimed}\"}}}}\n"
        ));
        deks.push(dk.plaintext.expose_secret().to_vec());
    }
    let input = write(&dir.path().join("deks.jsonl"), lines.as_bytes());
    ok(&s, "admin-a", &["keys", "rotate", "k"]).await;
    let out = dir.path().join("rewrapped.jsonl");
    let err = fails(
        &s,
        "app-a",
        &[
            "rewrap",
            "--in",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "100",
        ],
    )
    .await;
    assert!(err.contains("1 of 250 items failed"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(json).collect();
    assert_eq!(rows.len(), 250);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["id"], format!("r{i}"), "order and extra fields kept");
        if i == 7 {
            assert_eq!(row["error"]["code"], "DecryptFailed", "{row}");
            continue;
        }
        assert_eq!(
            (row["key"].clone(), row["version"].clone()),
            (serde_json::json!("k"), serde_json::json!(2))
        );
        // The new wrapped DEK opens with the same context, to the same DEK.
        let ctx: kms_client::api::Context =
            [("row".to_string(), i.to_string())].into_iter().collect();
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(row["wrapped"].as_str().unwrap())
            .unwrap();
        let un = app.unwrap(&wrapped, &ctx).await.unwrap();
        assert_eq!(un.version, 2);
        assert_eq!(un.plaintext.expose_secret(), &deks[i][..]);
    }
    // Without the bad line: exit 0, through stdin and stdout.
    let good: String = lines
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 7)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let good_file = write(&dir.path().join("good.jsonl"), good.as_bytes());
    let stdout = ok(
        &s,
        "app-a",
        &["rewrap", "--in", good_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(stdout.lines().count(), 249);
    // A malformed line stops the run with its line number, and no output file appears.
    let bad = write(&dir.path().join("bad.jsonl"), b"{\"wrapped\":\"!!\"}\n");
    let nothing = dir.path().join("nothing.jsonl");
    let err = fails(
        &s,
        "app-a",
        &[
            "rewrap",
            "--in",
            bad.to_str().unwrap(),
            "--out",
            nothing.to_str().unwrap(),
        ],
    )
    .await;
    assert!(err.contains("line 1"), "{err}");
    assert!(!nothing.exists());
}

/// Issue 22: every file kmsctl writes is its owner's only (0600): decrypted data, backups,
/// ciphertext. A decrypt stopped by Ctrl-C (SIGINT) mid-stream leaves neither the output
/// nor its temporary file of partial plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_written_0600_and_an_interrupted_decrypt_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = TestServer::start().await;
    ok(
        &s,
        "admin-a",
        &["keys", "create", "files", "--grant", APP_A],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let mode = |x: &Path| std::fs::metadata(x).unwrap().permissions().mode() & 0o777;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let input = write(&dir.path().join("in.bin"), &data);
    let sealed = dir.path().join("in.khev");
    let out = dir.path().join("out.bin");
    let ctx = ["--context", "file=in.bin"];
    let (i, o, sl) = (p(&input), p(&out), p(&sealed));
    ok(
        &s,
        "app-a",
        &[
            &["encrypt", "--key", "files", "--in", &i, "--out", &sl][..],
            &ctx,
        ]
        .concat(),
    )
    .await;
    ok(
        &s,
        "app-a",
        &[&["decrypt", "--in", &sl, "--out", &o][..], &ctx].concat(),
    )
    .await;
    let backup = dir.path().join("backup.json");
    ok(&s, "sys", &["sys", "backup", "--out", &p(&backup)]).await;
    for f in [&sealed, &out, &backup] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }

    // Half the envelope on stdin, then nothing: kmsctl has written partial plaintext to
    // its temporary file when SIGINT arrives.
    let envelope_bytes = std::fs::read(&sealed).unwrap();
    let interrupted = dir.path().join("interrupted.bin");
    let mut args = conn(&s, "app-a");
    args.extend(
        [&["decrypt", "--out", &p(&interrupted)][..], &ctx]
            .concat()
            .iter()
            .map(|a| a.to_string()),
    );
    let folder = dir.path().to_path_buf();
    let (code, left) = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(workspace_bin("kmsctl"))
            .args(&args)
            .env("XDG_CONFIG_HOME", "/nonexistent-xdg-config-for-tests")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&envelope_bytes[..envelope_bytes.len() / 2])
            .unwrap();
        stdin.flush().unwrap();
        let partial = || {
            std::fs::read_dir(&folder)
                .unwrap()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        let started = std::time::Instant::now();
        while partial()
            .iter()
            .all(|f| std::fs::metadata(f).map_or(true, |m| m.len() == 0))
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "kmsctl wrote no partial plaintext"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(mode(&partial()[0]), 0o600);
        // The shell's own `kill`: no procps package needed.
        let kill = std::process::Command::new("sh")
            .args(["-c", &format!("kill -INT {}", child.id())])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        drop(stdin);
        (status.code(), partial())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(130));
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!interrupted.exists());
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Security review: `wrap --plaintext <DEK>` put the DEK on the command line, where every
/// user of the machine sees it (`ps`, /proc/PID/cmdline) and the shell history keeps it.
/// The DEK comes from stdin (`--plaintext-file -`) or a file; `--plaintext` is refused
/// with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_reads_the_dek_from_stdin_or_a_file_never_from_the_command_line() {
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k", "--grant", APP_A]).await;
    let dek = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let unwrapped = |w: serde_json::Value, doc: &'static str| {
        let wrapped = w["wrapped"].as_str().unwrap().to_string();
        let s = &s;
        async move {
            json(
                &ok(
                    s,
                    "app-a",
                    &[
                        "unwrap",
                        "--wrapped",
                        &wrapped,
                        "--context",
                        doc,
                        "--output",
                        "json",
                    ],
                )
                .await,
            )["plaintext"]
                .clone()
        }
    };
    // From stdin.
    let mut args = conn(&s, "app-a");
    args.extend(
        [
            "wrap",
            "--key",
            "k",
            "--plaintext-file",
            "-",
            "--context",
            "doc=1",
            "--output",
            "json",
        ]
        .map(String::from),
    );
    let out = kmsctl_run(
        args,
        Run {
            stdin: Some(format!("{dek}\n").into_bytes()),
            ..Run::default()
        },
    )
    .await;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let w = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(unwrapped(w, "doc=1").await, dek);
    // From a file.
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir.path().join("dek.b64"), dek.as_bytes());
    let w = json(
        &ok(
            &s,
            "app-a",
            &[
                "wrap",
                "--key",
                "k",
                "--plaintext-file",
                file.to_str().unwrap(),
                "--context",
                "doc=2",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(unwrapped(w, "doc=2").await, dek);
    // On the command line: refused, saying why and what to use instead.
    let err = fails(&s, "app-a", &["wrap", "--key", "k", "--plaintext", dek]).await;
    assert!(
        err.contains("visible to other users") && err.contains("--plaintext-file -"),
        "{err}"
    );
    assert!(!err.contains(dek), "{err}");
    // A file that is not base64 is named, and its content is not echoed.
    let bad = write(&dir.path().join("bad.b64"), b"s3cr3t-not-base64!");
    let err = fails(
        &s,
        "app-a",
        &[
            "wrap",
            "--key",
            "k",
            "--plaintext-file",
            bad.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        err.contains("not standard base64") && err.contains("bad.b64"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t"), "{err}");
}

/// Security review: bulk rewrap run again on its own output kept the previous run's
/// `error` on lines that now rewrapped fine, so a repaired line still looked failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_rewrap_run_again_on_its_output_drops_errors_that_are_gone() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "a", "--grant", APP_A]).await;
    ok(&s, "admin-a", &["keys", "create", "b", "--grant", APP_A]).await;
    let app = s.kms_client("app-a");
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    let mut deks = Vec::new();
    for (i, key) in ["a", "b"].into_iter().enumerate() {
        let ctx: kms_client::api::Context =
            [("row".to_string(), i.to_string())].into_iter().collect();
        let dk = app.datakey(key, &ctx).await.unwrap();
        lines.push_str(&format!(
            "{{\"id\":\"r{i}\",\"wrapped\":\"{}\",\"context\":{{\"row\":\"{i}\"}}}}\n",
            b64.encode(dk.wrapped.as_bytes())
        ));
        deks.push(dk.plaintext.expose_secret().to_vec());
    }
    let input = write(&dir.path().join("deks.jsonl"), lines.as_bytes());
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    // Key b disabled: its line fails.
    ok(&s, "admin-a", &["keys", "disable", "b"]).await;
    let err = fails(
        &s,
        "app-a",
        &["rewrap", "--in", &p(&input), "--out", &p(&first)],
    )
    .await;
    assert!(err.contains("1 of 2 items failed"), "{err}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&first)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    assert!(rows[0].get("error").is_none(), "{}", rows[0]);
    assert_eq!(rows[1]["error"]["code"], "KeyDisabled", "{}", rows[1]);
    // Enabled again, the first run's output rewraps in full: no line keeps an error.
    ok(&s, "admin-a", &["keys", "enable", "b"]).await;
    ok(
        &s,
        "app-a",
        &["rewrap", "--in", &p(&first), "--out", &p(&second)],
    )
    .await;
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&second)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    assert_eq!(rows.len(), 2);
    for (i, (row, key)) in rows.iter().zip(["a", "b"]).enumerate() {
        assert!(row.get("error").is_none(), "stale error kept: {row}");
        assert_eq!(row["id"], format!("r{i}"));
        assert_eq!(row["key"], key);
        let ctx: kms_client::api::Context =
            [("row".to_string(), i.to_string())].into_iter().collect();
        let wrapped = b64.decode(row["wrapped"].as_str().unwrap()).unwrap();
        let un = app.unwrap(&wrapped, &ctx).await.unwrap();
        assert_eq!(un.plaintext.expose_secret(), &deks[i][..]);
    }
}

/// Security review: relative paths in a profile were read against the working directory,
/// so the same profile picked up other files (another CA, another key) depending on where
/// kmsctl ran. They resolve against the config file's own folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_paths_resolve_against_the_config_files_folder() {
    let s = TestServer::start().await;
    ok(&s, "admin-a", &["keys", "create", "k"]).await;
    let home = tempfile::tempdir().unwrap();
    let conf = home.path().join("conf");
    std::fs::create_dir_all(conf.join("certs")).unwrap();
    for (from, to) in [
        (s.pki.ca(), "ca.pem"),
        (s.pki.cert("admin-a"), "admin.pem"),
        (s.pki.key("admin-a"), "admin-key.pem"),
    ] {
        std::fs::copy(from, conf.join("certs").join(to)).unwrap();
    }
    std::fs::write(
        conf.join("kmsctl.toml"),
        format!(
            "default_profile = \"ops\"\n[profiles.ops]\nendpoints = [\"{}\"]\ntls_ca = \"certs/ca.pem\"\ntls_cert = \"certs/admin.pem\"\ntls_key = \"./certs/admin-key.pem\"\noutput = \"json\"\n",
            s.url("")
        ),
    )
    .unwrap();
    // Another working directory, holding a `certs/` of its own that must not be used.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(elsewhere.path().join("certs")).unwrap();
    std::fs::write(elsewhere.path().join("certs/ca.pem"), b"not a certificate").unwrap();
    for config in [
        conf.join("kmsctl.toml").display().to_string(),
        // A relative --config is the working directory's; the paths in it are its own.
        "../../conf/kmsctl.toml".to_string(),
    ] {
        let cwd = if config.starts_with('/') {
            elsewhere.path().to_path_buf()
        } else {
            let deep = home.path().join("work/deep");
            std::fs::create_dir_all(&deep).unwrap();
            deep
        };
        let out = kmsctl_run(
            vec![
                "--config".into(),
                config.clone(),
                "keys".into(),
                "list".into(),
            ],
            Run {
                cwd: Some(cwd),
                ..Run::default()
            },
        )
        .await;
        assert!(
            out.status.success(),
            "--config {config}: {}",
            stderr_of(&out)
        );
        assert_eq!(
            json(&String::from_utf8_lossy(&out.stdout))["keys"][0]["name"],
            "k"
        );
    }
}

/// Security review: kmsctl used a client private key that other users could read. Like
/// ssh, it refuses a key file with any group or other permission bit, naming the file and
/// the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_open_to_group_or_others_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("admin-key.pem");
    std::fs::copy(s.pki.key("admin-a"), &key).unwrap();
    let args = |key: &Path| {
        let mut a = conn(&s, "admin-a");
        let at = a.iter().position(|x| x == "--tls-key").unwrap();
        a[at + 1] = key.display().to_string();
        a.extend(["keys", "list"].map(String::from));
        a
    };
    for mode in [0o640, 0o604, 0o644, 0o620, 0o601] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = kmsctl(args(&key), vec![]).await;
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "mode {mode:o}: {err}");
        assert!(
            err.contains(&key.display().to_string())
                && err.contains(&format!("{mode:o}"))
                && err.contains("chmod 600"),
            "mode {mode:o}: {err}"
        );
    }
    for mode in [0o600, 0o400] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = kmsctl(args(&key), vec![]).await;
        assert!(out.status.success(), "mode {mode:o}: {}", stderr_of(&out));
    }
}

type FakeStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A TLS server that is not Keyhold (the test PKI's server certificate, HTTP/1.1 only):
/// each connection goes to `serve` with the request head it sent. Returns its URL.
async fn fake_server<F, Fut>(pki: &TestPki, serve: F) -> String
where
    F: Fn(FakeStream, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncReadExt as _;
    let mut tls = keyhold_tests::rustls_server(pki);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                serve(tls, String::from_utf8_lossy(&head).into_owned()).await;
            });
        }
    });
    url
}

/// An answer of `send` bytes of JSON whitespace, declared with `content-length: declared`
/// (chunked when `None`); then nothing more, on a connection kept open.
fn oversized(
    declared: Option<u64>,
    send: usize,
) -> impl Fn(FakeStream, String) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
       + Clone
       + Send
       + 'static {
    move |mut tls: FakeStream, _head: String| {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt as _;
            let head = match declared {
                Some(n) => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n"
                ),
                None => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".into(),
            };
            if tls.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..send / chunk.len() {
                if declared.is_none()
                    && tls
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await
                        .is_err()
                {
                    return;
                }
                if tls.write_all(&chunk).await.is_err() {
                    return;
                }
                if declared.is_none() && tls.write_all(b"\r\n").await.is_err() {
                    return;
                }
            }
            let _ = tls.flush().await;
            std::future::pending::<()>().await;
        })
    }
}

/// Security review: kmsctl read an answer of any size into memory. Past the limit (64 MiB
/// by default, `--max-response-mib`) it stops and says so, whether the size was declared
/// up front or the body just never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_past_the_size_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = keyhold_tests::generate_pki(dir.path());
    let list = |url: &str, extra: &[&str]| {
        let mut a = conn_to(url, &pki, "admin-a");
        a.extend(["--timeout", "15"].map(String::from));
        a.extend(extra.iter().map(|x| x.to_string()));
        a.extend(["keys", "list"].map(String::from));
        a
    };
    // 80 MiB, chunked, then silence: refused once 64 MiB have come.
    let url = fake_server(&pki, oversized(None, 80 << 20)).await;
    let out = kmsctl(list(&url, &[]), vec![]).await;
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("larger than 64 MiB") && err.contains("--max-response-mib"),
        "{err}"
    );
    // 10 GiB declared: refused from the header.
    let url = fake_server(&pki, oversized(Some(10 << 30), 80 << 20)).await;
    let out = kmsctl(list(&url, &[]), vec![]).await;
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("larger than 64 MiB"), "{err}");
    // The flag moves the limit: 2 MiB is refused under 1 MiB, read under 4 MiB (and then
    // found not to be a Keyhold answer).
    let url = fake_server(&pki, oversized(Some(2 << 20), 2 << 20)).await;
    let out = kmsctl(list(&url, &["--max-response-mib", "1"]), vec![]).await;
    let err = stderr_of(&out);
    assert!(err.contains("larger than 1 MiB"), "{err}");
    let out = kmsctl(list(&url, &["--max-response-mib", "4"]), vec![]).await;
    let err = stderr_of(&out);
    assert!(err.contains("malformed answer"), "{err}");
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// `write(1, ...)` as /proc/PID/syscall shows it: the syscall number, then the fd.
#[cfg(target_arch = "x86_64")]
const WRITE_TO_STDOUT: &str = "1 0x1 ";
#[cfg(target_arch = "aarch64")]
const WRITE_TO_STDOUT: &str = "64 0x1 ";

/// The 32-byte blocks the test passphrase is made of: `~KHPW` and a number, then this.
const BLOCK_TAIL: &[u8; 24] = b"~abcdefghijklmnopqrstuvw";

/// Pieces (32-byte blocks) of the test passphrase in a process's writable memory, per
/// mapping.
fn passphrase_pieces_in_memory(pid: u32) -> Vec<(String, usize)> {
    use std::io::{Read as _, Seek as _};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        if !perms.starts_with("rw") {
            continue;
        }
        let name = fields.get(5).copied().unwrap_or("[anonymous]").to_string();
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        if mem.seek(std::io::SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        let mut pieces = 0;
        let mut at = 0;
        while let Some(p) = buf[at..].iter().position(|&b| b == b'~') {
            let i = at + p;
            if buf[i..].starts_with(b"~KHPW") && buf.get(i + 8..i + 32) == Some(&BLOCK_TAIL[..]) {
                pieces += 1;
            }
            at = i + 1;
        }
        if pieces > 0 {
            found.push((format!("{name} {range}"), pieces));
        }
    }
    found
}

/// Security review: the passphrase `sys rotate-master` read from a file went through
/// buffers freed without being wiped. Once the server has answered, no piece of it may be
/// left anywhere in kmsctl's memory: read through /proc/PID/mem while kmsctl waits to print
/// the result (its stdout is a full pipe). The passphrase comes through a pipe
/// (`--passphrase-file /dev/stdin`, like `<(pass show keyhold)`), where a buffer that
/// grows as it reads leaves pieces behind in each allocation it outgrows.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_master_leaves_no_piece_of_the_passphrase_in_memory() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let pki = keyhold_tests::generate_pki(&dir.path().join("pki"));
    let passphrase: String = (0..90)
        .map(|i| format!("~KHPW{i:03}{}", std::str::from_utf8(BLOCK_TAIL).unwrap()))
        .collect();
    let (tx, mut bodies) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let url = fake_server(&pki, move |mut tls: FakeStream, head: String| {
        let tx = tx.clone();
        async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut body = vec![0u8; content_length(&head)];
            if tls.read_exact(&mut body).await.is_err() {
                return;
            }
            let _ = tx.send(body);
            let answer = br#"{"versions_resealed":3}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            );
            let _ = tls.write_all(head.as_bytes()).await;
            let _ = tls.write_all(answer).await;
            let _ = tls.flush().await;
            std::future::pending::<()>().await;
        }
    })
    .await;
    // kmsctl's stdout: a FIFO filled up, whose reader never reads.
    let fifo = dir.path().join("stdout.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let nonblocking = i32::try_from(rustix::fs::OFlags::NONBLOCK.bits()).unwrap();
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nonblocking)
        .open(&fifo)
        .unwrap();
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nonblocking)
        .open(&fifo)
        .unwrap();
    loop {
        match filler.write(&[b'.'; 4096]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    let stdout = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut args = conn_to(&url, &pki, "sys");
    args.extend(["sys", "rotate-master", "--passphrase-file", "/dev/stdin"].map(String::from));
    let piped = format!("{passphrase}\n");
    let (found, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = kmsctl_command(&args)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(piped.as_bytes())
            .unwrap();
        let pid = child.id();
        let started = std::time::Instant::now();
        loop {
            let syscall =
                std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            if syscall.starts_with(WRITE_TO_STDOUT) {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                let out = child.wait_with_output().unwrap();
                panic!("kmsctl ended before printing: {}", stderr_of(&out));
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "kmsctl never blocked writing its result: {syscall}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = passphrase_pieces_in_memory(pid);
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        (found, stderr_of(&out))
    })
    .await
    .unwrap();
    // The request did carry the passphrase (the test is not vacuous).
    let body = bodies.recv().await.unwrap();
    assert_eq!(
        json(&String::from_utf8(body).unwrap()),
        serde_json::json!({ "passphrase": passphrase })
    );
    assert!(
        found.is_empty(),
        "pieces of the passphrase (32-byte blocks of {}) left in kmsctl's memory: {found:?}\n{stderr}",
        passphrase.len() / 32
    );
}

/// Dual control through kmsctl (issue 28): the policy, a held deletion (exit status 75,
/// the request's id on stderr), another admin's `approvals list` and `approve`, the run
/// with `--approval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_through_kmsctl() {
    let s = TestServer::start().await;
    s.pki.issue("admin2-a", "spiffe://test/acme/admin2");
    ok(
        &s,
        "admin-a",
        &[
            "sys",
            "set-identity",
            "spiffe://test/acme/admin2",
            "--role",
            "admin",
        ],
    )
    .await;
    ok(&s, "admin-a", &["keys", "create", "held"]).await;
    let policy = ok(
        &s,
        "admin-a",
        &[
            "approvals",
            "policy",
            "--operations",
            "destroy,policy",
            "--approvers",
            "1",
            "--window",
            "2h",
        ],
    )
    .await;
    assert!(
        policy.contains("destroy, policy wait for 1 other approvers, within 7200 s"),
        "{policy}"
    );

    let mut args = conn(&s, "admin-a");
    args.extend(["keys", "schedule-deletion", "held", "--days", "7"].map(String::from));
    let out = kmsctl(args.clone(), vec![]).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("waiting for approvals"), "{stderr}");

    let list = json(&ok(&s, "admin2-a", &["approvals", "list", "--output", "json"]).await);
    let id = list["approvals"][0]["id"].as_str().unwrap().to_owned();
    assert!(stderr.contains(&id), "{stderr}");
    assert_eq!(list["approvals"][0]["status"], "pending");
    let mine = fails(&s, "admin-a", &["approvals", "approve", &id]).await;
    assert!(mine.contains("requester cannot approve"), "{mine}");
    let approved = ok(
        &s,
        "admin2-a",
        &["approvals", "approve", &id, "--reason", "ticket 42"],
    )
    .await;
    assert!(approved.contains("approved"), "{approved}");

    args.extend(["--approval".to_owned(), id.clone()]);
    let out = kmsctl(args.clone(), vec![]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pending-deletion"));
    let again = kmsctl(args, vec![]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ran"));
    let shown = ok(&s, "admin-a", &["approvals", "show", &id]).await;
    assert!(
        shown.contains("executed") && shown.contains("ok"),
        "{shown}"
    );
}
