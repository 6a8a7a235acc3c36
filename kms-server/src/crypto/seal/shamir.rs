//! Shamir M-of-N unsealing: the master key is sealed under a random 256-bit unseal key that
//! exists only as N shares (GF(256) Shamir secret sharing, the `blahaj` crate: `sharks`
//! has an open advisory, RUSTSEC-2024-0398). Any M shares recover it; fewer reveal
//! nothing. `kms-server init` prints the shares once and keeps none.
//!
//! A share is written `khs1-<set>-<x>-<base64>`: `set` names the share set (the first 8
//! bytes of SHA-256 of the unseal key, hex: it identifies, it does not reveal), `x` the
//! share's position. Shares of another set and duplicates are refused one by one; M
//! shares that do not open the master key (a forged one) are refused together.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use blahaj::{Share, Sharks};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    check_method, seal_under, unseal_under, SealError, SealMethod, SealedMasterKey, Sealer,
};
use crate::crypto::secret::SecretKey;

/// Share sets as stored beside the sealed master key (no secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShamirParams {
    /// Shares needed.
    pub threshold: u8,
    /// Shares made.
    pub shares: u8,
    /// The set's identifier (see the module docs), as 8 bytes.
    pub set: [u8; 8],
}

/// One parsed share. Zeroized on drop.
pub struct ShareInput {
    set: [u8; 8],
    bytes: Zeroizing<Vec<u8>>,
}

impl ShareInput {
    /// Parses `khs1-<set>-<x>-<base64>`.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let bad = || SealError::BadShare("not a Keyhold share (khs1-<set>-<n>-<base64>)");
        let mut parts = text.trim().splitn(4, '-');
        let (Some("khs1"), Some(set), Some(x), Some(b64)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let set: [u8; 8] = super::unhex(set)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(bad)?;
        let x: u8 = x.parse().map_err(|_| bad())?;
        let y = Zeroizing::new(B64.decode(b64).map_err(|_| bad())?);
        if x == 0 || y.len() != 32 {
            return Err(bad());
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(33));
        bytes.push(x);
        bytes.extend_from_slice(&y);
        Ok(Self { set, bytes })
    }

    /// The share's position (1..=255).
    pub fn x(&self) -> u8 {
        self.bytes[0]
    }

    /// Its set.
    pub fn set(&self) -> [u8; 8] {
        self.set
    }
}

fn set_of(key: &SecretKey) -> [u8; 8] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.expose_secret());
    let mut set = [0u8; 8];
    set.copy_from_slice(&digest.as_ref()[..8]);
    set
}

/// Seals with a fresh unseal key split into shares; unseals from shares.
pub struct ShamirSealer {
    /// For sealing: the unseal key and the share parameters.
    deal: Option<(SecretKey, ShamirParams)>,
    /// For unsealing: the shares given.
    given: Vec<ShareInput>,
}

impl ShamirSealer {
    /// A fresh unseal key split `threshold`-of-`shares`; returns the sealer (for `init`)
    /// and the shares, to be printed once.
    pub fn deal(shares: u8, threshold: u8) -> Result<(Self, Vec<Zeroizing<String>>), SealError> {
        if !(2..=shares).contains(&threshold) || shares > 16 {
            return Err(SealError::BadShare("need 2 <= threshold <= shares <= 16"));
        }
        let key = SecretKey::generate().map_err(|_| SealError::Random)?;
        let set = set_of(&key);
        let out = Sharks(threshold)
            .dealer(key.expose_secret())
            .take(usize::from(shares))
            .map(|s| {
                let bytes = Zeroizing::new(Vec::from(&s));
                Zeroizing::new(format!(
                    "khs1-{}-{}-{}",
                    super::hex(&set),
                    bytes[0],
                    B64.encode(&bytes[1..])
                ))
            })
            .collect();
        let params = ShamirParams {
            threshold,
            shares,
            set,
        };
        Ok((
            Self {
                deal: Some((key, params)),
                given: Vec::new(),
            },
            out,
        ))
    }

    /// A sealer that unseals from `shares` (already checked for set and duplicates).
    pub fn from_shares(shares: Vec<ShareInput>) -> Self {
        Self {
            deal: None,
            given: shares,
        }
    }
}

impl Sealer for ShamirSealer {
    fn method(&self) -> SealMethod {
        SealMethod::Shamir
    }

    fn seal(&self, master: &SecretKey) -> Result<SealedMasterKey, SealError> {
        let (key, params) = self
            .deal
            .as_ref()
            .ok_or(SealError::NoSecret("share set to seal with"))?;
        Ok(SealedMasterKey {
            method: SealMethod::Shamir,
            argon2: None,
            shamir: Some(*params),
            pkcs11: None,
            sealed: seal_under(key, SealMethod::Shamir, master)?,
        })
    }

    fn unseal(&self, sealed: &SealedMasterKey) -> Result<SecretKey, SealError> {
        check_method(sealed, SealMethod::Shamir)?;
        let params = sealed.shamir.ok_or(SealError::Malformed)?;
        if self.given.len() < usize::from(params.threshold) {
            return Err(SealError::NoSecret("enough unseal shares"));
        }
        let shares = self
            .given
            .iter()
            .map(|s| Share::try_from(s.bytes.as_slice()))
            .collect::<Result<Vec<Share>, _>>()
            .map_err(|_| SealError::BadShare("malformed share"))?;
        let key = Zeroizing::new(
            Sharks(params.threshold)
                .recover(shares.iter())
                .map_err(|_| SealError::NoSecret("enough unseal shares"))?,
        );
        let key = SecretKey::from_slice(&key).ok_or(SealError::Malformed)?;
        unseal_under(&key, sealed, "set of unseal shares")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(shares: &[Zeroizing<String>]) -> Vec<ShareInput> {
        shares
            .iter()
            .map(|s| ShareInput::parse(s).unwrap())
            .collect()
    }

    #[test]
    fn m_of_n_and_refusals() {
        let master = SecretKey::generate().unwrap();
        let (dealer, shares) = ShamirSealer::deal(5, 3).unwrap();
        assert_eq!(shares.len(), 5);
        let sealed = dealer.seal(&master).unwrap();
        let given = parse_all(&shares[1..4]);
        let opened = ShamirSealer::from_shares(given).unseal(&sealed).unwrap();
        assert_eq!(opened.expose_secret(), master.expose_secret());
        // Any three; not two.
        let any = parse_all(&[shares[4].clone(), shares[0].clone(), shares[2].clone()]);
        assert!(ShamirSealer::from_shares(any).unseal(&sealed).is_ok());
        let two = parse_all(&shares[..2]);
        assert!(matches!(
            ShamirSealer::from_shares(two).unseal(&sealed),
            Err(SealError::NoSecret(_))
        ));
        // A tampered share: the three recover a wrong key, which does not open it.
        let mut bad = parse_all(&shares[..3]);
        bad[1].bytes[5] ^= 1;
        assert!(matches!(
            ShamirSealer::from_shares(bad).unseal(&sealed),
            Err(SealError::WrongSecret(_))
        ));
        // Shares name their set.
        let (_, other) = ShamirSealer::deal(3, 2).unwrap();
        assert_ne!(
            ShareInput::parse(&other[0]).unwrap().set(),
            ShareInput::parse(&shares[0]).unwrap().set()
        );
        for junk in [
            "",
            "khs1-00-1-AAAA",
            "khs2-0011223344556677-1-AAAA",
            "khs1-0011223344556677-0-AAAA",
        ] {
            assert!(ShareInput::parse(junk).is_err(), "{junk}");
        }
        assert!(ShamirSealer::deal(3, 4).is_err());
        assert!(ShamirSealer::deal(3, 1).is_err());
    }
}
