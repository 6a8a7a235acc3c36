//! The PostgreSQL engine: the store's tables as rows of one
//! relation in a database several nodes can share, with the same contract as the embedded
//! engines: reads see committed data; a batch applies atomically after its conditions,
//! and `commit` returns once PostgreSQL reports the transaction committed (durable under
//! `synchronous_commit = on`, the default, which Keyhold checks at start).
//!
//! **Concurrency.** Every commit takes PostgreSQL transaction-scoped advisory locks on
//! the keys it conditions on or writes, in a fixed order (no deadlocks), before it checks
//! its conditions; so two nodes updating one record serialize, and the second sees the
//! first's write and fails its compare-and-swap with `Conflict`, exactly as with one
//! embedded writer. A batch of more than `MAX_KEY_LOCKS` keys (a restore, a migration)
//! takes one store-wide lock instead; every other commit takes that lock shared.
//!
//! **Threads.** The driver is the synchronous `postgres` crate (tokio-postgres underneath,
//! with its own runtime), run on a small pool of dedicated threads, each owning one
//! connection: the keyring's calls come from async workers, blocking threads and the audit
//! writer alike, and a driver runtime must not be entered from inside tokio's. A call
//! hands its query to the pool and waits for the answer. A broken connection is dropped
//! and reopened by the next call; the call that met it fails (`StoreError::Engine`: the
//! request fails closed with 503).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use postgres::types::ToSql;
use sha2::{Digest, Sha256};

use super::{Cluster, Entry, KeyStore, StoreError, Table, WriteBatch};

mod pool;
mod schema;

pub use pool::PgPool;
use pool::StopListener;

const ENGINE: &str = "postgres";

/// Above this many distinct keys a batch locks the whole store instead of each key.
const MAX_KEY_LOCKS: usize = 256;

/// The advisory-lock key of the store-wide lock (and of schema migrations).
const STORE_LOCK: i64 = 0x4b65_7968_6f6c_6400; // "Keyhold\0"
const MIGRATION_LOCK: i64 = 0x4b65_7968_6f6c_6401;

/// The advisory lock that orders the change feed: taken by every commit that changes a
/// key record and held until it commits, so feed positions follow commit order and a
/// reader never skips a position that commits later.
const CHANGES_LOCK: i64 = 0x4b65_7968_6f6c_6402;
/// The channel nodes LISTEN on.
const CHANGES_CHANNEL: &str = "keyhold_changes";
/// How long the change feed keeps a change (a node that was away longer drops its whole
/// cache when it comes back).
const CHANGES_KEPT_SECS: i64 = 3600;

/// How to reach the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// libpq-style connection string or URL, without the password
    /// (`host=db.example port=5432 user=keyhold dbname=keyhold`).
    pub url: String,
    /// A file holding the password (read at every connect; absent: no password).
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) that the server certificate must chain to: the connection uses TLS
    /// and verifies the server's name. `None`: no TLS, allowed only to a loopback host
    /// or a Unix socket.
    pub tls_ca: Option<PathBuf>,
    /// Connections (and threads) in the pool.
    pub pool_size: usize,
    /// LISTEN for change notifications (off behind a transaction-pooling proxy, where
    /// LISTEN does not work: the node then reads the change feed on its poll alone).
    pub listen: bool,
}

fn engine_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Engine {
        engine: ENGINE,
        source: Box::new(e),
    }
}

/// A PostgreSQL failure (or any failure on a PostgreSQL path) as a store error, by its
/// message: for the code that keeps tables of its own beside the store's (the cluster's
/// audit chain, the erasure keys).
pub(crate) fn pg_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine {
        engine: ENGINE,
        source: e.to_string().into(),
    }
}

fn msg_err(m: impl Into<String>) -> StoreError {
    let m: String = m.into();
    StoreError::Engine {
        engine: ENGINE,
        source: m.into(),
    }
}

fn table_id(t: Table) -> i16 {
    i16::from(t.id())
}

/// The advisory-lock key of one record: the first 8 bytes of SHA-256(table ‖ key), the
/// same on every node and every build.
fn lock_key(t: Table, key: &[u8]) -> i64 {
    let d = Sha256::new()
        .chain_update(table_id(t).to_be_bytes())
        .chain_update(key)
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// The smallest byte string greater than every string starting with `prefix`; `None`
/// when there is none (empty prefix, or all 0xff).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

/// A PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    threads: usize,
    /// Notifications counted by the listener thread, and the condition it signals.
    notified: Arc<(Mutex<u64>, std::sync::Condvar)>,
    _listener: Option<StopListener>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("threads", &self.threads)
            .finish()
    }
}

impl PgStore {
    /// Connects, checks the server's durability settings and applies the schema.
    pub fn open(settings: &PgSettings) -> Result<Self, StoreError> {
        let started = pool::start(settings)?;
        let store = Self {
            pool: started.pool,
            threads: started.threads,
            notified: started.notified,
            _listener: started.listener,
        };
        // On a pool thread: the caller may be inside tokio, where the driver's own
        // runtime must not run.
        store.call(|c| {
            schema::migrate(c)?;
            let sync: String = c
                .query_one("SHOW synchronous_commit", &[])
                .map_err(engine_err)?
                .get(0);
            if sync != "on" && sync != "remote_write" && sync != "remote_apply" {
                return Err(msg_err(format!(
                    "synchronous_commit is `{sync}`: a commit could be acknowledged and then lost; set it to `on`"
                )));
            }
            Ok(())
        })?;
        Ok(store)
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.pool.call(f)
    }
}

impl KeyStore for PgStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.call(move |c| {
            Ok(c.query_opt(
                "SELECT v FROM keyhold_kv WHERE tbl = $1 AND k = $2",
                &[&table_id(table), &key],
            )
            .map_err(engine_err)?
            .map(|row| row.get(0)))
        })
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let start = prefix.to_vec();
        let end = successor(prefix);
        self.call(move |c| {
            let rows = match &end {
                Some(end) => c.query(
                    "SELECT k, v FROM keyhold_kv WHERE tbl = $1 AND k >= $2 AND k < $3 ORDER BY k",
                    &[&table_id(table), &start, end],
                ),
                None => c.query(
                    "SELECT k, v FROM keyhold_kv WHERE tbl = $1 AND k >= $2 ORDER BY k",
                    &[&table_id(table), &start],
                ),
            }
            .map_err(engine_err)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn scan_snapshot(&self, scans: &[(Table, &[u8])]) -> Result<Vec<Vec<Entry>>, StoreError> {
        let scans: Vec<(i16, Vec<u8>, Option<Vec<u8>>)> = scans
            .iter()
            .map(|(t, p)| (table_id(*t), p.to_vec(), successor(p)))
            .collect();
        self.call(move |c| {
            // One REPEATABLE READ transaction: every query reads the snapshot its first
            // query took, whatever other nodes commit meanwhile.
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(engine_err)?;
            let mut all = Vec::with_capacity(scans.len());
            for (table, start, end) in &scans {
                let rows = match end {
                    Some(end) => tx.query(
                        "SELECT k, v FROM keyhold_kv WHERE tbl = $1 AND k >= $2 AND k < $3 ORDER BY k",
                        &[table, start, end],
                    ),
                    None => tx.query(
                        "SELECT k, v FROM keyhold_kv WHERE tbl = $1 AND k >= $2 ORDER BY k",
                        &[table, start],
                    ),
                }
                .map_err(engine_err)?;
                all.push(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect());
            }
            tx.commit().map_err(engine_err)?;
            Ok(all)
        })
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let start = start.to_vec();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT k, v FROM keyhold_kv WHERE tbl = $1 AND k >= $2 ORDER BY k LIMIT $3",
                    &[&table_id(table), &start, &limit],
                )
                .map_err(engine_err)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn get_floor(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let key = key.to_vec();
        self.call(move |c| {
            Ok(c.query_opt(
                "SELECT k, v FROM keyhold_kv WHERE tbl = $1 AND k <= $2 ORDER BY k DESC LIMIT 1",
                &[&table_id(table), &key],
            )
            .map_err(engine_err)?
            .map(|r| (r.get(0), r.get(1))))
        })
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if batch.conditions.is_empty() && batch.writes.is_empty() {
            return Ok(());
        }
        let batch = batch.clone();
        self.call(move |c| commit_batch(c, &batch))
    }
}

impl Cluster for PgStore {
    fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    fn wait_for_change(&self, timeout: std::time::Duration) {
        let (count, cv) = &*self.notified;
        let guard = count.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = *guard;
        let _ = cv
            .wait_timeout_while(guard, timeout, |c| *c == seen)
            .unwrap_or_else(PoisonError::into_inner);
    }

    fn heartbeat(&self, id: &str, version: &str) -> Result<Vec<super::Peer>, StoreError> {
        let (id, version) = (id.to_owned(), version.to_owned());
        self.call(move |c| {
            c.execute(
                "INSERT INTO keyhold_nodes (id, version, last_seen) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, last_seen = now()",
                &[&id, &version],
            )
            .map_err(engine_err)?;
            let rows = c
                .query(
                    "SELECT id, version, (extract(epoch FROM now() - last_seen) * 1000)::bigint
                     FROM keyhold_nodes WHERE last_seen > now() - interval '10 seconds' ORDER BY id",
                    &[],
                )
                .map_err(engine_err)?;
            let _ = c.execute(
                "DELETE FROM keyhold_nodes WHERE last_seen < now() - interval '1 day'",
                &[],
            );
            Ok(rows
                .into_iter()
                .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2).max(0) as u64))
                .collect())
        })
    }

    fn change_cursor(&self) -> Result<u64, StoreError> {
        self.call(|c| {
            let seq: i64 = c
                .query_one("SELECT coalesce(max(seq), 0) FROM keyhold_changes", &[])
                .map_err(engine_err)?
                .get(0);
            Ok(seq as u64)
        })
    }

    fn changes_since(&self, cursor: u64) -> Result<super::Changes, StoreError> {
        let after = i64::try_from(cursor).unwrap_or(i64::MAX);
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT seq, tbl, k FROM keyhold_changes WHERE seq > $1 ORDER BY seq LIMIT 10000",
                    &[&after],
                )
                .map_err(engine_err)?;
            let oldest: Option<i64> = c
                .query_one("SELECT min(seq) FROM keyhold_changes", &[])
                .map_err(engine_err)?
                .get(0);
            let next = rows.last().map_or(after, |r| r.get::<_, i64>(0));
            // Changes pruned past this node's position: it cannot know what it missed.
            if oldest.is_some_and(|o| o > after + 1) {
                let newest: i64 = c
                    .query_one("SELECT coalesce(max(seq), 0) FROM keyhold_changes", &[])
                    .map_err(engine_err)?
                    .get(0);
                return Ok((newest as u64, None));
            }
            let keys = rows
                .into_iter()
                .filter_map(|r| {
                    let table = Table::from_id(u8::try_from(r.get::<_, i16>(1)).ok()?)?;
                    Some((table, r.get(2)))
                })
                .collect();
            if next / 256 != after / 256 {
                // Now and then (every 256 changes) the feed forgets what is over an hour old.
                let _ = c.execute(
                    "DELETE FROM keyhold_changes WHERE at < now() - make_interval(secs => $1::double precision) AND seq < $2",
                    &[&(CHANGES_KEPT_SECS as f64), &next],
                );
            }
            Ok((next as u64, Some(keys)))
        })
    }
}

fn commit_batch(c: &mut postgres::Client, batch: &WriteBatch) -> Result<(), StoreError> {
    // The last write of each key wins, as when the writes are applied in order.
    let mut last: std::collections::BTreeMap<(i16, &[u8]), Option<&[u8]>> = Default::default();
    for (t, k, v) in &batch.writes {
        last.insert((table_id(*t), k.as_slice()), v.as_deref());
    }
    let mut locks: Vec<i64> = batch
        .conditions
        .iter()
        .map(|cond| lock_key(cond.table, &cond.key))
        .chain(batch.writes.iter().map(|(t, k, _)| lock_key(*t, k)))
        .collect();
    locks.sort_unstable();
    locks.dedup();
    let mut tx = c.transaction().map_err(engine_err)?;
    if locks.len() > MAX_KEY_LOCKS {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&STORE_LOCK])
            .map_err(engine_err)?;
    } else {
        tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&STORE_LOCK])
            .map_err(engine_err)?;
        // In ascending order: two batches always take their common locks in the same
        // order, so they never wait on each other in a cycle.
        tx.execute(
            "SELECT count(pg_advisory_xact_lock(x)) FROM unnest($1::bigint[]) WITH ORDINALITY AS u(x, n)",
            &[&locks],
        )
        .map_err(engine_err)?;
    }
    for cond in &batch.conditions {
        let found: Option<Vec<u8>> = tx
            .query_opt(
                "SELECT v FROM keyhold_kv WHERE tbl = $1 AND k = $2",
                &[&table_id(cond.table), &cond.key],
            )
            .map_err(engine_err)?
            .map(|r| r.get(0));
        if found != cond.expected {
            return Err(StoreError::Conflict(cond.table.name()));
        }
    }
    let (mut del_t, mut del_k): (Vec<i16>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    let (mut put_t, mut put_k, mut put_v): (Vec<i16>, Vec<&[u8]>, Vec<&[u8]>) =
        (Vec::new(), Vec::new(), Vec::new());
    for ((t, k), v) in &last {
        match v {
            None => {
                del_t.push(*t);
                del_k.push(k);
            }
            Some(v) => {
                put_t.push(*t);
                put_k.push(k);
                put_v.push(v);
            }
        }
    }
    if !del_t.is_empty() {
        let params: [&(dyn ToSql + Sync); 2] = [&del_t, &del_k];
        tx.execute(
            "DELETE FROM keyhold_kv AS kv USING unnest($1::smallint[], $2::bytea[]) AS d(t, k)
             WHERE kv.tbl = d.t AND kv.k = d.k",
            &params,
        )
        .map_err(engine_err)?;
    }
    if !put_t.is_empty() {
        let params: [&(dyn ToSql + Sync); 3] = [&put_t, &put_k, &put_v];
        tx.execute(
            "INSERT INTO keyhold_kv (tbl, k, v) SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::bytea[])
             ON CONFLICT (tbl, k) DO UPDATE SET v = EXCLUDED.v",
            &params,
        )
        .map_err(engine_err)?;
    }
    let (changed_t, changed_k): (Vec<i16>, Vec<&[u8]>) = last
        .keys()
        .filter(|(t, k)| {
            u8::try_from(*t)
                .ok()
                .and_then(Table::from_id)
                .is_some_and(|t| super::followed(t, k))
        })
        .map(|(t, k)| (*t, *k))
        .unzip();
    if !changed_k.is_empty() {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGES_LOCK])
            .map_err(engine_err)?;
        let params: [&(dyn ToSql + Sync); 2] = [&changed_t, &changed_k];
        tx.execute(
            "INSERT INTO keyhold_changes (seq, tbl, k)
             SELECT (SELECT coalesce(max(seq), 0) FROM keyhold_changes) + n, t, k
             FROM unnest($1::smallint[], $2::bytea[]) WITH ORDINALITY AS c(t, k, n)",
            &params,
        )
        .map_err(engine_err)?;
        tx.execute(&format!("NOTIFY {CHANGES_CHANNEL}"), &[])
            .map_err(engine_err)?;
    }
    tx.commit().map_err(engine_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successors_and_lock_keys() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
        assert_eq!(lock_key(Table::Keys, b"a"), lock_key(Table::Keys, b"a"));
        assert_ne!(lock_key(Table::Keys, b"a"), lock_key(Table::KeyNames, b"a"));
    }

    /// The engine contract against a real PostgreSQL (`KEYHOLD_TEST_PG`, a connection
    /// string to an empty database; `.ci/run` starts one). Runs wherever it is set.
    #[test]
    fn contract_against_a_real_postgres() {
        let Ok(url) = std::env::var("KEYHOLD_TEST_PG") else {
            eprintln!("KEYHOLD_TEST_PG not set: skipped here (CI sets it)");
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set KEYHOLD_TEST_PG"
            );
            return;
        };
        let settings = PgSettings {
            url,
            password_file: None,
            tls_ca: None,
            pool_size: 2,
            listen: true,
        };
        let store = PgStore::open(&settings).unwrap();
        store
            .call(|c| c.batch_execute("TRUNCATE keyhold_kv").map_err(engine_err))
            .unwrap();
        super::super::tests::contract(&store);
        // A second open (another node) sees the same data and leaves the schema alone.
        let other = Arc::new(PgStore::open(&settings).unwrap());
        assert_eq!(other.get(Table::Keys, b"a").unwrap(), Some(b"2".to_vec()));

        // Two nodes, four writers each, compare-and-swap increments of one counter: every
        // increment that committed is counted once (no lost update), the others conflicted.
        let store = Arc::new(store);
        let mut threads = Vec::new();
        for node in [store.clone() as Arc<dyn KeyStore>, other.clone()] {
            for _ in 0..4 {
                let node = node.clone();
                threads.push(std::thread::spawn(move || {
                    let mut done = 0u32;
                    while done < 25 {
                        let cur = node.get(Table::Usage, b"counter").unwrap();
                        let n = cur
                            .as_deref()
                            .map_or(0, |v| u32::from_be_bytes(v.try_into().unwrap()));
                        let mut b = WriteBatch::new();
                        b.require(Table::Usage, b"counter", cur.as_deref()).put(
                            Table::Usage,
                            b"counter",
                            &(n + 1).to_be_bytes(),
                        );
                        match node.commit(&b) {
                            Ok(()) => done += 1,
                            Err(StoreError::Conflict(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }));
            }
        }
        for t in threads {
            t.join().unwrap();
        }
        let total = store.get(Table::Usage, b"counter").unwrap().unwrap();
        assert_eq!(u32::from_be_bytes(total.try_into().unwrap()), 200);

        // A batch beyond the per-key locks takes the store-wide lock, and writes in order:
        // the last write of a key wins.
        let mut big = WriteBatch::new();
        for i in 0..(MAX_KEY_LOCKS as u32 + 10) {
            big.put(Table::Rotations, &i.to_be_bytes(), b"x");
        }
        big.put(Table::Rotations, &0u32.to_be_bytes(), b"last")
            .delete(Table::Rotations, &1u32.to_be_bytes());
        other.commit(&big).unwrap();
        assert_eq!(
            store.get(Table::Rotations, &0u32.to_be_bytes()).unwrap(),
            Some(b"last".to_vec())
        );
        assert_eq!(
            store.get(Table::Rotations, &1u32.to_be_bytes()).unwrap(),
            None
        );
        assert_eq!(
            store.scan_prefix(Table::Rotations, b"").unwrap().len(),
            MAX_KEY_LOCKS + 9
        );
    }

    /// The database cut every connection (a restart, a failover, an administrator's
    /// `pg_terminate_backend`): each pooled connection is dead, and the client library
    /// only finds out when it next uses it. The next calls still succeed: no request
    /// pays for a connection that died while idle (after an outage, one did: the first
    /// audit append after `/readyz` said ready answered 503).
    #[test]
    fn calls_after_the_server_closed_every_pooled_connection_succeed() {
        let Ok(url) = std::env::var("KEYHOLD_TEST_PG") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set KEYHOLD_TEST_PG"
            );
            return;
        };
        const THREADS: usize = 3;
        let store = Arc::new(
            PgStore::open(&PgSettings {
                url: url.clone(),
                password_file: None,
                tls_ca: None,
                pool_size: THREADS,
                listen: false,
            })
            .unwrap(),
        );
        // One call per pool thread, at the same time (each holds its thread for a
        // moment), so every thread opens its connection; their backend pids.
        let barrier = Arc::new(std::sync::Barrier::new(THREADS));
        let pids: std::collections::BTreeSet<i32> = (0..THREADS)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store
                        .call(|c| {
                            let row = c
                                .query_one("SELECT pg_backend_pid(), pg_sleep(0.3)::text", &[])
                                .map_err(engine_err)?;
                            Ok(row.get::<_, i32>(0))
                        })
                        .unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(
            pids.len(),
            THREADS,
            "each pool thread holds its own connection"
        );
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let pids: Vec<i32> = pids.into_iter().collect();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
                &[&pids],
            )
            .unwrap();
        while admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A backend leaves pg_stat_activity before its process exits and its socket
        // closes: until then a call can still reach it and be cut mid-flight (which no
        // pool can hide). The server runs on this machine: wait for the processes too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for i in 0..2 * THREADS {
            let got = store.call(|c| {
                Ok(c.query_one("SELECT 1", &[])
                    .map_err(engine_err)?
                    .get::<_, i32>(0))
            });
            assert_eq!(
                got.as_ref().ok(),
                Some(&1),
                "call {i} after the connections were cut: {:?}",
                got.as_ref().err()
            );
        }
    }

    #[test]
    fn refuses_a_password_in_the_url_and_plaintext_to_a_remote_host() {
        for (url, needle) in [
            (
                "host=db.example user=k password=hunter2 dbname=k",
                "password_file",
            ),
            ("host=db.example user=k dbname=k", "tls_ca"),
        ] {
            let e = PgStore::open(&PgSettings {
                url: url.into(),
                password_file: None,
                tls_ca: None,
                pool_size: 1,
                listen: false,
            })
            .unwrap_err();
            let text = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(text.contains(needle), "{text}");
            assert!(!text.contains("hunter2"));
        }
    }
}
