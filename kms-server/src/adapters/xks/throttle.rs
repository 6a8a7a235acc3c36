//! Per-key-store request rate: a token bucket of `burst` tokens refilled at `rate` per
//! second. A request finding it empty gets 429 `ThrottlingException` (the specification's
//! answer to overload), never a queue that would push it past KMS's 250 ms timeout.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// A token bucket.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    /// Takes one token at `now`; `false` when there is none.
    pub fn take_at(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *s;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now.max(*last);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token now.
    pub fn take(&self) -> bool {
        self.take_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let b = Bucket::new(10, 5);
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| b.take_at(t0)).count(), 5);
        // 10/s: after 300 ms, 3 more.
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!((0..8).filter(|_| b.take_at(t1)).count(), 3);
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take_at(t2)).count(), 5);
    }
}
