//! Copying a whole store from one engine to another (`kms-server migrate-store`): an
//! embedded store into PostgreSQL, or back. Every table is copied in pages, into a target
//! that must be empty, then both stores are read again end to end and compared entry by
//! entry (a SHA-256 over each table, and the counts): the command reports success only
//! when they are identical. The records are copied as they are (still sealed under the
//! master key), so the same seal secret opens the target.

use sha2::{Digest, Sha256};

use super::{KeyStore, StoreError, Table, WriteBatch};

/// Entries per read and per write batch.
const PAGE: usize = 500;

/// What a migration copied, per table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// (table, entries, SHA-256 of the table's entries in key order, hex).
    pub tables: Vec<(&'static str, u64, String)>,
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The target already holds data.
    #[error("the target store is not empty (table {0} has entries): migrate into a new store")]
    TargetNotEmpty(&'static str),
    /// The source is empty: nothing to migrate (probably the wrong path).
    #[error("the source store is empty: check the path and the engine")]
    SourceEmpty,
    /// Reading back found a difference.
    #[error("verification failed: table {table} differs between source and target ({detail})")]
    Mismatch {
        /// Table.
        table: &'static str,
        /// Counts or hashes.
        detail: String,
    },
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Visits every entry of `table` in key order.
fn each(
    store: &dyn KeyStore,
    table: Table,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), MigrateError>,
) -> Result<(), MigrateError> {
    let mut start = Vec::new();
    loop {
        let page = store.scan_from(table, &start, PAGE)?;
        for (k, v) in &page {
            f(k, v)?;
        }
        match page.last() {
            Some((k, _)) if page.len() == PAGE => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The (count, SHA-256) of a table: over each entry's key and value, length-prefixed.
fn digest(store: &dyn KeyStore, table: Table) -> Result<(u64, String), MigrateError> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    each(store, table, |k, v| {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k);
        h.update((v.len() as u64).to_be_bytes());
        h.update(v);
        n += 1;
        Ok(())
    })?;
    Ok((n, kms_client::hex::encode(&h.finalize())))
}

/// Copies every table of `from` into the empty `to`, then verifies.
pub fn migrate(from: &dyn KeyStore, to: &dyn KeyStore) -> Result<Copied, MigrateError> {
    for t in Table::ALL {
        if !to.scan_from(t, &[], 1)?.is_empty() {
            return Err(MigrateError::TargetNotEmpty(t.name()));
        }
    }
    if from.scan_from(Table::Meta, &[], 1)?.is_empty() {
        return Err(MigrateError::SourceEmpty);
    }
    for t in Table::ALL {
        let mut batch = WriteBatch::new();
        each(from, t, |k, v| {
            // Absent in the target: a concurrent writer into the target is detected.
            batch.require(t, k, None).put(t, k, v);
            if batch.writes.len() >= PAGE {
                to.commit(&std::mem::take(&mut batch))?;
            }
            Ok(())
        })?;
        to.commit(&batch)?;
    }
    let mut tables = Vec::new();
    for t in Table::ALL {
        let (a, b) = (digest(from, t)?, digest(to, t)?);
        if a != b {
            return Err(MigrateError::Mismatch {
                table: t.name(),
                detail: format!(
                    "source {} entries {}, target {} entries {}",
                    a.0, a.1, b.0, b.1
                ),
            });
        }
        tables.push((t.name(), a.0, a.1));
    }
    Ok(Copied { tables })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RedbStore;

    #[test]
    fn copies_pages_verifies_and_refuses_a_used_target() {
        let dir = tempfile::tempdir().unwrap();
        let a = RedbStore::open(&dir.path().join("a.redb")).unwrap();
        let b = RedbStore::open(&dir.path().join("b.redb")).unwrap();
        assert!(matches!(migrate(&a, &b), Err(MigrateError::SourceEmpty)));
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, b"m", b"master");
        for i in 0..1234u32 {
            batch.put(Table::Versions, &i.to_be_bytes(), &[i as u8; 40]);
        }
        batch.put(Table::Keys, b"\xff\xff", b"edge");
        a.commit(&batch).unwrap();
        let copied = migrate(&a, &b).unwrap();
        let versions = copied.tables.iter().find(|t| t.0 == "versions").unwrap();
        assert_eq!(versions.1, 1234);
        assert_eq!(
            b.get(Table::Keys, b"\xff\xff").unwrap(),
            Some(b"edge".to_vec())
        );
        // Again into the same target: refused, nothing changed.
        assert!(matches!(
            migrate(&a, &b),
            Err(MigrateError::TargetNotEmpty(_))
        ));
        assert_eq!(
            digest(&a, Table::Versions).unwrap(),
            digest(&b, Table::Versions).unwrap()
        );
    }
}
