//! Backup and restore: the master key under the write lock (an export reads the tables
//! as one state), the check that every KEK version of a restore opens, and its install.

use super::records::{
    kek_aad, to_json, unreadable_version, KeyRecord, VersionRecord, META_FORMAT,
    META_SEALED_MASTER, STORE_FORMAT,
};
use super::vault::{ERASURE_LABEL, KEK_LABEL};
use super::Keyring;
use crate::base::error::Error;
use crate::crypto::aead;
use crate::crypto::format::KeyId;
use crate::crypto::seal::SealedMasterKey;
use crate::crypto::secret::SecretKey;
use crate::storage::{StoreError, Table, WriteBatch};

impl Keyring {
    /// Runs `f` under this node's write lock with the master key in use, its epoch, and
    /// the erasure file (for backups). The lock is taken before the master key is read,
    /// so a rotation that held it is over and its new key is the one `f` gets. Other
    /// nodes of a shared store may still write: `f` reads the store through one snapshot
    /// and checks that the snapshot's epoch record names this key
    /// ([`Keyring::epoch_record_names`]).
    pub fn with_master_locked<T>(
        &self,
        f: impl FnOnce(
            &SecretKey,
            u64,
            Option<&crate::storage::erasure::ErasureFile>,
        ) -> Result<T, Error>,
    ) -> Result<T, Error> {
        fail::fail_point!("keyring-backup-before-lock");
        let (_guard, un) = self.writer()?;
        f(&un.master, un.epoch, self.erasure.as_deref())
    }

    /// Whether `bytes`, an epoch record as read from a snapshot (`None`: absent), names
    /// `master` at `epoch`.
    pub fn epoch_record_names(
        &self,
        bytes: Option<&[u8]>,
        master: &SecretKey,
        epoch: u64,
    ) -> Result<bool, Error> {
        let stored = super::epoch::StoredEpoch::parse(bytes.map(<[u8]>::to_vec))?;
        Ok(stored.record.epoch == epoch && stored.is_of(master)?)
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
            let id = KeyId(id.try_into().map_err(|_| Error::Corrupt("key id"))?);
            let record: KeyRecord = serde_json::from_slice(bytes).map_err(|_| {
                Error::Unreadable(format!("key record {} does not parse", id.to_hex()))
            })?;
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
                        Some(aead::bind_key(master, &ek, ERASURE_LABEL)?)
                    }
                }
                None => None,
            };
            for (vk, vbytes) in rows(Table::Versions).filter(|(k, _)| k.starts_with(&id.0)) {
                let blocked = |why: &str| unreadable_version(&record, vk, why);
                let v: VersionRecord = serde_json::from_slice(vbytes)
                    .map_err(|_| blocked("the version record does not parse"))?;
                let sealed = crate::crypto::seal::unhex(&v.material)
                    .ok_or_else(|| blocked("the material is not hex"))?;
                let key = match (&bound, record.erasure_slot) {
                    (Some(k), _) => k,
                    (None, None) => master,
                    (None, Some(_)) => {
                        return Err(Error::Corrupt(
                            "a version of a key whose erasure key is erased",
                        ))
                    }
                };
                aead::open_box(
                    key,
                    KEK_LABEL,
                    &kek_aad(&record.tenant, &id, v.version),
                    &sealed,
                )
                .map_err(|_| blocked("it does not open under the backup's master key"))?;
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
}
