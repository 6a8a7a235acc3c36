//! The server's wall clock, in Unix seconds: the system clock, or a clock the tests
//! control (to see automatic rotation and destruction without waiting days). Only the
//! library API takes another clock; the binary always runs on the system clock.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of "now", in Unix seconds (and milliseconds, for audit record times).
#[derive(Clone)]
pub struct Clock {
    secs: Arc<dyn Fn() -> u64 + Send + Sync>,
    millis: Arc<dyn Fn() -> u64 + Send + Sync>,
}

fn system_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self {
            secs: Arc::new(|| system_millis() / 1000),
            millis: Arc::new(system_millis),
        }
    }

    /// A clock that reads `f` (whole seconds).
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        let f = Arc::new(f);
        let g = f.clone();
        Self {
            secs: f,
            millis: Arc::new(move || g().saturating_mul(1000)),
        }
    }

    /// The system clock moved ahead by `offset` seconds, read at each call (tests: days
    /// pass at once, and audit records carry the moved time).
    pub fn ahead_of_system(offset: Arc<std::sync::atomic::AtomicU64>) -> Self {
        let o = offset.clone();
        Self {
            secs: Arc::new(move || {
                system_millis() / 1000 + offset.load(std::sync::atomic::Ordering::SeqCst)
            }),
            millis: Arc::new(move || {
                system_millis()
                    + o.load(std::sync::atomic::Ordering::SeqCst)
                        .saturating_mul(1000)
            }),
        }
    }

    /// Now, Unix seconds.
    pub fn now(&self) -> u64 {
        (self.secs)()
    }

    /// Now, Unix milliseconds.
    pub fn now_millis(&self) -> u64 {
        (self.millis)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}
