//! The writer thread: takes the drafts queued by [`super::AuditLog::append`], seals them
//! into the chain as batches (group commit) and answers each caller when its batch is
//! written and, as the durability policy says, flushed.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::base::error::Error;
use crate::keyring::Keyring;
use crate::security::alert::{AlertEvent, Alerter};
use kms_client::api::AuditRecordRef;

use super::file::{self, Finding, Head};
use super::{head_mac_input, postgres, rfc3339_ms, volume, AuditDraft, Chain, Job, Msg};
use super::{CommitPolicy, Durability, MAX_BATCH, WRITER_NICE};
use super::{EVENT_AFTER_HEAD, EVENT_HEAD_INVALID, EVENT_HEAD_MISMATCH, EVENT_HEAD_UNVERIFIED};

pub(super) struct Writer {
    pub(super) chain: Chain,
    pub(super) keyring: Arc<Keyring>,
    pub(super) alerts: Alerter,
    pub(super) sink: Option<Box<dyn Write + Send>>,
    /// The chain's tip: last record's seq and hash (the file; a shared chain's tip is read
    /// under its lock at every append).
    pub(super) last: (u64, String),
    /// On a shared chain, this node's id: each record says which node served it.
    pub(super) node: Option<String>,
    /// The head found in the header at open, until its MAC has been checked.
    pub(super) unchecked_head: Option<Head>,
    /// What opening found, until recorded in the chain.
    pub(super) finding: Option<Finding>,
    /// When the header was last rewritten, and whether the current head is newer.
    pub(super) header_written: Instant,
    pub(super) header_stale: bool,
    /// Unauthenticated refusals of the current interval ([`volume`]).
    pub(super) refusals: volume::Refusals,
    /// The commit window and the durability mode.
    pub(super) policy: CommitPolicy,
    /// Batches, records and flushes, for the metrics.
    pub(super) counters: crate::base::metrics::AuditCounters,
    /// Callers waiting in [`super::AuditLog::append`] now.
    pub(super) waiting: Arc<AtomicUsize>,
    /// How many callers waited at once lately (decaying): the batch a window waits for.
    pub(super) peak: usize,
    /// Bounded lag: when the oldest written but unflushed batch was written.
    pub(super) unflushed_since: Option<Instant>,
}

impl Writer {
    /// The writer thread: takes what is queued as one batch (up to [`MAX_BATCH`]), waits
    /// the commit window for the callers it expects ([`Writer::gather`]), commits the
    /// batch, answers each caller; in bounded-lag mode flushes when the oldest unflushed
    /// batch reaches the lag. On close: the last summary and a final sync.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Msg>) {
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
            let received = match self.flush_due() {
                None => rx.recv().map_err(|_| ()),
                Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(m) => Ok(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.flush_lagging();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
                },
            };
            let first = match received {
                Ok(Msg::Job(j)) => j,
                Ok(Msg::Tick) => {
                    self.commit_summary();
                    self.flush_header();
                    continue;
                }
                Ok(Msg::Close) | Err(()) => break,
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
            if !closing {
                closing = self.gather(&rx, &mut jobs);
            }
            self.write_batch(jobs);
        }
        if let Some(summary) = self.refusals.close_now() {
            if let Err(e) = self.commit(vec![summary], true) {
                tracing::error!(error = %e, "audit write failed: a summary of refusals was lost");
            }
        }
        // The records first, then the header that names them, each flushed.
        if let Chain::File(chain) = &self.chain {
            match chain.sync() {
                Ok(()) => self.unflushed_since = None,
                Err(e) => tracing::error!(error = %e, "audit file: final sync failed"),
            }
        }
        if self.header_stale && self.unflushed_since.is_none() {
            self.flush_header();
            if let Chain::File(chain) = &self.chain {
                if let Err(e) = chain.sync() {
                    tracing::error!(error = %e, "audit file: final sync failed");
                }
            }
        }
    }

    /// The adaptive commit window (in the spirit of PostgreSQL's `commit_delay` and
    /// `commit_siblings`): when more callers waited at once lately than this batch holds,
    /// wait up to [`CommitPolicy::window`] for them, and stop as soon as they are all in.
    /// A caller who is alone (lately at most one waiting) is never delayed. Returns
    /// whether a close arrived meanwhile.
    fn gather(&mut self, rx: &mpsc::Receiver<Msg>, jobs: &mut Vec<Job>) -> bool {
        let now = self.waiting.load(Ordering::Relaxed);
        self.peak = now.max(self.peak - self.peak / 8);
        let want = self.peak.min(MAX_BATCH);
        if self.policy.window.is_zero() || want < 2 || jobs.len() >= want {
            return false;
        }
        // Sleep, not a blocking receive: a sender wakes a receiver blocked on the
        // channel (a futex wake and a context switch per record); a sleeping writer costs
        // the senders nothing, and takes what came in slices of a quarter window.
        let deadline = Instant::now() + self.policy.window;
        let slice = (self.policy.window / 4).max(std::time::Duration::from_micros(10));
        while jobs.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(slice.min(left));
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Job(j)) => jobs.push(j),
                    Ok(Msg::Tick) => {}
                    Ok(Msg::Close) => return true,
                    Err(_) => break,
                }
            }
        }
        false
    }

    /// Bounded lag: when the unflushed batches must be flushed.
    fn flush_due(&self) -> Option<Instant> {
        match self.policy.durability {
            Durability::PerRequest => None,
            Durability::BoundedLag(lag) => self.unflushed_since.map(|t| t + lag),
        }
    }

    /// Bounded lag: flushes what was written and answered but not yet on disk. A failed
    /// flush poisons the chain file: every later append fails (closed), and the alert says
    /// how far back records may be lost.
    fn flush_lagging(&mut self) {
        let Some(since) = self.unflushed_since.take() else {
            return;
        };
        let result = match &self.chain {
            Chain::File(chain) => {
                self.counters.flushes.inc();
                chain.sync_or_poison()
            }
            // PostgreSQL flushes asynchronous commits itself (wal_writer_delay).
            Chain::Shared(_) => Ok(()),
        };
        if result.is_ok() && self.header_written.elapsed() >= file::HEADER_EVERY {
            // What was written is flushed: the header may name it now.
            self.flush_header();
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "audit flush failed: records answered in the last lag window may be lost");
            self.alerts.raise(AlertEvent::new(
                crate::base::event::AlertKind::AuditWriteFailed,
                None,
                format!(
                    "flush failed; records of the last {} ms may be lost: {e}",
                    since.elapsed().as_millis()
                ),
            ));
        }
    }

    /// The summary of refusals, when its interval has ended.
    fn commit_summary(&mut self) {
        if let Some(summary) = self.refusals.close_if_due() {
            if let Err(e) = self.commit(vec![summary], true) {
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
        // Flushed before the answers: always per request; in bounded-lag mode when a
        // record is not a key use (a key change, an event, a summary) or the lag is due.
        let durable = match self.policy.durability {
            Durability::PerRequest => true,
            Durability::BoundedLag(_) => {
                drafts.iter().any(|d| !d.key_use)
                    || self.flush_due().is_some_and(|due| due <= Instant::now())
            }
        };
        self.counters.batches.inc();
        self.counters.records.inc_by(drafts.len() as u64);
        if durable {
            self.counters.flushes.inc();
        }
        let result = self.commit(drafts, durable);
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

    /// Seals and appends `drafts`; flushed to disk before returning when `durable` (else
    /// written, so a killed process loses nothing, and flushed within the lag).
    pub(super) fn commit(
        &mut self,
        mut drafts: Vec<AuditDraft>,
        durable: bool,
    ) -> Result<(), Error> {
        let events = self.events();
        if !events.is_empty() {
            drafts.splice(0..0, events);
        }
        let time = rfc3339_ms(self.keyring.clock());
        let lines = match &self.chain {
            Chain::File(chain) => {
                let (lines, last) = seal_lines(&drafts, &time, self.last.clone());
                chain.append(self.last.0 + 1, &lines, durable)?;
                if durable {
                    self.unflushed_since = None;
                } else if self.unflushed_since.is_none() {
                    self.unflushed_since = Some(Instant::now());
                }
                self.last = last.clone();
                let head = Head {
                    mac: self.keyring.audit_mac(&head_mac_input(last.0, &last.1)),
                    seq: last.0,
                    hash: last.1,
                };
                // The header names flushed records only: one rewritten to a head whose
                // records are not yet on disk could reach the disk without them in the
                // next flush (a power cut during it), and the chain would read as cut.
                let persist = durable && self.header_written.elapsed() >= file::HEADER_EVERY;
                chain.set_head(head, persist)?;
                if persist {
                    self.header_written = Instant::now();
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
                chain.append(durable, move |seq, hash| {
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
        if !self.header_stale || self.unflushed_since.is_some() {
            return;
        }
        match chain.set_head(chain.head(), true) {
            Ok(()) => {
                self.header_written = Instant::now();
                self.header_stale = false;
            }
            Err(e) => tracing::error!(error = %e, "audit file: header update failed"),
        }
    }
}
