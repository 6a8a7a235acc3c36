//! Secret key types. Every byte of key material in the server lives in one of these.
//!
//! Rules (STYLE.md): zeroized on drop; no `Clone`, `Serialize` or `Display`; `Debug` prints
//! `[REDACTED]`; the accessor's name says "secret"; equality is constant time. An answer
//! that hands key material to a caller is written through [`SecretJson`].

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::base::error::Error;

/// Length in bytes of every symmetric key Keyhold holds (AES-256, the master key, KEKs).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key: the master key, a KEK version, or a key-file key.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        Ok(Self(bytes))
    }

    /// Copies a key out of `bytes`, which must be exactly [`KEY_LEN`] long. The caller
    /// remains responsible for zeroizing its own copy.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(array))
    }

    /// The key bytes.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for SecretKey {}

/// Variable-length secret bytes (a DEK on its way in or out, a decrypted record).
pub struct SecretVec(Zeroizing<Vec<u8>>);

impl SecretVec {
    /// Takes ownership of `bytes`; they are zeroized on drop.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// `len` fresh random bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Result<Self, Error> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        Ok(Self(bytes))
    }

    /// The secret bytes.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Hands the bytes on, still zeroizing, to the wire type.
    pub fn into_wire(self) -> kms_client::api::SecretBytes {
        let mut inner = self.0;
        kms_client::api::SecretBytes::new(std::mem::take(&mut *inner))
    }
}

impl fmt::Debug for SecretVec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretVec([REDACTED; {} bytes])", self.0.len())
    }
}

impl PartialEq for SecretVec {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for SecretVec {}

/// A JSON answer that carries key material (DEKs): serialized once into a buffer sized
/// for it up front (`capacity`; a [`kms_client::api::ZeroizingBuf`], which wipes what it
/// leaves if the guess was short), and handed to hyper as `Bytes` whose owner zeroizes the buffer once the
/// last reference is gone, after the answer is written. axum's `Json` grows its buffer by
/// reallocation, leaving partial copies of the keys in freed memory, and frees the final
/// one unwiped. (Copies the HTTP and TLS layers make on the way out are theirs.)
pub struct SecretJson<T> {
    /// The answer.
    pub value: T,
    /// Bytes expected (a guess: enough for a typical answer of this shape).
    pub capacity: usize,
}

impl<T: serde::Serialize> axum::response::IntoResponse for SecretJson<T> {
    fn into_response(self) -> axum::response::Response {
        match kms_client::api::ZeroizingBuf::json(&self.value, self.capacity) {
            // Never stored by a cache or a browser: the answer carries key material.
            Ok(buf) => (
                [
                    (
                        axum::http::header::CONTENT_TYPE,
                        axum::http::HeaderValue::from_static("application/json"),
                    ),
                    (
                        axum::http::header::CACHE_CONTROL,
                        axum::http::HeaderValue::from_static("no-store"),
                    ),
                ],
                axum::body::Bytes::from_owner(buf),
            )
                .into_response(),
            // Serializing Keyhold's own answer types does not fail; if it did, no key
            // leaves (the API's error body, whichever protocol asked).
            Err(_) => Error::Internal("the answer could not be serialized").into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse as _;

    #[test]
    fn debug_prints_no_key_bytes() {
        let k = SecretKey::from_slice(&[0x42; KEY_LEN]).unwrap();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("42") && !dbg.contains("66"), "{dbg}");
        let v = SecretVec::new(vec![0x42; 40]);
        let dbg = format!("{v:?}");
        assert!(!dbg.contains("42,") && dbg.contains("REDACTED"), "{dbg}");
    }

    #[test]
    fn generated_keys_differ_and_compare() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a, SecretKey::from_slice(a.expose_secret()).unwrap());
        assert!(SecretKey::from_slice(&[0; 31]).is_none());
    }

    /// The body is exactly what `serde_json` writes, whatever the capacity guessed (too
    /// small: the buffer moves, possibly several times), with the JSON content type.
    #[tokio::test]
    async fn secret_json_answers_the_serialized_value_whatever_the_capacity() {
        let value = serde_json::json!({
            "results": (0..50).map(|i| serde_json::json!({"unwrap": {"plaintext": "A".repeat(44), "key": format!("k{i}"), "version": i}})).collect::<Vec<_>>(),
        });
        let expected = serde_json::to_vec(&value).unwrap();
        for capacity in [0, 1, 100, expected.len(), expected.len() * 2] {
            let response = SecretJson {
                value: value.clone(),
                capacity,
            }
            .into_response();
            assert_eq!(response.status(), axum::http::StatusCode::OK);
            assert_eq!(
                response.headers()[axum::http::header::CONTENT_TYPE],
                "application/json"
            );
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(&body[..], &expected[..], "capacity {capacity}");
        }
    }
}
