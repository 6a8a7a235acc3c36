//! Backup and restore: an encrypted, integrity-checked export of the keys.
//!
//! A backup is one JSON document:
//! `{"format": "keyhold-backup/1", "created_at", "sealed_master", "payload"}`. `sealed_master`
//! is the store's sealed master key as stored (useless without the seal secret: key file,
//! passphrase or shares); `payload` is a sealed box (`aead::seal_box`) under the master
//! key, with the format, time and sealed master key as associated data, of every key
//! record, name, version (material still sealed), grant, deletion entry, usage counter,
//! runtime identity, and the erasure file. So a backup is useless without the master key,
//! and one flipped byte anywhere makes it refused.
//!
//! Restore is offline (`kms-server restore`), into a store that was never initialized: it
//! unseals the backup's master key with the configured seal secret, opens the payload,
//! opens every KEK version in it, and only then writes anything. The audit trail is not
//! part of a backup (it has its own file and its own chain); neither are lockouts.

use serde::{Deserialize, Serialize};

use crate::base::error::Error;
use crate::crypto::aead;
use crate::crypto::seal::{hex, unhex, SealedMasterKey, Sealer};
use crate::crypto::secret::SecretKey;
use crate::keyring::Keyring;
use crate::storage::{Table, WriteBatch};

const FORMAT: &str = "keyhold-backup/1";
const LABEL: &[u8] = b"keyhold/backup/v1";
/// The tables a backup carries (the audit table is not one: see the module docs).
const TABLES: [Table; 5] = [
    Table::Keys,
    Table::KeyNames,
    Table::Versions,
    Table::Deletions,
    Table::Usage,
];
/// Meta entries a backup carries (runtime identities); the sealed master key travels
/// beside the payload.
const META_PREFIX: &[u8] = b"policy/";

/// A backup document.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// `keyhold-backup/1`.
    pub format: String,
    /// When it was made, RFC 3339.
    pub created_at: String,
    /// The sealed master key, as stored.
    pub sealed_master: SealedMasterKey,
    /// The sealed payload, hex.
    pub payload: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    /// Table name → [(key hex, value hex)].
    tables: Vec<(String, Vec<(String, String)>)>,
    meta: Vec<(String, String)>,
    /// The erasure file, hex (empty when the store has none).
    erasure: String,
}

fn aad(format: &str, created_at: &str, sealed: &SealedMasterKey) -> Result<Vec<u8>, Error> {
    let mut aad = Vec::new();
    for part in [format.as_bytes(), created_at.as_bytes()] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(
        &serde_json::to_vec(sealed).map_err(|_| Error::Internal("backup serialization"))?,
    );
    Ok(aad)
}

/// Whether a `meta` entry travels in a backup: runtime identities, the audit keys (so the
/// restored store keeps them, sealed under the same master key) and the master-key epoch
/// record (the epoch the versions name).
fn carried_meta(key: &[u8]) -> bool {
    key.starts_with(META_PREFIX)
        || key == crate::keyring::META_AUDIT_KEYS
        || key == crate::keyring::META_MASTER_EPOCH
        || key == crate::keyring::META_RECORDS_MARKER
}

/// Exports everything a restore needs. Needs the keyring unsealed. The tables and the
/// sealed master key come from one snapshot of the store; the snapshot's epoch record must
/// name the master key in use (else another node rotated it meanwhile: 503, retry); and
/// the backup is opened and every KEK version in it checked, as a restore would, before it
/// is returned (a version that does not open is named).
pub fn export(keyring: &Keyring) -> Result<Backup, Error> {
    if keyring.shared_erasure().is_some() {
        // Such a backup would have to carry the erasure keys in a form the master key
        // opens, so a key destroyed after it could come back from it forever: back up
        // the database, whose copies the erasure epochs make expire (docs/ha.md).
        return Err(Error::InvalidState(
            "this store keeps its erasure keys in the database under HSM epoch keys: back up the database instead (docs/ha.md)",
        ));
    }
    keyring.with_master_locked(|master, epoch, erasure| {
        let mut scans: Vec<(Table, &[u8])> = TABLES.iter().map(|t| (*t, &b""[..])).collect();
        scans.push((Table::Meta, b""));
        let mut snapshot = keyring.store().scan_snapshot(&scans)?;
        let meta_rows = snapshot.pop().unwrap_or_default();
        let meta_value = |key: &[u8]| {
            meta_rows
                .iter()
                .find(|(k, _)| k.as_slice() == key)
                .map(|(_, v)| v.as_slice())
        };
        let sealed_master: SealedMasterKey = serde_json::from_slice(
            meta_value(crate::keyring::META_SEALED_MASTER)
                .ok_or(Error::InvalidState("the store is not initialized"))?,
        )
        .map_err(|_| Error::Corrupt("sealed master key record"))?;
        if !keyring.epoch_record_names(
            meta_value(crate::keyring::META_MASTER_EPOCH),
            master,
            epoch,
        )? {
            return Err(Error::MasterKeyChanged);
        }
        let tables = TABLES
            .iter()
            .zip(snapshot)
            .map(|(table, rows)| {
                let rows = rows.into_iter().map(|(k, v)| (hex(&k), hex(&v))).collect();
                (table.name().to_owned(), rows)
            })
            .collect();
        let meta = meta_rows
            .iter()
            .filter(|(k, _)| carried_meta(k))
            .map(|(k, v)| (hex(k), hex(v)))
            .collect();
        let erasure = match erasure {
            Some(e) => hex(&e.contents()?),
            None => String::new(),
        };
        let payload = zeroize::Zeroizing::new(
            serde_json::to_vec(&Payload {
                tables,
                meta,
                erasure,
            })
            .map_err(|_| Error::Internal("backup serialization"))?,
        );
        let created_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let sealed = aead::seal_box(
            master,
            LABEL,
            &aad(FORMAT, &created_at, &sealed_master)?,
            &payload,
        )?;
        let backup = Backup {
            format: FORMAT.to_owned(),
            created_at,
            sealed_master,
            payload: hex(&sealed),
        };
        // Restorable before it is answered: the payload opens under this master key and
        // every KEK version in it opens.
        let (batch, _, erasure) = open_payload(&backup, master)?;
        keyring.verify_restorable(master, &batch, &erasure)?;
        Ok(backup)
    })
}

/// Opens `backup`'s payload under `master` into the batch a restore writes, with its row
/// count and the erasure file's bytes. Refuses any entry a backup does not carry.
fn open_payload(
    backup: &Backup,
    master: &SecretKey,
) -> Result<(WriteBatch, usize, Vec<u8>), Error> {
    let sealed = unhex(&backup.payload).ok_or(Error::Corrupt("backup payload encoding"))?;
    let plain = aead::open_box(
        master,
        LABEL,
        &aad(&backup.format, &backup.created_at, &backup.sealed_master)?,
        &sealed,
    )
    .map_err(|_| {
        Error::Corrupt("the backup does not authenticate: altered, or another master key")
    })?;
    let payload: Payload = serde_json::from_slice(plain.expose_secret())
        .map_err(|_| Error::Corrupt("backup payload"))?;
    let erasure = unhex(&payload.erasure).ok_or(Error::Corrupt("backup erasure file"))?;
    let mut batch = WriteBatch::new();
    let mut rows = 0;
    for (name, entries) in &payload.tables {
        let table = TABLES
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or(Error::Corrupt("backup table name"))?;
        for (k, v) in entries {
            let (k, v) = (
                unhex(k).ok_or(Error::Corrupt("backup key"))?,
                unhex(v).ok_or(Error::Corrupt("backup value"))?,
            );
            batch.put(table, &k, &v);
            rows += 1;
        }
    }
    for (k, v) in &payload.meta {
        let (k, v) = (
            unhex(k).ok_or(Error::Corrupt("backup key"))?,
            unhex(v).ok_or(Error::Corrupt("backup value"))?,
        );
        if !carried_meta(&k) {
            return Err(Error::Corrupt("backup meta entry"));
        }
        batch.put(Table::Meta, &k, &v);
    }
    Ok((batch, rows, erasure))
}

/// Restores `backup` into `keyring`'s store, which must never have been initialized,
/// unsealing with `sealer` (the same seal secret as the backed-up server). Verifies
/// everything — the payload's integrity and every KEK version — before writing; writes
/// the store in one transaction and the erasure file beside it (`erasure_path`).
pub fn restore(
    keyring: &Keyring,
    sealer: &dyn Sealer,
    backup: &Backup,
    erasure_path: &std::path::Path,
) -> Result<usize, Error> {
    if backup.format != FORMAT {
        return Err(Error::InvalidRequest(format!(
            "not a {FORMAT} backup: {}",
            backup.format
        )));
    }
    if keyring.sealed_master_key()?.is_some() {
        return Err(Error::InvalidState(
            "the target store is already initialized: restore into a new, empty store",
        ));
    }
    let master = sealer.unseal(&backup.sealed_master)?;
    let (batch, rows, erasure) = open_payload(backup, &master)?;
    // Every KEK version must open before anything is written.
    keyring.verify_restorable(&master, &batch, &erasure)?;
    if !erasure.is_empty() {
        std::fs::write(erasure_path, &erasure).map_err(|e| {
            Error::Storage(crate::storage::StoreError::Engine {
                engine: "erasure",
                source: format!("{}: {e}", erasure_path.display()).into(),
            })
        })?;
        if let Ok(f) = std::fs::File::open(erasure_path) {
            let _ = f.sync_all();
        }
    }
    keyring.install(&backup.sealed_master, batch)?;
    Ok(rows)
}
