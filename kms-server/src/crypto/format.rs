#![doc = include_str!("format.md")]

use crate::base::error::Error;
use crate::crypto::aead::{self, OpenFailed, SALT_LEN, TAG_LEN};
use crate::crypto::secret::{SecretKey, SecretVec};
use kms_client::api::Context;

/// Magic bytes, `"KW"`.
pub const MAGIC: [u8; 2] = *b"KW";
/// Format version written by this code.
pub const VERSION: u8 = 1;
/// Suite 1: AES-256-GCM under an HKDF-SHA256 per-wrap key.
pub const SUITE_AES256GCM_HKDF: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 16 + 4 + SALT_LEN;
/// Smallest DEK accepted.
pub const MIN_DEK_LEN: usize = 16;
/// Largest DEK accepted.
pub const MAX_DEK_LEN: usize = 64;

const LABEL: &[u8] = b"keyhold/wrapped-dek/v1";

/// A KEK's 128-bit identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        kms_client::hex::encode(&self.0)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

/// The parsed header of a wrapped DEK. Says which KEK version to use; authenticates
/// nothing by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// KEK id.
    pub key_id: KeyId,
    /// KEK version.
    pub version: u32,
}

/// Checks the context limits, then encodes it canonically (the one encoding Keyhold
/// uses, shared with the `envelope` crate: see `envelope::context`).
pub fn canonical_context(context: &Context) -> Result<Vec<u8>, Error> {
    envelope::context::canonical(context).map_err(|e| match e {
        envelope::Error::InvalidInput(msg) => Error::InvalidRequest(msg),
        _ => Error::Internal("context encoding failed"),
    })
}

/// Checks a DEK's length.
pub fn check_dek_len(len: usize) -> Result<(), Error> {
    if (MIN_DEK_LEN..=MAX_DEK_LEN).contains(&len) {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "plaintext DEK must be {MIN_DEK_LEN} to {MAX_DEK_LEN} bytes, got {len}"
        )))
    }
}

fn encode_header(header: &Header, salt: &[u8; SALT_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = VERSION;
    h[3] = SUITE_AES256GCM_HKDF;
    h[4..20].copy_from_slice(&header.key_id.0);
    h[20..24].copy_from_slice(&header.version.to_be_bytes());
    h[24..].copy_from_slice(salt);
    h
}

fn aad(header: &[u8], canonical_context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + canonical_context.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(canonical_context);
    aad
}

/// Wraps `dek` under `kek` (the material of `header.key_id` at `header.version`).
/// `canonical_context` comes from [`canonical_context`].
pub fn wrap(
    kek: &SecretKey,
    header: &Header,
    dek: &[u8],
    canonical_context: &[u8],
) -> Result<Vec<u8>, Error> {
    check_dek_len(dek.len())?;
    let salt = aead::random_salt()?;
    let head = encode_header(header, &salt);
    let sealed = aead::seal(kek, &salt, LABEL, &aad(&head, canonical_context), dek);
    if sealed.len() != dek.len() + TAG_LEN {
        return Err(Error::Internal("AEAD seal failed"));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The suite byte of a wrapped DEK, if it is long enough to have one.
pub fn suite(wrapped: &[u8]) -> Option<u8> {
    wrapped.get(3).copied()
}

/// Whether `wrapped` is (by its suite byte) an RSA-wrapped DEK: its unwrap is a private-key
/// operation of about a millisecond, which callers run off the async workers.
pub fn is_rsa(wrapped: &[u8]) -> bool {
    suite(wrapped) == Some(kms_client::rsa_oaep::SUITE_RSA_OAEP_SHA256)
}

/// RSA ciphertext lengths Keyhold produces (3072- and 4096-bit moduli).
const RSA_CIPHERTEXT_LENS: [usize; 2] = [384, 512];

/// Reads the header of a wrapped DEK of either suite. Any structural problem is the opaque
/// [`OpenFailed`].
pub fn parse_header(wrapped: &[u8]) -> Result<Header, OpenFailed> {
    let len = wrapped.len();
    if len < 24 || wrapped[0..2] != MAGIC || wrapped[2] != VERSION {
        return Err(OpenFailed);
    }
    let length_ok = match wrapped[3] {
        SUITE_AES256GCM_HKDF => {
            (HEADER_LEN + MIN_DEK_LEN + TAG_LEN..=HEADER_LEN + MAX_DEK_LEN + TAG_LEN).contains(&len)
        }
        kms_client::rsa_oaep::SUITE_RSA_OAEP_SHA256 => RSA_CIPHERTEXT_LENS
            .iter()
            .any(|n| len == kms_client::rsa_oaep::HEADER_LEN + n),
        _ => false,
    };
    if !length_ok {
        return Err(OpenFailed);
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&wrapped[4..20]);
    let mut version = [0u8; 4];
    version.copy_from_slice(&wrapped[20..24]);
    let version = u32::from_be_bytes(version);
    if version == 0 {
        return Err(OpenFailed);
    }
    Ok(Header {
        key_id: KeyId(id),
        version,
    })
}

/// Unwraps a suite-1 wrapped DEK with `kek`, which the caller looked up from
/// [`parse_header`].
pub fn unwrap(
    kek: &SecretKey,
    wrapped: &[u8],
    canonical_context: &[u8],
) -> Result<SecretVec, OpenFailed> {
    parse_header(wrapped)?;
    if suite(wrapped) != Some(SUITE_AES256GCM_HKDF) {
        return Err(OpenFailed);
    }
    let (head, body) = wrapped.split_at(HEADER_LEN);
    let salt: &[u8; SALT_LEN] = head[24..].try_into().map_err(|_| OpenFailed)?;
    let dek = aead::open(kek, salt, LABEL, &aad(head, canonical_context), body)?;
    Ok(dek)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> SecretKey {
        SecretKey::from_slice(&[7; 32]).unwrap()
    }

    fn header() -> Header {
        Header {
            key_id: KeyId([9; 16]),
            version: 3,
        }
    }

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trip_and_layout() {
        let c = canonical_context(&ctx(&[("tenant", "acme"), ("bucket", "b1")])).unwrap();
        let w = wrap(&kek(), &header(), &[0xAA; 32], &c).unwrap();
        assert_eq!(w.len(), 104);
        assert_eq!(&w[..4], &[b'K', b'W', 1, 1]);
        assert_eq!(parse_header(&w).unwrap(), header());
        assert_eq!(unwrap(&kek(), &w, &c).unwrap().expose_secret(), &[0xAA; 32]);
    }

    #[test]
    fn flip_each_byte_and_context() {
        let c = canonical_context(&ctx(&[("a", "1")])).unwrap();
        let w = wrap(&kek(), &header(), &[1; 32], &c).unwrap();
        for i in 0..w.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = w.clone();
                bad[i] ^= bit;
                assert!(unwrap(&kek(), &bad, &c).is_err(), "byte {i} bit {bit:#x}");
            }
        }
        for other in [ctx(&[]), ctx(&[("a", "2")]), ctx(&[("a", "1"), ("b", "")])] {
            let oc = canonical_context(&other).unwrap();
            assert!(unwrap(&kek(), &w, &oc).is_err());
        }
        for cut in [0, 1, 55, 56, 71, w.len() - 1] {
            assert!(unwrap(&kek(), &w[..cut], &c).is_err(), "truncated to {cut}");
        }
        let mut longer = w.clone();
        longer.push(0);
        assert!(unwrap(&kek(), &longer, &c).is_err());
        let other_kek = SecretKey::from_slice(&[8; 32]).unwrap();
        assert!(unwrap(&other_kek, &w, &c).is_err());
    }

    /// The encoding itself is tested in `envelope::context`; here, that the server uses it
    /// and turns its limit errors into `InvalidRequest`.
    #[test]
    fn context_encoding_is_envelopes() {
        let c = ctx(&[("k", "v")]);
        assert_eq!(
            canonical_context(&c).unwrap(),
            envelope::context::canonical(&c).unwrap()
        );
        assert!(matches!(
            canonical_context(&ctx(&[("", "x")])),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn limits() {
        assert!(check_dek_len(15).is_err());
        assert!(check_dek_len(65).is_err());
        assert!(check_dek_len(16).is_ok() && check_dek_len(64).is_ok());
        let big: Context = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(canonical_context(&big).is_err());
        assert!(canonical_context(&ctx(&[("", "x")])).is_err());
        let long_value = "v".repeat(1025);
        assert!(canonical_context(&ctx(&[("k", &long_value)])).is_err());
        assert!(wrap(&kek(), &header(), &[0; 8], &[0, 0, 0, 0]).is_err());
    }

    /// Golden vector made by an independent implementation of `format.md` (Python,
    /// `cryptography`): `tests/data/wrapped_dek_v1.py`. Version 1 must open forever.
    #[test]
    fn golden_v1_opens() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/data/wrapped_dek_v1.json")).unwrap();
        let hex = |k: &str| crate::crypto::seal::unhex(v[k].as_str().unwrap()).unwrap();
        let kek = SecretKey::from_slice(&hex("kek")).unwrap();
        let wrapped = hex("wrapped");
        let ctx: Context = serde_json::from_value(v["context"].clone()).unwrap();
        let header = parse_header(&wrapped).unwrap();
        assert_eq!(header.key_id.to_hex(), v["key_id"].as_str().unwrap());
        assert_eq!(u64::from(header.version), v["version"].as_u64().unwrap());
        let dek = unwrap(&kek, &wrapped, &canonical_context(&ctx).unwrap()).unwrap();
        assert_eq!(dek.expose_secret(), hex("dek").as_slice());
        assert!(unwrap(&kek, &wrapped, &canonical_context(&Context::new()).unwrap()).is_err());
    }

    #[test]
    fn key_id_hex() {
        let id = KeyId([0xAB; 16]);
        assert_eq!(KeyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(KeyId::from_hex("zz"), None);
        assert_eq!(KeyId::from_hex(&"é".repeat(16)), None);
    }
}
