//! Audit retention (`[audit.retention]`, `docs/operations.md`, "Audit export and
//! retention"): the chain is kept in segments of `segment_hours` of records (by record
//! time, aligned to UTC); a segment whose end is more than `keep_days` in the past is
//! archived, then purged.
//!
//! A sweep (at start, then every `check_secs`) walks the chain from its current start:
//!
//! 1. it verifies every record it reads (sequence, links, hashes) from the previous
//!    checkpoint, so nothing is archived that does not chain;
//! 2. it writes each due segment to `archive_dir` as `segment-<first>-<last>.jsonl` (the
//!    records as in the chain), synced, under a temporary name then renamed, with
//!    `segment-<first>-<last>.checkpoint.json` (the segment's last record and the MAC of
//!    the checkpoint it becomes);
//! 3. it stops at the first segment not yet due, and never passes a record an exporter
//!    has not delivered ([`super::export`]) nor the chain's head;
//! 4. the chain then keeps the checkpoint (its last purged record's seq, hash and time,
//!    MAC'd under the audit MAC key) and drops the records up to it: the chain file's
//!    header takes the checkpoint and the purged bytes are released.
//!
//! `kmsctl audit verify` verifies the kept chain from the checkpoint; the archive verifies
//! on its own (each file's records chain, the first to the previous checkpoint). The
//! retention in force is an audit event at start when it changed, and every purge is one
//! (`SYSTEM audit-retention`, `SYSTEM audit-purge`). A crash between the archive and the
//! purge leaves an archive file that the next sweep writes again; a crash during the purge
//! leaves the header with or without the checkpoint, never pointing into a hole.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kms_client::api::{AuditChain, AuditRecord};
use serde::Deserialize;

use super::file::Checkpoint;
use super::{AuditDraft, AuditLog};
use crate::base::error::Error;
use crate::keyring::Keyring;
use crate::storage::{Table, WriteBatch};

/// `[audit.retention]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Keep a segment this many days after it ends (1 to 36 500).
    pub keep_days: u64,
    /// Hours of records per segment, aligned to UTC (1 to 744; default 24: one day).
    #[serde(default = "default_segment_hours")]
    pub segment_hours: u64,
    /// Where due segments are archived before they are purged (required).
    pub archive_dir: PathBuf,
    /// How often the sweep runs, seconds (1 to 86 400; default 3600).
    #[serde(default = "default_check_secs")]
    pub check_secs: u64,
}

fn default_segment_hours() -> u64 {
    24
}
fn default_check_secs() -> u64 {
    3600
}

impl RetentionSettings {
    /// Checks the bounds.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=36_500).contains(&self.keep_days) {
            return Err("keep_days must be 1 to 36500".into());
        }
        if !(1..=744).contains(&self.segment_hours) {
            return Err("segment_hours must be 1 to 744".into());
        }
        if !(1..=86_400).contains(&self.check_secs) {
            return Err("check_secs must be 1 to 86400".into());
        }
        Ok(())
    }

    fn span_ms(&self) -> u64 {
        self.segment_hours * 3_600_000
    }

    /// What the chain records when the retention in force changes.
    fn describe(&self) -> String {
        format!(
            "keep_days={} segment_hours={} archive_dir={}",
            self.keep_days,
            self.segment_hours,
            self.archive_dir.display()
        )
    }
}

/// The MAC input of a checkpoint.
pub(super) fn checkpoint_mac_input(seq: u64, hash: &str, time: &str) -> Vec<u8> {
    let mut v = b"keyhold-audit-checkpoint/v1".to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(hash.as_bytes());
    v.push(0);
    v.extend_from_slice(time.as_bytes());
    v
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Segments archived and purged.
    pub segments: u64,
    /// Records purged.
    pub records: u64,
    /// The new checkpoint's seq (none: nothing purged).
    pub through: Option<u64>,
    /// Bytes released in the chain file.
    pub released: u64,
}

/// The segment a record belongs to (its time in ms / the span).
fn segment_of(r: &AuditRecord, span_ms: u64) -> Result<u64, Error> {
    let ms = super::export::unix_nanos(&r.time) / 1_000_000;
    if ms == 0 {
        return Err(Error::Corrupt("an audit record's time"));
    }
    Ok(ms / span_ms)
}

/// Writes `records` (one segment) into the archive, synced, renamed into place.
fn archive(dir: &Path, records: &[AuditRecord], checkpoint: &Checkpoint) -> Result<(), Error> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(());
    };
    let io = |what: &str, e: std::io::Error| {
        tracing::error!(dir = %dir.display(), error = %e, "audit archive: {what}");
        Error::Internal("the audit archive could not be written")
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create the directory", e))?;
    let stem = format!("segment-{:020}-{:020}", first.seq, last.seq);
    let mut lines = Vec::new();
    for r in records {
        serde_json::to_writer(&mut lines, r).map_err(|_| Error::Internal("audit record"))?;
        lines.push(b'\n');
    }
    let cp = serde_json::to_vec_pretty(checkpoint).map_err(|_| Error::Internal("checkpoint"))?;
    for (name, bytes) in [
        (format!("{stem}.jsonl"), lines),
        (format!("{stem}.checkpoint.json"), cp),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, dir.join(&name)).map_err(|e| io("rename", e))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the directory", e))?;
    Ok(())
}

/// One sweep at `now_ms`: archives and purges every due segment, up to `limit` (the
/// slowest exporter's position). Blocking (reads and writes files).
pub fn sweep(
    audit: &AuditLog,
    keyring: &Keyring,
    settings: &RetentionSettings,
    limit: Option<u64>,
    now_ms: u64,
) -> Result<Swept, Error> {
    let span = settings.span_ms();
    let cutoff = now_ms.saturating_sub(settings.keep_days * 86_400_000);
    let head = audit.head_seq()?;
    let limit = limit.unwrap_or(u64::MAX).min(head);
    let start = audit.checkpoint()?;
    let mut chain = match &start {
        Some(cp) => AuditChain::from_checkpoint(&kms_client::api::AuditCheckpoint {
            seq: cp.seq,
            hash: cp.hash.clone(),
            time: cp.time.clone(),
            mac_valid: None,
        }),
        None => AuditChain::new(),
    };
    let mut after = start.as_ref().map_or(0, |c| c.seq);
    let mut segment: Vec<AuditRecord> = Vec::new();
    let mut done = Swept::default();
    let mut last_checkpoint = None;
    'read: loop {
        let page = audit.records(after, super::MAX_PAGE)?;
        if page.is_empty() {
            break;
        }
        for r in page {
            chain.push(&r).map_err(|e| {
                tracing::error!(violation = %e, "audit retention: the chain does not verify; nothing purged past it");
                Error::Corrupt("the audit chain does not verify")
            })?;
            after = r.seq;
            let id = segment_of(&r, span)?;
            if let Some(first) = segment.first() {
                if segment_of(first, span)? != id {
                    // The segment before `r` is complete: archive it if due.
                    let due = (segment_of(first, span)? + 1) * span <= cutoff;
                    if !due {
                        break 'read;
                    }
                    last_checkpoint = Some(close(settings, keyring, &segment, &mut done)?);
                    segment.clear();
                }
            }
            if r.seq > limit {
                break 'read;
            }
            // A segment not due ends the sweep at its first record: a sweep with nothing
            // to do reads one page, not a segment.
            if segment.is_empty() && (id + 1) * span > cutoff {
                break 'read;
            }
            segment.push(r);
        }
    }
    // The last segment read is complete only if its whole span is due.
    if let Some(first) = segment.first() {
        let due = (segment_of(first, span)? + 1) * span <= cutoff;
        let all_read = segment.last().map(|r| r.seq) == Some(after);
        if due && all_read {
            last_checkpoint = Some(close(settings, keyring, &segment, &mut done)?);
        }
    }
    if let Some(cp) = last_checkpoint {
        done.through = Some(cp.seq);
        done.released = audit.purge_through(cp)?;
    }
    Ok(done)
}

/// Archives one due segment and returns its checkpoint.
fn close(
    settings: &RetentionSettings,
    keyring: &Keyring,
    segment: &[AuditRecord],
    done: &mut Swept,
) -> Result<Checkpoint, Error> {
    let Some(last) = segment.last() else {
        return Err(Error::Internal("an empty segment"));
    };
    let mac = keyring.audit_mac(&checkpoint_mac_input(last.seq, &last.hash, &last.time));
    if mac.is_none() {
        return Err(Error::Sealed);
    }
    let cp = Checkpoint {
        seq: last.seq,
        hash: last.hash.clone(),
        time: last.time.clone(),
        offset: 0,
        mac,
    };
    archive(&settings.archive_dir, segment, &cp)?;
    done.segments += 1;
    done.records += segment.len() as u64;
    Ok(cp)
}

/// Where the retention in force was last recorded (the key store's meta table).
const META_SETTINGS: &[u8] = b"audit-retention";

/// Runs the retention sweep until `stop`: records the retention in force (an audit event
/// when it changed), then sweeps at start and every `check_secs`, each purge an audit
/// event.
pub async fn run(
    settings: RetentionSettings,
    audit: AuditLog,
    keyring: Arc<Keyring>,
    exporters: Vec<super::export::ExportTarget>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut announced = false;
    loop {
        if !announced {
            announced = announce(&settings, &audit, &keyring).await;
        }
        let (a, k, s, e) = (
            audit.clone(),
            keyring.clone(),
            settings.clone(),
            exporters.clone(),
        );
        let swept = tokio::task::spawn_blocking(move || {
            let limit = super::export::slowest(k.store().as_ref(), &e)
                .map_err(|_| Error::Internal("exporter positions unreadable"))?;
            sweep(&a, &k, &s, limit, k.clock().now_millis())
        })
        .await;
        match swept {
            Ok(Ok(done)) if done.segments > 0 => {
                tracing::info!(segments = done.segments, records = done.records, through = ?done.through, released = done.released, "audit segments archived and purged");
                let draft = AuditDraft {
                    operation: "SYSTEM audit-purge".into(),
                    outcome: "ok".into(),
                    attributes: Some(
                        [
                            ("segments".to_owned(), done.segments.to_string()),
                            ("records".to_owned(), done.records.to_string()),
                            (
                                "through".to_owned(),
                                done.through.unwrap_or_default().to_string(),
                            ),
                            ("bytes_released".to_owned(), done.released.to_string()),
                            (
                                "archive_dir".to_owned(),
                                settings.archive_dir.display().to_string(),
                            ),
                        ]
                        .into(),
                    ),
                    ..AuditDraft::default()
                };
                if let Err(e) = audit.append(draft).await {
                    tracing::error!(error = %e, "could not audit a retention purge");
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(Error::Sealed)) => {
                tracing::info!("audit retention waits for the unseal (checkpoints are MAC'd)");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "audit retention sweep failed"),
            Err(_) => tracing::error!("audit retention sweep failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(settings.check_secs)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Puts the retention in force into the chain when it differs from the one last put
/// there. `true` once done.
async fn announce(settings: &RetentionSettings, audit: &AuditLog, keyring: &Arc<Keyring>) -> bool {
    let now = settings.describe();
    let store = keyring.store().clone();
    let before = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.get(Table::Meta, META_SETTINGS)).await
    };
    let before = match before {
        Ok(Ok(v)) => v.map(|v| String::from_utf8_lossy(&v).into_owned()),
        _ => return false,
    };
    if before.as_deref() == Some(now.as_str()) {
        return true;
    }
    let draft = AuditDraft {
        operation: "SYSTEM audit-retention".into(),
        outcome: "ok".into(),
        attributes: Some(
            [
                ("retention".to_owned(), now.clone()),
                (
                    "previous".to_owned(),
                    before.unwrap_or_else(|| "none".into()),
                ),
            ]
            .into(),
        ),
        ..AuditDraft::default()
    };
    if audit.append(draft).await.is_err() {
        return false;
    }
    let saved = tokio::task::spawn_blocking(move || {
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, META_SETTINGS, now.as_bytes());
        store.commit(&batch)
    })
    .await;
    matches!(saved, Ok(Ok(())))
}
