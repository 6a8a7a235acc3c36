//! The Transit wire: request bodies, the response envelope, the `{"errors": [...]}` error
//! shape with Vault's status codes, and the `vault:vN:` ciphertext.
//!
//! Shapes as Vault and OpenBao serve them (`builtin/logical/transit` in either project,
//! and the API docs "Transit secrets engine (API)"): every answer is a secret envelope
//! (`request_id`, `lease_id`, `renewable`, `lease_duration`, `data`, `wrap_info`,
//! `warnings`, `auth`), and every failure `{"errors": ["..."]}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::base::error::Error;
use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};

/// The one key type served: AES-256-GCM with a 96-bit nonce in Vault's naming.
pub const KEY_TYPE: &str = "aes256-gcm96";

/// Bytes of answer expected, for the zeroizing buffer.
const ANSWER_CAPACITY: usize = 512;

/// A request item of encrypt (`plaintext`), decrypt and rewrap (`ciphertext`): alone at
/// the top level, or one of `batch_input`.
#[derive(Debug, Default, Deserialize)]
pub struct Item {
    /// Base64 plaintext (encrypt).
    #[serde(default)]
    pub plaintext: Option<SecretB64>,
    /// `vault:vN:...` (decrypt, rewrap).
    #[serde(default)]
    pub ciphertext: Option<String>,
    /// Base64 context, bound to the ciphertext.
    #[serde(default)]
    pub context: Option<String>,
    /// Base64 associated data, bound to the ciphertext.
    #[serde(default)]
    pub associated_data: Option<String>,
    /// The version to encrypt with: 0 or the latest only.
    #[serde(default, deserialize_with = "weak::number")]
    pub key_version: Option<u32>,
    /// Convergent encryption's nonce: not served.
    #[serde(default)]
    pub nonce: Option<String>,
    /// Echoed back in a batch result.
    #[serde(default)]
    pub reference: Option<String>,
}

/// The body of encrypt, decrypt and rewrap.
#[derive(Debug, Default, Deserialize)]
pub struct ItemsRequest {
    /// The single item's fields.
    #[serde(flatten)]
    pub item: Item,
    /// Items, answered in order as `batch_results`.
    #[serde(default)]
    pub batch_input: Option<Vec<Item>>,
    /// The status of a batch where some items failed and some did not (default 400).
    #[serde(default, deserialize_with = "weak::number")]
    pub partial_failure_response_code: Option<u16>,
}

/// `POST transit/keys/:name`.
#[derive(Debug, Default, Deserialize)]
pub struct CreateRequest {
    /// Only `aes256-gcm96`.
    #[serde(default, rename = "type")]
    pub key_type: Option<String>,
    /// Key derivation from `context`: not served (see the module docs).
    #[serde(default, deserialize_with = "weak::boolean")]
    pub derived: Option<bool>,
    /// Export of the key: never (hold your own key).
    #[serde(default, deserialize_with = "weak::boolean")]
    pub exportable: Option<bool>,
    /// Backup of the key in plaintext: never.
    #[serde(default, deserialize_with = "weak::boolean")]
    pub allow_plaintext_backup: Option<bool>,
    /// Convergent encryption: not served.
    #[serde(default, deserialize_with = "weak::boolean")]
    pub convergent_encryption: Option<bool>,
}

/// `POST transit/keys/:name/config`.
#[derive(Debug, Default, Deserialize)]
pub struct ConfigRequest {
    /// Versions below it no longer decrypt (Keyhold's `min_decrypt_version`).
    #[serde(default, deserialize_with = "weak::number")]
    pub min_decryption_version: Option<u32>,
    /// Only 0 (the latest).
    #[serde(default, deserialize_with = "weak::number")]
    pub min_encryption_version: Option<u32>,
    /// Only `false`: Keyhold deletes keys by its own schedule.
    #[serde(default, deserialize_with = "weak::boolean")]
    pub deletion_allowed: Option<bool>,
    /// Only `false`.
    #[serde(default, deserialize_with = "weak::boolean")]
    pub exportable: Option<bool>,
    /// Only `false`.
    #[serde(default, deserialize_with = "weak::boolean")]
    pub allow_plaintext_backup: Option<bool>,
}

/// `POST transit/datakey/:type/:name`.
#[derive(Debug, Default, Deserialize)]
pub struct DatakeyRequest {
    /// 128, 256 (default) or 512.
    #[serde(default, deserialize_with = "weak::number")]
    pub bits: Option<u32>,
    /// Base64 context, bound to the ciphertext.
    #[serde(default)]
    pub context: Option<String>,
    /// Base64 associated data, bound to the ciphertext (OpenTofu's state encryption
    /// sends it).
    #[serde(default)]
    pub associated_data: Option<String>,
    /// Convergent encryption's nonce: not served.
    #[serde(default)]
    pub nonce: Option<String>,
}

/// Vault reads its parameters weakly typed (its CLI sends `key=value` pairs as strings):
/// a number may come as `"128"`, a boolean as `"true"`.
mod weak {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Loose {
        Number(u64),
        Bool(bool),
        Text(String),
    }

    /// A number, or a string holding one.
    pub(super) fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let bad = || serde::de::Error::custom("expected a number");
        match Option::<Loose>::deserialize(d)? {
            None => Ok(None),
            Some(Loose::Number(n)) => T::try_from(n).map(Some).map_err(|_| bad()),
            Some(Loose::Text(t)) => t
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|n| T::try_from(n).ok())
                .map(Some)
                .ok_or_else(bad),
            Some(Loose::Bool(_)) => Err(bad()),
        }
    }

    /// A boolean, or a string holding one (`true`, `false`, `1`, `0`).
    pub(super) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Option::<Loose>::deserialize(d)? {
            None => Ok(None),
            Some(Loose::Bool(b)) => Ok(Some(b)),
            Some(Loose::Number(n)) if n <= 1 => Ok(Some(n == 1)),
            Some(Loose::Text(t)) => match t.trim() {
                "true" | "1" => Ok(Some(true)),
                "false" | "0" => Ok(Some(false)),
                _ => Err(serde::de::Error::custom("expected a boolean")),
            },
            Some(_) => Err(serde::de::Error::custom("expected a boolean")),
        }
    }
}

/// A base64 string that carries key material or plaintext: wiped when dropped.
pub struct SecretB64(pub Zeroizing<String>);

impl SecretB64 {
    /// The base64 of `bytes`.
    pub fn encode(bytes: &[u8]) -> Self {
        Self(Zeroizing::new(B64.encode(bytes)))
    }
}

impl std::fmt::Debug for SecretB64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretB64(redacted)")
    }
}

impl<'de> Deserialize<'de> for SecretB64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(Zeroizing::new(s)))
    }
}

impl Serialize for SecretB64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One answer item of encrypt, decrypt, rewrap or datakey.
#[derive(Default, Serialize)]
pub struct ItemResult {
    /// `vault:vN:...`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    /// Base64 plaintext (decrypt, `datakey/plaintext`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<SecretB64>,
    /// The version that encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// The item's `reference`, echoed in a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Why a batch item failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A batch's answer.
#[derive(Serialize)]
pub struct BatchResults {
    /// In the order of `batch_input`.
    pub batch_results: Vec<ItemResult>,
}

/// What `transit/keys/:name` reads (the fields are Vault's, documented in its API; the
/// ones Keyhold does not serve are answered with their "off" value).
#[allow(missing_docs)]
#[derive(Serialize)]
pub struct KeyData {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: &'static str,
    /// Version → creation time (Unix seconds).
    pub keys: std::collections::BTreeMap<String, u64>,
    pub latest_version: u32,
    pub min_available_version: u32,
    pub min_decryption_version: u32,
    pub min_encryption_version: u32,
    pub deletion_allowed: bool,
    pub derived: bool,
    pub exportable: bool,
    pub allow_plaintext_backup: bool,
    pub supports_encryption: bool,
    pub supports_decryption: bool,
    pub supports_derivation: bool,
    pub supports_signing: bool,
    pub imported_key: bool,
    pub auto_rotate_period: u64,
}

/// `LIST transit/keys`.
#[derive(Serialize)]
pub struct KeyNames {
    /// The tenant's AES-256 keys.
    pub keys: Vec<String>,
}

/// The envelope every answer comes in.
#[derive(Serialize)]
struct Envelope<T> {
    request_id: String,
    lease_id: &'static str,
    renewable: bool,
    lease_duration: u64,
    data: T,
    wrap_info: Option<()>,
    warnings: Option<()>,
    auth: Option<()>,
    mount_type: &'static str,
}

/// Vault's request ids are UUIDs; Keyhold's are numbers, written in that shape.
fn request_id(id: u64) -> String {
    format!("00000000-0000-4000-8000-{id:012x}")
}

/// `data` in the envelope, with `status`, serialized into a buffer wiped after use (the
/// data may carry plaintext or a data key).
pub fn answer<T: Serialize>(id: u64, status: StatusCode, data: T) -> Response {
    let envelope = Envelope {
        request_id: request_id(id),
        lease_id: "",
        renewable: false,
        lease_duration: 0,
        data,
        wrap_info: None,
        warnings: None,
        auth: None,
        mount_type: "transit",
    };
    match kms_client::api::ZeroizingBuf::json(&envelope, ANSWER_CAPACITY) {
        Ok(buf) => (
            status,
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
        Err(_) => error(Error::Internal("the answer could not be serialized")),
    }
}

#[derive(Serialize)]
struct Errors {
    errors: Vec<String>,
}

/// Vault's status for `e`: 400 for what the request got wrong (Vault has no 409), 403
/// denied, 404 no such key or route, 405, 413, 429 locked out, 503 sealed or the store
/// down, 500 otherwise.
fn status_of(e: &Error) -> StatusCode {
    let (status, _) = e.status_and_code();
    match e {
        Error::AlreadyExists | Error::KeyDisabled(_) | Error::InvalidState(_) => {
            StatusCode::BAD_REQUEST
        }
        Error::Unreadable(_) => StatusCode::BAD_REQUEST,
        _ => status,
    }
}

/// The `{"errors": [...]}` answer of `e`, carrying Keyhold's error code for the
/// completion (denials alert and count toward the lockout as on the native API).
pub fn error(e: Error) -> Response {
    let (_, code) = e.status_and_code();
    let status = status_of(&e);
    if status.is_server_error() {
        tracing::error!(code = ?code, "transit: {e}");
    }
    let message = match &e {
        Error::Sealed => "Keyhold is sealed".to_owned(),
        Error::DecryptFailed => "cipher: message authentication failed".to_owned(),
        other => other.body().message,
    };
    let mut resp = (
        status,
        axum::Json(Errors {
            errors: vec![message],
        }),
    )
        .into_response();
    resp.extensions_mut().insert(code);
    resp
}

/// An item's error, as a batch result says it.
pub fn item_error(e: &Error) -> String {
    match e {
        Error::DecryptFailed => "cipher: message authentication failed".to_owned(),
        other => other.body().message,
    }
}

/// A request field that is not base64.
pub fn decode_b64(field: &str, value: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    B64.decode(value)
        .map(Zeroizing::new)
        .map_err(|_| Error::InvalidRequest(format!("failed to base64-decode {field}")))
}

/// The authenticated data of a Transit ciphertext: the format's label, the version (so a
/// ciphertext cannot be relabelled to another version), then the context and the
/// associated data, each with its length (so neither can be shifted into the other).
pub fn aad(version: u32, context: &[u8], associated: &[u8]) -> Vec<u8> {
    const LABEL: &[u8] = b"keyhold transit v1\0";
    let mut out = Vec::with_capacity(LABEL.len() + 12 + context.len() + associated.len());
    out.extend_from_slice(LABEL);
    out.extend_from_slice(&version.to_be_bytes());
    for part in [context, associated] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// `vault:v<version>:` + base64(IV ‖ ciphertext ‖ tag).
pub fn encode_ciphertext(
    version: u32,
    iv: &[u8; DETACHED_SALT_LEN],
    ciphertext: &[u8],
    tag: &[u8; TAG_LEN],
) -> String {
    let mut raw = Vec::with_capacity(DETACHED_SALT_LEN + ciphertext.len() + TAG_LEN);
    raw.extend_from_slice(iv);
    raw.extend_from_slice(ciphertext);
    raw.extend_from_slice(tag);
    format!("vault:v{version}:{}", B64.encode(raw))
}

/// A parsed `vault:vN:` ciphertext.
pub struct Ciphertext {
    /// The key version that made it.
    pub version: u32,
    /// The single-use key's salt.
    pub iv: [u8; DETACHED_SALT_LEN],
    /// The ciphertext proper.
    pub body: Vec<u8>,
    /// The GCM tag.
    pub tag: [u8; TAG_LEN],
}

/// Reads a `vault:vN:` ciphertext; anything else is Vault's "invalid ciphertext" 400.
pub fn decode_ciphertext(value: &str) -> Result<Ciphertext, Error> {
    let invalid = |why: &str| Error::InvalidRequest(format!("invalid ciphertext: {why}"));
    let rest = value
        .strip_prefix("vault:v")
        .ok_or_else(|| invalid("no prefix"))?;
    let (version, b64) = rest.split_once(':').ok_or_else(|| invalid("no version"))?;
    let version: u32 = version
        .parse()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| invalid("bad version"))?;
    let raw = B64
        .decode(b64)
        .map_err(|_| invalid("could not decode ciphertext"))?;
    if raw.len() < DETACHED_SALT_LEN + TAG_LEN {
        return Err(invalid("too short"));
    }
    let (iv, rest) = raw.split_at(DETACHED_SALT_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    Ok(Ciphertext {
        version,
        iv: iv.try_into().map_err(|_| invalid("too short"))?,
        body: body.to_vec(),
        tag: tag.try_into().map_err(|_| invalid("too short"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertexts_round_trip_and_bad_ones_are_refused() {
        let c = encode_ciphertext(7, &[1; 16], b"abc", &[2; 16]);
        assert!(c.starts_with("vault:v7:"));
        let d = decode_ciphertext(&c).unwrap();
        assert_eq!(
            (d.version, d.iv, d.body.as_slice(), d.tag),
            (7, [1; 16], &b"abc"[..], [2; 16])
        );
        for bad in [
            "",
            "vault:v0:AAAA",
            "vault:vx:AAAA",
            "vault:v1",
            "vault:v1:!!",
            "vault:v1:AAAA",
            "keyhold:v1:AAAA",
        ] {
            assert!(decode_ciphertext(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_are_read_weakly_typed_as_vault_reads_them() {
        let r: DatakeyRequest = serde_json::from_str(r#"{"bits":"128"}"#).unwrap();
        assert_eq!(r.bits, Some(128));
        let r: DatakeyRequest = serde_json::from_str(r#"{"bits":512}"#).unwrap();
        assert_eq!(r.bits, Some(512));
        let r: CreateRequest =
            serde_json::from_str(r#"{"exportable":"true","derived":false}"#).unwrap();
        assert_eq!((r.exportable, r.derived), (Some(true), Some(false)));
        assert!(serde_json::from_str::<DatakeyRequest>(r#"{"bits":"many"}"#).is_err());
        assert!(serde_json::from_str::<DatakeyRequest>(r#"{"bits":-1}"#).is_err());
        assert!(serde_json::from_str::<CreateRequest>(r#"{"exportable":"yes"}"#).is_err());
    }

    #[test]
    fn context_and_associated_data_cannot_be_shifted_into_each_other() {
        assert_ne!(aad(1, b"ab", b"c"), aad(1, b"a", b"bc"));
        assert_ne!(aad(1, b"", b""), aad(2, b"", b""));
    }
}
