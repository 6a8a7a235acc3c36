//! An optional DEK cache, off by default, for the seal side and the open side.
//!
//! **The trade-off.** Without a cache every seal asks the provider for a fresh DEK and
//! every open asks it to unwrap: one key-service round trip per object, and a DEK lives
//! only for one operation. With a cache, one DEK serves several messages and stays in
//! this process's memory for up to `max_age`, which:
//! - saves round trips (throughput, latency, key-service load), but
//! - widens the blast radius of one leaked DEK to every message it sealed (bounded by
//!   `max_messages` and `max_bytes`), and
//! - **delays revocation**: disabling or destroying the KEK at the key service stops new
//!   unwraps at once, but an open that hits the cache keeps working until the entry's
//!   `max_age` has passed. Keep `max_age` short (seconds to minutes) where that matters.
//!
//! Reusing one DEK for many messages is cryptographically safe here: each message derives
//! its own data key from the DEK and a fresh 256-bit salt (`FORMAT.md`), so segment nonces
//! never repeat under one key.
//!
//! Entries never serve past a limit: a use that would exceed `max_messages` or
//! `max_bytes`, or comes at or after `max_age`, evicts the entry and goes to the provider.
//! Seal entries are keyed by key name and context (a wrapped DEK is bound to its context);
//! they record the key version they hold. Open entries are keyed by the wrapped DEK, which
//! names key and version, and the context. Evicted DEKs are zeroized when the last
//! operation using them ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::format::KeyRef;
use crate::secret::Dek;
use crate::Error;

/// Limits of a [`DekCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Longest time an entry serves after its DEK was obtained.
    pub max_age: Duration,
    /// Most messages one cached DEK seals or opens.
    pub max_messages: u64,
    /// Most plaintext bytes one cached DEK seals or opens.
    pub max_bytes: u64,
    /// Most entries held (the oldest is evicted first).
    pub capacity: usize,
}

impl Default for CacheLimits {
    /// 60 s, 1 000 messages, 1 GiB, 1 000 entries.
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(60),
            max_messages: 1000,
            max_bytes: 1 << 30,
            capacity: 1000,
        }
    }
}

struct Entry {
    dek: Arc<Dek>,
    wrapped: Vec<u8>,
    key: KeyRef,
    created: Instant,
    messages: u64,
    bytes: u64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Slot {
    Seal { key: String, context: [u8; 32] },
    Open { wrapped: Vec<u8>, context: [u8; 32] },
}

type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// A bounded DEK cache; share it between operations with `Arc`.
pub struct DekCache {
    limits: CacheLimits,
    entries: Mutex<HashMap<Slot, Entry>>,
    clock: Clock,
}

impl std::fmt::Debug for DekCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekCache")
            .field("limits", &self.limits)
            .field("entries", &self.len())
            .finish()
    }
}

impl DekCache {
    /// A cache with `limits`.
    pub fn new(limits: CacheLimits) -> Result<Self, Error> {
        Self::with_clock(limits, Box::new(Instant::now))
    }

    /// A cache reading time from `clock` (tests).
    pub fn with_clock(limits: CacheLimits, clock: Clock) -> Result<Self, Error> {
        if limits.max_age.is_zero() || limits.max_messages == 0 || limits.capacity == 0 {
            return Err(Error::InvalidInput(
                "cache limits must allow at least one message, a non-zero age and one entry".into(),
            ));
        }
        Ok(Self {
            limits,
            entries: Mutex::new(HashMap::new()),
            clock,
        })
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn take(&self, slot: &Slot, len: u64) -> Option<(Arc<Dek>, Vec<u8>, KeyRef)> {
        let now = (self.clock)();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let e = entries.get_mut(slot)?;
        let fresh = now.saturating_duration_since(e.created) < self.limits.max_age;
        let within = e.messages < self.limits.max_messages
            && e.bytes.saturating_add(len) <= self.limits.max_bytes;
        if !(fresh && within) {
            entries.remove(slot);
            return None;
        }
        e.messages += 1;
        e.bytes += len;
        Some((e.dek.clone(), e.wrapped.clone(), e.key.clone()))
    }

    fn put(&self, slot: Slot, dek: Arc<Dek>, wrapped: Vec<u8>, key: KeyRef, len: u64) {
        if len > self.limits.max_bytes {
            return;
        }
        let now = (self.clock)();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        while entries.len() >= self.limits.capacity {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(s, _)| s.clone());
            match oldest {
                Some(s) => {
                    entries.remove(&s);
                }
                None => break,
            }
        }
        entries.insert(
            slot,
            Entry {
                dek,
                wrapped,
                key,
                created: now,
                messages: 1,
                bytes: len,
            },
        );
    }

    pub(crate) fn seal_take(
        &self,
        key: &str,
        context: &[u8; 32],
        len: u64,
    ) -> Option<(Arc<Dek>, Vec<u8>, KeyRef)> {
        self.take(
            &Slot::Seal {
                key: key.to_owned(),
                context: *context,
            },
            len,
        )
    }

    pub(crate) fn seal_put(
        &self,
        key: &str,
        context: &[u8; 32],
        dek: Arc<Dek>,
        wrapped: Vec<u8>,
        key_ref: KeyRef,
        len: u64,
    ) {
        self.put(
            Slot::Seal {
                key: key.to_owned(),
                context: *context,
            },
            dek,
            wrapped,
            key_ref,
            len,
        );
    }

    pub(crate) fn open_take(
        &self,
        wrapped: &[u8],
        context: &[u8; 32],
        len: u64,
    ) -> Option<Arc<Dek>> {
        self.take(
            &Slot::Open {
                wrapped: wrapped.to_vec(),
                context: *context,
            },
            len,
        )
        .map(|(dek, _, _)| dek)
    }

    pub(crate) fn open_put(
        &self,
        wrapped: &[u8],
        context: &[u8; 32],
        dek: Arc<Dek>,
        key: KeyRef,
        len: u64,
    ) {
        self.put(
            Slot::Open {
                wrapped: wrapped.to_vec(),
                context: *context,
            },
            dek,
            wrapped.to_vec(),
            key,
            len,
        );
    }
}
