//! The keyring: KEKs and their versions, the master key, and the key operations.
//!
//! Everything here is tenant-scoped: a caller names keys within its tenant, and another
//! tenant's key behaves exactly like a missing one (`NotFound` by name, `DecryptFailed` by
//! wrapped DEK). Authorization (roles, grants) happens before these calls, in
//! [`crate::access::policy`]; the keyring enforces key state and tenancy.
//!
//! Records at rest (JSON in the [`KeyStore`] tables):
//! - `keys[id]` — [`KeyRecord`]: name, tenant, algorithm, state, current version, ...
//! - `key_names[tenant ‖ 0 ‖ name]` — the id.
//! - `versions[id ‖ version]` — one record per version: creation time and the material
//!   sealed under the master key with AAD (tenant, id, version), so a record moved to
//!   another key, tenant or version, or rolled back to another key's, fails to open.
//!   Rotation writes one new version record and updates the key record: its cost does not
//!   grow with the number of versions.
//!
//! Decrypted KEK material is cached in memory while unsealed and wiped on `seal`.
//!
//! The files, one concept each:
//! - `mod.rs` — [`Keyring`] and its builders.
//! - `records.rs` — the stored records, table-key encodings, name and grant checks.
//! - `epoch.rs` — the master key's epoch: the store condition that keeps every sealing
//!   write on the current master key, on one node or many.
//! - `integrity.rs` — authenticated authorization state: the MAC every key record carries.
//! - `vault.rs` — the master key: initialize, unseal/seal, master-key rotation, the audit
//!   keys, the sealing of KEK versions, the self-test.
//! - `cache.rs` — decrypted keys in memory: loading, bound, invalidation, freshness.
//! - `admin.rs` — key lifecycle: create, rotate, state changes, grants, public key.
//! - `sweeps.rs` — usage flush, min_decrypt_version dry run, due rotations, destruction.
//! - `restore.rs` — backup export under the lock, restore verification and install.
//! - `lookups.rs` — the data plane, [`Lookups`]: the only entry for datakey, wrap, unwrap,
//!   rewrap and the adapters' operations (`keyring.lookups()?.datakey(...)`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use crate::base::error::Error;
use crate::crypto::format::KeyId;
use crate::storage::KeyStore;

/// See [`Keyring::on_integrity_event`].
pub type IntegrityHook = Box<dyn Fn(crate::base::event::AlertKind, String) + Send + Sync>;
/// See [`Keyring::on_unseal`].
pub type UnsealHook = Box<dyn Fn() + Send + Sync>;

mod admin;
pub mod backup;
mod cache;
mod epoch;
mod integrity;
mod lookups;
mod records;
mod restore;
mod sweeps;
mod vault;

pub use admin::{Clearance, MAX_SECRET_DATA};
pub use lookups::{DataKey, DetachedCiphertext, KeyUse, Lookups, Unwrapped, Wrapped, DATAKEY_LEN};
pub use records::{
    validate_grants, validate_name, KeyRecord, Lifecycle, DELETION_WINDOW_DAYS, MAX_GRANTS,
    MAX_IDENTITY_LEN, MAX_NAME_LEN,
};

pub(crate) use epoch::META_MASTER_EPOCH;
pub(crate) use integrity::META_RECORDS_MARKER;
pub(crate) use records::{META_AUDIT_KEYS, META_SEALED_MASTER};

use cache::Freshness;
use vault::Unsealed;

/// Default of [`Keyring::with_cache_limit`] (`[keys] cache_keys`): with one version a
/// cached key takes about 1 KiB, so 100 000 keys stay near 100 MiB.
pub const DEFAULT_CACHE_KEYS: usize = 100_000;

/// The keyring over one store.
pub struct Keyring {
    store: Arc<dyn KeyStore>,
    clock: crate::base::clock::Clock,
    /// Per-key erasure keys (`None`: keys are sealed under the master key alone, as in
    /// stores of earlier versions and in tools that open a store without it).
    erasure: Option<Arc<crate::storage::erasure::ErasureFile>>,
    /// Erasure keys in the shared store's table under HSM-rooted epoch keys: new keys get
    /// theirs there.
    shared_erasure: Option<crate::storage::erasure::SharedErasure>,
    /// Whether new keys get an erasure key (off on a store shared by several nodes: the
    /// erasure file is local to one node).
    new_erasure_keys: bool,
    /// On a shared store: when the node last confirmed its cache against the store's
    /// change feed (milliseconds on [`Keyring::freshness_clock`]), and how old that may
    /// be before key use fails closed. `None`: the store has no other writer.
    freshness: Option<Freshness>,
    /// Bumped by every invalidation and every local commit of a key record (see
    /// `load_entry`).
    invalidations: std::sync::atomic::AtomicU64,
    /// Cold loads in flight, one per key (see `load_entry`).
    flights: Mutex<HashMap<KeyId, Arc<Mutex<()>>>>,
    /// Called with integrity events (a version that does not open, a record that fails
    /// authentication): the server raises an alert and counts them.
    integrity_hook: std::sync::OnceLock<IntegrityHook>,
    /// The exfiltration brake, charged by every unwrap (`access::brake`), if enabled.
    brake: std::sync::OnceLock<Arc<crate::access::brake::Brake>>,
    /// Called after each unseal (see [`Keyring::on_unseal`]).
    unseal_hooks: Mutex<Vec<UnsealHook>>,
    /// Set when a request found the store's master key newer than this node's.
    master_behind: std::sync::atomic::AtomicBool,
    unsealed: RwLock<Option<Arc<Unsealed>>>,
    /// Serializes this process's mutations (the store's conditions guard against others).
    write_lock: Mutex<()>,
    /// Most keys in the cache.
    cache_limit: usize,
}

impl Keyring {
    /// A sealed keyring over `store`, on the system clock.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self::with_clock(store, crate::base::clock::Clock::system())
    }

    /// A sealed keyring over `store`, reading time from `clock` (creation times, rotation
    /// and deletion deadlines).
    pub fn with_clock(store: Arc<dyn KeyStore>, clock: crate::base::clock::Clock) -> Self {
        Self {
            clock,
            erasure: None,
            shared_erasure: None,
            new_erasure_keys: true,
            freshness: None,
            invalidations: std::sync::atomic::AtomicU64::new(0),
            flights: Mutex::new(HashMap::new()),
            integrity_hook: std::sync::OnceLock::new(),
            brake: std::sync::OnceLock::new(),
            unseal_hooks: Mutex::new(Vec::new()),
            master_behind: std::sync::atomic::AtomicBool::new(false),
            store,
            unsealed: RwLock::new(None),
            write_lock: Mutex::new(()),
            cache_limit: DEFAULT_CACHE_KEYS,
        }
    }

    /// Gives new keys an erasure key in `erasure` ([`crate::storage::erasure`]): their versions are
    /// sealed under the master key bound to it, and destruction erases it.
    pub fn with_erasure(mut self, erasure: Arc<crate::storage::erasure::ErasureFile>) -> Self {
        self.erasure = Some(erasure);
        self
    }

    /// New keys get their erasure key in the shared store's erasure table
    /// ([`crate::storage::erasure::shared`]) rather than in the local file.
    pub fn with_shared_erasure(mut self, shared: crate::storage::erasure::SharedErasure) -> Self {
        self.shared_erasure = Some(shared);
        self
    }

    /// The shared store's erasure keys, when this keyring has them.
    pub fn shared_erasure(&self) -> Option<&crate::storage::erasure::SharedErasure> {
        self.shared_erasure.as_ref()
    }

    /// New keys get no erasure key (keys that have one still open while the file is
    /// there): for a store several nodes share, where a local erasure file would make a
    /// key unreadable on every other node.
    pub fn without_new_erasure_keys(mut self) -> Self {
        self.new_erasure_keys = false;
        self
    }

    /// Keeps at most `keys` keys decrypted in memory (at least 1).
    pub fn with_cache_limit(mut self, keys: usize) -> Self {
        self.cache_limit = keys.max(1);
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The clock it reads time from.
    pub fn clock(&self) -> &crate::base::clock::Clock {
        &self.clock
    }

    /// Sets what is called with each integrity event: its kind (`version_unreadable`,
    /// `record_tampered`) and a detail naming the record (never key material). Once.
    pub fn on_integrity_event(&self, hook: IntegrityHook) {
        let _ = self.integrity_hook.set(hook);
    }

    /// Charges every later unwrap, by any protocol, to `brake` before the key opens it
    /// (set once, at start); the brake reads the keyring's clock.
    pub fn set_brake(&self, brake: crate::access::brake::Brake) {
        let _ = self
            .brake
            .set(Arc::new(brake.with_clock(self.clock.clone())));
    }

    /// The exfiltration brake, if enabled.
    pub fn brake(&self) -> Option<&Arc<crate::access::brake::Brake>> {
        self.brake.get()
    }

    /// Runs `hook` after every later unseal (not after following another node's master
    /// rotation: the keys derived from the audit keys stay the same). The server checks
    /// and signs the authorization state kept outside the keyring then.
    pub fn on_unseal(&self, hook: UnsealHook) {
        self.unseal_hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(hook);
    }

    fn unsealed_now(&self) {
        let hooks = self
            .unseal_hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for hook in hooks.iter() {
            hook();
        }
    }

    fn integrity_event(&self, kind: crate::base::event::AlertKind, detail: String) {
        if let Some(hook) = self.integrity_hook.get() {
            hook(kind, detail);
        }
    }

    /// This node's write lock, then the unsealed state: every writer takes both in this
    /// order, so none holds a master key that a rotation (which takes the lock first)
    /// has retired.
    fn writer(&self) -> Result<(MutexGuard<'_, ()>, Arc<Unsealed>), Error> {
        let guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok((guard, self.unsealed()?))
    }
}

/// What the unit tests of every file here share.
#[cfg(test)]
mod testing {
    use kms_client::api::{Context, Grant, GrantOperation};

    use super::*;
    use crate::access::policy::Principal;
    use crate::crypto::seal::KeyFileSealer;
    use crate::storage::RedbStore;

    pub(super) fn setup() -> (tempfile::TempDir, Keyring, KeyFileSealer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let kf = dir.path().join("m.key");
        KeyFileSealer::generate(&kf).unwrap();
        let sealer = KeyFileSealer::new(kf);
        let ring = Keyring::new(store);
        ring.initialize(&sealer).unwrap();
        (dir, ring, sealer)
    }

    pub(super) fn who(tenant: &str) -> Principal {
        Principal {
            identity: "app".into(),
            tenant: tenant.into(),
            role: crate::access::policy::Role::App,
        }
    }

    pub(super) fn all_grant() -> Vec<Grant> {
        vec![Grant::new("app", &GrantOperation::ALL)]
    }

    pub(super) fn ctx(k: &str, v: &str) -> Context {
        [(k.to_string(), v.to_string())].into_iter().collect()
    }
}
