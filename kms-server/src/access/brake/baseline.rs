//! The brake's learned baseline (`[brake.baseline]`, `docs/brake.md`): what an identity, or a
//! key, normally does at each hour of the day, and when it does much more.
//!
//! Each subject keeps, for each of the 24 hours of the day (UTC), the peak of three things
//! seen at that hour: unwraps in one minute, distinct keys in the hour (identities), and
//! distinct encryption contexts in the hour. An hour folds into its slot when it ends
//! (`peak = max(seen, peak × 0.95)`: a peak fades by half in about two weeks of quieter
//! days), unless it deviated — what the brake flagged is never learned as normal.
//!
//! For `learn_days` from its first unwrap, a subject is only learned. After that, an unwrap
//! *deviates* when, at this hour, the subject goes past `factor` × the busiest of the
//! slots of this hour and the two beside it (a schedule that shifts by an hour is still
//! normal) or past a floor (`min_per_minute`, `min_keys_per_hour`,
//! `min_contexts_per_hour`), whichever is higher. An hour never active during learning
//! has peaks of zero: there, only the floors are allowed.
//!
//! Distinct keys and contexts are counted in constant memory (a 64-register HyperLogLog,
//! about 13 % error, hashed with a per-process random key): a subject costs a few hundred
//! bytes however much it does.

use std::hash::{BuildHasher, Hash};

/// `[brake.baseline]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSettings {
    /// Days a subject's use is only learned, from its first unwrap (1 to 90; 7).
    #[serde(default = "default_learn_days")]
    pub learn_days: u32,
    /// How far above the learned peak a deviation begins (1.5 to 100; 3).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Unwraps in one minute always allowed (30).
    #[serde(default = "default_min_per_minute")]
    pub min_per_minute: u32,
    /// Distinct keys in one hour always allowed to an identity (5).
    #[serde(default = "default_min_keys")]
    pub min_keys_per_hour: u32,
    /// Distinct encryption contexts in one hour always allowed (1 000).
    #[serde(default = "default_min_contexts")]
    pub min_contexts_per_hour: u32,
}

fn default_learn_days() -> u32 {
    7
}
fn default_factor() -> f64 {
    3.0
}
fn default_min_per_minute() -> u32 {
    30
}
fn default_min_keys() -> u32 {
    5
}
fn default_min_contexts() -> u32 {
    1000
}

impl Default for BaselineSettings {
    fn default() -> Self {
        Self {
            learn_days: default_learn_days(),
            factor: default_factor(),
            min_per_minute: default_min_per_minute(),
            min_keys_per_hour: default_min_keys(),
            min_contexts_per_hour: default_min_contexts(),
        }
    }
}

impl BaselineSettings {
    /// Checks the ranges.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=90).contains(&self.learn_days) {
            return Err("brake.baseline.learn_days must be 1 to 90".into());
        }
        if !(1.5..=100.0).contains(&self.factor) {
            return Err("brake.baseline.factor must be 1.5 to 100".into());
        }
        if self.min_per_minute == 0
            || self.min_keys_per_hour == 0
            || self.min_contexts_per_hour == 0
        {
            return Err("brake.baseline: the min_ floors must be at least 1".into());
        }
        Ok(())
    }
}

/// What went past the learned use, with what was seen and the usual peak at that hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deviation {
    /// Unwraps in the current minute.
    Rate {
        /// Seen.
        seen: u64,
        /// Allowed (factor × usual, or the floor).
        allowed: u64,
    },
    /// Distinct keys in the current hour (an identity).
    Keys {
        /// Seen (estimated).
        seen: u64,
        /// Allowed.
        allowed: u64,
    },
    /// Distinct contexts in the current hour.
    Contexts {
        /// Seen (estimated).
        seen: u64,
        /// Allowed.
        allowed: u64,
    },
}

impl std::fmt::Display for Deviation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deviation::Rate { seen, allowed } => write!(
                f,
                "{seen} unwraps in a minute, past its learned use at this hour ({allowed})"
            ),
            Deviation::Keys { seen, allowed } => write!(
                f,
                "about {seen} distinct keys in an hour, past its learned use at this hour ({allowed})"
            ),
            Deviation::Contexts { seen, allowed } => write!(
                f,
                "about {seen} distinct contexts in an hour, past its learned use at this hour ({allowed})"
            ),
        }
    }
}

/// Distinct items, estimated: a HyperLogLog of 64 registers.
#[derive(Clone, Debug)]
pub(super) struct Distinct {
    registers: [u8; 64],
    estimate: u64,
}

impl Distinct {
    pub(super) const fn new() -> Self {
        Self {
            registers: [0; 64],
            estimate: 0,
        }
    }

    /// Adds an item (its hash) and updates the estimate.
    fn add(&mut self, hash: u64) {
        if self.insert(hash) {
            self.estimate = self.compute();
        }
    }

    /// Adds an item (its hash) without updating the estimate (a request's own count,
    /// absorbed later): whether a register changed.
    pub(super) fn insert(&mut self, hash: u64) -> bool {
        let j = (hash >> 58) as usize;
        // The rank of the remaining 58 bits: leading zeros + 1.
        let rank = ((hash << 6).leading_zeros().min(58) + 1) as u8;
        let changed = rank > self.registers[j];
        if changed {
            self.registers[j] = rank;
        }
        changed
    }

    /// Whether nothing was inserted.
    pub(super) fn is_empty(&self) -> bool {
        self.registers.iter().all(|&r| r == 0)
    }

    /// Adds what `other` saw.
    fn absorb(&mut self, other: &Distinct) {
        if other.is_empty() {
            return;
        }
        for (r, o) in self.registers.iter_mut().zip(other.registers) {
            *r = (*r).max(o);
        }
        self.estimate = self.compute();
    }

    fn compute(&self) -> u64 {
        const M: f64 = 64.0;
        // 2^-r, exactly, from the exponent bits (r is at most 59): no exp2 per register.
        let sum: f64 = self
            .registers
            .iter()
            .map(|&r| f64::from_bits((1023 - u64::from(r)) << 52))
            .sum();
        let raw = 0.709 * M * M / sum;
        let zeros = self.registers.iter().filter(|&&r| r == 0).count();
        let e = if raw <= 2.5 * M && zeros > 0 {
            M * (M / zeros as f64).ln()
        } else {
            raw
        };
        e.round() as u64
    }
}

/// The peaks learned for one hour of the day.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    rate: f32,
    keys: f32,
    contexts: f32,
}

/// Slots: the hours of the day, UTC.
const SLOTS: u64 = 24;

/// A slot's peak keeps this much of itself each day its hour is quieter.
const DECAY: f32 = 0.95;

/// Hashes keys and contexts for counting (a random key per process).
pub(super) struct Hashing(std::collections::hash_map::RandomState);

impl Hashing {
    pub(super) fn new() -> Self {
        Self(std::collections::hash_map::RandomState::new())
    }

    pub(super) fn hash(&self, item: impl Hash) -> u64 {
        self.0.hash_one(item)
    }
}

/// One subject's learned use and its current minute and hour.
#[derive(Clone, Debug)]
pub(super) struct Profile {
    /// Unix seconds of its first unwrap.
    first: u64,
    slots: [Slot; SLOTS as usize],
    /// The current hour (Unix hours) and what it has seen.
    hour: u64,
    peak_minute: u64,
    /// The busiest of the hour's minutes before the current one.
    peak_before: u64,
    keys: Distinct,
    contexts: Distinct,
    /// The hour deviated (so it is not learned, and alerted once).
    deviated: bool,
    /// The current minute (Unix minutes) and its unwraps.
    minute: u64,
    per_minute: u64,
}

impl Profile {
    pub(super) fn new(wall: u64) -> Self {
        Self {
            first: wall,
            slots: [Slot::default(); SLOTS as usize],
            hour: wall / 3600,
            peak_minute: 0,
            peak_before: 0,
            keys: Distinct::new(),
            contexts: Distinct::new(),
            deviated: false,
            minute: wall / 60,
            per_minute: 0,
        }
    }

    /// Ends the current hour: learned into its slot unless it deviated.
    fn fold(&mut self) {
        if !self.deviated {
            let slot = &mut self.slots[(self.hour % SLOTS) as usize];
            let learn = |peak: f32, seen: u64| (seen as f32).max(peak * DECAY);
            slot.rate = learn(slot.rate, self.peak_minute);
            slot.keys = learn(slot.keys, self.keys.estimate);
            slot.contexts = learn(slot.contexts, self.contexts.estimate);
        }
        self.peak_minute = 0;
        self.peak_before = 0;
        self.keys = Distinct::new();
        self.contexts = Distinct::new();
        self.deviated = false;
    }

    /// The usual peaks at hour `hour`: the busiest of its slot and the two beside it.
    fn usual(&self, hour: u64) -> Slot {
        [hour + SLOTS - 1, hour, hour + 1]
            .iter()
            .map(|h| self.slots[(h % SLOTS) as usize])
            .fold(Slot::default(), |a, s| Slot {
                rate: a.rate.max(s.rate),
                keys: a.keys.max(s.keys),
                contexts: a.contexts.max(s.contexts),
            })
    }

    /// After an operator's release: the current minute and hour start again from nothing
    /// (what was seen led to the hold and was judged), and the hour is still not learned.
    pub(super) fn forgive(&mut self) {
        self.per_minute = 0;
        self.peak_minute = 0;
        self.peak_before = 0;
        self.keys = Distinct::new();
        self.contexts = Distinct::new();
        self.deviated = true;
    }

    /// Adds the keys and contexts a request counted apart (`keys`, `contexts`: those of
    /// the unwraps of its lease) to the current hour's, if it is still that hour.
    pub(super) fn absorb(&mut self, wall: u64, keys: &Distinct, contexts: &Distinct) {
        if wall / 3600 == self.hour {
            self.keys.absorb(keys);
            self.contexts.absorb(contexts);
        }
    }

    /// Takes back `n` unwraps counted at `wall` but not made (a lease's rest).
    pub(super) fn untally(&mut self, wall: u64, n: u64) {
        if wall / 60 == self.minute {
            self.per_minute = self.per_minute.saturating_sub(n);
            self.peak_minute = self.peak_before.max(self.per_minute);
        }
    }

    /// How many unwraps at `wall` stay within the learned rate of this minute (no limit
    /// while learning): a lease takes no more, so it never crosses the line by itself.
    pub(super) fn room(&self, s: &BaselineSettings, wall: u64) -> u64 {
        if wall < self.first + u64::from(s.learn_days) * 86_400 {
            return u64::MAX;
        }
        let seen = if wall / 60 == self.minute {
            self.per_minute
        } else {
            0
        };
        let peak = self.usual(wall / 3600).rate;
        let allowed = ((s.factor * f64::from(peak)).ceil() as u64).max(s.min_per_minute.into());
        allowed.saturating_sub(seen)
    }

    /// Counts `n` unwraps at `wall` (Unix seconds), one of key `key` (hashed; for an
    /// identity) under context `context` (hashed): the deviation they make, if any, and
    /// whether it is the first of its hour (to alert once).
    pub(super) fn tally(
        &mut self,
        s: &BaselineSettings,
        wall: u64,
        key: Option<u64>,
        context: Option<u64>,
        n: u64,
    ) -> Option<(Deviation, bool)> {
        let hour = wall / 3600;
        if hour > self.hour {
            self.fold();
            self.hour = hour;
        }
        if wall / 60 != self.minute {
            self.minute = wall / 60;
            self.per_minute = 0;
            self.peak_before = self.peak_minute;
        }
        self.per_minute += n;
        self.peak_minute = self.peak_minute.max(self.per_minute);
        if let Some(k) = key {
            self.keys.add(k);
        }
        if let Some(c) = context {
            self.contexts.add(c);
        }
        if wall < self.first + u64::from(s.learn_days) * 86_400 {
            return None;
        }
        let usual = self.usual(hour);
        let allowed =
            |peak: f32, floor: u32| ((s.factor * f64::from(peak)).ceil() as u64).max(floor.into());
        let rate = allowed(usual.rate, s.min_per_minute);
        let keys = allowed(usual.keys, s.min_keys_per_hour);
        let contexts = allowed(usual.contexts, s.min_contexts_per_hour);
        let deviation = if self.per_minute > rate {
            Deviation::Rate {
                seen: self.per_minute,
                allowed: rate,
            }
        } else if key.is_some() && self.keys.estimate > keys {
            Deviation::Keys {
                seen: self.keys.estimate,
                allowed: keys,
            }
        } else if self.contexts.estimate > contexts {
            Deviation::Contexts {
                seen: self.contexts.estimate,
                allowed: contexts,
            }
        } else {
            return None;
        };
        let first = !std::mem::replace(&mut self.deviated, true);
        Some((deviation, first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn settings() -> BaselineSettings {
        BaselineSettings {
            learn_days: 2,
            ..BaselineSettings::default()
        }
    }

    /// One hashing for a test's keys (a key hashes the same throughout).
    fn hashing() -> &'static Hashing {
        static H: std::sync::OnceLock<Hashing> = std::sync::OnceLock::new();
        H.get_or_init(Hashing::new)
    }

    /// `n` unwraps spread over minute `minute` of hour `hour` of day `day`, over `keys`
    /// keys, each under its own context.
    fn minute(
        p: &mut Profile,
        s: &BaselineSettings,
        day: u64,
        hour: u64,
        minute: u64,
        n: u64,
        keys: u64,
    ) -> Vec<Deviation> {
        let h = hashing();
        (0..n)
            .filter_map(|i| {
                let t = day * DAY + hour * 3600 + minute * 60 + i * 60 / n.max(1);
                p.tally(
                    s,
                    t,
                    Some(h.hash(i % keys)),
                    Some(h.hash((day, hour, minute, i))),
                    1,
                )
                .map(|(d, _)| d)
            })
            .collect()
    }

    #[test]
    fn learned_hours_allow_their_peak_and_stop_what_goes_far_past_it() {
        let s = settings();
        let mut p = Profile::new(0);
        // Two days of 200 a minute at 09:00-10:00, nothing else.
        for day in 0..2 {
            for m in 0..60 {
                assert!(minute(&mut p, &s, day, 9, m, 200, 3).is_empty());
            }
        }
        // Day 3: the same, and 2.5× the peak, are normal at 09:00 and 10:00 (beside it)...
        assert!(minute(&mut p, &s, 2, 9, 0, 200, 3).is_empty());
        // Many keys at once at a learned hour: the keys deviate (3 learned: 9 allowed).
        let d = minute(&mut p, &s, 2, 9, 1, 60, 60);
        assert!(matches!(d[0], Deviation::Keys { allowed: 9, .. }), "{d:?}");
        assert!(minute(&mut p, &s, 2, 10, 0, 500, 3).is_empty());
        // ...4× is not; nor, at 03:00, more than the floor of 30.
        let d = minute(&mut p, &s, 2, 10, 1, 800, 3);
        assert!(
            matches!(
                d[0],
                Deviation::Rate {
                    seen: 601,
                    allowed: 600
                }
            ),
            "{d:?}"
        );
        let d = minute(&mut p, &s, 3, 3, 0, 31, 1);
        assert!(
            matches!(
                d[0],
                Deviation::Rate {
                    seen: 31,
                    allowed: 30
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn nothing_deviates_while_learning_and_deviations_are_not_learned() {
        let s = settings();
        let mut p = Profile::new(0);
        assert!(minute(&mut p, &s, 0, 3, 0, 5000, 1).is_empty());
        for m in 0..60 {
            minute(&mut p, &s, 1, 9, m, 100, 1);
        }
        // Day 2 at 09:00: 1 000 a minute deviates, and the hour is not learned...
        assert!(!minute(&mut p, &s, 2, 9, 0, 1000, 1).is_empty());
        minute(&mut p, &s, 2, 12, 0, 1, 1);
        // ...so day 3 still allows about 300, not 3 000.
        assert!(!minute(&mut p, &s, 3, 9, 0, 400, 1).is_empty());
    }

    #[test]
    fn distinct_counts_are_close() {
        let h = Hashing::new();
        for n in [1_u64, 5, 50, 1000, 100_000] {
            let mut d = Distinct::new();
            for i in 0..n {
                d.add(h.hash(i));
                d.add(h.hash(i));
            }
            let err = (d.estimate as f64 - n as f64).abs() / n as f64;
            assert!(err < 0.45, "{n}: {}", d.estimate);
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(BaselineSettings::default().check().is_ok());
        let bad = BaselineSettings {
            factor: 1.0,
            ..BaselineSettings::default()
        };
        assert!(bad.check().is_err());
    }
}
