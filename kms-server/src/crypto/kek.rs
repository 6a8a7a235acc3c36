//! KEK material of each algorithm, decrypted and ready to wrap and unwrap.
//!
//! - `aes-256-gcm`: a 256-bit key ([`SecretKey`]); wrapped DEKs use suite 1 of the
//!   wrapped-DEK format (`format.md`).
//! - `rsa-oaep-3072-sha256`, `rsa-oaep-4096-sha256` (and `rsa-oaep-2048-sha256`, for
//!   Microsoft DKE keys): an RSA key pair; wrapped DEKs use
//!   suite 2 (`kms_client::rsa_oaep`). Stored as PKCS#8 DER, sealed under the master key
//!   like any version's material. Clients may wrap offline with the exported public key.
//!
//! **Why aws-lc-rs for the RSA private key.** The `rsa` crate's decryption is not constant
//! time (RUSTSEC-2023-0071, the Marvin attack: timing of the private-key operation leaks
//! enough to decrypt or sign). Unwrap is reachable from the network, so an attacker could
//! time it. aws-lc-rs (AWS-LC, a BoringSSL fork) blinds the RSA operation, runs the
//! modular exponentiation in constant time and decodes OAEP padding without
//! data-dependent branches; every failure is one opaque error. `rsa` is used only for
//! public-key work (client offline wrap, JWK encoding), where no secret is involved.
//! AWS-LC frees key structures with `OPENSSL_free`, which cleanses the memory first, so
//! the private key does not outlive the [`Kek`] in the heap.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    OAEP_SHA256_MGF1SHA256,
};
use kms_client::api::Algorithm;
use kms_client::rsa_oaep;
use zeroize::Zeroizing;

use crate::base::error::Error;
use crate::crypto::aead::OpenFailed;
use crate::crypto::format::{self, Header};
use crate::crypto::secret::{SecretKey, SecretVec};

/// Decrypted material of one KEK version.
pub enum Kek {
    /// AES-256-GCM (HKDF per-wrap keys).
    Aes(SecretKey),
    /// An RSA-OAEP-SHA256 key pair.
    Rsa(RsaKek),
    /// Not a key: Secret Data a KMIP client registered, kept to be read back; it wraps
    /// and opens nothing.
    Secret(SecretVec),
}

/// An RSA key pair held for OAEP: the private half decrypts (unwrap), the public half
/// encrypts (server-side wrap) and is exported.
pub struct RsaKek {
    private: OaepPrivateDecryptingKey,
    public: OaepPublicEncryptingKey,
    /// SubjectPublicKeyInfo DER, for export.
    spki: Vec<u8>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kek::Aes(_) => f.write_str("Kek::Aes([REDACTED])"),
            Kek::Rsa(r) => write!(f, "Kek::Rsa({} bits, [REDACTED])", r.bits()),
            Kek::Secret(_) => f.write_str("Kek::Secret([REDACTED])"),
        }
    }
}

fn rsa_size(bits: usize) -> Result<KeySize, Error> {
    match bits {
        2048 => Ok(KeySize::Rsa2048),
        3072 => Ok(KeySize::Rsa3072),
        4096 => Ok(KeySize::Rsa4096),
        _ => Err(Error::Internal("unsupported RSA size")),
    }
}

impl Kek {
    /// New material for `algorithm`, and its stored form (to be sealed). RSA generation
    /// takes from a tenth of a second to a few seconds: call it off the async workers.
    pub fn generate(algorithm: Algorithm) -> Result<(Self, SecretVec), Error> {
        if !algorithm.is_key() {
            return Err(Error::InvalidRequest(
                "secret data is registered through KMIP, never generated".into(),
            ));
        }
        match algorithm.rsa_bits() {
            None => {
                let key = SecretKey::generate()?;
                let stored = SecretVec::new(key.expose_secret().to_vec());
                Ok((Kek::Aes(key), stored))
            }
            Some(bits) => {
                let private = PrivateDecryptingKey::generate(rsa_size(bits)?)
                    .map_err(|_| Error::Internal("RSA key generation failed"))?;
                let der = private
                    .as_der()
                    .map_err(|_| Error::Internal("RSA key encoding failed"))?;
                let stored = SecretVec::new(der.as_ref().to_vec());
                Ok((Kek::Rsa(RsaKek::new(private)?), stored))
            }
        }
    }

    /// Material from its stored form (decrypted from the version record).
    pub fn from_stored(algorithm: Algorithm, bytes: &[u8]) -> Result<Self, Error> {
        if !algorithm.is_key() {
            return Ok(Kek::Secret(SecretVec::new(bytes.to_vec())));
        }
        match algorithm.rsa_bits() {
            None => SecretKey::from_slice(bytes)
                .map(Kek::Aes)
                .ok_or(Error::Corrupt("KEK version length")),
            Some(bits) => {
                let private = PrivateDecryptingKey::from_pkcs8(bytes)
                    .map_err(|_| Error::Corrupt("RSA KEK version is not a PKCS#8 RSA key"))?;
                if private.key_size_bits() != bits {
                    return Err(Error::Corrupt("RSA KEK version of the wrong size"));
                }
                RsaKek::new(private).map(Kek::Rsa)
            }
        }
    }

    /// Wraps `dek` for `header` bound to `canonical_context`.
    pub fn wrap(
        &self,
        header: &Header,
        dek: &[u8],
        canonical_context: &[u8],
    ) -> Result<Vec<u8>, Error> {
        match self {
            Kek::Aes(key) => format::wrap(key, header, dek, canonical_context),
            Kek::Rsa(rsa) => rsa.wrap(header, dek, canonical_context),
            Kek::Secret(_) => Err(Error::InvalidRequest(
                "this object is secret data, not a key: it wraps nothing".into(),
            )),
        }
    }

    /// Opens a wrapped DEK of this key's suite; anything else is the opaque [`OpenFailed`].
    pub fn unwrap(
        &self,
        wrapped: &[u8],
        canonical_context: &[u8],
    ) -> Result<SecretVec, OpenFailed> {
        match self {
            Kek::Aes(key) => format::unwrap(key, wrapped, canonical_context),
            Kek::Rsa(rsa) => rsa.unwrap(wrapped, canonical_context),
            Kek::Secret(_) => Err(OpenFailed),
        }
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256) decryption with no label: Microsoft DKE's
    /// `decrypt`. Keyhold's own RSA wrapped DEKs carry a label (their header and context),
    /// so they never open here, and what opens here never opens as a wrapped DEK. `None`
    /// for AES keys.
    pub fn decrypt_unlabelled(&self, ciphertext: &[u8]) -> Option<Result<SecretVec, OpenFailed>> {
        match self {
            Kek::Aes(_) | Kek::Secret(_) => None,
            Kek::Rsa(r) => Some(if ciphertext.len() == r.private.key_size_bytes() {
                decrypt_oaep_sha256(&r.private, ciphertext, &[])
            } else {
                Err(OpenFailed)
            }),
        }
    }

    /// The RSA public key (SubjectPublicKeyInfo DER); `None` for symmetric keys.
    pub fn public_key_der(&self) -> Option<&[u8]> {
        match self {
            Kek::Aes(_) | Kek::Secret(_) => None,
            Kek::Rsa(r) => Some(&r.spki),
        }
    }
}

impl RsaKek {
    fn new(private: PrivateDecryptingKey) -> Result<Self, Error> {
        let public_key = private.public_key();
        let spki = public_key
            .as_der()
            .map_err(|_| Error::Internal("RSA public key encoding failed"))?
            .as_ref()
            .to_vec();
        let public = OaepPublicEncryptingKey::new(public_key)
            .map_err(|_| Error::Internal("RSA public key unusable"))?;
        let private = OaepPrivateDecryptingKey::new(private)
            .map_err(|_| Error::Internal("RSA private key unusable"))?;
        Ok(Self {
            private,
            public,
            spki,
        })
    }

    fn bits(&self) -> usize {
        self.public.key_size_bits()
    }

    fn wrap(
        &self,
        header: &Header,
        dek: &[u8],
        canonical_context: &[u8],
    ) -> Result<Vec<u8>, Error> {
        format::check_dek_len(dek.len())?;
        let head = rsa_oaep::header(&header.key_id.0, header.version);
        let label = rsa_oaep::label(&head, canonical_context);
        let mut out = vec![0u8; head.len() + self.public.ciphertext_size()];
        out[..head.len()].copy_from_slice(&head);
        let written = self
            .public
            .encrypt(
                &OAEP_SHA256_MGF1SHA256,
                dek,
                &mut out[head.len()..],
                Some(label.as_bytes()),
            )
            .map_err(|_| Error::Internal("RSA-OAEP encryption failed"))?
            .len();
        if written != self.public.ciphertext_size() {
            return Err(Error::Internal("RSA-OAEP encryption failed"));
        }
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], canonical_context: &[u8]) -> Result<SecretVec, OpenFailed> {
        if wrapped.len() != rsa_oaep::HEADER_LEN + self.private.key_size_bytes()
            || format::suite(wrapped) != Some(rsa_oaep::SUITE_RSA_OAEP_SHA256)
        {
            return Err(OpenFailed);
        }
        let (head, ct) = wrapped.split_at(rsa_oaep::HEADER_LEN);
        let label = rsa_oaep::label(head, canonical_context);
        decrypt_oaep_sha256(&self.private, ct, label.as_bytes())
    }
}

/// RSA-OAEP (SHA-256, MGF1-SHA-256) decryption with aws-lc-rs: the server's one RSA
/// private-key operation, and what the Wycheproof vectors test. The DEK must be 16 to 64
/// bytes. Every failure is the same opaque error.
pub fn decrypt_oaep_sha256(
    key: &OaepPrivateDecryptingKey,
    ciphertext: &[u8],
    label: &[u8],
) -> Result<SecretVec, OpenFailed> {
    let mut out = Zeroizing::new(vec![0u8; key.min_output_size()]);
    let n = key
        .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, Some(label))
        .map_err(|_| OpenFailed)?
        .len();
    out.truncate(n);
    Ok(SecretVec::new(std::mem::take(&mut *out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::format::KeyId;

    fn header() -> Header {
        Header {
            key_id: KeyId([5; 16]),
            version: 2,
        }
    }

    /// DKE's unlabelled OAEP and suite 2's labelled OAEP never open each other's
    /// ciphertexts under the same key.
    #[test]
    fn unlabelled_and_suite_2_ciphertexts_do_not_cross() {
        let (kek, _) = Kek::generate(Algorithm::RsaOaep2048Sha256).unwrap();
        let Kek::Rsa(rsa) = &kek else { panic!("RSA") };
        let dek = [3u8; 32];
        let wrapped = kek.wrap(&header(), &dek, b"ctx").unwrap();
        let (head, ct) = wrapped.split_at(rsa_oaep::HEADER_LEN);
        assert!(kek.decrypt_unlabelled(ct).unwrap().is_err());
        let mut plain = vec![0u8; rsa.public.ciphertext_size()];
        let n = rsa
            .public
            .encrypt(&OAEP_SHA256_MGF1SHA256, &dek, &mut plain, None)
            .unwrap()
            .len();
        let unlabelled = &plain[..n];
        assert_eq!(
            kek.decrypt_unlabelled(unlabelled)
                .unwrap()
                .unwrap()
                .expose_secret(),
            &dek
        );
        let mut as_suite_2 = head.to_vec();
        as_suite_2.extend_from_slice(unlabelled);
        assert!(kek.unwrap(&as_suite_2, b"ctx").is_err());
    }

    #[test]
    fn rsa_round_trip_binds_header_and_context_and_reloads() {
        let (kek, stored) = Kek::generate(Algorithm::RsaOaep3072Sha256).unwrap();
        let c = format::canonical_context(&[("a".into(), "1".into())].into()).unwrap();
        let w = kek.wrap(&header(), &[9; 32], &c).unwrap();
        assert_eq!(w.len(), 24 + 384);
        assert_eq!(format::parse_header(&w).unwrap(), header());
        assert_eq!(kek.unwrap(&w, &c).unwrap().expose_secret(), &[9; 32]);
        // Another context, a changed header byte or ciphertext byte: refused.
        let other = format::canonical_context(&Default::default()).unwrap();
        assert!(kek.unwrap(&w, &other).is_err());
        for i in [4, 19, 23, 24, 200, w.len() - 1] {
            let mut bad = w.clone();
            bad[i] ^= 1;
            assert!(kek.unwrap(&bad, &c).is_err(), "byte {i}");
        }
        assert!(kek.unwrap(&w[..w.len() - 1], &c).is_err());
        // The stored form reloads into the same key.
        let again = Kek::from_stored(Algorithm::RsaOaep3072Sha256, stored.expose_secret()).unwrap();
        assert_eq!(again.unwrap(&w, &c).unwrap().expose_secret(), &[9; 32]);
        assert_eq!(again.public_key_der(), kek.public_key_der());
        // Stored bytes of another algorithm or size are refused.
        assert!(Kek::from_stored(Algorithm::RsaOaep4096Sha256, stored.expose_secret()).is_err());
        assert!(Kek::from_stored(Algorithm::Aes256Gcm, stored.expose_secret()).is_err());
    }

    #[test]
    fn suites_do_not_cross() {
        let (aes, _) = Kek::generate(Algorithm::Aes256Gcm).unwrap();
        let (rsa, _) = Kek::generate(Algorithm::RsaOaep3072Sha256).unwrap();
        let c = format::canonical_context(&Default::default()).unwrap();
        let wa = aes.wrap(&header(), &[1; 32], &c).unwrap();
        let wr = rsa.wrap(&header(), &[1; 32], &c).unwrap();
        assert!(rsa.unwrap(&wa, &c).is_err());
        assert!(aes.unwrap(&wr, &c).is_err());
    }

    /// Wycheproof RSA-OAEP (SHA-256, MGF1-SHA-256) vectors at 2048, 3072 and 4096 bits,
    /// through the server's decryption function: every valid vector decrypts to its
    /// message (labels included), every invalid one fails.
    #[test]
    fn wycheproof_rsa_oaep_sha256() {
        use wycheproof::rsa_oaep::{TestName, TestSet};
        use wycheproof::TestResult;
        let mut counts = [0usize; 3];
        for name in [
            TestName::Rsa2048Sha256Mgf1Sha256,
            TestName::Rsa3072Sha256Mgf1Sha256,
            TestName::Rsa4096Sha256Mgf1Sha256,
        ] {
            let set = TestSet::load(name).unwrap();
            for group in &set.test_groups {
                let private = PrivateDecryptingKey::from_pkcs8(&group.pkcs8).unwrap();
                let key = OaepPrivateDecryptingKey::new(private).unwrap();
                for t in &group.tests {
                    let got = decrypt_oaep_sha256(&key, &t.ct, &t.label);
                    match t.result {
                        TestResult::Valid => {
                            assert_eq!(
                                got.map(|p| p.expose_secret().to_vec()).ok().as_deref(),
                                Some(&t.pt[..]),
                                "{name:?} tc {}: {}",
                                t.tc_id,
                                t.comment
                            );
                            counts[0] += 1;
                        }
                        TestResult::Invalid => {
                            assert!(
                                got.is_err(),
                                "{name:?} tc {} accepted: {}",
                                t.tc_id,
                                t.comment
                            );
                            counts[1] += 1;
                        }
                        TestResult::Acceptable => counts[2] += 1,
                    }
                }
            }
        }
        assert!(
            counts[0] > 50 && counts[1] > 50,
            "too few vectors ran: {counts:?}"
        );
        eprintln!(
            "wycheproof RSA-OAEP-SHA256: {} valid, {} invalid, {} acceptable",
            counts[0], counts[1], counts[2]
        );
    }
}
