//! The audit chain file: an append-only file of JSON lines with the MAC'd chain head in a
//! fixed header that is overwritten in place.
//!
//! ```text
//! offset 0    512-byte header: "KHAUDIT1\n" + head JSON {seq, hash, mac} + spaces + "\n"
//! offset 512  records, one JSON line each (seq 1, 2, ...), hash-chained
//! ```
//!
//! Why a file and not the key store: one group-commit batch costs one `write` and one
//! `fdatasync` here, against a B-tree copy-on-write transaction with two syncs in redb
//! (see `BENCHMARKS.md`, audit section).
//!
//! Ordering (what makes crashes and tampering distinguishable):
//! 1. the batch's records are written at the end and `fdatasync`ed — only then are the
//!    requests answered;
//! 2. the header is rewritten with the new head, and reaches the disk with the next
//!    batch's sync (or at close).
//!
//! So after a crash the header's head may lag the records by one batch (records after the
//! head: acknowledged, but not yet covered by the MAC — the server says so in the chain),
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

use crate::error::Error;

const MAGIC: &[u8] = b"KHAUDIT1\n";
/// Size of the header; records start here.
pub const HEADER_LEN: u64 = 512;
/// An index entry every this many bytes of records.
const INDEX_STRIDE: u64 = 64 * 1024;

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
    /// (first seq at or after this offset, offset), ascending.
    index: Vec<(u64, u64)>,
    /// Offset of the last index entry.
    last_indexed: u64,
}

/// The open chain file, shared by the writer and readers.
pub struct ChainFile {
    file: File,
    path: PathBuf,
    view: RwLock<View>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    tracing::error!(path = %path.display(), error = %e, "audit file: {what}");
    Error::Storage(crate::keystore::StoreError::Engine {
        engine: "audit",
        source: format!("{}: {what}: {e}", path.display()).into(),
    })
}

fn header_bytes(head: &Head) -> Result<Vec<u8>, Error> {
    let json = serde_json::to_vec(head).map_err(|_| Error::Internal("audit head"))?;
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

fn parse_header(bytes: &[u8]) -> Option<Head> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let json = rest.split(|b| *b == b' ' || *b == b'\n').next()?;
    serde_json::from_slice(json).ok()
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
        let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        if len == 0 {
            file.write_all_at(&header_bytes(&Head::genesis())?, 0)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err(path, "create", e))?;
            if let Some(dir) = path.parent() {
                // Make the new file's directory entry durable too.
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        let mut header = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| io_err(path, "read header", e))?;
        let head = parse_header(&header).ok_or(Error::Corrupt("audit file header"))?;

        // Scan the records: the chain's end, the index, a torn tail.
        let mut reader = BufReader::with_capacity(
            1 << 20,
            At {
                file: &file,
                pos: HEADER_LEN,
                end: len,
            },
        );
        let mut offset = HEADER_LEN;
        let mut view = View {
            end: HEADER_LEN,
            index: Vec::new(),
            last_indexed: 0,
        };
        let mut last = (0u64, AUDIT_GENESIS.to_owned());
        let mut hash_at_head = (head.seq == 0).then(|| AUDIT_GENESIS.to_owned());
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err(path, "read", e))?;
            if n == 0 || line.last() != Some(&b'\n') {
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
        if offset < len {
            // A torn last line: its batch was never synced, so never acknowledged.
            tracing::warn!(
                path = %path.display(),
                bytes = len - offset,
                "audit file: dropping a torn, unacknowledged tail"
            );
            file.set_len(offset)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err(path, "truncate torn tail", e))?;
        }
        drop(reader);
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
            },
            head,
            last,
            finding,
        ))
    }

    /// Appends a batch of record lines (`first_seq` is the first line's seq) and makes
    /// them durable. On failure nothing is acknowledged and the file is cut back.
    pub fn append(&self, first_seq: u64, lines: &[u8]) -> Result<(), Error> {
        let end = self.view.read().unwrap_or_else(PoisonError::into_inner).end;
        let written = self
            .file
            .write_all_at(lines, end)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: leave no partial batch for the next one to follow.
            let _ = self.file.set_len(end);
            return Err(io_err(&self.path, "append", e));
        }
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        view.note(first_seq, end);
        view.end = end + lines.len() as u64;
        Ok(())
    }

    /// Rewrites the header with `head`. Not synced here: the next append's sync (or
    /// [`ChainFile::sync`]) carries it.
    pub fn write_head(&self, head: &Head) -> Result<(), Error> {
        self.file
            .write_all_at(&header_bytes(head)?, 0)
            .map_err(|e| io_err(&self.path, "write header", e))
    }

    /// Syncs everything written (at close).
    pub fn sync(&self) -> Result<(), Error> {
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "sync", e))
    }

    /// The header's head as stored now.
    pub fn stored_head(&self) -> Result<Head, Error> {
        let mut header = vec![0u8; HEADER_LEN as usize];
        self.file
            .read_exact_at(&mut header, 0)
            .map_err(|e| io_err(&self.path, "read header", e))?;
        parse_header(&header).ok_or(Error::Corrupt("audit file header"))
    }

    /// Records with `seq > after`, at most `limit`, in order.
    pub fn read(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, Error> {
        let (start, end) = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            let want = after.saturating_add(1);
            let i = view.index.partition_point(|(seq, _)| *seq <= want);
            let start = if i == 0 {
                HEADER_LEN
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
                f.append(batch[0].seq, &lines(batch)).unwrap();
                let h = batch.last().unwrap();
                f.write_head(&Head {
                    seq: h.seq,
                    hash: h.hash.clone(),
                    mac: None,
                })
                .unwrap();
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
        drop(f);
        // A torn tail is dropped.
        let len = std::fs::metadata(&path).unwrap().len();
        let extra = lines(&[rec(3001, &recs[2999].hash)]);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&extra[..extra.len() / 2], len).unwrap();
        let (_, _, last, finding) = ChainFile::open(&path).unwrap();
        assert_eq!((last.0, finding), (3000, Finding::Consistent));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        // A synced batch whose header update was lost: records after the head.
        file.write_all_at(&extra, len).unwrap();
        let (_, _, last, finding) = ChainFile::open(&path).unwrap();
        assert_eq!((last.0, finding), (3001, Finding::RecordsAfterHead(1)));
        // Cut below the head: a mismatch.
        file.set_len(len - 500).unwrap();
        let (_, _, _, finding) = ChainFile::open(&path).unwrap();
        assert_eq!(finding, Finding::HeadMismatch);
    }
}
