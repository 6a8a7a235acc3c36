//! Segment sealing and opening (the STREAM construction of `FORMAT.md`): the nonce of
//! segment `i` is `0x000000 ‖ u64 i ‖ last-flag`, the AAD is SHA-256 of the whole header.

use crate::backend::{self, Aes256Gcm, NONCE_LEN};
use crate::Error;

/// The per-message segment cipher.
pub(crate) struct SegmentCipher {
    aead: Aes256Gcm,
    aad: [u8; 32],
}

fn nonce(index: u64, last: bool) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    n
}

impl SegmentCipher {
    /// A cipher for the message whose encoded header is `header` under `data_key`.
    pub(crate) fn new(data_key: &[u8; 32], header: &[u8]) -> Self {
        Self {
            aead: Aes256Gcm::new(data_key),
            aad: backend::sha256(&[header]),
        }
    }

    /// Encrypts segment `index` in place, appending the tag.
    pub(crate) fn seal(&self, index: u64, last: bool, buf: &mut Vec<u8>) {
        self.aead.seal_in_place(&nonce(index, last), &self.aad, buf);
    }

    /// Encrypts segment `index` in place; returns the tag.
    pub(crate) fn seal_detached(
        &self,
        index: u64,
        last: bool,
        buf: &mut [u8],
    ) -> [u8; backend::TAG_LEN] {
        self.aead
            .seal_in_place_separate_tag(&nonce(index, last), &self.aad, buf)
    }

    /// Decrypts segment `index` (ciphertext ‖ tag) in place; returns the plaintext length.
    pub(crate) fn open(&self, index: u64, last: bool, buf: &mut [u8]) -> Result<usize, Error> {
        self.aead
            .open_in_place(&nonce(index, last), &self.aad, buf)
            .map_err(|_| Error::DecryptFailed)
    }
}

/// The segment layout of an envelope body of `body_len` bytes with segments of `seg`
/// plaintext bytes: (number of segments, ciphertext length of the last one).
/// Fails (opaquely) for lengths no writer produces.
pub(crate) fn layout(body_len: u64, seg: u64) -> Result<(u64, u64), Error> {
    let full = seg + backend::TAG_LEN as u64;
    if body_len < backend::TAG_LEN as u64 {
        return Err(Error::DecryptFailed);
    }
    let n = body_len.div_ceil(full);
    let last = body_len - (n - 1) * full;
    // Every segment holds a tag; only a lone segment may be empty (the empty message).
    if last < backend::TAG_LEN as u64 || (n > 1 && last == backend::TAG_LEN as u64) {
        return Err(Error::DecryptFailed);
    }
    Ok((n, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_distinct_and_laid_out() {
        assert_eq!(nonce(1, true), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_ne!(nonce(1, true), nonce(1, false));
        assert_ne!(nonce(1, false), nonce(2, false));
    }

    #[test]
    fn layouts() {
        assert_eq!(layout(16, 64).unwrap(), (1, 16));
        assert_eq!(layout(80, 64).unwrap(), (1, 80));
        assert!(layout(81, 64).is_err(), "second segment shorter than a tag");
        assert!(layout(96, 64).is_err(), "second segment empty");
        assert_eq!(layout(97, 64).unwrap(), (2, 17));
        assert!(layout(15, 64).is_err());
    }
}
