//! Per-version usage counters: wraps, unwraps, last use, and unwraps per day over the last
//! [`DAYS`] days (for the `min_decrypt_version` dry run). Lock-free on the request path;
//! written to the store by the key sweep, read back when a key is loaded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
        u
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

    /// Counts an unwrap at `now`.
    pub fn unwrap(&self, now: u64) {
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        let day = now / DAY;
        let slot = &self.days[(day % DAYS) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == day {
                cur + u64::from((cur & 0xffff_ffff) < u64::from(u32::MAX))
            } else {
                day << 32 | 1
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
            u.unwrap(t0);
        }
        u.unwrap(t0 + DAY);
        assert_eq!(u.unwraps_within(t0 + DAY, 1), 1);
        assert_eq!(u.unwraps_within(t0 + DAY, 2), 4);
        // A day DAYS later reuses the slot of t0 and forgets t0's three.
        u.unwrap(t0 + DAYS * DAY);
        assert_eq!(u.unwraps_within(t0 + DAYS * DAY, DAYS), 2);
        let r = u.record(t0 + DAYS * DAY);
        assert_eq!((r.wraps, r.unwraps, r.last_use), (1, 5, t0 + DAYS * DAY));
        assert!(u.take_dirty() && !u.take_dirty());
        let back = Usage::from_record(&r);
        assert_eq!(back.record(t0 + DAYS * DAY), r);
    }
}
