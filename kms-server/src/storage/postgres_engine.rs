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
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use postgres::types::ToSql;
use sha2::{Digest, Sha256};

use super::{Entry, KeyStore, StoreError, Table, WriteBatch};

const ENGINE: &str = "postgres";

/// Above this many distinct keys a batch locks the whole store instead of each key.
const MAX_KEY_LOCKS: usize = 256;

/// The advisory-lock key of the store-wide lock (and of schema migrations).
const STORE_LOCK: i64 = 0x4b65_7968_6f6c_6400; // "Keyhold\0"
const MIGRATION_LOCK: i64 = 0x4b65_7968_6f6c_6401;

/// The schema, one step per version; applied in order at start, in one transaction under
/// an advisory lock (nodes starting together apply each step once).
const MIGRATIONS: &[&str] = &[
    // 1: the tables of the store as rows of one relation, ordered by bytes.
    "CREATE TABLE keyhold_kv (
        tbl smallint NOT NULL,
        k bytea NOT NULL,
        v bytea NOT NULL,
        PRIMARY KEY (tbl, k)
    )",
    // 2: the change feed of key records, in commit order (see `commit_batch`), read by
    // every node to drop what it cached.
    "CREATE TABLE keyhold_changes (
        seq bigint PRIMARY KEY,
        k bytea NOT NULL,
        at timestamptz NOT NULL DEFAULT now()
    )",
    // 3: the nodes of the cluster, as they last reported.
    "CREATE TABLE keyhold_nodes (
        id text PRIMARY KEY,
        version text NOT NULL,
        last_seen timestamptz NOT NULL
    )",
    // 4: the cluster's audit chain (`crate::security::audit::postgres`): the records, one JSON line
    // each, and the MAC'd head in a single row that every append locks.
    "CREATE TABLE keyhold_audit (
        seq bigint PRIMARY KEY,
        rec text NOT NULL
    );
    CREATE TABLE keyhold_audit_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL,
        hash text NOT NULL,
        mac text
    );
    INSERT INTO keyhold_audit_head (id, seq, hash, mac)
        VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', NULL)",
    // 5: the change feed names each change's table: besides key records, nodes follow
    // runtime identities and lockouts (`keystore::followed`). Earlier entries were all
    // key records (table 1).
    "ALTER TABLE keyhold_changes ADD COLUMN tbl smallint NOT NULL DEFAULT 1",
    // 6: erasure keys under epoch keys rooted in the sealing HSM (`crate::storage::erasure::shared`):
    // the epochs (each one's key wrapped by a token key; times in Unix seconds), the head
    // (current epoch; dirty: a destruction awaits a rotation; the cluster's random id,
    // which names its token keys), and the erasure keys.
    "CREATE TABLE keyhold_erasure_epochs (
        epoch bigint PRIMARY KEY,
        wrapped bytea NOT NULL,
        created_at bigint NOT NULL,
        retired_at bigint,
        destroyed_at bigint
    );
    CREATE TABLE keyhold_erasure_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        dirty boolean NOT NULL,
        cluster text NOT NULL
    );
    INSERT INTO keyhold_erasure_head (id, epoch, dirty, cluster) VALUES (1, 0, false, '');
    CREATE TABLE keyhold_erasure (
        slot bigserial PRIMARY KEY,
        epoch bigint NOT NULL,
        sealed bytea NOT NULL
    )",
];

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

type Job = Box<dyn FnOnce(&mut Option<Pooled>, &Connector) + Send>;

/// A pool thread's connection, and what says whether it may have died unnoticed.
struct Pooled {
    client: postgres::Client,
    /// [`Connector::breaks`] when this connection was last known good.
    breaks: u64,
    last_used: std::time::Instant,
}

/// A connection idle longer than this is checked (one round trip) before its next use:
/// a server restart, a failover or an idle timeout on the way may have closed it, and
/// the client library only finds out when it next writes to it.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// How long that check may take before the connection is given up for a new one.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Pooled {
    /// Whether this connection may be used as it is. It is checked first when another
    /// connection of the pool broke (or could not be opened) since it was last known good
    /// (what one broke, say a database restart or outage, usually broke all), or when it
    /// sat idle for [`IDLE_CHECK`]. Otherwise, under load, no request pays a round trip.
    fn usable(&mut self, breaks: u64) -> bool {
        if self.client.is_closed() {
            return false;
        }
        // Reads, without waiting and without a round trip, what the server sent while
        // the connection sat in the pool: a server that ended the session (a restart, a
        // failover, `pg_terminate_backend`) said so before closing, and the connection is
        // found dead here rather than by a request's first statement.
        {
            use postgres::fallible_iterator::FallibleIterator as _;
            if self.client.notifications().iter().next().is_err() || self.client.is_closed() {
                return false;
            }
        }
        if self.breaks == breaks && self.last_used.elapsed() < IDLE_CHECK {
            return true;
        }
        let ok = self.client.is_valid(CHECK_TIMEOUT).is_ok();
        if ok {
            self.breaks = breaks;
        }
        ok
    }
}

/// Opens connections.
struct Connector {
    settings: PgSettings,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// How many times a connection of this pool broke or could not be opened.
    breaks: std::sync::atomic::AtomicU64,
}

impl Connector {
    fn breaks(&self) -> u64 {
        self.breaks.load(std::sync::atomic::Ordering::Acquire)
    }

    fn broke(&self) {
        self.breaks
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Opens a connection for a pool thread.
    fn open_pooled(&self) -> Result<Pooled, StoreError> {
        // Read first: a break counted while this one opens makes it suspect, not trusted.
        let breaks = self.breaks();
        match self.connect() {
            Ok(client) => Ok(Pooled {
                client,
                breaks,
                last_used: std::time::Instant::now(),
            }),
            Err(e) => {
                self.broke();
                Err(e)
            }
        }
    }
}

impl Connector {
    fn connect(&self) -> Result<postgres::Client, StoreError> {
        let mut config: postgres::Config = self.settings.url.parse().map_err(engine_err)?;
        if let Some(p) = &self.settings.password_file {
            let pw =
                zeroize::Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                    msg_err(format!("reading the password file {}: {e}", p.display()))
                })?);
            config.password(pw.trim_end_matches(['\n', '\r']));
        }
        config.application_name("keyhold");
        match &self.tls {
            Some(tls) => config.connect(tls.clone()).map_err(engine_err),
            None => config.connect(postgres::NoTls).map_err(engine_err),
        }
    }
}

/// A handle to the connection pool of a [`PgStore`], for the code that keeps tables of
/// its own beside the store's (the cluster's audit chain, the erasure keys).
#[derive(Clone)]
pub struct PgPool {
    inner: Arc<PoolThreads>,
}

/// The pool's connection threads and the channel that feeds them. Dropped with the last
/// [`PgPool`]: the channel closes and every thread is joined, so none outlives the pool.
/// Jobs run code beside the SQL (the erasure keys' PKCS#11 calls): a thread still
/// exiting while the process finalizes the token or exits would race the module's own
/// teardown (SoftHSM's exit-time destructors crashed with "double free" that way).
/// Every job has a caller waiting for its answer, so once the last handle is gone the
/// threads are idle and the joins return at once.
struct PoolThreads {
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for PoolThreads {
    fn drop(&mut self) {
        self.jobs = None;
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A job that held the last handle would be dropped on a pool thread; that
            // thread cannot join itself, and exits on its own once the job returns.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// Tells the listener thread to stop (it checks every [`LISTEN_POLL`]) when its store is
/// dropped, closing its connection.
struct StopListener(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopListener {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often the listener thread checks for a stop between notifications.
const LISTEN_POLL: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgPool")
    }
}

/// A PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    threads: usize,
    /// Notifications counted by the listener thread, and the condition it signals.
    notified: Arc<(Mutex<u64>, std::sync::Condvar)>,
    _listener: Option<StopListener>,
}

/// LISTENs on the change channel on a connection of its own and counts notifications,
/// reconnecting after a failure; the change feed itself stays the truth (a notification
/// only says "read it now").
fn listen(
    connector: Arc<Connector>,
    notified: Arc<(Mutex<u64>, std::sync::Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    while !stopped() {
        let mut client = match connector.connect() {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
        };
        if client
            .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
            .is_err()
        {
            std::thread::sleep(std::time::Duration::from_millis(500));
            continue;
        }
        while !stopped() {
            let got = {
                use postgres::fallible_iterator::FallibleIterator as _;
                let mut n = client.notifications();
                let mut it = n.timeout_iter(LISTEN_POLL);
                it.next()
            };
            match got {
                Ok(Some(_)) => {
                    let (count, cv) = &*notified;
                    *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                    cv.notify_all();
                }
                // Idle: go on unless the connection died (the feed poll covers a gap).
                Ok(None) if !client.is_closed() => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("threads", &self.threads)
            .finish()
    }
}

fn is_loopback(config: &postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        postgres::config::Host::Unix(_) => true,
    })
}

fn rustls_connector(
    ca: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::base::pem::load_certs(ca).map_err(|e| msg_err(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| msg_err(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(engine_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgStore {
    /// Connects, checks the server's durability settings and applies the schema.
    pub fn open(settings: &PgSettings) -> Result<Self, StoreError> {
        let parsed: postgres::Config = settings.url.parse().map_err(engine_err)?;
        if parsed.get_password().is_some() {
            return Err(msg_err(
                "the store url must not hold the password: use [store] password_file",
            ));
        }
        let tls = match &settings.tls_ca {
            Some(ca) => Some(rustls_connector(ca)?),
            None if is_loopback(&parsed) => None,
            None => {
                return Err(msg_err(
                    "a database that is not on loopback needs TLS: set [store] tls_ca",
                ))
            }
        };
        let connector = Arc::new(Connector {
            settings: settings.clone(),
            tls,
            breaks: std::sync::atomic::AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = settings.pool_size.max(1);
        // Made before the threads, so a failed spawn below still closes and joins the
        // ones already started.
        let mut pool = PoolThreads {
            jobs: Some(tx),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let rx = rx.clone();
            let connector = connector.clone();
            let mut conn: Option<Pooled> = None;
            let thread = std::thread::Builder::new()
                .name(format!("keyhold-pg-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job(&mut conn, &connector);
                })
                .map_err(engine_err)?;
            pool.threads.push(thread);
        }
        let notified = Arc::new((Mutex::new(0u64), std::sync::Condvar::new()));
        let listener = if settings.listen {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (connector, notified, flag) = (connector.clone(), notified.clone(), stop.clone());
            std::thread::Builder::new()
                .name("keyhold-pg-listen".into())
                .spawn(move || listen(connector, notified, flag))
                .map_err(engine_err)?;
            Some(StopListener(stop))
        } else {
            None
        };
        let store = Self {
            pool: PgPool {
                inner: Arc::new(pool),
            },
            threads,
            notified,
            _listener: listener,
        };
        // On a pool thread: the caller may be inside tokio, where the driver's own
        // runtime must not run.
        store.call(|c| {
            migrate(c)?;
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

impl PgPool {
    /// Runs `f` on a pooled connection (opened if needed) and waits for its answer. A
    /// connection that broke is dropped, so the next call opens a new one.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn, connector| {
            if conn.as_mut().is_some_and(|c| !c.usable(connector.breaks())) {
                *conn = None;
                connector.broke();
            }
            let result = match conn {
                Some(c) => f(&mut c.client),
                None => match connector.open_pooled() {
                    Ok(c) => f(&mut conn.insert(c).client),
                    Err(e) => Err(e),
                },
            };
            match conn {
                Some(c) if c.client.is_closed() => {
                    *conn = None;
                    connector.broke();
                }
                Some(c) => c.last_used = std::time::Instant::now(),
                None => {}
            }
            let _ = reply.send(result);
        });
        self.inner
            .jobs
            .as_ref()
            .ok_or_else(|| msg_err("the connection pool has stopped"))?
            .send(job)
            .map_err(|_| msg_err("the connection pool has stopped"))?;
        answer
            .recv()
            .map_err(|_| msg_err("a connection thread stopped"))?
    }
}

fn migrate(c: &mut postgres::Client) -> Result<(), StoreError> {
    let mut tx = c.transaction().map_err(engine_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(engine_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS keyhold_schema (version integer NOT NULL)")
        .map_err(engine_err)?;
    let current: i32 = match tx
        .query_opt("SELECT version FROM keyhold_schema", &[])
        .map_err(engine_err)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO keyhold_schema (version) VALUES (0)", &[])
                .map_err(engine_err)?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(msg_err(format!(
            "the database schema is version {current}, newer than this kms-server knows ({known}): upgrade kms-server"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(step).map_err(engine_err)?;
        tx.execute("UPDATE keyhold_schema SET version = $1", &[&(i as i32 + 1)])
            .map_err(engine_err)?;
        tracing::info!(version = i + 1, "PostgreSQL store schema migrated");
    }
    tx.commit().map_err(engine_err)
}

impl KeyStore for PgStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    fn postgres(&self) -> Option<PgPool> {
        Some(self.pool.clone())
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

    fn wait_for_change(&self, timeout: std::time::Duration) {
        let (count, cv) = &*self.notified;
        let guard = count.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = *guard;
        let _ = cv
            .wait_timeout_while(guard, timeout, |c| *c == seen)
            .unwrap_or_else(PoisonError::into_inner);
    }

    fn heartbeat(&self, id: &str, version: &str) -> Result<Option<Vec<super::Peer>>, StoreError> {
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
            Ok(Some(
                rows.into_iter()
                    .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2).max(0) as u64))
                    .collect(),
            ))
        })
    }

    fn change_cursor(&self) -> Result<Option<u64>, StoreError> {
        self.call(|c| {
            let seq: i64 = c
                .query_one("SELECT coalesce(max(seq), 0) FROM keyhold_changes", &[])
                .map_err(engine_err)?
                .get(0);
            Ok(Some(seq as u64))
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
        for i in 0..2 * THREADS {
            let got = store.call(|c| {
                Ok(c.query_one("SELECT 1", &[])
                    .map_err(engine_err)?
                    .get::<_, i32>(0))
            });
            assert_eq!(got.ok(), Some(1), "call {i} after the connections were cut");
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
