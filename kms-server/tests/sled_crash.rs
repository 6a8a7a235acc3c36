//! The sled kill -9 reliability run: cheaper cycles than `tests/e2e/crash.rs`, and with
//! Keyhold's own code optional, so that a store sled cannot reopen can be attributed.
//!
//! The kill -9 run (`sled_kill9`, with its child `sled_crash_child`) is not in the default
//! run (`#[ignore]`). Run it with, for example:
//!
//! ```text
//! KEYHOLD_SLED_CYCLES=2000 KEYHOLD_SLED_MODE=keyhold \
//!   cargo test -p kms-server --features sled --test sled_crash -- --ignored sled_kill9 --nocapture
//! ```
//!
//! (`RELIABILITY.md`, "sled under kill -9", has the results and the load it ran under.)
//! In the default run: the failure that run looks for, built by hand
//! (`sled_does_not_open_a_store_with_an_unfinished_snapshot`), and the server's side
//! (`a_new_sled_store_needs_acceptance_and_migrate_store_moves_it_to_redb`). The same
//! failure from a real kill -9, deterministically: `sh kms-server/tests/sled_snapshot_kill.sh`
//! (gdb kills the child at the one syscall that breaks the store).
//!
//! Each cycle the parent starts this same test binary as a child (the `sled_crash_child`
//! test, which does nothing unless `KEYHOLD_SLED_CHILD` is set). The child opens the store
//! and writes batches shaped like the keyring's (a key's name, record, first version and
//! rotation entry; every third batch also updates the previous key and adds a version;
//! every seventh adds and removes a deletion entry; every 25th rewrites the versions of
//! the last 50 keys), printing `ACK <n>` only after each commit returned. The parent kills
//! it with SIGKILL after a random delay (`KEYHOLD_SLED_KILL_MS`), reopens the store, and checks every batch
//! acknowledged in that cycle. A store that does not reopen, or that lost an acknowledged
//! batch, is counted, copied to `KEYHOLD_SLED_KEEP` (if set) and replaced by a new one.
//!
//! `KEYHOLD_SLED_MODE`:
//! - `keyhold` (default): through `kms_server::storage::SledStore`, Keyhold's engine (its
//!   config, its eight trees, one multi-tree transaction then `Db::flush`).
//! - `raw8`: sled alone, none of Keyhold's code: the same eight trees, the same
//!   transaction-then-flush, the same `Mode::HighThroughput`.
//! - `single`: sled alone with its default config and one tree: plain `insert`/`remove`,
//!   then `flush` (no transaction, no other tree).
//!
//! `KEYHOLD_SLED_KILL_MS` (`<min>-<max>`, default `20-250`): when to kill, counted from
//! the spawn, or with `KEYHOLD_SLED_KILL_FROM=opening` from the child's `OPENING` line
//! (printed just before it opens the store); `auto` (with `opening`) kills at 70–130 % of
//! the median time the children's opens took so far, where sled writes its snapshot.
//! `KEYHOLD_SLED_PARENT_WRITES=0`: the parent only reads (by default it commits one small
//! batch after each check, as the e2e test's keyring does; then each child's open writes a
//! snapshot, the step a kill can break).
//!
//! `KEYHOLD_SLED_REOPEN`: `wait` (default) reaps the killed child before reopening, as
//! `tests/e2e/crash.rs` does; `early` reopens right after sending SIGKILL, while the
//! child may still hold sled's file lock (a refused open is retried every 1 ms and
//! counted; it is not a failure).

#![cfg(feature = "sled")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_server::storage::{KeyStore, SledStore, Table, WriteBatch};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Keyhold,
    Raw8,
    Single,
}

fn mode() -> Mode {
    match std::env::var("KEYHOLD_SLED_MODE").as_deref() {
        Ok("raw8") => Mode::Raw8,
        Ok("single") => Mode::Single,
        Ok("keyhold") | Err(_) => Mode::Keyhold,
        Ok(other) => panic!("KEYHOLD_SLED_MODE: unknown mode {other}"),
    }
}

/// A store opened in one of the three modes.
enum Store {
    Keyhold(SledStore),
    Raw {
        db: sled::Db,
        trees: Vec<sled::Tree>,
    },
    Single(sled::Db),
}

fn open(mode: Mode, path: &Path) -> Result<Store, String> {
    match mode {
        Mode::Keyhold => SledStore::open(path)
            .map(Store::Keyhold)
            .map_err(|e| format!("{e:?}")),
        Mode::Raw8 => {
            let db = sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .open()
                .map_err(|e| format!("{e:?}"))?;
            let trees = Table::ALL
                .iter()
                .map(|t| db.open_tree(t.name()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{e:?}"))?;
            Ok(Store::Raw { db, trees })
        }
        Mode::Single => sled::Config::new()
            .path(path)
            .open()
            .map(Store::Single)
            .map_err(|e| format!("{e:?}")),
    }
}

fn single_key(table: Table, key: &[u8]) -> Vec<u8> {
    let mut k = vec![table.id()];
    k.extend_from_slice(key);
    k
}

impl Store {
    fn commit(&self, batch: &WriteBatch) -> Result<(), String> {
        match self {
            Store::Keyhold(s) => s.commit(batch).map_err(|e| format!("{e:?}")),
            Store::Raw { db, trees } => {
                use sled::transaction::{ConflictableTransactionError, Transactional};
                trees
                    .as_slice()
                    .transaction(|t| {
                        for c in &batch.conditions {
                            let cur = t[usize::from(c.table.id())].get(c.key.as_slice())?;
                            if cur.as_deref() != c.expected.as_deref() {
                                return Err(ConflictableTransactionError::Abort(()));
                            }
                        }
                        for (table, key, value) in &batch.writes {
                            let tree = &t[usize::from(table.id())];
                            match value {
                                Some(v) => drop(tree.insert(key.as_slice(), v.as_slice())?),
                                None => drop(tree.remove(key.as_slice())?),
                            }
                        }
                        Ok(())
                    })
                    .map_err(|e| format!("{e:?}"))?;
                db.flush().map(drop).map_err(|e| format!("{e:?}"))
            }
            Store::Single(db) => {
                for (table, key, value) in &batch.writes {
                    let k = single_key(*table, key);
                    match value {
                        Some(v) => drop(db.insert(k, v.as_slice()).map_err(|e| format!("{e:?}"))?),
                        None => drop(db.remove(k).map_err(|e| format!("{e:?}"))?),
                    }
                }
                db.flush().map(drop).map_err(|e| format!("{e:?}"))
            }
        }
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self {
            Store::Keyhold(s) => s.get(table, key).map_err(|e| format!("{e:?}")),
            Store::Raw { trees, .. } => trees[usize::from(table.id())]
                .get(key)
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(|e| format!("{e:?}")),
            Store::Single(db) => db
                .get(single_key(table, key))
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(|e| format!("{e:?}")),
        }
    }
}

fn name(cycle: u32, i: u64) -> Vec<u8> {
    format!("c{cycle:05}-k{i:08}").into_bytes()
}

/// A key record of `version`: about the size of the keyring's JSON records.
fn record(name: &[u8], version: u32) -> Vec<u8> {
    let mut v = format!("{{\"version\":{version},\"name\":\"").into_bytes();
    while v.len() < 400 {
        v.extend_from_slice(name);
    }
    v
}

fn version_key(name: &[u8], version: u32) -> Vec<u8> {
    let mut k = name.to_vec();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Batch `i` of `cycle` (see the module comment).
fn batch(cycle: u32, i: u64) -> WriteBatch {
    let n = name(cycle, i);
    let mut b = WriteBatch::new();
    b.require(Table::KeyNames, &n, None)
        .put(Table::Keys, &n, &record(&n, 1))
        .put(Table::KeyNames, &n, &n)
        .put(Table::Versions, &version_key(&n, 1), &[0x5a; 120])
        .put(Table::Rotations, &version_key(&n, 0), b"");
    if i % 3 == 2 {
        let prev = name(cycle, i - 1);
        b.require(Table::Keys, &prev, Some(&record(&prev, 1)))
            .put(Table::Keys, &prev, &record(&prev, 2))
            .put(Table::Versions, &version_key(&prev, 2), &[0xa5; 120]);
    }
    if i % 7 == 6 {
        b.put(Table::Deletions, &version_key(&n, 7), b"")
            .delete(Table::Deletions, &version_key(&n, 7));
    }
    if i % 25 == 24 {
        for j in i.saturating_sub(50)..i {
            b.put(
                Table::Versions,
                &version_key(&name(cycle, j), 1),
                &[(j % 251) as u8; 120],
            );
        }
    }
    b
}

/// What must be in the store once batch `i` of `cycle` was acknowledged (its own writes;
/// the update of key `i - 1` made by batch `i` when `i % 3 == 2`).
fn check(store: &Store, cycle: u32, i: u64, last: u64) -> Result<(), String> {
    let n = name(cycle, i);
    let updated = i % 3 == 1 && i < last;
    // The last acknowledged key may also have been updated by a batch that was durable
    // but not yet acknowledged.
    let maybe_updated = i % 3 == 1 && i == last;
    let key = String::from_utf8_lossy(&n).into_owned();
    let got = store.get(Table::Keys, &n)?;
    let ok = got.as_deref() == Some(record(&n, if updated { 2 } else { 1 }).as_slice())
        || (maybe_updated && got.as_deref() == Some(record(&n, 2).as_slice()));
    if !ok {
        return Err(format!("LOST record of {key}"));
    }
    if store.get(Table::KeyNames, &n)?.is_none() {
        return Err(format!("LOST name of {key}"));
    }
    if store.get(Table::Versions, &version_key(&n, 1))?.is_none()
        || (updated && store.get(Table::Versions, &version_key(&n, 2))?.is_none())
    {
        return Err(format!("LOST version of {key}"));
    }
    Ok(())
}

/// The failure itself, without a kill (in the default run). When sled reopens a store it
/// writes a new snapshot as `snap.<lsn>.generating`, then renames it to `snap.<lsn>`.
/// sled 0.34.7 picks the snapshot to read by sorting *every* `snap.*` file, the
/// `.generating` one included, and takes the last; a process killed after creating that
/// file and before its last write (`kms-server/tests/sled_snapshot_kill.sh` does exactly
/// that with gdb) leaves an empty or partial file there, and the store no longer opens:
/// `Corruption { at: None, bt: () }`. This builds that state by hand (an empty
/// `.generating` file above the real snapshot, as the gdb kill leaves it), with sled alone:
/// default config, one tree, no Keyhold code. Moving the file aside opens the store again
/// with everything in it (`STORAGE.md`, recovery). If a sled upgrade fixes this, this test
/// fails: then update `STORAGE.md` and `RELIABILITY.md`.
#[test]
fn sled_does_not_open_a_store_with_an_unfinished_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.sled");
    // The writes, and the open that writes the snapshot, run in a child process: sled lets
    // go of its directory lock (a `flock` on `db`) only when its background threads drop
    // the file, some time after the `Db` is dropped, so a reopen in this process met
    // "could not acquire lock" now and then (1 run in 10 of the suite with two busy loops
    // on the cores, even without sled's flusher thread). A process's exit releases it.
    snapshot_child("write", &path);
    // Reopened once after the writes: sled writes its snapshot on this open.
    snapshot_child("reopen", &path);
    let snap = std::fs::read_dir(&path)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("snap."))
        .expect("sled wrote a snapshot");
    let lsn = u64::from_str_radix(&snap["snap.".len()..], 16).unwrap();
    let unfinished = path.join(format!("snap.{:016X}.generating", lsn + 1));
    std::fs::write(&unfinished, b"").unwrap();
    match sled::open(&path) {
        Err(sled::Error::Corruption { at: None, .. }) => {}
        Err(other) => panic!("sled failed differently: {other:?}"),
        Ok(_) => panic!("sled opened the store: update STORAGE.md and RELIABILITY.md"),
    }
    // Keyhold's engine reports the same, as in the failed CI run.
    let e = SledStore::open(&path).err().map(|e| format!("{e:?}"));
    assert_eq!(
        e.as_deref(),
        Some("Engine { engine: \"sled\", source: Corruption { at: None, bt: () } }")
    );
    // The recovery: move the unfinished snapshot aside; the store opens, all there.
    std::fs::rename(&unfinished, dir.path().join("unfinished-snapshot")).unwrap();
    snapshot_child("check", &path);
}

/// Runs [`sled_snapshot_child`] in a child process (`what`: `write`, `reopen` or `check`)
/// on `path`.
fn snapshot_child(what: &str, path: &Path) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sled_snapshot_child", "--ignored", "--nocapture"])
        .env("KEYHOLD_SLED_SNAPSHOT", what)
        .env("KEYHOLD_SLED_SNAPSHOT_PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "child {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child of `sled_does_not_open_a_store_with_an_unfinished_snapshot`: does nothing
/// unless `KEYHOLD_SLED_SNAPSHOT` says what to do. `write`: 1 000 records with sled's
/// default config. `reopen`: one more open (sled writes its snapshot then). `check`: the
/// store opens with all 1 000.
#[test]
#[ignore = "the child of sled_does_not_open_a_store_with_an_unfinished_snapshot"]
fn sled_snapshot_child() {
    let (Ok(what), Some(path)) = (
        std::env::var("KEYHOLD_SLED_SNAPSHOT"),
        std::env::var_os("KEYHOLD_SLED_SNAPSHOT_PATH"),
    ) else {
        return;
    };
    if what == "write" {
        {
            let db = sled::open(&path).unwrap();
            for i in 0u32..1000 {
                db.insert(i.to_be_bytes(), &[7u8; 100][..]).unwrap();
            }
            db.flush().unwrap();
        }
    } else if what == "reopen" {
        drop(sled::open(&path).unwrap());
    } else {
        assert_eq!(sled::open(&path).unwrap().len(), 1000);
    }
}

/// The server's side of it: `kms-server init` refuses to create a sled store unless
/// `[store] accept_sled_risks = true`; an existing sled store still opens without it (with a
/// warning naming `migrate-store`), and `kms-server migrate-store` moves it to redb in one
/// command, the key still there.
#[test]
fn a_new_sled_store_needs_acceptance_and_migrate_store_moves_it_to_redb() {
    use kms_client::api::{Algorithm, Grant, GrantOperation};
    use kms_server::crypto::seal::KeyFileSealer;
    use kms_server::storage::Engine;

    let bin = env!("CARGO_BIN_EXE_kms-server");
    let dir = tempfile::tempdir().unwrap();
    for f in ["c.pem", "k.pem", "ca.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let rest = "[seal]\nmethod = \"key-file\"\nkey_file = \"m.key\"\n\
                [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n\
                [process]\nallow_root = true\nmlock = \"best-effort\"\n";
    let sled_config = dir.path().join("sled.toml");
    let run = |args: &[&str]| Command::new(bin).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let config = sled_config.to_str().unwrap();

    // Without the acknowledgement: refused, and nothing created.
    std::fs::write(
        &sled_config,
        format!("[store]\nengine = \"sled\"\npath = \"s.sled\"\n{rest}"),
    )
    .unwrap();
    let out = run(&["init", "--config", config]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("refusing to create a new sled store") && err.contains("accept_sled_risks"),
        "{err}"
    );
    assert!(!dir.path().join("s.sled").exists());

    // With it: created (with a warning).
    std::fs::write(
        &sled_config,
        format!("[store]\nengine = \"sled\"\npath = \"s.sled\"\naccept_sled_risks = true\n{rest}"),
    )
    .unwrap();
    let out = run(&["init", "--config", config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("accept_sled_risks"));
    {
        let store = kms_server::storage::open(Engine::Sled, &dir.path().join("s.sled")).unwrap();
        let ring = kms_server::keyring::Keyring::new(store);
        ring.unseal(&KeyFileSealer::new(dir.path().join("m.key")))
            .unwrap();
        ring.create_key(
            "t",
            "moved",
            Algorithm::Aes256Gcm,
            None,
            vec![Grant::new("spiffe://x/app", &GrantOperation::ALL)],
        )
        .unwrap();
    }

    // The existing store opens without the setting; migrate-store moves it to redb.
    std::fs::write(
        &sled_config,
        format!("[store]\nengine = \"sled\"\npath = \"s.sled\"\n{rest}"),
    )
    .unwrap();
    let redb_config = dir.path().join("redb.toml");
    std::fs::write(&redb_config, format!("[store]\npath = \"s.redb\"\n{rest}")).unwrap();
    let out = run(&[
        "migrate-store",
        "--from-config",
        config,
        "--config",
        redb_config.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("verified"), "{stdout}");
    assert!(
        stderr.contains("sled 0.34.7") && stderr.contains("migrate-store"),
        "the warning on opening a sled store: {stderr}"
    );
    let store = kms_server::storage::open(Engine::Redb, &dir.path().join("s.redb")).unwrap();
    let ring = kms_server::keyring::Keyring::new(store);
    ring.unseal(&KeyFileSealer::new(dir.path().join("m.key")))
        .unwrap();
    assert_eq!(ring.key_info("t", "moved").unwrap().name, "moved");
}

/// The child: does nothing unless `KEYHOLD_SLED_CHILD` names the store.
#[test]
#[ignore = "the child of sled_kill9"]
fn sled_crash_child() {
    let Ok(path) = std::env::var("KEYHOLD_SLED_CHILD") else {
        return;
    };
    let cycle: u32 = std::env::var("KEYHOLD_SLED_CYCLE")
        .unwrap()
        .parse()
        .unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "OPENING").unwrap();
    out.flush().unwrap();
    let store = open(mode(), Path::new(&path)).expect("child: open");
    writeln!(out, "OPEN").unwrap();
    out.flush().unwrap();
    for i in 0u64.. {
        store.commit(&batch(cycle, i)).expect("child: commit");
        writeln!(out, "ACK {i}").unwrap();
        out.flush().unwrap();
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The store directory's files and sizes, for the report of a failure.
fn listing(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let len = e.metadata().map_or(0, |m| m.len());
                    format!("{} ({len} B)", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(", ")
}

/// The parent: `KEYHOLD_SLED_CYCLES` kill -9 cycles (default 200).
#[test]
#[ignore = "the sled kill -9 reliability run: see the module comment and RELIABILITY.md"]
// Every child is waited for, before the reopen or (with `early`) after it.
#[allow(clippy::zombie_processes)]
fn sled_kill9() {
    let mode = mode();
    let early = std::env::var("KEYHOLD_SLED_REOPEN").as_deref() == Ok("early");
    let cycles: u32 = std::env::var("KEYHOLD_SLED_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let keep = std::env::var_os("KEYHOLD_SLED_KEEP").map(PathBuf::from);
    // `auto` (with KEYHOLD_SLED_KILL_FROM=opening): 70–130 % of the median open so far,
    // where sled writes its snapshot.
    let auto = std::env::var("KEYHOLD_SLED_KILL_MS").as_deref() == Ok("auto");
    let parent_writes = std::env::var("KEYHOLD_SLED_PARENT_WRITES").as_deref() != Ok("0");
    let (kill_min, kill_max) = std::env::var("KEYHOLD_SLED_KILL_MS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((20u64, 250u64));
    assert!(kill_min <= kill_max, "KEYHOLD_SLED_KILL_MS: <min>-<max>");
    let from_opening = std::env::var("KEYHOLD_SLED_KILL_FROM").as_deref() == Ok("opening");
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut generation = 0;
    let mut store_path = dir.path().join(format!("store{generation}.sled"));
    let mut rng = Rng(u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut acked_total, mut lock_retries, mut no_open, mut lost) = (0u64, 0u64, 0u32, 0u32);
    let mut failures: Vec<String> = Vec::new();
    // Failures where the store held a snapshot file sled had not finished writing.
    let mut generating = 0u32;
    // Cycles where the child was killed before its open returned, and failures among them.
    let (mut killed_opening, mut failed_opening) = (0u32, 0u32);
    // How long the children's opens took (from "OPENING" to "OPEN" as the parent read them).
    let mut open_times: Vec<Duration> = Vec::new();
    let started = Instant::now();
    // Created by the parent, as the keyring's `initialize` does before the first cycle.
    drop(open(mode, &store_path).unwrap());
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .args([
                "sled_crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "-q",
            ])
            .arg("--test-threads=1")
            .env("KEYHOLD_SLED_CHILD", &store_path)
            .env("KEYHOLD_SLED_CYCLE", cycle.to_string())
            .env("KEYHOLD_SLED_MODE", format!("{mode:?}").to_lowercase())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (opening_tx, opening) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let (mut opened, mut last, mut began, mut took) = (false, None, None, None);
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if l == "OPENING" {
                    began = Some(Instant::now());
                    let _ = opening_tx.send(());
                }
                if l == "OPEN" {
                    opened = true;
                    took = began.map(|b| b.elapsed());
                }
                if let Some(n) = l.strip_prefix("ACK ").and_then(|n| n.parse::<u64>().ok()) {
                    last = Some(n);
                }
            }
            (opened, last, took)
        });
        if from_opening {
            // Count the delay from the moment the child starts opening the store.
            let _ = opening.recv_timeout(Duration::from_secs(10));
        }
        let delay_us = if auto {
            let mut sorted = open_times.clone();
            sorted.sort();
            let median = sorted
                .get(sorted.len() / 2)
                .map_or(90_000, |d| d.as_micros() as u64);
            median * 7 / 10 + rng.below(median * 6 / 10 + 1)
        } else {
            kill_min * 1000 + rng.below((kill_max - kill_min) * 1000 + 1)
        };
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().unwrap(); // SIGKILL
        let reopened = if early {
            // Reopen at once: the child may not be dead yet and still hold the lock.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match open(mode, &store_path) {
                    Err(e)
                        if (e.contains("could not acquire lock") || e.starts_with("Locked("))
                            && Instant::now() < deadline =>
                    {
                        lock_retries += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    other => break other,
                }
            }
        } else {
            child.wait().unwrap();
            open(mode, &store_path)
        };
        if early {
            child.wait().unwrap();
        }
        let (opened, last, took) = reader.join().unwrap();
        if let Some(t) = took {
            open_times.push(t);
        }
        if !opened {
            killed_opening += 1;
        }
        let acked = last.map_or(0, |l| l + 1);
        acked_total += acked;
        let problem = match reopened {
            Err(e) => {
                no_open += 1;
                Some(format!("cycle {cycle}: the store does not open: {e}"))
            }
            Ok(store) => {
                let lost_one = (0..acked)
                    .find_map(|i| check(&store, cycle, i, acked - 1).err())
                    .map(|e| {
                        lost += 1;
                        format!("cycle {cycle}: {e}")
                    });
                // As the e2e parent's keyring does: a write of its own, so that the next
                // child's open has log to recover and writes a new snapshot (else sled
                // writes it here, in the parent, which is never killed).
                if parent_writes && lost_one.is_none() {
                    let mut b = WriteBatch::new();
                    b.put(Table::Meta, b"parent", &cycle.to_be_bytes());
                    store.commit(&b).expect("parent write");
                }
                lost_one
            }
        };
        if let Some(p) = problem {
            let files = listing(&store_path);
            if files.contains(".generating") {
                generating += 1;
            }
            if !opened {
                failed_opening += 1;
            }
            let p = format!(
                "{p}; the child was killed {}; files: {files}",
                if opened {
                    "after its open returned"
                } else {
                    "while still opening the store"
                }
            );
            eprintln!("sled crash: {p} (after {acked} acknowledged batches this cycle)");
            if let Some(keep) = &keep {
                let to = keep.join(format!("{mode:?}-pid{}-cycle{cycle}", std::process::id()));
                copy_dir(&store_path, &to);
                eprintln!("sled crash: store kept in {}", to.display());
            }
            failures.push(p);
            generation += 1;
            store_path = dir.path().join(format!("store{generation}.sled"));
            drop(open(mode, &store_path).unwrap());
        }
        if (cycle + 1) % 100 == 0 {
            eprintln!(
                "sled crash: {mode:?}: {} cycles, {acked_total} batches acknowledged, {no_open} \
                 stores did not open, {lost} lost a batch ({generating} with a snap.*.generating \
                 file, {failed_opening} of the {killed_opening} cycles killed while opening), \
                 {lock_retries} lock retries, {:.0} s",
                cycle + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "sled crash: DONE mode={mode:?} reopen={} kill_ms={} from={} parent_writes={parent_writes} \
         cycles={cycles} acked={acked_total} no_open={no_open} lost={lost} generating={generating} \
         killed_opening={killed_opening} failed_opening={failed_opening} lock_retries={lock_retries} secs={:.0}",
        if early { "early" } else { "wait" },
        if auto { "auto".to_string() } else { format!("{kill_min}-{kill_max}") },
        if from_opening { "opening" } else { "spawn" },
        started.elapsed().as_secs_f64()
    );
    open_times.sort();
    if !open_times.is_empty() {
        let at = |q: usize| open_times[(open_times.len() - 1) * q / 100].as_secs_f64() * 1e3;
        eprintln!(
            "sled crash: the child's open took {:.1} / {:.1} / {:.1} ms (min / median / max)",
            at(0),
            at(50),
            at(100)
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
