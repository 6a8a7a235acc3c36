//! The master key's epoch: which master key the store's sealed records are under, and the
//! store condition that keeps every writer on the current one.
//!
//! One `meta` record, `master/epoch`, holds ([`EpochRecord`]):
//! - `epoch`: bumped by each master-key rotation, in the rotation's transaction. Every
//!   version record names the epoch it was sealed under.
//! - `writes`: bumped by each write that seals under the master key (a key created, a key
//!   rotated), in that write's transaction.
//! - `check`: an HMAC of the epoch under a key derived from that epoch's master key, so a
//!   node can tell whether the master key in its memory is the current one.
//!
//! Every sealing write requires the record to be exactly as it read it, with the epoch of
//! the master key it sealed under, and bumps `writes` ([`Keyring::commit_sealed`]); a
//! master-key rotation requires it unchanged since it read the versions it re-seals. So
//! on one store, whatever the number of nodes:
//! - a write sealed under a retired master key never commits ([`Error::MasterKeyChanged`]:
//!   the node follows the new master key, [`Keyring::follow_master`], and the caller
//!   retries);
//! - a rotation never commits over a version added after it read the versions (it reads
//!   them again).
//!
//! Stores from before epochs have no record: epoch 0, written with the first sealing
//! write.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::records::to_json;
use super::vault::Unsealed;
use super::Keyring;
use crate::base::error::Error;
use crate::crypto::aead;
use crate::crypto::secret::SecretKey;
use crate::storage::{StoreError, Table, WriteBatch};

/// The `meta` key of the epoch record.
pub(crate) const META_MASTER_EPOCH: &[u8] = b"master/epoch";
const CHECK_LABEL: &[u8] = b"keyhold/master-epoch/v1";
/// How often a sealing write is tried again when only another writer's count moved.
const SEALING_TRIES: usize = 16;

/// See the module docs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EpochRecord {
    /// Bumped by each master-key rotation.
    pub(super) epoch: u64,
    /// Bumped by each write that seals under the master key.
    pub(super) writes: u64,
    /// HMAC-SHA256 (hex) of the epoch under a key derived from its master key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) check: String,
}

/// The epoch record as stored: its exact bytes (for the condition) and its fields.
pub(super) struct StoredEpoch {
    pub(super) bytes: Option<Vec<u8>>,
    pub(super) record: EpochRecord,
}

/// The check value of `epoch` under `master`.
pub(super) fn check_of(master: &SecretKey, epoch: u64) -> Result<String, Error> {
    let key = aead::bind_key(master, &[0u8; aead::SALT_LEN], CHECK_LABEL)?;
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose_secret()),
        &epoch.to_be_bytes(),
    );
    Ok(crate::crypto::seal::hex(mac.as_ref()))
}

/// A new store's epoch record: epoch 0 under `master`.
pub(super) fn first_record(master: &SecretKey) -> Result<Vec<u8>, Error> {
    to_json(&EpochRecord {
        epoch: 0,
        writes: 0,
        check: check_of(master, 0)?,
    })
}

impl StoredEpoch {
    /// The record from its stored bytes (`None`: absent, epoch 0).
    pub(super) fn parse(bytes: Option<Vec<u8>>) -> Result<Self, Error> {
        let record = match &bytes {
            Some(b) => {
                serde_json::from_slice(b).map_err(|_| Error::Corrupt("master-key epoch record"))?
            }
            None => EpochRecord::default(),
        };
        Ok(StoredEpoch { bytes, record })
    }

    /// Whether `master` is this epoch's master key (a record from before checks, or no
    /// record at all, cannot say: taken as yes).
    pub(super) fn is_of(&self, master: &SecretKey) -> Result<bool, Error> {
        if self.record.check.is_empty() {
            return Ok(true);
        }
        let expected = check_of(master, self.record.epoch)?;
        Ok(expected
            .as_bytes()
            .ct_eq(self.record.check.as_bytes())
            .into())
    }
}

impl Keyring {
    /// Notes that this node found the store's master key newer than its own (its follower
    /// looks at once, see [`Keyring::take_master_behind`]) and returns the error to answer.
    pub(super) fn master_behind(&self) -> Error {
        self.master_behind
            .store(true, std::sync::atomic::Ordering::Release);
        Error::MasterKeyChanged
    }

    /// Whether a request found this node behind a master-key rotation since the last
    /// call: the change follower then re-opens the master key even if no change on the
    /// feed said so (a rotation committed while this node was sealed or unsealing).
    pub fn take_master_behind(&self) -> bool {
        self.master_behind
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// The stored epoch record (epoch 0 when the store has none yet).
    pub(super) fn stored_epoch(&self) -> Result<StoredEpoch, Error> {
        StoredEpoch::parse(self.store.get(Table::Meta, META_MASTER_EPOCH)?)
    }

    /// The epoch of the master key in memory; `None` while sealed.
    pub fn master_epoch(&self) -> Option<u64> {
        self.unsealed().ok().map(|un| un.epoch)
    }

    /// Commits `batch`, which holds records sealed under `un`'s master key, on condition
    /// that this master key is still the store's and no master-key rotation read the
    /// versions before this write (see the module docs). Tried again while only other
    /// sealing writes moved the count; [`Error::MasterKeyChanged`] once the epoch moved.
    pub(super) fn commit_sealed(&self, un: &Unsealed, batch: &WriteBatch) -> Result<(), Error> {
        for _ in 0..SEALING_TRIES {
            let stored = self.stored_epoch()?;
            if stored.record.epoch != un.epoch {
                return Err(self.master_behind());
            }
            let mut next = stored.record.clone();
            next.writes = next.writes.wrapping_add(1);
            if next.check.is_empty() {
                next.check = check_of(&un.master, un.epoch)?;
            }
            let mut b = batch.clone();
            b.require(Table::Meta, META_MASTER_EPOCH, stored.bytes.as_deref())
                .put(Table::Meta, META_MASTER_EPOCH, &to_json(&next)?);
            match self.store.commit(&b) {
                Ok(()) => return Ok(()),
                // Only the epoch record is conditioned in `meta`: another sealing write
                // (or a rotation, seen on the next read) came first.
                Err(StoreError::Conflict("meta")) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Storage(StoreError::Conflict("meta")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_record_is_followed_by_every_node() {
        assert!(META_MASTER_EPOCH.starts_with(crate::storage::META_MASTER_PREFIX));
        assert!(crate::storage::followed(Table::Meta, META_MASTER_EPOCH));
    }

    #[test]
    fn the_check_names_the_master_key_and_the_epoch() {
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let stored = StoredEpoch {
            bytes: None,
            record: EpochRecord {
                epoch: 3,
                writes: 9,
                check: check_of(&a, 3).unwrap(),
            },
        };
        assert!(stored.is_of(&a).unwrap());
        assert!(!stored.is_of(&b).unwrap());
        assert_ne!(check_of(&a, 3).unwrap(), check_of(&a, 4).unwrap());
    }
}
