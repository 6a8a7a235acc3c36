//! The envelope header (see `FORMAT.md`) and the key schedule derived from it.

use zeroize::Zeroizing;

use crate::backend;
use crate::secret::Dek;
use crate::Error;

/// Magic bytes: `"KHEV"`.
pub const MAGIC: [u8; 4] = *b"KHEV";
/// Format version written and read by this code.
pub const VERSION: u8 = 1;
/// Suite 1: HKDF-SHA256 key derivation and commitment, AES-256-GCM segments.
pub const SUITE_1: u8 = 1;
/// Default plaintext bytes per segment.
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Smallest segment size accepted.
pub const MIN_SEGMENT_SIZE: u32 = 64;
/// Largest segment size accepted.
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;
/// Longest key name.
pub const MAX_KEY_NAME_LEN: usize = 255;
/// Longest wrapped DEK.
pub const MAX_WRAPPED_LEN: usize = 4096;
/// Length of the fixed part of the header (magic .. key-name length).
const FIXED_LEN: usize = 4 + 1 + 1 + 4 + 1;
/// Length of the digest, salt and commitment that end the header.
const TAIL_LEN: usize = 32 + 32 + 32;
/// Longest possible header.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + MAX_KEY_NAME_LEN + 4 + 2 + MAX_WRAPPED_LEN + TAIL_LEN;

const INFO_DATA_KEY: &[u8] = b"keyhold-envelope/v1/data-key";
const INFO_COMMITMENT: &[u8] = b"keyhold-envelope/v1/commitment";

/// Which KEK (name and version) wrapped the DEK.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    /// Key name at the provider.
    pub name: String,
    /// Key version.
    pub version: u32,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Plaintext bytes per segment.
    pub segment_size: u32,
    /// The KEK that wrapped the DEK.
    pub key: KeyRef,
    /// The wrapped DEK, as the provider returned it.
    pub wrapped_dek: Vec<u8>,
    /// SHA-256 of the canonical encryption context.
    pub context_digest: [u8; 32],
    /// Per-message random salt.
    pub salt: [u8; 32],
    /// Key commitment.
    pub commitment: [u8; 32],
}

/// Checks a segment size.
pub fn check_segment_size(size: u32) -> Result<(), Error> {
    if (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "segment size must be {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes"
        )))
    }
}

/// Checks a key name.
pub fn check_key_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_KEY_NAME_LEN {
        return Err(Error::InvalidInput(format!(
            "key names must be 1 to {MAX_KEY_NAME_LEN} bytes"
        )));
    }
    Ok(())
}

impl Header {
    /// Everything but the commitment: the input to the key schedule.
    pub(crate) fn encode_prefix(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(FIXED_LEN + self.key.name.len() + self.wrapped_dek.len() + 70);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(SUITE_1);
        out.extend_from_slice(&self.segment_size.to_be_bytes());
        // Lengths are checked when the header is built; `as` cannot truncate here.
        out.push(self.key.name.len() as u8);
        out.extend_from_slice(self.key.name.as_bytes());
        out.extend_from_slice(&self.key.version.to_be_bytes());
        out.extend_from_slice(&(self.wrapped_dek.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped_dek);
        out.extend_from_slice(&self.context_digest);
        out.extend_from_slice(&self.salt);
        out
    }

    /// The encoded header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_prefix();
        out.extend_from_slice(&self.commitment);
        out
    }

    /// Given the first bytes of an envelope, the header length if it can be told yet, or
    /// how many bytes are needed to tell more. Malformed prefixes fail (opaquely).
    pub(crate) fn needed(prefix: &[u8]) -> Result<usize, Error> {
        if prefix.len() < FIXED_LEN {
            return Ok(FIXED_LEN);
        }
        if prefix[0..4] != MAGIC || prefix[4] != VERSION || prefix[5] != SUITE_1 {
            return Err(Error::DecryptFailed);
        }
        let seg = u32::from_be_bytes([prefix[6], prefix[7], prefix[8], prefix[9]]);
        if check_segment_size(seg).is_err() {
            return Err(Error::DecryptFailed);
        }
        let name_len = prefix[10] as usize;
        if name_len == 0 {
            return Err(Error::DecryptFailed);
        }
        let upto_wrapped_len = FIXED_LEN + name_len + 4 + 2;
        if prefix.len() < upto_wrapped_len {
            return Ok(upto_wrapped_len);
        }
        let w = upto_wrapped_len - 2;
        let wrapped_len = u16::from_be_bytes([prefix[w], prefix[w + 1]]) as usize;
        if wrapped_len == 0 || wrapped_len > MAX_WRAPPED_LEN {
            return Err(Error::DecryptFailed);
        }
        Ok(upto_wrapped_len + wrapped_len + TAIL_LEN)
    }

    /// Parses a header from the start of `bytes`; returns it and its length.
    pub fn parse(bytes: &[u8]) -> Result<(Header, usize), Error> {
        let mut need = Self::needed(bytes)?;
        loop {
            if bytes.len() < need {
                return Err(Error::DecryptFailed);
            }
            let next = Self::needed(&bytes[..need])?;
            if next == need {
                break;
            }
            need = next;
        }
        let h = &bytes[..need];
        let name_len = h[10] as usize;
        let mut p = FIXED_LEN;
        let name = std::str::from_utf8(&h[p..p + name_len]).map_err(|_| Error::DecryptFailed)?;
        p += name_len;
        let version = u32::from_be_bytes([h[p], h[p + 1], h[p + 2], h[p + 3]]);
        p += 4;
        let wrapped_len = u16::from_be_bytes([h[p], h[p + 1]]) as usize;
        p += 2;
        let wrapped_dek = h[p..p + wrapped_len].to_vec();
        p += wrapped_len;
        let take32 = |at: usize| -> [u8; 32] {
            let mut a = [0u8; 32];
            a.copy_from_slice(&h[at..at + 32]);
            a
        };
        let header = Header {
            segment_size: u32::from_be_bytes([h[6], h[7], h[8], h[9]]),
            key: KeyRef {
                name: name.to_owned(),
                version,
            },
            wrapped_dek,
            context_digest: take32(p),
            salt: take32(p + 32),
            commitment: take32(p + 64),
        };
        Ok((header, need))
    }

    /// Reads exactly one header from `r`; returns it and its encoded bytes.
    pub fn read<R: std::io::Read>(r: &mut R) -> Result<(Header, Vec<u8>), Error> {
        let mut buf = Vec::with_capacity(256);
        let mut need = FIXED_LEN;
        while buf.len() < need {
            let start = buf.len();
            buf.resize(need, 0);
            r.read_exact(&mut buf[start..])
                .map_err(eof_is_decrypt_failed)?;
            need = Self::needed(&buf)?;
        }
        let (h, _) = Self::parse(&buf)?;
        Ok((h, buf))
    }

    /// Async [`Header::read`].
    pub async fn read_async<R: tokio::io::AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<(Header, Vec<u8>), Error> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::with_capacity(256);
        let mut need = FIXED_LEN;
        while buf.len() < need {
            let start = buf.len();
            buf.resize(need, 0);
            r.read_exact(&mut buf[start..])
                .await
                .map_err(eof_is_decrypt_failed)?;
            need = Self::needed(&buf)?;
        }
        let (h, _) = Self::parse(&buf)?;
        Ok((h, buf))
    }
}

fn eof_is_decrypt_failed(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::DecryptFailed
    } else {
        Error::Io(e)
    }
}

/// The keys of one message, derived from the DEK: the segment key and the commitment.
pub(crate) struct MessageKeys {
    pub(crate) data_key: Zeroizing<[u8; 32]>,
    pub(crate) commitment: Zeroizing<[u8; 32]>,
}

/// `prk = HKDF-Extract(salt, DEK)`; `data_key = Expand(prk, INFO_DATA_KEY ‖ H(prefix))`;
/// `commitment = Expand(prk, INFO_COMMITMENT ‖ H(prefix))`, H = SHA-256.
pub(crate) fn derive(dek: &Dek, salt: &[u8; 32], header_prefix: &[u8]) -> MessageKeys {
    let h = backend::sha256(&[header_prefix]);
    let [data_key, commitment] = backend::hkdf_sha256(
        salt,
        dek.expose_secret(),
        [&[INFO_DATA_KEY, &h], &[INFO_COMMITMENT, &h]],
    );
    MessageKeys {
        data_key,
        commitment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            segment_size: 4096,
            key: KeyRef {
                name: "orders".into(),
                version: 3,
            },
            wrapped_dek: vec![7; 104],
            context_digest: [1; 32],
            salt: [2; 32],
            commitment: [3; 32],
        }
    }

    #[test]
    fn encode_parse_read() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), 11 + 6 + 4 + 2 + 104 + 96);
        let (p, n) = Header::parse(&bytes).unwrap();
        assert_eq!((p, n), (h.clone(), bytes.len()));
        let mut with_body = bytes.clone();
        with_body.extend_from_slice(b"segments");
        let mut r = std::io::Cursor::new(&with_body);
        let (p, raw) = Header::read(&mut r).unwrap();
        assert_eq!((p, raw), (h, bytes.clone()));
        for cut in 0..bytes.len() {
            assert!(Header::parse(&bytes[..cut]).is_err(), "cut {cut}");
            assert!(matches!(
                Header::read(&mut std::io::Cursor::new(&bytes[..cut])),
                Err(Error::DecryptFailed)
            ));
        }
    }

    #[test]
    fn bad_fixed_fields() {
        let bytes = sample().encode();
        for (i, v) in [(0, b'X'), (4, 2), (5, 9), (6, 0xff), (10, 0)] {
            let mut b = bytes.clone();
            b[i] = v;
            assert!(Header::parse(&b).is_err(), "byte {i}");
        }
    }
}
