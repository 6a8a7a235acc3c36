//! The master key and what hangs on it: initialization, unseal and seal, master-key
//! rotation, the audit keys (the chain head's MAC key and the context-hash key, owned by
//! [`Unsealed`] beside the master key), the sealing of KEK versions under the master key
//! (bound to the key's erasure key, if any), and the deep self-test.

use std::sync::{Arc, PoisonError, RwLock};

use kms_client::api::Context;
use zeroize::Zeroizing;

use super::cache::Cache;
use super::epoch::{self, EpochRecord, META_MASTER_EPOCH};
use super::integrity::{self, META_RECORDS_MARKER};
use super::records::{
    kek_aad, to_json, unreadable_version, KeyRecord, VersionRecord, META_AUDIT_KEYS, META_FORMAT,
    META_ROTATION_INDEX, META_SEALED_MASTER, STORE_FORMAT,
};
use super::Keyring;
use crate::base::error::Error;
use crate::crypto::aead;
use crate::crypto::format::{self, KeyId};
use crate::crypto::seal::{SealMethod, SealedMasterKey, Sealer};
use crate::crypto::secret::{SecretKey, SecretVec};
use crate::storage::{StoreError, Table, WriteBatch};

const AUDIT_KEYS_LABEL: &[u8] = b"keyhold/audit-keys/v1";
pub(super) const KEK_LABEL: &[u8] = b"keyhold/kek-version/v1";
pub(super) const ERASURE_LABEL: &[u8] = b"keyhold/kek-erasure/v1";

/// The unsealed state: the master key, the audit keys, and the cache of keys decrypted
/// under them (wiped together on `seal`).
pub(super) struct Unsealed {
    pub(super) master: SecretKey,
    /// The epoch of `master` ([`super::epoch`]): what every sealing write requires.
    pub(super) epoch: u64,
    pub(super) cache: RwLock<Cache>,
    /// MACs the audit chain head.
    audit_mac: ring::hmac::Key,
    /// Keys the audit record's context hash.
    audit_context: ring::hmac::Key,
    /// Both audit keys' bytes (MAC ‖ context), for re-sealing at master-key rotation.
    audit_keys: Zeroizing<[u8; 64]>,
    /// MACs key records ([`super::integrity`]), derived from the audit keys.
    pub(super) record_mac: ring::hmac::Key,
    /// MACs runtime identities and lockouts (`impl StateSigner for Keyring`).
    pub(super) state_mac: ring::hmac::Key,
    /// Whether key records must carry a valid MAC (set once the store's are signed).
    records_signed: std::sync::atomic::AtomicBool,
}

impl Unsealed {
    fn new(
        master: SecretKey,
        epoch: u64,
        audit_keys: Zeroizing<[u8; 64]>,
        cache: Cache,
        records_signed: bool,
    ) -> Result<Self, Error> {
        let hmac = |k: &[u8]| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
        Ok(Self {
            record_mac: integrity::record_mac_key(&audit_keys, b"key-records")?,
            state_mac: integrity::record_mac_key(&audit_keys, b"authorization-state")?,
            records_signed: std::sync::atomic::AtomicBool::new(records_signed),
            epoch,
            audit_mac: hmac(&audit_keys[..32]),
            audit_context: hmac(&audit_keys[32..]),
            audit_keys,
            master,
            cache: RwLock::new(cache),
        })
    }

    /// Whether key records must carry a valid MAC.
    pub(super) fn records_signed(&self) -> bool {
        self.records_signed
            .load(std::sync::atomic::Ordering::Acquire)
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

impl Keyring {
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
            .put(
                Table::Meta,
                META_MASTER_EPOCH,
                &epoch::first_record(&master)?,
            )
            // Every key record of a new store is signed from the first.
            .put(
                Table::Meta,
                META_RECORDS_MARKER,
                &Unsealed::new(
                    SecretKey::generate()?,
                    0,
                    derived_audit_keys(&master)?,
                    Cache::default(),
                    true,
                )?
                .marker(),
            )
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
        let (master, epoch, audit_keys) = self.open_current_master(sealer)?;
        let un = Unsealed::new(master, epoch, audit_keys, Cache::default(), false)?;
        let signed = self.sign_legacy_records(&un)?;
        un.records_signed
            .store(signed, std::sync::atomic::Ordering::Release);
        let mut slot = self
            .unsealed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = Some(Arc::new(un));
        drop(slot);
        self.unsealed_now();
        Ok(())
    }

    /// Opens the stored sealed master key with `sealer`, with its epoch: the two are read
    /// apart, so the epoch record's check must name the key opened (else a rotation
    /// committed between the reads, and both are read again).
    fn open_current_master(
        &self,
        sealer: &dyn Sealer,
    ) -> Result<(SecretKey, u64, Zeroizing<[u8; 64]>), Error> {
        for _ in 0..4 {
            let sealed = self.sealed_master_key()?.ok_or(Error::InvalidState(
                "the store is not initialized: run `kms-server init`",
            ))?;
            let master = sealer.unseal(&sealed)?;
            fail::fail_point!("keyring-follow-master-opened");
            // Read after the master key and before the epoch: a rotation committed after
            // the master key was read shows in the epoch (all three commit together).
            let audit = self.store.get(Table::Meta, META_AUDIT_KEYS)?;
            let stored = self.stored_epoch()?;
            if stored.is_of(&master)? {
                let audit_keys = audit_keys_under(&master, audit.as_deref())?;
                return Ok((master, stored.record.epoch, audit_keys));
            }
        }
        Err(Error::Corrupt(
            "the master-key epoch record does not name the stored master key",
        ))
    }

    /// Follows a master-key rotation another node of a shared store made: when the
    /// store's epoch is not the one in memory, opens the new sealed master key with
    /// `sealer` and puts it in place (the KEKs did not change: the decrypted keys stay
    /// cached). Until then this node's sealing writes are refused
    /// ([`Error::MasterKeyChanged`]), never committed under the retired key. Returns
    /// whether the master key changed. An error (a `sealer` that cannot open the new key
    /// by itself, such as Shamir shares) leaves the node as it was: the caller seals it.
    pub fn follow_master(&self, sealer: &dyn Sealer) -> Result<bool, Error> {
        let Ok(un) = self.unsealed() else {
            return Ok(false);
        };
        if self.stored_epoch()?.record.epoch == un.epoch {
            return Ok(false);
        }
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let un = self.unsealed()?;
        let (master, epoch, audit_keys) = self.open_current_master(sealer)?;
        if epoch == un.epoch {
            return Ok(false);
        }
        let cache = std::mem::take(&mut *un.cache.write().unwrap_or_else(PoisonError::into_inner));
        let mut slot = self
            .unsealed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = Some(Arc::new(Unsealed::new(
            master,
            epoch,
            audit_keys,
            cache,
            un.records_signed(),
        )?));
        tracing::info!(epoch, "followed a master-key rotation made on another node");
        Ok(true)
    }
}

/// The audit keys: stored (`sealed` under `master`) once the master key has rotated,
/// else derived from it.
fn audit_keys_under(
    master: &SecretKey,
    sealed: Option<&[u8]>,
) -> Result<Zeroizing<[u8; 64]>, Error> {
    let Some(sealed) = sealed else {
        return derived_audit_keys(master);
    };
    let plain = aead::open_box(master, AUDIT_KEYS_LABEL, b"", sealed)
        .map_err(|_| Error::Corrupt("audit keys fail authentication under the master key"))?;
    let mut keys = Zeroizing::new([0u8; 64]);
    if plain.expose_secret().len() != 64 {
        return Err(Error::Corrupt("audit keys length"));
    }
    keys.copy_from_slice(plain.expose_secret());
    Ok(keys)
}

impl Keyring {
    /// Replaces the master key with a new one: every KEK version is re-sealed under it and
    /// the new master key sealed by `sealer`, all in one store transaction (a crash leaves
    /// the old state or the new one, never a mix). `sealer` must also open the current
    /// sealed master key, so a mistyped passphrase cannot lock the store away. KEK material
    /// does not change: wrapped DEKs keep unwrapping. Returns how many versions were
    /// re-sealed.
    ///
    /// The transaction requires the epoch record ([`super::epoch`]) and every version it
    /// re-seals to be as read: a version added or destroyed meanwhile (by this node or
    /// another) makes it read them again. A version that does not open under the master
    /// key in use stops it, named ([`Error::Unreadable`]): rotating would lose it.
    pub fn rotate_master(&self, sealer: &dyn Sealer) -> Result<usize, Error> {
        // The lock before the unsealed state: no writer of this node holds the old key.
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let un = self.unsealed()?;
        let old_bytes = self
            .store
            .get(Table::Meta, META_SEALED_MASTER)?
            .ok_or(Error::InvalidState("the store is not initialized"))?;
        let old: SealedMasterKey = serde_json::from_slice(&old_bytes)
            .map_err(|_| Error::Corrupt("sealed master key record"))?;
        let check = sealer.unseal(&old)?;
        // Constant-time comparison (SecretKey's PartialEq).
        if check != un.master {
            return Err(if self.stored_epoch()?.record.epoch != un.epoch {
                Error::MasterKeyChanged
            } else {
                Error::InvalidState(
                    "the seal secret given opens another master key than the one in use",
                )
            });
        }
        let new_master = SecretKey::generate()?;
        let sealed_new = sealer.seal(&new_master)?;
        let next_epoch = un
            .epoch
            .checked_add(1)
            .ok_or(Error::InvalidState("master-key epoch exhausted"))?;
        for _ in 0..4 {
            let stored = self.stored_epoch()?;
            if stored.record.epoch != un.epoch {
                return Err(Error::MasterKeyChanged);
            }
            let mut batch = WriteBatch::new();
            batch
                .require(Table::Meta, META_SEALED_MASTER, Some(&old_bytes))
                .put(Table::Meta, META_SEALED_MASTER, &to_json(&sealed_new)?)
                .require(Table::Meta, META_MASTER_EPOCH, stored.bytes.as_deref())
                .put(
                    Table::Meta,
                    META_MASTER_EPOCH,
                    &to_json(&EpochRecord {
                        epoch: next_epoch,
                        writes: 0,
                        check: epoch::check_of(&new_master, next_epoch)?,
                    })?,
                )
                // The audit keys keep their value: the chain head's MAC stays valid.
                .put(
                    Table::Meta,
                    META_AUDIT_KEYS,
                    &aead::seal_box(&new_master, AUDIT_KEYS_LABEL, b"", &un.audit_keys[..])?,
                );
            let resealed = self.reseal_all(&un, &new_master, next_epoch, &mut batch)?;
            fail::fail_point!("keyring-rotate-master-before-commit");
            match self.store.commit(&batch) {
                Ok(()) => {
                    // The decrypted KEKs did not change: keep the cache, swap the keys.
                    let cache = std::mem::take(
                        &mut *un.cache.write().unwrap_or_else(PoisonError::into_inner),
                    );
                    let mut slot = self
                        .unsealed
                        .write()
                        .unwrap_or_else(PoisonError::into_inner);
                    *slot = Some(Arc::new(Unsealed::new(
                        new_master,
                        next_epoch,
                        un.audit_keys.clone(),
                        cache,
                        un.records_signed(),
                    )?));
                    return Ok(resealed);
                }
                // A key written or destroyed meanwhile: read the versions again.
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::InvalidState(
            "keys kept changing during the master-key rotation; try again",
        ))
    }

    /// Adds to `batch` every KEK version re-sealed under `new_master` (epoch
    /// `next_epoch`), each on condition that its record is unchanged. Returns how many.
    fn reseal_all(
        &self,
        un: &Unsealed,
        new_master: &SecretKey,
        next_epoch: u64,
        batch: &mut WriteBatch,
    ) -> Result<usize, Error> {
        let mut resealed = 0;
        for (id, bytes) in self.store.scan_prefix(Table::Keys, b"")? {
            let key_id = KeyId(
                id.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("key id"))?,
            );
            let record: KeyRecord = serde_json::from_slice(&bytes).map_err(|_| {
                Error::Unreadable(format!(
                    "key record {} does not parse: rotating the master key would lose its versions",
                    key_id.to_hex()
                ))
            })?;
            let versions = self.store.scan_prefix(Table::Versions, &id)?;
            if versions.is_empty() {
                continue;
            }
            let old_key = self.sealing_key_under(&un.master, &record)?;
            let new_key = self.sealing_key_under(new_master, &record)?;
            for (vk, vbytes) in versions {
                let blocked = |why: &str| {
                    unreadable_version(
                        &record,
                        &vk,
                        &format!("{why}; rotating the master key would lose it (restore it from a backup, or destroy the key)"),
                    )
                };
                let mut v: VersionRecord = serde_json::from_slice(&vbytes)
                    .map_err(|_| blocked("the version record does not parse"))?;
                if v.epoch != un.epoch {
                    return Err(blocked("sealed under another master-key epoch"));
                }
                let aad = kek_aad(&record.tenant, &key_id, v.version);
                let sealed = crate::crypto::seal::unhex(&v.material)
                    .ok_or_else(|| blocked("the material is not hex"))?;
                let plain = aead::open_box(
                    old_key.as_ref().unwrap_or(&un.master),
                    KEK_LABEL,
                    &aad,
                    &sealed,
                )
                .map_err(|_| blocked("it fails authentication under the master key"))?;
                let resealed_box = aead::seal_box(
                    new_key.as_ref().unwrap_or(new_master),
                    KEK_LABEL,
                    &aad,
                    plain.expose_secret(),
                )?;
                v.material = crate::crypto::seal::hex(&resealed_box);
                v.epoch = next_epoch;
                batch.require(Table::Versions, &vk, Some(&vbytes)).put(
                    Table::Versions,
                    &vk,
                    &to_json(&v)?,
                );
                resealed += 1;
            }
        }
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
        Some(crate::crypto::seal::hex(tag.as_ref()))
    }

    /// Whether `mac` is the audit-head MAC of `data`; `None` while sealed.
    pub fn audit_mac_verify(&self, data: &[u8], mac: &str) -> Option<bool> {
        let un = self.unsealed().ok()?;
        let tag = crate::crypto::seal::unhex(mac)?;
        Some(ring::hmac::verify(&un.audit_mac, data, &tag).is_ok())
    }

    /// The keyed hash of a context for audit records (16 bytes, hex); `None` while sealed
    /// or when the context is invalid.
    pub fn audit_context_hash(&self, context: &Context) -> Option<String> {
        let un = self.unsealed().ok()?;
        let canonical = format::canonical_context(context).ok()?;
        let tag = ring::hmac::sign(&un.audit_context, &canonical);
        Some(crate::crypto::seal::hex(&tag.as_ref()[..16]))
    }

    pub(super) fn unsealed(&self) -> Result<Arc<Unsealed>, Error> {
        self.unsealed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::Sealed)
    }

    /// The key a KEK's versions are sealed under: the master key bound to the key's
    /// erasure key, or (no erasure slot) the master key itself.
    pub(super) fn version_sealing_key(
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
            return aead::bind_key(master, &ek, ERASURE_LABEL).map(Some);
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
        aead::bind_key(master, &ek, ERASURE_LABEL).map(Some)
    }

    pub(super) fn seal_version(
        &self,
        un: &Unsealed,
        record: &KeyRecord,
        id: &KeyId,
        version: u32,
        created_at: u64,
        material: &SecretVec,
    ) -> Result<VersionRecord, Error> {
        let bound = self.version_sealing_key(un, record)?;
        let sealed = aead::seal_box(
            bound.as_ref().unwrap_or(&un.master),
            KEK_LABEL,
            &kek_aad(&record.tenant, id, version),
            material.expose_secret(),
        )?;
        Ok(VersionRecord {
            version,
            created_at,
            material: crate::crypto::seal::hex(&sealed),
            epoch: un.epoch,
        })
    }

    /// A deep health check for protocols that ask for one (XKS GetHealthStatus): the
    /// keyring is unsealed, the store answers a read (the sealed master key), and a seal
    /// and open round trip succeeds under a dedicated test key (derived from the master
    /// key under its own label; it protects nothing).
    pub fn self_test(&self) -> Result<(), Error> {
        let un = self.unsealed()?;
        self.sealed_master_key()?
            .ok_or(Error::Corrupt("the master key record is missing"))?;
        let probe = aead::bind_key(&un.master, &[0u8; aead::SALT_LEN], b"keyhold/self-test/v1")?;
        let message = SecretVec::random(32)?;
        let sealed = aead::seal_box(&probe, b"self-test", b"", message.expose_secret())?;
        let opened = aead::open_box(&probe, b"self-test", b"", &sealed)
            .map_err(|_| Error::Internal("self-test: the sealed probe did not open"))?;
        if opened != message {
            return Err(Error::Internal("self-test: the probe came back altered"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kms_client::api::Algorithm;

    use super::*;
    use crate::keyring::records::version_key;
    use crate::keyring::testing::{all_grant, ctx, setup, who};

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
            ring.lookups()
                .and_then(|mut keys| keys.datakey(&who("t"), "k", &Context::new())),
            Err(Error::Sealed)
        ));
    }

    #[test]
    fn a_swapped_version_record_fails_to_open_and_takes_down_only_itself() {
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
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        ring.on_integrity_event(Box::new(move |kind, detail| {
            seen.lock().unwrap().push((kind, detail));
        }));
        ring.seal();
        ring.unseal(&sealer).unwrap();
        // One bad version takes down only itself: the key reports it, the tenant's keys
        // list, the other key serves.
        let info = ring.key_info("t", "a").unwrap();
        assert_eq!(info.versions.len(), 1);
        assert!(info.versions[0].unreadable && !info.versions[0].can_unwrap);
        assert_eq!(ring.list_keys("t").unwrap().len(), 2);
        assert!(ring
            .lookups()
            .and_then(|mut l| l.datakey(&who("t"), "b", &Context::new()))
            .is_ok());
        // Its key cannot wrap with it, and says so (a 409, not a 500).
        let refused = ring
            .lookups()
            .and_then(|mut l| l.datakey(&who("t"), "a", &Context::new()));
        assert!(matches!(&refused, Err(Error::Unreadable(m)) if m.contains("current version 1")));
        // Reported: the integrity hook (an alert and a metric in the server) names it.
        let events = events.lock().unwrap().clone();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(
            events[0].0,
            crate::base::event::AlertKind::VersionUnreadable
        );
        assert!(events[0].1.contains(&a.id) && events[0].1.contains("version 1"));
        // A master-key rotation would lose it: refused, naming the record.
        let blocked = ring.rotate_master(&sealer);
        assert!(
            matches!(&blocked, Err(Error::Unreadable(m)) if m.contains("t/a") && m.contains("version 1")),
            "{blocked:?}"
        );
        // Rotating the key gives it a current version that opens.
        ring.rotate("t", "a").unwrap();
        assert!(ring
            .lookups()
            .and_then(|mut l| l.datakey(&who("t"), "a", &Context::new()))
            .is_ok());
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
