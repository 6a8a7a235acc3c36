//! The in-memory cache of decrypted keys ([`KeyEntry`]): loading from the store, the
//! bound on its size, invalidation (here or, on a shared store, by the change feed) and
//! the freshness bound that makes key use fail closed when the feed falls behind.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use kms_client::api::{Context, GrantOperation, KeyInfo, KeyState, KeyVersionInfo};

use super::records::{
    format_period, kek_aad, name_key, rfc3339, validate_name, version_of_key, KeyRecord,
    VersionRecord,
};
use super::vault::{Unsealed, KEK_LABEL};
use super::Keyring;
use crate::base::error::Error;
use crate::crypto::aead;
use crate::crypto::format::KeyId;
use crate::crypto::secret::SecretKey;
use crate::storage::{StoreError, Table};

pub(super) struct VersionEntry {
    pub(super) created_at: u64,
    /// `created_at` as RFC 3339, formatted once (KeyInfo lists every version).
    pub(super) created_at_text: String,
    pub(super) material: crate::crypto::kek::Kek,
    pub(super) usage: crate::base::usage::Usage,
}

/// A key with its decrypted versions, as cached.
pub(super) struct KeyEntry {
    pub(super) key_id: KeyId,
    pub(super) record: KeyRecord,
    /// The exact stored bytes, for compare-and-swap on update.
    pub(super) record_bytes: Vec<u8>,
    pub(super) versions: BTreeMap<u32, Arc<VersionEntry>>,
    /// Versions whose stored material did not open when the key was loaded, with their
    /// creation time (reported, never used; the other versions serve).
    pub(super) unreadable: Vec<(u32, u64)>,
}

impl KeyEntry {
    pub(super) fn info(&self) -> KeyInfo {
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
                        unreadable: false,
                    }
                })
                .chain(
                    self.unreadable
                        .iter()
                        .map(|&(v, created_at)| KeyVersionInfo {
                            version: v,
                            created_at: rfc3339(created_at),
                            can_unwrap: false,
                            wraps: 0,
                            unwraps: 0,
                            last_used_at: None,
                            unreadable: true,
                        }),
                )
                .collect(),
            deletion_date: r.deletion_date.map(rfc3339),
            grants: r.grants.clone(),
        }
    }

    /// When the current version was created (the rotation period counts from it).
    pub(super) fn current_born(&self) -> u64 {
        self.versions
            .get(&self.record.current_version)
            .map_or(self.record.created_at, |v| v.created_at)
    }

    /// The error of a wrap when the current version is not there to wrap with (its
    /// stored material did not open, see [`KeyEntry::unreadable`]).
    pub(super) fn current_unreadable(&self) -> Error {
        Error::Unreadable(format!(
            "key {}'s current version {} does not open at rest (reported to the operators): it cannot wrap until the key is rotated or the version restored",
            self.record.name, self.record.current_version
        ))
    }

    pub(super) fn check_usable(&self) -> Result<(), Error> {
        match self.record.state {
            KeyState::Enabled => Ok(()),
            other => Err(Error::KeyDisabled(other)),
        }
    }

    /// Default deny: some grant must name `identity`, `op`, and accept `context`.
    pub(super) fn check_grant(
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

/// Decrypted keys, bounded by [`Keyring::with_cache_limit`]: past the limit, a sixteenth
/// of the entries (an arbitrary sixteenth: `HashMap` order) is dropped and reloaded from
/// the store on next use. Dropped entries whose usage counters have not been saved wait in
/// `evicted` for the next [`Keyring::flush_usage`]. Entries dropped because the key
/// changed (here or, on a shared store, on another node) are never served again; those
/// with unsaved counts wait in `retired` for the next flush, which adds their counts.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) by_id: HashMap<KeyId, Arc<KeyEntry>>,
    by_name: HashMap<(String, String), KeyId>,
    pub(super) evicted: HashMap<KeyId, Arc<KeyEntry>>,
    pub(super) retired: Vec<Arc<KeyEntry>>,
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

/// See [`Keyring::with_freshness_bound`].
pub(super) struct Freshness {
    bound_ms: u64,
    confirmed_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl Keyring {
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

    pub(super) fn check_fresh(&self) -> Result<(), Error> {
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

    pub(super) fn load_entry(
        &self,
        un: &Unsealed,
        id: KeyId,
    ) -> Result<Option<Arc<KeyEntry>>, Error> {
        if let Some(e) = Self::cached(un, &id) {
            return Ok(Some(e));
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
        // One load of a key at a time: the others wait for it and take what it cached.
        let flight = self
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default()
            .clone();
        let held = match flight.try_lock() {
            Ok(held) => held,
            Err(_) => {
                fail::fail_point!("keyring-load-wait");
                flight.lock().unwrap_or_else(PoisonError::into_inner)
            }
        };
        let mut loaded = self.load_uncached(un, id);
        if matches!(loaded, Err(Error::MasterKeyChanged)) {
            // A request that began before this node's own master-key rotation (or its
            // following of another node's) holds the previous unsealed state: load
            // under the current one, whose epoch the versions name.
            if let Ok(current) = self.unsealed() {
                if current.epoch > un.epoch {
                    loaded = self.load_uncached(&current, id);
                }
            }
        }
        drop(held);
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        // Ours and the map's: nobody else waits on it (clones are made under this lock).
        if Arc::strong_count(&flight) <= 2 {
            flights.remove(&id);
        }
        loaded
    }

    fn cached(un: &Unsealed, id: &KeyId) -> Option<Arc<KeyEntry>> {
        un.cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(id)
            .cloned()
    }

    /// The cache, else the store, for [`Keyring::load_entry`]'s one load in flight.
    fn load_uncached(&self, un: &Unsealed, id: KeyId) -> Result<Option<Arc<KeyEntry>>, Error> {
        if let Some(e) = Self::cached(un, &id) {
            return Ok(Some(e));
        }
        // A change committed here or seen on the shared store's feed while this read runs
        // must not leave the old record cached: cache it only if no invalidation happened
        // meanwhile (every commit counts as one, see `note_commit`).
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
        self.check_record(un, &record)?;
        let mut usage = HashMap::new();
        for (key, bytes) in self.store.scan_prefix(Table::Usage, &id.0)? {
            let version = version_of_key(&key).ok_or(Error::Corrupt("usage key"))?;
            let r: crate::base::usage::UsageRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("usage record"))?;
            usage.insert(version, r);
        }
        let mut versions = BTreeMap::new();
        let mut unreadable = Vec::new();
        // The key the versions are sealed under, found once per key (on a shared store an
        // erasure key is a database read), and only if there is a version to open.
        let mut bound: Option<Option<SecretKey>> = None;
        for (vk, bytes) in self.store.scan_prefix(Table::Versions, &id.0)? {
            let Ok(v) = serde_json::from_slice::<VersionRecord>(&bytes) else {
                let version = version_of_key(&vk).unwrap_or(0);
                self.report_unreadable(&record, version, "the version record does not parse");
                unreadable.push((version, record.created_at));
                continue;
            };
            if v.epoch > un.epoch {
                // Re-sealed by another node's master-key rotation this node has not
                // followed yet: its follower catches up; the caller retries.
                return Err(self.master_behind());
            }
            let under = match &bound {
                Some(b) => b,
                None => bound.insert(self.version_sealing_key(un, &record)?),
            };
            let opened = if v.epoch == un.epoch {
                self.open_version_under(un, under.as_ref(), &record, &id, &v)
            } else {
                Err(Error::Corrupt("sealed under a retired master-key epoch"))
            };
            match opened {
                Ok(mut entry) => {
                    if let Some(r) = usage.get(&v.version) {
                        entry.usage = crate::base::usage::Usage::from_record(r);
                    }
                    versions.insert(v.version, Arc::new(entry));
                }
                // One bad version takes down only itself: reported, and the key's other
                // versions serve.
                Err(Error::Corrupt(why)) => {
                    self.report_unreadable(&record, v.version, why);
                    unreadable.push((v.version, v.created_at));
                }
                Err(e) => return Err(e),
            }
        }
        let entry = Arc::new(KeyEntry {
            key_id: id,
            record,
            record_bytes,
            versions,
            unreadable,
        });
        fail::fail_point!("keyring-load-before-put");
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
    pub(super) fn open_version(
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
        let sealed = crate::crypto::seal::unhex(&v.material)
            .ok_or(Error::Corrupt("version record material"))?;
        let plain = aead::open_box(
            bound.unwrap_or(&un.master),
            KEK_LABEL,
            &kek_aad(&record.tenant, id, v.version),
            &sealed,
        )
        .map_err(|_| Error::Corrupt("KEK version fails authentication under the master key"))?;
        let material =
            crate::crypto::kek::Kek::from_stored(record.algorithm, plain.expose_secret())?;
        Ok(VersionEntry {
            created_at: v.created_at,
            created_at_text: rfc3339(v.created_at),
            material,
            usage: crate::base::usage::Usage::default(),
        })
    }

    /// Counts a commit of this node's as an invalidation: a load that read the store
    /// before it does not cache what it read (it may be older than the commit).
    pub(super) fn note_commit(&self) {
        self.invalidations
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Reports a version whose material does not open: the log, and the integrity hook
    /// (an alert and a metric in the server).
    fn report_unreadable(&self, record: &KeyRecord, version: u32, why: &str) {
        tracing::error!(
            tenant = %record.tenant,
            key = %record.name,
            id = %record.id,
            version,
            why,
            "a KEK version does not open: it is not used; the key's other versions serve"
        );
        self.integrity_event(
            crate::base::event::AlertKind::VersionUnreadable,
            format!(
                "key {}/{} ({}) version {version}: {why}",
                record.tenant, record.name, record.id
            ),
        );
    }

    /// Caches `entry`, unless the cache holds a newer generation of the key (a put never
    /// goes back in time).
    pub(super) fn cache_put(&self, un: &Unsealed, entry: Arc<KeyEntry>) {
        let mut cache = un.cache.write().unwrap_or_else(PoisonError::into_inner);
        if cache
            .by_id
            .get(&entry.key_id)
            .is_some_and(|cur| cur.record.generation > entry.record.generation)
        {
            return;
        }
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

    pub(super) fn cache_evict(&self, un: &Unsealed, id: &KeyId) {
        un.cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retire(id);
    }

    pub(super) fn entry_by_name(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::testing::{all_grant, setup, who};
    use kms_client::api::Algorithm;

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
            wrapped.push(
                ring.lookups()
                    .unwrap()
                    .datakey(&who("t"), &name, &ctx)
                    .unwrap(),
            );
        }
        let cached = |ring: &Keyring| ring.unsealed().unwrap().cache.read().unwrap().by_id.len();
        assert!(cached(&ring) <= 16, "{} cached", cached(&ring));
        // Every key still works (reloaded from the store), twice.
        for _ in 0..2 {
            for d in &wrapped {
                let u = ring
                    .lookups()
                    .unwrap()
                    .unwrap(&who("t"), &d.wrapped, &ctx)
                    .unwrap();
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
}
