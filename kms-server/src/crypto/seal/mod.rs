//! Sealing the master key: the [`Sealer`] trait and its methods.
//!
//! The master key is never stored in clear. `kms-server init` generates it and stores it
//! sealed (a [`SealedMasterKey`] record in the store's meta table); `serve` starts sealed
//! and asks the configured [`Sealer`] to unseal. Methods today: a key file
//! ([`KeyFileSealer`]), an operator passphrase through Argon2id ([`PassphraseSealer`]), and
//! M-of-N Shamir shares held by operators ([`ShamirSealer`]), and a key that never
//! leaves a PKCS#11 token ([`Pkcs11Sealer`]).

use serde::{Deserialize, Serialize};

use crate::crypto::aead;
use crate::crypto::secret::SecretKey;

mod keyfile;
mod passphrase;
mod pkcs11;
mod shamir;

pub use keyfile::KeyFileSealer;
pub use passphrase::{check_new_passphrase, Argon2Params, PassphraseSealer, MIN_PASSPHRASE_CHARS};
pub use pkcs11::{
    finalize as pkcs11_finalize, Pkcs11Params, Pkcs11Sealer, Pkcs11Settings, TokenSession,
    PIN_ENV as PKCS11_PIN_ENV,
};
pub use shamir::{ShamirParams, ShamirSealer, ShareInput};

/// Label for the master key sealed under a key-encryption key (see `crypto`).
const LABEL: &[u8] = b"keyhold/master-key/v1";

/// How the master key is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SealMethod {
    /// A 32-byte key file.
    KeyFile,
    /// An operator passphrase through Argon2id.
    Passphrase,
    /// M of N Shamir shares of an unseal key, held by operators.
    Shamir,
    /// A key held in a PKCS#11 token (HSM).
    Pkcs11,
}

impl SealMethod {
    /// The name used in config and status.
    pub fn as_str(self) -> &'static str {
        match self {
            SealMethod::KeyFile => "key-file",
            SealMethod::Passphrase => "passphrase",
            SealMethod::Shamir => "shamir",
            SealMethod::Pkcs11 => "pkcs11",
        }
    }
}

/// The sealed master key as stored. Holds no secret in clear: `sealed` is AEAD
/// ciphertext (under the key-file key, the passphrase key, the Shamir unseal key, or the
/// PKCS#11 token's key), and the rest is public parameters (Argon2 salt and costs, share
/// set and threshold, token and key labels and the GCM nonce). So deriving `Debug` and
/// `Serialize` is safe here: it is what the store holds. `Debug` still leaves the
/// ciphertext out (its length only): logs have no use for it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedMasterKey {
    /// Method that sealed it.
    pub method: SealMethod,
    /// Argon2id parameters and salt, for the passphrase method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argon2: Option<Argon2Params>,
    /// Share set parameters, for the Shamir method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shamir: Option<ShamirParams>,
    /// Token and key labels and the GCM nonce, for the PKCS#11 method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<Pkcs11Params>,
    /// salt ‖ ciphertext ‖ tag of the master key (see `aead::seal_box`), hex.
    pub sealed: String,
}

impl std::fmt::Debug for SealedMasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedMasterKey")
            .field("method", &self.method)
            .field("argon2", &self.argon2)
            .field("shamir", &self.shamir)
            .field("pkcs11", &self.pkcs11)
            .field(
                "sealed",
                &format_args!("[REDACTED] ({} hex chars)", self.sealed.len()),
            )
            .finish()
    }
}

pub use crate::base::error::SealError;

/// A way to seal and unseal the master key.
pub trait Sealer: Send + Sync {
    /// The method.
    fn method(&self) -> SealMethod;

    /// Seals `master` for storage.
    fn seal(&self, master: &SecretKey) -> Result<SealedMasterKey, SealError>;

    /// Recovers the master key from its sealed form.
    fn unseal(&self, sealed: &SealedMasterKey) -> Result<SecretKey, SealError>;
}

fn check_method(sealed: &SealedMasterKey, configured: SealMethod) -> Result<(), SealError> {
    if sealed.method == configured {
        Ok(())
    } else {
        Err(SealError::MethodMismatch {
            stored: sealed.method.as_str(),
            configured: configured.as_str(),
        })
    }
}

/// Seals `master` under a key-encryption key `kek` (derived from a file or a passphrase).
fn seal_under(
    kek: &SecretKey,
    method: SealMethod,
    master: &SecretKey,
) -> Result<String, SealError> {
    let sealed = aead::seal_box(
        kek,
        LABEL,
        method.as_str().as_bytes(),
        master.expose_secret(),
    )
    .map_err(|_| SealError::Random)?;
    Ok(hex(&sealed))
}

fn unseal_under(
    kek: &SecretKey,
    sealed: &SealedMasterKey,
    what: &'static str,
) -> Result<SecretKey, SealError> {
    let bytes = unhex(&sealed.sealed).ok_or(SealError::Malformed)?;
    let plain = aead::open_box(kek, LABEL, sealed.method.as_str().as_bytes(), &bytes)
        .map_err(|_| SealError::WrongSecret(what))?;
    SecretKey::from_slice(plain.expose_secret()).ok_or(SealError::Malformed)
}

pub(crate) use kms_client::hex::{decode as unhex, encode as hex};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_ciphertext_out() {
        let sealed = SealedMasterKey {
            method: SealMethod::KeyFile,
            argon2: None,
            shamir: None,
            pkcs11: None,
            sealed: "deadbeefcafe".into(),
        };
        let shown = format!("{sealed:?}");
        assert!(shown.contains("[REDACTED] (12 hex chars)"), "{shown}");
        assert!(!shown.contains("deadbeef"), "{shown}");
    }
}
