//! What a connection holds while it lives: its place in its source's share, in the
//! handshake budget, and its connection slot; and how the listener takes one back from a
//! connection that holds it for nothing (module docs of [`super`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::transport::request_body::BodyProgress;

use super::{Handover, Permit, EVICT_SLOT_AFTER, EVICT_WAIT};

/// The connections open per source.
pub(super) struct Sources {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its source's share; given back on drop.
pub(super) struct SourceGuard {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Sources {
    /// `max` connections per source at most (0: no limit).
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The key a source is counted under: the IPv4 address (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address), or the IPv6 /64 (one host usually holds a whole /64).
    pub(super) fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(bits.into())
                }
            },
        }
    }

    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceGuard> {
        let key = Self::key(ip);
        if self.max > 0 {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let n = open.entry(key).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(SourceGuard {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        if self.sources.max == 0 {
            return;
        }
        let mut open = self
            .sources
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The handshakes in progress, oldest first, each with the means to stop it.
#[derive(Default)]
pub(super) struct Handshaking {
    queue: Mutex<std::collections::VecDeque<(Instant, tokio::sync::oneshot::Sender<Handover>)>>,
}

impl Handshaking {
    /// Registers a handshake starting now; when it is evicted, the receiver yields where
    /// to hand its permit over.
    pub(super) fn register(&self, limit: usize) -> tokio::sync::oneshot::Receiver<Handover> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        // Finished handshakes (receiver gone) leave from the front; if an old one still
        // in progress holds the front, the rest are swept once the queue grows.
        while q.front().is_some_and(|(_, t)| t.is_closed()) {
            q.pop_front();
        }
        if q.len() > 4 * limit.max(16) {
            q.retain(|(_, t)| !t.is_closed());
        }
        q.push_back((Instant::now(), tx));
        rx
    }

    /// Stops the oldest handshake in progress for at least `age`; its permit comes
    /// through the returned receiver (directly: no other connection can take it first).
    pub(super) fn evict_oldest(
        &self,
        age: Duration,
    ) -> Option<tokio::sync::oneshot::Receiver<Permit>> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((since, _)) = q.front() {
            if since.elapsed() < age {
                return None;
            }
            if let Some((_, stop)) = q.pop_front() {
                let (handover, freed) = tokio::sync::oneshot::channel();
                if stop.send(handover).is_ok() {
                    return Some(freed);
                }
            }
        }
        None
    }
}

/// A connection's place in the handshake budget.
pub(super) enum Budget {
    /// Plain TCP: no handshake.
    None,
    /// Held.
    Held(Permit),
    /// Being handed over by an evicted handshake (within [`EVICT_WAIT`]).
    Freed(tokio::sync::oneshot::Receiver<Permit>),
    /// None free and none old enough to evict: waits (holding a place in the bounded
    /// waiting room) for a permit or for the oldest handshake to become evictable, until
    /// its handshake deadline.
    Waiting(Permit),
}

/// When a connection last had a request in flight.
pub(super) struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` to the end of the last request.
    last_ms: AtomicU64,
}

/// One request in flight; its end is the connection's last activity.
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// How long the connection has had no request in flight (zero while one is).
    pub(super) fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        self.started.elapsed().saturating_sub(last)
    }
}

impl Activity {
    /// How long the connection has held its slot for nothing: idle, or with every request
    /// in flight waiting on a stalled body (zero otherwise).
    pub(super) fn unused_for(&self, bodies: &BodyProgress) -> Duration {
        let n = self.in_flight.load(Ordering::Acquire);
        if n == 0 {
            self.idle_for()
        } else if bodies.waiting() >= n {
            bodies.stalled_for()
        } else {
            Duration::ZERO
        }
    }
}

/// The established connections, each with the means to close it when a slot is needed.
#[derive(Default)]
pub(super) struct Established {
    open: Mutex<HashMap<u64, Holder>>,
    next: AtomicU64,
}

/// One established connection, as [`Established`] sees it.
pub(super) struct Holder {
    activity: Arc<Activity>,
    bodies: Arc<BodyProgress>,
    evict: tokio::sync::oneshot::Sender<Handover>,
}

/// A connection's entry in [`Established`], removed when it ends.
pub(super) struct Registration(Arc<Established>, u64);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
    }
}

impl Established {
    /// Registers a connection; when it is evicted, the receiver yields where to hand its
    /// slot over.
    pub(super) fn register(
        self: &Arc<Self>,
        activity: Arc<Activity>,
        bodies: Arc<BodyProgress>,
    ) -> (Registration, tokio::sync::oneshot::Receiver<Handover>) {
        let (evict, rx) = tokio::sync::oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Holder {
                    activity,
                    bodies,
                    evict,
                },
            );
        (Registration(self.clone(), id), rx)
    }

    /// Closes the connection that has held its slot for nothing the longest, at least
    /// `age`; its slot comes through the returned receiver (directly: no other connection
    /// can take it first).
    pub(super) fn evict(&self, age: Duration) -> Option<tokio::sync::oneshot::Receiver<Permit>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (id, _) = open
            .iter()
            .map(|(id, h)| (*id, h.activity.unused_for(&h.bodies)))
            .filter(|(_, unused)| *unused >= age)
            .max_by_key(|(_, unused)| *unused)?;
        let holder = open.remove(&id)?;
        let (handover, freed) = tokio::sync::oneshot::channel();
        holder.evict.send(handover).ok()?;
        Some(freed)
    }

    /// A connection slot: a free one, else one handed over by the connection that has held
    /// its slot for nothing the longest (once it has for [`EVICT_SLOT_AFTER`]), else the
    /// first given back.
    pub(super) async fn take_slot(
        &self,
        slots: &Arc<tokio::sync::Semaphore>,
    ) -> Result<Permit, tokio::sync::AcquireError> {
        loop {
            if let Ok(p) = slots.clone().try_acquire_owned() {
                return Ok(p);
            }
            if let Some(freed) = self.evict(EVICT_SLOT_AFTER) {
                if let Ok(Ok(p)) = tokio::time::timeout(EVICT_WAIT, freed).await {
                    return Ok(p);
                }
                continue;
            }
            tokio::select! {
                p = slots.clone().acquire_owned() => {
                    return p;
                }
                () = tokio::time::sleep(EVICT_SLOT_AFTER / 4) => {}
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.fetch_max(now, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn sources_are_counted_per_ipv4_address_and_ipv6_64() {
        let s = Arc::new(Sources {
            max: 2,
            open: Mutex::new(HashMap::new()),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g1 = s.admit(a).unwrap();
        let g2 = s.admit("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert!(s.admit(a).is_none(), "a third from one address");
        assert!(s.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(g1);
        assert!(s.admit(a).is_some(), "a place given back is free again");
        drop(g2);
        let v6 = |t: &str| -> IpAddr { t.parse().unwrap() };
        let _h1 = s.admit(v6("2001:db8::1")).unwrap();
        let _h2 = s.admit(v6("2001:db8::ffff:2")).unwrap();
        assert!(
            s.admit(v6("2001:db8::3")).is_none(),
            "one /64 is one source"
        );
        assert!(s.admit(v6("2001:db8:0:1::1")).is_some());
    }

    #[test]
    pub(super) fn the_source_table_forgets_sources_with_nothing_open() {
        let s = Arc::new(Sources {
            max: 8,
            open: Mutex::new(HashMap::new()),
        });
        for i in 0..=255u8 {
            drop(s.admit(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        assert!(s.open.lock().unwrap().is_empty());
    }
}
