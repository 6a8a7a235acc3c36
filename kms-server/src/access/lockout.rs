//! Lockout: an identity denied `threshold` times within `window` is refused everything
//! (`429 LockedOut`) for `duration`, and the lockout is logged (and audited: each refused
//! request still leaves its record). Admins list and lift lockouts through the API.
//! State is in memory: a restart lifts every lockout.
//!
//! On a shared store ([`Lockouts::shared`]) a lockout is also written to the store
//! (`Meta` `lockout/<identity>` → the unix time in ms it ends, then its MAC), and lifting
//! one deletes it; the change feed carries both to every other node, which applies them
//! ([`Lockouts::refresh`]) within the feed's bound (1 s). The denials leading to a lockout
//! are counted by each node alone: spread over N nodes, an identity can collect up to
//! N × threshold denials before the first lockout, and is then refused by all of them.
//!
//! A stored lockout carries a MAC ([`crate::crypto::authstate`]): one written into the table by
//! hand (to lock an admin out) is ignored and reported. While a node is sealed it can
//! neither sign nor check one: its own lockouts then hold on it alone, and the stored ones
//! are read again at the next unseal ([`Lockouts::reload`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::base::error::Error;
use crate::crypto::authstate::StateSigner;
use crate::storage::{KeyStore, Table, WriteBatch, META_LOCKOUT_PREFIX};

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
    /// A store shared with other nodes (lockouts are written there too), and what signs
    /// and checks them there.
    shared: Option<(Arc<dyn KeyStore>, Arc<dyn StateSigner>)>,
}

const MAC_DOMAIN: &str = "lockout/v1";

/// What a stored lockout's MAC covers: the identity and the end of its lockout.
fn mac_message(identity: &str, until_ms: u64) -> Vec<u8> {
    [identity.as_bytes(), b"\0", &until_ms.to_be_bytes()].concat()
}

fn lockout_key(identity: &str) -> Vec<u8> {
    let mut k = META_LOCKOUT_PREFIX.to_vec();
    k.extend_from_slice(identity.as_bytes());
    k
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Lockouts {
    /// Empty state under `policy`.
    pub fn new(policy: LockoutPolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// Shares lockouts with the other nodes of `store` (see the module documentation),
    /// starting with those in force there now; `signer` signs and checks them.
    pub fn shared(
        mut self,
        store: Arc<dyn KeyStore>,
        signer: Arc<dyn StateSigner>,
    ) -> Result<Self, Error> {
        self.shared = Some((store, signer));
        self.reload()?;
        Ok(self)
    }

    /// Whether lockouts are shared through a store (and so [`Lockouts::publish`] and
    /// [`Lockouts::lift`] write there).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Applies every lockout stored now (at start, and at each unseal: those a sealed node
    /// could not check).
    pub fn reload(&self) -> Result<(), Error> {
        let Some((store, _)) = &self.shared else {
            return Ok(());
        };
        for (key, value) in store.scan_prefix(Table::Meta, META_LOCKOUT_PREFIX)? {
            if let Ok(identity) = std::str::from_utf8(&key[META_LOCKOUT_PREFIX.len()..]) {
                self.apply(identity, Some(value));
            }
        }
        Ok(())
    }

    /// Applies the stored lockout of `identity` (`None`: none, or lifted). One that fails
    /// authentication is ignored and reported; while sealed, nothing is applied.
    fn apply(&self, identity: &str, stored: Option<Vec<u8>>) {
        let until = match stored {
            None => None,
            Some(value) => match self.verified_until(identity, &value) {
                Ok(Some(until)) => Some(until),
                Ok(None) => {
                    tracing::error!(
                        identity,
                        "a stored lockout fails authentication (written outside Keyhold?): ignored"
                    );
                    if let Some((_, signer)) = &self.shared {
                        signer.report(
                            crate::base::event::AlertKind::LockoutTampered,
                            format!(
                                "the stored lockout of {identity} fails authentication: ignored"
                            ),
                        );
                    }
                    return;
                }
                Err(_) => return, // sealed: read again at the next unseal
            },
        };
        let now_ms = unix_ms(SystemTime::now());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match until {
            Some(until) if until > now_ms => {
                let e = state.entry(identity.to_owned()).or_default();
                e.denials.clear();
                e.locked_until = Some(Instant::now() + Duration::from_millis(until - now_ms));
            }
            _ => {
                state.remove(identity);
            }
        }
    }

    /// The end (unix ms) of a stored lockout whose MAC verifies, `None` if it does not;
    /// [`Error::Sealed`] while sealed.
    fn verified_until(&self, identity: &str, value: &[u8]) -> Result<Option<u64>, Error> {
        let Some((_, signer)) = &self.shared else {
            return Ok(None);
        };
        let Some((until, tag)) = value.split_at_checked(8) else {
            return Ok(None);
        };
        let until = u64::from_be_bytes(until.try_into().unwrap_or([0; 8]));
        let Ok(tag) = std::str::from_utf8(tag) else {
            return Ok(None);
        };
        Ok(signer
            .verify(MAC_DOMAIN, &mac_message(identity, until), tag)?
            .then_some(until))
    }

    /// Reloads `identity`'s lockout from the shared store, after another node changed it.
    pub fn refresh(&self, identity: &str) -> Result<(), Error> {
        let Some((store, _)) = &self.shared else {
            return Ok(());
        };
        let stored = store.get(Table::Meta, &lockout_key(identity))?;
        self.apply(identity, stored);
        Ok(())
    }

    /// Writes `identity`'s lockout (just recorded here) to the shared store, signed, so the
    /// other nodes refuse it too. Blocking (a store commit); a no-op without a shared
    /// store; [`Error::Sealed`] while sealed (the lockout holds on this node only).
    pub fn publish(&self, identity: &str) -> Result<(), Error> {
        let Some((store, signer)) = &self.shared else {
            return Ok(());
        };
        let Some(left) = self.locked(identity) else {
            return Ok(());
        };
        let until = unix_ms(SystemTime::now() + left);
        let tag = signer.sign(MAC_DOMAIN, &mac_message(identity, until))?;
        let value = [&until.to_be_bytes()[..], tag.as_bytes()].concat();
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, &lockout_key(identity), &value);
        store.commit(&batch)?;
        Ok(())
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

    /// Lifts `identity`'s lockout and forgets its denials; true if it was locked out. On
    /// a shared store the lift is written there first (blocking), for every node.
    pub fn lift(&self, identity: &str) -> Result<bool, Error> {
        let mut shared_lock = false;
        if let Some((store, _)) = &self.shared {
            let key = lockout_key(identity);
            shared_lock = store.get(Table::Meta, &key)?.is_some();
            let mut batch = WriteBatch::new();
            batch.delete(Table::Meta, &key);
            store.commit(&batch)?;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let here = state
            .remove(identity)
            .is_some_and(|e| e.locked_until.is_some_and(|u| u > Instant::now()));
        Ok(here || shared_lock)
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
        assert!(l.lift("a").unwrap());
        assert!(l.locked("a").is_none());
        assert!(!l.lift("a").unwrap());
    }

    fn two_nodes() -> (
        tempfile::TempDir,
        Arc<crate::crypto::authstate::testing::TestSigner>,
        Lockouts,
        Lockouts,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(crate::storage::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let signer = Arc::new(crate::crypto::authstate::testing::TestSigner::new());
        let policy = LockoutPolicy {
            threshold: 2,
            ..LockoutPolicy::default()
        };
        let a = Lockouts::new(policy)
            .shared(store.clone(), signer.clone())
            .unwrap();
        let b = Lockouts::new(policy).shared(store, signer.clone()).unwrap();
        (dir, signer, a, b)
    }

    #[test]
    fn a_published_lockout_holds_on_the_other_node() {
        let (_dir, signer, a, b) = two_nodes();
        a.record_denial("x");
        assert!(a.record_denial("x"));
        a.publish("x").unwrap();
        b.refresh("x").unwrap();
        assert!(b.locked("x").is_some());
        assert!(signer.kinds().is_empty());
    }

    #[test]
    fn a_lockout_written_by_hand_is_ignored_and_reported() {
        let (_dir, signer, a, b) = two_nodes();
        let until = unix_ms(SystemTime::now()) + 600_000;
        let Some((store, _)) = &a.shared else {
            unreachable!()
        };
        // The old format (no MAC), a MAC of another identity, and garbage.
        a.record_denial("other");
        a.record_denial("other");
        a.publish("other").unwrap();
        let other = store
            .get(Table::Meta, &lockout_key("other"))
            .unwrap()
            .unwrap();
        for value in [until.to_be_bytes().to_vec(), other, b"junk".to_vec()] {
            let mut batch = WriteBatch::new();
            batch.put(Table::Meta, &lockout_key("admin"), &value);
            store.commit(&batch).unwrap();
            b.refresh("admin").unwrap();
            assert!(
                b.locked("admin").is_none(),
                "a forged lockout is not obeyed"
            );
        }
        assert_eq!(
            signer.kinds(),
            vec![crate::base::event::AlertKind::LockoutTampered; 3]
        );
        // Nor at start.
        let c = Lockouts::new(LockoutPolicy::default())
            .shared(store.clone(), signer.clone())
            .unwrap();
        assert!(c.locked("admin").is_none());
        assert!(c.locked("other").is_some(), "the authentic one holds");
    }

    #[test]
    fn a_sealed_node_keeps_its_lockouts_and_reads_the_stored_ones_at_unseal() {
        let (_dir, signer, a, b) = two_nodes();
        a.record_denial("x");
        a.record_denial("x");
        a.publish("x").unwrap();
        signer.set_sealed(true);
        b.refresh("x").unwrap();
        assert!(b.locked("x").is_none(), "not checked while sealed");
        b.record_denial("y");
        assert!(b.record_denial("y"));
        assert!(matches!(b.publish("y"), Err(Error::Sealed)));
        assert!(b.locked("y").is_some(), "holds here while sealed");
        signer.set_sealed(false);
        b.reload().unwrap();
        assert!(b.locked("x").is_some(), "read at unseal");
        assert!(signer.kinds().is_empty());
    }
}
