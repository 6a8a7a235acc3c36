//! The server's wall clock, in Unix seconds: the system clock, or a clock the tests
//! control (to see automatic rotation and destruction without waiting days). Only the
//! library API takes another clock; the binary always runs on the system clock.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of "now", in Unix seconds.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }))
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Now, Unix seconds.
    pub fn now(&self) -> u64 {
        (self.0)()
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
