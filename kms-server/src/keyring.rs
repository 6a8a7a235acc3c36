//! The keyring: KEKs and their versions, the master key, and the key operations.
//!
//! Everything here is tenant-scoped: a caller names keys within its tenant, and another
//! tenant's key behaves exactly like a missing one (`NotFound` by name, `DecryptFailed` by
//! wrapped DEK). Authorization (roles, grants) happens before these calls, in
//! [`crate::policy`]; the keyring enforces key state and tenancy.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use kms_client::api::{
    Algorithm, Context, Grant, GrantOperation, KeyInfo, KeyState, KeyVersionInfo,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto;
use crate::error::Error;
use crate::format::{self, Header, KeyId};
use crate::keystore::{KeyStore, StoreError, Table, WriteBatch};
use crate::policy::Principal;
use crate::seal::{SealMethod, SealedMasterKey, Sealer};
use crate::secret::{SecretKey, SecretVec};

const META_SEALED_MASTER: &[u8] = b"sealed-master-key";
const META_FORMAT: &[u8] = b"store-format";
/// The audit keys (head MAC key ‖ context-hash key), sealed under the master key. Absent
/// until the first master-key rotation: until then they are derived from the master key.
/// Rotation keeps their value and stores it sealed under the new master key in the same
/// transaction, so the audit chain's head MAC and context hashes survive the rotation
/// (and a crash right after it).
const META_AUDIT_KEYS: &[u8] = b"audit/keys/v1";
const AUDIT_KEYS_LABEL: &[u8] = b"keyhold/audit-keys/v1";
const STORE_FORMAT: &[u8] = b"1";
const KEK_LABEL: &[u8] = b"keyhold/kek-version/v1";
const ERASURE_LABEL: &[u8] = b"keyhold/kek-erasure/v1";
/// Length of a generated DEK.
pub const DATAKEY_LEN: usize = 32;
/// Longest key name.
pub const MAX_NAME_LEN: usize = 128;
/// Most grants on one key.
pub const MAX_GRANTS: usize = 100;
/// Longest grantee identity.
pub const MAX_IDENTITY_LEN: usize = 1024;
/// The deletion window, in days (as AWS KMS).
pub const DELETION_WINDOW_DAYS: std::ops::RangeInclusive<u32> = 7..=30;

/// A KEK as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Hex id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Name within the tenant.
    pub name: String,
    /// Algorithm.
    pub algorithm: Algorithm,
    /// State.
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: u64,
    /// The version that wraps.
    pub current_version: u32,
    /// Versions below this no longer unwrap.
    pub min_decrypt_version: u32,
    /// Automatic rotation period, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period_secs: Option<u64>,
    /// While pending deletion: when the key is destroyed, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<u64>,
    /// Who may use the key. Default deny: no grant, no use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
    /// Slot of the key's erasure key ([`crate::erasure`]); `None`: sealed under the
    /// master key alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure_slot: Option<u32>,
    /// Slot of the key's erasure key in the cluster's erasure table, on a shared store
    /// ([`crate::erasure::shared`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_erasure_slot: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionRecord {
    version: u32,
    created_at: u64,
    /// Hex of the sealed box (salt ‖ ciphertext ‖ tag).
    material: String,
}

struct VersionEntry {
    created_at: u64,
    /// `created_at` as RFC 3339, formatted once (KeyInfo lists every version).
    created_at_text: String,
    material: crate::kek::Kek,
    usage: crate::usage::Usage,
}

/// A key with its decrypted versions, as cached.
struct KeyEntry {
    key_id: KeyId,
    record: KeyRecord,
    /// The exact stored bytes, for compare-and-swap on update.
    record_bytes: Vec<u8>,
    versions: BTreeMap<u32, Arc<VersionEntry>>,
}

impl KeyEntry {
    fn info(&self) -> KeyInfo {
        let r = &self.record;
        KeyInfo {
            name: r.name.clone(),
            id: r.id.clone(),
            algorithm: r.algorithm,
            state: r.state,
            created_at: rfc3339(r.created_at),
            current_version: r.current_version,
            min_decrypt_version: r.min_decrypt_version,
            rotation_period: r.rotation_period_secs.map(format_period),
            versions: self
                .versions
                .iter()
                .map(|(v, e)| {
                    let (wraps, unwraps, last_use) = e.usage.totals();
                    KeyVersionInfo {
                        version: *v,
                        created_at: e.created_at_text.clone(),
                        can_unwrap: *v >= r.min_decrypt_version,
                        wraps,
                        unwraps,
                        last_used_at: (last_use > 0).then(|| rfc3339(last_use)),
                    }
                })
                .collect(),
            deletion_date: r.deletion_date.map(rfc3339),
            grants: r.grants.clone(),
        }
    }

    /// When the current version was created (the rotation period counts from it).
    fn current_born(&self) -> u64 {
        self.versions
            .get(&self.record.current_version)
            .map_or(self.record.created_at, |v| v.created_at)
    }

    fn check_usable(&self) -> Result<(), Error> {
        match self.record.state {
            KeyState::Enabled => Ok(()),
            other => Err(Error::KeyDisabled(other)),
        }
    }

    /// Default deny: some grant must name `identity`, `op`, and accept `context`.
    fn check_grant(
        &self,
        identity: &str,
        op: GrantOperation,
        context: &Context,
    ) -> Result<(), Error> {
        if self
            .record
            .grants
            .iter()
            .any(|g| g.allows(identity, op, context))
        {
            Ok(())
        } else {
            Err(Error::PermissionDenied(
                "no grant on this key allows this identity this operation with this context",
            ))
        }
    }
}

/// Checks a grant set before it is stored.
pub fn validate_grants(grants: &[Grant]) -> Result<(), Error> {
    if grants.len() > MAX_GRANTS {
        return Err(Error::InvalidRequest(format!(
            "a key holds at most {MAX_GRANTS} grants"
        )));
    }
    for g in grants {
        if g.identity.is_empty()
            || g.identity.len() > MAX_IDENTITY_LEN
            || g.identity.chars().any(char::is_control)
        {
            return Err(Error::InvalidRequest(format!(
                "a grant's identity is 1 to {MAX_IDENTITY_LEN} printable characters"
            )));
        }
        if g.operations.is_empty() {
            return Err(Error::InvalidRequest(
                "a grant names at least one operation".into(),
            ));
        }
        let mut ops = g.operations.clone();
        ops.sort();
        ops.dedup();
        if ops.len() != g.operations.len() {
            return Err(Error::InvalidRequest(
                "a grant names each operation once".into(),
            ));
        }
        for ctx in [&g.constraints.context_subset, &g.constraints.context_equals]
            .into_iter()
            .flatten()
        {
            format::canonical_context(ctx)?;
        }
    }
    Ok(())
}

/// Decrypted keys, bounded by [`Keyring::with_cache_limit`]: past the limit, a sixteenth
/// of the entries (an arbitrary sixteenth: `HashMap` order) is dropped and reloaded from
/// the store on next use. Dropped entries whose usage counters have not been saved wait in
/// `evicted` for the next [`Keyring::flush_usage`]. Entries dropped because the key
/// changed (here or, on a shared store, on another node) are never served again; those
/// with unsaved counts wait in `retired` for the next flush, which adds their counts.
#[derive(Default)]
struct Cache {
    by_id: HashMap<KeyId, Arc<KeyEntry>>,
    by_name: HashMap<(String, String), KeyId>,
    evicted: HashMap<KeyId, Arc<KeyEntry>>,
    retired: Vec<Arc<KeyEntry>>,
}

impl Cache {
    /// Drops `id`'s entry (and a parked one), keeping unsaved counts for the next flush.
    fn retire(&mut self, id: &KeyId) {
        for e in [self.evicted.remove(id), self.by_id.remove(id)]
            .into_iter()
            .flatten()
        {
            self.by_name
                .remove(&(e.record.tenant.clone(), e.record.name.clone()));
            if e.versions.values().any(|v| v.usage.is_dirty()) {
                self.retired.push(e);
            }
        }
    }
}

struct Unsealed {
    master: SecretKey,
    cache: RwLock<Cache>,
    /// MACs the audit chain head.
    audit_mac: ring::hmac::Key,
    /// Keys the audit record's context hash.
    audit_context: ring::hmac::Key,
    /// Both audit keys' bytes (MAC ‖ context), for re-sealing at master-key rotation.
    audit_keys: Zeroizing<[u8; 64]>,
}

impl Unsealed {
    fn new(master: SecretKey, audit_keys: Zeroizing<[u8; 64]>, cache: Cache) -> Self {
        let hmac = |k: &[u8]| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
        Self {
            audit_mac: hmac(&audit_keys[..32]),
            audit_context: hmac(&audit_keys[32..]),
            audit_keys,
            master,
            cache: RwLock::new(cache),
        }
    }
}

/// The audit keys derived from `master` (stores whose master key never rotated).
fn derived_audit_keys(master: &SecretKey) -> Result<Zeroizing<[u8; 64]>, Error> {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"keyhold/derived/v1")
        .extract(master.expose_secret());
    let mut out = Zeroizing::new([0u8; 64]);
    for (label, half) in [
        (&b"audit-head-mac"[..], 0..32),
        (&b"audit-context-hash"[..], 32..64),
    ] {
        prk.expand(&[label], Len32)
            .and_then(|okm| okm.fill(&mut out[half]))
            .map_err(|_| Error::Internal("key derivation failed"))?;
    }
    Ok(out)
}

/// The result of `datakey`.
pub struct DataKey {
    /// The DEK.
    pub plaintext: SecretVec,
    /// It, wrapped.
    pub wrapped: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Version that wrapped it.
    pub version: u32,
}

/// The result of `wrap` and `rewrap`.
pub struct Wrapped {
    /// Wrapped DEK.
    pub wrapped: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Version that wrapped it.
    pub version: u32,
}

/// The result of `unwrap`.
pub struct Unwrapped {
    /// The DEK.
    pub plaintext: SecretVec,
    /// Key name.
    pub key: String,
    /// Version that had wrapped it.
    pub version: u32,
}

/// The HKDF label of detached encryption ([`Lookups::encrypt_detached`]): keys derived
/// for it are never the keys of a wrapped DEK (whose label is the wrapped-DEK format's).
const DETACHED_LABEL: &[u8] = b"keyhold/detached-aes-256-gcm/v1";

/// The result of [`Lookups::encrypt_detached`]: AES-256-GCM with the IV, the ciphertext
/// (as long as the plaintext) and the tag apart, for protocols that carry them as separate
/// fields (AWS XKS). The version is not in the ciphertext: the caller keeps it.
pub struct DetachedCiphertext {
    /// Key name.
    pub key: String,
    /// The version that encrypted.
    pub version: u32,
    /// The 16-byte IV (the single-use key's HKDF salt, see [`crate::crypto::seal_detached`]).
    pub iv: [u8; crate::crypto::DETACHED_SALT_LEN],
    /// Ciphertext, as long as the plaintext.
    pub ciphertext: Vec<u8>,
    /// The 16-byte tag.
    pub tag: [u8; crate::crypto::TAG_LEN],
}

/// What a principal may do with a key (for protocols that report it: XKS GetKeyMetadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUse {
    /// Algorithm.
    pub algorithm: Algorithm,
    /// State.
    pub state: KeyState,
    /// A grant allows it `wrap` (detached encryption) without a context.
    pub can_encrypt: bool,
    /// A grant allows it `unwrap` (detached decryption) without a context.
    pub can_decrypt: bool,
}

/// See [`Keyring::with_freshness_bound`].
struct Freshness {
    bound_ms: u64,
    confirmed_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

/// Default of [`Keyring::with_cache_limit`] (`[keys] cache_keys`): with one version a
/// cached key takes about 1 KiB, so 100 000 keys stay near 100 MiB.
pub const DEFAULT_CACHE_KEYS: usize = 100_000;

/// The keyring over one store.
pub struct Keyring {
    store: Arc<dyn KeyStore>,
    clock: crate::clock::Clock,
    /// Per-key erasure keys (`None`: keys are sealed under the master key alone, as in
    /// stores of earlier versions and in tools that open a store without it).
    erasure: Option<Arc<crate::erasure::ErasureFile>>,
    /// Erasure keys in the shared store's table under HSM-rooted epoch keys: new keys get
    /// theirs there.
    shared_erasure: Option<crate::erasure::SharedErasure>,
    /// Whether new keys get an erasure key (off on a store shared by several nodes: the
    /// erasure file is local to one node).
    new_erasure_keys: bool,
    /// On a shared store: when the node last confirmed its cache against the store's
    /// change feed (milliseconds on [`Keyring::freshness_clock`]), and how old that may
    /// be before key use fails closed. `None`: the store has no other writer.
    freshness: Option<Freshness>,
    /// Bumped by every invalidation (see `load_entry`).
    invalidations: std::sync::atomic::AtomicU64,
    unsealed: RwLock<Option<Arc<Unsealed>>>,
    /// Serializes this process's mutations (the store's conditions guard against others).
    write_lock: Mutex<()>,
    /// Most keys in the cache.
    cache_limit: usize,
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Whole days as `"90d"` (how operators write them); anything else in humantime form.
fn format_period(secs: u64) -> String {
    if secs % 86_400 == 0 {
        format!("{}d", secs / 86_400)
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

fn name_key(tenant: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + name.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn deletion_key(date: u64, id: &KeyId) -> Vec<u8> {
    let mut k = date.to_be_bytes().to_vec();
    k.extend_from_slice(&id.0);
    k
}

/// Index key of `Table::Rotations`: due date ‖ key id.
fn rotation_key(due: u64, id: &KeyId) -> Vec<u8> {
    let mut k = due.to_be_bytes().to_vec();
    k.extend_from_slice(&id.0);
    k
}

/// Meta entry saying the rotation index is complete (stores from before it get it built
/// by the first sweep).
const META_ROTATION_INDEX: &[u8] = b"index/rotations/v1";

fn version_key(id: &KeyId, version: u32) -> Vec<u8> {
    let mut k = id.0.to_vec();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn kek_aad(tenant: &str, id: &KeyId, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(4 + tenant.len() + 20);
    aad.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&id.0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Checks a key name: 1–128 of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "key names are 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|_| Error::Internal("record serialization failed"))
}

impl Keyring {
    /// A sealed keyring over `store`, on the system clock.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self::with_clock(store, crate::clock::Clock::system())
    }

    /// A sealed keyring over `store`, reading time from `clock` (creation times, rotation
    /// and deletion deadlines).
    pub fn with_clock(store: Arc<dyn KeyStore>, clock: crate::clock::Clock) -> Self {
        Self {
            clock,
            erasure: None,
            shared_erasure: None,
            new_erasure_keys: true,
            freshness: None,
            invalidations: std::sync::atomic::AtomicU64::new(0),
            store,
            unsealed: RwLock::new(None),
            write_lock: Mutex::new(()),
            cache_limit: DEFAULT_CACHE_KEYS,
        }
    }

    /// Gives new keys an erasure key in `erasure` ([`crate::erasure`]): their versions are
    /// sealed under the master key bound to it, and destruction erases it.
    pub fn with_erasure(mut self, erasure: Arc<crate::erasure::ErasureFile>) -> Self {
        self.erasure = Some(erasure);
        self
    }

    /// New keys get their erasure key in the shared store's erasure table
    /// ([`crate::erasure::shared`]) rather than in the local file.
    pub fn with_shared_erasure(mut self, shared: crate::erasure::SharedErasure) -> Self {
        self.shared_erasure = Some(shared);
        self
    }

    /// The shared store's erasure keys, when this keyring has them.
    pub fn shared_erasure(&self) -> Option<&crate::erasure::SharedErasure> {
        self.shared_erasure.as_ref()
    }

    /// Moves the erasure keys that key records name in `file` (an embedded store's erasure
    /// file, after `migrate-store` copied its records here) into the shared store's
    /// erasure table, and makes each record name its new slot; the versions stay sealed as
    /// they were (the erasure keys are the same). Keys whose erasure key is already erased
    /// (destroyed) are left as they are. Returns how many moved. Needs no master key.
    pub fn adopt_erasure_keys(&self, file: &crate::erasure::ErasureFile) -> Result<usize, Error> {
        let shared = self.shared_erasure.as_ref().ok_or(Error::InvalidState(
            "this store keeps no erasure keys in the database",
        ))?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut moved = 0;
        for (id, bytes) in self.store.scan_prefix(Table::Keys, b"")? {
            let mut record: KeyRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("key record"))?;
            let Some(slot) = record.erasure_slot else {
                continue;
            };
            let Some(ek) = file.get(slot)? else {
                continue;
            };
            record.shared_erasure_slot = Some(shared.import(&ek, self.clock.now())?);
            record.erasure_slot = None;
            let mut batch = WriteBatch::new();
            batch
                .require(Table::Keys, &id, Some(&bytes))
                .put(Table::Keys, &id, &to_json(&record)?);
            self.store.commit(&batch)?;
            moved += 1;
        }
        Ok(moved)
    }

    /// New keys get no erasure key (keys that have one still open while the file is
    /// there): for a store several nodes share, where a local erasure file would make a
    /// key unreadable on every other node.
    pub fn without_new_erasure_keys(mut self) -> Self {
        self.new_erasure_keys = false;
        self
    }

    /// For a store shared with other nodes: key use fails closed (503) unless the cache
    /// was confirmed against the store's change feed ([`Keyring::confirm_fresh`]) within
    /// `bound`.
    pub fn with_freshness_bound(mut self, bound: Duration) -> Self {
        self.freshness = Some(Freshness {
            bound_ms: bound.as_millis() as u64,
            confirmed_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        });
        self
    }

    /// Records that the cache reflects every change the store reported until now.
    pub fn confirm_fresh(&self, at: std::time::Instant) {
        if let Some(f) = &self.freshness {
            let ms = at.saturating_duration_since(f.epoch).as_millis() as u64;
            f.confirmed_ms
                .fetch_max(ms, std::sync::atomic::Ordering::Release);
        }
    }

    /// Drops the cached copies of these keys (changed by another node): the next use reads
    /// them from the store. Usage counts not yet saved for them are dropped with them.
    pub fn invalidate(&self, ids: &[[u8; 16]]) {
        let Ok(un) = self.unsealed() else { return };
        for id in ids {
            self.cache_evict(&un, &KeyId(*id));
        }
        self.invalidations
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Drops every cached key (a change feed that cannot say what changed).
    pub fn invalidate_all(&self) {
        if let Ok(un) = self.unsealed() {
            let mut cache = un.cache.write().unwrap_or_else(PoisonError::into_inner);
            let ids: Vec<KeyId> = cache
                .by_id
                .keys()
                .chain(cache.evicted.keys())
                .copied()
                .collect();
            for id in ids {
                cache.retire(&id);
            }
            cache.by_name.clear();
        }
        self.invalidations
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether key use is allowed by the freshness bound (always, on an unshared store).
    pub fn is_fresh(&self) -> bool {
        self.check_fresh().is_ok()
    }

    fn check_fresh(&self) -> Result<(), Error> {
        let Some(f) = &self.freshness else {
            return Ok(());
        };
        let now = f.epoch.elapsed().as_millis() as u64;
        let confirmed = f.confirmed_ms.load(std::sync::atomic::Ordering::Acquire);
        if confirmed == 0 || now.saturating_sub(confirmed) > f.bound_ms {
            return Err(Error::Storage(StoreError::Engine {
                engine: "shared store",
                source:
                    "the key cache could not be confirmed against the shared store within its bound"
                        .into(),
            }));
        }
        Ok(())
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
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.clock
    }

    /// Generates a master key and stores it sealed by `sealer`. Refuses an initialized
    /// store: re-initializing would orphan every KEK.
    pub fn initialize(&self, sealer: &dyn Sealer) -> Result<(), Error> {
        let master = SecretKey::generate()?;
        let sealed = sealer.seal(&master)?;
        let mut batch = WriteBatch::new();
        batch
            .require(Table::Meta, META_SEALED_MASTER, None)
            .put(Table::Meta, META_SEALED_MASTER, &to_json(&sealed)?)
            .put(Table::Meta, META_FORMAT, STORE_FORMAT)
            // A new store keeps its rotation index complete from the first key.
            .put(Table::Meta, META_ROTATION_INDEX, b"1");
        match self.store.commit(&batch) {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict(_)) => Err(Error::InvalidState(
                "the store is already initialized; refusing to replace its master key",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// The stored sealed master key, if the store is initialized.
    pub fn sealed_master_key(&self) -> Result<Option<SealedMasterKey>, Error> {
        match self.store.get(Table::Meta, META_SEALED_MASTER)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| Error::Corrupt("sealed master key record")),
        }
    }

    /// The method the store was sealed with.
    pub fn seal_method(&self) -> Result<Option<SealMethod>, Error> {
        Ok(self.sealed_master_key()?.map(|s| s.method))
    }

    /// Unseals with `sealer`. A no-op when already unsealed.
    pub fn unseal(&self, sealer: &dyn Sealer) -> Result<(), Error> {
        if !self.is_sealed() {
            return Ok(());
        }
        let sealed = self.sealed_master_key()?.ok_or(Error::InvalidState(
            "the store is not initialized: run `kms-server init`",
        ))?;
        let master = sealer.unseal(&sealed)?;
        let audit_keys = self.audit_keys_under(&master)?;
        let mut slot = self
            .unsealed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = Some(Arc::new(Unsealed::new(
            master,
            audit_keys,
            Cache::default(),
        )));
        Ok(())
    }

    /// The audit keys: stored (sealed under `master`) once the master key has rotated,
    /// else derived from it.
    fn audit_keys_under(&self, master: &SecretKey) -> Result<Zeroizing<[u8; 64]>, Error> {
        let Some(sealed) = self.store.get(Table::Meta, META_AUDIT_KEYS)? else {
            return derived_audit_keys(master);
        };
        let plain = crypto::open_box(master, AUDIT_KEYS_LABEL, b"", &sealed)
            .map_err(|_| Error::Corrupt("audit keys fail authentication under the master key"))?;
        let mut keys = Zeroizing::new([0u8; 64]);
        if plain.expose_secret().len() != 64 {
            return Err(Error::Corrupt("audit keys length"));
        }
        keys.copy_from_slice(plain.expose_secret());
        Ok(keys)
    }

    /// Replaces the master key with a new one: every KEK version is re-sealed under it and
    /// the new master key sealed by `sealer`, all in one store transaction (a crash leaves
    /// the old state or the new one, never a mix). `sealer` must also open the current
    /// sealed master key, so a mistyped passphrase cannot lock the store away. KEK material
    /// does not change: wrapped DEKs keep unwrapping. Returns how many versions were
    /// re-sealed.
    pub fn rotate_master(&self, sealer: &dyn Sealer) -> Result<usize, Error> {
        let un = self.unsealed()?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old_bytes = self
            .store
            .get(Table::Meta, META_SEALED_MASTER)?
            .ok_or(Error::InvalidState("the store is not initialized"))?;
        let old: SealedMasterKey = serde_json::from_slice(&old_bytes)
            .map_err(|_| Error::Corrupt("sealed master key record"))?;
        let check = sealer.unseal(&old)?;
        // Constant-time comparison (SecretKey's PartialEq).
        if check != un.master {
            return Err(Error::InvalidState(
                "the seal secret given opens another master key than the one in use",
            ));
        }
        let new_master = SecretKey::generate()?;
        let sealed_new = sealer.seal(&new_master)?;
        let mut batch = WriteBatch::new();
        batch
            .require(Table::Meta, META_SEALED_MASTER, Some(&old_bytes))
            .put(Table::Meta, META_SEALED_MASTER, &to_json(&sealed_new)?)
            // The audit keys keep their value: the chain head's MAC stays valid.
            .put(
                Table::Meta,
                META_AUDIT_KEYS,
                &crypto::seal_box(&new_master, AUDIT_KEYS_LABEL, b"", &un.audit_keys[..])?,
            );
        let mut resealed = 0;
        for (id, bytes) in self.store.scan_prefix(Table::Keys, b"")? {
            let record: KeyRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("key record"))?;
            let key_id = KeyId(
                id.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("key id"))?,
            );
            let versions = self.store.scan_prefix(Table::Versions, &id)?;
            if versions.is_empty() {
                continue;
            }
            let old_key = self.sealing_key_under(&un.master, &record)?;
            let new_key = self.sealing_key_under(&new_master, &record)?;
            for (vk, vbytes) in versions {
                let mut v: VersionRecord = serde_json::from_slice(&vbytes)
                    .map_err(|_| Error::Corrupt("version record"))?;
                let aad = kek_aad(&record.tenant, &key_id, v.version);
                let sealed = crate::seal::unhex(&v.material)
                    .ok_or(Error::Corrupt("version record material"))?;
                let plain = crypto::open_box(
                    old_key.as_ref().unwrap_or(&un.master),
                    KEK_LABEL,
                    &aad,
                    &sealed,
                )
                .map_err(|_| {
                    Error::Corrupt("KEK version fails authentication under the master key")
                })?;
                let resealed_box = crypto::seal_box(
                    new_key.as_ref().unwrap_or(&new_master),
                    KEK_LABEL,
                    &aad,
                    plain.expose_secret(),
                )?;
                v.material = crate::seal::hex(&resealed_box);
                batch.put(Table::Versions, &vk, &to_json(&v)?);
                resealed += 1;
            }
        }
        match self.store.commit(&batch) {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(Error::InvalidState(
                    "the master key changed meanwhile; try again",
                ))
            }
            Err(e) => return Err(e.into()),
        }
        // The decrypted KEKs did not change: keep the cache, swap the keys.
        let cache = std::mem::take(&mut *un.cache.write().unwrap_or_else(PoisonError::into_inner));
        let mut slot = self
            .unsealed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = Some(Arc::new(Unsealed::new(
            new_master,
            un.audit_keys.clone(),
            cache,
        )));
        Ok(resealed)
    }

    /// Wipes the master key and every cached KEK from memory. Requests in flight keep
    /// their reference until they finish; new ones get `Sealed`.
    pub fn seal(&self) {
        if let Err(e) = self.flush_usage() {
            tracing::warn!(error = %e, "usage counters not saved before sealing");
        }
        let mut slot = self
            .unsealed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = None;
    }

    /// Whether key operations are refused.
    pub fn is_sealed(&self) -> bool {
        self.unsealed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// HMAC-SHA256 (hex) of `data` under the audit-head key; `None` while sealed.
    pub fn audit_mac(&self, data: &[u8]) -> Option<String> {
        let un = self.unsealed().ok()?;
        let tag = ring::hmac::sign(&un.audit_mac, data);
        Some(crate::seal::hex(tag.as_ref()))
    }

    /// Whether `mac` is the audit-head MAC of `data`; `None` while sealed.
    pub fn audit_mac_verify(&self, data: &[u8], mac: &str) -> Option<bool> {
        let un = self.unsealed().ok()?;
        let tag = crate::seal::unhex(mac)?;
        Some(ring::hmac::verify(&un.audit_mac, data, &tag).is_ok())
    }

    /// The keyed hash of a context for audit records (16 bytes, hex); `None` while sealed
    /// or when the context is invalid.
    pub fn audit_context_hash(&self, context: &Context) -> Option<String> {
        let un = self.unsealed().ok()?;
        let canonical = format::canonical_context(context).ok()?;
        let tag = ring::hmac::sign(&un.audit_context, &canonical);
        Some(crate::seal::hex(&tag.as_ref()[..16]))
    }

    fn unsealed(&self) -> Result<Arc<Unsealed>, Error> {
        self.unsealed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::Sealed)
    }

    // ---- cache and loading ----

    fn load_entry(&self, un: &Unsealed, id: KeyId) -> Result<Option<Arc<KeyEntry>>, Error> {
        if let Some(e) = un
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(&id)
        {
            return Ok(Some(e.clone()));
        }
        // Evicted with counts not yet saved: take it back, counts and all.
        let parked = if un
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .evicted
            .contains_key(&id)
        {
            un.cache
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .evicted
                .remove(&id)
        } else {
            None
        };
        if let Some(e) = parked {
            self.cache_put(un, e.clone());
            return Ok(Some(e));
        }
        // A change seen on the shared store's feed while this read runs must not leave the
        // old record cached: cache it only if no invalidation happened meanwhile.
        let epoch = self
            .invalidations
            .load(std::sync::atomic::Ordering::Acquire);
        let Some(record_bytes) = self.store.get(Table::Keys, &id.0)? else {
            return Ok(None);
        };
        let record: KeyRecord =
            serde_json::from_slice(&record_bytes).map_err(|_| Error::Corrupt("key record"))?;
        if KeyId::from_hex(&record.id) != Some(id) {
            return Err(Error::Corrupt("key record id mismatch"));
        }
        let mut usage = HashMap::new();
        for (key, bytes) in self.store.scan_prefix(Table::Usage, &id.0)? {
            let version = key
                .get(16..20)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or(Error::Corrupt("usage key"))?;
            let r: crate::usage::UsageRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("usage record"))?;
            usage.insert(version, r);
        }
        let mut versions = BTreeMap::new();
        // The key the versions are sealed under, found once per key (on a shared store an
        // erasure key is a database read), and only if there is a version to open.
        let mut bound: Option<Option<SecretKey>> = None;
        for (_, bytes) in self.store.scan_prefix(Table::Versions, &id.0)? {
            let v: VersionRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("version record"))?;
            let under = match &bound {
                Some(b) => b,
                None => bound.insert(self.version_sealing_key(un, &record)?),
            };
            let mut entry = self.open_version_under(un, under.as_ref(), &record, &id, &v)?;
            if let Some(r) = usage.get(&v.version) {
                entry.usage = crate::usage::Usage::from_record(r);
            }
            versions.insert(v.version, Arc::new(entry));
        }
        let entry = Arc::new(KeyEntry {
            key_id: id,
            record,
            record_bytes,
            versions,
        });
        if self
            .invalidations
            .load(std::sync::atomic::Ordering::Acquire)
            == epoch
        {
            self.cache_put(un, entry.clone());
        }
        Ok(Some(entry))
    }

    #[cfg(test)]
    fn open_version(
        &self,
        un: &Unsealed,
        record: &KeyRecord,
        id: &KeyId,
        v: &VersionRecord,
    ) -> Result<VersionEntry, Error> {
        let bound = self.version_sealing_key(un, record)?;
        self.open_version_under(un, bound.as_ref(), record, id, v)
    }

    /// Opens version `v` of `record` under `bound` (its sealing key: see
    /// [`Keyring::version_sealing_key`]), or the master key when `None`.
    fn open_version_under(
        &self,
        un: &Unsealed,
        bound: Option<&SecretKey>,
        record: &KeyRecord,
        id: &KeyId,
        v: &VersionRecord,
    ) -> Result<VersionEntry, Error> {
        let sealed =
            crate::seal::unhex(&v.material).ok_or(Error::Corrupt("version record material"))?;
        let plain = crypto::open_box(
            bound.unwrap_or(&un.master),
            KEK_LABEL,
            &kek_aad(&record.tenant, id, v.version),
            &sealed,
        )
        .map_err(|_| Error::Corrupt("KEK version fails authentication under the master key"))?;
        let material = crate::kek::Kek::from_stored(record.algorithm, plain.expose_secret())?;
        Ok(VersionEntry {
            created_at: v.created_at,
            created_at_text: rfc3339(v.created_at),
            material,
            usage: crate::usage::Usage::default(),
        })
    }

    fn cache_put(&self, un: &Unsealed, entry: Arc<KeyEntry>) {
        let mut cache = un.cache.write().unwrap_or_else(PoisonError::into_inner);
        if cache.by_id.len() >= self.cache_limit && !cache.by_id.contains_key(&entry.key_id) {
            let drop_n = (self.cache_limit / 16).max(1);
            let victims: Vec<KeyId> = cache.by_id.keys().take(drop_n).copied().collect();
            for id in victims {
                if let Some(e) = cache.by_id.remove(&id) {
                    cache
                        .by_name
                        .remove(&(e.record.tenant.clone(), e.record.name.clone()));
                    if e.versions.values().any(|v| v.usage.is_dirty()) {
                        cache.evicted.insert(id, e);
                    }
                }
            }
        }
        cache.by_name.insert(
            (entry.record.tenant.clone(), entry.record.name.clone()),
            entry.key_id,
        );
        cache.by_id.insert(entry.key_id, entry);
    }

    fn cache_evict(&self, un: &Unsealed, id: &KeyId) {
        un.cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retire(id);
    }

    fn entry_by_name(
        &self,
        un: &Unsealed,
        tenant: &str,
        name: &str,
    ) -> Result<Arc<KeyEntry>, Error> {
        validate_name(name)?;
        let cached = un
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_name
            .get(&(tenant.to_owned(), name.to_owned()))
            .copied();
        let id = match cached {
            Some(id) => id,
            None => {
                let bytes = self
                    .store
                    .get(Table::KeyNames, &name_key(tenant, name))?
                    .ok_or(Error::NotFound)?;
                let id: [u8; 16] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("key name index"))?;
                KeyId(id)
            }
        };
        let entry = self.load_entry(un, id)?.ok_or(Error::NotFound)?;
        if entry.record.tenant != tenant || entry.record.name != name {
            return Err(Error::NotFound);
        }
        Ok(entry)
    }

    // ---- management ----

    /// Creates a key with version 1.
    pub fn create_key(
        &self,
        tenant: &str,
        name: &str,
        algorithm: Algorithm,
        rotation_period: Option<Duration>,
        grants: Vec<Grant>,
    ) -> Result<KeyInfo, Error> {
        validate_name(name)?;
        validate_grants(&grants)?;
        let un = self.unsealed()?;
        // Before the lock: RSA generation can take seconds.
        let (material, stored) = crate::kek::Kek::generate(algorithm)?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut id = [0u8; 16];
        id.copy_from_slice(&crypto::random_salt()?[..16]);
        let id = KeyId(id);
        let created_at = self.clock.now();
        let record = KeyRecord {
            id: id.to_hex(),
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            algorithm,
            state: KeyState::Enabled,
            created_at,
            current_version: 1,
            min_decrypt_version: 1,
            rotation_period_secs: rotation_period.map(|d| d.as_secs()),
            deletion_date: None,
            grants,
            erasure_slot: None,
            shared_erasure_slot: None,
        };
        let mut record = record;
        if let Some(shared) = &self.shared_erasure {
            // Durable before the record that names it (see `erasure::shared`).
            let (slot, _) = shared.allocate(created_at)?;
            record.shared_erasure_slot = Some(slot);
        } else if let Some(erasure) = self.erasure.as_ref().filter(|_| self.new_erasure_keys) {
            // Durable before the record that names it (see `erasure`).
            let (slot, _) = erasure.allocate()?;
            record.erasure_slot = Some(slot);
        }
        let version = self.seal_version(&un, &record, &id, 1, created_at, &stored)?;
        let record_bytes = to_json(&record)?;
        let mut batch = WriteBatch::new();
        batch
            .require(Table::KeyNames, &name_key(tenant, name), None)
            .require(Table::Keys, &id.0, None)
            .put(Table::KeyNames, &name_key(tenant, name), &id.0)
            .put(Table::Keys, &id.0, &record_bytes)
            .put(Table::Versions, &version_key(&id, 1), &to_json(&version)?);
        if let Some(period) = record.rotation_period_secs {
            batch.put(
                Table::Rotations,
                &rotation_key(created_at.saturating_add(period), &id),
                b"",
            );
        }
        match self.store.commit(&batch) {
            Ok(()) => {}
            Err(StoreError::Conflict("key_names")) => return Err(Error::AlreadyExists),
            Err(e) => return Err(e.into()),
        }
        let mut versions = BTreeMap::new();
        versions.insert(
            1,
            Arc::new(VersionEntry {
                created_at,
                created_at_text: rfc3339(created_at),
                material,
                usage: crate::usage::Usage::default(),
            }),
        );
        let entry = Arc::new(KeyEntry {
            key_id: id,
            record,
            record_bytes,
            versions,
        });
        self.cache_put(&un, entry.clone());
        Ok(entry.info())
    }

    /// The key a KEK's versions are sealed under: the master key bound to the key's
    /// erasure key, or (no erasure slot) the master key itself.
    fn version_sealing_key(
        &self,
        un: &Unsealed,
        record: &KeyRecord,
    ) -> Result<Option<SecretKey>, Error> {
        self.sealing_key_under(&un.master, record)
    }

    fn sealing_key_under(
        &self,
        master: &SecretKey,
        record: &KeyRecord,
    ) -> Result<Option<SecretKey>, Error> {
        if let Some(slot) = record.shared_erasure_slot {
            let shared = self.shared_erasure.as_ref().ok_or(Error::InvalidState(
                "the key's erasure key is in the cluster's erasure table, which needs [seal] method = \"pkcs11\"",
            ))?;
            let ek = shared
                .get(slot)?
                .ok_or(Error::Corrupt("the key's erasure key is erased"))?;
            return crypto::bind_key(master, &ek, ERASURE_LABEL).map(Some);
        }
        let Some(slot) = record.erasure_slot else {
            return Ok(None);
        };
        let erasure = self.erasure.as_ref().ok_or(Error::Corrupt(
            "the key has an erasure key but no erasure file is open",
        ))?;
        let ek = erasure
            .get(slot)?
            .ok_or(Error::Corrupt("the key's erasure key is erased"))?;
        crypto::bind_key(master, &ek, ERASURE_LABEL).map(Some)
    }

    fn seal_version(
        &self,
        un: &Unsealed,
        record: &KeyRecord,
        id: &KeyId,
        version: u32,
        created_at: u64,
        material: &SecretVec,
    ) -> Result<VersionRecord, Error> {
        let bound = self.version_sealing_key(un, record)?;
        let sealed = crypto::seal_box(
            bound.as_ref().unwrap_or(&un.master),
            KEK_LABEL,
            &kek_aad(&record.tenant, id, version),
            material.expose_secret(),
        )?;
        Ok(VersionRecord {
            version,
            created_at,
            material: crate::seal::hex(&sealed),
        })
    }

    /// A key's metadata.
    pub fn key_info(&self, tenant: &str, name: &str) -> Result<KeyInfo, Error> {
        let un = self.unsealed()?;
        Ok(self.entry_by_name(&un, tenant, name)?.info())
    }

    /// The tenant's keys, by name.
    pub fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, Error> {
        let un = self.unsealed()?;
        let prefix = name_key(tenant, "");
        let mut out = Vec::new();
        for (_, id) in self.store.scan_prefix(Table::KeyNames, &prefix)? {
            let id: [u8; 16] = id
                .as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt("key name index"))?;
            if let Some(entry) = self.load_entry(&un, KeyId(id))? {
                out.push(entry.info());
            }
        }
        Ok(out)
    }

    /// Adds a new version, which becomes the wrapping version. Older versions keep
    /// unwrapping.
    pub fn rotate(&self, tenant: &str, name: &str) -> Result<KeyInfo, Error> {
        let un = self.unsealed()?;
        // New material before the lock (RSA generation can take seconds).
        let algorithm = self.entry_by_name(&un, tenant, name)?.record.algorithm;
        let (material, stored) = crate::kek::Kek::generate(algorithm)?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = self.entry_by_name(&un, tenant, name)?;
        if matches!(
            entry.record.state,
            KeyState::PendingDeletion | KeyState::Destroyed
        ) {
            return Err(Error::InvalidState(
                "a key pending deletion or destroyed cannot be rotated",
            ));
        }
        let id = entry.key_id;
        let new_version = entry
            .record
            .current_version
            .checked_add(1)
            .ok_or(Error::InvalidState("version counter exhausted"))?;
        let mut record = entry.record.clone();
        record.current_version = new_version;
        let created_at = self.clock.now();
        let version = self.seal_version(&un, &record, &id, new_version, created_at, &stored)?;
        let record_bytes = to_json(&record)?;
        let mut batch = WriteBatch::new();
        batch
            .require(Table::Keys, &id.0, Some(&entry.record_bytes))
            .require(Table::Versions, &version_key(&id, new_version), None)
            .put(Table::Keys, &id.0, &record_bytes)
            .put(
                Table::Versions,
                &version_key(&id, new_version),
                &to_json(&version)?,
            );
        if let Some(period) = record.rotation_period_secs {
            // The next rotation is due one period after this version, whatever the old
            // entry said (manual rotations push it back too).
            batch
                .delete(
                    Table::Rotations,
                    &rotation_key(entry.current_born().saturating_add(period), &id),
                )
                .put(
                    Table::Rotations,
                    &rotation_key(created_at.saturating_add(period), &id),
                    b"",
                );
        }
        self.commit_update(&un, &id, &batch)?;
        let mut versions = entry.versions.clone();
        versions.insert(
            new_version,
            Arc::new(VersionEntry {
                created_at,
                created_at_text: rfc3339(created_at),
                material,
                usage: crate::usage::Usage::default(),
            }),
        );
        let updated = Arc::new(KeyEntry {
            key_id: id,
            record,
            record_bytes,
            versions,
        });
        self.cache_put(&un, updated.clone());
        Ok(updated.info())
    }

    /// Commits an update of a cached key; on a conflict the cache entry was stale, so it
    /// is dropped and the next read reloads from the store.
    fn commit_update(&self, un: &Unsealed, id: &KeyId, batch: &WriteBatch) -> Result<(), Error> {
        match self.store.commit(batch) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.cache_evict(un, id);
                Err(e.into())
            }
        }
    }

    /// Read-modify-write of one key record: `change` edits a copy of the record (and may
    /// add writes to the batch); the batch commits only if the stored record is still the
    /// one read. Returns the new metadata.
    fn update_key(
        &self,
        tenant: &str,
        name: &str,
        change: impl FnOnce(&KeyEntry, &mut KeyRecord, &mut WriteBatch) -> Result<(), Error>,
    ) -> Result<KeyInfo, Error> {
        let un = self.unsealed()?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = self.entry_by_name(&un, tenant, name)?;
        let mut record = entry.record.clone();
        let mut batch = WriteBatch::new();
        change(&entry, &mut record, &mut batch)?;
        let record_bytes = to_json(&record)?;
        if record_bytes == entry.record_bytes && batch.writes.is_empty() {
            return Ok(entry.info());
        }
        batch
            .require(Table::Keys, &entry.key_id.0, Some(&entry.record_bytes))
            .put(Table::Keys, &entry.key_id.0, &record_bytes);
        self.commit_update(&un, &entry.key_id, &batch)?;
        let versions = if record.state == KeyState::Destroyed {
            BTreeMap::new()
        } else {
            entry.versions.clone()
        };
        let updated = Arc::new(KeyEntry {
            key_id: entry.key_id,
            record,
            record_bytes,
            versions,
        });
        self.cache_put(&un, updated.clone());
        Ok(updated.info())
    }

    /// Enables (`true`) or disables (`false`) a key. Idempotent.
    pub fn set_enabled(&self, tenant: &str, name: &str, enabled: bool) -> Result<KeyInfo, Error> {
        let target = if enabled {
            KeyState::Enabled
        } else {
            KeyState::Disabled
        };
        self.update_key(tenant, name, |_, record, _| match record.state {
            KeyState::Enabled | KeyState::Disabled => {
                record.state = target;
                Ok(())
            }
            KeyState::PendingDeletion => Err(Error::InvalidState(
                "the key is pending deletion: cancel the deletion first",
            )),
            _ => Err(Error::InvalidState("the key is destroyed")),
        })
    }

    /// Schedules destruction `days` (7–30) after `now`. The key is unusable from now on;
    /// `cancel_deletion` returns it to `disabled` until then.
    pub fn schedule_deletion(
        &self,
        tenant: &str,
        name: &str,
        days: u32,
        now: u64,
    ) -> Result<KeyInfo, Error> {
        if !DELETION_WINDOW_DAYS.contains(&days) {
            return Err(Error::InvalidRequest(format!(
                "pending_days must be between {} and {}",
                DELETION_WINDOW_DAYS.start(),
                DELETION_WINDOW_DAYS.end()
            )));
        }
        self.update_key(tenant, name, |entry, record, batch| {
            match record.state {
                KeyState::Enabled | KeyState::Disabled => {}
                KeyState::PendingDeletion => {
                    return Err(Error::InvalidState("the key is already pending deletion"))
                }
                _ => return Err(Error::InvalidState("the key is destroyed")),
            }
            let date = now.saturating_add(u64::from(days) * 86_400);
            record.state = KeyState::PendingDeletion;
            record.deletion_date = Some(date);
            batch.put(Table::Deletions, &deletion_key(date, &entry.key_id), b"");
            Ok(())
        })
    }

    /// Cancels a scheduled deletion; the key comes back `disabled` (enable it explicitly).
    pub fn cancel_deletion(&self, tenant: &str, name: &str) -> Result<KeyInfo, Error> {
        self.update_key(tenant, name, |entry, record, batch| {
            if record.state != KeyState::PendingDeletion {
                return Err(Error::InvalidState("the key is not pending deletion"));
            }
            if let Some(date) = record.deletion_date.take() {
                batch.delete(Table::Deletions, &deletion_key(date, &entry.key_id));
            }
            record.state = KeyState::Disabled;
            Ok(())
        })
    }

    /// Retires versions below `version` (1 ..= current): they stop unwrapping. Lowering it
    /// again brings retired versions back while their material is still stored.
    pub fn set_min_decrypt_version(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
    ) -> Result<KeyInfo, Error> {
        self.update_key(tenant, name, |_, record, _| {
            if record.state == KeyState::Destroyed {
                return Err(Error::InvalidState("the key is destroyed"));
            }
            if version == 0 || version > record.current_version {
                return Err(Error::InvalidRequest(format!(
                    "version must be between 1 and the current version ({})",
                    record.current_version
                )));
            }
            record.min_decrypt_version = version;
            Ok(())
        })
    }

    /// Replaces a key's grants.
    pub fn set_grants(
        &self,
        tenant: &str,
        name: &str,
        grants: Vec<Grant>,
    ) -> Result<KeyInfo, Error> {
        validate_grants(&grants)?;
        self.update_key(tenant, name, |_, record, _| {
            if record.state == KeyState::Destroyed {
                return Err(Error::InvalidState("the key is destroyed"));
            }
            record.grants = grants;
            Ok(())
        })
    }

    /// Runs `f` with the master key and the erasure file while no key changes (for
    /// backups: the tables are read as one state).
    pub fn with_master_locked<T>(
        &self,
        f: impl FnOnce(&SecretKey, Option<&crate::erasure::ErasureFile>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let un = self.unsealed()?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&un.master, self.erasure.as_deref())
    }

    /// Checks that every KEK version in `batch` (a restore) opens under `master` and the
    /// erasure keys in `erasure` (the erasure file's bytes).
    pub fn verify_restorable(
        &self,
        master: &SecretKey,
        batch: &WriteBatch,
        erasure: &[u8],
    ) -> Result<(), Error> {
        let rows = |table: Table| {
            batch
                .writes
                .iter()
                .filter(move |(t, _, v)| *t == table && v.is_some())
                .map(|(_, k, v)| (k.as_slice(), v.as_deref().unwrap_or_default()))
        };
        for (id, bytes) in rows(Table::Keys) {
            let record: KeyRecord =
                serde_json::from_slice(bytes).map_err(|_| Error::Corrupt("key record"))?;
            let id = KeyId(id.try_into().map_err(|_| Error::Corrupt("key id"))?);
            if record.shared_erasure_slot.is_some() {
                return Err(Error::InvalidState(
                    "the backup names erasure keys of a shared store's erasure table: restore a database backup instead",
                ));
            }
            let bound = match record.erasure_slot {
                Some(slot) => {
                    let at = 64 + 32 * slot as usize;
                    let ek: [u8; 32] = erasure
                        .get(at..at + 32)
                        .and_then(|b| b.try_into().ok())
                        .ok_or(Error::Corrupt("erasure key missing from the backup"))?;
                    if ek.iter().all(|b| *b == 0) {
                        None // destroyed: no versions may follow
                    } else {
                        Some(crypto::bind_key(master, &ek, ERASURE_LABEL)?)
                    }
                }
                None => None,
            };
            for (vk, vbytes) in rows(Table::Versions).filter(|(k, _)| k.starts_with(&id.0)) {
                let _ = vk;
                let v: VersionRecord =
                    serde_json::from_slice(vbytes).map_err(|_| Error::Corrupt("version record"))?;
                let sealed = crate::seal::unhex(&v.material)
                    .ok_or(Error::Corrupt("version record material"))?;
                let key = match (&bound, record.erasure_slot) {
                    (Some(k), _) => k,
                    (None, None) => master,
                    (None, Some(_)) => {
                        return Err(Error::Corrupt(
                            "a version of a key whose erasure key is erased",
                        ))
                    }
                };
                crypto::open_box(
                    key,
                    KEK_LABEL,
                    &kek_aad(&record.tenant, &id, v.version),
                    &sealed,
                )
                .map_err(|_| Error::Corrupt("a KEK version in the backup does not open"))?;
            }
        }
        Ok(())
    }

    /// Writes a verified restore: the sealed master key, the format, and `batch`, in one
    /// transaction that requires the store to be uninitialized.
    pub fn install(&self, sealed: &SealedMasterKey, mut batch: WriteBatch) -> Result<(), Error> {
        batch
            .require(Table::Meta, META_SEALED_MASTER, None)
            .put(Table::Meta, META_SEALED_MASTER, &to_json(sealed)?)
            .put(Table::Meta, META_FORMAT, STORE_FORMAT);
        match self.store.commit(&batch) {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict(_)) => Err(Error::InvalidState(
                "the store is already initialized; refusing to replace its master key",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds the usage counted since the last flush to the stored counters (the key sweep
    /// calls this; so does `seal`, and the dry run before it reads them). Each stored record
    /// is read and written back with what this node added, under a compare-and-swap, so
    /// nodes sharing a store add up their counts. Counts since the last flush are lost on
    /// a crash. Returns the number of records written.
    pub fn flush_usage(&self) -> Result<usize, Error> {
        let Ok(un) = self.unsealed() else {
            return Ok(0);
        };
        let now = self.clock.now();
        let (entries, retired): (Vec<Arc<KeyEntry>>, Vec<Arc<KeyEntry>>) = {
            let mut cache = un.cache.write().unwrap_or_else(PoisonError::into_inner);
            let mut all: Vec<Arc<KeyEntry>> =
                std::mem::take(&mut cache.evicted).into_values().collect();
            all.extend(cache.by_id.values().cloned());
            (all, std::mem::take(&mut cache.retired))
        };
        // Per stored record: the sum of what every copy counted, and the copies to mark.
        type Pending = (
            crate::usage::UsageRecord,
            Vec<(Arc<KeyEntry>, u32, crate::usage::UsageRecord)>,
        );
        let mut pending: BTreeMap<Vec<u8>, Pending> = BTreeMap::new();
        for (e, is_retired) in entries
            .iter()
            .map(|e| (e, false))
            .chain(retired.iter().map(|e| (e, true)))
        {
            // A retired copy of a key that is gone (destroyed) has nothing to save.
            if is_retired && self.store.get(Table::Keys, &e.key_id.0)?.is_none() {
                continue;
            }
            for (v, ve) in &e.versions {
                if ve.usage.take_dirty() {
                    let (current, delta) = ve.usage.unflushed(now);
                    let slot = pending.entry(version_key(&e.key_id, *v)).or_default();
                    slot.0.add(&delta, now);
                    slot.1.push((e.clone(), *v, current));
                }
            }
        }
        if pending.is_empty() {
            return Ok(0);
        }
        let result = (|| {
            for _ in 0..8 {
                let mut batch = WriteBatch::new();
                for (key, (delta, _)) in &pending {
                    let stored = self.store.get(Table::Usage, key)?;
                    let mut merged: crate::usage::UsageRecord = match &stored {
                        Some(b) => {
                            serde_json::from_slice(b).map_err(|_| Error::Corrupt("usage record"))?
                        }
                        None => Default::default(),
                    };
                    merged.add(delta, now);
                    batch.require(Table::Usage, key, stored.as_deref()).put(
                        Table::Usage,
                        key,
                        &to_json(&merged)?,
                    );
                }
                match self.store.commit(&batch) {
                    // Another node flushed one of these records meanwhile: read again.
                    Err(StoreError::Conflict(_)) => continue,
                    other => return other.map_err(Error::from),
                }
            }
            Err(Error::Storage(StoreError::Conflict("usage")))
        })();
        for (_, (_, copies)) in pending.iter() {
            for (e, v, current) in copies {
                if let Some(ve) = e.versions.get(v) {
                    match &result {
                        Ok(()) => ve.usage.mark_flushed(current.clone()),
                        Err(_) => ve.usage.mark_dirty(),
                    }
                }
            }
        }
        if result.is_err() {
            // Not saved: the retired copies wait for the next flush.
            let mut cache = un.cache.write().unwrap_or_else(PoisonError::into_inner);
            cache.retired.extend(retired);
        }
        result.map(|()| pending.len())
    }

    /// How many unwraps in the last `days` days would have failed had versions below
    /// `version` been retired.
    pub fn min_version_dry_run(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
        days: u32,
    ) -> Result<kms_client::api::MinVersionDryRun, Error> {
        if !(1..=30).contains(&days) {
            return Err(Error::InvalidRequest("window_days must be 1 to 30".into()));
        }
        let un = self.unsealed()?;
        let entry = self.entry_by_name(&un, tenant, name)?;
        if version == 0 || version > entry.record.current_version {
            return Err(Error::InvalidRequest(format!(
                "version must be between 1 and the current version ({})",
                entry.record.current_version
            )));
        }
        // The stored counters, after adding this node's: on a shared store they hold every
        // node's counts up to its last flush (at most one key sweep ago).
        self.flush_usage()?;
        let now = self.clock.now();
        let mut by_version: Vec<kms_client::api::VersionUnwraps> = Vec::new();
        for v in entry.versions.range(..version).map(|(v, _)| *v) {
            let stored: crate::usage::UsageRecord = match self
                .store
                .get(Table::Usage, &version_key(&entry.key_id, v))?
            {
                Some(b) => {
                    serde_json::from_slice(&b).map_err(|_| Error::Corrupt("usage record"))?
                }
                None => Default::default(),
            };
            by_version.push(kms_client::api::VersionUnwraps {
                version: v,
                unwraps: crate::usage::Usage::from_record(&stored)
                    .unwraps_within(now, u64::from(days)),
            });
        }
        Ok(kms_client::api::MinVersionDryRun {
            key: entry.record.name.clone(),
            version,
            window_days: days,
            unwraps_refused: by_version.iter().map(|v| v.unwraps).sum(),
            by_version,
        })
    }

    /// Rotates every enabled key whose rotation period has passed since its current
    /// version was made (the key sweep calls this). Reads only the due part of the
    /// rotation index (`Table::Rotations`), which it treats as a hint: each entry is
    /// checked against the key record, stale entries (destroyed keys, a period that no
    /// longer applies) are dropped or corrected. Disabled keys and keys pending deletion
    /// wait. Returns (tenant, name, new version) of each key rotated.
    pub fn rotate_due(&self, now: u64) -> Result<Vec<(String, String, u32)>, Error> {
        let Ok(un) = self.unsealed() else {
            return Ok(Vec::new());
        };
        self.build_rotation_index()?;
        let mut due = Vec::new();
        let mut fixes = WriteBatch::new();
        let mut start = Vec::new();
        'pages: loop {
            let page = self.store.scan_from(Table::Rotations, &start, 256)?;
            let Some((last, _)) = page.last() else { break };
            start = last.clone();
            start.push(0);
            for (index_key, _) in &page {
                let (when, id) = index_key.split_at(8.min(index_key.len()));
                let when = u64::from_be_bytes(
                    when.try_into()
                        .map_err(|_| Error::Corrupt("rotation index"))?,
                );
                if when > now {
                    break 'pages;
                }
                let id = KeyId(
                    id.try_into()
                        .map_err(|_| Error::Corrupt("rotation index"))?,
                );
                let entry = match self.load_entry(&un, id)? {
                    Some(e) if e.record.state != KeyState::Destroyed => e,
                    _ => {
                        fixes.delete(Table::Rotations, index_key);
                        continue;
                    }
                };
                let Some(period) = entry.record.rotation_period_secs else {
                    fixes.delete(Table::Rotations, index_key);
                    continue;
                };
                let actual = entry.current_born().saturating_add(period);
                if actual != when {
                    fixes.delete(Table::Rotations, index_key).put(
                        Table::Rotations,
                        &rotation_key(actual, &id),
                        b"",
                    );
                }
                if entry.record.state == KeyState::Enabled && actual <= now {
                    due.push((entry.record.tenant.clone(), entry.record.name.clone()));
                }
            }
        }
        if !fixes.writes.is_empty() {
            self.store.commit(&fixes)?;
        }
        let mut rotated = Vec::new();
        for (tenant, name) in due {
            let info = self.rotate(&tenant, &name)?;
            rotated.push((tenant, name, info.current_version));
        }
        Ok(rotated)
    }

    /// Builds the rotation index once for a store written before it existed: one pass
    /// over the key records (their versions' creation times are stored in clear).
    fn build_rotation_index(&self) -> Result<(), Error> {
        if self.store.get(Table::Meta, META_ROTATION_INDEX)?.is_some() {
            return Ok(());
        }
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut batch = WriteBatch::new();
        batch.require(Table::Meta, META_ROTATION_INDEX, None).put(
            Table::Meta,
            META_ROTATION_INDEX,
            b"1",
        );
        // Page through the keys: a million records must not be held at once.
        let mut records = Vec::new();
        let mut start = Vec::new();
        loop {
            let page = self.store.scan_from(Table::Keys, &start, 1024)?;
            let Some((last, _)) = page.last() else { break };
            start = last.clone();
            start.push(0);
            records.extend(page.into_iter().filter(|(_, bytes)| {
                // Cheap pre-filter; the record is parsed properly below.
                bytes.windows(20).any(|w| w == b"rotation_period_secs")
            }));
        }
        for (id, bytes) in records {
            let record: KeyRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("key record"))?;
            let (Some(period), false) = (
                record.rotation_period_secs,
                record.state == KeyState::Destroyed,
            ) else {
                continue;
            };
            let id = KeyId(
                id.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("key id"))?,
            );
            let born = match self
                .store
                .get(Table::Versions, &version_key(&id, record.current_version))?
            {
                Some(v) => {
                    serde_json::from_slice::<VersionRecord>(&v)
                        .map_err(|_| Error::Corrupt("version record"))?
                        .created_at
                }
                None => record.created_at,
            };
            batch.put(
                Table::Rotations,
                &rotation_key(born.saturating_add(period), &id),
                b"",
            );
        }
        match self.store.commit(&batch) {
            Ok(()) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Destroys every key whose deletion date is at or before `now`: in one transaction
    /// per key its version records (the sealed material) are deleted and its record says
    /// `destroyed`; then its erasure key is overwritten in place ([`crate::erasure`]), so
    /// copies of the sealed versions left in the store's free pages cannot be opened even
    /// with the master key. The deletion-index entry goes last: after a crash the next
    /// sweep finishes the erasure. Returns the keys destroyed now as (tenant, name). Works
    /// sealed too: destruction needs no key material.
    pub fn destroy_due(&self, now: u64) -> Result<Vec<(String, String)>, Error> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut destroyed = Vec::new();
        let mut finished = Vec::new();
        for (index_key, _) in self.store.scan_prefix(Table::Deletions, b"")? {
            let (Some(date), Some(id)) = (
                index_key.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                index_key
                    .get(8..)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok()),
            ) else {
                return Err(Error::Corrupt("deletion index"));
            };
            if u64::from_be_bytes(date) > now {
                break;
            }
            let id = KeyId(id);
            let record = match self.store.get(Table::Keys, &id.0)? {
                Some(bytes) => Some((
                    serde_json::from_slice::<KeyRecord>(&bytes)
                        .map_err(|_| Error::Corrupt("key record"))?,
                    bytes,
                )),
                None => None,
            };
            if let Some((mut record, bytes)) = record {
                if record.state == KeyState::PendingDeletion {
                    let mut batch = WriteBatch::new();
                    for (version_key, _) in self.store.scan_prefix(Table::Versions, &id.0)? {
                        batch.delete(Table::Versions, &version_key);
                    }
                    // Grants stay, as metadata: a granted caller learns `destroyed` (409),
                    // not a denial that would count toward its lockout.
                    record.state = KeyState::Destroyed;
                    batch.require(Table::Keys, &id.0, Some(&bytes)).put(
                        Table::Keys,
                        &id.0,
                        &to_json(&record)?,
                    );
                    self.store.commit(&batch)?;
                    destroyed.push((record.tenant.clone(), record.name.clone()));
                }
                if let (KeyState::Destroyed, Some(slot)) = (record.state, record.erasure_slot) {
                    let erasure = self.erasure.as_ref().ok_or(Error::InvalidState(
                        "cannot finish a destruction: the erasure file is not open",
                    ))?;
                    erasure.erase(slot)?;
                }
                if let (KeyState::Destroyed, Some(slot)) =
                    (record.state, record.shared_erasure_slot)
                {
                    let shared = self.shared_erasure.as_ref().ok_or(Error::InvalidState(
                        "cannot finish a destruction: the cluster's erasure keys need [seal] method = \"pkcs11\"",
                    ))?;
                    shared.erase(slot)?;
                }
            }
            finished.push((index_key, id));
        }
        // On a shared store the row deletions above are final only once the epoch they
        // were sealed under is gone: re-seal the rest under a new epoch (also after a
        // crash left one pending), then destroy the epochs whose retention has passed.
        // The deletion-index entries go after the rotation, so a crash repeats it.
        if let Some(shared) = &self.shared_erasure {
            if let Err(e) = shared.rotate(now).and_then(|_| shared.retire(now)) {
                // The destructions above are committed (and reported, for their audit
                // records); the epoch stays dirty and the next sweep, on any node, retries.
                tracing::error!(
                    error = %e,
                    "erasure epoch rotation failed; will retry (until it succeeds, older database copies still hold the destroyed keys' erasure keys)"
                );
                return Ok(destroyed);
            }
            shared.forget_stale();
        }
        for (index_key, id) in finished {
            let mut batch = WriteBatch::new();
            batch.delete(Table::Deletions, &index_key);
            self.store.commit(&batch)?;
            if let Ok(un) = self.unsealed() {
                self.cache_evict(&un, &id);
            }
        }
        Ok(destroyed)
    }

    /// The public key of an RSA KEK's `version` (the current one when `None`), for
    /// offline wrapping. Readers of the key's metadata (admin, auditor) may fetch it; an
    /// app needs a grant that lets it wrap (`wrap` or `datakey`, under any context: a
    /// public key says nothing of the contexts it will be used with). The key must be
    /// enabled, and the version must still unwrap (not retired).
    pub fn public_key(
        &self,
        who: &Principal,
        name: &str,
        version: Option<u32>,
    ) -> Result<(KeyInfo, u32, Vec<u8>), Error> {
        let un = self.unsealed()?;
        let entry = self.entry_by_name(&un, &who.tenant, name)?;
        if who.role == crate::policy::Role::App
            && !entry.record.grants.iter().any(|g| {
                g.identity == who.identity
                    && (g.operations.contains(&GrantOperation::Wrap)
                        || g.operations.contains(&GrantOperation::Datakey))
            })
        {
            return Err(Error::PermissionDenied(
                "no grant on this key lets this identity wrap with it",
            ));
        }
        if entry.record.algorithm.rsa_bits().is_none() {
            return Err(Error::InvalidRequest(format!(
                "key {name} is {}: only RSA keys have a public key",
                entry.record.algorithm.as_str()
            )));
        }
        entry.check_usable()?;
        let version = version.unwrap_or(entry.record.current_version);
        if version < entry.record.min_decrypt_version {
            return Err(Error::InvalidRequest(format!(
                "version {version} is retired (below min_decrypt_version {})",
                entry.record.min_decrypt_version
            )));
        }
        let der = entry
            .versions
            .get(&version)
            .and_then(|v| v.material.public_key_der())
            .ok_or(Error::NotFound)?
            .to_vec();
        Ok((entry.info(), version, der))
    }

    // ---- cryptographic operations ----

    fn wrap_with(&self, entry: &KeyEntry, dek: &[u8], canonical: &[u8]) -> Result<Wrapped, Error> {
        entry.check_usable()?;
        let version = entry.record.current_version;
        let kek = entry
            .versions
            .get(&version)
            .ok_or(Error::Corrupt("current version missing"))?;
        let header = Header {
            key_id: entry.key_id,
            version,
        };
        let wrapped = kek.material.wrap(&header, dek, canonical)?;
        kek.usage.wrap(self.clock.now());
        Ok(Wrapped {
            wrapped,
            key: entry.record.name.clone(),
            version,
        })
    }

    /// Generates a 32-byte DEK and returns it in clear and wrapped.
    pub fn datakey(
        &self,
        who: &Principal,
        name: &str,
        context: &Context,
    ) -> Result<DataKey, Error> {
        self.lookups()?.datakey(who, name, context)
    }

    /// Wraps a caller-supplied DEK (16–64 bytes).
    pub fn wrap(
        &self,
        who: &Principal,
        name: &str,
        dek: &[u8],
        context: &Context,
    ) -> Result<Wrapped, Error> {
        self.lookups()?.wrap(who, name, dek, context)
    }

    /// Unwraps a wrapped DEK of the caller's tenant, bound to `context`.
    pub fn unwrap(
        &self,
        who: &Principal,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Unwrapped, Error> {
        self.lookups()?.unwrap(who, wrapped, context)
    }

    /// Re-wraps under the key's current version with the same context. The DEK never
    /// leaves the server.
    pub fn rewrap(
        &self,
        who: &Principal,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Wrapped, Error> {
        self.lookups()?.rewrap(who, wrapped, context)
    }

    /// A deep health check for protocols that ask for one (XKS GetHealthStatus): the
    /// keyring is unsealed, the store answers a read (the sealed master key), and a seal
    /// and open round trip succeeds under a dedicated test key (derived from the master
    /// key under its own label; it protects nothing).
    pub fn self_test(&self) -> Result<(), Error> {
        let un = self.unsealed()?;
        self.sealed_master_key()?
            .ok_or(Error::Corrupt("the master key record is missing"))?;
        let probe = crypto::bind_key(
            &un.master,
            &[0u8; crypto::SALT_LEN],
            b"keyhold/self-test/v1",
        )?;
        let message = SecretVec::random(32)?;
        let sealed = crypto::seal_box(&probe, b"self-test", b"", message.expose_secret())?;
        let opened = crypto::open_box(&probe, b"self-test", b"", &sealed)
            .map_err(|_| Error::Internal("self-test: the sealed probe did not open"))?;
        if opened != message {
            return Err(Error::Internal("self-test: the probe came back altered"));
        }
        Ok(())
    }

    /// A scope for the key operations of one request ([`Lookups`]). Fails when sealed.
    pub fn lookups(&self) -> Result<Lookups<'_>, Error> {
        self.check_fresh()?;
        Ok(Lookups {
            keyring: self,
            un: self.unsealed()?,
            entries: Vec::new(),
            unwraps: Vec::new(),
        })
    }
}

impl Drop for Lookups<'_> {
    fn drop(&mut self) {
        if self.unwraps.iter().any(|&(_, n)| n > 0) {
            let now = self.keyring.clock.now();
            for i in 0..self.entries.len() {
                self.count_unwraps(i, now);
            }
        }
    }
}

/// Most distinct keys a [`Lookups`] remembers; beyond that, items go to the shared cache.
const LOOKUPS_KEPT: usize = 16;

/// The key operations of one request (a batch's items, or a single call): the unsealed
/// state and each key's cache entry are fetched from the shared cache once and reused by
/// the following items. The shared cache's lock and the entries' reference counts are
/// written by every worker; touched once per item they cost a batch a tenth of its CPU
/// (`BENCHMARKS.md`, batch section). A key disabled or destroyed while a batch runs is
/// seen by the next request, as for any request already past its lookup.
///
/// Unwraps are counted in the usage counters once per key version when the scope ends
/// (or its entry is let go), not once per item, for the same reason.
pub struct Lookups<'k> {
    keyring: &'k Keyring,
    un: Arc<Unsealed>,
    entries: Vec<Arc<KeyEntry>>,
    /// Beside each of `entries`: unwraps not yet counted, (version, count).
    unwraps: Vec<(u32, u32)>,
}

impl Lookups<'_> {
    fn remember(&mut self, entry: Arc<KeyEntry>) -> usize {
        if self.entries.len() == LOOKUPS_KEPT {
            let now = self.keyring.clock.now();
            self.count_unwraps(self.entries.len() - 1, now);
            self.entries.pop();
            self.unwraps.pop();
        }
        self.entries.push(entry);
        self.unwraps.push((0, 0));
        self.entries.len() - 1
    }

    /// Counts the unwraps held for `entries[i]` at `now`.
    fn count_unwraps(&mut self, i: usize, now: u64) {
        if let (Some(entry), Some(pending)) = (self.entries.get(i), self.unwraps.get_mut(i)) {
            let (version, n) = std::mem::take(pending);
            if let Some(kek) = entry.versions.get(&version) {
                kek.usage.unwraps_at(now, n);
            }
        }
    }

    /// Holds one unwrap under `version` of `entries[i]`, to be counted when the scope ends
    /// (at once for the unwraps held under another version of the same key).
    fn held_unwrap(&mut self, i: usize, version: u32) {
        let Some(&(v, n)) = self.unwraps.get(i) else {
            return;
        };
        if v != version && n > 0 {
            let now = self.keyring.clock.now();
            self.count_unwraps(i, now);
        }
        let n = if v == version { n } else { 0 };
        self.unwraps[i] = (version, n.saturating_add(1));
    }

    /// The index in `entries` of key `id` of `tenant`; `None`: no such key there.
    fn by_id(&mut self, tenant: &str, id: KeyId) -> Result<Option<usize>, Error> {
        let found = self.entries.iter().position(|e| e.key_id == id);
        let i = match found {
            Some(i) => i,
            None => match self.keyring.load_entry(&self.un, id)? {
                Some(e) => self.remember(e),
                None => return Ok(None),
            },
        };
        Ok((self.entries[i].record.tenant == tenant).then_some(i))
    }

    fn by_name(&mut self, tenant: &str, name: &str) -> Result<usize, Error> {
        validate_name(name)?;
        let found = self
            .entries
            .iter()
            .position(|e| e.record.tenant == tenant && e.record.name == name);
        match found {
            Some(i) => Ok(i),
            None => {
                let e = self.keyring.entry_by_name(&self.un, tenant, name)?;
                Ok(self.remember(e))
            }
        }
    }

    /// As [`Keyring::datakey`].
    pub fn datakey(
        &mut self,
        who: &Principal,
        name: &str,
        context: &Context,
    ) -> Result<DataKey, Error> {
        let canonical = format::canonical_context(context)?;
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Datakey, context)?;
        entry.check_usable()?;
        let dek = SecretVec::random(DATAKEY_LEN)?;
        let w = self
            .keyring
            .wrap_with(entry, dek.expose_secret(), &canonical)?;
        Ok(DataKey {
            plaintext: dek,
            wrapped: w.wrapped,
            key: w.key,
            version: w.version,
        })
    }

    /// As [`Keyring::wrap`].
    pub fn wrap(
        &mut self,
        who: &Principal,
        name: &str,
        dek: &[u8],
        context: &Context,
    ) -> Result<Wrapped, Error> {
        format::check_dek_len(dek.len())?;
        let canonical = format::canonical_context(context)?;
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Wrap, context)?;
        self.keyring.wrap_with(entry, dek, &canonical)
    }

    /// Finds the key a wrapped DEK names (of the caller's tenant, else `DecryptFailed`:
    /// a foreign key looks like garbage), checks the grant for `op`, the key state and
    /// the version, and opens it. Returns the entry's index, the version, the DEK and the
    /// canonical context (a rewrap binds the new wrapped DEK to it).
    fn open_wrapped(
        &mut self,
        who: &Principal,
        op: GrantOperation,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<(usize, u32, SecretVec, Vec<u8>), Error> {
        let canonical = format::canonical_context(context)?;
        let header = format::parse_header(wrapped).map_err(|_| Error::DecryptFailed)?;
        let i = self
            .by_id(&who.tenant, header.key_id)?
            .ok_or(Error::DecryptFailed)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, op, context)?;
        entry.check_usable()?;
        if header.version < entry.record.min_decrypt_version {
            return Err(Error::DecryptFailed);
        }
        let kek = entry
            .versions
            .get(&header.version)
            .ok_or(Error::DecryptFailed)?;
        let dek = kek
            .material
            .unwrap(wrapped, &canonical)
            .map_err(|_| Error::DecryptFailed)?;
        self.held_unwrap(i, header.version);
        Ok((i, header.version, dek, canonical))
    }

    /// What `who` may do with key `name` of its tenant.
    pub fn key_use(&mut self, who: &Principal, name: &str) -> Result<KeyUse, Error> {
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        let none = Context::new();
        Ok(KeyUse {
            algorithm: entry.record.algorithm,
            state: entry.record.state,
            can_encrypt: entry
                .check_grant(&who.identity, GrantOperation::Wrap, &none)
                .is_ok(),
            can_decrypt: entry
                .check_grant(&who.identity, GrantOperation::Unwrap, &none)
                .is_ok(),
        })
    }

    /// The AES-256 material of `version` of entry `i`, or `missing`.
    fn aes_version(
        &self,
        i: usize,
        version: u32,
        missing: Error,
    ) -> Result<(&SecretKey, &crate::usage::Usage), Error> {
        let kek = self.entries[i].versions.get(&version).ok_or(missing)?;
        match &kek.material {
            crate::kek::Kek::Aes(key) => Ok((key, &kek.usage)),
            crate::kek::Kek::Rsa(_) => Err(Error::InvalidRequest(
                "detached encryption needs an AES-256 key".into(),
            )),
        }
    }

    /// Encrypts `plaintext` bound to `aad` under key `name`'s current version, detached
    /// ([`DetachedCiphertext`]). Needs a `wrap` grant (no context) and an enabled
    /// AES-256 key.
    /// The AAD may name the version (`aad_for(version)`): protocols that keep the version
    /// beside the ciphertext authenticate it that way.
    pub fn encrypt_detached(
        &mut self,
        who: &Principal,
        name: &str,
        aad_for: impl FnOnce(u32) -> Vec<u8>,
        plaintext: &[u8],
    ) -> Result<DetachedCiphertext, Error> {
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Wrap, &Context::new())?;
        entry.check_usable()?;
        let version = entry.record.current_version;
        let key_name = entry.record.name.clone();
        let (key, usage) =
            self.aes_version(i, version, Error::Corrupt("current version missing"))?;
        let mut iv = [0u8; crate::crypto::DETACHED_SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut iv)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        let mut ciphertext = plaintext.to_vec();
        let aad = aad_for(version);
        let tag = crate::crypto::seal_detached(key, &iv, DETACHED_LABEL, &aad, &mut ciphertext)?;
        usage.wrap(self.keyring.clock.now());
        Ok(DetachedCiphertext {
            key: key_name,
            version,
            iv,
            ciphertext,
            tag,
        })
    }

    /// Checks that `c`, just made by [`Lookups::encrypt_detached`] for `who`, opens under
    /// `aad` to `plaintext` (compared in constant time): the test decryption protocols ask
    /// for before the ciphertext is trusted (XKS CDIV). Returns nothing to the caller, so
    /// it needs no `unwrap` grant and counts no use.
    pub fn verify_detached(
        &mut self,
        who: &Principal,
        c: &DetachedCiphertext,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(), Error> {
        let i = self.by_name(&who.tenant, &c.key)?;
        let (key, _) = self.aes_version(
            i,
            c.version,
            Error::Internal("test decryption: version missing"),
        )?;
        let mut buf = zeroize::Zeroizing::new(c.ciphertext.clone());
        let opened =
            crate::crypto::open_detached(key, &c.iv, DETACHED_LABEL, aad, &mut buf, &c.tag);
        let same: bool = subtle::ConstantTimeEq::ct_eq(&buf[..], plaintext).into();
        if opened.is_err() || !same {
            return Err(Error::Internal(
                "test decryption of a fresh ciphertext failed",
            ));
        }
        Ok(())
    }

    /// The entry of key `name` if `who` may decrypt under its `version` with the protocol
    /// adapters' detached operations: an `unwrap` grant (no context), an enabled key, a
    /// version not retired (else the opaque `DecryptFailed`).
    fn decryptable(&mut self, who: &Principal, name: &str, version: u32) -> Result<usize, Error> {
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Unwrap, &Context::new())?;
        entry.check_usable()?;
        if version < entry.record.min_decrypt_version {
            return Err(Error::DecryptFailed);
        }
        Ok(i)
    }

    /// Reverses [`Lookups::encrypt_detached`] with the version the caller kept. Needs an
    /// `unwrap` grant (no context) and an enabled key; a version below the key's minimum
    /// decrypt version, an unknown one, or any altered byte is the opaque `DecryptFailed`.
    #[allow(clippy::too_many_arguments)]
    pub fn decrypt_detached(
        &mut self,
        who: &Principal,
        name: &str,
        version: u32,
        iv: &[u8; crate::crypto::DETACHED_SALT_LEN],
        ciphertext: &[u8],
        tag: &[u8; crate::crypto::TAG_LEN],
        aad: &[u8],
    ) -> Result<Unwrapped, Error> {
        let i = self.decryptable(who, name, version)?;
        let key_name = self.entries[i].record.name.clone();
        let (key, _) = self.aes_version(i, version, Error::DecryptFailed)?;
        let mut buf = zeroize::Zeroizing::new(ciphertext.to_vec());
        crate::crypto::open_detached(key, iv, DETACHED_LABEL, aad, &mut buf, tag)
            .map_err(|_| Error::DecryptFailed)?;
        self.held_unwrap(i, version);
        Ok(Unwrapped {
            plaintext: SecretVec::new(std::mem::take(&mut *buf)),
            key: key_name,
            version,
        })
    }

    /// RSA-OAEP-SHA-256 decryption with no label under `version` of RSA key `name`
    /// (Microsoft DKE). Needs an `unwrap` grant (no context) and an enabled key; a retired
    /// or unknown version, or a ciphertext that does not open, is `DecryptFailed`.
    pub fn decrypt_unlabelled(
        &mut self,
        who: &Principal,
        name: &str,
        version: u32,
        ciphertext: &[u8],
    ) -> Result<Unwrapped, Error> {
        let i = self.decryptable(who, name, version)?;
        let entry = &self.entries[i];
        let key_name = entry.record.name.clone();
        let kek = entry.versions.get(&version).ok_or(Error::DecryptFailed)?;
        let plaintext = kek
            .material
            .decrypt_unlabelled(ciphertext)
            .ok_or_else(|| Error::InvalidRequest(format!("key {key_name} is not an RSA key")))?
            .map_err(|_| Error::DecryptFailed)?;
        self.held_unwrap(i, version);
        Ok(Unwrapped {
            plaintext,
            key: key_name,
            version,
        })
    }

    /// The id (hex) of key `name` of `who`'s tenant.
    pub fn key_id(&mut self, who: &Principal, name: &str) -> Result<String, Error> {
        let i = self.by_name(&who.tenant, name)?;
        Ok(self.entries[i].record.id.clone())
    }

    /// As [`Keyring::unwrap`].
    pub fn unwrap(
        &mut self,
        who: &Principal,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Unwrapped, Error> {
        let (i, version, plaintext, _) =
            self.open_wrapped(who, GrantOperation::Unwrap, wrapped, context)?;
        Ok(Unwrapped {
            plaintext,
            key: self.entries[i].record.name.clone(),
            version,
        })
    }

    /// As [`Keyring::rewrap`].
    pub fn rewrap(
        &mut self,
        who: &Principal,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Wrapped, Error> {
        let (i, _, dek, canonical) =
            self.open_wrapped(who, GrantOperation::Rewrap, wrapped, context)?;
        self.keyring
            .wrap_with(&self.entries[i], dek.expose_secret(), &canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::RedbStore;
    use crate::seal::KeyFileSealer;

    fn setup() -> (tempfile::TempDir, Keyring, KeyFileSealer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let kf = dir.path().join("m.key");
        KeyFileSealer::generate(&kf).unwrap();
        let sealer = KeyFileSealer::new(kf);
        let ring = Keyring::new(store);
        ring.initialize(&sealer).unwrap();
        (dir, ring, sealer)
    }

    fn who(tenant: &str) -> Principal {
        Principal {
            identity: "app".into(),
            tenant: tenant.into(),
            role: crate::policy::Role::App,
        }
    }

    fn all_grant() -> Vec<Grant> {
        vec![Grant::new("app", &GrantOperation::ALL)]
    }

    fn ctx(k: &str, v: &str) -> Context {
        [(k.to_string(), v.to_string())].into_iter().collect()
    }

    #[test]
    fn sealed_refuses_and_reinit_refused() {
        let (_d, ring, sealer) = setup();
        assert!(matches!(ring.list_keys("t"), Err(Error::Sealed)));
        assert!(matches!(
            ring.initialize(&sealer),
            Err(Error::InvalidState(_))
        ));
        ring.unseal(&sealer).unwrap();
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        ring.seal();
        assert!(matches!(
            ring.datakey(&who("t"), "k", &Context::new()),
            Err(Error::Sealed)
        ));
    }

    #[test]
    fn lifecycle() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        assert!(matches!(
            ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant()),
            Err(Error::AlreadyExists)
        ));
        let dk = ring.datakey(&who("t"), "k", &ctx("a", "1")).unwrap();
        let info = ring.rotate("t", "k").unwrap();
        assert_eq!(info.current_version, 2);
        assert_eq!(info.versions.len(), 2);
        let un = ring.unwrap(&who("t"), &dk.wrapped, &ctx("a", "1")).unwrap();
        assert_eq!(un.plaintext, dk.plaintext);
        assert_eq!(un.version, 1);
        let re = ring.rewrap(&who("t"), &dk.wrapped, &ctx("a", "1")).unwrap();
        assert_eq!(re.version, 2);
        assert_eq!(
            ring.unwrap(&who("t"), &re.wrapped, &ctx("a", "1"))
                .unwrap()
                .plaintext,
            dk.plaintext
        );
        assert!(matches!(
            ring.unwrap(&who("t"), &dk.wrapped, &ctx("a", "2")),
            Err(Error::DecryptFailed)
        ));
        assert!(matches!(
            ring.unwrap(&who("other"), &dk.wrapped, &ctx("a", "1")),
            Err(Error::DecryptFailed)
        ));
        ring.set_enabled("t", "k", false).unwrap();
        assert!(matches!(
            ring.unwrap(&who("t"), &dk.wrapped, &ctx("a", "1")),
            Err(Error::KeyDisabled(KeyState::Disabled))
        ));
        ring.set_enabled("t", "k", true).unwrap();
        // A fresh keyring over the same store (a restart) reads everything back.
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert_eq!(ring.key_info("t", "k").unwrap().current_version, 2);
        assert!(ring.unwrap(&who("t"), &dk.wrapped, &ctx("a", "1")).is_ok());
        assert!(matches!(ring.key_info("other", "k"), Err(Error::NotFound)));
    }

    #[test]
    fn swapped_version_record_fails_to_open() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let a = ring
            .create_key("t", "a", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let b = ring
            .create_key("t", "b", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let ida = KeyId::from_hex(&a.id).unwrap();
        let idb = KeyId::from_hex(&b.id).unwrap();
        // Copy b's version-1 record over a's: AAD binding must refuse it.
        let vb = ring
            .store()
            .get(Table::Versions, &version_key(&idb, 1))
            .unwrap()
            .unwrap();
        let mut batch = WriteBatch::new();
        batch.put(Table::Versions, &version_key(&ida, 1), &vb);
        ring.store().commit(&batch).unwrap();
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert!(matches!(ring.key_info("t", "a"), Err(Error::Corrupt(_))));
        assert!(ring.key_info("t", "b").is_ok());
    }

    #[test]
    fn grants_default_deny_and_constraints() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, vec![])
            .unwrap();
        let app = who("t");
        let other = Principal {
            identity: "other".into(),
            ..who("t")
        };
        // No grant: denied.
        assert!(matches!(
            ring.datakey(&app, "k", &Context::new()),
            Err(Error::PermissionDenied(_))
        ));
        let mut unwrap_acme = Grant::new("other", &[GrantOperation::Unwrap]);
        unwrap_acme.constraints.context_subset = Some(ctx("tenant", "acme"));
        ring.set_grants(
            "t",
            "k",
            vec![Grant::new("app", &[GrantOperation::Datakey]), unwrap_acme],
        )
        .unwrap();
        let acme = ctx("tenant", "acme");
        let dk = ring.datakey(&app, "k", &acme).unwrap();
        let globex = ring.datakey(&app, "k", &ctx("tenant", "globex")).unwrap();
        // app may not unwrap (datakey only); other may, for acme only.
        assert!(matches!(
            ring.unwrap(&app, &dk.wrapped, &acme),
            Err(Error::PermissionDenied(_))
        ));
        assert_eq!(
            ring.unwrap(&other, &dk.wrapped, &acme).unwrap().plaintext,
            dk.plaintext
        );
        assert!(matches!(
            ring.unwrap(&other, &globex.wrapped, &ctx("tenant", "globex")),
            Err(Error::PermissionDenied(_))
        ));
        // Lying about the context to pass the constraint fails the decryption.
        assert!(matches!(
            ring.unwrap(&other, &globex.wrapped, &acme),
            Err(Error::DecryptFailed)
        ));
        assert!(matches!(
            ring.rewrap(&other, &dk.wrapped, &acme),
            Err(Error::PermissionDenied(_))
        ));
        // Bad grant sets are refused and change nothing.
        for bad in [
            vec![Grant::new("", &[GrantOperation::Wrap])],
            vec![Grant::new("x", &[])],
            vec![Grant::new(
                "x",
                &[GrantOperation::Wrap, GrantOperation::Wrap],
            )],
        ] {
            assert!(matches!(
                ring.set_grants("t", "k", bad),
                Err(Error::InvalidRequest(_))
            ));
        }
        assert_eq!(ring.key_info("t", "k").unwrap().grants.len(), 2);
    }

    #[test]
    fn destruction_erases_the_erasure_key_so_leftover_copies_do_not_open() {
        let (d, ring, sealer) = setup();
        let erasure = Arc::new(crate::erasure::ErasureFile::open(&d.path().join("e")).unwrap());
        let ring = Keyring::with_clock(ring.store().clone(), crate::clock::Clock::system())
            .with_erasure(erasure.clone());
        ring.unseal(&sealer).unwrap();
        let app = who("t");
        let info = ring
            .create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        ring.rotate("t", "k").unwrap();
        let dk = ring.datakey(&app, "k", &Context::new()).unwrap();
        let id = KeyId::from_hex(&info.id).unwrap();
        // What an attacker could find in the store's free pages afterwards.
        let leftovers = ring.store().scan_prefix(Table::Versions, &id.0).unwrap();
        assert_eq!(leftovers.len(), 2);
        ring.schedule_deletion("t", "k", 7, 0).unwrap();
        assert_eq!(ring.destroy_due(7 * 86_400).unwrap().len(), 1);
        assert!(erasure.get(0).unwrap().is_none(), "the erasure key is gone");
        assert!(matches!(
            ring.unwrap(&app, &dk.wrapped, &Context::new()),
            Err(Error::KeyDisabled(KeyState::Destroyed))
        ));
        // Put the old version records back (as if read from free pages): still unreadable
        // with the master key.
        let mut batch = WriteBatch::new();
        for (k, v) in &leftovers {
            batch.put(Table::Versions, k, v);
        }
        ring.store().commit(&batch).unwrap();
        let record: KeyRecord =
            serde_json::from_slice(&ring.store().get(Table::Keys, &id.0).unwrap().unwrap())
                .unwrap();
        let un = ring.unsealed().unwrap();
        for (_, v) in &leftovers {
            let v: VersionRecord = serde_json::from_slice(v).unwrap();
            assert!(ring.open_version(&un, &record, &id, &v).is_err());
            // Nor under the master key alone.
            let sealed = crate::seal::unhex(&v.material).unwrap();
            assert!(crypto::open_box(
                &un.master,
                KEK_LABEL,
                &kek_aad("t", &id, v.version),
                &sealed
            )
            .is_err());
        }
    }

    #[test]
    fn deletion_window_cancel_and_destroy() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let app = who("t");
        for name in ["a", "b", "c"] {
            ring.create_key("t", name, Algorithm::Aes256Gcm, None, all_grant())
                .unwrap();
        }
        let dk = ring.datakey(&app, "a", &Context::new()).unwrap();
        let t0 = 1_000_000;
        for days in [0, 6, 31] {
            assert!(matches!(
                ring.schedule_deletion("t", "a", days, t0),
                Err(Error::InvalidRequest(_))
            ));
        }
        let info = ring.schedule_deletion("t", "a", 7, t0).unwrap();
        assert_eq!(info.state, KeyState::PendingDeletion);
        assert!(info.deletion_date.is_some());
        ring.schedule_deletion("t", "b", 10, t0).unwrap();
        ring.schedule_deletion("t", "c", 7, t0).unwrap();
        assert!(matches!(
            ring.unwrap(&app, &dk.wrapped, &Context::new()),
            Err(Error::KeyDisabled(KeyState::PendingDeletion))
        ));
        assert!(matches!(
            ring.set_enabled("t", "a", true),
            Err(Error::InvalidState(_))
        ));
        assert_eq!(
            ring.cancel_deletion("t", "c").unwrap().state,
            KeyState::Disabled
        );
        // Not yet due.
        assert!(ring.destroy_due(t0 + 7 * 86_400 - 1).unwrap().is_empty());
        // Due: a goes (b later, c cancelled); sealed does not matter.
        ring.seal();
        assert_eq!(
            ring.destroy_due(t0 + 7 * 86_400).unwrap(),
            vec![("t".to_string(), "a".to_string())]
        );
        ring.unseal(&sealer).unwrap();
        let a = ring.key_info("t", "a").unwrap();
        assert_eq!(a.state, KeyState::Destroyed);
        assert!(a.versions.is_empty());
        let id = KeyId::from_hex(&a.id).unwrap();
        assert!(ring
            .store()
            .scan_prefix(Table::Versions, &id.0)
            .unwrap()
            .is_empty());
        assert!(matches!(
            ring.unwrap(&app, &dk.wrapped, &Context::new()),
            Err(Error::KeyDisabled(KeyState::Destroyed))
        ));
        assert!(matches!(
            ring.cancel_deletion("t", "a"),
            Err(Error::InvalidState(_))
        ));
        assert_eq!(
            ring.destroy_due(t0 + 30 * 86_400).unwrap(),
            vec![("t".to_string(), "b".to_string())]
        );
        assert_eq!(ring.key_info("t", "c").unwrap().state, KeyState::Disabled);
        assert!(ring.destroy_due(u64::MAX).unwrap().is_empty());
    }

    #[test]
    fn min_decrypt_version_retires() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let app = who("t");
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let old = ring.datakey(&app, "k", &Context::new()).unwrap();
        ring.rotate("t", "k").unwrap();
        assert!(matches!(
            ring.set_min_decrypt_version("t", "k", 3),
            Err(Error::InvalidRequest(_))
        ));
        let info = ring.set_min_decrypt_version("t", "k", 2).unwrap();
        assert!(!info.versions[0].can_unwrap);
        assert!(matches!(
            ring.unwrap(&app, &old.wrapped, &Context::new()),
            Err(Error::DecryptFailed)
        ));
        ring.set_min_decrypt_version("t", "k", 1).unwrap();
        assert!(ring.unwrap(&app, &old.wrapped, &Context::new()).is_ok());
    }

    #[test]
    fn rotation_index_drives_the_sweep_and_is_built_for_old_stores() {
        let (_dir, ring, sealer) = setup();
        let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let o = offset.clone();
        let ring = Keyring::with_clock(
            ring.store().clone(),
            crate::clock::Clock::from_fn(move || {
                crate::clock::Clock::system().now() + o.load(std::sync::atomic::Ordering::SeqCst)
            }),
        );
        let advance = |secs: u64| offset.fetch_add(secs, std::sync::atomic::Ordering::SeqCst);
        ring.unseal(&sealer).unwrap();
        let day = 86_400;
        ring.create_key(
            "t",
            "a",
            Algorithm::Aes256Gcm,
            Some(Duration::from_secs(30 * day)),
            all_grant(),
        )
        .unwrap();
        ring.create_key(
            "t",
            "b",
            Algorithm::Aes256Gcm,
            Some(Duration::from_secs(10 * day)),
            all_grant(),
        )
        .unwrap();
        ring.create_key("t", "none", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let index = |ring: &Keyring| {
            ring.store()
                .scan_prefix(Table::Rotations, b"")
                .unwrap()
                .len()
        };
        assert_eq!(index(&ring), 2, "one entry per key with a period");
        let now = || ring.clock().now();
        assert!(ring.rotate_due(now()).unwrap().is_empty());
        // 11 days: b only, and its entry moves 10 days on.
        advance(11 * day);
        let r = ring.rotate_due(now()).unwrap();
        assert_eq!(r, vec![("t".to_string(), "b".to_string(), 2)]);
        assert_eq!(index(&ring), 2);
        assert!(
            ring.rotate_due(now()).unwrap().is_empty(),
            "once per period"
        );
        // A disabled key waits; enabled again, it rotates.
        ring.set_enabled("t", "a", false).unwrap();
        advance(20 * day);
        assert!(ring
            .rotate_due(now())
            .unwrap()
            .iter()
            .all(|(_, n, _)| n != "a"));
        ring.set_enabled("t", "a", true).unwrap();
        assert!(ring
            .rotate_due(now())
            .unwrap()
            .iter()
            .any(|(_, n, _)| n == "a"));
        // A store from before the index: no entries, no marker. The sweep builds it.
        let mut wipe = WriteBatch::new();
        for (k, _) in ring.store().scan_prefix(Table::Rotations, b"").unwrap() {
            wipe.delete(Table::Rotations, &k);
        }
        wipe.delete(Table::Meta, META_ROTATION_INDEX);
        ring.store().commit(&wipe).unwrap();
        assert_eq!(index(&ring), 0);
        advance(100 * day);
        let r = ring.rotate_due(now()).unwrap();
        let mut names: Vec<_> = r.iter().map(|(_, n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(index(&ring), 2);
    }

    #[test]
    fn bounded_cache_evicts_and_keeps_unsaved_usage() {
        let (_dir, ring, sealer) = setup();
        let ring = Keyring::new(ring.store().clone()).with_cache_limit(16);
        ring.unseal(&sealer).unwrap();
        let ctx = Context::new();
        let mut wrapped = Vec::new();
        for i in 0..100 {
            let name = format!("k{i}");
            ring.create_key("t", &name, Algorithm::Aes256Gcm, None, all_grant())
                .unwrap();
            wrapped.push(ring.datakey(&who("t"), &name, &ctx).unwrap());
        }
        let cached = |ring: &Keyring| ring.unsealed().unwrap().cache.read().unwrap().by_id.len();
        assert!(cached(&ring) <= 16, "{} cached", cached(&ring));
        // Every key still works (reloaded from the store), twice.
        for _ in 0..2 {
            for d in &wrapped {
                let u = ring.unwrap(&who("t"), &d.wrapped, &ctx).unwrap();
                assert_eq!(u.plaintext.expose_secret(), d.plaintext.expose_secret());
            }
        }
        assert!(cached(&ring) <= 16);
        // No count was lost to eviction: 1 wrap + 2 unwraps per key, once saved.
        ring.flush_usage().unwrap();
        for i in 0..100 {
            let info = ring.key_info("t", &format!("k{i}")).unwrap();
            let v = &info.versions[0];
            assert_eq!((v.wraps, v.unwraps), (1, 2), "k{i}");
        }
    }

    #[test]
    fn audit_keys_derive_as_before_and_survive_master_rotation() {
        // The derivation is the one earlier versions used (ring's HMAC key from HKDF
        // output), so chains MAC'd before this change still verify.
        let master = SecretKey::from_slice(&[3u8; 32]).unwrap();
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"keyhold/derived/v1")
            .extract(master.expose_secret());
        let old = |label: &[u8]| {
            ring::hmac::Key::from(prk.expand(&[label], ring::hmac::HMAC_SHA256).unwrap())
        };
        let keys = derived_audit_keys(&master).unwrap();
        let new = |k: &[u8]| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
        for (label, half) in [
            (&b"audit-head-mac"[..], &keys[..32]),
            (b"audit-context-hash", &keys[32..]),
        ] {
            assert_eq!(
                ring::hmac::sign(&old(label), b"x").as_ref(),
                ring::hmac::sign(&new(half), b"x").as_ref()
            );
        }
        // Across a master-key rotation and a re-unseal, MACs stay the same.
        let (_dir, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let before = ring.audit_mac(b"head").unwrap();
        let ctx_before = ring.audit_context_hash(&ctx("a", "1")).unwrap();
        ring.rotate_master(&sealer).unwrap();
        assert_eq!(ring.audit_mac(b"head").unwrap(), before);
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert_eq!(ring.audit_mac(b"head").unwrap(), before);
        assert_eq!(ring.audit_context_hash(&ctx("a", "1")).unwrap(), ctx_before);
        ring.rotate_master(&sealer).unwrap();
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert_eq!(ring.audit_mac_verify(b"head", &before), Some(true));
    }
}
