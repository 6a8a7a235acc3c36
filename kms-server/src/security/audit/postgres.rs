//! The cluster's audit chain on a shared PostgreSQL store: one chain that every node
//! appends to, so a verifier reads one trail for the whole cluster.
//!
//! ```text
//! keyhold_audit       (seq bigint PRIMARY KEY, rec text)   one JSON line per record
//! keyhold_audit_head  one row: (seq, hash, mac)            the MAC'd chain head
//! ```
//!
//! A node's writer thread still collects every record waiting at that moment into one
//! batch (group commit), then appends it in one transaction that first locks the head row
//! (`SELECT ... FOR UPDATE`). The lock orders the nodes: each batch is chained to the tip
//! that the previous transaction left, whichever node wrote it. The transaction commits
//! durably (`synchronous_commit` on) before any request of the batch is answered, so the
//! lock is held across one WAL flush: the cluster appends one batch per flush, and the
//! batches grow with the load. (Tried and not kept: committing without the flush and
//! flushing after the lock is released. It needs a second transaction per batch, and on
//! this project's two-core machine, where PostgreSQL, the nodes and the load share the
//! CPUs, it measured no faster with one, two or three nodes: `BENCHMARKS.md`.) The records and the new
//! head commit together, so, unlike the file (whose header may lag its records after a
//! crash), the head here always names the last record; anything else found at start
//! (records past the head, a head naming another hash, a missing record) was done to the
//! tables outside Keyhold, and goes into the chain as an event and an `audit_chain` alert.
//!
//! Every node MACs the head with the same key (derived from the one master key the
//! cluster shares), so a cut-off tail or a rewritten head is found by any unsealed node.

use kms_client::api::AuditRecord;
use postgres::types::ToSql;

use super::file::{Finding, Head};
use crate::base::error::Error;
use crate::storage::{pg_err, PgPool, StoreError};

fn read_head(c: &mut impl postgres::GenericClient, lock: bool) -> Result<Head, StoreError> {
    let sql = if lock {
        "SELECT seq, hash, mac FROM keyhold_audit_head WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT seq, hash, mac FROM keyhold_audit_head WHERE id = 1"
    };
    let row = c
        .query_opt(sql, &[])
        .map_err(pg_err)?
        .ok_or_else(|| pg_err("the audit chain's head row is missing"))?;
    Ok(Head {
        seq: u64::try_from(row.get::<_, i64>(0)).map_err(pg_err)?,
        hash: row.get(1),
        mac: row.get(2),
    })
}

fn parse(rec: &str) -> Result<AuditRecord, StoreError> {
    serde_json::from_str(rec).map_err(|_| pg_err("an audit record in the database is not valid"))
}

/// What a batch's sealing step returns: the record lines (each ending in `\n`), the seq
/// of the first, and the new head.
pub struct Sealed {
    /// First record's seq.
    pub first_seq: u64,
    /// The records, one JSON line each, each ending in `\n`.
    pub lines: Vec<u8>,
    /// The head after the last record.
    pub head: Head,
}

/// The chain in the database, reached through the store's connection pool.
#[derive(Debug, Clone)]
pub struct PgChain {
    pool: PgPool,
}

impl PgChain {
    /// The chain of the store whose pool this is.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The head, and how it compares with the records.
    pub fn open(&self) -> Result<(Head, Finding), Error> {
        Ok(self.pool.call(|c| {
            let head = read_head(c, false)?;
            let row = c
                .query_opt(
                    "SELECT seq, rec, (SELECT count(*) FROM keyhold_audit) FROM keyhold_audit ORDER BY seq DESC LIMIT 1",
                    &[],
                )
                .map_err(pg_err)?;
            let consistent = match row {
                None => head.seq == 0,
                Some(row) => {
                    let (seq, rec, count): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
                    // The last record is the head's, and no seq is missing below it.
                    u64::try_from(seq).ok() == Some(head.seq)
                        && count == seq
                        && parse(&rec)?.hash == head.hash
                }
            };
            let finding = if consistent {
                Finding::Consistent
            } else {
                Finding::HeadMismatch
            };
            Ok((head, finding))
        })?)
    }

    /// Appends one batch: in one transaction, locks the head row, lets `seal` chain the
    /// batch to the tip it finds (seq, hash), inserts the records and moves the head.
    /// Returns the lines written (for the JSON-lines sink).
    pub fn append(
        &self,
        durable: bool,
        seal: impl FnOnce(u64, String) -> Result<Sealed, Error> + Send + 'static,
    ) -> Result<Vec<u8>, Error> {
        // Tests cut the chain's database here (feature `failpoints`): the batch fails as
        // it does when PostgreSQL is unreachable.
        fail::fail_point!("audit-append", |_| Err(Error::Storage(pg_err(
            "audit append failed (failpoint)"
        ))));
        Ok(self.pool.call(move |c| {
            let engine = pg_err;
            let mut tx = c.transaction().map_err(engine)?;
            if !durable {
                // Bounded lag: committed (visible, and kept by PostgreSQL through a kill
                // of this process) before the answer, flushed by PostgreSQL's WAL writer
                // within 3 x wal_writer_delay (200 ms by default).
                tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
                    .map_err(engine)?;
            }
            let tip = read_head(&mut tx, true)?;
            let sealed = seal(tip.seq, tip.hash).map_err(pg_err)?;
            let mut seqs: Vec<i64> = Vec::new();
            let mut recs: Vec<&str> = Vec::new();
            let text = std::str::from_utf8(&sealed.lines).map_err(pg_err)?;
            for (i, line) in text.split_terminator('\n').enumerate() {
                seqs.push(i64::try_from(sealed.first_seq + i as u64).map_err(pg_err)?);
                recs.push(line);
            }
            let seq = i64::try_from(sealed.head.seq).map_err(pg_err)?;
            let params: [&(dyn ToSql + Sync); 5] =
                [&seqs, &recs, &seq, &sealed.head.hash, &sealed.head.mac];
            // The records and the head in one statement (one round trip under the lock).
            tx.execute(
                "WITH ins AS (
                    INSERT INTO keyhold_audit (seq, rec) SELECT * FROM unnest($1::bigint[], $2::text[])
                 )
                 UPDATE keyhold_audit_head SET seq = $3, hash = $4, mac = $5 WHERE id = 1",
                &params,
            )
            .map_err(engine)?;
            tx.commit().map_err(engine)?;
            Ok(sealed.lines)
        })?)
    }

    /// The head, and the records with `seq > after` up to it (at most `limit`).
    pub fn read(&self, after: u64, limit: usize) -> Result<(Head, Vec<AuditRecord>), Error> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self.pool.call(move |c| {
            // The head first: a record at or below it committed with it or before.
            let head = read_head(c, false)?;
            let upto = i64::try_from(head.seq).map_err(pg_err)?;
            let rows = c
                .query(
                    "SELECT rec FROM keyhold_audit WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                    &[&after, &upto, &limit],
                )
                .map_err(pg_err)?;
            let records = rows
                .iter()
                .map(|r| parse(r.get(0)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((head, records))
        })?)
    }

    /// Copies a whole chain into this one, which must be empty, in one transaction:
    /// `next` gives the records page by page (`None` at the end), and `head` the head to
    /// leave (its MAC stays valid: every node and every store of one master key MACs
    /// with the same key).
    pub fn import(
        &self,
        mut next: impl FnMut(u64) -> Result<Vec<AuditRecord>, Error> + Send + 'static,
        head: Head,
    ) -> Result<u64, Error> {
        Ok(self.pool.call(move |c| {
            let engine = pg_err;
            let mut tx = c.transaction().map_err(engine)?;
            let tip = read_head(&mut tx, true)?;
            let any: Option<i64> = tx
                .query_one("SELECT max(seq) FROM keyhold_audit", &[])
                .map_err(engine)?
                .get(0);
            if tip.seq != 0 || any.is_some() {
                return Err(pg_err(
                    "the database already holds an audit chain: migrate into an empty store",
                ));
            }
            let mut after = 0u64;
            loop {
                let page = next(after).map_err(pg_err)?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                let seqs = page
                    .iter()
                    .map(|r| i64::try_from(r.seq).map_err(pg_err))
                    .collect::<Result<Vec<_>, _>>()?;
                let recs = page
                    .iter()
                    .map(|r| serde_json::to_string(r).map_err(pg_err))
                    .collect::<Result<Vec<_>, _>>()?;
                let params: [&(dyn ToSql + Sync); 2] = [&seqs, &recs];
                tx.execute(
                    "INSERT INTO keyhold_audit (seq, rec) SELECT * FROM unnest($1::bigint[], $2::text[])",
                    &params,
                )
                .map_err(engine)?;
            }
            if after != head.seq {
                return Err(pg_err(format!(
                    "the source chain ends at record {after} but its head names {}",
                    head.seq
                )));
            }
            let seq = i64::try_from(head.seq).map_err(pg_err)?;
            tx.execute(
                "UPDATE keyhold_audit_head SET seq = $1, hash = $2, mac = $3 WHERE id = 1",
                &[&seq, &head.hash, &head.mac],
            )
            .map_err(engine)?;
            tx.commit().map_err(engine)?;
            Ok(after)
        })?)
    }
}
