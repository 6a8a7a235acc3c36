//! The kill -9 crash test: a child writes keys and acknowledges each only after the commit
//! returned; the parent kills it at random moments, reopens the store, and checks that
//! every acknowledged key is there and still unwraps its canary DEK.
//!
//! Engines: redb, sled (not in the default run: see `crash_sled`) and PostgreSQL (there the
//! database itself also crashes every fifth cycle). Cycles per engine:
//! `KEYHOLD_CRASH_CYCLES` (default 25 in CI; the documented long run uses 300 — see
//! kms-server/src/storage/STORAGE.md).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kms_client::api::{Context, KeyState};
use kms_server::access::policy::{Principal, Role};
use kms_server::crypto::seal::KeyFileSealer;
use kms_server::storage::Engine;
use rand::Rng;

struct Acked {
    wrapped: Vec<u8>,
    dek: Vec<u8>,
    cycle: u32,
    min_version: u32,
    disabled: bool,
    scheduled: bool,
    destroyed: bool,
    granted: bool,
    audited: bool,
    /// When the writer acknowledged its audit record (µs since the epoch).
    audited_at: u128,
}

/// Whether the writer destroys this key (`c<cycle>-k<i>` with `i % 7 == 6`).
fn doomed(name: &str) -> bool {
    name.rsplit_once("-k")
        .and_then(|(_, i)| i.parse::<u64>().ok())
        .is_some_and(|i| i % 7 == 6)
}

fn cycles() -> u32 {
    std::env::var("KEYHOLD_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25)
}

/// Checks `names` (all acknowledged). With `toggle_disabled`, a disabled key is enabled
/// for a moment so its canary can be unwrapped (two more commits per key: only at the end).
fn verify<'a>(
    engine: Engine,
    store_path: &Path,
    key_file: &Path,
    acked: &HashMap<String, Acked>,
    names: impl Iterator<Item = &'a String>,
    toggle_disabled: bool,
) -> usize {
    let ring = keyhold_tests::keyring_with_erasure(engine, store_path);
    let sealer = KeyFileSealer::new(key_file);
    ring.unseal(&sealer).expect("unseal after kill -9");
    let mut lost = 0;
    for name in names {
        let a = &acked[name];
        let info = match ring.key_info("crash", name) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("LOST {name}: {e}");
                lost += 1;
                continue;
            }
        };
        if a.destroyed {
            // Acknowledged destruction: it stays destroyed, with nothing left to unwrap.
            let who = Principal {
                identity: keyhold_tests::CRASH_WRITER.into(),
                tenant: "crash".into(),
                role: Role::App,
            };
            let ctx: Context = [("canary".to_string(), a.cycle.to_string())]
                .into_iter()
                .collect();
            if info.state != KeyState::Destroyed
                || !info.versions.is_empty()
                || ring
                    .lookups()
                    .and_then(|mut keys| keys.unwrap(&who, &a.wrapped, &ctx))
                    .is_ok()
            {
                eprintln!("LOST destruction of {name}: {info:?}");
                lost += 1;
            }
            continue;
        }
        let deleting = matches!(info.state, KeyState::PendingDeletion | KeyState::Destroyed);
        if a.scheduled && !deleting {
            eprintln!("LOST scheduled deletion of {name}: {info:?}");
            lost += 1;
            continue;
        }
        if deleting {
            // Scheduled (acknowledged or cut off before its line): nothing to unwrap; only
            // keys the writer destroys may be here.
            if !doomed(name) {
                eprintln!("UNEXPECTED deletion state of {name}: {info:?}");
                lost += 1;
            }
            continue;
        }
        let reader_granted = info
            .grants
            .iter()
            .any(|g| g.identity == keyhold_tests::CRASH_READER);
        if info.current_version < a.min_version
            || (a.disabled && info.state != KeyState::Disabled)
            || (a.granted && !reader_granted)
        {
            eprintln!("LOST update of {name}: {info:?}");
            lost += 1;
            continue;
        }
        if info.state == KeyState::Disabled {
            if !toggle_disabled {
                continue;
            }
            ring.set_enabled("crash", name, true).unwrap();
        }
        let ctx: Context = [("canary".to_string(), a.cycle.to_string())]
            .into_iter()
            .collect();
        let who = Principal {
            identity: keyhold_tests::CRASH_WRITER.into(),
            tenant: "crash".into(),
            role: Role::App,
        };
        match ring
            .lookups()
            .and_then(|mut keys| keys.unwrap(&who, &a.wrapped, &ctx))
        {
            Ok(u) if u.plaintext.expose_secret() == a.dek.as_slice() => {}
            _ => {
                eprintln!("LOST canary of {name}");
                lost += 1;
            }
        }
        if info.state == KeyState::Disabled {
            ring.set_enabled("crash", name, false).unwrap();
        }
    }
    lost
}

/// Reads the whole audit chain the writer appended to (through the server's own reader,
/// the head MAC checked under the master key), verifies it link by link, and counts the
/// acknowledged audit records that are missing (a broken chain counts as one loss more).
fn verify_audit(
    engine: Engine,
    store_path: &Path,
    key_file: &Path,
    acked: &HashMap<String, Acked>,
) -> (usize, Vec<String>) {
    let ring = std::sync::Arc::new(keyhold_tests::keyring_with_erasure(engine, store_path));
    ring.unseal(&KeyFileSealer::new(key_file)).expect("unseal");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    let log = kms_server::security::audit::AuditLog::start(
        ring.store().clone(),
        ring.clone(),
        &store_path.with_extension("audit"),
        &kms_server::security::audit::Sink::None,
        kms_server::security::alert::Alerter::start(&Default::default()),
        None,
    )
    .expect("the audit chain reopens after kill -9");
    let mut chain = kms_client::api::AuditChain::new();
    let mut warnings = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut lost = 0;
    let mut after = 0;
    loop {
        let page = log.read(&ring, after, 1000).unwrap();
        if page.head.mac_valid == Some(false) {
            eprintln!("AUDIT head MAC does not verify");
            lost += 1;
        }
        for r in &page.records {
            if let Err(e) = chain.push_with(r, &mut warnings) {
                eprintln!("AUDIT chain broken at {}: {e}", r.seq);
                lost += 1;
            }
            if r.operation == "CRASH append" {
                seen.extend(r.key.clone());
            }
            after = r.seq;
        }
        if page.records.is_empty() || after >= page.head.seq {
            break;
        }
    }
    log.close();
    let mut missing: Vec<String> = acked
        .iter()
        .filter(|(name, a)| a.audited && !seen.contains(*name))
        .map(|(name, _)| name.clone())
        .collect();
    missing.sort();
    (lost, missing)
}

/// The power-loss run (issue 25, must-show 6): LazyFS under the store, the audit chain, the
/// erasure file and the master key file (and, for PostgreSQL, its data directory); after
/// each kill the unsynced writes are dropped, as a power cut drops them.
struct PowerLoss<'a> {
    fs: &'a mut keyhold_tests::lazyfs::LazyFs,
    /// In bounded-lag mode: audit records acknowledged at most this long before the cut
    /// may be lost (the lag, plus the time a flush takes to start and finish).
    window: Option<Duration>,
    /// Audit records lost to the cuts, all within the window (any other loss fails).
    lost_in_window: usize,
    /// The oldest of them: how long before its cut it was acknowledged.
    oldest_lost: Duration,
    cuts: u32,
}

/// [`verify_audit`]'s verdict: a missing record is a loss, unless a power cut in
/// bounded-lag mode took it within the window (then it is counted there and forgotten, so
/// later checks do not count it again).
fn audit_verdict(
    engine: Engine,
    store_path: &Path,
    key_file: &Path,
    acked: &mut HashMap<String, Acked>,
    power: Option<&mut PowerLoss>,
    cut_at: u128,
) -> usize {
    let (mut lost, missing) = verify_audit(engine, store_path, key_file, acked);
    let window = power.as_ref().and_then(|p| p.window);
    let mut power = power;
    for name in missing {
        let a = acked.get_mut(&name).unwrap();
        let age = Duration::from_micros(cut_at.saturating_sub(a.audited_at) as u64);
        match (window, power.as_deref_mut()) {
            (Some(window), Some(p)) if age <= window => {
                p.lost_in_window += 1;
                p.oldest_lost = p.oldest_lost.max(age);
                a.audited = false;
            }
            _ => {
                eprintln!("LOST audit record of {name} (acknowledged {age:?} before the kill)");
                lost += 1;
            }
        }
    }
    lost
}

/// The test's own set-up files (the store's connection string, the token's name), on disk
/// before the first cut, as an operator's configuration is.
fn write_synced(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

fn micros_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// `db`: for PostgreSQL, the test's own server, which every fifth cycle crashes too.
/// With `token` (a SoftHSM token's label and PIN file; PostgreSQL only), the keys' erasure
/// keys live in the database under epoch keys in that token.
fn run_engine(
    engine: Engine,
    name: &str,
    db: Option<&keyhold_tests::pg::PrivateServer>,
    token: Option<(&str, &Path)>,
) {
    run_engine_with(engine, name, db, token, None, None);
}

/// [`run_engine`]; with `audit_lag_ms`, the writer's audit trail runs in bounded-lag mode
/// (`[audit] durability = "bounded-lag"`): its records are key uses, acknowledged once
/// written, not flushed. A kill -9 must still lose none of them (the page cache keeps
/// them; only a power loss may lose the last lag window).
fn run_engine_with(
    engine: Engine,
    name: &str,
    db: Option<&keyhold_tests::pg::PrivateServer>,
    token: Option<(&str, &Path)>,
    audit_lag_ms: Option<u64>,
    mut power: Option<&mut PowerLoss>,
) {
    let dir = match &power {
        Some(p) => tempfile::tempdir_in(p.fs.path()).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let store_path = dir.path().join(format!("store.{name}"));
    if let Some(db) = db {
        write_synced(&store_path, db.url().as_bytes());
    }
    if let Some((label, pin)) = token {
        write_synced(
            &store_path.with_extension("token"),
            format!(
                "{label}\n{}\n{}\n",
                pin.display(),
                keyhold_tests::softhsm::MODULE
            )
            .as_bytes(),
        );
    }
    let key_file = dir.path().join("master.key");
    KeyFileSealer::generate(&key_file).unwrap();
    {
        let ring = keyhold_tests::keyring_with_erasure(engine, &store_path);
        ring.initialize(&KeyFileSealer::new(&key_file)).unwrap();
    }
    let mut acked: HashMap<String, Acked> = HashMap::new();
    let mut rng = rand::thread_rng();
    let n = cycles();
    let mut total_lost = 0;
    for cycle in 0..n {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"));
        if let Some(lag) = audit_lag_ms {
            child.env("KEYHOLD_CRASH_AUDIT_LAG_MS", lag.to_string());
        }
        let mut child = child
            .arg(name)
            .arg(&store_path)
            .arg(&key_file)
            .arg(cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..250)));
        // PostgreSQL crashes with the node every fifth cycle (immediate stop: no
        // checkpoint, the WAL is replayed at the next start).
        // In bounded-lag mode the database does not crash: its asynchronous commits may
        // lose their last window to a crash of PostgreSQL by design (docs/operations.md);
        // what is checked is that a kill of the node loses nothing.
        let db_crash = db.filter(|_| cycle % 5 == 4 && audit_lag_ms.is_none() && power.is_none());
        if let Some(db) = db_crash {
            eprintln!("crash test: cycle {cycle}: PostgreSQL crashes too (the writer's panic on its lost connection is expected)");
            db.crash();
        }
        let cut_at = micros_now();
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        if let Some(db) = db_crash {
            db.start_again();
        }
        if let Some(p) = power.as_deref_mut() {
            // The power goes: the database with the node, then every unsynced write.
            if let Some(db) = db {
                db.crash();
            }
            p.fs.power_cut();
            p.cuts += 1;
            if let Some(db) = db {
                db.start_again();
            }
        }
        for line in reader.join().unwrap() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["ACK", key, w, d] => {
                    acked.insert(
                        key.to_string(),
                        Acked {
                            wrapped: B64.decode(w).unwrap(),
                            dek: B64.decode(d).unwrap(),
                            cycle,
                            min_version: 1,
                            disabled: false,
                            scheduled: false,
                            destroyed: false,
                            granted: false,
                            audited: false,
                            audited_at: 0,
                        },
                    );
                }
                ["ROT", key, v] => {
                    if let Some(a) = acked.get_mut(*key) {
                        a.min_version = v.parse().unwrap();
                    }
                }
                ["DIS", key] => {
                    if let Some(a) = acked.get_mut(*key) {
                        a.disabled = true;
                    }
                }
                ["SCH", key] => {
                    if let Some(a) = acked.get_mut(*key) {
                        a.scheduled = true;
                    }
                }
                ["DES", key] => {
                    if let Some(a) = acked.get_mut(*key) {
                        a.destroyed = true;
                    }
                }
                ["GRT", key] => {
                    if let Some(a) = acked.get_mut(*key) {
                        a.granted = true;
                    }
                }
                ["AUD", key, at] => {
                    if let Some(a) = acked.get_mut(*key) {
                        a.audited = true;
                        a.audited_at = at.parse().unwrap();
                    }
                }
                // A line cut by the kill was never acknowledged.
                _ => {}
            }
        }
        // Every key acknowledged in this cycle, plus a sample of older ones (all of them
        // are checked once more at the end).
        let mut names: Vec<&String> = acked
            .iter()
            .filter(|(_, a)| a.cycle == cycle)
            .map(|(n, _)| n)
            .collect();
        names.extend(acked.keys().filter(|_| rng.gen_ratio(1, 20)).take(50));
        total_lost += verify(
            engine,
            &store_path,
            &key_file,
            &acked,
            names.into_iter(),
            false,
        );
        if cycle % 10 == 9 || power.is_some() {
            total_lost += audit_verdict(
                engine,
                &store_path,
                &key_file,
                &mut acked,
                power.as_deref_mut(),
                cut_at,
            );
        }
        if (cycle + 1) % 50 == 0 {
            eprintln!(
                "crash test: engine={name} cycle {} acknowledged so far {}",
                cycle + 1,
                acked.len()
            );
        }
    }
    total_lost += verify(engine, &store_path, &key_file, &acked, acked.keys(), true);
    total_lost += audit_verdict(engine, &store_path, &key_file, &mut acked, None, 0);
    if token.is_some() {
        check_erasure_epochs(engine, &store_path, &key_file);
    }
    eprintln!(
        "crash test: engine={name} cycles={n} acknowledged_keys={} lost={total_lost}",
        acked.len()
    );
    if let Some(p) = power {
        eprintln!(
            "crash test: engine={name} power cuts={} audit lag={audit_lag_ms:?} ms: audit records lost within the window {} (window {:?}, the oldest acknowledged {:?} before its cut), audited keys kept {}",
            p.cuts,
            p.lost_in_window,
            p.window,
            p.oldest_lost,
            acked.values().filter(|a| a.audited).count()
        );
    }
    assert!(
        !acked.is_empty(),
        "the writer acknowledged nothing: the test proves nothing"
    );
    assert_eq!(total_lost, 0, "acknowledged writes were lost");
}

/// After the crash cycles: a sweep finishes any rotation a kill left pending; then no
/// retired epoch keeps its token key, every key not destroyed has its erasure key (and it
/// opens), and no destroyed key has one. (Rows of keys a kill cut off before their record
/// committed stay unused.)
fn check_erasure_epochs(engine: Engine, store_path: &Path, key_file: &Path) {
    let ring = keyhold_tests::keyring_with_erasure(engine, store_path);
    ring.unseal(&KeyFileSealer::new(key_file)).expect("unseal");
    ring.destroy_due(8 * 86_400).expect("a sweep");
    let shared = ring.shared_erasure().expect("erasure keys in the database");
    let status = shared.status().unwrap();
    assert!(!status.rotation_pending, "{status:?}");
    assert!(status.retained_epochs.is_empty(), "{status:?}");
    let mut live = 0;
    for (_, bytes) in ring
        .store()
        .scan_prefix(kms_server::storage::Table::Keys, b"")
        .unwrap()
    {
        let record: kms_server::keyring::KeyRecord = serde_json::from_slice(&bytes).unwrap();
        let slot = record
            .shared_erasure_slot
            .expect("every key has an erasure key row");
        let row = shared.get(slot).unwrap();
        if record.state == KeyState::Destroyed {
            assert!(
                row.is_none(),
                "{}: destroyed, yet its erasure key remains",
                record.name
            );
        } else {
            assert!(row.is_some(), "{}: its erasure key is gone", record.name);
            live += 1;
        }
    }
    eprintln!(
        "crash test: erasure epochs: at epoch {}, {live} erasure keys for {live} keys not destroyed",
        status.epoch
    );
}

#[test]
fn crash_redb() {
    run_engine(Engine::Redb, "redb", None, None);
}

/// Issue 25: the audit trail in bounded-lag mode under kill -9: 0 acknowledged records
/// lost (a lag of a second, so nearly every kill lands before the flush).
#[test]
fn crash_redb_bounded_lag_audit() {
    run_engine_with(Engine::Redb, "redb", None, None, Some(1000), None);
}

/// Not in the default run: sled 0.34.7 itself can leave a store that no longer opens after
/// a kill -9 (a kill while sled writes its snapshot on reopening; `RELIABILITY.md`, "sled
/// under kill -9"), so this test fails now and then for a reason that is not Keyhold's,
/// and `cargo test --workspace` must not be flaky. Run it as the reliability run:
/// `KEYHOLD_CRASH_CYCLES=300 cargo test -p keyhold-tests --test e2e crash_sled -- --ignored --nocapture`
/// (the cheaper sled-only run is `kms-server/tests/sled_crash.rs`).
#[test]
#[ignore = "sled 0.34.7 can lose a store under kill -9 (RELIABILITY.md); run by hand"]
fn crash_sled() {
    run_engine(Engine::Sled, "sled", None, None);
}

/// The same on a PostgreSQL store (issue 10): the node is killed every cycle, and every
/// fifth cycle PostgreSQL crashes with it.
#[test]
fn crash_postgres() {
    if !keyhold_tests::pg::available("crash_postgres") {
        return;
    }
    let db = keyhold_tests::pg::PrivateServer::start();
    run_engine(Engine::Postgres, "postgres", Some(&db), None);
}

/// Issue 25: the audit trail in bounded-lag mode on PostgreSQL (key-use batches committed
/// with `synchronous_commit = off`): a kill -9 of the node loses no acknowledged record.
#[test]
fn crash_postgres_bounded_lag_audit() {
    if !keyhold_tests::pg::available("crash_postgres_bounded_lag_audit") {
        return;
    }
    let db = keyhold_tests::pg::PrivateServer::start();
    run_engine_with(
        Engine::Postgres,
        "postgres",
        Some(&db),
        None,
        Some(1000),
        None,
    );
}

/// The same with erasure keys in the database under epoch keys in a SoftHSM token
/// (`kms_server::storage::erasure::shared`): every key gets its erasure key row before its record,
/// every destruction deletes the row and re-seals the rest under a new epoch, and the old
/// epoch's token key is destroyed at once (no retention), all under kill -9 and database
/// crashes. At the end: no rotation left pending once a sweep has run, an erasure key for
/// every key not destroyed and none for a destroyed one, no token key left for a retired
/// epoch.
///
/// Not in the default run: SoftHSM keeps its token in files that the *client* process
/// writes, so a writer killed while SoftHSM rewrites them can leave the token unreadable
/// (seen: "no token labelled ..."), which says nothing about Keyhold; a real HSM is not
/// killed with its client. p11-kit's server would keep the token in a process of its own,
/// but Debian's p11-kit 0.24 cannot forward AES-GCM parameters. Run it with
/// `KEYHOLD_CRASH_CYCLES=100 cargo test -p keyhold-tests --test e2e crash_postgres_hsm -- --ignored`
/// (`RELIABILITY.md` has the results).
#[test]
#[ignore = "SoftHSM's file token can be corrupted when its client is killed; run by hand"]
fn crash_postgres_hsm() {
    if !keyhold_tests::pg::available("crash_postgres_hsm") {
        return;
    }
    let tokens = tempfile::tempdir().unwrap();
    let hsm =
        keyhold_tests::softhsm::SoftHsm::new(tokens.path(), "keyhold-crash", "crash-pin-1234");
    // This process opens the token too (to check what the writers left); no other test in
    // it uses PKCS#11 in process, and its children get the variable.
    std::env::set_var(hsm.env().0, hsm.env().1);
    let pin = tokens.path().join("pin");
    std::fs::write(&pin, &hsm.pin).unwrap();
    let db = keyhold_tests::pg::PrivateServer::start();
    run_engine(
        Engine::Postgres,
        "postgres-hsm",
        Some(&db),
        Some((&hsm.token_label, &pin)),
    );
    kms_server::crypto::seal::pkcs11_finalize();
}

/// Time a bounded-lag flush may take to start and finish past the lag (the writer runs at
/// nice +10, and a flush on LazyFS writes through FUSE); the run prints the oldest record a
/// cut actually took, which is the figure RELIABILITY.md records.
const FLUSH_SLACK: Duration = Duration::from_millis(250);

/// The power-loss run (issue 25, must-show 6) on `engine`: LazyFS under every file the
/// node writes (for PostgreSQL, under its data directory too), a power cut after every
/// kill. Per request (`lag` None): nothing acknowledged is lost. Bounded lag: key changes
/// lose nothing, and audit records only within the lag window (PostgreSQL: three times its
/// `wal_writer_delay`, 600 ms by default, docs/operations.md).
fn power_loss(engine: Engine, name: &str, lag: Option<u64>) {
    assert!(
        keyhold_tests::lazyfs::binary().is_some(),
        "set KEYHOLD_LAZYFS to a lazyfs binary (RELIABILITY.md, \"Power loss\")"
    );
    let mut fs = keyhold_tests::lazyfs::LazyFs::mount();
    let db = (engine == Engine::Postgres)
        .then(|| keyhold_tests::pg::PrivateServer::start_in(&fs.path().join("pgdata")));
    let window = lag.map(|ms| match engine {
        Engine::Postgres => Duration::from_millis(600) + FLUSH_SLACK,
        _ => Duration::from_millis(ms) + FLUSH_SLACK,
    });
    let mut power = PowerLoss {
        fs: &mut fs,
        window,
        lost_in_window: 0,
        oldest_lost: Duration::ZERO,
        cuts: 0,
    };
    run_engine_with(engine, name, db.as_ref(), None, lag, Some(&mut power));
    drop(db);
}

#[test]
#[ignore = "needs LazyFS: KEYHOLD_LAZYFS=<lazyfs binary> (RELIABILITY.md, \"Power loss\")"]
fn power_loss_redb() {
    power_loss(Engine::Redb, "redb", None);
}

#[test]
#[ignore = "needs LazyFS: KEYHOLD_LAZYFS=<lazyfs binary> (RELIABILITY.md, \"Power loss\")"]
fn power_loss_redb_bounded_lag_audit() {
    power_loss(Engine::Redb, "redb", Some(10));
}

#[test]
#[ignore = "needs LazyFS: KEYHOLD_LAZYFS=<lazyfs binary> (RELIABILITY.md, \"Power loss\")"]
fn power_loss_postgres() {
    power_loss(Engine::Postgres, "postgres", None);
}

#[test]
#[ignore = "needs LazyFS: KEYHOLD_LAZYFS=<lazyfs binary> (RELIABILITY.md, \"Power loss\")"]
fn power_loss_postgres_bounded_lag_audit() {
    power_loss(Engine::Postgres, "postgres", Some(10));
}
