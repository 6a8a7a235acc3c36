//! Erasure keys on a store several nodes share (PostgreSQL), rooted in the sealing HSM.
//!
//! The embedded store overwrites an erasure key in place ([`super::file`]). A database
//! cannot: PostgreSQL keeps old row versions until vacuum and copies in its WAL, archives
//! and base backups, and the master key does not change when a key is destroyed. So here
//! the erasure keys are kept in the database **sealed under an epoch key**, and forgetting
//! happens in the one place that can forget on demand, the HSM:
//!
//! ```text
//! token key "<key_label>/erasure/<cluster>/<n>"   AES-256, in the HSM, never extractable
//!   └─ epoch key n (random, 256 bits)    keyhold_erasure_epochs.wrapped  (AES-GCM in the HSM)
//!        └─ erasure key of each KEK      keyhold_erasure.sealed          (seal_box, AAD = slot ‖ n)
//!             └─ HKDF(erasure key, master key) seals the KEK's versions (keyring)
//! ```
//!
//! - **Create**: a fresh erasure key is sealed under the current epoch and inserted, in a
//!   transaction holding the head row `FOR SHARE`, before the key record that names it is
//!   committed (a crash in between leaves an unused row, never a key without one).
//! - **Destroy** (the deletion sweep): the row is deleted and the head marked *dirty* in
//!   one transaction; then [`SharedErasure::rotate`] makes epoch n+1 (a new token key and
//!   a new epoch key), re-seals every remaining erasure key under it, and moves the head,
//!   all in one transaction under the head row's lock; then, once the old epoch has been
//!   retired for `retention`, [`SharedErasure::retire`] destroys its token key. From then
//!   on every copy of the old rows (old row versions, WAL, archives, backups) holds
//!   erasure keys under an epoch key that nothing can open.
//! - **Retention** (`[store] erasure_retention_secs`, default 7 days) is the operator's
//!   choice between two goods: a database backup from before a destruction sweep can be
//!   restored only while the old epoch's token key exists, and a destroyed key is final
//!   (unrecoverable from any backup, by anyone holding the master key) only once it is
//!   gone. 0: final at the sweep, and older database backups cannot be restored.
//!
//! Crashes: every step is one transaction or idempotent. A token key made for an epoch
//! whose transaction did not commit is reused by the next attempt (found by its label); a
//! dirty head is rotated by the next sweep, on any node; a retired epoch whose token key
//! survived a crash is destroyed by the next sweep.
//!
//! Nodes keep the current epoch key in memory for at most [`CACHE_FOR`] and drop it when
//! the epoch moves, so reading an erasure key costs one indexed row and a software AES-GCM
//! open; the HSM is used once per epoch and node, and at rotation.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use zeroize::Zeroizing;

use crate::base::error::Error;
use crate::crypto::seal::{Pkcs11Sealer, TokenSession};
use crate::crypto::secret::SecretKey;
use crate::storage::{pg_err, PgPool};

/// How long a node keeps an epoch key in memory before reading it again.
pub const CACHE_FOR: Duration = Duration::from_secs(60);

/// Default time a retired epoch's token key is kept (database backups from before a
/// destruction stay restorable that long).
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 86_400;

/// Label of an erasure key sealed under an epoch key.
const ROW_LABEL: &[u8] = b"keyhold/erasure-key/v1";
/// AAD prefix of an epoch key encrypted in the token.
const EPOCH_AAD: &[u8] = b"keyhold/erasure-epoch/v1\0";
/// Rows re-sealed per statement during a rotation.
const ROTATE_CHUNK: usize = 10_000;

fn row_aad(slot: i64, epoch: i64) -> [u8; 16] {
    let mut aad = [0u8; 16];
    aad[..8].copy_from_slice(&slot.to_be_bytes());
    aad[8..].copy_from_slice(&epoch.to_be_bytes());
    aad
}

fn epoch_aad(epoch: i64) -> Vec<u8> {
    let mut aad = EPOCH_AAD.to_vec();
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad
}

/// The cluster's erasure keys (see the module docs).
#[derive(Clone)]
pub struct SharedErasure {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    token: Pkcs11Sealer,
    retention_secs: u64,
    /// The epoch key last read: (epoch, key, when).
    cached: Mutex<Option<(i64, SecretKey, Instant)>>,
}

impl std::fmt::Debug for SharedErasure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedErasure")
            .field("retention_secs", &self.inner.retention_secs)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The token key label of `epoch` on this cluster, read through `c` (inside a
    /// transaction that chose the cluster's id, the id it chose). The id names the
    /// cluster's token keys, so clusters sharing a token and a key label never touch each
    /// other's epochs. Read each time, not cached: token keys are used rarely (an epoch
    /// key's unwrap about once a minute, rotations), and a cached id from a transaction
    /// that then failed would name keys no other node looks for.
    fn label(&self, c: &mut impl postgres::GenericClient, epoch: i64) -> Result<String, Error> {
        let cluster: String = c
            .query_one("SELECT cluster FROM keyhold_erasure_head WHERE id = 1", &[])
            .map_err(pg_err)?
            .get(0);
        if cluster.is_empty() {
            return Err(Error::InvalidState("the cluster has no erasure epoch yet"));
        }
        Ok(format!(
            "{}/erasure/{cluster}/{epoch}",
            self.token.key_label()
        ))
    }

    fn session(&self) -> Result<TokenSession, Error> {
        Ok(self.token.token_session()?)
    }

    fn remember(&self, epoch: i64, key: &SecretKey) {
        let copy = SecretKey::from_slice(key.expose_secret());
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) =
            copy.map(|k| (epoch, k, Instant::now()));
    }

    /// The epoch key of `epoch`: from memory, else unwrapped in the token. `None` when the
    /// epoch's token key is gone (destroyed after a rotation this reader raced).
    fn epoch_key(
        &self,
        c: &mut impl postgres::GenericClient,
        epoch: i64,
    ) -> Result<Option<SecretKey>, Error> {
        if let Some((e, key, at)) = self
            .cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if *e == epoch && at.elapsed() < CACHE_FOR {
                return Ok(SecretKey::from_slice(key.expose_secret()));
            }
        }
        let row = c
            .query_opt(
                "SELECT wrapped FROM keyhold_erasure_epochs WHERE epoch = $1 AND destroyed_at IS NULL",
                &[&epoch],
            )
            .map_err(pg_err)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let wrapped: Vec<u8> = row.get(0);
        let label = self.label(c, epoch)?;
        let Some(plain) = self
            .session()?
            .decrypt(&label, &epoch_aad(epoch), &wrapped)?
        else {
            return Ok(None);
        };
        let key = SecretKey::from_slice(&plain).ok_or(Error::Corrupt("erasure epoch key"))?;
        self.remember(epoch, &key);
        Ok(Some(key))
    }

    /// Makes epoch `epoch` inside `tx`: its token key (or the one a failed attempt left)
    /// and a fresh epoch key wrapped by it.
    fn new_epoch(
        &self,
        tx: &mut postgres::Transaction<'_>,
        epoch: i64,
        now: i64,
    ) -> Result<SecretKey, Error> {
        let label = self.label(tx, epoch)?;
        let session = self.session()?;
        session.ensure_key(&label)?;
        let key = SecretKey::generate()?;
        let wrapped = session.encrypt(&label, &epoch_aad(epoch), key.expose_secret())?;
        tx.execute(
            "INSERT INTO keyhold_erasure_epochs (epoch, wrapped, created_at) VALUES ($1, $2, $3)",
            &[&epoch, &wrapped, &now],
        )
        .map_err(pg_err)?;
        Ok(key)
    }
}

/// Runs `f` on a pooled connection; `f`'s own errors pass through.
fn call<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner, &mut postgres::Client) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let inner = inner.clone();
    inner
        .pool
        .clone()
        .call(move |c| Ok(f(&inner, c)))
        .map_err(Error::from)?
}

impl SharedErasure {
    /// Over the store's pool, with epoch keys in `token` (the sealing HSM). Touches
    /// neither until used: a node whose token is not reachable yet starts sealed, as it
    /// would on the embedded store.
    pub fn new(pool: PgPool, token: Pkcs11Sealer, retention_secs: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                token,
                retention_secs,
                cached: Mutex::new(None),
            }),
        }
    }

    /// Makes the first epoch when the cluster has none yet (the first key created).
    fn first_epoch(&self, now: u64) -> Result<(), Error> {
        let now = i64::try_from(now).map_err(|_| Error::Internal("clock out of range"))?;
        call(&self.inner, move |inner, c| {
            let mut tx = c.transaction().map_err(pg_err)?;
            let epoch: i64 = tx
                .query_one(
                    "SELECT epoch FROM keyhold_erasure_head WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .map_err(pg_err)?
                .get(0);
            if epoch == 0 {
                let mut id = [0u8; 8];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                    .map_err(|_| Error::Internal("random"))?;
                let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
                // (A crash before the commit leaves an unused token key under a name no
                // cluster will use again.)
                tx.execute(
                    "UPDATE keyhold_erasure_head SET cluster = $1 WHERE id = 1 AND cluster = ''",
                    &[&id],
                )
                .map_err(pg_err)?;
                let key = inner.new_epoch(&mut tx, 1, now)?;
                tx.execute(
                    "UPDATE keyhold_erasure_head SET epoch = 1 WHERE id = 1",
                    &[],
                )
                .map_err(pg_err)?;
                tx.commit().map_err(pg_err)?;
                inner.remember(1, &key);
                tracing::info!("erasure keys: the first epoch key is made in the token");
            }
            Ok(())
        })
    }

    /// Stores a fresh random erasure key under the current epoch, durably; returns its
    /// slot and the key.
    pub fn allocate(&self, now: u64) -> Result<(u64, Zeroizing<[u8; 32]>), Error> {
        let ek = Zeroizing::new(crate::crypto::aead::random_salt()?);
        let slot = self.import(&ek, now)?;
        Ok((slot, ek))
    }

    /// Stores the erasure key `ek` (one a key brought from an embedded store's erasure
    /// file already has) under the current epoch, durably; returns its slot.
    pub fn import(&self, ek: &Zeroizing<[u8; 32]>, now: u64) -> Result<u64, Error> {
        for _ in 0..2 {
            if let Some(slot) = self.try_allocate(ek)? {
                return Ok(slot);
            }
            self.first_epoch(now)?;
        }
        Err(Error::Internal("erasure: no first epoch"))
    }

    /// [`SharedErasure::allocate`] under the current epoch; `None` when there is none yet.
    fn try_allocate(&self, ek: &Zeroizing<[u8; 32]>) -> Result<Option<u64>, Error> {
        let key = ek.clone();
        call(&self.inner, move |inner, c| {
            let mut tx = c.transaction().map_err(pg_err)?;
            // FOR SHARE: no rotation can retire this epoch before the row is in.
            let epoch: i64 = tx
                .query_one(
                    "SELECT epoch FROM keyhold_erasure_head WHERE id = 1 FOR SHARE",
                    &[],
                )
                .map_err(pg_err)?
                .get(0);
            if epoch == 0 {
                return Ok(None);
            }
            let epoch_key = inner.epoch_key(&mut tx, epoch)?.ok_or(Error::InvalidState(
                "the token does not hold the current erasure epoch key",
            ))?;
            let slot: i64 = tx
                .query_one(
                    "SELECT nextval(pg_get_serial_sequence('keyhold_erasure', 'slot'))",
                    &[],
                )
                .map_err(pg_err)?
                .get(0);
            let sealed = crate::crypto::aead::seal_box(
                &epoch_key,
                ROW_LABEL,
                &row_aad(slot, epoch),
                &key[..],
            )?;
            tx.execute(
                "INSERT INTO keyhold_erasure (slot, epoch, sealed) VALUES ($1, $2, $3)",
                &[&slot, &epoch, &sealed],
            )
            .map_err(pg_err)?;
            tx.commit().map_err(pg_err)?;
            u64::try_from(slot)
                .map(Some)
                .map_err(|_| Error::Corrupt("erasure slot"))
        })
    }

    /// The erasure key in `slot`; `None` once erased.
    pub fn get(&self, slot: u64) -> Result<Option<Zeroizing<[u8; 32]>>, Error> {
        let slot = i64::try_from(slot).map_err(|_| Error::Corrupt("erasure slot"))?;
        call(&self.inner, move |inner, c| {
            // A rotation may commit, and retire the epoch this read found, between the
            // two reads: read the row again then.
            for _ in 0..3 {
                let Some(row) = c
                    .query_opt(
                        "SELECT epoch, sealed FROM keyhold_erasure WHERE slot = $1",
                        &[&slot],
                    )
                    .map_err(pg_err)?
                else {
                    return Ok(None);
                };
                let (epoch, sealed): (i64, Vec<u8>) = (row.get(0), row.get(1));
                let Some(epoch_key) = inner.epoch_key(c, epoch)? else {
                    continue;
                };
                let plain = crate::crypto::aead::open_box(
                    &epoch_key,
                    ROW_LABEL,
                    &row_aad(slot, epoch),
                    &sealed,
                )
                .map_err(|_| {
                    Error::Corrupt("an erasure key fails authentication under its epoch key")
                })?;
                let key: [u8; 32] = plain
                    .expose_secret()
                    .try_into()
                    .map_err(|_| Error::Corrupt("erasure key length"))?;
                return Ok(Some(Zeroizing::new(key)));
            }
            Err(Error::InvalidState(
                "the erasure epoch key of this key is not in the token",
            ))
        })
    }

    /// Deletes the erasure key in `slot` and marks the epoch for rotation (one
    /// transaction). Until [`SharedErasure::rotate`] and [`SharedErasure::retire`] have
    /// run, copies of the row remain readable with the current epoch key.
    pub fn erase(&self, slot: u64) -> Result<(), Error> {
        let slot = i64::try_from(slot).map_err(|_| Error::Corrupt("erasure slot"))?;
        call(&self.inner, move |_, c| {
            c.execute(
                "WITH gone AS (DELETE FROM keyhold_erasure WHERE slot = $1 RETURNING slot)
                 UPDATE keyhold_erasure_head SET dirty = true
                 WHERE id = 1 AND EXISTS (SELECT 1 FROM gone)",
                &[&slot],
            )
            .map_err(pg_err)?;
            Ok(())
        })
    }

    /// When a destruction happened since the last rotation: makes a new epoch, re-seals
    /// every erasure key under it and retires the old epoch, in one transaction under the
    /// head row's lock. Returns the new epoch, or `None` when there was nothing to do.
    pub fn rotate(&self, now: u64) -> Result<Option<u64>, Error> {
        let now = i64::try_from(now).map_err(|_| Error::Internal("clock out of range"))?;
        call(&self.inner, move |inner, c| {
            let mut tx = c.transaction().map_err(pg_err)?;
            let row = tx
                .query_one(
                    "SELECT epoch, dirty FROM keyhold_erasure_head WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .map_err(pg_err)?;
            let (old, dirty): (i64, bool) = (row.get(0), row.get(1));
            if !dirty {
                return Ok(None);
            }
            // Tests fail the rotation here (feature `failpoints`), as a crash or a lost
            // database would: the destruction is committed, the epoch still dirty.
            fail::fail_point!("erasure-rotate", |_| Err(Error::Storage(pg_err(
                "erasure rotation failed (failpoint)"
            ))));
            let new = old + 1;
            let new_key = inner.new_epoch(&mut tx, new, now)?;
            let rows = tx
                .query(
                    "SELECT slot, epoch, sealed FROM keyhold_erasure ORDER BY slot",
                    &[],
                )
                .map_err(pg_err)?;
            let mut old_keys: Vec<(i64, SecretKey)> = Vec::new();
            let mut slots: Vec<i64> = Vec::with_capacity(rows.len());
            let mut resealed: Vec<Vec<u8>> = Vec::with_capacity(rows.len());
            for row in &rows {
                let (slot, epoch, sealed): (i64, i64, Vec<u8>) =
                    (row.get(0), row.get(1), row.get(2));
                if !old_keys.iter().any(|(e, _)| *e == epoch) {
                    let key = inner.epoch_key(&mut tx, epoch)?.ok_or(Error::InvalidState(
                        "rotation: an erasure epoch key still in use is not in the token",
                    ))?;
                    old_keys.push((epoch, key));
                }
                let key = old_keys
                    .iter()
                    .find(|(e, _)| *e == epoch)
                    .map(|(_, k)| k)
                    .ok_or(Error::Internal("epoch key lookup"))?;
                let plain =
                    crate::crypto::aead::open_box(key, ROW_LABEL, &row_aad(slot, epoch), &sealed)
                        .map_err(|_| {
                        Error::Corrupt("an erasure key fails authentication under its epoch key")
                    })?;
                slots.push(slot);
                resealed.push(crate::crypto::aead::seal_box(
                    &new_key,
                    ROW_LABEL,
                    &row_aad(slot, new),
                    plain.expose_secret(),
                )?);
            }
            for (slots, sealed) in slots
                .chunks(ROTATE_CHUNK)
                .zip(resealed.chunks(ROTATE_CHUNK))
            {
                let params: [&(dyn ToSql + Sync); 3] = [&new, &slots, &sealed];
                tx.execute(
                    "UPDATE keyhold_erasure AS e SET epoch = $1, sealed = u.sealed
                     FROM unnest($2::bigint[], $3::bytea[]) AS u(slot, sealed)
                     WHERE e.slot = u.slot",
                    &params,
                )
                .map_err(pg_err)?;
            }
            tx.execute(
                "UPDATE keyhold_erasure_epochs SET retired_at = $2 WHERE epoch < $1 AND retired_at IS NULL",
                &[&new, &now],
            )
            .map_err(pg_err)?;
            tx.execute(
                "UPDATE keyhold_erasure_head SET epoch = $1, dirty = false WHERE id = 1",
                &[&new],
            )
            .map_err(pg_err)?;
            tx.commit().map_err(pg_err)?;
            inner.remember(new, &new_key);
            tracing::info!(
                epoch = new,
                keys = slots.len(),
                "erasure keys re-sealed under a new epoch"
            );
            Ok(Some(
                u64::try_from(new).map_err(|_| Error::Corrupt("erasure epoch"))?,
            ))
        })
    }

    /// Destroys, in the token, the key of every epoch retired at least the retention ago
    /// (`now` in Unix seconds). Returns the epochs destroyed now.
    pub fn retire(&self, now: u64) -> Result<Vec<u64>, Error> {
        let now = i64::try_from(now).map_err(|_| Error::Internal("clock out of range"))?;
        let due = now.saturating_sub(i64::try_from(self.inner.retention_secs).unwrap_or(i64::MAX));
        call(&self.inner, move |inner, c| {
            let epochs: Vec<i64> = c
                .query(
                    "SELECT epoch FROM keyhold_erasure_epochs
                     WHERE retired_at IS NOT NULL AND retired_at <= $1 AND destroyed_at IS NULL
                     ORDER BY epoch",
                    &[&due],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut destroyed = Vec::new();
            if epochs.is_empty() {
                return Ok(destroyed);
            }
            let session = inner.session()?;
            for epoch in epochs {
                // The token first: once it has forgotten, the row only records it.
                let label = inner.label(c, epoch)?;
                session.destroy_key(&label)?;
                c.execute(
                    "UPDATE keyhold_erasure_epochs SET destroyed_at = $2, wrapped = ''::bytea WHERE epoch = $1",
                    &[&epoch, &now],
                )
                .map_err(pg_err)?;
                let mut cached = inner.cached.lock().unwrap_or_else(PoisonError::into_inner);
                if cached.as_ref().is_some_and(|(e, _, _)| *e == epoch) {
                    *cached = None;
                }
                tracing::warn!(
                    epoch,
                    "erasure epoch key destroyed in the token: destructions before it are final"
                );
                destroyed.push(u64::try_from(epoch).map_err(|_| Error::Corrupt("erasure epoch"))?);
            }
            Ok(destroyed)
        })
    }

    /// Drops the epoch key from memory once it is older than [`CACHE_FOR`] (the sweep
    /// calls it, so an idle node does not keep a retired epoch's key).
    pub fn forget_stale(&self) {
        let mut cached = self
            .inner
            .cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cached
            .as_ref()
            .is_some_and(|(_, _, at)| at.elapsed() >= CACHE_FOR)
        {
            *cached = None;
        }
    }

    /// The current epoch, whether a rotation is pending, and the retained epochs.
    pub fn status(&self) -> Result<kms_client::api::ErasureStatus, Error> {
        let retention_secs = self.inner.retention_secs;
        call(&self.inner, move |_, c| {
            let row = c
                .query_one(
                    "SELECT h.epoch, h.dirty,
                        ARRAY(SELECT epoch FROM keyhold_erasure_epochs
                              WHERE retired_at IS NOT NULL AND destroyed_at IS NULL ORDER BY epoch)
                     FROM keyhold_erasure_head h WHERE h.id = 1",
                    &[],
                )
                .map_err(pg_err)?;
            let (epoch, dirty, retained): (i64, bool, Vec<i64>) =
                (row.get(0), row.get(1), row.get(2));
            Ok(kms_client::api::ErasureStatus {
                epoch: u64::try_from(epoch).unwrap_or(0),
                rotation_pending: dirty,
                retained_epochs: retained
                    .into_iter()
                    .filter_map(|e| u64::try_from(e).ok())
                    .collect(),
                retention_secs,
            })
        })
    }
}
