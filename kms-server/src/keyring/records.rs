//! The stored records (JSON in the store's tables), the table-key encodings, and the
//! checks a name or a grant set passes before it is stored.

use std::time::{Duration, UNIX_EPOCH};

use kms_client::api::{Algorithm, Grant, KeyState};
use serde::{Deserialize, Serialize};

use crate::base::error::Error;
use crate::crypto::format::{self, KeyId};

pub(crate) const META_SEALED_MASTER: &[u8] = b"sealed-master-key";
pub(super) const META_FORMAT: &[u8] = b"store-format";
/// The audit keys (head MAC key ‖ context-hash key), sealed under the master key. Absent
/// until the first master-key rotation: until then they are derived from the master key.
/// Rotation keeps their value and stores it sealed under the new master key in the same
/// transaction, so the audit chain's head MAC and context hashes survive the rotation
/// (and a crash right after it).
pub(crate) const META_AUDIT_KEYS: &[u8] = b"audit/keys/v1";
pub(super) const STORE_FORMAT: &[u8] = b"1";
/// Meta entry saying the rotation index is complete (stores from before it get it built
/// by the first sweep).
pub(super) const META_ROTATION_INDEX: &[u8] = b"index/rotations/v1";
/// Longest key name.
pub const MAX_NAME_LEN: usize = 128;
/// Most grants on one key.
pub const MAX_GRANTS: usize = 100;
/// Longest grantee identity.
pub const MAX_IDENTITY_LEN: usize = 1024;
/// The deletion window, in days (as AWS KMS).
pub const DELETION_WINDOW_DAYS: std::ops::RangeInclusive<u32> = 7..=30;

/// What KMIP's lifecycle adds to Keyhold's states: Pre-Active (created disabled, never
/// enabled), and when the key was activated, deactivated and found compromised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// Created disabled and never enabled since (KMIP's Create; its Activate enables it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_active: bool,
    /// When a pre-active key was first enabled, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<u64>,
    /// When it was first revoked, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated_at: Option<u64>,
    /// When it was revoked as compromised, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised_at: Option<u64>,
    /// Registered or created with KMIP's Extractable set: a KMIP Get may hand its material
    /// out (each one audited and alerted). No other key's material ever leaves.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extractable: bool,
}

impl Lifecycle {
    /// Nothing recorded (a key of the native API).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A KEK as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Hex id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Name within the tenant.
    pub name: String,
    /// Algorithm.
    pub algorithm: Algorithm,
    /// State.
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: u64,
    /// The version that wraps.
    pub current_version: u32,
    /// Versions below this no longer unwrap.
    pub min_decrypt_version: u32,
    /// Automatic rotation period, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period_secs: Option<u64>,
    /// While pending deletion: when the key is destroyed, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<u64>,
    /// Who may use the key. Default deny: no grant, no use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
    /// Slot of the key's erasure key ([`crate::storage::erasure`]); `None`: sealed under the
    /// master key alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure_slot: Option<u32>,
    /// Slot of the key's erasure key in the cluster's erasure table, on a shared store
    /// ([`crate::storage::erasure::shared`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_erasure_slot: Option<u64>,
    /// Bumped by every write of the record: the cache never replaces a newer generation
    /// with an older one. 0 in records from before generations.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The lifecycle dates KMIP reports (written only by the KMIP paths: a record made
    /// and changed through the native API stays as before).
    #[serde(default, skip_serializing_if = "Lifecycle::is_empty")]
    pub lifecycle: Lifecycle,
    /// HMAC of the record under the record-MAC key (hex; [`super::integrity`]): a row
    /// changed outside Keyhold is refused. Set last, by every writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl KeyRecord {
    /// The record as the next write stores it: one generation on.
    pub(super) fn next_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VersionRecord {
    pub(super) version: u32,
    pub(super) created_at: u64,
    /// Hex of the sealed box (salt ‖ ciphertext ‖ tag).
    pub(super) material: String,
    /// The master-key epoch it is sealed under ([`super::epoch`]); 0 in stores from
    /// before epochs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) epoch: u64,
}

/// The version a `versions` or `usage` table key (key id ‖ version) names.
pub(super) fn version_of_key(key: &[u8]) -> Option<u32> {
    key.get(16..20)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
}

/// The error naming a stored version (by its table key) that blocks an operation.
pub(super) fn unreadable_version(record: &KeyRecord, key: &[u8], why: &str) -> Error {
    Error::Unreadable(format!(
        "key {}/{} ({}) version {}: {why}",
        record.tenant,
        record.name,
        record.id,
        version_of_key(key).unwrap_or(0),
    ))
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub(super) fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Whole days as `"90d"` (how operators write them); anything else in humantime form.
pub(super) fn format_period(secs: u64) -> String {
    if secs % 86_400 == 0 {
        format!("{}d", secs / 86_400)
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

pub(super) fn name_key(tenant: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + name.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

pub(super) fn deletion_key(date: u64, id: &KeyId) -> Vec<u8> {
    let mut k = date.to_be_bytes().to_vec();
    k.extend_from_slice(&id.0);
    k
}

/// Index key of `Table::Rotations`: due date ‖ key id.
pub(super) fn rotation_key(due: u64, id: &KeyId) -> Vec<u8> {
    let mut k = due.to_be_bytes().to_vec();
    k.extend_from_slice(&id.0);
    k
}

pub(super) fn version_key(id: &KeyId, version: u32) -> Vec<u8> {
    let mut k = id.0.to_vec();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(super) fn kek_aad(tenant: &str, id: &KeyId, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(4 + tenant.len() + 20);
    aad.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&id.0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Checks a key name: 1–128 of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "key names are 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Checks a grant set before it is stored.
pub fn validate_grants(grants: &[Grant]) -> Result<(), Error> {
    if grants.len() > MAX_GRANTS {
        return Err(Error::InvalidRequest(format!(
            "a key holds at most {MAX_GRANTS} grants"
        )));
    }
    for g in grants {
        if g.identity.is_empty()
            || g.identity.len() > MAX_IDENTITY_LEN
            || g.identity.chars().any(char::is_control)
        {
            return Err(Error::InvalidRequest(format!(
                "a grant's identity is 1 to {MAX_IDENTITY_LEN} printable characters"
            )));
        }
        if g.operations.is_empty() {
            return Err(Error::InvalidRequest(
                "a grant names at least one operation".into(),
            ));
        }
        let mut ops = g.operations.clone();
        ops.sort();
        ops.dedup();
        if ops.len() != g.operations.len() {
            return Err(Error::InvalidRequest(
                "a grant names each operation once".into(),
            ));
        }
        for ctx in [&g.constraints.context_subset, &g.constraints.context_equals]
            .into_iter()
            .flatten()
        {
            format::canonical_context(ctx)?;
        }
    }
    Ok(())
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|_| Error::Internal("record serialization failed"))
}
