//! The CSE wire: the request bodies and token claims as the KACLS API reference defines
//! them, and Keyhold's wrapped-key layout.
//!
//! Wrapped key layout (at most 1 KiB, base64 on the wire):
//! `b"khc\x01"` ‖ version (u32 BE) ‖ IV (16) ‖ tag (16) ‖ perimeter id length (u16 BE) ‖
//! perimeter id ‖ ciphertext (the DEK, 1 to 128 bytes).

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};

use super::{bad, CseError, MAGIC, MAX_KEY};

/// The AAD binding a wrapped key to its resource and perimeter (and version).
pub(super) fn aad(resource_name: &str, perimeter_id: &str, version: u32) -> Vec<u8> {
    let mut out = b"keyhold-cse-wrap/v1\0".to_vec();
    for part in [resource_name, perimeter_id] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&version.to_be_bytes());
    out
}

/// A parsed wrapped key.
pub(super) struct Wrapped<'a> {
    pub(super) version: u32,
    pub(super) iv: [u8; DETACHED_SALT_LEN],
    pub(super) tag: [u8; TAG_LEN],
    pub(super) perimeter_id: String,
    pub(super) ciphertext: &'a [u8],
}

pub(super) fn parse_wrapped(b: &[u8]) -> Option<Wrapped<'_>> {
    let rest = b.strip_prefix(MAGIC.as_slice())?;
    let (version, rest) = rest.split_at_checked(4)?;
    let (iv, rest) = rest.split_at_checked(DETACHED_SALT_LEN)?;
    let (tag, rest) = rest.split_at_checked(TAG_LEN)?;
    let (len, rest) = rest.split_at_checked(2)?;
    let len = usize::from(u16::from_be_bytes(len.try_into().ok()?));
    let (perimeter, ciphertext) = rest.split_at_checked(len)?;
    if ciphertext.is_empty() || ciphertext.len() > MAX_KEY {
        return None;
    }
    Some(Wrapped {
        version: u32::from_be_bytes(version.try_into().ok()?),
        iv: iv.try_into().ok()?,
        tag: tag.try_into().ok()?,
        perimeter_id: String::from_utf8(perimeter.to_vec()).ok()?,
        ciphertext,
    })
}

/// Google's authorization token, as far as the checks need it.
#[derive(Debug, Deserialize)]
pub(super) struct Authz {
    pub(super) email: String,
    #[serde(default)]
    pub(super) email_type: Option<String>,
    pub(super) resource_name: String,
    pub(super) role: String,
    pub(super) kacls_url: String,
    #[serde(default)]
    pub(super) perimeter_id: Option<String>,
    /// Delegation: the entity allowed to act for the user on `resource_name`.
    #[serde(default)]
    pub(super) delegated_to: Option<String>,
    /// The Google Workspace domain the token was issued for this KACLS's owner.
    #[serde(default)]
    pub(super) kacls_owner_domain: Option<String>,
}

/// The IdP's authentication token, or a delegated one this KACLS signed.
#[derive(Debug, Deserialize)]
pub(super) struct Authn {
    #[serde(default)]
    pub(super) email: Option<String>,
    #[serde(default)]
    pub(super) google_email: Option<String>,
    #[serde(default)]
    pub(super) exp: Option<u64>,
    /// A delegated token's: for whom, and for which resource.
    #[serde(default)]
    pub(super) delegated_to: Option<String>,
    #[serde(default)]
    pub(super) resource_name: Option<String>,
}

// No `Debug`: it carries tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct DelegateRequest {
    pub(super) authentication: String,
    pub(super) authorization: String,
    #[serde(default)]
    pub(super) reason: String,
}

// No `Debug`: it carries key material or tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct WrapRequest {
    pub(super) authentication: String,
    pub(super) authorization: String,
    pub(super) key: String,
    #[serde(default)]
    pub(super) reason: String,
}

// No `Debug`: it carries key material or tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct UnwrapRequest {
    pub(super) authentication: String,
    pub(super) authorization: String,
    pub(super) wrapped_key: String,
    #[serde(default)]
    pub(super) reason: String,
}

// No `Debug`: it carries key material or tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct DigestRequest {
    pub(super) authorization: String,
    pub(super) wrapped_key: String,
    #[serde(default)]
    pub(super) reason: String,
}

// No `Debug`: it carries key material or tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct PrivilegedWrapRequest {
    pub(super) authentication: String,
    pub(super) key: String,
    #[serde(default)]
    pub(super) perimeter_id: String,
    pub(super) resource_name: String,
    #[serde(default)]
    pub(super) reason: String,
}

// No `Debug`: it carries key material or tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct PrivilegedUnwrapRequest {
    pub(super) authentication: String,
    pub(super) wrapped_key: String,
    pub(super) resource_name: String,
    #[serde(default)]
    pub(super) reason: String,
}

// No `Debug`: it carries key material or tokens. Fields Google adds later are ignored.
#[derive(Deserialize)]
pub(super) struct RewrapRequest {
    pub(super) authorization: String,
    pub(super) original_kacls_url: String,
    pub(super) wrapped_key: String,
    #[serde(default)]
    pub(super) reason: String,
}

/// A KACLS-to-KACLS token's claims (`rewrap` on the new key service, `privilegedunwrap`
/// on the original; Google's KACLS reference, "Authentication tokens"): for which
/// resource, for which key service (`kacls_url`); `aud` is `kacls-migration`.
// No `Debug`: it carries key material or tokens.
#[derive(Deserialize)]
pub(super) struct Migration {
    /// Not in Google's schema (the user is not named); kept for the record when sent.
    #[serde(default)]
    pub(super) email: Option<String>,
    /// The KACLS the data is being decrypted on: the recipient of `privilegedunwrap`.
    pub(super) kacls_url: String,
    pub(super) resource_name: String,
}

/// A request body, or 400 saying what is wrong with it.
pub(super) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CseError> {
    serde_json::from_slice(body).map_err(|e| bad(&format!("the request body: {e}")))
}
