//! Erasure keys on PostgreSQL, rooted in the sealing HSM (`kms_server::storage::erasure::shared`),
//! through real nodes over mTLS: two nodes on one database and one SoftHSM token; a key
//! destroyed on the cluster; then the database backup taken before the destruction is
//! restored and a node started on it, with the same token and master key: within the
//! retention it still opens the destroyed key (the retention is what lets database
//! backups restore), and once the retention has passed and the old epoch's token key is
//! destroyed, nothing in that backup opens any more, while the live cluster still serves
//! its remaining keys.
//!
//! A rotation that fails after the destruction committed raises an alert and a gauge, and
//! is finished by the next sweep.
//! Also: `migrate-store` from an embedded store moves its erasure keys into the database,
//! so a node without the old erasure file opens the migrated keys.
//!
//! Its own process: a PKCS#11 module is initialized once per process, and SoftHSM reads
//! `SOFTHSM2_CONF` then; both scenarios share one token ([`token`]).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keyhold_tests::softhsm::SoftHsm;
use keyhold_tests::{pg, TestServer, APP_A};
use serde_json::{json, Value};

const DAY: Duration = Duration::from_secs(86_400);

/// The process's one SoftHSM token, made (and `SOFTHSM2_CONF` set) before anything here
/// loads the PKCS#11 module.
fn token() -> &'static SoftHsm {
    static TOKEN: std::sync::OnceLock<(tempfile::TempDir, SoftHsm)> = std::sync::OnceLock::new();
    &TOKEN
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let hsm = SoftHsm::new(dir.path(), "keyhold-erasure", "4321-user-pin");
            std::env::set_var(hsm.env().0, hsm.env().1);
            (dir, hsm)
        })
        .1
}

/// The token label of `epoch`'s key on the cluster in database `db`.
fn epoch_label(db: &str, epoch: u64) -> String {
    let cluster = pg::sql_on(Some(db), "SELECT cluster FROM keyhold_erasure_head");
    assert_eq!(cluster.len(), 16, "{cluster}");
    format!("keyhold-master-wrap/erasure/{cluster}/{epoch}")
}

async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The status of an unwrap of `wrapped` on `node`.
async fn unwrap_status(node: &TestServer, wrapped: &Value) -> (u16, Value) {
    post(
        &node.client(Some("app-a")),
        &node.url("/v1/unwrap"),
        json!({"wrapped": wrapped}),
    )
    .await
}

/// A copy of `url`'s database as `pg_dump` sees it now, restored into a fresh database;
/// returns the copy's connection string. (What a database backup holds.)
fn dump(url: &str, file: &std::path::Path) {
    let out = std::process::Command::new("pg_dump")
        .args(["--no-owner", "-f"])
        .arg(file)
        .args(["-d", url])
        .output()
        .expect("pg_dump (PostgreSQL's client) must be installed");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn restore(file: &std::path::Path) -> String {
    let url = pg::fresh_database();
    let out = std::process::Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    url
}

fn database_url(node: &TestServer) -> String {
    let text = std::fs::read_to_string(&node.config).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("url = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned()
}

/// The node's metrics (ops listener).
async fn metrics(node: &TestServer) -> String {
    reqwest::get(node.ops_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `f` every 100 ms until it holds (at most 15 s).
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Both scenarios in one test, one after the other, each stopping its servers; then no
/// thread of theirs may be left (their connection pools ran the token calls), and the
/// PKCS#11 module is finalized before the process exits (SoftHSM's exit-time destructors
/// crashed with "double free", in CI, while a pool thread was still exiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_keys_rooted_in_the_hsm() {
    if !pg::available("erasure_keys_rooted_in_the_hsm") {
        return;
    }
    destroyed_keys_do_not_come_back_from_database_backups().await;
    migrating_into_postgres_moves_the_erasure_keys_into_the_database().await;
    pg::assert_store_threads_stopped();
    kms_server::crypto::seal::pkcs11_finalize();
}

async fn destroyed_keys_do_not_come_back_from_database_backups() {
    let hsm = token();
    let tokens = tempfile::tempdir().unwrap();
    let alerts = tokens.path().join("alerts.jsonl");
    let extra = format!(
        "[keys]\nsweep_interval_secs = 1\n[alerts]\ncommand = [\"sh\", \"-c\", \"cat >> {0}; echo >> {0}\"]\n",
        alerts.display()
    );
    let mut a = TestServer::start_on_postgres_with_token(hsm, &extra).await;
    let mut b = a.another_node().await;
    let url = database_url(&a);
    let db = pg::database_of(&a.config);

    let admin = a.client(Some("admin-a"));
    for name in ["doomed", "kept"] {
        let (st, info) = post(
            &admin,
            &a.url("/v1/keys"),
            json!({"name": name, "grants": [{"identity": APP_A, "operations": ["datakey", "unwrap"]}]}),
        )
        .await;
        assert_eq!(st, 201, "{info}");
    }
    let mut wrapped = Vec::new();
    for name in ["doomed", "kept"] {
        let (st, dk) = post(
            &a.client(Some("app-a")),
            &a.url(&format!("/v1/keys/{name}/datakey")),
            json!({}),
        )
        .await;
        assert_eq!(st, 200, "{dk}");
        wrapped.push((dk["wrapped"].clone(), dk["plaintext"].clone()));
    }
    let (doomed, kept) = (&wrapped[0], &wrapped[1]);
    // B opens keys made on A: their erasure keys are in the database, under the epoch
    // key in the token both nodes reach.
    for w in [doomed, kept] {
        let (st, body) = unwrap_status(&b, &w.0).await;
        assert_eq!((st, &body["plaintext"]), (200, &w.1), "{body}");
    }
    assert_eq!(
        pg::sql_on(
            Some(&db),
            "SELECT count(*), min(epoch), max(epoch) FROM keyhold_erasure"
        ),
        "2|1|1"
    );
    // Nothing in the database is an erasure key in the clear: each row is a sealed box.
    assert_eq!(
        pg::sql_on(
            Some(&db),
            "SELECT count(*) FROM keyhold_erasure WHERE length(sealed) = 32 + 32 + 16"
        ),
        "2"
    );
    assert_eq!(hsm.probe(&epoch_label(&db, 1))["count"], 1);

    // The backup an operator takes before the destruction.
    let backup = tokens.path().join("before.sql");
    dump(&url, &backup);

    let (st, info) = post(
        &admin,
        &a.url("/v1/keys/doomed/schedule-deletion"),
        json!({"pending_days": 7}),
    )
    .await;
    assert_eq!(st, 200, "{info}");
    // The first sweeps fail at the rotation, after the destruction committed (as a crash
    // or a lost database would leave it): the key is destroyed and its row gone, the epoch
    // stays dirty, and the next sweep (on either node) finishes the rotation.
    fail::cfg("erasure-rotate", "return").unwrap();
    a.advance_clock(8 * DAY);
    b.advance_clock(8 * DAY);
    until(
        "the destruction commits with the rotation pending",
        async || pg::sql_on(Some(&db), "SELECT epoch, dirty FROM keyhold_erasure_head") == "1|t",
    )
    .await;
    assert_eq!(
        pg::sql_on(Some(&db), "SELECT count(*) FROM keyhold_erasure"),
        "1"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pg::sql_on(Some(&db), "SELECT epoch, dirty FROM keyhold_erasure_head"),
        "1|t",
        "the failpoint holds the rotation"
    );
    // Operators hear of it: an alert every sweep, and the gauge.
    until("the rotation-pending alert", async || {
        std::fs::read_to_string(&alerts).is_ok_and(|t| t.contains("erasure_rotation_pending"))
    })
    .await;
    until("the rotation-pending gauge", async || {
        metrics(&b)
            .await
            .contains("keyhold_erasure_rotation_pending 1")
    })
    .await;
    let (_, info) = get(&admin, &a.url("/v1/keys/doomed")).await;
    assert_eq!(info["state"], "destroyed", "{info}");
    fail::remove("erasure-rotate");
    until(
        "the sweep destroys the key and moves to epoch 2",
        async || pg::sql_on(Some(&db), "SELECT epoch, dirty FROM keyhold_erasure_head") == "2|f",
    )
    .await;
    let (_, info) = get(&admin, &b.url("/v1/keys/doomed")).await;
    assert_eq!(info["state"], "destroyed", "{info}");
    assert_eq!(
        pg::sql_on(
            Some(&db),
            "SELECT count(*), min(epoch) FROM keyhold_erasure"
        ),
        "1|2",
        "the destroyed key's row is gone, the other re-sealed under epoch 2"
    );
    // Epoch 1 is retired, not yet destroyed: the default retention is 7 days.
    assert_eq!(
        pg::sql_on(
            Some(&db),
            "SELECT epoch, retired_at IS NOT NULL, destroyed_at IS NULL FROM keyhold_erasure_epochs ORDER BY epoch"
        ),
        "1|t|t\n2|f|t"
    );
    for node in [&a, &b] {
        let (st, body) = unwrap_status(node, &kept.0).await;
        assert_eq!((st, &body["plaintext"]), (200, &kept.1), "{body}");
        let (st, body) = unwrap_status(node, &doomed.0).await;
        assert_eq!(st, 409, "{body}");
    }
    // The destruction was audited once (by the sweep that committed it, though its
    // rotation failed), in the cluster's one chain.
    let page = a.kms_client("auditor-a").audit_page(0, 1000).await.unwrap();
    let destroys = page
        .records
        .iter()
        .filter(|r| r.operation == "SYSTEM destroy-key")
        .count();
    assert_eq!(
        destroys,
        1,
        "{:?}",
        page.records
            .iter()
            .map(|r| &r.operation)
            .collect::<Vec<_>>()
    );
    until("the gauges after the rotation", async || {
        let m = metrics(&a).await;
        m.contains("keyhold_erasure_rotation_pending 0")
            && m.contains("keyhold_erasure_epochs_retained 1")
    })
    .await;
    // ... and in `kmsctl sys status`.
    let out = keyhold_tests::stdout_of(
        std::process::Command::new(keyhold_tests::workspace_bin("kmsctl"))
            .args(["--endpoint", &b.url(""), "--tls-ca"])
            .arg(b.pki.ca())
            .arg("--tls-cert")
            .arg(b.pki.cert("admin-a"))
            .arg("--tls-key")
            .arg(b.pki.key("admin-a"))
            .args(["sys", "status"])
            .env_remove("KMSCTL_ENDPOINT")
            .env("XDG_CONFIG_HOME", "/nonexistent-xdg-config-for-tests"),
    );
    assert!(
        out.contains("erasure epoch") && out.contains("cluster nodes"),
        "{out}"
    );
    // Operators see it in the status: epoch 2, epoch 1 kept for the retention.
    until("the status reports the retained epoch", async || {
        let (_, st) = get(&admin, &b.url("/v1/sys/status")).await;
        st["cluster"]["erasure"]
            == json!({"epoch": 2, "rotation_pending": false, "retained_epochs": [1], "retention_secs": 7 * 86_400})
    })
    .await;

    // Within the retention, the database backup restores whole: a node on it opens both
    // keys (the destroyed one was alive when the backup was taken).
    let restored = restore(&backup);
    let mut c = a.node_on_database(&restored).await;
    for w in [doomed, kept] {
        let (st, body) = unwrap_status(&c, &w.0).await;
        assert_eq!((st, &body["plaintext"]), (200, &w.1), "{body}");
    }
    c.stop().await;

    // After the retention the sweep destroys epoch 1's token key: the destruction is now
    // final. The same backup, restored again, with the same token and master key, opens
    // nothing: its erasure keys are under an epoch key no one has.
    a.advance_clock(8 * DAY);
    until("the sweep destroys epoch 1's token key", async || {
        pg::sql_on(
            Some(&db),
            "SELECT destroyed_at IS NOT NULL FROM keyhold_erasure_epochs WHERE epoch = 1",
        ) == "t"
    })
    .await;
    assert_eq!(hsm.probe(&epoch_label(&db, 1))["count"], 0);
    assert_eq!(hsm.probe(&epoch_label(&db, 2))["count"], 1);
    assert_eq!(
        pg::sql_on(
            Some(&db),
            "SELECT length(wrapped) FROM keyhold_erasure_epochs WHERE epoch = 1"
        ),
        "0"
    );
    let restored = restore(&backup);
    let mut d = a.node_on_database(&restored).await;
    // It unseals (the master key's token key is untouched) ...
    let (st, status) = get(&d.client(Some("admin-a")), &d.url("/v1/sys/status")).await;
    assert_eq!(st, 200, "{status}");
    // ... but neither key in the old backup opens: not the destroyed one, and (the price of
    // a finished retention) not the other either.
    for w in [doomed, kept] {
        let (st, body) = unwrap_status(&d, &w.0).await;
        assert_eq!(st, 409, "{body}");
        assert_eq!(body["error"]["code"], "InvalidState", "{body}");
    }
    // The live cluster still serves what it kept.
    for node in [&a, &b] {
        let (st, body) = unwrap_status(node, &kept.0).await;
        assert_eq!((st, &body["plaintext"]), (200, &kept.1), "{body}");
    }
    for node in [&mut a, &mut b, &mut d] {
        node.stop().await;
    }
}

async fn migrating_into_postgres_moves_the_erasure_keys_into_the_database() {
    let hsm = token();
    let mut s = TestServer::start_with_token(hsm, "", false).await;
    let (st, info) = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "moved", "grants": [{"identity": APP_A, "operations": ["datakey", "unwrap"]}]}),
    )
    .await;
    assert_eq!(st, 201, "{info}");
    let (st, dk) = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/moved/datakey"),
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{dk}");
    s.stop().await;

    // The embedded config stays as `embedded.toml`; `kms-server.toml` becomes the
    // PostgreSQL one, which the nodes below copy.
    let config = s.dir.path().join("kms-server.toml");
    let embedded = s.dir.path().join("embedded.toml");
    std::fs::copy(&config, &embedded).unwrap();
    let url = pg::fresh_database();
    let text = std::fs::read_to_string(&embedded).unwrap().replacen(
        "[store]\npath = \"store.redb\"",
        &format!("[store]\nengine = \"postgres\"\npath = \"node\"\nurl = \"{url}\"\npool_size = 4"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(keyhold_tests::workspace_bin("kms-server"))
        .arg("migrate-store")
        .arg("--from-config")
        .arg(&embedded)
        .arg("--config")
        .arg(&config)
        .env(hsm.env().0, hsm.env().1)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 keys moved from"), "{stdout}");
    // No erasure key went into a file on the new node (the file there, if any, is an
    // empty header).
    let local = s.dir.path().join("node.erasure");
    assert!(std::fs::metadata(&local).map_or(0, |m| m.len()) <= 64);
    let db = pg::database_of(&config);
    assert_eq!(
        pg::sql_on(Some(&db), "SELECT count(*) FROM keyhold_erasure"),
        "1"
    );

    // This node and another (with no file of the old store) open the migrated key.
    s.config = config;
    s.start_again().await;
    s.wait_ready().await;
    let mut b = s.another_node().await;
    for node in [&s, &b] {
        let (st, body) = unwrap_status(node, &dk["wrapped"]).await;
        assert_eq!((st, &body["plaintext"]), (200, &dk["plaintext"]), "{body}");
    }
    // Back into an embedded store is refused: it could not open these keys.
    let back = s.dir.path().join("back.toml");
    std::fs::write(
        &back,
        std::fs::read_to_string(&embedded).unwrap().replacen(
            "path = \"store.redb\"",
            "path = \"back.redb\"",
            1,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(keyhold_tests::workspace_bin("kms-server"))
        .arg("migrate-store")
        .arg("--from-config")
        .arg(&s.config)
        .arg("--config")
        .arg(&back)
        .env(hsm.env().0, hsm.env().1)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the target cannot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop().await;
    b.stop().await;
}
