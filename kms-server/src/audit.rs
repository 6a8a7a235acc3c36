//! The audit trail: one record per API request, allowed or denied, durable before the
//! response leaves (fail closed), hash-chained, with a MAC'd chain head.
//!
//! Records go to a single writer thread that commits every record waiting at that moment
//! in one store transaction (**group commit**: one fsync covers a batch, however many
//! requests are in flight), together with the new chain head. A request's response is
//! released only after its record's batch committed — and, if a JSON-lines sink is
//! configured, after the batch was written there too. If either fails, the request fails
//! with `503 StorageUnavailable` and its response (a DEK, say) never leaves.
//!
//! Chain: record `n` carries `prev` = hash of record `n−1` and `hash` = SHA-256 of its own
//! JSON with `hash` empty (`kms_client::api::AuditRecord::compute_hash`, shared with the
//! verifiers). The head `{seq, hash}` is stored with an HMAC under a key derived from the
//! master key, so a cut-off tail or a rewritten head is detected by anyone who can ask the
//! unsealed server (`GET /v1/audit` reports `mac_valid`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kms_client::api::{AuditHead, AuditPage, AuditRecord, AUDIT_GENESIS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::keyring::Keyring;
use crate::keystore::{KeyStore, StoreError, Table, WriteBatch};

const META_HEAD: &[u8] = b"audit-head";
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredHead {
    seq: u64,
    hash: String,
    #[serde(default)]
    mac: Option<String>,
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

enum Msg {
    Job(Job),
    /// Finish what is queued, then stop (releasing the store).
    Close,
}

/// Handle to the audit writer.
#[derive(Clone)]
pub struct AuditLog {
    /// `None`: auditing turned off (`[audit] enabled = false`, for measurements only).
    tx: Option<mpsc::UnboundedSender<Msg>>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn now_rfc3339_ms() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    humantime::format_rfc3339_millis(UNIX_EPOCH + d).to_string()
}

fn read_head(store: &dyn KeyStore) -> Result<(StoredHead, Option<Vec<u8>>), Error> {
    match store.get(Table::Meta, META_HEAD)? {
        None => Ok((
            StoredHead {
                seq: 0,
                hash: AUDIT_GENESIS.to_owned(),
                mac: None,
            },
            None,
        )),
        Some(bytes) => {
            let h: StoredHead =
                serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("audit head"))?;
            Ok((h, Some(bytes)))
        }
    }
}

struct Writer {
    store: Arc<dyn KeyStore>,
    keyring: Arc<Keyring>,
    sink: Option<Box<dyn Write + Send>>,
    head: StoredHead,
    head_bytes: Option<Vec<u8>>,
    /// Whether the stored head was checked against its MAC since it was loaded.
    head_checked: bool,
}

/// Operation name of the chain event that records an unverifiable head (written while
/// sealed, or its MAC removed).
pub const EVENT_HEAD_UNVERIFIED: &str = "AUDIT head-unverified";
/// Operation name of the chain event that records a head whose MAC is wrong (altered).
pub const EVENT_HEAD_INVALID: &str = "AUDIT head-mac-invalid";

impl Writer {
    /// Once unsealed, checks the head it continues from. The server never silently
    /// re-MACs a head it cannot vouch for: it appends an event to the chain first, so the
    /// finding stays in the trail (`kmsctl audit verify` reports it).
    fn head_event(&mut self) -> Option<AuditDraft> {
        if self.head_checked || self.head.seq == 0 {
            self.head_checked = true;
            return None;
        }
        let input = head_mac_input(self.head.seq, &self.head.hash);
        let verdict = match &self.head.mac {
            Some(mac) => self.keyring.audit_mac_verify(&input, mac)?,
            None => {
                // Sealed now: cannot check yet.
                self.keyring.audit_mac(&input)?;
                false
            }
        };
        self.head_checked = true;
        if verdict {
            return None;
        }
        let (operation, outcome) = match self.head.mac {
            Some(_) => (EVENT_HEAD_INVALID, "tampered"),
            None => (EVENT_HEAD_UNVERIFIED, "unverified"),
        };
        tracing::error!(
            seq = self.head.seq,
            outcome,
            "audit chain head could not be verified"
        );
        Some(AuditDraft {
            operation: operation.to_owned(),
            outcome: outcome.to_owned(),
            ..AuditDraft::default()
        })
    }

    fn commit(&mut self, drafts: &[&AuditDraft]) -> Result<(), Error> {
        let event = self.head_event();
        let drafts: Vec<&AuditDraft> = event.iter().chain(drafts.iter().copied()).collect();
        let time = now_rfc3339_ms();
        let mut seq = self.head.seq;
        let mut prev = self.head.hash.clone();
        let mut batch = WriteBatch::new();
        let first_seq = seq + 1;
        let mut lines: Vec<u8> = Vec::with_capacity(drafts.len() * 400);
        for d in drafts {
            seq += 1;
            let mut r = AuditRecord {
                seq,
                time: time.clone(),
                request_id: d.request_id,
                identity: d.identity.clone(),
                tenant: d.tenant.clone(),
                operation: d.operation.clone(),
                key: d.key.clone(),
                version: d.version,
                context_hash: d.context_hash.clone(),
                outcome: d.outcome.clone(),
                status: d.status,
                latency_us: d.latency_us,
                prev: prev.clone(),
                hash: String::new(),
            };
            let json = r.seal();
            prev = r.hash;
            lines.extend_from_slice(&json);
            lines.push(b'\n');
        }
        // One value per batch: one B-tree insert however many records it holds.
        batch.put(Table::Audit, &first_seq.to_be_bytes(), &lines);
        let head = StoredHead {
            seq,
            mac: self.keyring.audit_mac(&head_mac_input(seq, &prev)),
            hash: prev,
        };
        let head_bytes = serde_json::to_vec(&head).map_err(|_| Error::Internal("audit head"))?;
        batch
            .require(Table::Meta, META_HEAD, self.head_bytes.as_deref())
            .put(Table::Meta, META_HEAD, &head_bytes);
        match self.store.commit(&batch) {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                // Someone else moved the head: reload it; these requests fail.
                let (h, b) = read_head(self.store.as_ref())?;
                self.head = h;
                self.head_bytes = b;
                self.head_checked = false;
                return Err(Error::Storage(StoreError::Conflict("audit head")));
            }
            Err(e) => return Err(e.into()),
        }
        self.head = head;
        self.head_bytes = Some(head_bytes);
        if let Some(sink) = self.sink.as_mut() {
            sink.write_all(&lines)
                .and_then(|()| sink.flush())
                .map_err(|_| Error::Internal("audit sink write failed"))?;
        }
        Ok(())
    }
}

impl AuditLog {
    /// Starts the writer thread.
    pub fn start(
        store: Arc<dyn KeyStore>,
        keyring: Arc<Keyring>,
        sink: &Sink,
    ) -> Result<Self, Error> {
        let (head, head_bytes) = read_head(store.as_ref())?;
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
            store,
            keyring,
            sink,
            head,
            head_bytes,
            head_checked: false,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("keyhold-audit".into())
            .spawn(move || {
                let mut closing = false;
                while !closing {
                    let first = match rx.blocking_recv() {
                        Some(Msg::Job(j)) => j,
                        Some(Msg::Close) | None => break,
                    };
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(Msg::Job(j)) => jobs.push(j),
                            Ok(Msg::Close) => {
                                closing = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let drafts: Vec<&AuditDraft> = jobs.iter().map(|(d, _)| d).collect();
                    let result = writer.commit(&drafts);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, records = jobs.len(), "audit write failed: failing the requests");
                    }
                    for (_, ack) in jobs {
                        let _ = ack.send(result.as_ref().map(|_| ()).map_err(|_| ()));
                    }
                }
            })
            .map_err(|_| Error::Internal("cannot start the audit writer"))?;
        Ok(Self {
            tx: Some(tx),
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// No audit trail at all. Only for measuring what auditing costs; the server logs a
    /// warning at start when configured so.
    pub fn disabled() -> Self {
        Self {
            tx: None,
            thread: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Writes what is queued, stops the writer and waits for it (the store is released).
    /// Later appends fail.
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
            _ => Err(Error::Storage(StoreError::Engine {
                engine: "audit",
                source: "the audit record could not be made durable".into(),
            })),
        }
    }

    /// Records with `seq > after` (at most `limit`), and the head with its MAC checked.
    pub fn read(
        store: &dyn KeyStore,
        keyring: &Keyring,
        after: u64,
        limit: usize,
    ) -> Result<AuditPage, Error> {
        let (head, _) = read_head(store)?;
        let limit = limit.min(MAX_PAGE);
        let want = after.saturating_add(1);
        // Start at the batch holding record `after + 1`, then read batches in order.
        let start = match store.get_floor(Table::Audit, &want.to_be_bytes())? {
            Some((k, _)) => k,
            None => want.to_be_bytes().to_vec(),
        };
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut from = start;
        'outer: loop {
            let batches = store.scan_from(Table::Audit, &from, 64)?;
            let Some((last_key, _)) = batches.last() else {
                break;
            };
            let mut next = last_key.clone();
            for (_, value) in &batches {
                for line in value.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let r: AuditRecord =
                        serde_json::from_slice(line).map_err(|_| Error::Corrupt("audit record"))?;
                    if r.seq > after {
                        records.push(r);
                        if records.len() == limit {
                            break 'outer;
                        }
                    }
                }
            }
            if batches.len() < 64 {
                break;
            }
            // Continue after the last batch read.
            next.push(0);
            from = next;
        }
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
