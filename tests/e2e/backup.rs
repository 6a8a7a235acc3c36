//! Backup and restore: `kmsctl sys backup` from a running server over mTLS, then
//! `kms-server restore` into a new, empty store with the same seal secret: the old DEKs
//! unwrap, grants and runtime identities come back; a backup with one flipped byte, or a
//! store already initialized, is refused and nothing is written.

use std::process::Command;

use keyhold_tests::{workspace_bin, write_config, TestSeal, TestServer, APP_A};
use kms_client::api::{Context, Role};

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.env("XDG_CONFIG_HOME", "/nonexistent").output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_restore_into_a_new_store_unwraps_the_old_deks() {
    let mut s = TestServer::start().await;
    crate::create_key(&s, "admin-a", "orders").await;
    crate::create_key(&s, "admin-b", "theirs").await;
    let admin = s.kms_client("admin-a");
    admin.rotate_key("orders").await.unwrap();
    admin
        .set_identity("spiffe://test/acme/extra", Role::Auditor)
        .await
        .unwrap();
    let ctx: Context = [("doc".to_string(), "7".to_string())].into_iter().collect();
    let dk = s.kms_client("app-a").datakey("orders", &ctx).await.unwrap();
    let dk_b = s
        .kms_client("app-b")
        .datakey("theirs", &Context::new())
        .await
        .unwrap();

    let work = tempfile::tempdir().unwrap();
    let backup = work.path().join("keyhold.backup");
    let url = s.url("");
    let (ca, cert, key) = (s.pki.ca(), s.pki.cert("sys"), s.pki.key("sys"));
    let backup_arg = backup.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(workspace_bin("kmsctl"))
            .arg("--endpoint")
            .arg(url)
            .arg("--tls-ca")
            .arg(ca)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .args(["sys", "backup", "--out"])
            .arg(backup_arg))
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(!text.contains("orders"), "names travel encrypted");
    s.stop().await;

    // A new data dir: same PKI and key file, a store never initialized.
    let fresh = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&s.dir.path().join("pki"), &fresh.path().join("pki"));
    std::fs::copy(
        s.dir.path().join("master.key"),
        fresh.path().join("master.key"),
    )
    .unwrap();
    let config = write_config(fresh.path(), TestSeal::KeyFile, "", "");
    let restore = |file: &std::path::Path| {
        run(Command::new(workspace_bin("kms-server"))
            .arg("restore")
            .arg("--config")
            .arg(&config)
            .arg("--in")
            .arg(file))
    };
    // One flipped byte in the payload: refused, nothing written.
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let payload = doc["payload"].as_str().unwrap().to_owned();
    let mid = payload.len() / 2;
    let flipped_char = if &payload[mid..mid + 1] == "0" {
        "1"
    } else {
        "0"
    };
    doc["payload"] = format!("{}{}{}", &payload[..mid], flipped_char, &payload[mid + 1..]).into();
    let bad = work.path().join("bad.backup");
    std::fs::write(&bad, doc.to_string()).unwrap();
    let out = restore(&bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not authenticate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !fresh.path().join("store.erasure").exists(),
        "nothing written"
    );
    // The real one.
    let out = restore(&backup);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second restore into the now initialized store is refused.
    let again = restore(&backup);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already initialized"));

    let r = TestServer::open_dir(fresh).await;
    let un = r
        .kms_client("app-a")
        .unwrap(dk.wrapped.as_bytes(), &ctx)
        .await
        .unwrap();
    assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
    assert_eq!(un.version, 2);
    let un_b = r
        .kms_client("app-b")
        .unwrap(dk_b.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    assert_eq!(
        un_b.plaintext.expose_secret(),
        dk_b.plaintext.expose_secret()
    );
    let info = r.kms_client("admin-a").get_key("orders").await.unwrap();
    assert_eq!(info.current_version, 2);
    assert_eq!(info.grants[0].identity, APP_A);
    let ids = r.kms_client("admin-a").identities().await.unwrap();
    assert!(ids
        .identities
        .iter()
        .any(|i| i.identity == "spiffe://test/acme/extra" && i.source == "runtime"));
}

/// Issue 22, point 7 said backups omit the audit keys after a master-key rotation. The
/// probe: rotate the master key, back up, restore into a new store. The restored server
/// opens the old DEKs (the key records' integrity tags are under keys derived from the
/// audit keys: without them every record would be refused) and hashes a context as the
/// original did (same audit keys). It passed on main before any change: the backup
/// carries the audit keys as resealed by the rotation (`backup::carried_meta`), so the
/// finding did not reproduce; the test stays as the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_after_a_master_rotation_keeps_the_audit_keys() {
    let mut s = TestServer::start().await;
    crate::create_key(&s, "admin-a", "orders").await;
    let ctx: Context = [("doc".to_string(), "9".to_string())].into_iter().collect();
    let before = s.kms_client("app-a").datakey("orders", &ctx).await.unwrap();
    assert_eq!(s.kms_client("sys").rotate_master(None).await.unwrap(), 1);
    let after = s.kms_client("app-a").datakey("orders", &ctx).await.unwrap();
    let hash_of = |records: Vec<kms_client::api::AuditRecord>| {
        records
            .into_iter()
            .rev()
            .find(|r| r.context_hash.is_some() && r.key.as_deref() == Some("orders"))
            .and_then(|r| r.context_hash)
            .expect("a record of the key with a context hash")
    };
    let original = hash_of(
        s.kms_client("auditor-a")
            .audit_page(0, 1000)
            .await
            .unwrap()
            .records,
    );
    let backup = s.kms_client("sys").backup().await.unwrap();
    s.stop().await;

    let fresh = tempfile::tempdir().unwrap();
    for dir in ["pki"] {
        std::fs::create_dir_all(fresh.path().join(dir)).unwrap();
        for e in std::fs::read_dir(s.dir.path().join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), fresh.path().join(dir).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        s.dir.path().join("master.key"),
        fresh.path().join("master.key"),
    )
    .unwrap();
    let config = write_config(fresh.path(), TestSeal::KeyFile, "", "");
    let file = fresh.path().join("keyhold.backup");
    std::fs::write(&file, serde_json::to_vec(&backup).unwrap()).unwrap();
    let out = run(Command::new(workspace_bin("kms-server"))
        .arg("restore")
        .arg("--config")
        .arg(&config)
        .arg("--in")
        .arg(&file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = TestServer::open_dir(fresh).await;
    for dk in [&before, &after] {
        let un = r
            .kms_client("app-a")
            .unwrap(dk.wrapped.as_bytes(), &ctx)
            .await
            .unwrap();
        assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
    }
    let restored = hash_of(
        r.kms_client("auditor-a")
            .audit_page(0, 1000)
            .await
            .unwrap()
            .records,
    );
    assert_eq!(
        restored, original,
        "the restored store hashes contexts under other audit keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shamir_sealed_server_restores_with_its_shares() {
    let mut s = TestServer::start_with(TestSeal::Shamir, "").await;
    let sys = s.kms_client("sys");
    for share in &s.shares[..3] {
        sys.unseal_share(share).await.unwrap();
    }
    crate::create_key(&s, "admin-a", "k").await;
    let dk = s
        .kms_client("app-a")
        .datakey("k", &Context::new())
        .await
        .unwrap();
    let backup = s.kms_client("sys").backup().await.unwrap();
    s.stop().await;

    let fresh = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fresh.path().join("pki")).unwrap();
    for e in std::fs::read_dir(s.dir.path().join("pki")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), fresh.path().join("pki").join(e.file_name())).unwrap();
    }
    let config = write_config(fresh.path(), TestSeal::Shamir, "", "");
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("b.backup");
    std::fs::write(&file, backup.to_string()).unwrap();
    let mut cmd = Command::new(workspace_bin("kms-server"));
    cmd.arg("restore")
        .arg("--config")
        .arg(&config)
        .arg("--in")
        .arg(&file);
    // Two shares are not enough; nothing is written.
    let share_file = |i: usize| {
        let p = work.path().join(format!("share{i}"));
        std::fs::write(&p, &s.shares[i]).unwrap();
        p
    };
    let (a, b, c) = (share_file(1), share_file(3), share_file(4));
    let out = run(Command::new(workspace_bin("kms-server"))
        .arg("restore")
        .arg("--config")
        .arg(&config)
        .arg("--in")
        .arg(&file)
        .arg("--share-file")
        .arg(&a)
        .arg("--share-file")
        .arg(&b));
    assert!(!out.status.success());
    assert!(!fresh.path().join("store.erasure").exists());
    // Three other shares than the ones used to unseal: restored.
    let out = run(cmd
        .arg("--share-file")
        .arg(&a)
        .arg("--share-file")
        .arg(&b)
        .arg("--share-file")
        .arg(&c));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = TestServer::open_dir(fresh).await;
    let rsys = r.kms_client("sys");
    for share in &s.shares[2..5] {
        rsys.unseal_share(share).await.unwrap();
    }
    let un = r
        .kms_client("app-a")
        .unwrap(dk.wrapped.as_bytes(), &Context::new())
        .await
        .unwrap();
    assert_eq!(un.plaintext.expose_secret(), dk.plaintext.expose_secret());
}
