//! The exfiltration brake's state (`docs/brake.md`): `GET /v1/sys/brake` and
//! `POST /v1/sys/brake/release`.

use serde::{Deserialize, Serialize};

/// What a hold is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrakeSubject {
    /// An identity: every unwrap it asks for is refused.
    Identity,
    /// A key: every unwrap under it is refused.
    Key,
}

/// A hold in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrakeHold {
    /// On an identity or a key.
    pub kind: BrakeSubject,
    /// Its tenant.
    pub tenant: String,
    /// The identity or the key's name.
    pub name: String,
    /// Held for this long, seconds.
    pub held_secs: u64,
}

/// `GET /v1/sys/brake`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrakeStatus {
    /// `off`, `dry-run` or `enforce`.
    pub mode: String,
    /// `hold` or `throttle`.
    pub action: String,
    /// The holds in force (the caller's tenant's; every tenant's for `sys`), on this node.
    pub holds: Vec<BrakeHold>,
}

/// `POST /v1/sys/brake/release`: one of `identity` or `key` (of the caller's tenant).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBrakeRequest {
    /// The identity to release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The key to release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The answer of `POST /v1/sys/brake/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseBrakeResponse {
    /// Whether it was held.
    pub released: bool,
}
