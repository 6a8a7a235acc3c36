//! Wrapped DEKs under RSA KEKs (suite 2 of the wrapped-DEK format), shared by the server
//! and clients so the layout and the OAEP label are defined once.
//!
//! An RSA KEK (`rsa-oaep-3072-sha256`, `rsa-oaep-4096-sha256`, and `rsa-oaep-2048-sha256`
//! for Microsoft DKE keys) exports its public key
//! (`GET /v1/keys/{name}/public-key`), so a client can wrap a DEK **offline**, without a
//! round trip; only unwrap needs the server, which holds the private key and decrypts
//! with a constant-time implementation (aws-lc-rs, see `kms-server`'s `kek` module).
//!
//! ```text
//! offset  len  field
//! 0       2    magic "KW"
//! 2       1    format version 0x01
//! 3       1    suite 0x02 = RSA-OAEP, SHA-256, MGF1-SHA-256
//! 4       16   key id
//! 20      4    key version (big-endian, >= 1)
//! 24      k    RSAES-OAEP ciphertext of the DEK (k = modulus bytes: 384 or 512)
//!
//! label = lowercase hex of SHA-256("keyhold/wrapped-dek/v1/rsa-oaep-sha256" ‖ 0x00 ‖
//!                                  header (the first 24 bytes) ‖ canonical(context))
//! ```
//!
//! The OAEP label binds the header and the encryption context exactly as the AES suite's
//! AAD does: a different context, key id or version makes OAEP decoding fail. The label is
//! the hex text of a digest (64 ASCII bytes) so that every OAEP implementation can carry it
//! (some take the label as a string).
//!
//! The offline side ([`OfflineWrapper`], feature `client`) uses the `rsa` crate for
//! public-key work only. `rsa` has RUSTSEC-2023-0071 (a timing side channel in *private*
//! key operations); encryption with a public key involves no secret key, and the DEK's
//! owner is the one encrypting, so the advisory does not apply to this use.

use sha2::{Digest, Sha256};

/// Suite byte of RSA-OAEP-SHA256 wrapped DEKs.
pub const SUITE_RSA_OAEP_SHA256: u8 = 2;
/// Length of the clear header.
pub const HEADER_LEN: usize = 24;

const LABEL_DOMAIN: &[u8] = b"keyhold/wrapped-dek/v1/rsa-oaep-sha256\0";

/// The clear header of an RSA-wrapped DEK.
pub fn header(key_id: &[u8; 16], version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(b"KW");
    h[2] = 1;
    h[3] = SUITE_RSA_OAEP_SHA256;
    h[4..20].copy_from_slice(key_id);
    h[20..24].copy_from_slice(&version.to_be_bytes());
    h
}

/// The OAEP label binding `header` and the canonical context (see the module docs).
pub fn label(header: &[u8], canonical_context: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(LABEL_DOMAIN)
        .chain_update(header)
        .chain_update(canonical_context)
        .finalize();
    crate::hex::encode(&digest)
}

#[cfg(feature = "client")]
pub use offline::{OfflineProvider, OfflineWrapper};

#[cfg(feature = "client")]
mod offline {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use envelope::{Context, DataKeyPair, Dek, KeyRef, ProviderError, ProviderErrorKind};
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    use rsa::{BigUint, Oaep, RsaPublicKey};

    use crate::api::PublicKeyResponse;
    use crate::Error;

    /// Smallest and largest DEK the server accepts (as for the AES suite).
    const DEK_LEN: std::ops::RangeInclusive<usize> = 16..=64;

    /// Wraps DEKs offline under one version of an RSA KEK, from its exported public key.
    pub struct OfflineWrapper {
        key: String,
        key_id: [u8; 16],
        version: u32,
        public: RsaPublicKey,
    }

    impl std::fmt::Debug for OfflineWrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("OfflineWrapper")
                .field("key", &self.key)
                .field("version", &self.version)
                .field("bits", &(self.public.size() * 8))
                .finish()
        }
    }

    fn bad(detail: impl Into<String>) -> Error {
        Error::Config(format!("public key: {}", detail.into()))
    }

    impl OfflineWrapper {
        /// From the answer of `GET /v1/keys/{name}/public-key` (or that JSON saved to a
        /// file). Checks that the PEM and the JWK are the same key, of the size the
        /// algorithm says.
        pub fn from_response(r: &PublicKeyResponse) -> Result<Self, Error> {
            let bits = r
                .algorithm
                .rsa_bits()
                .ok_or_else(|| bad(format!("{} is not an RSA algorithm", r.algorithm.as_str())))?;
            let public =
                RsaPublicKey::from_public_key_pem(&r.pem).map_err(|e| bad(format!("PEM: {e}")))?;
            if public.size() * 8 != bits {
                return Err(bad(format!(
                    "the modulus has {} bits, {} says {bits}",
                    public.size() * 8,
                    r.algorithm.as_str()
                )));
            }
            let jwk_n = URL_SAFE_NO_PAD
                .decode(&r.jwk.n)
                .map_err(|_| bad("JWK n is not base64url"))?;
            let jwk_e = URL_SAFE_NO_PAD
                .decode(&r.jwk.e)
                .map_err(|_| bad("JWK e is not base64url"))?;
            if r.jwk.kty != "RSA"
                || BigUint::from_bytes_be(&jwk_n) != *public.n()
                || BigUint::from_bytes_be(&jwk_e) != *public.e()
            {
                return Err(bad("the JWK and the PEM are different keys"));
            }
            let id = hex16(&r.id).ok_or_else(|| bad("id is not 32 hex digits"))?;
            if r.version == 0 {
                return Err(bad("version 0"));
            }
            Ok(Self {
                key: r.key.clone(),
                key_id: id,
                version: r.version,
                public,
            })
        }

        /// Key name.
        pub fn key(&self) -> &str {
            &self.key
        }

        /// KEK version the wrapped DEKs name.
        pub fn version(&self) -> u32 {
            self.version
        }

        /// Wraps `dek` (16 to 64 bytes) bound to `context`; the server unwraps it.
        pub fn wrap(&self, dek: &[u8], context: &Context) -> Result<Vec<u8>, Error> {
            if !DEK_LEN.contains(&dek.len()) {
                return Err(Error::Config(format!(
                    "a DEK must be 16 to 64 bytes, got {}",
                    dek.len()
                )));
            }
            let canonical = envelope::context::canonical(context)
                .map_err(|e| Error::Config(format!("context: {e}")))?;
            let head = super::header(&self.key_id, self.version);
            let label = super::label(&head, &canonical);
            let ct = self
                .public
                .encrypt(
                    &mut rand::rngs::OsRng,
                    Oaep::new_with_label::<sha2::Sha256, _>(label),
                    dek,
                )
                .map_err(|e| bad(format!("encryption failed: {e}")))?;
            let mut out = Vec::with_capacity(head.len() + ct.len());
            out.extend_from_slice(&head);
            out.extend_from_slice(&ct);
            Ok(out)
        }
    }

    fn hex16(s: &str) -> Option<[u8; 16]> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(out)
    }

    /// An [`envelope::KeyProvider`] that makes DEKs locally and wraps them offline under
    /// an RSA KEK's public key (no server call to seal), and unwraps through the server.
    pub struct OfflineProvider {
        wrapper: OfflineWrapper,
        client: crate::Client,
    }

    impl OfflineProvider {
        /// Seals under `wrapper`'s key; opens through `client`.
        pub fn new(wrapper: OfflineWrapper, client: crate::Client) -> Self {
            Self { wrapper, client }
        }
    }

    impl envelope::KeyProvider for OfflineProvider {
        async fn datakey(
            &self,
            key: &str,
            context: &Context,
        ) -> Result<DataKeyPair, ProviderError> {
            if key != self.wrapper.key {
                return Err(ProviderError::new(ProviderErrorKind::NotFound, None));
            }
            let dek =
                Dek::generate().map_err(|_| ProviderError::new(ProviderErrorKind::Other, None))?;
            let wrapped = self
                .wrapper
                .wrap(dek.expose_secret(), context)
                .map_err(|e| ProviderError::new(ProviderErrorKind::Other, Some(Box::new(e))))?;
            Ok(DataKeyPair {
                dek,
                wrapped,
                key: KeyRef {
                    name: self.wrapper.key.clone(),
                    version: self.wrapper.version,
                },
            })
        }

        async fn unwrap(
            &self,
            key: &KeyRef,
            wrapped: &[u8],
            context: &Context,
        ) -> Result<Dek, ProviderError> {
            envelope::KeyProvider::unwrap(&self.client, key, wrapped, context).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_label_binding() {
        let h = header(&[7; 16], 3);
        assert_eq!(&h[..4], &[b'K', b'W', 1, 2]);
        assert_eq!(&h[20..], &3u32.to_be_bytes());
        let l = label(&h, &[0, 0, 0, 0]);
        assert_eq!(l.len(), 64);
        assert!(l.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(l, label(&header(&[7; 16], 4), &[0, 0, 0, 0]));
        assert_ne!(l, label(&h, &[0, 0, 0, 1]));
    }
}
