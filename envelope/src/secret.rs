//! Secret types: the DEK, and the keys derived from it. Zeroized on drop, never printed,
//! compared in constant time, not `Clone`.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// DEK length in bytes: 256 bits.
pub const DEK_LEN: usize = 32;

/// A data-encryption key (DEK) in clear, as a [`crate::KeyProvider`] hands it out.
/// The envelope derives its per-message keys from it and drops it when the operation
/// (or the cache entry holding it) ends.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Dek([u8; DEK_LEN]);

impl Dek {
    /// Takes a DEK of exactly [`DEK_LEN`] bytes. The caller zeroizes its own copy.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// A fresh random DEK.
    pub fn generate() -> Result<Self, crate::Error> {
        let mut k = [0u8; DEK_LEN];
        crate::backend::random(&mut k).map_err(|_| crate::Error::Random)?;
        Ok(Self(k))
    }

    /// The key bytes.
    pub fn expose_secret(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek([REDACTED])")
    }
}

impl PartialEq for Dek {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Dek {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_bytes() {
        let d = Dek::from_slice(&[0x5a; 32]).unwrap();
        let s = format!("{d:?}");
        assert!(!s.contains("5a") && !s.contains("90") && s.contains("REDACTED"));
        assert!(Dek::from_slice(&[0; 31]).is_none());
        assert_ne!(Dek::generate().unwrap(), Dek::generate().unwrap());
    }
}
