//! The sled engine (cargo feature `sled`). Kept because it was requested; not the default.
//! See `STORAGE.md`: sled's `flush` uses `sync_file_range`, not `fsync`.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::{Entry, KeyStore, StoreError, Table, WriteBatch};

const ENGINE: &str = "sled";

fn engine_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Engine {
        engine: ENGINE,
        source: Box::new(e),
    }
}

/// A sled database directory. Commits run as one multi-tree transaction followed by
/// `flush()`; the write is acknowledged only after the flush returns.
pub struct SledStore {
    db: sled::Db,
    trees: [sled::Tree; 8],
}

impl SledStore {
    /// Opens or creates the database directory at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked(path.display().to_string())
                }
                other => engine_err(other),
            })?;
        let open = |t: Table| db.open_tree(t.name()).map_err(engine_err);
        let trees = [
            open(Table::Meta)?,
            open(Table::Keys)?,
            open(Table::KeyNames)?,
            open(Table::Versions)?,
            open(Table::Audit)?,
            open(Table::Deletions)?,
            open(Table::Usage)?,
            open(Table::Rotations)?,
        ];
        Ok(Self { db, trees })
    }

    fn tree(&self, table: Table) -> &sled::Tree {
        &self.trees[index(table)]
    }
}

fn index(table: Table) -> usize {
    usize::from(table.id())
}

impl KeyStore for SledStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(table)
            .get(key)
            .map_err(engine_err)?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.tree(table)
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine_err))
            .collect()
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.tree(table)
            .range(start..)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine_err))
            .collect()
    }

    fn get_floor(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        match self.tree(table).range(..=key).next_back() {
            Some(r) => r
                .map(|(k, v)| Some((k.to_vec(), v.to_vec())))
                .map_err(engine_err),
            None => Ok(None),
        }
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let result = self.trees.as_slice().transaction(|trees| {
            for c in &batch.conditions {
                let current = trees[index(c.table)].get(c.key.as_slice())?;
                let matches = match (&current, &c.expected) {
                    (None, None) => true,
                    (Some(v), Some(e)) => v.as_ref() == e.as_slice(),
                    _ => false,
                };
                if !matches {
                    return Err(ConflictableTransactionError::Abort(c.table.name()));
                }
            }
            for (table, key, value) in &batch.writes {
                let tree = &trees[index(*table)];
                match value {
                    Some(v) => {
                        tree.insert(key.as_slice(), v.as_slice())?;
                    }
                    None => {
                        tree.remove(key.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(table)) => return Err(StoreError::Conflict(table)),
            Err(TransactionError::Storage(e)) => return Err(engine_err(e)),
        }
        self.db.flush().map_err(engine_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("k.sled")).unwrap();
        super::super::tests::contract(&store);
    }
}
