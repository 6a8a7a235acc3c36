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

pub mod file;
pub mod postgres;
pub mod volume;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kms_client::api::{AuditHead, AuditPage, AuditRecord, AuditRecordRef};
use tokio::sync::{mpsc, oneshot};

use crate::base::error::Error;
use crate::keyring::Keyring;
use crate::security::alert::{AlertEvent, Alerter};
use crate::storage::{KeyStore, Table, WriteBatch};
pub use file::{ChainFile, Finding, Head};
pub use postgres::PgChain;

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
}

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
    tx: Option<mpsc::UnboundedSender<Msg>>,
    chain: Option<Chain>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn now_rfc3339_ms() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    humantime::format_rfc3339_millis(UNIX_EPOCH + d).to_string()
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
            chain.append(first.seq, v)?;
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

struct Writer {
    chain: Chain,
    keyring: Arc<Keyring>,
    alerts: Alerter,
    sink: Option<Box<dyn Write + Send>>,
    /// The chain's tip: last record's seq and hash (the file; a shared chain's tip is read
    /// under its lock at every append).
    last: (u64, String),
    /// On a shared chain, this node's id: each record says which node served it.
    node: Option<String>,
    /// The head found in the header at open, until its MAC has been checked.
    unchecked_head: Option<Head>,
    /// What opening found, until recorded in the chain.
    finding: Option<Finding>,
    /// When the header was last rewritten, and whether the current head is newer.
    header_written: std::time::Instant,
    header_stale: bool,
    /// Unauthenticated refusals of the current interval ([`volume`]).
    refusals: volume::Refusals,
}

pub use kms_client::api::{
    AUDIT_EVENT_AFTER_HEAD as EVENT_AFTER_HEAD, AUDIT_EVENT_HEAD_INVALID as EVENT_HEAD_INVALID,
    AUDIT_EVENT_HEAD_MISMATCH as EVENT_HEAD_MISMATCH,
    AUDIT_EVENT_HEAD_UNVERIFIED as EVENT_HEAD_UNVERIFIED,
};

impl Writer {
    /// The writer thread: takes what is queued as one batch (up to [`MAX_BATCH`]), commits
    /// it, answers each caller; on close, the last summary and a final sync.
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        // Below the request workers (nice +10): when the CPUs are busy, the writer runs
        // when the workers wait, so batches grow and wake-ups and preemptions fall
        // (measured in BENCHMARKS.md). CFS still gives it a share: requests waiting on it
        // leave the workers idle, so it cannot starve.
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), WRITER_NICE) {
            tracing::debug!(error = %e, "audit writer: could not lower its priority");
        }
        let mut closing = false;
        while !closing {
            let first = match rx.blocking_recv() {
                Some(Msg::Job(j)) => j,
                Some(Msg::Tick) => {
                    self.commit_summary();
                    self.flush_header();
                    continue;
                }
                Some(Msg::Close) | None => break,
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Job(j)) => jobs.push(j),
                    Ok(Msg::Tick) => {}
                    Ok(Msg::Close) => {
                        closing = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.write_batch(jobs);
        }
        if let Some(summary) = self.refusals.close_now() {
            if let Err(e) = self.commit(vec![summary]) {
                tracing::error!(error = %e, "audit write failed: a summary of refusals was lost");
            }
        }
        self.flush_header();
        if let Chain::File(chain) = &self.chain {
            if let Err(e) = chain.sync() {
                tracing::error!(error = %e, "audit file: final sync failed");
            }
        }
    }

    /// The summary of refusals, when its interval has ended.
    fn commit_summary(&mut self) {
        if let Some(summary) = self.refusals.close_if_due() {
            if let Err(e) = self.commit(vec![summary]) {
                tracing::error!(error = %e, "audit write failed: a summary of refusals was lost");
            }
        }
    }

    /// One batch: bounded, refusals past the volume limit counted into the summary (their
    /// callers answered at once), the rest committed together and answered with the result.
    fn write_batch(&mut self, jobs: Vec<Job>) {
        let mut drafts = Vec::with_capacity(jobs.len() + 1);
        let mut acks = Vec::with_capacity(jobs.len());
        if let Some(summary) = self.refusals.close_if_due() {
            drafts.push(summary);
        }
        for (mut draft, ack) in jobs {
            volume::bound(&mut draft);
            if self.refusals.record(&draft) {
                drafts.push(draft);
                acks.push(ack);
            } else {
                // Counted into the interval's summary; the answer carries nothing and does
                // not wait for the disk.
                let _ = ack.send(Ok(()));
            }
        }
        if drafts.is_empty() {
            return;
        }
        let result = self.commit(drafts);
        if let Err(e) = &result {
            tracing::error!(error = %e, records = acks.len(), "audit write failed: failing the requests");
            self.alerts.raise(AlertEvent::new(
                crate::base::event::AlertKind::AuditWriteFailed,
                None,
                e.to_string(),
            ));
        }
        for ack in acks {
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(|_| ()));
        }
    }
}

impl Writer {
    fn event(&self, operation: &str, outcome: &str, detail: String) -> AuditDraft {
        tracing::error!(operation, outcome, %detail, "audit chain finding");
        self.alerts.raise(AlertEvent::new(
            crate::base::event::AlertKind::AuditChain,
            None,
            format!("{operation}: {detail}"),
        ));
        AuditDraft {
            operation: operation.to_owned(),
            outcome: outcome.to_owned(),
            ..AuditDraft::default()
        }
    }

    /// Findings to put in the chain before the next records. The server never silently
    /// re-MACs a head it cannot vouch for: it appends an event first, so the finding stays
    /// in the trail (`kmsctl audit verify` reports it).
    fn events(&mut self) -> Vec<AuditDraft> {
        let mut out = Vec::new();
        match self.finding.take() {
            Some(Finding::HeadMismatch) => out.push(self.event(
                EVENT_HEAD_MISMATCH,
                "tampered",
                "the stored head is past the last record or names another hash".into(),
            )),
            Some(Finding::RecordsAfterHead(n)) => out.push(self.event(
                EVENT_AFTER_HEAD,
                "unverified",
                format!("{n} records after the MAC'd head (unclean stop)"),
            )),
            Some(Finding::Consistent) | None => {}
        }
        if let Some(head) = self.unchecked_head.take() {
            if head.seq == 0 {
                return out;
            }
            let input = head_mac_input(head.seq, &head.hash);
            let verdict = match &head.mac {
                Some(mac) => self.keyring.audit_mac_verify(&input, mac),
                // Unverifiable for good once we can MAC (unsealed).
                None => self.keyring.audit_mac(&input).map(|_| false),
            };
            match verdict {
                // Sealed: cannot check yet; keep it for the next batch.
                None => self.unchecked_head = Some(head),
                Some(true) => {}
                Some(false) => {
                    let (op, outcome) = match head.mac {
                        Some(_) => (EVENT_HEAD_INVALID, "tampered"),
                        None => (EVENT_HEAD_UNVERIFIED, "unverified"),
                    };
                    out.push(self.event(op, outcome, format!("head at record {}", head.seq)));
                }
            }
        }
        out
    }

    fn commit(&mut self, mut drafts: Vec<AuditDraft>) -> Result<(), Error> {
        let events = self.events();
        if !events.is_empty() {
            drafts.splice(0..0, events);
        }
        let time = now_rfc3339_ms();
        let lines = match &self.chain {
            Chain::File(chain) => {
                let (lines, last) = seal_lines(&drafts, &time, self.last.clone());
                chain.append(self.last.0 + 1, &lines)?;
                self.last = last.clone();
                let head = Head {
                    mac: self.keyring.audit_mac(&head_mac_input(last.0, &last.1)),
                    seq: last.0,
                    hash: last.1,
                };
                let persist = self.header_written.elapsed() >= file::HEADER_EVERY;
                chain.set_head(head, persist)?;
                if persist {
                    self.header_written = std::time::Instant::now();
                    self.header_stale = false;
                } else {
                    self.header_stale = true;
                }
                lines
            }
            Chain::Shared(chain) => {
                if let Some(node) = &self.node {
                    for d in &mut drafts {
                        d.attributes
                            .get_or_insert_with(Default::default)
                            .insert("node".to_owned(), node.clone());
                    }
                }
                let keyring = self.keyring.clone();
                chain.append(move |seq, hash| {
                    let (lines, last) = seal_lines(&drafts, &time, (seq, hash));
                    Ok(postgres::Sealed {
                        first_seq: seq + 1,
                        lines,
                        head: Head {
                            mac: keyring.audit_mac(&head_mac_input(last.0, &last.1)),
                            seq: last.0,
                            hash: last.1,
                        },
                    })
                })?
            }
        };
        if let Some(sink) = self.sink.as_mut() {
            sink.write_all(&lines)
                .and_then(|()| sink.flush())
                .map_err(|_| Error::Internal("audit sink write failed"))?;
        }
        Ok(())
    }
}

/// Seals `drafts` into chained record lines after the tip `(seq, hash)`: returns the
/// lines (each ending in `\n`) and the new tip.
fn seal_lines(drafts: &[AuditDraft], time: &str, tip: (u64, String)) -> (Vec<u8>, (u64, String)) {
    let (mut seq, mut prev) = tip;
    let mut lines: Vec<u8> = Vec::with_capacity(drafts.len() * 400);
    for d in drafts {
        seq += 1;
        let r = AuditRecordRef {
            seq,
            time,
            request_id: d.request_id,
            identity: d.identity.as_deref(),
            tenant: d.tenant.as_deref(),
            operation: &d.operation,
            key: d.key.as_deref(),
            version: d.version,
            context_hash: d.context_hash.as_deref(),
            outcome: &d.outcome,
            status: d.status,
            latency_us: d.latency_us,
            attributes: d.attributes.as_ref(),
            prev: &prev,
            hash: "",
        };
        prev = r.write_sealed(&mut lines);
        lines.push(b'\n');
    }
    (lines, (seq, prev))
}

impl Writer {
    /// Writes the current head into the header if it is newer than the header.
    fn flush_header(&mut self) {
        let Chain::File(chain) = &self.chain else {
            return;
        };
        if !self.header_stale {
            return;
        }
        match chain.set_head(chain.head(), true) {
            Ok(()) => {
                self.header_written = std::time::Instant::now();
                self.header_stale = false;
            }
            Err(e) => tracing::error!(error = %e, "audit file: header update failed"),
        }
    }
}

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
                node,
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
            None,
        )
    }

    fn spawn(
        chain: Chain,
        (header, last, finding): (Head, (u64, String), Finding),
        keyring: Arc<Keyring>,
        sink: &Sink,
        alerts: Alerter,
        node: Option<String>,
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
        };
        // What opening found (records after a stale head after an unclean stop, a head
        // that does not match) goes into the chain now, before anything reads it: readers
        // then see every record on disk, and the chain says what happened.
        if !matches!(writer.finding, Some(Finding::Consistent) | None) {
            writer.commit(Vec::new())?;
        }
        let (tx, rx) = mpsc::unbounded_channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("keyhold-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|_| Error::Internal("cannot start the audit writer"))?;
        // The header ticker: holds only a weak sender, so it stops once every handle is
        // gone or the writer has stopped.
        let ticker = tx.downgrade();
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
            chain: Some(chain),
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// No audit trail at all. Only for measuring what auditing costs; the server logs a
    /// warning at start when configured so.
    pub fn disabled() -> Self {
        Self {
            tx: None,
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

    /// Appends a record and waits until it is durable.
    pub async fn append(&self, draft: AuditDraft) -> Result<(), Error> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let (ack, done) = oneshot::channel();
        tx.send(Msg::Job((draft, ack)))
            .map_err(|_| Error::Internal("audit writer stopped"))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error::AuditUnavailable),
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
            records,
            head: AuditHead {
                seq: head.seq,
                hash: head.hash,
                mac_valid,
            },
        })
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
                file.append(first, &lines)?;
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
