//! The primitives, from one of two backends chosen at build time: ring (default) or the
//! RustCrypto crates (feature `rustcrypto`, pure Rust, which wins when both are enabled).
//! Both produce byte-identical output; the golden-file tests run under each in CI.
//!
//! AES-256-GCM with a 96-bit nonce and a 128-bit tag; HKDF-SHA256; SHA-256.

#[cfg(not(any(feature = "ring", feature = "rustcrypto")))]
compile_error!("envelope needs a crypto backend: enable feature `ring` (default) or `rustcrypto`");

use zeroize::Zeroizing;

/// AES-GCM tag length.
pub(crate) const TAG_LEN: usize = 16;
/// AES-GCM nonce length.
pub(crate) const NONCE_LEN: usize = 12;

/// The authentication tag did not verify (or the input was too short to hold one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadTag;

/// SHA-256 of the concatenation of `parts`.
pub(crate) fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    #[cfg(feature = "rustcrypto")]
    {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }
    #[cfg(not(feature = "rustcrypto"))]
    {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            ctx.update(p);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// HKDF-SHA256 (RFC 5869): extract with `salt` from `ikm`, then expand one 32-byte output
/// per entry of `infos`.
pub(crate) fn hkdf_sha256<const N: usize>(
    salt: &[u8],
    ikm: &[u8],
    infos: [&[&[u8]]; N],
) -> [Zeroizing<[u8; 32]>; N] {
    #[cfg(feature = "rustcrypto")]
    {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm);
        infos.map(|info| {
            let mut out = Zeroizing::new([0u8; 32]);
            let joined: Vec<u8> = info.concat();
            // 32 bytes is far below HKDF's 255 × 32 limit: expand cannot fail.
            let _ = hk.expand(&joined, &mut *out);
            out
        })
    }
    #[cfg(not(feature = "rustcrypto"))]
    {
        struct Len32;
        impl ring::hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(ikm);
        infos.map(|info| {
            let mut out = Zeroizing::new([0u8; 32]);
            // 32 bytes is far below HKDF's 255 × 32 limit: expand and fill cannot fail.
            if let Ok(okm) = prk.expand(info, Len32) {
                let _ = okm.fill(&mut *out);
            }
            out
        })
    }
}

/// An AES-256-GCM key, ready for use. The raw key bytes are not kept here (the caller's
/// copy is zeroizing). What is left in memory after drop depends on the backend:
/// - ring: its expanded key schedule and GHASH key are not zeroized (a ring limitation).
/// - RustCrypto: the AES round keys are (the `aes` crate's `zeroize` feature, enabled in
///   `Cargo.toml` for this reason; `rustcrypto_key_schedule_zeroizes_on_drop` checks it).
///   The GHASH key `H = AES_K(0^128)` inside `polyval` 0.6 is not: its CPU-dispatching
///   backend has no zeroizing drop. `H` is authentication-key material (with it, tags
///   can be forged under this data key), not the encryption key.
pub(crate) struct Aes256Gcm {
    #[cfg(feature = "rustcrypto")]
    key: aes_gcm::Aes256Gcm,
    #[cfg(not(feature = "rustcrypto"))]
    key: ring::aead::LessSafeKey,
}

impl Aes256Gcm {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        #[cfg(feature = "rustcrypto")]
        {
            use aes_gcm::KeyInit;
            Self {
                key: aes_gcm::Aes256Gcm::new(key.into()),
            }
        }
        #[cfg(not(feature = "rustcrypto"))]
        {
            // A 32-byte key is always valid for AES-256-GCM.
            let unbound = match ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key) {
                Ok(k) => k,
                Err(_) => unreachable!("AES-256-GCM accepts every 32-byte key"),
            };
            Self {
                key: ring::aead::LessSafeKey::new(unbound),
            }
        }
    }

    /// Encrypts `buf` in place and appends the tag.
    pub(crate) fn seal_in_place(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) {
        let tag = self.seal_in_place_separate_tag(nonce, aad, buf);
        buf.extend_from_slice(&tag);
    }

    /// Encrypts `buf` in place and returns the tag.
    pub(crate) fn seal_in_place_separate_tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        #[cfg(feature = "rustcrypto")]
        {
            use aes_gcm::AeadInPlace;
            // Fails only for messages over 2^36 bytes; segments are at most 16 MiB.
            if let Ok(tag) = self.key.encrypt_in_place_detached(nonce.into(), aad, buf) {
                out.copy_from_slice(&tag);
            }
        }
        #[cfg(not(feature = "rustcrypto"))]
        {
            let nonce = ring::aead::Nonce::assume_unique_for_key(*nonce);
            // Fails only for messages over 2^36 bytes; segments are at most 16 MiB.
            if let Ok(tag) =
                self.key
                    .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), buf)
            {
                out.copy_from_slice(tag.as_ref());
            }
        }
        out
    }

    /// Decrypts `buf` (ciphertext ‖ tag) in place; returns the plaintext length.
    pub(crate) fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, BadTag> {
        if buf.len() < TAG_LEN {
            return Err(BadTag);
        }
        #[cfg(feature = "rustcrypto")]
        {
            use aes_gcm::AeadInPlace;
            let (ct, tag) = buf.split_at_mut(buf.len() - TAG_LEN);
            let tag = aes_gcm::Tag::clone_from_slice(tag);
            self.key
                .decrypt_in_place_detached(nonce.into(), aad, ct, &tag)
                .map_err(|_| BadTag)?;
            Ok(ct.len())
        }
        #[cfg(not(feature = "rustcrypto"))]
        {
            let nonce = ring::aead::Nonce::assume_unique_for_key(*nonce);
            self.key
                .open_in_place(nonce, ring::aead::Aad::from(aad), buf)
                .map(|p| p.len())
                .map_err(|_| BadTag)
        }
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    getrandom::getrandom(buf)
}

/// The name of the backend in use, for diagnostics and test output.
pub fn name() -> &'static str {
    if cfg!(feature = "rustcrypto") {
        "rustcrypto"
    } else {
        "ring"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wycheproof AES-GCM vectors (256-bit keys, 96-bit nonces, 128-bit tags: the
    /// parameters this crate uses) against whichever backend is compiled in.
    #[test]
    fn wycheproof_aes_256_gcm() {
        use wycheproof::aead::{TestName, TestSet};
        use wycheproof::TestResult;
        let set = TestSet::load(TestName::AesGcm).unwrap();
        let mut ran = 0;
        for group in set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let key: [u8; 32] = t.key.as_slice().try_into().unwrap();
                let nonce: [u8; 12] = t.nonce.as_slice().try_into().unwrap();
                let cipher = Aes256Gcm::new(&key);
                let mut ct = [t.ct.as_slice(), t.tag.as_slice()].concat();
                let opened = cipher.open_in_place(&nonce, &t.aad, &mut ct);
                match t.result {
                    TestResult::Valid => {
                        let n = opened.unwrap_or_else(|_| panic!("tc {} should open", t.tc_id));
                        assert_eq!(&ct[..n], t.pt.as_slice(), "tc {}", t.tc_id);
                        let mut buf = t.pt.to_vec();
                        cipher.seal_in_place(&nonce, &t.aad, &mut buf);
                        assert_eq!(
                            buf,
                            [t.ct.as_slice(), t.tag.as_slice()].concat(),
                            "tc {}",
                            t.tc_id
                        );
                    }
                    TestResult::Invalid => {
                        assert!(opened.is_err(), "tc {} must be rejected", t.tc_id)
                    }
                    TestResult::Acceptable => {}
                }
                ran += 1;
            }
        }
        assert!(ran > 50, "only {ran} vectors ran");
    }

    /// RFC 5869 test case 1 (SHA-256), first 32 bytes of OKM.
    #[test]
    fn hkdf_rfc5869_case1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let [okm] = hkdf_sha256(&salt, &ikm, [&[info.as_slice()]]);
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }

    /// The RustCrypto AES key schedule (the round keys inside `aes_gcm::Aes256Gcm`) is
    /// wiped on drop: this only compiles when the `aes` crate's `zeroize` feature is on.
    #[cfg(feature = "rustcrypto")]
    #[test]
    fn rustcrypto_key_schedule_zeroizes_on_drop() {
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizes_on_drop::<aes_gcm::aes::Aes256>();
    }

    #[test]
    fn sha256_abc() {
        let d = sha256(&[b"a", b"bc"]);
        assert_eq!(d[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
