//! The Ciphertext Data Integrity Value of the XKS Encrypt API (spec Appendix C): Base64 of
//! SHA-256 over `additionalAuthenticatedData ‖ ciphertextMetadata ‖ initializationVector ‖
//! ciphertext ‖ authenticationTag`, absent fields empty, no lengths (it guards against
//! accidental bit flips, not an adversary). Computed on the encrypt output *before* the
//! test decryption, so that a corruption after it would not go unnoticed.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The CDIV of one encrypt call: `aad` from the request, the rest from the response.
pub fn cdiv(
    aad: &[u8],
    ciphertext_metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> String {
    let digest = Sha256::new()
        .chain_update(aad)
        .chain_update(ciphertext_metadata)
        .chain_update(iv)
        .chain_update(ciphertext)
        .chain_update(tag)
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        kms_client::hex::decode(&s.replace(' ', "")).unwrap()
    }

    /// The worked example of the XKS proxy API specification, Appendix C.
    #[test]
    fn the_specification_example() {
        let aad = hex(
            "70 72 6f 6a 65 63 74 3d 6e 69 6c 65 2c 64 65 70 61 72 74 6d 65 6e 74 3d 6d 61 72 6b 65 74 69 6e 67",
        );
        let metadata = hex("6b 65 79 5f 76 65 72 73 69 6f 6e 3d 31");
        let iv = hex("1c ca e5 47 0f 39 70 02 54 77 90 31");
        let ciphertext = hex("82 1c 64 2b 5b 71 78 33 67 de af 18");
        let tag = hex("bc 1c 4d da 77 07 d6 81 24 47 c5 95 5e 99 b2 61");
        assert_eq!((aad.len(), metadata.len()), (33, 13));
        assert_eq!(
            cdiv(&aad, &metadata, &iv, &ciphertext, &tag),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
        // Absent fields are empty: without metadata it is the hash of the rest.
        let mut rest = aad.clone();
        rest.extend_from_slice(&iv);
        rest.extend_from_slice(&ciphertext);
        rest.extend_from_slice(&tag);
        assert_eq!(
            cdiv(&aad, &[], &iv, &ciphertext, &tag),
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&rest))
        );
        // Any flipped bit changes it.
        let mut flipped = ciphertext.clone();
        flipped[0] ^= 1;
        assert_ne!(
            cdiv(&aad, &metadata, &iv, &flipped, &tag),
            cdiv(&aad, &metadata, &iv, &ciphertext, &tag)
        );
    }
}
