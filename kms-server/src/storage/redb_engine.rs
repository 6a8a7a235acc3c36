//! The redb engine (default): one file, copy-on-write B-trees, durable commits.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::{Entry, KeyStore, StoreError, Table, WriteBatch};

const ENGINE: &str = "redb";

fn def(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn engine_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Engine {
        engine: ENGINE,
        source: Box::new(e.into()),
    }
}

/// redb's page cache. redb's default (1 GiB) lets resident memory grow with the store:
/// with a million keys, reading them once pulled the process to ~680 MiB. Key material is
/// cached decrypted by the keyring, so this cache holds only what a cache miss reads.
const CACHE_BYTES: usize = 32 << 20;

/// A redb database file. Every commit uses `Durability::Immediate` with two-phase commit,
/// so a commit that returned survives a crash or power loss (redb fsyncs twice per commit
/// and never overwrites the last committed root in place).
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens or creates the database file at `path` and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Locked(path.display().to_string()))
            }
            Err(e) => return Err(engine_err(e)),
        };
        let store = Self { db };
        // Create the tables so that reads never meet a missing table.
        store.commit(&WriteBatch::new())?;
        Ok(store)
    }
}

impl KeyStore for RedbStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine_err)?;
        let t = txn.open_table(def(table)).map_err(engine_err)?;
        let value = t.get(key).map_err(engine_err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(engine_err)?;
        let t = txn.open_table(def(table)).map_err(engine_err)?;
        let mut out = Vec::new();
        for entry in t.range(prefix..).map_err(engine_err)? {
            let (k, v) = entry.map_err(engine_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn scan_snapshot(&self, scans: &[(Table, &[u8])]) -> Result<Vec<Vec<Entry>>, StoreError> {
        // One read transaction: every scan sees the same committed state.
        let txn = self.db.begin_read().map_err(engine_err)?;
        let mut all = Vec::with_capacity(scans.len());
        for (table, prefix) in scans {
            let t = txn.open_table(def(*table)).map_err(engine_err)?;
            let mut out = Vec::new();
            for entry in t.range(*prefix..).map_err(engine_err)? {
                let (k, v) = entry.map_err(engine_err)?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_vec(), v.value().to_vec()));
            }
            all.push(out);
        }
        Ok(all)
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(engine_err)?;
        let t = txn.open_table(def(table)).map_err(engine_err)?;
        let mut out = Vec::new();
        for entry in t.range(start..).map_err(engine_err)?.take(limit) {
            let (k, v) = entry.map_err(engine_err)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn get_floor(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(engine_err)?;
        let t = txn.open_table(def(table)).map_err(engine_err)?;
        let mut range = t.range(..=key).map_err(engine_err)?;
        match range.next_back() {
            Some(entry) => {
                let (k, v) = entry.map_err(engine_err)?;
                Ok(Some((k.value().to_vec(), v.value().to_vec())))
            }
            None => Ok(None),
        }
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        // Tests inject a full or read-only disk here (feature `failpoints`).
        fail::fail_point!("store-commit", |_| Err(StoreError::Engine {
            engine: ENGINE,
            source: "No space left on device (os error 28) [injected]".into(),
        }));
        let mut txn = self.db.begin_write().map_err(engine_err)?;
        txn.set_durability(Durability::Immediate);
        txn.set_two_phase_commit(true);
        {
            for table in Table::ALL {
                txn.open_table(def(table)).map_err(engine_err)?;
            }
            for c in &batch.conditions {
                let t = txn.open_table(def(c.table)).map_err(engine_err)?;
                let current = t.get(c.key.as_slice()).map_err(engine_err)?;
                let matches = match (&current, &c.expected) {
                    (None, None) => true,
                    (Some(v), Some(e)) => v.value() == e.as_slice(),
                    _ => false,
                };
                if !matches {
                    drop(current);
                    drop(t);
                    txn.abort().map_err(engine_err)?;
                    return Err(StoreError::Conflict(c.table.name()));
                }
            }
            for (table, key, value) in &batch.writes {
                let mut t = txn.open_table(def(*table)).map_err(engine_err)?;
                match value {
                    Some(v) => {
                        t.insert(key.as_slice(), v.as_slice()).map_err(engine_err)?;
                    }
                    None => {
                        t.remove(key.as_slice()).map_err(engine_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(engine_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("k.redb")).unwrap();
        super::super::tests::contract(&store);
    }

    #[test]
    fn second_open_is_refused_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        let _a = RedbStore::open(&path).unwrap();
        assert!(matches!(RedbStore::open(&path), Err(StoreError::Locked(_))));
    }
}
