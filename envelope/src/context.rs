//! Encryption contexts and their canonical encoding (shared with kms-server, so a context
//! means the same bytes to the envelope and to the key service).

use std::collections::BTreeMap;

use crate::Error;

/// An encryption context: string→string, bound to the envelope (and to the wrapped DEK by
/// the provider). Not secret.
pub type Context = BTreeMap<String, String>;

/// Most entries accepted.
pub const MAX_ENTRIES: usize = 64;
/// Longest key, bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Longest value, bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// The canonical encoding: `u32 count ‖ (u32 len ‖ key ‖ u32 len ‖ value)*` in ascending
/// byte order of the keys, big-endian lengths. Injective: two different maps never encode
/// the same. Checks the limits first.
pub fn canonical(context: &Context) -> Result<Vec<u8>, Error> {
    if context.len() > MAX_ENTRIES {
        return Err(Error::InvalidInput(format!(
            "context has {} entries; at most {MAX_ENTRIES} are allowed",
            context.len()
        )));
    }
    let mut out = Vec::with_capacity(4 + context.len() * 16);
    out.extend_from_slice(&(context.len() as u32).to_be_bytes());
    for (k, v) in context {
        if k.is_empty() || k.len() > MAX_KEY_LEN {
            return Err(Error::InvalidInput(format!(
                "context keys must be 1 to {MAX_KEY_LEN} bytes"
            )));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(Error::InvalidInput(format!(
                "context values must be at most {MAX_VALUE_LEN} bytes"
            )));
        }
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    Ok(out)
}

/// SHA-256 of the canonical encoding: the context binding stored in the header.
pub fn digest(context: &Context) -> Result<[u8; 32], Error> {
    Ok(crate::backend::sha256(&[&canonical(context)?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encoding_and_limits() {
        assert_eq!(canonical(&ctx(&[])).unwrap(), [0, 0, 0, 0]);
        assert_eq!(
            canonical(&ctx(&[("k", "v")])).unwrap(),
            [0, 0, 0, 1, 0, 0, 0, 1, b'k', 0, 0, 0, 1, b'v']
        );
        assert_ne!(
            canonical(&ctx(&[("ab", "c")])).unwrap(),
            canonical(&ctx(&[("a", "bc")])).unwrap()
        );
        assert!(canonical(&ctx(&[("", "x")])).is_err());
        let big: Context = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(canonical(&big).is_err());
        assert!(canonical(&ctx(&[("k", &"v".repeat(1025))])).is_err());
    }
}
