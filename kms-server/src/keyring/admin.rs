//! Key lifecycle: create, read, list, rotate, enable/disable, schedule and cancel
//! deletion, the minimum decrypt version, grants, the public key of an RSA KEK, and the
//! adoption of an embedded store's erasure keys by a shared store.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use kms_client::api::{Algorithm, Grant, GrantOperation, KeyInfo, KeyState};

use super::cache::{KeyEntry, VersionEntry};
use super::records::{
    deletion_key, name_key, rfc3339, rotation_key, to_json, validate_grants, validate_name,
    version_key, KeyRecord, Lifecycle, DELETION_WINDOW_DAYS,
};
use super::vault::Unsealed;
use super::Keyring;
use crate::access::policy::Principal;
use crate::base::error::Error;
use crate::crypto::aead;
use crate::crypto::format::KeyId;
use crate::crypto::secret::SecretVec;

/// The largest secret KMIP may register as Secret Data, bytes (passwords, seeds, tokens).
pub const MAX_SECRET_DATA: usize = 8192;
use crate::storage::{StoreError, Table, WriteBatch};

/// How often a key update is applied again after another writer's commit came first.
const UPDATE_TRIES: usize = 8;

/// Whether a change an approval policy can hold was cleared (`api/approvals.rs`): the
/// policy does not hold it, or its approvals were redeemed. An uncleared change is checked
/// at the stored record, in the same compare-and-swap that writes it: a change that turns
/// out to need approval (a grant to a new identity, a higher `min_decrypt_version`) is
/// refused rather than slipping past the policy because the key changed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clearance {
    /// Run it as asked.
    Cleared,
    /// Refuse it if it needs approval.
    Uncleared,
}

impl Clearance {
    fn check_grants(self, stored: &[Grant], adding: &[Grant]) -> Result<(), Error> {
        let new_identity = adding
            .iter()
            .any(|g| !stored.iter().any(|old| old.identity == g.identity));
        if self == Clearance::Uncleared && new_identity {
            return Err(Error::InvalidState(
                "a grant to a new identity needs approval under the tenant's dual-control policy (the native API asks for it; if it did not, the key changed meanwhile: send it again)",
            ));
        }
        Ok(())
    }
}

impl Keyring {
    /// Moves the erasure keys that key records name in `file` (an embedded store's erasure
    /// file, after `migrate-store` copied its records here) into the shared store's
    /// erasure table, and makes each record name its new slot; the versions stay sealed as
    /// they were (the erasure keys are the same). Keys whose erasure key is already erased
    /// (destroyed) are left as they are. Returns how many moved. Needs no master key.
    pub fn adopt_erasure_keys(
        &self,
        file: &crate::storage::erasure::ErasureFile,
    ) -> Result<usize, Error> {
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

    /// Creates a key with version 1.
    pub fn create_key(
        &self,
        tenant: &str,
        name: &str,
        algorithm: Algorithm,
        rotation_period: Option<Duration>,
        grants: Vec<Grant>,
    ) -> Result<KeyInfo, Error> {
        self.create(
            tenant,
            name,
            algorithm,
            rotation_period,
            grants,
            Origin::default(),
        )
    }

    /// Creates a key with version 1, disabled and marked pre-active (unusable until its
    /// first enable): KMIP's Create, whose Activate is that enable.
    pub fn create_key_pre_active(
        &self,
        tenant: &str,
        name: &str,
        algorithm: Algorithm,
        extractable: bool,
    ) -> Result<KeyInfo, Error> {
        let origin = Origin {
            pre_active: true,
            extractable,
            material: None,
        };
        self.create(tenant, name, algorithm, None, Vec::new(), origin)
    }

    /// Creates a pre-active AES-256 key from `material` a client brings (KMIP Register),
    /// `extractable` if the client asked that it may be read back.
    pub fn register_key(
        &self,
        tenant: &str,
        name: &str,
        material: &[u8],
        extractable: bool,
    ) -> Result<KeyInfo, Error> {
        let key = crate::crypto::secret::SecretKey::from_slice(material)
            .ok_or_else(|| Error::InvalidRequest("an AES-256 key is 32 bytes".into()))?;
        let stored = SecretVec::new(key.expose_secret().to_vec());
        let origin = Origin {
            pre_active: true,
            extractable,
            material: Some((crate::crypto::kek::Kek::Aes(key), stored)),
        };
        self.create(tenant, name, Algorithm::Aes256Gcm, None, Vec::new(), origin)
    }

    /// Keeps a client's secret (KMIP Register of Secret Data: a password, a seed) under
    /// `name`, pre-active and extractable: sealed as key material is, used by nothing, only
    /// ever read back ([`crate::keyring::Lookups::export_extractable`]). At most
    /// [`MAX_SECRET_DATA`] bytes.
    pub fn register_secret(&self, tenant: &str, name: &str, data: &[u8]) -> Result<KeyInfo, Error> {
        if data.is_empty() || data.len() > MAX_SECRET_DATA {
            return Err(Error::InvalidRequest(format!(
                "secret data is 1 to {MAX_SECRET_DATA} bytes"
            )));
        }
        let kek = crate::crypto::kek::Kek::from_stored(Algorithm::SecretData, data)?;
        let origin = Origin {
            pre_active: true,
            extractable: true,
            material: Some((kek, SecretVec::new(data.to_vec()))),
        };
        self.create(
            tenant,
            name,
            Algorithm::SecretData,
            None,
            Vec::new(),
            origin,
        )
    }

    /// Key `name`'s KMIP lifecycle ([`Lifecycle`]).
    pub fn lifecycle(&self, tenant: &str, name: &str) -> Result<Lifecycle, Error> {
        let un = self.unsealed()?;
        Ok(self
            .entry_by_name(&un, tenant, name)?
            .record
            .lifecycle
            .clone())
    }

    /// Disables key `name` as KMIP's Revoke does, recording when (and, for a compromise,
    /// that it was one).
    pub fn revoke(&self, tenant: &str, name: &str, compromised: bool) -> Result<KeyInfo, Error> {
        let now = self.clock.now();
        self.update_key(tenant, name, |_, record, _| match record.state {
            KeyState::Enabled | KeyState::Disabled => {
                record.state = KeyState::Disabled;
                let l = &mut record.lifecycle;
                l.deactivated_at.get_or_insert(now);
                if compromised {
                    l.compromised_at.get_or_insert(now);
                }
                Ok(())
            }
            KeyState::PendingDeletion => Err(Error::InvalidState("the key is pending deletion")),
            _ => Err(Error::InvalidState("the key is destroyed")),
        })
    }

    fn create(
        &self,
        tenant: &str,
        name: &str,
        algorithm: Algorithm,
        rotation_period: Option<Duration>,
        grants: Vec<Grant>,
        origin: Origin,
    ) -> Result<KeyInfo, Error> {
        let pre_active = origin.pre_active;
        validate_name(name)?;
        validate_grants(&grants)?;
        self.unsealed()?;
        // Before the lock: RSA generation can take seconds.
        let (material, stored) = match origin.material {
            Some(brought) => brought,
            None => crate::crypto::kek::Kek::generate(algorithm)?,
        };
        fail::fail_point!("keyring-create-before-lock");
        // The master key to seal under is taken under the lock (a rotation may have run).
        let (_guard, un) = self.writer()?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&aead::random_salt()?[..16]);
        let id = KeyId(id);
        let created_at = self.clock.now();
        let record = KeyRecord {
            id: id.to_hex(),
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            algorithm,
            state: if pre_active {
                KeyState::Disabled
            } else {
                KeyState::Enabled
            },
            created_at,
            current_version: 1,
            min_decrypt_version: 1,
            rotation_period_secs: rotation_period.map(|d| d.as_secs()),
            deletion_date: None,
            grants,
            erasure_slot: None,
            shared_erasure_slot: None,
            generation: 1,
            lifecycle: Lifecycle {
                pre_active,
                extractable: origin.extractable,
                ..Lifecycle::default()
            },
            mac: None,
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
        un.sign_record(&mut record)?;
        let version = self.seal_version(&un, &record, &id, 1, created_at, &stored)?;
        debug_assert_eq!(version.epoch, un.epoch);
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
        match self.commit_sealed(&un, &batch) {
            Ok(()) => self.note_commit(),
            Err(Error::Storage(StoreError::Conflict("key_names"))) => {
                return Err(Error::AlreadyExists)
            }
            Err(e) => return Err(e),
        }
        let mut versions = BTreeMap::new();
        versions.insert(
            1,
            Arc::new(VersionEntry {
                created_at,
                created_at_text: rfc3339(created_at),
                material,
                usage: crate::base::usage::Usage::default(),
            }),
        );
        let entry = Arc::new(KeyEntry {
            key_id: id,
            record,
            record_bytes,
            versions,
            unreadable: Vec::new(),
        });
        self.cache_put(&un, entry.clone());
        Ok(entry.info())
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
            match self.load_entry(&un, KeyId(id)) {
                Ok(Some(entry)) => out.push(entry.info()),
                Ok(None) => {}
                // One bad record takes down only itself: it was reported when refused;
                // the tenant's other keys list.
                Err(Error::Unreadable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Adds a new version, which becomes the wrapping version. Older versions keep
    /// unwrapping.
    pub fn rotate(&self, tenant: &str, name: &str) -> Result<KeyInfo, Error> {
        // New material before the lock (RSA generation can take seconds).
        let algorithm = {
            let un = self.unsealed()?;
            self.entry_by_name(&un, tenant, name)?.record.algorithm
        };
        let (material, stored) = crate::crypto::kek::Kek::generate(algorithm)?;
        let (_guard, un) = self.writer()?;
        let mut material = Some(material);
        // Another node's commit came first (its own rotation, a state change): the
        // rotation is made again on what it wrote, with the same new material.
        for _ in 0..UPDATE_TRIES {
            match self.rotate_once(&un, tenant, name, algorithm, &mut material, &stored) {
                Err(Error::Storage(StoreError::Conflict("keys" | "versions"))) => continue,
                other => return other,
            }
        }
        Err(Error::Storage(StoreError::Conflict("keys")))
    }

    fn rotate_once(
        &self,
        un: &Arc<Unsealed>,
        tenant: &str,
        name: &str,
        algorithm: Algorithm,
        material: &mut Option<crate::crypto::kek::Kek>,
        stored: &crate::crypto::secret::SecretVec,
    ) -> Result<KeyInfo, Error> {
        let entry = self.entry_by_name(un, tenant, name)?;
        if entry.record.algorithm != algorithm {
            return Err(Error::InvalidState(
                "the key was replaced meanwhile; try again",
            ));
        }
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
        record.next_generation();
        un.sign_record(&mut record)?;
        let created_at = self.clock.now();
        let version = self.seal_version(un, &record, &id, new_version, created_at, stored)?;
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
        fail::fail_point!("keyring-rotate-before-commit");
        if let Err(e) = self.commit_sealed(un, &batch) {
            self.cache_evict(un, &id);
            return Err(e);
        }
        self.note_commit();
        // Taken once: the loop above retries only when nothing was committed.
        let material = material
            .take()
            .ok_or(Error::Internal("rotation material already used"))?;
        let mut versions = entry.versions.clone();
        versions.insert(
            new_version,
            Arc::new(VersionEntry {
                created_at,
                created_at_text: rfc3339(created_at),
                material,
                usage: crate::base::usage::Usage::default(),
            }),
        );
        let updated = Arc::new(KeyEntry {
            key_id: id,
            record,
            record_bytes,
            versions,
            unreadable: entry.unreadable.clone(),
        });
        self.cache_put(un, updated.clone());
        Ok(updated.info())
    }

    /// Commits an update of a cached key; on a conflict the cache entry was stale, so it
    /// is dropped and the next read reloads from the store.
    fn commit_update(&self, un: &Unsealed, id: &KeyId, batch: &WriteBatch) -> Result<(), Error> {
        match self.store.commit(batch) {
            Ok(()) => {
                self.note_commit();
                Ok(())
            }
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
        change: impl Fn(&KeyEntry, &mut KeyRecord, &mut WriteBatch) -> Result<(), Error>,
    ) -> Result<KeyInfo, Error> {
        let (_guard, un) = self.writer()?;
        // Another node changed the record between the read and the commit: the change is
        // applied again to what it wrote (the cache entry was dropped on the conflict).
        for _ in 0..UPDATE_TRIES {
            match self.update_once(&un, tenant, name, &change) {
                Err(Error::Storage(StoreError::Conflict("keys"))) => continue,
                other => return other,
            }
        }
        Err(Error::Storage(StoreError::Conflict("keys")))
    }

    fn update_once(
        &self,
        un: &Arc<Unsealed>,
        tenant: &str,
        name: &str,
        change: &impl Fn(&KeyEntry, &mut KeyRecord, &mut WriteBatch) -> Result<(), Error>,
    ) -> Result<KeyInfo, Error> {
        let un = un.as_ref();
        let entry = self.entry_by_name(un, tenant, name)?;
        let mut record = entry.record.clone();
        let mut batch = WriteBatch::new();
        change(&entry, &mut record, &mut batch)?;
        if to_json(&record)? == entry.record_bytes && batch.writes.is_empty() {
            return Ok(entry.info());
        }
        record.next_generation();
        un.sign_record(&mut record)?;
        let record_bytes = to_json(&record)?;
        batch
            .require(Table::Keys, &entry.key_id.0, Some(&entry.record_bytes))
            .put(Table::Keys, &entry.key_id.0, &record_bytes);
        self.commit_update(un, &entry.key_id, &batch)?;
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
            unreadable: entry.unreadable.clone(),
        });
        self.cache_put(un, updated.clone());
        fail::fail_point!("keyring-update-committed");
        Ok(updated.info())
    }

    /// Enables (`true`) or disables (`false`) a key. Idempotent.
    pub fn set_enabled(&self, tenant: &str, name: &str, enabled: bool) -> Result<KeyInfo, Error> {
        let target = if enabled {
            KeyState::Enabled
        } else {
            KeyState::Disabled
        };
        let now = self.clock.now();
        self.update_key(tenant, name, |_, record, _| match record.state {
            KeyState::Enabled | KeyState::Disabled => {
                record.state = target;
                // The first enable of a pre-active key is its activation.
                if enabled && record.lifecycle.pre_active {
                    record.lifecycle.pre_active = false;
                    record.lifecycle.activated_at = Some(now);
                }
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
    /// again brings retired versions back while their material is still stored. Raising
    /// it is refused unless `clearance` is [`Clearance::Cleared`] (dual control decided
    /// at the stored record, so a change in between cannot slip past the policy).
    pub fn set_min_decrypt_version(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
        clearance: Clearance,
    ) -> Result<KeyInfo, Error> {
        self.update_key(tenant, name, |_, record, _| {
            if record.state == KeyState::Destroyed {
                return Err(Error::InvalidState("the key is destroyed"));
            }
            if clearance == Clearance::Uncleared && version > record.min_decrypt_version {
                return Err(Error::InvalidState(
                    "raising min_decrypt_version needs approval under the tenant's dual-control policy (the native API asks for it; if it did not, the key changed meanwhile: send it again)",
                ));
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

    /// Replaces a key's grants (a new identity among them only with `clearance`
    /// [`Clearance::Cleared`]).
    pub fn set_grants(
        &self,
        tenant: &str,
        name: &str,
        grants: Vec<Grant>,
        clearance: Clearance,
    ) -> Result<KeyInfo, Error> {
        validate_grants(&grants)?;
        self.update_key(tenant, name, |_, record, _| {
            if record.state == KeyState::Destroyed {
                return Err(Error::InvalidState("the key is destroyed"));
            }
            clearance.check_grants(&record.grants, &grants)?;
            record.grants = grants.clone();
            Ok(())
        })
    }

    /// Removes every grant of the identities in `remove`, then adds `add` (an addition
    /// equal to a grant already there is not repeated), in one compare-and-swap of the key
    /// record: two operators editing one key's grants at once both see their edit hold. A
    /// new identity among `add` only with `clearance` [`Clearance::Cleared`].
    pub fn edit_grants(
        &self,
        tenant: &str,
        name: &str,
        add: Vec<Grant>,
        remove: &[String],
        clearance: Clearance,
    ) -> Result<KeyInfo, Error> {
        validate_grants(&add)?;
        self.update_key(tenant, name, |_, record, _| {
            if record.state == KeyState::Destroyed {
                return Err(Error::InvalidState("the key is destroyed"));
            }
            clearance.check_grants(&record.grants, &add)?;
            record.grants.retain(|g| !remove.contains(&g.identity));
            for g in &add {
                if !record.grants.contains(g) {
                    record.grants.push(g.clone());
                }
            }
            validate_grants(&record.grants)
        })
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
        if who.role == crate::access::policy::Role::App
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
}

#[cfg(test)]
mod tests {
    use kms_client::api::Context;

    use super::*;
    use crate::keyring::testing::{all_grant, ctx, setup, who};

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
        let dk = ring
            .lookups()
            .unwrap()
            .datakey(&who("t"), "k", &ctx("a", "1"))
            .unwrap();
        let info = ring.rotate("t", "k").unwrap();
        assert_eq!(info.current_version, 2);
        assert_eq!(info.versions.len(), 2);
        let un = ring
            .lookups()
            .unwrap()
            .unwrap(&who("t"), &dk.wrapped, &ctx("a", "1"))
            .unwrap();
        assert_eq!(un.plaintext, dk.plaintext);
        assert_eq!(un.version, 1);
        let re = ring
            .lookups()
            .unwrap()
            .rewrap(&who("t"), &dk.wrapped, &ctx("a", "1"))
            .unwrap();
        assert_eq!(re.version, 2);
        assert_eq!(
            ring.lookups()
                .unwrap()
                .unwrap(&who("t"), &re.wrapped, &ctx("a", "1"))
                .unwrap()
                .plaintext,
            dk.plaintext
        );
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&who("t"), &dk.wrapped, &ctx("a", "2")),
            Err(Error::DecryptFailed)
        ));
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&who("other"), &dk.wrapped, &ctx("a", "1")),
            Err(Error::DecryptFailed)
        ));
        ring.set_enabled("t", "k", false).unwrap();
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&who("t"), &dk.wrapped, &ctx("a", "1")),
            Err(Error::KeyDisabled(KeyState::Disabled))
        ));
        ring.set_enabled("t", "k", true).unwrap();
        // A fresh keyring over the same store (a restart) reads everything back.
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert_eq!(ring.key_info("t", "k").unwrap().current_version, 2);
        assert!(ring
            .lookups()
            .unwrap()
            .unwrap(&who("t"), &dk.wrapped, &ctx("a", "1"))
            .is_ok());
        assert!(matches!(ring.key_info("other", "k"), Err(Error::NotFound)));
    }

    #[test]
    fn min_decrypt_version_retires() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let app = who("t");
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let old = ring
            .lookups()
            .unwrap()
            .datakey(&app, "k", &Context::new())
            .unwrap();
        ring.rotate("t", "k").unwrap();
        assert!(matches!(
            ring.set_min_decrypt_version("t", "k", 3, Clearance::Cleared),
            Err(Error::InvalidRequest(_))
        ));
        let info = ring
            .set_min_decrypt_version("t", "k", 2, Clearance::Cleared)
            .unwrap();
        assert!(!info.versions[0].can_unwrap);
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&app, &old.wrapped, &Context::new()),
            Err(Error::DecryptFailed)
        ));
        ring.set_min_decrypt_version("t", "k", 1, Clearance::Cleared)
            .unwrap();
        assert!(ring
            .lookups()
            .unwrap()
            .unwrap(&app, &old.wrapped, &Context::new())
            .is_ok());
    }
}

/// How a key comes to be: generated and enabled (the native API), or pre-active (KMIP),
/// from a client's material (KMIP Register), extractable or not.
#[derive(Default)]
struct Origin {
    pre_active: bool,
    extractable: bool,
    /// Material a client brought (decrypted, stored form), else generated.
    material: Option<(crate::crypto::kek::Kek, SecretVec)>,
}
