//! Wire types of the native v1 API (see `DESIGN.md` section 4 and `kms-server/openapi.yaml`).
//!
//! Bytes are standard base64 in JSON. Request types reject unknown fields; response types
//! accept them, so that a newer server can add fields without breaking older clients.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

mod approvals;
pub use approvals::{
    ApprovalAction, ApprovalInfo, ApprovalList, ApprovalPending, ApprovalPolicies, ApprovalPolicy,
    ApprovalScope, ApprovalStatus, DecideRequest, Gate, SetApprovalPolicyRequest, Vote,
    APPROVAL_HEADER,
};
mod brake;
pub use brake::{BrakeHold, BrakeStatus, BrakeSubject, ReleaseBrakeRequest, ReleaseBrakeResponse};

/// An encryption context: a string→string map bound to a wrapped key as associated data.
///
/// Unwrapping with a different context fails. It is not secret, but it is never logged in
/// clear by the server (only a keyed hash of it goes to the audit trail).
pub type Context = BTreeMap<String, String>;

/// Secret bytes on the wire (a plaintext DEK). Zeroized on drop, never printed.
///
/// `Serialize` is written by hand (not derived) because the server must send a DEK to the
/// caller that asked for it; nothing else serializes it.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`; they are zeroized when the value is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret bytes. The name says what they are at every call site.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.0.len())
    }
}

impl PartialEq for SecretBytes {
    /// Constant time in the contents (the lengths are not secret).
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for SecretBytes {}

/// Secrets up to this many bytes are base64-encoded on the stack (DEKs are 32 bytes; one
/// heap allocation less per answer, and per batch item).
const STACK_ENCODED: usize = 48;

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.len() <= STACK_ENCODED {
            let mut buf = Zeroizing::new([0u8; STACK_ENCODED / 3 * 4]);
            let n = B64
                .encode_slice(self.0.as_slice(), &mut buf[..])
                .map_err(serde::ser::Error::custom)?;
            let text = std::str::from_utf8(&buf[..n]).map_err(serde::ser::Error::custom)?;
            return serializer.serialize_str(text);
        }
        let encoded = Zeroizing::new(B64.encode(self.0.as_slice()));
        serializer.serialize_str(&encoded)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(Base64Visitor)
            .map(SecretBytes::new)
    }
}

/// A buffer for bytes that may carry key material (a JSON body with a DEK in it): it
/// grows by moving to a new allocation and wiping the old one, never by a `realloc` that
/// would leave a copy in freed memory, and it is wiped when dropped. The server writes
/// the answers that hand over keys through it, the client the requests and answers.
#[derive(Default)]
pub struct ZeroizingBuf(Zeroizing<Vec<u8>>);

impl ZeroizingBuf {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// `value` as JSON, in a buffer of `capacity` bytes to start with.
    pub fn json<T: Serialize + ?Sized>(value: &T, capacity: usize) -> serde_json::Result<Self> {
        let mut buf = Self::with_capacity(capacity);
        serde_json::to_writer(&mut buf, value)?;
        Ok(buf)
    }

    /// Appends `data`.
    pub fn extend(&mut self, data: &[u8]) {
        let needed = self.0.len().saturating_add(data.len());
        if needed > self.0.capacity() {
            let mut bigger = Vec::with_capacity(needed.max(self.0.capacity().saturating_mul(2)));
            bigger.extend_from_slice(&self.0);
            // The old buffer is wiped (its whole capacity) as its `Zeroizing` drops here.
            self.0 = Zeroizing::new(bigger);
        }
        self.0.extend_from_slice(data);
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for ZeroizingBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::io::Write for ZeroizingBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.extend(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for ZeroizingBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZeroizingBuf([REDACTED; {} bytes])", self.0.len())
    }
}

/// A wrapped (encrypted) DEK: opaque bytes to callers, base64 in JSON.
///
/// Not secret, but `Debug` shows only its length and first bytes so logs never carry one
/// whole.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Consumes the value, returning the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl From<Vec<u8>> for WrappedKey {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.0.iter().take(4).map(|b| format!("{b:02x}")).collect();
        write!(f, "WrappedKey({} bytes, {head}…)", self.0.len())
    }
}

impl Serialize for WrappedKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for WrappedKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(Base64Visitor).map(WrappedKey)
    }
}

struct Base64Visitor;

impl Visitor<'_> for Base64Visitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a standard base64 string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        // The error deliberately does not echo the input: it may be key material.
        B64.decode(v)
            .map_err(|_| E::custom("invalid base64 (standard alphabet, with padding)"))
    }
}

/// A passphrase sent to unseal the server. Zeroized on drop, never printed.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase.
    pub fn new(passphrase: String) -> Self {
        Self(Zeroizing::new(passphrase))
    }

    /// The secret passphrase.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([REDACTED])")
    }
}

impl Serialize for Passphrase {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Passphrase {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Passphrase::new)
    }
}

/// KEK algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Algorithm {
    /// AES-256-GCM with a per-wrap key derived by HKDF-SHA256 (see the wrapped-DEK format).
    #[default]
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// RSA-OAEP with SHA-256 (and MGF1-SHA-256), 3072-bit modulus: the public key is
    /// exported (`GET /v1/keys/{name}/public-key`) so clients can wrap offline; unwrap
    /// happens in the server.
    #[serde(rename = "rsa-oaep-3072-sha256")]
    RsaOaep3072Sha256,
    /// As `rsa-oaep-3072-sha256` with a 4096-bit modulus.
    #[serde(rename = "rsa-oaep-4096-sha256")]
    RsaOaep4096Sha256,
    /// As `rsa-oaep-3072-sha256` with a 2048-bit modulus: the size Microsoft Double Key
    /// Encryption clients use (`docs/microsoft-dke.md`). Below the 3072 bits NIST asks
    /// for protection beyond 2030: choose it for DKE keys only.
    #[serde(rename = "rsa-oaep-2048-sha256")]
    RsaOaep2048Sha256,
    /// Not a key: a client's secret (a password, a seed) registered through KMIP as
    /// Secret Data, only ever handed back by KMIP Get (`docs/kmip.md`). It wraps,
    /// encrypts and rotates nothing; the native API cannot create one.
    #[serde(rename = "secret-data")]
    SecretData,
}

impl Algorithm {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "aes-256-gcm",
            Algorithm::RsaOaep3072Sha256 => "rsa-oaep-3072-sha256",
            Algorithm::RsaOaep4096Sha256 => "rsa-oaep-4096-sha256",
            Algorithm::RsaOaep2048Sha256 => "rsa-oaep-2048-sha256",
            Algorithm::SecretData => "secret-data",
        }
    }

    /// Whether this is a key (wraps, encrypts, rotates): every algorithm but
    /// `secret-data`.
    pub fn is_key(self) -> bool {
        !matches!(self, Algorithm::SecretData)
    }

    /// RSA modulus size in bits, for the RSA algorithms.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            Algorithm::Aes256Gcm | Algorithm::SecretData => None,
            Algorithm::RsaOaep3072Sha256 => Some(3072),
            Algorithm::RsaOaep4096Sha256 => Some(4096),
            Algorithm::RsaOaep2048Sha256 => Some(2048),
        }
    }
}

/// `GET /v1/keys/{name}/public-key[?version=N]`: the public half of an RSA KEK version,
/// for wrapping offline (see `kms_client::rsa_oaep`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyResponse {
    /// Key name.
    pub key: String,
    /// The KEK's id (hex), written into every wrapped DEK.
    pub id: String,
    /// The version this public key belongs to.
    pub version: u32,
    /// The key's algorithm.
    pub algorithm: Algorithm,
    /// SubjectPublicKeyInfo, PEM (`-----BEGIN PUBLIC KEY-----`).
    pub pem: String,
    /// The same key as a JWK (RFC 7517/7518): `kty` RSA, `alg` RSA-OAEP-256, `use` enc,
    /// `kid` = `<id>:<version>`.
    pub jwk: Jwk,
}

/// An RSA public key as a JSON Web Key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    /// Always `RSA`.
    pub kty: String,
    /// Modulus, base64url without padding.
    pub n: String,
    /// Public exponent, base64url without padding.
    pub e: String,
    /// `RSA-OAEP-256`.
    pub alg: String,
    /// `enc`.
    #[serde(rename = "use")]
    pub use_: String,
    /// `<key id>:<version>`.
    pub kid: String,
}

/// Query of `GET /v1/keys/{name}/public-key`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyQuery {
    /// A version; the current one when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

/// The state of a KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum KeyState {
    /// Usable: the newest version wraps, every retained version unwraps.
    Enabled,
    /// Revoked: no wrap, no unwrap. Reversible with `enable`.
    Disabled,
    /// Waiting for destruction; unusable; cancellable.
    PendingDeletion,
    /// Material erased; irreversible. Metadata stays for audit.
    Destroyed,
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// Key name, unique within the tenant: 1–128 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Algorithm; `aes-256-gcm` when omitted.
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
    /// Automatic rotation period, e.g. `"90d"` (humantime syntax); none when omitted.
    #[serde(default)]
    pub rotation_period: Option<String>,
    /// Initial grants. Default deny: with none, no identity may use the key until an
    /// admin sets grants (`PUT /v1/keys/{name}/grants`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
}

/// A key operation that a grant can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantOperation {
    /// `POST /v1/keys/{name}/datakey` (and batch `datakey` items).
    Datakey,
    /// `POST /v1/keys/{name}/wrap`.
    Wrap,
    /// `POST /v1/unwrap`.
    Unwrap,
    /// `POST /v1/rewrap`.
    Rewrap,
}

impl GrantOperation {
    /// Every operation, in wire order.
    pub const ALL: [GrantOperation; 4] = [Self::Datakey, Self::Wrap, Self::Unwrap, Self::Rewrap];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Datakey => "datakey",
            Self::Wrap => "wrap",
            Self::Unwrap => "unwrap",
            Self::Rewrap => "rewrap",
        }
    }
}

impl fmt::Display for GrantOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GrantOperation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| format!("unknown operation {s:?} (datakey, wrap, unwrap, rewrap)"))
    }
}

/// Conditions on the encryption context under which a grant applies (as AWS KMS grant
/// constraints). Both may be given; every one given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConstraints {
    /// The request's context must contain each of these pairs (it may hold others too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_subset: Option<Context>,
    /// The request's context must be exactly this map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_equals: Option<Context>,
}

impl GrantConstraints {
    /// Whether `context` satisfies every constraint.
    pub fn allows(&self, context: &Context) -> bool {
        let subset_ok = self
            .context_subset
            .as_ref()
            .is_none_or(|want| want.iter().all(|(k, v)| context.get(k) == Some(v)));
        let equals_ok = self
            .context_equals
            .as_ref()
            .is_none_or(|want| want == context);
        subset_ok && equals_ok
    }

    /// Whether no constraint is set.
    pub fn is_empty(&self) -> bool {
        self.context_subset.is_none() && self.context_equals.is_none()
    }
}

/// One grant: an identity may run these operations with the key, under the constraints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The caller's identity exactly as read from its certificate (e.g. a SPIFFE URI).
    pub identity: String,
    /// What it may do.
    pub operations: Vec<GrantOperation>,
    /// Context conditions; none when omitted.
    #[serde(default, skip_serializing_if = "GrantConstraints::is_empty")]
    pub constraints: GrantConstraints,
}

impl Grant {
    /// A grant of `operations` to `identity`, without constraints.
    pub fn new(identity: impl Into<String>, operations: &[GrantOperation]) -> Self {
        Self {
            identity: identity.into(),
            operations: operations.to_vec(),
            constraints: GrantConstraints::default(),
        }
    }

    /// Whether this grant lets `identity` run `op` under `context`.
    pub fn allows(&self, identity: &str, op: GrantOperation, context: &Context) -> bool {
        self.identity == identity
            && self.operations.contains(&op)
            && self.constraints.allows(context)
    }
}

/// `PUT /v1/keys/{name}/grants`: replaces the key's grants (an empty list revokes all).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetGrantsRequest {
    /// The complete new set.
    pub grants: Vec<Grant>,
}

/// `PATCH /v1/keys/{name}/grants`: adds and removes grants in one atomic change, so two
/// operators editing one key's grants at once never undo each other's edit (a
/// read-modify-write of the whole set with `PUT` can). Removals apply first, then
/// additions; an addition identical to a grant already there is not added twice, so a
/// retried request changes nothing more.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditGrantsRequest {
    /// Grants to add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Grant>,
    /// Identities whose every grant on the key is removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// `POST /v1/keys/{name}/schedule-deletion`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDeletionRequest {
    /// Days until destruction, 7 to 30.
    pub pending_days: u32,
}

/// `PUT /v1/keys/{name}/min-decrypt-version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinDecryptVersionRequest {
    /// Versions below this stop unwrapping; at most the current version.
    pub version: u32,
}

/// One version of a KEK.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyVersionInfo {
    /// Version number, from 1.
    pub version: u32,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Whether this version may still unwrap (false below `min_decrypt_version`).
    pub can_unwrap: bool,
    /// Wraps under this version (datakey, wrap, rewrap), since it was created.
    #[serde(default)]
    pub wraps: u64,
    /// Unwraps from this version (unwrap, rewrap), since it was created.
    #[serde(default)]
    pub unwraps: u64,
    /// Last wrap or unwrap, RFC 3339; absent when never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    /// The version's stored material does not open (altered or damaged at rest): it
    /// neither wraps nor unwraps; the key's other versions are unaffected. Absent when
    /// false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unreadable: bool,
}

/// `POST /v1/keys/{name}/min-decrypt-version/dry-run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinVersionDryRunRequest {
    /// The proposed `min_decrypt_version`.
    pub version: u32,
    /// How many recent days to look at (1 to 30, today included); 7 when omitted.
    #[serde(default)]
    pub window_days: Option<u32>,
}

/// What a proposed `min_decrypt_version` would have refused in a recent window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MinVersionDryRun {
    /// Key name.
    pub key: String,
    /// The proposed version.
    pub version: u32,
    /// Days looked at.
    pub window_days: u32,
    /// Unwraps in the window of versions below the proposed one: these would have failed.
    pub unwraps_refused: u64,
    /// Those unwraps per version.
    pub by_version: Vec<VersionUnwraps>,
}

/// Unwraps of one version in the dry run's window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionUnwraps {
    /// Version.
    pub version: u32,
    /// Unwraps in the window.
    pub unwraps: u64,
}

/// A KEK's metadata. Never carries key material.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    /// Name, unique within the tenant.
    pub name: String,
    /// Stable identifier, carried in every wrapped DEK (hex).
    pub id: String,
    /// Algorithm.
    pub algorithm: Algorithm,
    /// State.
    pub state: KeyState,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// The version that wraps.
    pub current_version: u32,
    /// Versions below this are retired (unwrap refused).
    pub min_decrypt_version: u32,
    /// Automatic rotation period, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period: Option<String>,
    /// Every version, oldest first.
    pub versions: Vec<KeyVersionInfo>,
    /// When a key pending deletion is destroyed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<String>,
    /// Who may use the key, and how (default deny).
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// `GET /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyList {
    /// The tenant's keys, by name.
    pub keys: Vec<KeyInfo>,
}

/// `POST /v1/keys/{name}/datakey`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatakeyRequest {
    /// Encryption context bound to the wrapped DEK.
    #[serde(default)]
    pub context: Context,
}

/// Response to `datakey`: a fresh DEK, in clear and wrapped.
#[derive(Debug, Serialize, Deserialize)]
pub struct DatakeyResponse {
    /// The DEK (32 bytes). Use it, then drop it.
    pub plaintext: SecretBytes,
    /// The DEK wrapped under the key's current version; store this.
    pub wrapped: WrappedKey,
    /// Key name.
    pub key: String,
    /// Key version that wrapped it.
    pub version: u32,
}

/// `POST /v1/keys/{name}/wrap`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrapRequest {
    /// The DEK to wrap: 16 to 64 bytes.
    pub plaintext: SecretBytes,
    /// Encryption context bound to the wrapped DEK.
    #[serde(default)]
    pub context: Context,
}

/// Response to `wrap` and `rewrap`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WrapResponse {
    /// The wrapped DEK.
    pub wrapped: WrappedKey,
    /// Key name.
    pub key: String,
    /// Key version that wrapped it.
    pub version: u32,
}

/// `POST /v1/unwrap`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnwrapRequest {
    /// A wrapped DEK as returned by `datakey`, `wrap` or `rewrap`.
    pub wrapped: WrappedKey,
    /// The context it was wrapped with.
    #[serde(default)]
    pub context: Context,
}

/// Response to `unwrap`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnwrapResponse {
    /// The DEK.
    pub plaintext: SecretBytes,
    /// Key name.
    pub key: String,
    /// Key version that had wrapped it.
    pub version: u32,
}

/// `POST /v1/rewrap`: re-encrypt under the key's current version; no plaintext leaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewrapRequest {
    /// A wrapped DEK.
    pub wrapped: WrappedKey,
    /// The context it was wrapped with; the new wrapped DEK is bound to the same context.
    #[serde(default)]
    pub context: Context,
}

/// One item of `POST /v1/batch`, tagged by `op`.
///
/// Read through a flat wire struct (one object, no buffering) rather than serde's
/// internally tagged representation, which buffers every item before reading it: on the
/// server that buffering was a tenth of a batch's CPU (`BENCHMARKS.md`, batch section).
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "op",
    rename_all = "lowercase",
    deny_unknown_fields,
    try_from = "RawBatchItem"
)]
pub enum BatchItem {
    /// As `POST /v1/keys/{key}/datakey`.
    Datakey {
        /// Key name.
        key: String,
        /// Encryption context.
        #[serde(default)]
        context: Context,
    },
    /// As `POST /v1/keys/{key}/wrap`.
    Wrap {
        /// Key name.
        key: String,
        /// DEK to wrap.
        plaintext: SecretBytes,
        /// Encryption context.
        #[serde(default)]
        context: Context,
    },
    /// As `POST /v1/unwrap`.
    Unwrap {
        /// Wrapped DEK.
        wrapped: WrappedKey,
        /// Encryption context.
        #[serde(default)]
        context: Context,
    },
    /// As `POST /v1/rewrap`.
    Rewrap {
        /// Wrapped DEK.
        wrapped: WrappedKey,
        /// Encryption context, kept for the new wrapped DEK.
        #[serde(default)]
        context: Context,
    },
}

/// The wire shape of a [`BatchItem`]: every field any `op` takes; `try_from` then
/// requires the op's own fields and refuses the others, as `deny_unknown_fields` would.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatchItem {
    op: BatchOp,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    plaintext: Option<SecretBytes>,
    #[serde(default)]
    wrapped: Option<WrappedKey>,
    #[serde(default)]
    context: Option<Context>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BatchOp {
    Datakey,
    Wrap,
    Unwrap,
    Rewrap,
}

impl TryFrom<RawBatchItem> for BatchItem {
    type Error = String;

    fn try_from(raw: RawBatchItem) -> Result<Self, String> {
        let RawBatchItem {
            op,
            key,
            plaintext,
            wrapped,
            context,
        } = raw;
        let (name, fields): (&str, &[&str]) = match op {
            BatchOp::Datakey => ("datakey", &["op", "key", "context"]),
            BatchOp::Wrap => ("wrap", &["op", "key", "plaintext", "context"]),
            BatchOp::Unwrap => ("unwrap", &["op", "wrapped", "context"]),
            BatchOp::Rewrap => ("rewrap", &["op", "wrapped", "context"]),
        };
        let refuse = |field: &str| {
            format!(
                "unknown field `{field}` for op `{name}`, expected one of {}",
                fields.join(", ")
            )
        };
        let missing = |field: &str| format!("missing field `{field}` for op `{name}`");
        let context = context.unwrap_or_default();
        match op {
            BatchOp::Datakey | BatchOp::Wrap => {
                if wrapped.is_some() {
                    return Err(refuse("wrapped"));
                }
                let key = key.ok_or_else(|| missing("key"))?;
                match (op, plaintext) {
                    (BatchOp::Wrap, Some(plaintext)) => Ok(BatchItem::Wrap {
                        key,
                        plaintext,
                        context,
                    }),
                    (BatchOp::Wrap, None) => Err(missing("plaintext")),
                    (_, Some(_)) => Err(refuse("plaintext")),
                    (_, None) => Ok(BatchItem::Datakey { key, context }),
                }
            }
            BatchOp::Unwrap | BatchOp::Rewrap => {
                if key.is_some() {
                    return Err(refuse("key"));
                }
                if plaintext.is_some() {
                    return Err(refuse("plaintext"));
                }
                let wrapped = wrapped.ok_or_else(|| missing("wrapped"))?;
                Ok(match op {
                    BatchOp::Unwrap => BatchItem::Unwrap { wrapped, context },
                    _ => BatchItem::Rewrap { wrapped, context },
                })
            }
        }
    }
}

/// `POST /v1/batch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Items, processed in order; each succeeds or fails on its own.
    pub items: Vec<BatchItem>,
}

/// The result of one batch item, in the item's position.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchResult {
    /// A `datakey` item succeeded.
    Datakey(DatakeyResponse),
    /// A `wrap` item succeeded.
    Wrap(WrapResponse),
    /// An `unwrap` item succeeded.
    Unwrap(UnwrapResponse),
    /// A `rewrap` item succeeded.
    Rewrap(WrapResponse),
    /// The item failed; the others are unaffected.
    Error(ErrorBody),
}

/// Response to `POST /v1/batch`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResponse {
    /// One result per item, in order.
    pub results: Vec<BatchResult>,
}

/// Stable error codes. The HTTP status is given for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the request is malformed (JSON, base64, field values, sizes).
    InvalidRequest,
    /// 400: the wrapped key cannot be unwrapped. Opaque on purpose: tampering, the wrong
    /// context, the wrong or an unknown key all look the same.
    DecryptFailed,
    /// 401: no usable client identity.
    Unauthenticated,
    /// 403: the caller's role or grants do not allow this.
    PermissionDenied,
    /// 404: no such key for this tenant (another tenant's key looks the same).
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: a key with this name exists already.
    AlreadyExists,
    /// 409: the key is disabled, pending deletion, or destroyed.
    KeyDisabled,
    /// 409: the requested state change does not apply to the key's state.
    InvalidState,
    /// 413: the request body is larger than the configured limit.
    PayloadTooLarge,
    /// 415: the request is not `application/json`.
    UnsupportedMediaType,
    /// 429: the identity is locked out after repeated denials.
    LockedOut,
    /// 500: an internal failure; details are in the server log only.
    Internal,
    /// 503: the server is sealed; unseal it first.
    Sealed,
    /// 503: the key store cannot be reached or written; nothing was changed.
    StorageUnavailable,
    /// A code this client version does not know.
    #[serde(other)]
    Unknown,
}

/// The `error` member of an error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Short human-readable text. Never contains key material.
    pub message: String,
}

/// Every error response: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// `GET /v1/sys/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysStatus {
    /// Whether key operations are refused until unseal.
    pub sealed: bool,
    /// The configured unseal method (`key-file`, `passphrase`, `shamir`).
    pub seal_method: String,
    /// Server version.
    pub version: String,
    /// For the `shamir` method while sealed: shares received so far and shares needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unseal_progress: Option<UnsealProgress>,
    /// The server process's hardening, read back from the kernel (absent from servers
    /// older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessStatus>,
    /// On a store several nodes share: this node and the nodes seen in the last 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// The nodes sharing a store, as one of them sees them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This node's id (`[store] node_id`, default `<host>:<API port>`).
    pub node: String,
    /// Every node that reported in the last 10 s, this one included, by id.
    pub peers: Vec<PeerStatus>,
    /// The cluster's erasure keys, when they live in the database under HSM epoch keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<ErasureStatus>,
}

/// The erasure epochs of a shared store (`[store] erasure = "token"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErasureStatus {
    /// The current epoch (0: no key made yet).
    pub epoch: u64,
    /// Whether a destruction awaits the next sweep's rotation.
    pub rotation_pending: bool,
    /// Retired epochs whose HSM key is kept until the retention passes: database backups
    /// from their time still restore, and keys destroyed then are not final yet.
    pub retained_epochs: Vec<u64>,
    /// The retention, seconds.
    pub retention_secs: u64,
}

/// One node of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// Node id.
    pub id: String,
    /// Its server version.
    pub version: String,
    /// Milliseconds since it last reported.
    pub seen_ms_ago: u64,
}

/// What protects the server process's memory, as the kernel reports it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessStatus {
    /// Whether the process is dumpable (`PR_GET_DUMPABLE`); `false` when hardened.
    pub dumpable: bool,
    /// The core-file size limit (`RLIMIT_CORE`, soft); 0 when hardened.
    pub core_limit: u64,
    /// Whether its memory is locked against swap (`mlockall`).
    pub memory_locked: bool,
    /// Its effective user id.
    pub uid: u32,
}

/// `POST /v1/sys/rotate-master`: the seal secret to seal the new master key with (the
/// passphrase for the passphrase method; key-file servers read their file).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateMasterRequest {
    /// The unseal passphrase (it must open the current master key too).
    #[serde(default)]
    pub passphrase: Option<Passphrase>,
}

/// Response to `POST /v1/sys/rotate-master`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotateMasterResponse {
    /// KEK versions re-sealed under the new master key.
    pub versions_resealed: u64,
}

/// Progress of a Shamir unseal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnsealProgress {
    /// Distinct valid shares received (kept in memory only).
    pub received: u8,
    /// Shares needed.
    pub threshold: u8,
}

/// `POST /v1/sys/unseal`. With no passphrase, the server retries its configured source
/// (key file or passphrase file).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsealRequest {
    /// Operator passphrase, for the `passphrase` method.
    #[serde(default)]
    pub passphrase: Option<Passphrase>,
    /// One unseal share (`khs1-...`), for the `shamir` method: submit shares one request
    /// at a time until the threshold is reached. Held like a passphrase (zeroized,
    /// redacted).
    #[serde(default)]
    pub share: Option<Passphrase>,
}

/// An identity locked out after repeated denials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockoutInfo {
    /// The identity.
    pub identity: String,
    /// Seconds until the lockout ends by itself.
    pub seconds_left: u64,
}

/// `GET /v1/sys/lockouts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockoutList {
    /// Identities locked out now.
    pub lockouts: Vec<LockoutInfo>,
}

/// A role: what an identity may do (see `DESIGN.md` §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A tenant's operators: its keys, its identity policy, its identities' lockouts.
    Admin,
    /// Applications: key use (with a grant on the key).
    App,
    /// Auditors: key metadata and the audit trail, read-only.
    Auditor,
    /// The service's operators: seal, unseal, backup, master-key rotation and every
    /// tenant's lockouts. No key management or key use in any tenant. Given in the
    /// configuration file only.
    Sys,
}

/// One identity of the caller's tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityInfo {
    /// As read from the client certificate.
    pub identity: String,
    /// Its role.
    pub role: Role,
    /// `config` (from the configuration file; change it there) or `runtime` (set over the
    /// API, kept in the store).
    pub source: String,
}

/// `GET /v1/sys/identities`: the caller's tenant's identities.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityList {
    /// By identity.
    pub identities: Vec<IdentityInfo>,
}

/// `PUT /v1/sys/identities`: maps an identity to a role in the caller's tenant (adds it, or
/// changes the role of a runtime identity).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetIdentityRequest {
    /// The identity, as the certificate will carry it.
    pub identity: String,
    /// Its role.
    pub role: Role,
}

/// `POST /v1/sys/identities/remove`: removes a runtime identity of the caller's tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemoveIdentityRequest {
    /// The identity.
    pub identity: String,
}

/// `POST /v1/sys/lockouts/lift`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LiftLockoutRequest {
    /// The identity to let in again.
    pub identity: String,
}

/// Response to `POST /v1/sys/lockouts/lift`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiftLockoutResponse {
    /// Whether the identity was locked out.
    pub lifted: bool,
}

/// Chain event: the stored head's MAC is wrong (altered).
pub const AUDIT_EVENT_HEAD_INVALID: &str = "AUDIT head-mac-invalid";
/// Chain event: the stored head has no MAC the server could check (written while sealed,
/// or its MAC removed).
pub const AUDIT_EVENT_HEAD_UNVERIFIED: &str = "AUDIT head-unverified";
/// Chain event: the stored head is past the last record or names another hash (records
/// cut or edited).
pub const AUDIT_EVENT_HEAD_MISMATCH: &str = "AUDIT head-mismatch";
/// Chain event: acknowledged records after the MAC'd head (an unclean stop between a
/// batch's sync and the head update).
pub const AUDIT_EVENT_AFTER_HEAD: &str = "AUDIT records-after-head";
/// The `prev` of the first audit record: 64 zeros.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record: one per API request, allowed or denied. Never holds plaintext, key
/// bytes or wrapped DEKs; the context appears only as a keyed hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When the request finished, RFC 3339 (UTC, milliseconds).
    pub time: String,
    /// The request id (also in the `x-request-id` response header).
    pub request_id: u64,
    /// The client certificate's identity, if any.
    pub identity: Option<String>,
    /// The identity's tenant, if it has one.
    pub tenant: Option<String>,
    /// Method and route template, e.g. `POST /v1/unwrap`.
    pub operation: String,
    /// Key name, when the request named or resolved one.
    pub key: Option<String>,
    /// Key version used, when known.
    pub version: Option<u32>,
    /// HMAC-SHA256 of the canonical encryption context under a key derived from the master
    /// key (16 bytes, hex); absent when the request had none or the server was sealed.
    pub context_hash: Option<String>,
    /// `ok`, or the error code.
    pub outcome: String,
    /// HTTP status.
    pub status: u16,
    /// Time spent in the server before the audit write, microseconds.
    pub latency_us: u64,
    /// What a protocol adapter adds about the request (AWS XKS: `kmsRequestId`,
    /// `awsPrincipalArn`, `kmsOperation`, `kmsKeyArn`, `kmsViaService`, `awsSourceVpc`,
    /// `awsSourceVpce`, the external key id and the secondary-authorization `rule`).
    /// Absent from native API records (and from their JSON, so their hashes are as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<std::collections::BTreeMap<String, String>>,
    /// `hash` of the previous record ([`AUDIT_GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 (hex) of this record's JSON with `hash` set to `""`.
    pub hash: String,
}

impl AuditRecord {
    /// The chain hash of this record: SHA-256 over its JSON (fields in declaration order)
    /// with `hash` set to the empty string.
    pub fn compute_hash(&self) -> String {
        use sha2::Digest;
        let mut r = self.clone();
        r.hash.clear();
        let bytes = serde_json::to_vec(&r).unwrap_or_default();
        crate::hex::encode(&sha2::Sha256::digest(&bytes))
    }

    /// Sets `hash` and returns the record's JSON (one line, no newline).
    pub fn seal(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.hash = self.as_ref().write_sealed(&mut out);
        out
    }

    /// A borrowed view, for serializing without copies.
    pub fn as_ref(&self) -> AuditRecordRef<'_> {
        AuditRecordRef {
            seq: self.seq,
            time: &self.time,
            request_id: self.request_id,
            identity: self.identity.as_deref(),
            tenant: self.tenant.as_deref(),
            operation: &self.operation,
            key: self.key.as_deref(),
            version: self.version,
            context_hash: self.context_hash.as_deref(),
            outcome: &self.outcome,
            status: self.status,
            latency_us: self.latency_us,
            attributes: self.attributes.as_ref(),
            prev: &self.prev,
            hash: "",
        }
    }
}

/// A borrowed [`AuditRecord`] that serializes to the same JSON (same fields, same order):
/// the server writes records through it without copying their strings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AuditRecordRef<'a> {
    /// See [`AuditRecord::seq`].
    pub seq: u64,
    /// See [`AuditRecord::time`].
    pub time: &'a str,
    /// See [`AuditRecord::request_id`].
    pub request_id: u64,
    /// See [`AuditRecord::identity`].
    pub identity: Option<&'a str>,
    /// See [`AuditRecord::tenant`].
    pub tenant: Option<&'a str>,
    /// See [`AuditRecord::operation`].
    pub operation: &'a str,
    /// See [`AuditRecord::key`].
    pub key: Option<&'a str>,
    /// See [`AuditRecord::version`].
    pub version: Option<u32>,
    /// See [`AuditRecord::context_hash`].
    pub context_hash: Option<&'a str>,
    /// See [`AuditRecord::outcome`].
    pub outcome: &'a str,
    /// See [`AuditRecord::status`].
    pub status: u16,
    /// See [`AuditRecord::latency_us`].
    pub latency_us: u64,
    /// See [`AuditRecord::attributes`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<&'a std::collections::BTreeMap<String, String>>,
    /// See [`AuditRecord::prev`].
    pub prev: &'a str,
    /// Must be empty: [`AuditRecordRef::write_sealed`] fills it in.
    pub hash: &'a str,
}

impl AuditRecordRef<'_> {
    /// Appends the record's JSON to `out` with its chain hash filled in (serializing once:
    /// `hash` is the last field, so the hash goes between the empty value's quotes) and
    /// returns the hash.
    pub fn write_sealed(&self, out: &mut Vec<u8>) -> String {
        use sha2::Digest;
        let start = out.len();
        let empty = AuditRecordRef { hash: "", ..*self };
        if serde_json::to_writer(&mut *out, &empty).is_err() {
            // Unreachable for these field types; leave a record that fails verification
            // rather than panic.
            out.truncate(start);
            out.extend_from_slice(b"{}");
            return String::new();
        }
        let hash = crate::hex::encode(&sha2::Sha256::digest(&out[start..]));
        // The JSON ends with `"hash":""}`.
        let at = out.len() - 2;
        out.splice(at..at, hash.bytes());
        hash
    }
}

/// The newest record's position and hash, as the server stores them (with a MAC under a
/// key derived from the master key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditHead {
    /// Sequence number of the newest record (0: none).
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// Whether the stored head's MAC verifies: `None` when the server is sealed or the
    /// head was written while sealed (not verifiable), `Some(false)` when it was altered.
    pub mac_valid: Option<bool>,
}

/// `GET /v1/audit?after=&limit=`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditPage {
    /// Records with `seq > after`, oldest first.
    pub records: Vec<AuditRecord>,
    /// The chain head at the time of reading.
    pub head: AuditHead,
    /// Where the kept chain begins, once a retention sweep has purged older records:
    /// verification starts from it. Absent while the chain starts at record 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<AuditCheckpoint>,
}

/// The last record a retention sweep purged (its segments archived first): the kept
/// chain's first record links to `hash`. MAC'd by the server like the head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditCheckpoint {
    /// The last purged record's sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// Its time.
    pub time: String,
    /// Whether the checkpoint's MAC verifies (`None`: the server cannot check now).
    pub mac_valid: Option<bool>,
}

/// Checks an audit chain record by record: sequence without gaps, each `prev` the hash
/// of the one before, each `hash` recomputed. Detects deleted, edited, inserted and
/// reordered records; [`AuditChain::finish`] then checks the head (a cut-off tail).
#[derive(Debug, Clone)]
pub struct AuditChain {
    next_seq: u64,
    prev: String,
}

impl Default for AuditChain {
    fn default() -> Self {
        Self {
            next_seq: 1,
            prev: AUDIT_GENESIS.to_owned(),
        }
    }
}

impl AuditChain {
    /// A verifier starting at the first record.
    pub fn new() -> Self {
        Self::default()
    }

    /// A verifier starting after a retention checkpoint: the next record is
    /// `checkpoint.seq + 1` and links to `checkpoint.hash`.
    pub fn from_checkpoint(checkpoint: &AuditCheckpoint) -> Self {
        Self {
            next_seq: checkpoint.seq + 1,
            prev: checkpoint.hash.clone(),
        }
    }

    /// The sequence number the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checks the next record. Chain events the server wrote about the chain it found at
    /// start ([`AUDIT_EVENT_HEAD_INVALID`], [`AUDIT_EVENT_HEAD_MISMATCH`]: altered, an
    /// error; [`AUDIT_EVENT_HEAD_UNVERIFIED`], [`AUDIT_EVENT_AFTER_HEAD`]: could not be
    /// vouched for) are returned as findings in `warnings`.
    pub fn push_with(&mut self, r: &AuditRecord, warnings: &mut Vec<String>) -> Result<(), String> {
        self.push(r)?;
        match r.operation.as_str() {
            AUDIT_EVENT_HEAD_INVALID => Err(format!(
                "record {}: the server found the chain head altered before this record",
                r.seq
            )),
            AUDIT_EVENT_HEAD_MISMATCH => Err(format!(
                "record {}: the server found records cut or edited before this record (they no longer match the MAC'd head)",
                r.seq
            )),
            AUDIT_EVENT_HEAD_UNVERIFIED => {
                warnings.push(format!(
                    "record {}: the head before it could not be verified (written while sealed, or its MAC removed)",
                    r.seq
                ));
                Ok(())
            }
            AUDIT_EVENT_AFTER_HEAD => {
                warnings.push(format!(
                    "record {}: records just before it were not yet covered by the MAC'd head (unclean stop)",
                    r.seq
                ));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Checks the next record.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), String> {
        if r.seq != self.next_seq {
            return Err(format!(
                "record {} found where record {} was expected (deleted, inserted or reordered records)",
                r.seq, self.next_seq
            ));
        }
        if r.prev != self.prev {
            return Err(format!(
                "record {}: its link to the previous record is broken",
                r.seq
            ));
        }
        if r.compute_hash() != r.hash {
            return Err(format!("record {}: its contents were altered", r.seq));
        }
        self.next_seq += 1;
        self.prev = r.hash.clone();
        Ok(())
    }

    /// Checks that the chain read so far ends at `head`, and that the head's MAC held.
    pub fn finish(&self, head: &AuditHead) -> Result<(), String> {
        if head.seq + 1 != self.next_seq || head.hash != self.prev {
            return Err(format!(
                "the chain ends at record {} but the head says {}: records are missing or were added",
                self.next_seq - 1,
                head.seq
            ));
        }
        if head.mac_valid == Some(false) {
            return Err("the chain head's MAC does not verify: the head was altered".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_items_parse_flat_and_refuse_foreign_fields() {
        let w = B64.encode([1u8, 2, 3]);
        let p = B64.encode([7u8; 32]);
        let ok = [
            (
                r#"{"op":"datakey","key":"k","context":{"a":"b"}}"#.to_string(),
                "datakey",
            ),
            (
                format!(r#"{{"op":"wrap","key":"k","plaintext":"{p}"}}"#),
                "wrap",
            ),
            (
                format!(r#"{{"op":"unwrap","wrapped":"{w}","context":{{}}}}"#),
                "unwrap",
            ),
            (
                format!(r#"{{"context":{{"x":"y"}},"wrapped":"{w}","op":"rewrap"}}"#),
                "rewrap",
            ),
        ];
        for (json, op) in &ok {
            let item: BatchItem = serde_json::from_str(json).unwrap();
            // Serializes back to the same tagged shape.
            let back = serde_json::to_value(&item).unwrap();
            assert_eq!(back["op"], *op, "{json}");
            let again: BatchItem = serde_json::from_value(back).unwrap();
            assert_eq!(format!("{again:?}"), format!("{item:?}"));
        }
        match serde_json::from_str::<BatchItem>(r#"{"op":"datakey","key":"k","context":{"a":"b"}}"#)
            .unwrap()
        {
            BatchItem::Datakey { key, context } => {
                assert_eq!(key, "k");
                assert_eq!(context.get("a").map(String::as_str), Some("b"));
            }
            other => panic!("{other:?}"),
        }
        let bad = [
            (r#"{"op":"datakey"}"#.to_string(), "missing field `key`"),
            (
                r#"{"op":"wrap","key":"k"}"#.to_string(),
                "missing field `plaintext`",
            ),
            (r#"{"op":"unwrap"}"#.to_string(), "missing field `wrapped`"),
            (
                format!(r#"{{"op":"datakey","key":"k","wrapped":"{w}"}}"#),
                "unknown field `wrapped`",
            ),
            (
                format!(r#"{{"op":"datakey","key":"k","plaintext":"{p}"}}"#),
                "unknown field `plaintext`",
            ),
            (
                format!(r#"{{"op":"unwrap","wrapped":"{w}","key":"k"}}"#),
                "unknown field `key`",
            ),
            (
                format!(r#"{{"op":"rewrap","wrapped":"{w}","plaintext":"{p}"}}"#),
                "unknown field `plaintext`",
            ),
            (
                format!(r#"{{"op":"unwrap","wrapped":"{w}","extra":1}}"#),
                "unknown field `extra`",
            ),
            (
                r#"{"op":"destroy","key":"k"}"#.to_string(),
                "unknown variant `destroy`",
            ),
            (r#"{"key":"k"}"#.to_string(), "missing field `op`"),
            (r#"{"op":"unwrap","wrapped":"!!"}"#.to_string(), "base64"),
        ];
        for (json, want) in &bad {
            let err = serde_json::from_str::<BatchItem>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = AUDIT_GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut r = AuditRecord {
                    seq,
                    time: "2026-11-22T00:00:00.000Z".into(),
                    request_id: seq,
                    identity: Some("i".into()),
                    tenant: Some("t".into()),
                    operation: "POST /v1/unwrap".into(),
                    key: None,
                    version: None,
                    context_hash: None,
                    outcome: "ok".into(),
                    status: 200,
                    latency_us: 5,
                    attributes: None,
                    prev: prev.clone(),
                    hash: String::new(),
                };
                r.hash = r.compute_hash();
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn verify(records: &[AuditRecord], head: &AuditHead) -> Result<(), String> {
        let mut c = AuditChain::new();
        for r in records {
            c.push(r)?;
        }
        c.finish(head)
    }

    #[test]
    fn seal_matches_compute_hash_and_serde() {
        let mut r = chain(1).remove(0);
        let expected_hash = r.hash.clone();
        let bytes = r.seal();
        assert_eq!(r.hash, expected_hash);
        assert_eq!(bytes, serde_json::to_vec(&r).unwrap());
        // Every optional field set, and strings that need escaping.
        r.identity = Some("spiffe://x/\"quoted\"\\".into());
        r.tenant = Some("t\u{e9}".into());
        r.key = Some("k".into());
        r.version = Some(7);
        r.context_hash = Some("ab".repeat(16));
        r.hash.clear();
        let bytes = r.seal();
        assert_eq!(bytes, serde_json::to_vec(&r).unwrap());
        assert_eq!(r.hash, r.compute_hash());
    }

    #[test]
    fn audit_chain_detects_every_kind_of_edit() {
        let good = chain(5);
        let head = AuditHead {
            seq: 5,
            hash: good[4].hash.clone(),
            mac_valid: Some(true),
        };
        assert!(verify(&good, &head).is_ok());
        let mut edited = good.clone();
        edited[2].outcome = "DecryptFailed".into();
        assert!(verify(&edited, &head).unwrap_err().contains("altered"));
        let mut deleted = good.clone();
        deleted.remove(2);
        assert!(verify(&deleted, &head).is_err());
        let mut reordered = good.clone();
        reordered.swap(1, 2);
        assert!(verify(&reordered, &head).is_err());
        let mut inserted = good.clone();
        inserted.insert(2, good[2].clone());
        assert!(verify(&inserted, &head).is_err());
        let truncated = &good[..4];
        assert!(verify(truncated, &head).unwrap_err().contains("head"));
        let forged_head = AuditHead {
            mac_valid: Some(false),
            ..head
        };
        assert!(verify(&good, &forged_head).unwrap_err().contains("MAC"));
    }

    #[test]
    fn secret_debug_hides_bytes() {
        let s = SecretBytes::new(vec![0xAB; 32]);
        let dbg = format!("{s:?}");
        assert!(!dbg.to_lowercase().contains("ab"), "{dbg}");
        assert!(dbg.contains("REDACTED"));
        let p = Passphrase::new("correct horse".into());
        assert!(!format!("{p:?}").contains("horse"));
    }

    /// Every length round-trips through JSON, on both sides of the stack-encoding limit,
    /// as the standard base64 any client decodes.
    #[test]
    fn secret_bytes_serialize_as_standard_base64_at_every_length() {
        for len in [
            0,
            1,
            2,
            3,
            31,
            32,
            33,
            STACK_ENCODED - 1,
            STACK_ENCODED,
            STACK_ENCODED + 1,
            100,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let json = serde_json::to_string(&SecretBytes::new(bytes.clone())).unwrap();
            assert_eq!(json, format!("\"{}\"", B64.encode(&bytes)), "length {len}");
            let back: SecretBytes = serde_json::from_str(&json).unwrap();
            assert_eq!(back.expose_secret(), &bytes[..], "length {len}");
        }
    }

    /// Appends across many moves keep every byte in order; `Debug` shows only the length.
    #[test]
    fn zeroizing_buf_grows_by_moving_and_keeps_the_bytes() {
        let mut buf = ZeroizingBuf::with_capacity(1);
        let mut expected = Vec::new();
        for i in 0..200u8 {
            let chunk = vec![i; usize::from(i % 7) + 1];
            buf.extend(&chunk);
            expected.extend_from_slice(&chunk);
        }
        assert_eq!(buf.as_slice(), &expected[..]);
        let dbg = format!("{buf:?}");
        assert!(dbg.contains("REDACTED") && !dbg.contains("199,"), "{dbg}");
        let json = ZeroizingBuf::json(&SecretBytes::new(vec![7; 32]), 0).unwrap();
        assert_eq!(
            json.as_slice(),
            serde_json::to_vec(&B64.encode([7u8; 32])).unwrap()
        );
    }

    #[test]
    fn wrapped_debug_is_truncated() {
        let w = WrappedKey::from(vec![0x5A; 100]);
        let dbg = format!("{w:?}");
        assert!(dbg.matches("5a").count() <= 4, "{dbg}");
    }

    #[test]
    fn secret_eq_compares_contents() {
        assert_eq!(SecretBytes::new(vec![1, 2]), SecretBytes::new(vec![1, 2]));
        assert_ne!(SecretBytes::new(vec![1, 2]), SecretBytes::new(vec![1, 3]));
        assert_ne!(
            SecretBytes::new(vec![1, 2]),
            SecretBytes::new(vec![1, 2, 3])
        );
    }

    #[test]
    fn bad_base64_is_an_error_that_does_not_echo_input() {
        let err = serde_json::from_str::<UnwrapRequest>(r#"{"wrapped":"sekrit!!"}"#)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("sekrit"), "{err}");
    }

    #[test]
    fn batch_round_trip() {
        let json = r#"{"items":[{"op":"unwrap","wrapped":"AA=="},{"op":"datakey","key":"k"}]}"#;
        let req: BatchRequest = serde_json::from_str(json).unwrap();
        assert_eq!(req.items.len(), 2);
        let res = BatchResponse {
            results: vec![BatchResult::Error(ErrorBody {
                code: ErrorCode::NotFound,
                message: "no".into(),
            })],
        };
        let out = serde_json::to_string(&res).unwrap();
        assert_eq!(
            out,
            r#"{"results":[{"error":{"code":"NotFound","message":"no"}}]}"#
        );
    }

    #[test]
    fn unknown_error_code_is_tolerated() {
        let e: ErrorResponse =
            serde_json::from_str(r#"{"error":{"code":"Brand New","message":"x"}}"#).unwrap();
        assert_eq!(e.error.code, ErrorCode::Unknown);
    }
}
