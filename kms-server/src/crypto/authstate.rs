//! Authorization state kept outside the keyring (runtime identities in [`crate::access::policy`],
//! shared lockouts in [`crate::access::lockout`]) is stored with an HMAC under a key of the
//! master-key hierarchy, like the key records ([`crate::keyring`]): whoever can write the
//! database table, without the master key, cannot give an identity a role or lock an
//! identity out. A record that does not verify is refused and reported.
//!
//! The keyring holds the key and implements [`StateSigner`]; the policy and lockout
//! modules receive it as a trait object, so they need not know the keyring.
//!
//! While the node is sealed nothing can be signed or checked: [`StateSigner::sign`] and
//! [`StateSigner::verify`] answer [`Error::Sealed`], and the callers say what they do then.

use crate::base::error::Error;

/// Signs and checks records of authorization state; see the module documentation.
pub trait StateSigner: Send + Sync {
    /// The MAC of `message` in `domain` (each kind of record has its own), hex-encoded.
    /// [`Error::Sealed`] while sealed.
    fn sign(&self, domain: &'static str, message: &[u8]) -> Result<String, Error>;

    /// Whether `tag` (hex) is the MAC of `message` in `domain`, compared in constant time.
    /// [`Error::Sealed`] while sealed.
    fn verify(&self, domain: &'static str, message: &[u8], tag: &str) -> Result<bool, Error>;

    /// Reports a record that fails (the server alerts and counts it, by `kind`).
    fn report(&self, kind: crate::base::event::AlertKind, detail: String);
}

/// A signer for tests: a fixed key, sealed or not at will, reports collected.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::*;

    pub(crate) struct TestSigner {
        key: ring::hmac::Key,
        pub(crate) sealed: AtomicBool,
        pub(crate) reports: Mutex<Vec<(crate::base::event::AlertKind, String)>>,
    }

    impl TestSigner {
        pub(crate) fn new() -> Self {
            Self {
                key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]),
                sealed: AtomicBool::new(false),
                reports: Mutex::new(Vec::new()),
            }
        }

        pub(crate) fn set_sealed(&self, sealed: bool) {
            self.sealed.store(sealed, Ordering::SeqCst);
        }

        pub(crate) fn kinds(&self) -> Vec<crate::base::event::AlertKind> {
            self.reports.lock().unwrap().iter().map(|r| r.0).collect()
        }

        fn input(domain: &str, message: &[u8]) -> Vec<u8> {
            [domain.as_bytes(), b"\0", message].concat()
        }
    }

    impl StateSigner for TestSigner {
        fn sign(&self, domain: &'static str, message: &[u8]) -> Result<String, Error> {
            if self.sealed.load(Ordering::SeqCst) {
                return Err(Error::Sealed);
            }
            let tag = ring::hmac::sign(&self.key, &Self::input(domain, message));
            Ok(crate::crypto::seal::hex(tag.as_ref()))
        }

        fn verify(&self, domain: &'static str, message: &[u8], tag: &str) -> Result<bool, Error> {
            if self.sealed.load(Ordering::SeqCst) {
                return Err(Error::Sealed);
            }
            let Some(tag) = crate::crypto::seal::unhex(tag) else {
                return Ok(false);
            };
            Ok(ring::hmac::verify(&self.key, &Self::input(domain, message), &tag).is_ok())
        }

        fn report(&self, kind: crate::base::event::AlertKind, detail: String) {
            self.reports.lock().unwrap().push((kind, detail));
        }
    }
}
