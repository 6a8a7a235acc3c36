//! Per-version usage counters: wraps, unwraps, last use, and unwraps per day over the last
//! [`DAYS`] days (for the `min_decrypt_version` dry run). Lock-free on the request path;
//! read from the store when a key is loaded, and added to the store by the key sweep:
//! each flush adds what was counted since the previous one ([`Usage::unflushed`],
//! [`UsageRecord::add`]) to what the store holds, so nodes sharing a store add up their
//! counts instead of overwriting each other's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// Days of per-day unwrap counts kept.
pub const DAYS: u64 = 32;
const DAY: u64 = 86_400;

/// Usage of one KEK version.
#[derive(Default)]
pub struct Usage {
    wraps: AtomicU64,
    unwraps: AtomicU64,
    last_use: AtomicU64,
    /// Slot `day % DAYS`: `day << 32 | count`.
    days: [AtomicU64; DAYS as usize],
    dirty: AtomicBool,
    /// The part of these counts the store already holds: the record loaded, then each
    /// record flushed.
    flushed: Mutex<UsageRecord>,
}

/// Usage as stored (and as read for reports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRecord {
    /// Wraps (datakey, wrap, rewrap) under this version.
    pub wraps: u64,
    /// Unwraps (and rewraps from) this version.
    pub unwraps: u64,
    /// Last use, Unix seconds; 0: never.
    pub last_use: u64,
    /// (day number since the epoch, unwraps that day), recent days only.
    #[serde(default)]
    pub days: Vec<(u64, u64)>,
}

impl UsageRecord {
    /// Adds `delta` (what a node counted since its last flush) to this record: sums,
    /// the later last use, per-day sums, days older than [`DAYS`] before `now` dropped.
    pub fn add(&mut self, delta: &UsageRecord, now: u64) {
        self.wraps = self.wraps.saturating_add(delta.wraps);
        self.unwraps = self.unwraps.saturating_add(delta.unwraps);
        self.last_use = self.last_use.max(delta.last_use);
        for (day, count) in &delta.days {
            match self.days.iter_mut().find(|(d, _)| d == day) {
                Some((_, c)) => *c = c.saturating_add(*count),
                None => self.days.push((*day, *count)),
            }
        }
        let today = now / DAY;
        self.days.retain(|(d, _)| today.saturating_sub(*d) < DAYS);
        self.days.sort_unstable();
    }
}

impl Usage {
    /// From a stored record.
    pub fn from_record(r: &UsageRecord) -> Self {
        let u = Self::default();
        u.wraps.store(r.wraps, Ordering::Relaxed);
        u.unwraps.store(r.unwraps, Ordering::Relaxed);
        u.last_use.store(r.last_use, Ordering::Relaxed);
        for (day, count) in &r.days {
            let count = (*count).min(u64::from(u32::MAX));
            u.days[(day % DAYS) as usize].store(day << 32 | count, Ordering::Relaxed);
        }
        *u.flushed.lock().unwrap_or_else(PoisonError::into_inner) = r.clone();
        u
    }

    /// The counters now, and what was counted since the last flush (to add to the stored
    /// record); once that is stored, [`Usage::mark_flushed`] with the first.
    pub fn unflushed(&self, now: u64) -> (UsageRecord, UsageRecord) {
        let current = self.record(now);
        let base = self.flushed.lock().unwrap_or_else(PoisonError::into_inner);
        let days = current
            .days
            .iter()
            .filter_map(|(day, count)| {
                let before = base
                    .days
                    .iter()
                    .find(|(d, _)| d == day)
                    .map_or(0, |(_, c)| *c);
                let added = count.saturating_sub(before);
                (added > 0).then_some((*day, added))
            })
            .collect();
        let delta = UsageRecord {
            wraps: current.wraps.saturating_sub(base.wraps),
            unwraps: current.unwraps.saturating_sub(base.unwraps),
            last_use: current.last_use,
            days,
        };
        drop(base);
        (current, delta)
    }

    /// Records that the store now holds `current` (from [`Usage::unflushed`]).
    pub fn mark_flushed(&self, current: UsageRecord) {
        *self.flushed.lock().unwrap_or_else(PoisonError::into_inner) = current;
    }

    /// Marks the counters changed (a flush that failed: try again next time).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn touch(&self, now: u64) {
        // Read before writing: the counters are shared by every worker, and a write to a
        // line that already holds the value still takes it from the other cores.
        if self.last_use.load(Ordering::Relaxed) < now {
            self.last_use.fetch_max(now, Ordering::Relaxed);
        }
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Counts a wrap at `now`.
    pub fn wrap(&self, now: u64) {
        self.wraps.fetch_add(1, Ordering::Relaxed);
        self.touch(now);
    }

    /// Counts `n` unwraps at `now` (a request's unwraps under this version, counted once:
    /// the counters are shared by every worker, and each write takes their cache line).
    pub fn unwraps_at(&self, now: u64, n: u32) {
        if n == 0 {
            return;
        }
        self.unwraps.fetch_add(u64::from(n), Ordering::Relaxed);
        let day = now / DAY;
        let slot = &self.days[(day % DAYS) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == day {
                // The day's count saturates at u32::MAX.
                let count = (cur & 0xffff_ffff).saturating_add(u64::from(n));
                day << 32 | count.min(u64::from(u32::MAX))
            } else {
                day << 32 | u64::from(n)
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
        self.touch(now);
    }

    /// Unwraps during the `days` days up to and including the day of `now`.
    pub fn unwraps_within(&self, now: u64, days: u64) -> u64 {
        let today = now / DAY;
        let first = today.saturating_sub(days.saturating_sub(1));
        self.days
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| (first..=today).contains(&(v >> 32)) && *v != 0)
            .map(|v| v & 0xffff_ffff)
            .sum()
    }

    /// (wraps, unwraps, last use): the totals, without the per-day counts.
    pub fn totals(&self) -> (u64, u64, u64) {
        (
            self.wraps.load(Ordering::Relaxed),
            self.unwraps.load(Ordering::Relaxed),
            self.last_use.load(Ordering::Relaxed),
        )
    }

    /// The counters now, and whether they changed since the last [`Usage::take_dirty`].
    pub fn record(&self, now: u64) -> UsageRecord {
        let today = now / DAY;
        let mut days: Vec<(u64, u64)> = self
            .days
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| *v != 0 && today.saturating_sub(v >> 32) < DAYS)
            .map(|v| (v >> 32, v & 0xffff_ffff))
            .collect();
        days.sort_unstable();
        UsageRecord {
            wraps: self.wraps.load(Ordering::Relaxed),
            unwraps: self.unwraps.load(Ordering::Relaxed),
            last_use: self.last_use.load(Ordering::Relaxed),
            days,
        }
    }

    /// Whether it changed since the last [`Usage::take_dirty`] (leaves the mark).
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Whether it changed since the last call (and clears the mark).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_days_and_round_trips() {
        let u = Usage::default();
        let t0 = 1_000 * DAY;
        u.wrap(t0);
        for _ in 0..3 {
            u.unwraps_at(t0, 1);
        }
        u.unwraps_at(t0 + DAY, 1);
        assert_eq!(u.unwraps_within(t0 + DAY, 1), 1);
        assert_eq!(u.unwraps_within(t0 + DAY, 2), 4);
        // A day DAYS later reuses the slot of t0 and forgets t0's three.
        u.unwraps_at(t0 + DAYS * DAY, 1);
        assert_eq!(u.unwraps_within(t0 + DAYS * DAY, DAYS), 2);
        let r = u.record(t0 + DAYS * DAY);
        assert_eq!((r.wraps, r.unwraps, r.last_use), (1, 5, t0 + DAYS * DAY));
        assert!(u.take_dirty() && !u.take_dirty());
        let back = Usage::from_record(&r);
        assert_eq!(back.record(t0 + DAYS * DAY), r);
    }

    #[test]
    fn counts_several_unwraps_at_once_and_saturates_the_day() {
        let u = Usage::default();
        let t0 = 1_000 * DAY;
        u.unwraps_at(t0, 0);
        assert!(!u.take_dirty());
        u.unwraps_at(t0, 5);
        u.unwraps_at(t0, 1);
        assert_eq!(u.unwraps_within(t0, 1), 6);
        assert_eq!(u.totals(), (0, 6, t0));
        u.unwraps_at(t0, u32::MAX);
        assert_eq!(u.unwraps_within(t0, 1), u64::from(u32::MAX));
        // The next day starts from the batch's count.
        u.unwraps_at(t0 + DAY, 7);
        assert_eq!(u.unwraps_within(t0 + DAY, 1), 7);
        assert_eq!(u.totals().1, 6 + u64::from(u32::MAX) + 7);
    }

    /// Two nodes load the same stored record, count, and flush in turn: the store ends up
    /// with the sum of both, per day too; a second flush adds only what came since.
    #[test]
    fn flushes_from_two_nodes_add_up() {
        let t0 = 1_000 * DAY;
        let mut stored = UsageRecord::default();
        let a = Usage::from_record(&stored);
        let b = Usage::from_record(&stored);
        for _ in 0..3 {
            a.unwraps_at(t0, 1);
        }
        a.wrap(t0);
        b.unwraps_at(t0, 1);
        b.unwraps_at(t0 + DAY, 1);
        for node in [&a, &b] {
            let (current, delta) = node.unflushed(t0 + DAY);
            stored.add(&delta, t0 + DAY);
            node.mark_flushed(current);
        }
        assert_eq!(
            (stored.wraps, stored.unwraps, stored.last_use),
            (1, 5, t0 + DAY)
        );
        assert_eq!(stored.days, vec![(1000, 4), (1001, 1)]);
        // Nothing new: nothing to add.
        let (_, delta) = a.unflushed(t0 + DAY);
        assert_eq!((delta.wraps, delta.unwraps), (0, 0));
        assert!(delta.days.is_empty());
        a.unwraps_at(t0 + DAY, 1);
        let (_, delta) = a.unflushed(t0 + DAY);
        stored.add(&delta, t0 + DAY);
        assert_eq!(stored.unwraps, 6);
        assert_eq!(stored.days, vec![(1000, 4), (1001, 2)]);
        assert_eq!(
            Usage::from_record(&stored).unwraps_within(t0 + DAY, 2),
            6,
            "what a dry run reads back"
        );
        // Days past the window fall out of the stored record.
        stored.add(&UsageRecord::default(), t0 + (DAYS + 1) * DAY);
        assert!(stored.days.is_empty());
    }
}
