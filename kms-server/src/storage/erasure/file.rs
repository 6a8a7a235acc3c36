//! The erasure file: where the embedded store keeps its erasure keys.
//!
//! The store (redb, copy-on-write) does not overwrite data when a record is deleted: the
//! pages of a deleted KEK version may survive in the file, free but readable, until reused.
//! So each KEK gets a random 256-bit **erasure key** in this small side file, and its
//! versions are sealed under `HKDF(salt = erasure key, ikm = master key)`
//! ([`crate::crypto::aead::bind_key`]): reading a version needs both. Destroying the KEK
//! overwrites its erasure key **in place** with zeros and syncs; whatever copies of the
//! sealed versions remain in the store's free pages (or in old backups of the store file
//! alone) can no longer be opened, even with the master key.
//!
//! ```text
//! offset 0    64-byte header: "KHERASE1" + zeros
//! offset 64   slots of 32 bytes, one per key ever created, never reused; zeros = erased
//! ```
//!
//! Order of writes: a slot is written and synced *before* the key record naming it is
//! committed (a crash in between leaves an unused slot, never a key without its erasure
//! key); at destruction the store commit comes first, then the overwrite (a crash in
//! between leaves a destroyed key whose slot the next sweep erases).
//!
//! Limits, stated for operators: an overwrite in place is what a file system offers; on
//! SSDs the controller may keep the old block until it is trimmed, and snapshots or
//! backups of this file keep what they copied. Keep the data directory on an encrypted
//! volume and treat backups of the erasure file like key backups.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zeroize::Zeroizing;

use crate::base::error::Error;

const MAGIC: &[u8; 8] = b"KHERASE1";
const HEADER_LEN: u64 = 64;
const SLOT_LEN: u64 = 32;

/// The erasure-key file.
pub struct ErasureFile {
    file: File,
    path: PathBuf,
    /// Serializes slot allocation and erasure.
    lock: Mutex<()>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    tracing::error!(path = %path.display(), error = %e, "erasure file: {what}");
    Error::Storage(crate::storage::StoreError::Engine {
        engine: "erasure",
        source: format!("{}: {what}: {e}", path.display()).into(),
    })
}

impl ErasureFile {
    /// Opens or creates the file.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, "open", e))?;
        let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        if len == 0 {
            let mut header = [0u8; HEADER_LEN as usize];
            header[..8].copy_from_slice(MAGIC);
            crate::storage::write_new_file_header(&file, path, &header)
                .map_err(|e| io_err(path, "create", e))?;
        } else {
            let mut magic = [0u8; 8];
            file.read_exact_at(&mut magic, 0)
                .map_err(|e| io_err(path, "read header", e))?;
            if &magic != MAGIC || len < HEADER_LEN || (len - HEADER_LEN) % SLOT_LEN != 0 {
                return Err(Error::Corrupt("erasure file header or length"));
            }
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            lock: Mutex::new(()),
        })
    }

    fn slots(&self) -> Result<u64, Error> {
        let len = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?
            .len();
        Ok(len.saturating_sub(HEADER_LEN) / SLOT_LEN)
    }

    fn offset(slot: u32) -> u64 {
        HEADER_LEN + u64::from(slot) * SLOT_LEN
    }

    /// Stores a fresh random erasure key in a free slot, durably; returns the slot and key.
    pub fn allocate(&self) -> Result<(u32, Zeroizing<[u8; 32]>), Error> {
        let key = crate::crypto::aead::random_salt()?;
        let key = Zeroizing::new(key);
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Always a new slot at the end, never an erased one: a destroyed key's record keeps
        // naming its slot, and the sweep may erase it again after a crash, so a slot must
        // never come to hold another key's erasure key. (32 bytes per key ever created.)
        let slot =
            u32::try_from(self.slots()?).map_err(|_| Error::Internal("erasure slots exhausted"))?;
        self.file
            .write_all_at(&key[..], Self::offset(slot))
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, "write", e))?;
        Ok((slot, key))
    }

    /// The erasure key in `slot`; `None` once erased.
    pub fn get(&self, slot: u32) -> Result<Option<Zeroizing<[u8; 32]>>, Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        self.file
            .read_exact_at(&mut key[..], Self::offset(slot))
            .map_err(|e| io_err(&self.path, "read", e))?;
        Ok((!key.iter().all(|b| *b == 0)).then_some(key))
    }

    /// The whole file (for backups).
    pub fn contents(&self) -> Result<Vec<u8>, Error> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::fs::read(&self.path).map_err(|e| io_err(&self.path, "read", e))
    }

    /// Overwrites `slot` with zeros in place, durably.
    pub fn erase(&self, slot: u32) -> Result<(), Error> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if u64::from(slot) >= self.slots()? {
            return Ok(());
        }
        self.file
            .write_all_at(&[0u8; SLOT_LEN as usize], Self::offset(slot))
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, "erase", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_get_erase_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e");
        let f = ErasureFile::open(&path).unwrap();
        let (a, ka) = f.allocate().unwrap();
        let (b, kb) = f.allocate().unwrap();
        assert_eq!((a, b), (0, 1));
        assert_eq!(f.get(a).unwrap().unwrap(), ka);
        f.erase(a).unwrap();
        assert!(f.get(a).unwrap().is_none());
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(32).any(|w| w == &ka[..]), "erased in place");
        assert!(bytes.windows(32).any(|w| w == &kb[..]));
        // Erased slots are never reused.
        let (c, _) = f.allocate().unwrap();
        assert_eq!(c, 2);
        drop(f);
        let f = ErasureFile::open(&path).unwrap();
        assert_eq!(f.get(b).unwrap().unwrap(), kb);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(ErasureFile::open(&path).is_err());
    }
}
