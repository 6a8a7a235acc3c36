//! Races on key state, each forced into its losing interleaving with fail points and
//! barriers (no sleeps): master-key rotation against key creation, rotation and backups;
//! a cold cache load against a disable; two nodes on one store when one rotates the master
//! key. Each test failed on the code before the fix it names (issue 21).
//!
//! Its own test binary: fail points are process-wide, so the tests take one lock.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};

use kms_client::api::{Algorithm, Context, Grant, GrantOperation, KeyState};
use kms_server::access::policy::{Principal, Role};
use kms_server::base::error::Error;
use kms_server::crypto::seal::KeyFileSealer;
use kms_server::keyring::Keyring;
use kms_server::storage::{KeyStore, RedbStore};

/// One test at a time touches the fail points.
static FAULTS: Mutex<()> = Mutex::new(());

const APP: &str = "spiffe://test/races/app";

fn app() -> Principal {
    Principal {
        identity: APP.into(),
        tenant: "t".into(),
        role: Role::App,
    }
}

fn ctx() -> Context {
    [("doc".to_string(), "1".to_string())].into()
}

fn grants() -> Vec<Grant> {
    vec![Grant::new(APP, &GrantOperation::ALL)]
}

/// A store with an initialized, unsealed keyring over it.
struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<dyn KeyStore>,
    sealer: KeyFileSealer,
}

impl Fixture {
    fn new() -> (Self, Arc<Keyring>) {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("master.key");
        KeyFileSealer::generate(&key_file).unwrap();
        let sealer = KeyFileSealer::new(&key_file);
        let store: Arc<dyn KeyStore> = Arc::new(RedbStore::open(&dir.path().join("s")).unwrap());
        let ring = Arc::new(Keyring::new(store.clone()));
        ring.initialize(&sealer).unwrap();
        ring.unseal(&sealer).unwrap();
        (Self { dir, store, sealer }, ring)
    }

    /// Another keyring over the same store, unsealed: a second node.
    fn node(&self) -> Arc<Keyring> {
        let ring = Arc::new(Keyring::new(self.store.clone()));
        ring.unseal(&self.sealer).unwrap();
        ring
    }

    /// Every key of tenant `t` opens under a fresh unseal (as after a restart), and each
    /// of `deks` unwraps to its bytes.
    fn assert_nothing_lost(&self, deks: &[(Vec<u8>, Vec<u8>)]) {
        let ring = self.node();
        let keys = ring
            .list_keys("t")
            .expect("every key opens after a restart");
        for k in &keys {
            ring.key_info("t", &k.name).unwrap();
        }
        let mut lookups = ring.lookups().unwrap();
        for (wrapped, dek) in deks {
            let got = lookups.unwrap(&app(), wrapped, &ctx()).unwrap();
            assert_eq!(got.plaintext.expose_secret(), &dek[..]);
        }
        drop(lookups);
        // And the master key rotates again (no version left under a retired master).
        ring.rotate_master(&self.sealer).unwrap();
    }
}

/// A fail point that stops its first caller until the test lets it go: `reached` is
/// waited by both the caller and the test, then `release`.
fn pause_first(name: &'static str) -> (Arc<Barrier>, Arc<Barrier>) {
    let reached = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, l) = (reached.clone(), release.clone());
    fail::cfg_callback(name, move || {
        if hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            r.wait();
            l.wait();
        }
    })
    .unwrap();
    (reached, release)
}

fn datakey(ring: &Keyring, name: &str) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let dk = ring.lookups()?.datakey(&app(), name, &ctx())?;
    Ok((dk.wrapped, dk.plaintext.expose_secret().to_vec()))
}

/// Issue 21, finding 2: `create_key` took the unsealed state before the write lock, so a
/// key created while `rotate-master` ran was sealed under the retired master key.
#[test]
fn a_key_created_during_master_rotation_is_sealed_under_the_new_master() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, ring) = Fixture::new();
    let (reached, release) = pause_first("keyring-create-before-lock");
    let creator = {
        let ring = ring.clone();
        std::thread::spawn(move || {
            ring.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
                .map(|_| ())
        })
    };
    reached.wait();
    ring.rotate_master(&fx.sealer).unwrap();
    fail::remove("keyring-create-before-lock");
    release.wait();
    creator.join().unwrap().unwrap();
    let dk = datakey(&ring, "k").unwrap();
    ring.list_keys("t").expect("the tenant's keys still list");
    ring.rotate_master(&fx.sealer)
        .expect("rotate-master still works");
    fx.assert_nothing_lost(&[dk]);
}

/// Issue 21, finding 4: a backup waiting on the lock while `rotate-master` ran carried a
/// payload sealed under the old master key beside the new sealed master key.
#[test]
fn a_backup_taken_during_master_rotation_restores() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, ring) = Fixture::new();
    ring.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    let dk = datakey(&ring, "k").unwrap();
    let (reached, release) = pause_first("keyring-backup-before-lock");
    let exporter = {
        let ring = ring.clone();
        std::thread::spawn(move || kms_server::keyring::backup::export(&ring))
    };
    reached.wait();
    ring.rotate_master(&fx.sealer).unwrap();
    fail::remove("keyring-backup-before-lock");
    release.wait();
    let backup = exporter.join().unwrap().expect("a backup is answered");
    // It restores into a fresh store and every version opens there.
    let target = fx.dir.path().join("restored");
    let store: Arc<dyn KeyStore> = Arc::new(RedbStore::open(&target).unwrap());
    let restored = Keyring::new(store);
    kms_server::keyring::backup::restore(
        &restored,
        &fx.sealer,
        &backup,
        &fx.dir.path().join("restored.erasure"),
    )
    .expect("the backup restores");
    restored.unseal(&fx.sealer).unwrap();
    let got = restored
        .lookups()
        .unwrap()
        .unwrap(&app(), &dk.0, &ctx())
        .unwrap();
    assert_eq!(got.plaintext.expose_secret(), &dk.1[..]);
}

/// Issue 21, finding 3: a cold load that read the key record before a disable put the old
/// entry back into the cache after it: the disable was acknowledged and not applied.
#[test]
fn a_cold_load_never_puts_back_a_key_older_than_a_disable() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, ring) = Fixture::new();
    ring.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    // As in the incident sequence: seal, unseal (the cache is empty), then disable while
    // a key use loads the key.
    ring.seal();
    ring.unseal(&fx.sealer).unwrap();
    let (reached, release) = pause_first("keyring-load-before-put");
    // The disable either commits (the old code) or waits for the paused load (one load
    // of a key at a time): either way, the paused load may go on then.
    let (tx, rx) = mpsc::channel::<&'static str>();
    for (name, what) in [
        ("keyring-update-committed", "committed"),
        ("keyring-load-wait", "waiting"),
    ] {
        let tx = Mutex::new(tx.clone());
        fail::cfg_callback(name, move || {
            let _ = tx.lock().unwrap().send(what);
        })
        .unwrap();
    }
    let user = {
        let ring = ring.clone();
        std::thread::spawn(move || datakey(&ring, "k").map(|_| ()))
    };
    reached.wait();
    let disabler = {
        let ring = ring.clone();
        std::thread::spawn(move || ring.set_enabled("t", "k", false))
    };
    let seen = rx.recv().unwrap();
    release.wait();
    let _ = user.join().unwrap();
    let info = disabler.join().unwrap().unwrap();
    assert_eq!(info.state, KeyState::Disabled);
    for name in [
        "keyring-load-before-put",
        "keyring-update-committed",
        "keyring-load-wait",
    ] {
        fail::remove(name);
    }
    assert_eq!(
        ring.key_info("t", "k").unwrap().state,
        KeyState::Disabled,
        "the disable (acknowledged after the load was {seen}) is what the cache holds"
    );
    assert!(
        matches!(datakey(&ring, "k"), Err(Error::KeyDisabled(_))),
        "a disabled key serves no datakey"
    );
}

/// Issue 21, finding 1 (in process): two nodes on one store; one rotates the master key,
/// the other still holds the old one in memory. Its writes must not commit under the
/// retired master key; once it follows the new master key, they succeed; nothing is lost.
#[test]
fn a_node_behind_a_master_rotation_writes_nothing_under_the_old_master() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, one) = Fixture::new();
    let two = fx.node();
    one.create_key("t", "old", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    one.rotate_master(&fx.sealer).unwrap();
    // Node two has not followed yet: creating and rotating are refused, nothing written.
    let created = two.create_key("t", "k", Algorithm::Aes256Gcm, None, grants());
    assert!(
        matches!(created, Err(Error::MasterKeyChanged)),
        "{:?}",
        created.map(|i| i.name)
    );
    let rotated = two.rotate("t", "old");
    assert!(matches!(rotated, Err(Error::MasterKeyChanged)));
    assert!(matches!(one.key_info("t", "k"), Err(Error::NotFound)));
    // It follows (as its change follower does) and then writes.
    two.follow_master(&fx.sealer).unwrap();
    two.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    two.rotate("t", "old").unwrap();
    let dks = vec![datakey(&two, "k").unwrap(), datakey(&two, "old").unwrap()];
    // Node one reads what node two wrote, once its change feed says the keys changed
    // (the server's follower calls this).
    one.invalidate_all();
    let mut lookups = one.lookups().unwrap();
    for (wrapped, dek) in &dks {
        let got = lookups.unwrap(&app(), wrapped, &ctx()).unwrap();
        assert_eq!(got.plaintext.expose_secret(), &dek[..]);
    }
    drop(lookups);
    fx.assert_nothing_lost(&dks);
}

/// Issue 21, finding 1 (the other order): a node's rotation sealed its new version and
/// commits just after another node's master rotation scanned the versions. The rotation
/// must be refused (it would commit a version under the retired master key).
#[test]
fn a_rotation_sealed_before_a_master_rotation_does_not_commit_after_it() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, one) = Fixture::new();
    let two = fx.node();
    one.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    let (reached, release) = pause_first("keyring-rotate-before-commit");
    let rotator = {
        let two = two.clone();
        std::thread::spawn(move || two.rotate("t", "k").map(|i| i.current_version))
    };
    reached.wait();
    one.rotate_master(&fx.sealer).unwrap();
    fail::remove("keyring-rotate-before-commit");
    release.wait();
    let rotated = rotator.join().unwrap();
    assert!(
        matches!(rotated, Err(Error::MasterKeyChanged)),
        "a version sealed under the retired master key was committed: {rotated:?}"
    );
    fx.assert_nothing_lost(&[datakey(&one, "k").unwrap()]);
}

/// The reverse: a master rotation scanned the versions, then another node added one. The
/// master rotation must not commit and leave that version under the retired master key.
#[test]
fn a_master_rotation_does_not_commit_over_a_version_added_after_its_scan() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, one) = Fixture::new();
    let two = fx.node();
    one.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    let (reached, release) = pause_first("keyring-rotate-master-before-commit");
    let master = {
        let one = one.clone();
        let key_file = fx.dir.path().join("master.key");
        std::thread::spawn(move || one.rotate_master(&KeyFileSealer::new(key_file)))
    };
    reached.wait();
    two.rotate("t", "k").unwrap();
    two.create_key("t", "k2", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    let dks = vec![datakey(&two, "k").unwrap(), datakey(&two, "k2").unwrap()];
    fail::remove("keyring-rotate-master-before-commit");
    release.wait();
    // Refused (try again) or committed with every version: never a version left behind.
    let _ = master.join().unwrap();
    fx.assert_nothing_lost(&dks);
}

/// Found by the history checker (three nodes on PostgreSQL, run 10 of the ten-run
/// attempt: a node answered 503 Sealed for 3 s that nobody had sealed). A node following
/// a master rotation opened the new master key, then read the audit keys apart: a second
/// rotation committed between the two reads left it audit keys sealed under a newer master
/// key, which failed authentication, and the server sealed the node. Master key, audit
/// keys and epoch must be read as one state (read again when a rotation came between).
#[test]
fn a_node_following_a_master_rotation_survives_a_second_rotation_meanwhile() {
    let _one = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, one) = Fixture::new();
    let two = fx.node();
    one.create_key("t", "k", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    let dk = datakey(&one, "k").unwrap();
    one.rotate_master(&fx.sealer).unwrap();
    let (reached, release) = pause_first("keyring-follow-master-opened");
    let follower = {
        let (two, sealer) = (
            two.clone(),
            KeyFileSealer::new(fx.dir.path().join("master.key")),
        );
        std::thread::spawn(move || two.follow_master(&sealer))
    };
    reached.wait();
    one.rotate_master(&fx.sealer).unwrap();
    fail::remove("keyring-follow-master-opened");
    release.wait();
    let followed = follower.join().unwrap();
    assert!(matches!(followed, Ok(true)), "{followed:?}");
    // Node two is on the newest master key: it writes, and what it writes opens.
    two.follow_master(&fx.sealer).unwrap();
    assert_eq!(two.master_epoch(), one.master_epoch());
    two.create_key("t", "k2", Algorithm::Aes256Gcm, None, grants())
        .unwrap();
    let dks = vec![dk, datakey(&two, "k2").unwrap()];
    fx.assert_nothing_lost(&dks);
}
