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
//!
//! An entry stands for one provider call with the same inputs, and is keyed by them:
//! the provider's [`ProviderId`] (so one cache shared by several key services never
//! crosses them; a provider without an id bypasses the cache), then for the seal side the
//! key name and context (the entry records the key version it holds), for the open side
//! the KEK named in the header, the wrapped DEK and the context. The open side stores a
//! DEK only after the envelope's key commitment verified it, so a wrong DEK from a faulty
//! or hostile provider is never served again from the cache.
//!
//! **Expiry.** Every lookup and insert first drops the entries that reached `max_age`
//! (oldest first, a cost proportional to what it removes). An idle cache keeps them until
//! its next operation: call [`DekCache::purge_expired`] from a timer to bound that too.
//! Evicted DEKs are zeroized when the last operation using them ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::format::KeyRef;
use crate::provider::ProviderId;
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
    /// Insertion number: with `created`, the entry's place in `Entries::by_age`.
    seq: u64,
    messages: u64,
    bytes: u64,
}

/// The inputs of the provider call an entry stands for.
#[derive(PartialEq, Eq, Hash)]
enum Slot {
    Seal {
        provider: ProviderId,
        key: String,
        context: [u8; 32],
    },
    Open {
        provider: ProviderId,
        key: KeyRef,
        wrapped: Vec<u8>,
        context: [u8; 32],
    },
}

/// The entries, indexed by slot and by age.
#[derive(Default)]
struct Entries {
    by_slot: HashMap<Arc<Slot>, Entry>,
    /// Every entry's slot under (creation time, insertion number): oldest first.
    by_age: BTreeMap<(Instant, u64), Arc<Slot>>,
    next_seq: u64,
}

impl Entries {
    fn remove(&mut self, slot: &Slot) {
        if let Some(e) = self.by_slot.remove(slot) {
            self.by_age.remove(&(e.created, e.seq));
        }
    }

    /// Drops the oldest entry; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        match self.by_age.pop_first() {
            Some((_, slot)) => {
                self.by_slot.remove(&*slot);
                true
            }
            None => false,
        }
    }

    /// Drops every entry that reached `max_age` at `now`.
    fn purge(&mut self, now: Instant, max_age: Duration) {
        while let Some(oldest) = self.by_age.first_entry() {
            let (created, _) = *oldest.key();
            if now.saturating_duration_since(created) < max_age {
                break;
            }
            let slot = oldest.remove();
            self.by_slot.remove(&*slot);
        }
    }

    fn insert(&mut self, slot: Slot, mut entry: Entry) {
        self.remove(&slot);
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let slot = Arc::new(slot);
        self.by_age.insert((entry.created, entry.seq), slot.clone());
        self.by_slot.insert(slot, entry);
    }

    fn clear(&mut self) {
        self.by_slot.clear();
        self.by_age.clear();
    }
}

type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// What an entry holds: the DEK, its wrapped form and the KEK (name and version).
pub(crate) type Held = (Arc<Dek>, Vec<u8>, KeyRef);

/// A bounded DEK cache; share it between operations with `Arc`.
pub struct DekCache {
    limits: CacheLimits,
    entries: Mutex<Entries>,
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
            entries: Mutex::new(Entries::default()),
            clock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Nothing panics while the lock is held (allocation failure aborts), so the
        // entries behind a poisoned lock are still consistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries held now, including expired ones that no operation has swept yet.
    pub fn len(&self) -> usize {
        self.lock().by_slot.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Drops the entries that reached `max_age`. Lookups and inserts do it anyway; call
    /// this from a timer so that an idle cache holds no expired DEK either.
    pub fn purge_expired(&self) {
        let now = (self.clock)();
        self.lock().purge(now, self.limits.max_age);
    }

    fn take(&self, slot: &Slot, len: u64) -> Option<Held> {
        let now = (self.clock)();
        let mut entries = self.lock();
        entries.purge(now, self.limits.max_age);
        let e = entries.by_slot.get_mut(slot)?;
        // Fresh: the purge left only entries younger than `max_age`.
        let within = e.messages < self.limits.max_messages
            && e.bytes.saturating_add(len) <= self.limits.max_bytes;
        if !within {
            entries.remove(slot);
            return None;
        }
        e.messages += 1;
        e.bytes += len;
        Some((e.dek.clone(), e.wrapped.clone(), e.key.clone()))
    }

    fn put(&self, slot: Slot, (dek, wrapped, key): Held, len: u64) {
        let now = (self.clock)();
        let mut entries = self.lock();
        entries.purge(now, self.limits.max_age);
        if len > self.limits.max_bytes {
            return;
        }
        entries.remove(&slot);
        while entries.by_slot.len() >= self.limits.capacity {
            if !entries.evict_oldest() {
                break;
            }
        }
        entries.insert(
            slot,
            Entry {
                dek,
                wrapped,
                key,
                created: now,
                seq: 0,
                messages: 1,
                bytes: len,
            },
        );
    }

    pub(crate) fn seal_take(
        &self,
        provider: &ProviderId,
        key: &str,
        context: &[u8; 32],
        len: u64,
    ) -> Option<Held> {
        let slot = Slot::Seal {
            provider: provider.clone(),
            key: key.to_owned(),
            context: *context,
        };
        self.take(&slot, len)
    }

    pub(crate) fn seal_put(
        &self,
        provider: &ProviderId,
        key: &str,
        context: &[u8; 32],
        held: Held,
        len: u64,
    ) {
        let slot = Slot::Seal {
            provider: provider.clone(),
            key: key.to_owned(),
            context: *context,
        };
        self.put(slot, held, len);
    }

    pub(crate) fn open_take(
        &self,
        provider: &ProviderId,
        key: &KeyRef,
        wrapped: &[u8],
        context: &[u8; 32],
        len: u64,
    ) -> Option<Arc<Dek>> {
        let slot = Slot::Open {
            provider: provider.clone(),
            key: key.clone(),
            wrapped: wrapped.to_vec(),
            context: *context,
        };
        self.take(&slot, len).map(|(dek, _, _)| dek)
    }

    /// Stores a DEK for the open side. Only for a DEK the key commitment verified.
    pub(crate) fn open_put(
        &self,
        provider: &ProviderId,
        key: &KeyRef,
        wrapped: &[u8],
        context: &[u8; 32],
        dek: Arc<Dek>,
        len: u64,
    ) {
        let slot = Slot::Open {
            provider: provider.clone(),
            key: key.clone(),
            wrapped: wrapped.to_vec(),
            context: *context,
        };
        self.put(slot, (dek, wrapped.to_vec(), key.clone()), len);
    }
}
