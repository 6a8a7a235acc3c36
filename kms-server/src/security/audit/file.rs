//! The audit chain file: an append-only file of JSON lines with the MAC'd chain head in a
//! fixed header that is overwritten in place.
//!
//! ```text
//! offset 0    512-byte header: "KHAUDIT1\n" + head JSON {seq, hash, mac} + spaces + "\n"
//! offset 512  records, one JSON line each (seq 1, 2, ...), hash-chained
//! then        zeros: space allocated ahead (JSON never holds a NUL byte)
//! ```
//!
//! Space is allocated ahead in zero-filled steps of [`GROW_STEP`], so that an append
//! overwrites blocks that already exist and its `fdatasync` flushes data only: no inode or
//! extent update, one write request and one cache flush per batch.
//!
//! Why a file and not the key store: one group-commit batch costs one `write` and one
//! `fdatasync` here, against a B-tree copy-on-write transaction with two syncs in redb
//! (see `BENCHMARKS.md`, audit section).
//!
//! Ordering (what makes crashes and tampering distinguishable):
//! 1. the batch's records are written at the end and `fdatasync`ed — only then are the
//!    requests answered;
//! 2. the header is rewritten with the new head (at most every [`HEADER_EVERY`], so that
//!    most syncs flush one place of the file), and reaches the disk with a later sync (or
//!    at close). Readers get the current head from memory. The header only ever names
//!    records already flushed: in bounded-lag mode it is rewritten after a flush, never
//!    after a batch written without one (a power cut during the next flush could keep the
//!    header and drop those records).
//!
//! So after a crash the header's head may lag the records by a fraction of a second
//! (records after the head: acknowledged, but not yet covered by the MAC — the server says
//! so in the chain),
//! but it never points past them: a head beyond the last record, or a record at the
//! head's position with another hash, means the file was cut or edited. A torn last line
//! was never acknowledged and is dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use kms_client::api::{AuditRecord, AUDIT_GENESIS};
use serde::{Deserialize, Serialize};

use crate::base::error::Error;

const MAGIC: &[u8] = b"KHAUDIT1\n";
/// Size of the header; records start here.
pub const HEADER_LEN: u64 = 512;
/// An index entry every this many bytes of records. The index lives in memory and grows
/// with the file: at 64 KiB it was 0.25 MiB per GiB of records, and its reallocations
/// showed as a 10 MiB step in the soak's resident memory (`RELIABILITY.md`); at 1 MiB it is
/// 16 KiB per GiB, and a read skips at most 1 MiB of records by their `seq` prefix alone.
const INDEX_STRIDE: u64 = 1024 * 1024;
/// Zero-filled space allocated ahead of the records, per step.
pub const GROW_STEP: u64 = 4 * 1024 * 1024;
/// The header is rewritten at most this often (and at close).
pub const HEADER_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The chain head: last sequence number, its hash, and the HMAC over both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// Last record's sequence number (0: empty chain).
    pub seq: u64,
    /// Last record's hash ([`AUDIT_GENESIS`] when empty).
    pub hash: String,
    /// HMAC-SHA256 (hex) of the head, under a master-derived key; `None` when written
    /// sealed.
    #[serde(default)]
    pub mac: Option<String>,
}

impl Head {
    /// The head of an empty chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: AUDIT_GENESIS.to_owned(),
            mac: None,
        }
    }
}

/// Where the kept chain begins after a retention purge ([`super::retention`]): the last
/// purged record, and (in a chain file) the offset of the first kept one. The header
/// carries it beside the head; the bytes before `offset` are a hole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The last purged record's seq.
    pub seq: u64,
    /// Its hash: the first kept record's `prev`.
    pub hash: String,
    /// Its time.
    pub time: String,
    /// Chain file: where the first kept record starts (0 in the database).
    #[serde(default)]
    pub offset: u64,
    /// HMAC-SHA256 (hex) of seq, hash and time under the audit MAC key.
    #[serde(default)]
    pub mac: Option<String>,
}

/// What opening found, besides the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Header and records agree.
    Consistent,
    /// Records after the header's head (an unclean stop between a batch's sync and the
    /// header update): how many.
    RecordsAfterHead(u64),
    /// The header's head is past the last record or names another hash: cut or edited.
    HeadMismatch,
}

/// What readers see: the committed end and a sparse seq → offset index.
struct View {
    /// Bytes up to here are durable records.
    end: u64,
    /// Bytes up to here exist (zeros after `end`).
    allocated: u64,
    /// The chain's current head (ahead of the header on disk by up to [`HEADER_EVERY`]).
    head: Head,
    /// (first seq at or after this offset, offset), ascending.
    index: Vec<(u64, u64)>,
    /// Offset of the last index entry.
    last_indexed: u64,
    /// Where the kept records start (after the header, or after a retention purge).
    start: u64,
    /// The retention checkpoint, if records were purged.
    checkpoint: Option<Checkpoint>,
}

/// The open chain file, shared by the writer and readers.
pub struct ChainFile {
    file: File,
    path: PathBuf,
    view: RwLock<View>,
    /// Set by any failed append: after a failed `fdatasync` the kernel may have dropped
    /// the data while marking the pages clean, so nothing written later could be trusted
    /// to follow it. Every later append fails (fail closed) until a restart reopens and
    /// rescans the file.
    poisoned: std::sync::atomic::AtomicBool,
    /// Flushes (`fdatasync`) since open: what the durability mode costs, for tests and
    /// measurements.
    flushes: std::sync::atomic::AtomicU64,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    tracing::error!(path = %path.display(), error = %e, "audit file: {what}");
    Error::Storage(crate::storage::StoreError::Engine {
        engine: "audit",
        source: format!("{}: {what}: {e}", path.display()).into(),
    })
}

fn header_bytes(head: &Head, checkpoint: Option<&Checkpoint>) -> Result<Vec<u8>, Error> {
    let mut json = serde_json::to_vec(head).map_err(|_| Error::Internal("audit head"))?;
    if let Some(cp) = checkpoint {
        // A second JSON value after a space: readers of the first version see the head.
        json.push(b' ');
        serde_json::to_writer(&mut json, cp).map_err(|_| Error::Internal("audit checkpoint"))?;
    }
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&json);
    if h.len() >= HEADER_LEN as usize {
        return Err(Error::Internal("audit head does not fit the header"));
    }
    h.resize(HEADER_LEN as usize - 1, b' ');
    h.push(b'\n');
    Ok(h)
}

fn parse_header(bytes: &[u8]) -> Option<(Head, Option<Checkpoint>)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let mut parts = rest
        .split(|b| *b == b' ' || *b == b'\n')
        .filter(|p| !p.is_empty());
    let head = serde_json::from_slice(parts.next()?).ok()?;
    let checkpoint = match parts.next() {
        None => None,
        Some(cp) => Some(serde_json::from_slice(cp).ok()?),
    };
    Some((head, checkpoint))
}

impl ChainFile {
    /// Opens (or creates, with an empty chain) the file at `path`. Returns the file, the
    /// header's head, the last record's (seq, hash), and what the comparison found.
    pub fn open(path: &Path) -> Result<(Self, Head, (u64, String), Finding), Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, "open", e))?;
        let mut len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        if len == 0 {
            crate::storage::write_new_file_header(
                &file,
                path,
                &header_bytes(&Head::genesis(), None)?,
            )
            .map_err(|e| io_err(path, "create", e))?;
            len = HEADER_LEN;
        }
        let mut header = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| io_err(path, "read header", e))?;
        let (head, checkpoint) =
            parse_header(&header).ok_or(Error::Corrupt("audit file header"))?;
        // After a retention purge the records start at the checkpoint's offset.
        let start = checkpoint.as_ref().map_or(HEADER_LEN, |c| c.offset);
        if start < HEADER_LEN || start > len {
            return Err(Error::Corrupt("audit file checkpoint"));
        }

        // Scan the records: the chain's end, the index, a torn tail.
        let mut reader = BufReader::with_capacity(
            1 << 20,
            At {
                file: &file,
                pos: start,
                end: len,
            },
        );
        let mut offset = start;
        let mut view = View {
            end: start,
            allocated: len.max(HEADER_LEN),
            head: head.clone(),
            index: Vec::new(),
            last_indexed: 0,
            start,
            checkpoint: checkpoint.clone(),
        };
        let mut last = checkpoint
            .as_ref()
            .map_or((0u64, AUDIT_GENESIS.to_owned()), |c| {
                (c.seq, c.hash.clone())
            });
        let mut hash_at_head = (head.seq == last.0).then(|| last.1.clone());
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err(path, "read", e))?;
            if n == 0 || line.first() == Some(&0) || line.last() != Some(&b'\n') {
                break;
            }
            let r: AuditRecord = serde_json::from_slice(&line[..n - 1])
                .map_err(|_| Error::Corrupt("audit record in the chain file"))?;
            view.note(r.seq, offset);
            offset += n as u64;
            if r.seq == head.seq {
                hash_at_head = Some(r.hash.clone());
            }
            last = (r.seq, r.hash);
        }
        view.end = offset;
        drop(reader);
        // Anything but zeros after the last complete line is a torn line: its batch was
        // never synced, so never acknowledged. Zero it.
        let mut tail =
            vec![0u8; usize::try_from(len.saturating_sub(offset).min(1 << 20)).unwrap_or(0)];
        file.read_exact_at(&mut tail, offset)
            .map_err(|e| io_err(path, "read tail", e))?;
        if let Some(last_nonzero) = tail.iter().rposition(|b| *b != 0) {
            tracing::warn!(
                path = %path.display(),
                bytes = last_nonzero + 1,
                "audit file: dropping a torn, unacknowledged tail"
            );
            file.write_all_at(&vec![0u8; last_nonzero + 1], offset)
                .and_then(|()| file.sync_data())
                .map_err(|e| io_err(path, "clear torn tail", e))?;
        }
        let finding = if hash_at_head.as_deref() != Some(head.hash.as_str()) || head.seq > last.0 {
            Finding::HeadMismatch
        } else if last.0 > head.seq {
            Finding::RecordsAfterHead(last.0 - head.seq)
        } else {
            Finding::Consistent
        };
        Ok((
            Self {
                file,
                path: path.to_owned(),
                view: RwLock::new(view),
                poisoned: std::sync::atomic::AtomicBool::new(false),
                flushes: std::sync::atomic::AtomicU64::new(0),
            },
            head,
            last,
            finding,
        ))
    }

    /// Appends a batch of record lines (`first_seq` is the first line's seq) and, with
    /// `sync`, makes them durable (without: written to the page cache, where a killed
    /// process cannot lose them; [`ChainFile::sync_or_poison`] flushes them later). On
    /// failure nothing is acknowledged and the partial batch is zeroed.
    pub fn append(&self, first_seq: u64, lines: &[u8], sync: bool) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Storage(crate::storage::StoreError::Engine {
                engine: "audit",
                source: "an earlier append to the audit file failed; restart to reopen it".into(),
            }));
        }
        // Tests inject a full disk ("return") or a slow one ("sleep(ms)") here (feature
        // `failpoints`); a failure poisons the file exactly as a real one does.
        fail::fail_point!("audit-append", |_| {
            self.poisoned.store(true, Ordering::SeqCst);
            Err(io_err(
                &self.path,
                "write",
                std::io::Error::from_raw_os_error(28),
            ))
        });
        let (end, allocated) = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            (view.end, view.allocated)
        };
        let new_end = end + lines.len() as u64;
        let mut new_allocated = allocated;
        if new_end > allocated {
            // Allocate ahead with real zeros (not a hole or an unwritten extent), synced
            // with the batch.
            new_allocated = new_end.div_ceil(GROW_STEP) * GROW_STEP;
            let zeros = vec![0u8; usize::try_from(new_allocated - new_end).unwrap_or(0)];
            if let Err(e) = self.file.write_all_at(&zeros, new_end) {
                self.poisoned.store(true, Ordering::SeqCst);
                return Err(io_err(&self.path, "allocate", e));
            }
        }
        let written = self.file.write_all_at(lines, end).and_then(|()| {
            if sync {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            self.poisoned.store(true, Ordering::SeqCst);
            // Best effort: leave no partial batch behind (a restart rescans anyway).
            let _ = self.file.write_all_at(&vec![0u8; lines.len()], end);
            return Err(io_err(&self.path, "append", e));
        }
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        view.note(first_seq, end);
        view.end = new_end;
        view.allocated = new_allocated;
        Ok(())
    }

    /// Makes `head` the current head (what readers see at once) and, if `persist`, rewrites
    /// the header with it. Not synced here: a later append's sync (or
    /// [`ChainFile::sync`]) carries it.
    pub fn set_head(&self, head: Head, persist: bool) -> Result<(), Error> {
        // Under the view's lock, so that a header never carries an older checkpoint than
        // one a purge already wrote (the records before it may be a hole by now).
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        if persist {
            self.file
                .write_all_at(&header_bytes(&head, view.checkpoint.as_ref())?, 0)
                .map_err(|e| io_err(&self.path, "write header", e))?;
        }
        view.head = head;
        Ok(())
    }

    /// The retention checkpoint, if records were purged.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .checkpoint
            .clone()
    }

    /// Purges every record up to `checkpoint.seq` (which must be a record of the chain,
    /// before its head): the header gets the checkpoint and the offset of the next record
    /// and is synced, then the purged bytes are released (a hole punched into the file).
    /// Returns the bytes released (0 where the filesystem cannot punch holes: the records
    /// are then unreadable through Keyhold but still take space).
    pub fn purge_through(&self, mut checkpoint: Checkpoint) -> Result<u64, Error> {
        let next = self.offset_after(checkpoint.seq, &checkpoint.hash)?;
        checkpoint.offset = next;
        {
            let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
            if checkpoint.seq > view.head.seq {
                return Err(Error::InvalidState("a checkpoint past the chain head"));
            }
            view.checkpoint = Some(checkpoint);
            view.start = next;
            view.index.retain(|(_, offset)| *offset >= next);
            self.file
                .write_all_at(&header_bytes(&view.head, view.checkpoint.as_ref())?, 0)
                .and_then(|()| self.file.sync_data())
                .map_err(|e| io_err(&self.path, "write checkpoint", e))?;
        }
        // Only once the header no longer needs them are the bytes released.
        let len = next - HEADER_LEN;
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            HEADER_LEN,
            len,
        ) {
            Ok(()) => Ok(len),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "audit file: purged records not released (the filesystem cannot punch holes)");
                Ok(0)
            }
        }
    }

    /// The offset just after record `seq`, which must have `hash`.
    fn offset_after(&self, seq: u64, hash: &str) -> Result<u64, Error> {
        let (start, end) = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            let i = view.index.partition_point(|(s, _)| *s <= seq);
            let start = if i == 0 {
                view.start
            } else {
                view.index[i - 1].1
            };
            (start, view.end)
        };
        let mut reader = BufReader::with_capacity(
            256 * 1024,
            At {
                file: &self.file,
                pos: start,
                end,
            },
        );
        let mut offset = start;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err(&self.path, "read", e))?;
            if n == 0 {
                return Err(Error::InvalidState("no such audit record to purge through"));
            }
            offset += n as u64;
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if leading_seq(text) == Some(seq) {
                let r: AuditRecord = serde_json::from_slice(text)
                    .map_err(|_| Error::Corrupt("audit record in the chain file"))?;
                if r.hash != hash {
                    return Err(Error::InvalidState("the record to purge through changed"));
                }
                return Ok(offset);
            }
        }
    }

    /// The current head.
    pub fn head(&self) -> Head {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .head
            .clone()
    }

    /// Flushes batches appended without a sync. A failure poisons the file, as a failed
    /// append does: after a failed `fdatasync` the kernel may have dropped the pages, so
    /// nothing more is acknowledged from this file.
    pub fn sync_or_poison(&self) -> Result<(), Error> {
        self.sync().inspect_err(|_| {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
        })
    }

    /// Syncs everything written (at close).
    pub fn sync(&self) -> Result<(), Error> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "sync", e))
    }

    /// Flushes since open.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records with `seq > after`, at most `limit`, in order.
    pub fn read(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, Error> {
        let (start, end) = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            let want = after.saturating_add(1);
            let i = view.index.partition_point(|(seq, _)| *seq <= want);
            let start = if i == 0 {
                view.start
            } else {
                view.index[i - 1].1
            };
            (start, view.end)
        };
        let mut out = Vec::new();
        if start >= end || limit == 0 {
            return Ok(out);
        }
        let mut bounded = BufReader::with_capacity(
            256 * 1024,
            At {
                file: &self.file,
                pos: start,
                end,
            },
        );
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = bounded
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err(&self.path, "read", e))?;
            if n == 0 {
                break;
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            // Records before the wanted one are skipped by their leading `{"seq":N,`
            // without parsing the rest.
            if leading_seq(text).is_some_and(|seq| seq <= after) {
                continue;
            }
            let r: AuditRecord = serde_json::from_slice(text)
                .map_err(|_| Error::Corrupt("audit record in the chain file"))?;
            if r.seq > after {
                out.push(r);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// The `seq` of a record line, read from its fixed prefix `{"seq":N,` (records are written
/// with `seq` first); `None` if the line does not start so (then it is parsed in full).
fn leading_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 || rest.get(digits) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Reads `[pos, end)` of a file with positioned reads (no shared file offset, so readers
/// never disturb each other or the writer).
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl View {
    fn note(&mut self, seq: u64, offset: u64) {
        if self.index.is_empty() || offset >= self.last_indexed + INDEX_STRIDE {
            self.index.push((seq, offset));
            self.last_indexed = offset;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_seq_reads_only_the_fixed_prefix() {
        assert_eq!(leading_seq(br#"{"seq":42,"time":"x"}"#), Some(42));
        assert_eq!(leading_seq(br#"{"seq":0,"#), Some(0));
        assert_eq!(
            leading_seq(br#"{"seq":18446744073709551615,"#),
            Some(u64::MAX)
        );
        assert_eq!(leading_seq(br#"{"seq":99999999999999999999,"#), None);
        assert_eq!(leading_seq(br#"{"seq":42}"#), None);
        assert_eq!(leading_seq(br#"{"seq":,"#), None);
        assert_eq!(leading_seq(br#"{"time":"x","seq":42,"#), None);
        assert_eq!(leading_seq(br#" {"seq":42,"#), None);
        assert_eq!(leading_seq(b""), None);
    }

    fn rec(seq: u64, prev: &str) -> AuditRecord {
        let mut r = AuditRecord {
            seq,
            time: "2026-11-22T00:00:00.000Z".into(),
            request_id: seq,
            identity: None,
            tenant: None,
            operation: "GET /v1/keys".into(),
            key: None,
            version: None,
            context_hash: None,
            outcome: "ok".into(),
            status: 200,
            latency_us: 1,
            attributes: None,
            prev: prev.into(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    fn lines(recs: &[AuditRecord]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in recs {
            out.extend_from_slice(&serde_json::to_vec(r).unwrap());
            out.push(b'\n');
        }
        out
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = AUDIT_GENESIS.to_owned();
        (1..=n)
            .map(|i| {
                let r = rec(i, &prev);
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn reads_land_on_the_right_record_across_index_strides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.audit");
        let recs = chain(12_000); // ~4 MiB: several index entries
        {
            let (f, ..) = ChainFile::open(&path).unwrap();
            for batch in recs.chunks(500) {
                f.append(batch[0].seq, &lines(batch), true).unwrap();
            }
            f.sync().unwrap();
            assert!(f.view.read().unwrap().index.len() >= 4);
        }
        // Written (index built on append) and reopened (index rebuilt by the scan).
        let (f, ..) = ChainFile::open(&path).unwrap();
        assert!(f.view.read().unwrap().index.len() >= 4);
        for after in [0, 1, 2999, 3000, 3001, 6543, 9999, 11_990, 11_999] {
            let got = f.read(after, 7).unwrap();
            let want: Vec<u64> = (after + 1..=12_000).take(7).collect();
            assert_eq!(
                got.iter().map(|r| r.seq).collect::<Vec<_>>(),
                want,
                "after {after}"
            );
            assert_eq!(
                got.first().map(|r| &r.hash),
                recs.get(after as usize).map(|r| &r.hash)
            );
        }
        assert!(f.read(12_000, 7).unwrap().is_empty());
    }

    #[test]
    fn a_purge_keeps_the_chain_from_its_checkpoint_and_releases_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.audit");
        let recs = chain(12_000);
        let head_of = |r: &AuditRecord| Head {
            seq: r.seq,
            hash: r.hash.clone(),
            mac: None,
        };
        let checkpoint = |r: &AuditRecord| Checkpoint {
            seq: r.seq,
            hash: r.hash.clone(),
            time: r.time.clone(),
            offset: 0,
            mac: Some("ab".repeat(32)),
        };
        {
            let (f, ..) = ChainFile::open(&path).unwrap();
            for batch in recs.chunks(500) {
                f.append(batch[0].seq, &lines(batch), true).unwrap();
            }
            f.set_head(head_of(&recs[11_999]), true).unwrap();
            // A record that is not the chain's is refused.
            let mut wrong = checkpoint(&recs[6_999]);
            wrong.hash = "0".repeat(64);
            assert!(f.purge_through(wrong).is_err());
            let released = f.purge_through(checkpoint(&recs[6_999])).unwrap();
            assert!(released > 2 << 20, "{released}");
            let got = f.read(0, 3).unwrap();
            assert_eq!(got[0].seq, 7_001);
            assert_eq!(f.read(9_000, 1).unwrap()[0].seq, 9_001);
            // A header written after the purge keeps the checkpoint.
            f.set_head(head_of(&recs[11_999]), true).unwrap();
            f.sync().unwrap();
        }
        let (f, head, last, finding) = ChainFile::open(&path).unwrap();
        assert_eq!(
            (head.seq, last.0, finding),
            (12_000, 12_000, Finding::Consistent)
        );
        assert_eq!(f.checkpoint().unwrap().seq, 7_000);
        assert_eq!(f.read(0, 1).unwrap()[0].seq, 7_001);
        assert_eq!(f.read(11_000, 1).unwrap()[0].seq, 11_001);
        // The purged bytes are a hole: the file takes less space than its length.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).unwrap();
        assert!(
            m.blocks() * 512 < m.len() - (2 << 20),
            "{} {}",
            m.blocks(),
            m.len()
        );
    }

    #[test]
    fn append_read_reopen_and_crash_states() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.audit");
        let recs = chain(3000);
        {
            let (f, head, last, finding) = ChainFile::open(&path).unwrap();
            assert_eq!(
                (head, last.0, finding),
                (Head::genesis(), 0, Finding::Consistent)
            );
            for batch in recs.chunks(100) {
                f.append(batch[0].seq, &lines(batch), true).unwrap();
                let h = batch.last().unwrap();
                let head = Head {
                    seq: h.seq,
                    hash: h.hash.clone(),
                    mac: None,
                };
                f.set_head(head, true).unwrap();
            }
            f.sync().unwrap();
            let got = f.read(1234, 1000).unwrap();
            assert_eq!(got.len(), 1000);
            assert_eq!(got[0].seq, 1235);
            assert_eq!(f.read(2990, 1000).unwrap().len(), 10);
            assert!(f.read(3000, 10).unwrap().is_empty());
            assert_eq!(f.read(0, 5).unwrap()[0].seq, 1);
        }
        let (f, head, last, finding) = ChainFile::open(&path).unwrap();
        assert_eq!(
            (head.seq, last.0, finding),
            (3000, 3000, Finding::Consistent)
        );
        assert_eq!(f.read(1999, 1).unwrap()[0].seq, 2000);
        let end = f.view.read().unwrap().end;
        assert_eq!(std::fs::metadata(&path).unwrap().len() % GROW_STEP, 0);
        drop(f);
        // A torn tail (a partial line in the zeros) is dropped.
        let extra = lines(&[rec(3001, &recs[2999].hash)]);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&extra[..extra.len() / 2], end).unwrap();
        let (f, _, last, finding) = ChainFile::open(&path).unwrap();
        assert_eq!((last.0, finding), (3000, Finding::Consistent));
        assert_eq!(f.view.read().unwrap().end, end);
        let mut after = vec![1u8; extra.len()];
        f.file.read_exact_at(&mut after, end).unwrap();
        assert!(after.iter().all(|b| *b == 0), "the torn line is zeroed");
        drop(f);
        // A synced batch whose header update was lost: records after the head.
        file.write_all_at(&extra, end).unwrap();
        let (_, _, last, finding) = ChainFile::open(&path).unwrap();
        assert_eq!((last.0, finding), (3001, Finding::RecordsAfterHead(1)));
        // Cut below the head: a mismatch.
        file.set_len(end - 500).unwrap();
        let (_, _, _, finding) = ChainFile::open(&path).unwrap();
        assert_eq!(finding, Finding::HeadMismatch);
    }
}
