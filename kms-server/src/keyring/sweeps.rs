//! The periodic sweeps (run by the key sweep, on any node): saving the usage counters
//! (and the min_decrypt_version dry run that reads them), automatic rotation through the
//! rotation index, and the destruction of keys whose deletion date has passed.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use kms_client::api::KeyState;

use super::cache::KeyEntry;
use super::records::{
    rotation_key, to_json, version_key, KeyRecord, VersionRecord, META_ROTATION_INDEX,
};
use super::Keyring;
use crate::base::error::Error;
use crate::crypto::format::KeyId;
use crate::storage::{StoreError, Table, WriteBatch};

impl Keyring {
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
            crate::base::usage::UsageRecord,
            Vec<(Arc<KeyEntry>, u32, crate::base::usage::UsageRecord)>,
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
                    let mut merged: crate::base::usage::UsageRecord = match &stored {
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
            let stored: crate::base::usage::UsageRecord = match self
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
                unwraps: crate::base::usage::Usage::from_record(&stored)
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
                let loaded = match self.load_entry(&un, id) {
                    // A refused record (reported) waits; the others rotate.
                    Err(Error::Unreadable(_)) => continue,
                    other => other?,
                };
                let entry = match loaded {
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
    /// `destroyed`; then its erasure key is overwritten in place ([`crate::storage::erasure`]), so
    /// copies of the sealed versions left in the store's free pages cannot be opened even
    /// with the master key. The deletion-index entry goes last: after a crash the next
    /// sweep finishes the erasure. Returns the keys destroyed now as (tenant, name). A key
    /// is destroyed only once its record authenticates ([`super::integrity`]): while
    /// sealed, due destructions wait for the unseal (finishing an erasure already
    /// committed does not).
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
                    // Only an authenticated record is obeyed: a forged `pending-deletion`
                    // must not erase a key. Sealed, nothing can be checked: the
                    // destruction waits for the unseal (its index entry stays).
                    let Ok(un) = self.unsealed() else {
                        continue;
                    };
                    if self.check_record(&un, &record).is_err() {
                        continue;
                    }
                    let mut batch = WriteBatch::new();
                    for (version_key, _) in self.store.scan_prefix(Table::Versions, &id.0)? {
                        batch.delete(Table::Versions, &version_key);
                    }
                    // Grants stay, as metadata: a granted caller learns `destroyed` (409),
                    // not a denial that would count toward its lockout.
                    record.state = KeyState::Destroyed;
                    record.next_generation();
                    un.sign_record(&mut record)?;
                    batch.require(Table::Keys, &id.0, Some(&bytes)).put(
                        Table::Keys,
                        &id.0,
                        &to_json(&record)?,
                    );
                    self.store.commit(&batch)?;
                    self.note_commit();
                    self.cache_evict(&un, &id);
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kms_client::api::{Algorithm, Context};

    use super::*;
    use crate::crypto::aead;
    use crate::keyring::records::kek_aad;
    use crate::keyring::testing::{all_grant, setup, who};
    use crate::keyring::vault::KEK_LABEL;

    #[test]
    fn destruction_erases_the_erasure_key_so_leftover_copies_do_not_open() {
        let (d, ring, sealer) = setup();
        let erasure =
            Arc::new(crate::storage::erasure::ErasureFile::open(&d.path().join("e")).unwrap());
        let ring = Keyring::with_clock(ring.store().clone(), crate::base::clock::Clock::system())
            .with_erasure(erasure.clone());
        ring.unseal(&sealer).unwrap();
        let app = who("t");
        let info = ring
            .create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        ring.rotate("t", "k").unwrap();
        let dk = ring
            .lookups()
            .unwrap()
            .datakey(&app, "k", &Context::new())
            .unwrap();
        let id = KeyId::from_hex(&info.id).unwrap();
        // What an attacker could find in the store's free pages afterwards.
        let leftovers = ring.store().scan_prefix(Table::Versions, &id.0).unwrap();
        assert_eq!(leftovers.len(), 2);
        ring.schedule_deletion("t", "k", 7, 0).unwrap();
        assert_eq!(ring.destroy_due(7 * 86_400).unwrap().len(), 1);
        assert!(erasure.get(0).unwrap().is_none(), "the erasure key is gone");
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&app, &dk.wrapped, &Context::new()),
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
            let sealed = crate::crypto::seal::unhex(&v.material).unwrap();
            assert!(aead::open_box(
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
        let dk = ring
            .lookups()
            .unwrap()
            .datakey(&app, "a", &Context::new())
            .unwrap();
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
            ring.lookups()
                .unwrap()
                .unwrap(&app, &dk.wrapped, &Context::new()),
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
        // Due: a goes (b later, c cancelled), once unsealed: sealed, its record cannot
        // be authenticated, so the destruction waits.
        ring.seal();
        assert!(ring.destroy_due(t0 + 7 * 86_400).unwrap().is_empty());
        ring.unseal(&sealer).unwrap();
        assert_eq!(
            ring.destroy_due(t0 + 7 * 86_400).unwrap(),
            vec![("t".to_string(), "a".to_string())]
        );
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
            ring.lookups()
                .unwrap()
                .unwrap(&app, &dk.wrapped, &Context::new()),
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
    fn rotation_index_drives_the_sweep_and_is_built_for_old_stores() {
        let (_dir, ring, sealer) = setup();
        let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let o = offset.clone();
        let ring = Keyring::with_clock(
            ring.store().clone(),
            crate::base::clock::Clock::from_fn(move || {
                crate::base::clock::Clock::system().now()
                    + o.load(std::sync::atomic::Ordering::SeqCst)
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
}
