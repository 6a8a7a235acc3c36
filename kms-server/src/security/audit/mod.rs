//! The audit trail: one record per API request, allowed or denied, durable before the
//! response leaves (fail closed), hash-chained, with a MAC'd chain head.
//!
//! Records go to a single writer thread that appends every record waiting at that moment
//! to the chain file ([`file`]) with one `fdatasync` (**group commit**: one sync covers a
//! batch, however many requests are in flight), then rewrites the chain head in the file's
//! header. A request's response is released only after its record's batch is durable —
//! and, if a JSON-lines sink is configured, after the batch was written there too. If
//! either fails, the request fails with `503 StorageUnavailable` and its response (a DEK,
//! say) never leaves.
//!
//! **Durability** ([`CommitPolicy`], `[audit] durability`): per request (the default),
//! the batch is flushed before any of its answers, so an acknowledged record survives a
//! crash and a power loss. In bounded-lag mode a batch of key uses only is written with
//! `pwrite` (into the page cache, which a killed process cannot lose) and answered; the
//! writer flushes within the lag (its receive waits until then), and any batch holding a
//! key change, an event or a summary is flushed before its answers, which also flushes
//! every earlier batch (one file, `fdatasync`). So a power loss can lose only key-use
//! records answered within the last lag; a failed flush poisons the file (the kernel may
//! have dropped the pages) and every later request fails closed. The argument rests on
//! three facts: the answer is released only after `pwrite` returned (or the flush), the
//! file is one append-only sequence so a later flush covers every earlier write, and the
//! head in the header is only a hint that opening re-derives from the records.
//!
//! **Commit window**: the writer takes everything queued as one batch; when more callers
//! waited at once lately than the batch holds, it sleeps up to `commit_window_us` (in
//! quarter slices, so senders never wake it record by record) for them, as PostgreSQL's
//! `commit_delay` with `commit_siblings`. A caller who is alone is never delayed.
//!
//! Chain: record `n` carries `prev` = hash of record `n−1` and `hash` = SHA-256 of its own
//! JSON with `hash` empty (`kms_client::api::AuditRecord::compute_hash`, shared with the
//! verifiers). The head `{seq, hash}` is stored with an HMAC under a key derived from the
//! master key, so a cut-off tail or a rewritten head is detected by anyone who can ask the
//! unsealed server (`GET /v1/audit` reports `mac_valid`). What the server finds wrong
//! with the file when it opens it (a head it cannot vouch for, records cut below the head,
//! records after the head from an unclean stop) is appended to the chain as an event and
//! raised as an `audit_chain` alert.
//!
//! Stores written by earlier versions kept the records in the key store; they are moved
//! to the chain file, verified by the same chain, the first time the server opens them.

pub mod export;
pub mod file;
pub mod postgres;
pub mod retention;
pub mod volume;
mod writer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use kms_client::api::{AuditHead, AuditPage, AuditRecord};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use tokio::sync::oneshot;

use crate::base::error::Error;
use crate::keyring::Keyring;
use crate::security::alert::{AlertEvent, Alerter};
use crate::storage::{KeyStore, Table, WriteBatch};
pub use file::{ChainFile, Checkpoint, Finding, Head};
pub use postgres::PgChain;
use writer::Writer;

/// Where the chain lives.
#[derive(Clone)]
enum Chain {
    /// This node's chain file (embedded store).
    File(Arc<ChainFile>),
    /// The cluster's chain in the shared PostgreSQL store.
    Shared(PgChain),
}

/// The writer thread's nice value (lower priority than the request workers).
const WRITER_NICE: i32 = 10;
/// Most records committed in one batch.
const MAX_BATCH: usize = 1024;
/// Most records returned by one read.
pub const MAX_PAGE: usize = 1000;

/// What a request contributes to its record (the writer adds seq, time, chain).
#[derive(Debug, Clone, Default)]
pub struct AuditDraft {
    /// Request id.
    pub request_id: u64,
    /// Identity.
    pub identity: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// `METHOD /route`.
    pub operation: String,
    /// Key name.
    pub key: Option<String>,
    /// Key version.
    pub version: Option<u32>,
    /// Keyed context hash.
    pub context_hash: Option<String>,
    /// `ok` or the error code.
    pub outcome: String,
    /// HTTP status.
    pub status: u16,
    /// Microseconds.
    pub latency_us: u64,
    /// What a protocol adapter adds ([`AuditRecord::attributes`]).
    pub attributes: Option<std::collections::BTreeMap<String, String>>,
    /// A use of a key that changes nothing (wrap, unwrap, a protocol's encrypt or
    /// decrypt): in bounded-lag mode its record may be answered before it is flushed.
    /// Everything else (key changes, administration) is flushed first in every mode.
    pub key_use: bool,
}

/// When a batch reaches the disk, relative to its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed (`fdatasync`, or a synchronous commit) before any answer leaves: the
    /// default. Nothing acknowledged is lost to a crash or a power loss.
    PerRequest,
    /// Key uses are written before their answers (a killed process loses nothing) and
    /// flushed within this lag (a power loss loses at most this window of key-use
    /// records). Key changes are flushed before their answers.
    BoundedLag(std::time::Duration),
}

/// How the writer forms and flushes batches (`[audit] commit_window_us`, `durability`,
/// `max_lag_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPolicy {
    /// The longest a batch waits for callers expected to join it (0: never).
    pub window: std::time::Duration,
    /// When batches are flushed.
    pub durability: Durability,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        Self {
            window: DEFAULT_COMMIT_WINDOW,
            durability: Durability::PerRequest,
        }
    }
}

/// How the writer runs: its [`CommitPolicy`], and the counters it keeps
/// (`keyhold_audit_*` on the ops listener).
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// The commit window and the durability mode.
    pub policy: CommitPolicy,
    /// Batches, records and flushes.
    pub counters: crate::base::metrics::AuditCounters,
}

/// The default commit window: about one flush on a fast disk.
pub const DEFAULT_COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_micros(200);

fn head_mac_input(seq: u64, hash: &str) -> Vec<u8> {
    let mut v = b"keyhold-audit-head/v1".to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(hash.as_bytes());
    v
}

/// Where records are also written as JSON lines, for a SIEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// No copy.
    None,
    /// Standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

type Job = (AuditDraft, oneshot::Sender<Result<(), ()>>);

// Nearly every message is a `Job`: boxing it would add an allocation per request to
// save space only in the rare `Tick` and `Close`.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Job(Job),
    /// Rewrite the header if the current head is newer (sent every [`file::HEADER_EVERY`]).
    Tick,
    /// Finish what is queued, then stop.
    Close,
}

/// Handle to the audit writer.
#[derive(Clone)]
pub struct AuditLog {
    /// `None`: auditing turned off (`[audit] enabled = false`, for measurements only).
    /// The header ticker holds only a weak reference: the writer stops when every handle
    /// is gone.
    tx: Option<Arc<mpsc::Sender<Msg>>>,
    /// Callers waiting in [`AuditLog::append`] now (the writer's commit window reads it).
    waiting: Arc<AtomicUsize>,
    chain: Option<Chain>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// A record's time: the server's clock (the system's, outside tests), RFC 3339 in
/// milliseconds.
fn rfc3339_ms(clock: &crate::base::clock::Clock) -> String {
    let at = UNIX_EPOCH + std::time::Duration::from_millis(clock.now_millis());
    humantime::format_rfc3339_millis(at).to_string()
}

/// Where earlier versions kept the head, in the key store's meta table.
const LEGACY_META_HEAD: &[u8] = b"audit-head";

/// Moves a chain kept in the key store (earlier versions) into the empty chain file, then
/// deletes it from the store. Returns the number of records moved.
fn migrate_from_store(store: &dyn KeyStore, chain: &ChainFile) -> Result<u64, Error> {
    let Some(bytes) = store.get(Table::Meta, LEGACY_META_HEAD)? else {
        return Ok(0);
    };
    let head: Head = serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("audit head"))?;
    let mut batch = WriteBatch::new();
    let mut moved = 0;
    let mut from = Vec::new();
    loop {
        let values = store.scan_from(Table::Audit, &from, 256)?;
        for (k, v) in &values {
            let first = v
                .split(|b| *b == b'\n')
                .find(|l| !l.is_empty())
                .and_then(|l| serde_json::from_slice::<AuditRecord>(l).ok())
                .ok_or(Error::Corrupt("audit record in the store"))?;
            moved += v.iter().filter(|b| **b == b'\n').count() as u64;
            chain.append(first.seq, v, false)?;
            batch.delete(Table::Audit, k);
        }
        match values.last() {
            Some((k, _)) if values.len() == 256 => {
                from = k.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    chain.set_head(head, true)?;
    chain.sync()?;
    batch.delete(Table::Meta, LEGACY_META_HEAD);
    store.commit(&batch)?;
    tracing::warn!(
        records = moved,
        "audit records moved from the key store to the chain file"
    );
    Ok(moved)
}

pub use kms_client::api::{
    AUDIT_EVENT_AFTER_HEAD as EVENT_AFTER_HEAD, AUDIT_EVENT_HEAD_INVALID as EVENT_HEAD_INVALID,
    AUDIT_EVENT_HEAD_MISMATCH as EVENT_HEAD_MISMATCH,
    AUDIT_EVENT_HEAD_UNVERIFIED as EVENT_HEAD_UNVERIFIED,
};

impl AuditLog {
    /// Opens the chain and starts the writer thread. On a PostgreSQL store that is the
    /// cluster's chain in the database (`node`: this node's id, written into each
    /// record); otherwise the chain file at `path` (moving a chain kept in `store` by an
    /// earlier version into it).
    pub fn start(
        store: Arc<dyn KeyStore>,
        keyring: Arc<Keyring>,
        path: &Path,
        sink: &Sink,
        alerts: Alerter,
        node: Option<String>,
    ) -> Result<Self, Error> {
        Self::start_with(
            store,
            keyring,
            path,
            sink,
            alerts,
            node,
            AuditOptions::default(),
        )
    }

    /// [`AuditLog::start`] with a commit policy and counters.
    pub fn start_with(
        store: Arc<dyn KeyStore>,
        keyring: Arc<Keyring>,
        path: &Path,
        sink: &Sink,
        alerts: Alerter,
        node: Option<String>,
        options: AuditOptions,
    ) -> Result<Self, Error> {
        if let Some(pool) = store.cluster().map(|c| c.pool()) {
            let chain = PgChain::new(pool);
            let (head, finding) = chain.open()?;
            let last = (head.seq, head.hash.clone());
            return Self::spawn(
                Chain::Shared(chain),
                (head, last, finding),
                keyring,
                sink,
                alerts,
                (node, options),
            );
        }
        let opened = ChainFile::open(path)?;
        let opened = if opened.2 .0 == 0 && migrate_from_store(store.as_ref(), &opened.0)? > 0 {
            drop(opened);
            ChainFile::open(path)?
        } else {
            opened
        };
        let (file, header, last, finding) = opened;
        Self::spawn(
            Chain::File(Arc::new(file)),
            (header, last, finding),
            keyring,
            sink,
            alerts,
            (None, options),
        )
    }

    fn spawn(
        chain: Chain,
        (header, last, finding): (Head, (u64, String), Finding),
        keyring: Arc<Keyring>,
        sink: &Sink,
        alerts: Alerter,
        (node, options): (Option<String>, AuditOptions),
    ) -> Result<Self, Error> {
        let sink: Option<Box<dyn Write + Send>> = match sink {
            Sink::None => None,
            Sink::Stdout => Some(Box::new(std::io::stdout())),
            Sink::File(p) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|_| Error::Internal("cannot open the audit sink file"))?,
            )),
        };
        let mut writer = Writer {
            chain: chain.clone(),
            keyring,
            alerts,
            sink,
            last,
            node,
            unchecked_head: Some(header),
            finding: Some(finding),
            header_written: std::time::Instant::now(),
            header_stale: false,
            refusals: volume::Refusals::default(),
            policy: options.policy,
            counters: options.counters,
            waiting: Arc::new(AtomicUsize::new(0)),
            peak: 0,
            unflushed_since: None,
        };
        let waiting = writer.waiting.clone();
        // What opening found (records after a stale head after an unclean stop, a head
        // that does not match) goes into the chain now, before anything reads it: readers
        // then see every record on disk, and the chain says what happened.
        if !matches!(writer.finding, Some(Finding::Consistent) | None) {
            writer.commit(Vec::new(), true)?;
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        let tx = Arc::new(tx);
        let thread = std::thread::Builder::new()
            .name("keyhold-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|_| Error::Internal("cannot start the audit writer"))?;
        // The header ticker: holds only a weak sender, so it stops once every handle is
        // gone or the writer has stopped.
        let ticker = Arc::downgrade(&tx);
        std::thread::Builder::new()
            .name("keyhold-audit-tick".into())
            .spawn(move || {
                while ticker
                    .upgrade()
                    .is_some_and(|tx| tx.send(Msg::Tick).is_ok())
                {
                    std::thread::sleep(file::HEADER_EVERY);
                }
            })
            .map_err(|_| Error::Internal("cannot start the audit ticker"))?;
        Ok(Self {
            tx: Some(tx),
            waiting,
            chain: Some(chain),
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// No audit trail at all. Only for measuring what auditing costs; the server logs a
    /// warning at start when configured so.
    pub fn disabled() -> Self {
        Self {
            tx: None,
            waiting: Arc::new(AtomicUsize::new(0)),
            chain: None,
            thread: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Writes what is queued, stops the writer and waits for it. Later appends fail.
    pub fn close(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Close);
        }
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Appends a record and waits until it is durable (as the commit policy says).
    pub async fn append(&self, draft: AuditDraft) -> Result<(), Error> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let (ack, done) = oneshot::channel();
        let _waiting = Waiting::new(&self.waiting);
        tx.send(Msg::Job((draft, ack)))
            .map_err(|_| Error::Internal("audit writer stopped"))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error::AuditUnavailable),
        }
    }

    /// How many times the chain file has been flushed since it was opened (`None`: no
    /// chain file, i.e. disabled or on PostgreSQL).
    pub fn flushes(&self) -> Option<u64> {
        match &self.chain {
            Some(Chain::File(f)) => Some(f.flushes()),
            _ => None,
        }
    }

    /// Records with `seq > after` (at most `limit`) up to the head, without the head's MAC
    /// check: what an exporter sends ([`export`]).
    pub fn records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, Error> {
        match &self.chain {
            None => Ok(Vec::new()),
            Some(Chain::File(chain)) => {
                let head = chain.head();
                let mut records = chain.read(after, limit.min(MAX_PAGE))?;
                records.retain(|r| r.seq <= head.seq);
                Ok(records)
            }
            Some(Chain::Shared(chain)) => Ok(chain.read(after, limit.min(MAX_PAGE))?.1),
        }
    }

    /// The head's seq now.
    pub fn head_seq(&self) -> Result<u64, Error> {
        match &self.chain {
            None => Ok(0),
            Some(Chain::File(f)) => Ok(f.head().seq),
            Some(Chain::Shared(c)) => Ok(c.read(u64::MAX - 1, 1)?.0.seq),
        }
    }

    /// The retention checkpoint (none while the chain starts at record 1).
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        match &self.chain {
            Some(Chain::File(f)) => Ok(f.checkpoint()),
            _ => Ok(None),
        }
    }

    /// Purges the records up to `checkpoint` ([`retention`]); the bytes released.
    pub fn purge_through(&self, checkpoint: Checkpoint) -> Result<u64, Error> {
        match &self.chain {
            Some(Chain::File(f)) => f.purge_through(checkpoint),
            _ => Err(Error::InvalidState(
                "audit retention is for a chain file; on PostgreSQL, partition and archive the keyhold_audit table with the database's tools",
            )),
        }
    }

    /// Records with `seq > after` (at most `limit`) up to the head, and the head with its
    /// MAC checked.
    pub fn read(&self, keyring: &Keyring, after: u64, limit: usize) -> Result<AuditPage, Error> {
        let Some(chain) = &self.chain else {
            return Err(Error::InvalidState(
                "the audit trail is disabled on this server",
            ));
        };
        let checkpoint = match chain {
            Chain::File(chain) => chain.checkpoint().map(|cp| {
                let mac_valid = cp.mac.as_deref().and_then(|mac| {
                    keyring.audit_mac_verify(
                        &retention::checkpoint_mac_input(cp.seq, &cp.hash, &cp.time),
                        mac,
                    )
                });
                kms_client::api::AuditCheckpoint {
                    seq: cp.seq,
                    hash: cp.hash,
                    time: cp.time,
                    mac_valid,
                }
            }),
            Chain::Shared(_) => None,
        };
        let (head, records) = match chain {
            Chain::File(chain) => {
                // The head first: records past it (a batch being written now) are left
                // for later.
                let head = chain.head();
                let mut records = chain.read(after, limit.min(MAX_PAGE))?;
                records.retain(|r| r.seq <= head.seq);
                (head, records)
            }
            Chain::Shared(chain) => chain.read(after, limit.min(MAX_PAGE))?,
        };
        let mac_valid = match &head.mac {
            Some(mac) => keyring.audit_mac_verify(&head_mac_input(head.seq, &head.hash), mac),
            None => None,
        };
        Ok(AuditPage {
            checkpoint,
            records,
            head: AuditHead {
                seq: head.seq,
                hash: head.hash,
                mac_valid,
            },
        })
    }
}

/// One caller counted in [`AuditLog::waiting`] while it waits (also when its future is
/// dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies the audit chain of a stopped node into the chain of another store
/// (`kms-server migrate-store`): a chain file (embedded store, at `from_path`) into a
/// PostgreSQL store's chain, which must be empty, or a PostgreSQL store's chain into a new
/// chain file at `to_path`. The records and the head (with its MAC) are copied as they
/// are, so `kmsctl audit verify` verifies the copy as it did the source. Returns the
/// number of records copied.
pub fn copy_chain(
    from: &dyn KeyStore,
    from_path: &Path,
    to: &dyn KeyStore,
    to_path: &Path,
) -> Result<u64, Error> {
    let source = match from.cluster().map(|c| c.pool()) {
        Some(pool) => {
            let chain = PgChain::new(pool);
            let (head, finding) = chain.open()?;
            (Chain::Shared(chain), head, finding)
        }
        // No chain file: nothing was ever audited there.
        None if !from_path.exists() => return Ok(0),
        None => {
            let (file, head, _, finding) = ChainFile::open(from_path)?;
            if let Some(cp) = file.checkpoint() {
                tracing::error!(
                    checkpoint = cp.seq,
                    "the source audit chain starts after a retention checkpoint"
                );
                return Err(Error::InvalidState(
                    "the source audit chain was purged by retention: migrate-store copies whole chains only; keep the archive and the source chain file",
                ));
            }
            (Chain::File(Arc::new(file)), head, finding)
        }
    };
    let (source, head, finding) = source;
    if finding != Finding::Consistent {
        return Err(Error::InvalidState(
            "the source audit chain's head does not match its records: start and stop the server once (it records the finding in the chain), then migrate",
        ));
    }
    let upto = head.seq;
    let page = move |after: u64| -> Result<Vec<AuditRecord>, Error> {
        let mut records = match &source {
            Chain::File(f) => f.read(after, MAX_PAGE)?,
            Chain::Shared(c) => c.read(after, MAX_PAGE)?.1,
        };
        records.retain(|r| r.seq <= upto);
        Ok(records)
    };
    match (
        from.cluster().map(|c| c.pool()),
        to.cluster().map(|c| c.pool()),
    ) {
        (Some(_), Some(_)) => Err(Error::InvalidState(
            "both stores are PostgreSQL: copy the database with PostgreSQL's own tools",
        )),
        (None, Some(pool)) => PgChain::new(pool).import(page, head),
        (_, None) => {
            let (file, ..) = ChainFile::open(to_path)?;
            if file.head().seq != 0 || !file.read(0, 1)?.is_empty() {
                return Err(Error::InvalidState(
                    "the target audit chain file is not empty",
                ));
            }
            let mut after = 0;
            loop {
                let records = page(after)?;
                let Some(last) = records.last() else { break };
                let first = records[0].seq;
                after = last.seq;
                let mut lines = Vec::new();
                for r in &records {
                    serde_json::to_writer(&mut lines, r)
                        .map_err(|_| Error::Internal("audit record"))?;
                    lines.push(b'\n');
                }
                file.append(first, &lines, false)?;
            }
            if after != head.seq {
                return Err(Error::InvalidState(
                    "the source audit chain ends before its head",
                ));
            }
            file.set_head(head, true)?;
            file.sync()?;
            Ok(after)
        }
    }
}

/// Watches the free space of the filesystem holding the audit chain file: at start, then
/// every [`DISK_CHECK_EVERY`], raises an `audit_disk_low` alert when it falls under
/// `min_free` bytes (once, until it has recovered above the threshold plus 10 %). The trail
/// fails closed when the disk is full (no key use is answered unaudited), so this is the
/// operator's warning before that; at 30 000 requests/s the file grows ~14 MB/s.
pub async fn watch_disk(
    path: std::path::PathBuf,
    min_free: u64,
    alerts: Alerter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if min_free == 0 {
        return;
    }
    let mut low = false;
    loop {
        let p = path.clone();
        let free = tokio::task::spawn_blocking(move || {
            rustix::fs::statvfs(&p)
                .ok()
                .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        })
        .await
        .ok()
        .flatten();
        match free {
            Some(free) if !low && free < min_free => {
                low = true;
                let detail = format!(
                    "{} MiB free on the audit file's filesystem (threshold {} MiB); the audit trail fails closed when it is full",
                    free >> 20,
                    min_free >> 20
                );
                tracing::warn!(free_mib = free >> 20, "audit disk low");
                alerts.raise(AlertEvent::new(
                    crate::base::event::AlertKind::AuditDiskLow,
                    None,
                    detail,
                ));
            }
            Some(free) if low && free > min_free.saturating_add(min_free / 10) => low = false,
            _ => {}
        }
        tokio::select! {
            () = tokio::time::sleep(DISK_CHECK_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// How often [`watch_disk`] looks.
pub const DISK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
