//! Lockout: an identity denied `threshold` times within `window` is refused everything
//! (`429 LockedOut`) for `duration`, and the lockout is logged (and audited: each refused
//! request still leaves its record). Admins list and lift lockouts through the API.
//! State is in memory: a restart lifts every lockout.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lockout policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Denials that trigger a lockout.
    pub threshold: u32,
    /// Within this window.
    pub window: Duration,
    /// For this long.
    pub duration: Duration,
}

impl Default for LockoutPolicy {
    /// 5 denials within 1 minute lock out for 15 minutes.
    fn default() -> Self {
        Self {
            threshold: 5,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Default)]
struct Entry {
    denials: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

/// Per-identity denial counters and lockouts.
pub struct Lockouts {
    policy: LockoutPolicy,
    state: Mutex<HashMap<String, Entry>>,
}

impl Lockouts {
    /// Empty state under `policy`.
    pub fn new(policy: LockoutPolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Time left on `identity`'s lockout, if it is locked out now.
    pub fn locked(&self, identity: &str) -> Option<Duration> {
        let now = Instant::now();
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let until = state.get(identity)?.locked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Counts a denial; returns true when this denial locks the identity out.
    pub fn record_denial(&self, identity: &str) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Bound memory: forget identities whose counters and lockouts have expired.
        if state.len() > 100_000 {
            let window = self.policy.window;
            state.retain(|_, e| {
                e.locked_until.is_some_and(|u| u > now)
                    || e.denials
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < window)
            });
        }
        let e = state.entry(identity.to_owned()).or_default();
        if e.locked_until.is_some_and(|u| u > now) {
            return false;
        }
        while e
            .denials
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.policy.window)
        {
            e.denials.pop_front();
        }
        e.denials.push_back(now);
        if e.denials.len() as u32 >= self.policy.threshold {
            e.denials.clear();
            e.locked_until = Some(now + self.policy.duration);
            return true;
        }
        false
    }

    /// Lifts `identity`'s lockout and forgets its denials; true if it was locked out.
    pub fn lift(&self, identity: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .remove(identity)
            .is_some_and(|e| e.locked_until.is_some_and(|u| u > Instant::now()))
    }

    /// Identities locked out now, with the seconds left.
    pub fn list(&self) -> Vec<(String, u64)> {
        let now = Instant::now();
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(String, u64)> = state
            .iter()
            .filter_map(|(id, e)| {
                let left = e.locked_until?.checked_duration_since(now)?;
                (!left.is_zero()).then(|| (id.clone(), left.as_secs().max(1)))
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_window_and_lift() {
        let l = Lockouts::new(LockoutPolicy {
            threshold: 3,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(60),
        });
        assert!(!l.record_denial("a"));
        assert!(!l.record_denial("a"));
        assert!(l.locked("a").is_none());
        assert!(l.record_denial("a"), "third denial locks out");
        assert!(l.locked("a").is_some());
        assert!(l.locked("b").is_none(), "others are not affected");
        assert_eq!(l.list().len(), 1);
        assert!(l.lift("a"));
        assert!(l.locked("a").is_none());
        assert!(!l.lift("a"));
    }
}
