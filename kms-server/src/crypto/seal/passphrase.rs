//! Passphrase sealing: the master key encrypted under a key derived from an operator
//! passphrase with Argon2id (RFC 9106), a memory-hard KDF.

use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    check_method, seal_under, unseal_under, SealError, SealMethod, SealedMasterKey, Sealer,
};
use crate::crypto::aead;
use crate::crypto::secret::{SecretKey, KEY_LEN};

/// Argon2id parameters, stored with the sealed key so unsealing uses what sealing used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Params {
    /// Memory, KiB (default 65 536 = 64 MiB; RFC 9106's second recommended option).
    pub m_cost_kib: u32,
    /// Passes (default 3).
    pub t_cost: u32,
    /// Lanes (default 1).
    pub p_cost: u32,
    /// Random 32-byte salt; drawn fresh by every seal.
    #[serde(default)]
    pub salt: Option<[u8; 32]>,
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
            salt: None,
        }
    }
}

impl Argon2Params {
    /// Refuses parameters below a floor that still resists offline guessing.
    pub fn validate(&self) -> Result<(), String> {
        if self.m_cost_kib < 8 * 1024 {
            return Err("argon2 memory must be at least 8192 KiB".into());
        }
        if self.t_cost < 1 || self.p_cost < 1 {
            return Err("argon2 t_cost and p_cost must be at least 1".into());
        }
        Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .map(|_| ())
            .map_err(|e| format!("argon2 parameters rejected: {e}"))
    }
}

/// The fewest characters a passphrase may have to seal a master key.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// The rule every passphrase that seals meets, whoever seals (`kms-server init`, a
/// master-key rotation): at least [`MIN_PASSPHRASE_CHARS`] characters. Unsealing does not
/// apply it: a store sealed before the rule still opens.
pub fn check_new_passphrase(passphrase: &str) -> Result<(), SealError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(SealError::WeakSecret(
            "the passphrase must be at least 12 characters",
        ));
    }
    Ok(())
}

/// Seals the master key under a key derived from a passphrase (Argon2id).
pub struct PassphraseSealer {
    passphrase: Option<Zeroizing<String>>,
    params: Argon2Params,
}

impl PassphraseSealer {
    /// A sealer for `passphrase` (None: not yet known; unseal then reports `NoSecret`).
    /// `params` apply when sealing; unsealing uses the stored ones.
    pub fn new(passphrase: Option<Zeroizing<String>>, params: Argon2Params) -> Self {
        Self { passphrase, params }
    }

    fn derive(&self, params: &Argon2Params, salt: &[u8; 32]) -> Result<SecretKey, SealError> {
        let pass = self
            .passphrase
            .as_ref()
            .ok_or(SealError::NoSecret("passphrase"))?;
        if pass.is_empty() {
            return Err(SealError::NoSecret("passphrase"));
        }
        let p = Params::new(
            params.m_cost_kib,
            params.t_cost,
            params.p_cost,
            Some(KEY_LEN),
        )
        .map_err(|e| SealError::Kdf(e.to_string()))?;
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
            .hash_password_into(pass.as_bytes(), salt, &mut *out)
            .map_err(|e| SealError::Kdf(e.to_string()))?;
        SecretKey::from_slice(&*out).ok_or(SealError::Kdf("output length".into()))
    }
}

impl Sealer for PassphraseSealer {
    fn method(&self) -> SealMethod {
        SealMethod::Passphrase
    }

    fn seal(&self, master: &SecretKey) -> Result<SealedMasterKey, SealError> {
        let pass = self
            .passphrase
            .as_ref()
            .ok_or(SealError::NoSecret("passphrase"))?;
        check_new_passphrase(pass)?;
        let mut params = self.params;
        params.salt = Some(aead::random_salt().map_err(|_| SealError::Random)?);
        let salt = params.salt.ok_or(SealError::Random)?;
        let kek = self.derive(&params, &salt)?;
        Ok(SealedMasterKey {
            method: SealMethod::Passphrase,
            argon2: Some(params),
            shamir: None,
            pkcs11: None,
            sealed: seal_under(&kek, SealMethod::Passphrase, master)?,
        })
    }

    fn unseal(&self, sealed: &SealedMasterKey) -> Result<SecretKey, SealError> {
        check_method(sealed, SealMethod::Passphrase)?;
        let params = sealed.argon2.ok_or(SealError::Malformed)?;
        let salt = params.salt.ok_or(SealError::Malformed)?;
        let kek = self.derive(&params, &salt)?;
        unseal_under(&kek, sealed, "passphrase")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Params {
        Argon2Params {
            m_cost_kib: 8 * 1024,
            t_cost: 1,
            p_cost: 1,
            salt: None,
        }
    }

    #[test]
    fn round_trip_and_wrong_passphrase() {
        let master = SecretKey::generate().unwrap();
        let s = PassphraseSealer::new(Some(Zeroizing::new("open sesame, please".into())), cheap());
        let sealed = s.seal(&master).unwrap();
        assert_eq!(s.unseal(&sealed).unwrap(), master);
        let wrong =
            PassphraseSealer::new(Some(Zeroizing::new("open sesame, please!".into())), cheap());
        assert!(matches!(
            wrong.unseal(&sealed),
            Err(SealError::WrongSecret(_))
        ));
        let none = PassphraseSealer::new(None, cheap());
        assert!(matches!(none.unseal(&sealed), Err(SealError::NoSecret(_))));
        // The key-file method refuses a passphrase record.
        let kf = super::super::KeyFileSealer::new("/nonexistent");
        assert!(matches!(
            kf.unseal(&sealed),
            Err(SealError::MethodMismatch { .. })
        ));
    }

    #[test]
    fn a_short_passphrase_does_not_seal_but_a_store_sealed_before_the_rule_opens() {
        let master = SecretKey::generate().unwrap();
        let short = PassphraseSealer::new(Some(Zeroizing::new("open sesame".into())), cheap());
        assert!(matches!(short.seal(&master), Err(SealError::WeakSecret(_))));
        // Sealed under a short passphrase by an older build (the same construction).
        let mut params = cheap();
        params.salt = Some([7u8; 32]);
        let kek = short.derive(&params, &[7u8; 32]).unwrap();
        let sealed = SealedMasterKey {
            method: SealMethod::Passphrase,
            argon2: Some(params),
            shamir: None,
            pkcs11: None,
            sealed: seal_under(&kek, SealMethod::Passphrase, &master).unwrap(),
        };
        assert_eq!(short.unseal(&sealed).unwrap(), master);
        assert!(check_new_passphrase("twelve chars").is_ok());
        assert!(check_new_passphrase("eleven char").is_err());
    }

    #[test]
    fn weak_params_refused() {
        let mut p = cheap();
        p.m_cost_kib = 1024;
        assert!(p.validate().is_err());
        assert!(Argon2Params::default().validate().is_ok());
    }
}
