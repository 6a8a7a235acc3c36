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

/// Why a new sled store was refused ([`SledStore::check_store`]).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

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
                // sled 0.34.7 reports a held lock as `ErrorKind::Other` "could not acquire
                // lock on ...", not as the `WouldBlock` it got from the OS.
                sled::Error::Io(ref io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
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

    /// What the server does before opening a sled store (`server::open_store`): sled
    /// 0.34.7 can leave a store that no longer opens after a kill -9 (`STORAGE.md`, "sled
    /// under kill -9"). An existing store (its `db` or `conf` file is there) still opens,
    /// with a warning that names the way out, `kms-server migrate-store` to redb. A new one
    /// is created only when the operator accepted the risk (`[store] accept_sled_risks`).
    pub fn check_store(path: &Path, accepted: bool) -> Result<(), StoreError> {
        if path.join("db").is_file() || path.join("conf").is_file() {
            tracing::warn!(
                path = %path.display(),
                "this store uses sled 0.34.7, which can leave a store that no longer opens \
                 after a kill -9 (storage/STORAGE.md, \"sled under kill -9\"). Move it to \
                 redb, the default engine: stop the server, then run `kms-server \
                 migrate-store --from-config <this config> --config <a config with [store] \
                 engine = \"redb\">`"
            );
            return Ok(());
        }
        if !accepted {
            return Err(engine_err(Refused(format!(
                "refusing to create a new sled store at {}: sled 0.34.7 can leave a store \
                 that no longer opens after a kill -9 (storage/STORAGE.md, \"sled under \
                 kill -9\"). Use engine = \"redb\" (the default), or set [store] \
                 accept_sled_risks = true to accept that risk",
                path.display()
            ))));
        }
        tracing::warn!(
            path = %path.display(),
            "creating a new sled store ([store] accept_sled_risks = true): sled 0.34.7 can \
             leave a store that no longer opens after a kill -9 (storage/STORAGE.md)"
        );
        Ok(())
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

    /// A new sled store needs the operator's `accept_sled_risks`; an existing one opens
    /// without it.
    #[test]
    fn a_new_store_needs_the_operators_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sled");
        let refused = match SledStore::check_store(&path, false).unwrap_err() {
            StoreError::Engine { engine, source } => format!("{engine}: {source}"),
            other => panic!("{other:?}"),
        };
        assert!(
            refused.starts_with("sled: refusing to create a new sled store")
                && refused.contains("accept_sled_risks = true")
                && refused.contains("redb"),
            "{refused}"
        );
        assert!(!path.exists(), "nothing is created when refused");
        SledStore::check_store(&path, true).unwrap();
        drop(SledStore::open(&path).unwrap());
        // Now it exists: it opens without the setting (with a warning).
        SledStore::check_store(&path, false).unwrap();
    }

    /// A store another handle holds is reported as `Locked`, not as an engine failure.
    #[test]
    fn a_held_store_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sled");
        let first = SledStore::open(&path).unwrap();
        match SledStore::open(&path) {
            Err(StoreError::Locked(p)) => assert_eq!(p, path.display().to_string()),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a second handle opened the store"),
        }
        drop(first);
    }
}
