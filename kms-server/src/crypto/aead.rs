//! The one AEAD construction Keyhold uses for its own formats: AES-256-GCM under a
//! single-use key derived by HKDF-SHA256 from a long-term key and a fresh 256-bit salt.
//!
//! `key' = HKDF-SHA256(salt = salt, ikm = key, info = label)`, then AES-256-GCM with
//! key', nonce = 0^96, and the caller's associated data. Each derived key encrypts exactly
//! one message, so the all-zero nonce is never reused under one key unless two salts
//! collide: for q messages under one long-term key that happens with probability at most
//! q²/2^257 (2^-177 for q = 2^40). The long-term key is only ever an HKDF input, so the
//! GCM limits (2^32 random nonces per key) do not apply to it. The argument is written out
//! in `format.md` (wrapped DEKs), the main user.
//!
//! Used by the wrapped-DEK format ([`crate::crypto::format`]), the KEK-version records under the
//! master key ([`crate::keyring`]), and master-key sealing ([`crate::crypto::seal`]).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::base::error::Error;
use crate::crypto::secret::{SecretKey, SecretVec};

/// Salt length in bytes.
pub const SALT_LEN: usize = 32;
/// GCM tag length in bytes.
pub const TAG_LEN: usize = 16;

/// A fresh random salt.
pub fn random_salt() -> Result<[u8; SALT_LEN], Error> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| Error::Internal("system random generator failed"))?;
    Ok(salt)
}

/// Opaque failure to open: wrong key, wrong label, wrong AAD, or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFailed;

fn derive(key: &SecretKey, salt: &[u8], label: &[u8]) -> LessSafeKey {
    let info = [label];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.expose_secret());
    let okm = prk.expand(&info, &AES_256_GCM);
    // `expand` only fails when the requested length exceeds 255 × 32 bytes; AES-256 asks
    // for 32, so this arm is unreachable. Map it to the opaque error rather than panic.
    match okm {
        Ok(okm) => LessSafeKey::new(UnboundKey::from(okm)),
        Err(_) => unreachable_derivation(),
    }
}

/// A 256-bit key bound to two inputs: HKDF-SHA256(salt = `salt`, ikm = `key`, info =
/// `label`). Both are needed to get it; used to seal KEK versions under the master key
/// *and* the key's erasure key ([`crate::storage::erasure`]), so that erasing either makes them
/// unreadable.
pub fn bind_key(key: &SecretKey, salt: &[u8; SALT_LEN], label: &[u8]) -> Result<SecretKey, Error> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let info = [label];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.expose_secret());
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&info, Len32)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| Error::Internal("key derivation failed"))?;
    SecretKey::from_slice(&out[..]).ok_or(Error::Internal("key derivation failed"))
}

#[cold]
fn unreachable_derivation() -> LessSafeKey {
    // Invariant: HKDF-SHA256 can always produce 32 bytes. Keep the process alive with a
    // key nobody knows; every open under it fails, every seal is unreadable.
    let mut random = Zeroizing::new([0u8; 32]);
    let _ = SystemRandom::new().fill(&mut *random);
    match UnboundKey::new(&AES_256_GCM, &*random) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => std::process::abort(),
    }
}

/// Encrypts `plaintext` under a key derived from `key`, `salt` and `label`; returns
/// ciphertext ‖ tag. The salt must be fresh for every call (see [`random_salt`]).
pub fn seal(
    key: &SecretKey,
    salt: &[u8; SALT_LEN],
    label: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    let sealing = derive(key, salt, label);
    let nonce = Nonce::assume_unique_for_key([0u8; aead::NONCE_LEN]);
    // AES-GCM sealing only fails for inputs over 2^36 bytes; callers pass at most a few KiB.
    if sealing
        .seal_in_place_append_tag(nonce, Aad::from(aad), &mut out)
        .is_err()
    {
        out.clear();
    }
    out
}

/// Reverses [`seal`]. The result is zeroized on drop.
pub fn open(
    key: &SecretKey,
    salt: &[u8; SALT_LEN],
    label: &[u8],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<SecretVec, OpenFailed> {
    if ciphertext_and_tag.len() < TAG_LEN {
        return Err(OpenFailed);
    }
    let mut buf = Zeroizing::new(ciphertext_and_tag.to_vec());
    let opening = derive(key, salt, label);
    let nonce = Nonce::assume_unique_for_key([0u8; aead::NONCE_LEN]);
    let len = opening
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| OpenFailed)?
        .len();
    buf.truncate(len);
    Ok(SecretVec::new(std::mem::take(&mut *buf)))
}

/// Salt length of the detached form ([`seal_detached`]): the 16-byte "IV" of protocols
/// that carry IV, ciphertext and tag apart.
pub const DETACHED_SALT_LEN: usize = 16;

/// The detached form of [`seal`], for protocols that carry the IV, the ciphertext and the
/// tag as separate fields (AWS XKS: `initializationVector` of 12 or 16 bytes, ciphertext
/// as long as the plaintext, 16-byte tag). The 16-byte wire IV is the HKDF salt; the GCM
/// nonce under the derived single-use key is 0^96, as in [`seal`]. Encrypts `in_out` in
/// place and returns the tag. With 128-bit random salts, two messages under one long-term
/// key share a derived key with probability at most q²/2^129 (2^-65 for q = 2^32).
pub fn seal_detached(
    key: &SecretKey,
    salt: &[u8; DETACHED_SALT_LEN],
    label: &[u8],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<[u8; TAG_LEN], Error> {
    let sealing = derive(key, salt, label);
    let nonce = Nonce::assume_unique_for_key([0u8; aead::NONCE_LEN]);
    let tag = sealing
        .seal_in_place_separate_tag(nonce, Aad::from(aad), in_out)
        .map_err(|_| Error::Internal("AES-GCM sealing failed"))?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    Ok(out)
}

/// Reverses [`seal_detached`] in place. On failure `in_out` holds no plaintext (ring
/// leaves the buffer unspecified: it is overwritten with zeros).
pub fn open_detached(
    key: &SecretKey,
    salt: &[u8; DETACHED_SALT_LEN],
    label: &[u8],
    aad: &[u8],
    in_out: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), OpenFailed> {
    let opening = derive(key, salt, label);
    let nonce = Nonce::assume_unique_for_key([0u8; aead::NONCE_LEN]);
    let tag = aead::Tag::from(*tag);
    match opening.open_in_place_separate_tag(nonce, Aad::from(aad), tag, in_out, 0..) {
        Ok(_) => Ok(()),
        Err(_) => {
            zeroize::Zeroize::zeroize(in_out);
            Err(OpenFailed)
        }
    }
}

/// A self-contained sealed box: salt ‖ ciphertext ‖ tag. For records at rest.
pub fn seal_box(
    key: &SecretKey,
    label: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let salt = random_salt()?;
    let mut out = Vec::with_capacity(SALT_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&salt);
    out.extend_from_slice(&seal(key, &salt, label, aad, plaintext));
    Ok(out)
}

/// Opens a [`seal_box`].
pub fn open_box(
    key: &SecretKey,
    label: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<SecretVec, OpenFailed> {
    let (salt, rest) = sealed.split_first_chunk::<SALT_LEN>().ok_or(OpenFailed)?;
    open(key, salt, label, aad, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_round_trip_and_refusals() {
        let k = key(7);
        let salt = [3u8; DETACHED_SALT_LEN];
        let mut buf = b"attack at dawn".to_vec();
        let tag = seal_detached(&k, &salt, b"l", b"aad", &mut buf).unwrap();
        assert_ne!(&buf[..], b"attack at dawn");
        let sealed = buf.clone();
        open_detached(&k, &salt, b"l", b"aad", &mut buf, &tag).unwrap();
        assert_eq!(&buf[..], b"attack at dawn");
        for (salt, label, aad) in [
            (&[4u8; 16], &b"l"[..], &b"aad"[..]),
            (&salt, b"m", b"aad"),
            (&salt, b"l", b"aae"),
        ] {
            let mut b = sealed.clone();
            assert_eq!(
                open_detached(&k, salt, label, aad, &mut b, &tag),
                Err(OpenFailed)
            );
            assert!(
                b.iter().all(|x| *x == 0),
                "no partial plaintext after a failure"
            );
        }
        let mut bad_tag = tag;
        bad_tag[0] ^= 1;
        let mut b = sealed.clone();
        assert!(open_detached(&k, &salt, b"l", b"aad", &mut b, &bad_tag).is_err());
        assert!(open_detached(&key(8), &salt, b"l", b"aad", &mut sealed.clone(), &tag).is_err());
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_every_input_matters() {
        let k = key(1);
        let sealed = seal_box(&k, b"label", b"aad", b"secret dek bytes").unwrap();
        assert_eq!(
            open_box(&k, b"label", b"aad", &sealed)
                .unwrap()
                .expose_secret(),
            b"secret dek bytes"
        );
        assert_eq!(
            open_box(&key(2), b"label", b"aad", &sealed),
            Err(OpenFailed)
        );
        assert_eq!(open_box(&k, b"other", b"aad", &sealed), Err(OpenFailed));
        assert_eq!(open_box(&k, b"label", b"aaD", &sealed), Err(OpenFailed));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open_box(&k, b"label", b"aad", &bad),
                Err(OpenFailed),
                "byte {i}"
            );
        }
        assert_eq!(
            open_box(&k, b"label", b"aad", &sealed[..sealed.len() - 1]),
            Err(OpenFailed)
        );
        assert_eq!(
            open_box(&k, b"label", b"aad", &sealed[..10]),
            Err(OpenFailed)
        );
    }

    #[test]
    fn salts_are_fresh() {
        let k = key(3);
        let a = seal_box(&k, b"l", b"", b"x").unwrap();
        let b = seal_box(&k, b"l", b"", b"x").unwrap();
        assert_ne!(a, b);
    }

    /// Known answer: HKDF-SHA256 per RFC 5869 and AES-256-GCM per NIST SP 800-38D, as
    /// composed here. The expected value was computed independently with Python's
    /// `cryptography` package (HKDF(SHA256, 32, salt, info) then AESGCM(k').encrypt(0^12,
    /// pt, aad)); it pins the construction so a refactor cannot change it silently.
    #[test]
    fn known_answer() {
        let k = key(0x0b);
        let salt = [0x0c; SALT_LEN];
        let ct = seal(&k, &salt, b"keyhold/kat", b"aad", b"plaintext");
        assert_eq!(hex(&ct), KAT_CT);
    }

    const KAT_CT: &str = "56dea890e68afb4b67f2c80ab64415dbc5f31923c50e0b4f62";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
