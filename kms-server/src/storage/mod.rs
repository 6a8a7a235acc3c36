//! The `KeyStore` trait: durable, transactional byte tables under every server record.
//!
//! See `STORAGE.md` beside this file for the engines, their durability, and the crash-test
//! results.
//!
//! A store is a few named tables of byte keys and byte values. Reads see committed data.
//! [`KeyStore::commit`] applies a [`WriteBatch`] atomically and returns only once the batch
//! is durable on disk; a batch may carry preconditions (a key absent, or holding exact
//! bytes), checked inside the same transaction, so read-modify-write stays correct even
//! with several writers. The typed records on top live in [`crate::keyring`].

#![doc = include_str!("STORAGE.md")]

use std::path::Path;
use std::sync::Arc;

pub mod erasure;
pub mod migrate;
mod postgres;
mod redb_engine;
#[cfg(feature = "sled")]
mod sled_engine;

pub(crate) use postgres::pg_err;
pub use postgres::{PgPool, PgSettings, PgStore};
pub use redb_engine::RedbStore;
#[cfg(feature = "sled")]
pub use sled_engine::SledStore;

/// Writes the header of a file just created beside the store (the audit chain file, the
/// erasure file) and makes it durable: the bytes, then the directory entry.
pub(crate) fn write_new_file_header(
    file: &std::fs::File,
    path: &Path,
    header: &[u8],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(header, 0)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Store-wide records: the sealed master key, the format version.
    Meta,
    /// Key id → key record.
    Keys,
    /// Tenant ‖ 0x00 ‖ name → key id.
    KeyNames,
    /// Key id ‖ version (u32 BE) → version record (material sealed under the master key).
    Versions,
    /// First sequence number of a batch (u64 BE) → the batch's audit records, one JSON
    /// line each (hash-chained; see `audit`).
    Audit,
    /// Deletion date (unix seconds, u64 BE) ‖ key id → empty: keys pending deletion, in
    /// the order they fall due, so the destruction sweep reads only what is due.
    Deletions,
    /// Key id ‖ version (u32 BE) → usage counters of that version (see `usage`).
    Usage,
    /// Rotation due date (unix seconds, u64 BE) ‖ key id → empty: keys with a rotation
    /// period, in the order they fall due, so the rotation sweep reads only what is due
    /// (not every key: a million keys must not be parsed every minute).
    Rotations,
}

impl Table {
    /// Every table, for engines that create them up front.
    pub const ALL: [Table; 8] = [
        Table::Meta,
        Table::Keys,
        Table::KeyNames,
        Table::Versions,
        Table::Audit,
        Table::Deletions,
        Table::Usage,
        Table::Rotations,
    ];

    /// The table's number, stored by engines that keep every table in one space (the
    /// PostgreSQL relation) or index them (sled's trees). Never renumber.
    pub fn id(self) -> u8 {
        match self {
            Table::Meta => 0,
            Table::Keys => 1,
            Table::KeyNames => 2,
            Table::Versions => 3,
            Table::Audit => 4,
            Table::Deletions => 5,
            Table::Usage => 6,
            Table::Rotations => 7,
        }
    }

    /// The table of a number from [`Table::id`].
    pub fn from_id(id: u8) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The table's name in the engine.
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Keys => "keys",
            Table::KeyNames => "key_names",
            Table::Versions => "versions",
            Table::Audit => "audit",
            Table::Deletions => "deletions",
            Table::Usage => "usage",
            Table::Rotations => "rotations",
        }
    }
}

/// A precondition checked inside the commit's transaction.
#[derive(Debug, Clone)]
pub struct Condition {
    /// Table.
    pub table: Table,
    /// Key.
    pub key: Vec<u8>,
    /// The exact bytes the key must hold, or `None` for "absent".
    pub expected: Option<Vec<u8>>,
}

/// A set of writes applied atomically, after all conditions hold.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// Checked first; any mismatch aborts with [`StoreError::Conflict`].
    pub conditions: Vec<Condition>,
    /// `(table, key, Some(value))` puts, `(table, key, None)` deletes.
    pub writes: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires `key` to hold exactly `expected` (`None`: absent).
    pub fn require(&mut self, table: Table, key: &[u8], expected: Option<&[u8]>) -> &mut Self {
        self.conditions.push(Condition {
            table,
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
        });
        self
    }

    /// Writes `value` at `key`.
    pub fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> &mut Self {
        self.writes
            .push((table, key.to_vec(), Some(value.to_vec())));
        self
    }

    /// Deletes `key`.
    pub fn delete(&mut self, table: Table, key: &[u8]) -> &mut Self {
        self.writes.push((table, key.to_vec(), None));
        self
    }
}

pub use crate::base::error::StoreError;

/// A durable, transactional table store.
pub trait KeyStore: Send + Sync + 'static {
    /// The engine's name (`redb`, `sled`).
    fn engine(&self) -> &'static str;

    /// The committed value at `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every committed `(key, value)` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;

    /// Up to `limit` committed `(key, value)` pairs with key ≥ `start`, in key order.
    fn scan_from(&self, table: Table, start: &[u8], limit: usize)
        -> Result<Vec<Entry>, StoreError>;

    /// The committed entry with the greatest key ≤ `key`, if any.
    fn get_floor(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError>;

    /// Several prefix scans, all read from one snapshot of the store (one committed
    /// state: a backup's tables and the sealed master key beside them agree). The default
    /// reads them one after the other, which is one state only while no other writer can
    /// commit: engines that other processes write override it (PostgreSQL), and so do
    /// those that have snapshots anyway (redb).
    fn scan_snapshot(&self, scans: &[(Table, &[u8])]) -> Result<Vec<Vec<Entry>>, StoreError> {
        scans
            .iter()
            .map(|(table, prefix)| self.scan_prefix(*table, prefix))
            .collect()
    }

    /// Applies `batch` atomically after checking its conditions. Returns once the batch is
    /// durable (fsync'd, or the engine's documented equivalent).
    fn commit(&self, batch: &WriteBatch) -> Result<(), StoreError>;

    /// The store's side that other nodes share, for a store several nodes write
    /// (PostgreSQL); `None` for the embedded engines, where no other writer can exist.
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }
}

/// What a store several nodes share adds to [`KeyStore`]: its change feed, the nodes'
/// heartbeats, and its connection pool for the tables kept beside the store's (the
/// cluster's audit chain, the erasure keys). The change follower (`app/follower.rs`) is
/// the one reader of the feed and the heartbeats.
pub trait Cluster: Send + Sync {
    /// The connection pool.
    fn pool(&self) -> PgPool;

    /// The position of the change feed now.
    fn change_cursor(&self) -> Result<u64, StoreError>;

    /// Records that node `id` (running `version`) is alive, and returns every node that
    /// did so in the last 10 s as (id, version, milliseconds since).
    fn heartbeat(&self, id: &str, version: &str) -> Result<Vec<Peer>, StoreError>;

    /// Waits up to `timeout` for a sign that another writer changed something (a
    /// notification); returns early when one came.
    fn wait_for_change(&self, timeout: std::time::Duration);

    /// The records other writers changed after `cursor` that nodes follow ([`followed`]),
    /// in commit order, and the new cursor. `None` instead of the list: the feed no longer
    /// reaches back to `cursor`, so anything may have changed.
    fn changes_since(&self, cursor: u64) -> Result<Changes, StoreError>;
}

/// What [`Cluster::changes_since`] returns: the new cursor, and the changed records as
/// (table, key) (`None`: the feed cannot say; drop everything).
pub type Changes = (u64, Option<Vec<(Table, Vec<u8>)>>);

/// Runtime identities (`crate::access::policy`): `Meta` keys under this prefix.
pub const META_IDENTITY_PREFIX: &[u8] = b"policy/identity/";
/// The master key's records (its epoch: see `keyring::epoch`): `Meta` keys under this
/// prefix. Followed, so every node of a shared store re-opens a rotated master key.
pub const META_MASTER_PREFIX: &[u8] = b"master/";
/// Lockouts shared by the nodes of a shared store (`crate::access::lockout`): `Meta` keys under
/// this prefix.
pub const META_LOCKOUT_PREFIX: &[u8] = b"lockout/";

/// Whether other nodes of a shared store must learn of a change to this record: the ones
/// they cache. Key records (every key state, version, grant and policy change goes
/// through the key record), the master key's epoch, runtime identities and lockouts.
pub fn followed(table: Table, key: &[u8]) -> bool {
    match table {
        Table::Keys => true,
        Table::Meta => {
            key.starts_with(META_IDENTITY_PREFIX)
                || key.starts_with(META_LOCKOUT_PREFIX)
                || key.starts_with(META_MASTER_PREFIX)
        }
        _ => false,
    }
}

/// A node of a shared store as [`KeyStore::heartbeat`] reports it: (id, version,
/// milliseconds since it last reported).
pub type Peer = (String, String, u64);

/// One `(key, value)` pair as read from a table.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Engine choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// redb (default).
    Redb,
    /// sled (cargo feature `sled`).
    Sled,
    /// PostgreSQL, shared by several nodes (`[store] url`).
    Postgres,
}

/// Opens (creating if needed) the store at `path` with `engine`.
pub fn open(engine: Engine, path: &Path) -> Result<Arc<dyn KeyStore>, StoreError> {
    match engine {
        Engine::Redb => Ok(Arc::new(RedbStore::open(path)?)),
        #[cfg(feature = "sled")]
        Engine::Sled => Ok(Arc::new(SledStore::open(path)?)),
        #[cfg(not(feature = "sled"))]
        Engine::Sled => Err(StoreError::Engine {
            engine: "sled",
            source: "this build has no sled engine: rebuild with `--features sled`".into(),
        }),
        Engine::Postgres => Err(StoreError::Engine {
            engine: "postgres",
            source: "a PostgreSQL store is opened from its settings: see open_with".into(),
        }),
    }
}

/// Opens the store `engine` names: a file at `path`, or the database of `postgres`.
pub fn open_with(
    engine: Engine,
    path: &Path,
    postgres: Option<&PgSettings>,
) -> Result<Arc<dyn KeyStore>, StoreError> {
    match (engine, postgres) {
        (Engine::Postgres, Some(pg)) => Ok(Arc::new(PgStore::open(pg)?)),
        _ => open(engine, path),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The contract every engine must meet.
    pub(crate) fn contract(store: &dyn KeyStore) {
        assert_eq!(store.get(Table::Keys, b"a").unwrap(), None);
        let mut b = WriteBatch::new();
        b.require(Table::Keys, b"a", None)
            .put(Table::Keys, b"a", b"1")
            .put(Table::KeyNames, b"t\0a", b"a");
        store.commit(&b).unwrap();
        assert_eq!(store.get(Table::Keys, b"a").unwrap(), Some(b"1".to_vec()));
        // The same batch again fails its condition and writes nothing.
        let mut b2 = WriteBatch::new();
        b2.require(Table::Keys, b"a", None)
            .put(Table::Versions, b"x", b"y");
        assert!(matches!(store.commit(&b2), Err(StoreError::Conflict(_))));
        assert_eq!(store.get(Table::Versions, b"x").unwrap(), None);
        // Compare-and-swap.
        let mut b3 = WriteBatch::new();
        b3.require(Table::Keys, b"a", Some(b"1"))
            .put(Table::Keys, b"a", b"2");
        store.commit(&b3).unwrap();
        let mut stale = WriteBatch::new();
        stale
            .require(Table::Keys, b"a", Some(b"1"))
            .put(Table::Keys, b"a", b"3");
        assert!(store.commit(&stale).is_err());
        assert_eq!(store.get(Table::Keys, b"a").unwrap(), Some(b"2".to_vec()));
        // Prefix scans are ordered and bounded.
        let mut b4 = WriteBatch::new();
        for k in [b"p\x02".as_slice(), b"p\x01", b"q\x00", b"o\xff"] {
            b4.put(Table::Versions, k, k);
        }
        store.commit(&b4).unwrap();
        let got: Vec<_> = store
            .scan_prefix(Table::Versions, b"p")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, vec![b"p\x01".to_vec(), b"p\x02".to_vec()]);
        // Deletes.
        let mut b5 = WriteBatch::new();
        b5.delete(Table::Versions, b"p\x01");
        store.commit(&b5).unwrap();
        assert_eq!(store.scan_prefix(Table::Versions, b"p").unwrap().len(), 1);
        // Ranged scans.
        let got: Vec<_> = store
            .scan_from(Table::Versions, b"p", 2)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, vec![b"p\x02".to_vec(), b"q\x00".to_vec()]);
        // A snapshot's scans read what the single scans read.
        let snap = store
            .scan_snapshot(&[(Table::Versions, b"p"), (Table::Keys, b"")])
            .unwrap();
        assert_eq!(snap[0], store.scan_prefix(Table::Versions, b"p").unwrap());
        assert_eq!(snap[1], store.scan_prefix(Table::Keys, b"").unwrap());
        let floor = store.get_floor(Table::Versions, b"p\x03").unwrap().unwrap();
        assert_eq!(floor.0, b"p\x02".to_vec());
        assert!(store.get_floor(Table::Versions, b"a").unwrap().is_none());
    }
}
