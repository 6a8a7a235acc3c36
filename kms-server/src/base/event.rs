//! The kinds of security event Keyhold reports: one closed set, from the layers that
//! notice them (the keyring finding a tampered record, the policy a tampered identity) to
//! the alert destinations that receive them (`alert`). The bottom layer: it imports no
//! other module of the crate.

use serde::Serialize;

/// What an alert is about. Serialized (and named in the docs) in snake case: `denied`,
/// `locked_out`, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A request refused by the policy (role, grant, tenant).
    Denied,
    /// An identity locked out after repeated failures.
    LockedOut,
    /// The service sealed (by an operator, or on a fault).
    Sealed,
    /// The service unsealed.
    Unsealed,
    /// A key disabled.
    KeyDisabled,
    /// A key's deletion scheduled.
    KeyDeletionScheduled,
    /// A key destroyed (crypto-shredded).
    KeyDestroyed,
    /// An erasure-key rotation that could not finish yet.
    ErasureRotationPending,
    /// A runtime identity added, changed or removed.
    IdentityChanged,
    /// A stored runtime identity that fails its MAC.
    IdentityTampered,
    /// Runtime identities of a store from before identity MACs signed at unseal (check them).
    IdentitiesSigned,
    /// A stored lockout that fails its MAC.
    LockoutTampered,
    /// A stored key record that fails its MAC.
    RecordTampered,
    /// A key version whose material does not open.
    VersionUnreadable,
    /// The audit chain does not verify.
    AuditChain,
    /// An audit record could not be written (the request was refused).
    AuditWriteFailed,
    /// The audit file's filesystem is running out of space.
    AuditDiskLow,
    /// An audit exporter has not delivered for a while (its receiver is down or refuses).
    AuditExportStalled,
    /// A reload of TLS files or CRLs failed (the previous ones stay in force).
    TlsReloadFailed,
    /// An XKS request failed SigV4 authentication.
    XksAuthFailed,
    /// A reload of XKS credentials or TLS files failed.
    XksReloadFailed,
    /// The master key rotated on this node.
    MasterKeyRotated,
    /// This node followed a master-key rotation made on another node.
    MasterKeyFollowed,
    /// Alerts dropped because a destination's queue was full (a count).
    AlertsDropped,
    /// Key material handed out: a KMIP Get of a key registered or created extractable.
    KeyExported,
    /// An operation held for approval (dual control): a request was made.
    ApprovalRequested,
    /// A request for approval was approved or denied.
    ApprovalDecided,
    /// An approved operation ran.
    ApprovalExecuted,
    /// The exfiltration brake: an identity or a key went past an unwrap budget (alerted
    /// in a dry run, throttled or held when enforced).
    ExfiltrationSuspected,
}

impl AlertKind {
    /// Every kind.
    pub const ALL: [AlertKind; 29] = [
        Self::Denied,
        Self::LockedOut,
        Self::Sealed,
        Self::Unsealed,
        Self::KeyDisabled,
        Self::KeyDeletionScheduled,
        Self::KeyDestroyed,
        Self::ErasureRotationPending,
        Self::IdentityChanged,
        Self::IdentityTampered,
        Self::IdentitiesSigned,
        Self::LockoutTampered,
        Self::RecordTampered,
        Self::VersionUnreadable,
        Self::AuditChain,
        Self::AuditWriteFailed,
        Self::AuditDiskLow,
        Self::AuditExportStalled,
        Self::TlsReloadFailed,
        Self::XksAuthFailed,
        Self::XksReloadFailed,
        Self::MasterKeyRotated,
        Self::MasterKeyFollowed,
        Self::AlertsDropped,
        Self::KeyExported,
        Self::ApprovalRequested,
        Self::ApprovalDecided,
        Self::ApprovalExecuted,
        Self::ExfiltrationSuspected,
    ];

    /// Its name on the wire and in the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::LockedOut => "locked_out",
            Self::Sealed => "sealed",
            Self::Unsealed => "unsealed",
            Self::KeyDisabled => "key_disabled",
            Self::KeyDeletionScheduled => "key_deletion_scheduled",
            Self::KeyDestroyed => "key_destroyed",
            Self::ErasureRotationPending => "erasure_rotation_pending",
            Self::IdentityChanged => "identity_changed",
            Self::IdentityTampered => "identity_tampered",
            Self::IdentitiesSigned => "identities_signed",
            Self::LockoutTampered => "lockout_tampered",
            Self::RecordTampered => "record_tampered",
            Self::VersionUnreadable => "version_unreadable",
            Self::AuditChain => "audit_chain",
            Self::AuditWriteFailed => "audit_write_failed",
            Self::AuditDiskLow => "audit_disk_low",
            Self::AuditExportStalled => "audit_export_stalled",
            Self::TlsReloadFailed => "tls_reload_failed",
            Self::XksAuthFailed => "xks_auth_failed",
            Self::XksReloadFailed => "xks_reload_failed",
            Self::MasterKeyRotated => "master_key_rotated",
            Self::MasterKeyFollowed => "master_key_followed",
            Self::AlertsDropped => "alerts_dropped",
            Self::KeyExported => "key_exported",
            Self::ApprovalRequested => "approval_requested",
            Self::ApprovalDecided => "approval_decided",
            Self::ApprovalExecuted => "approval_executed",
            Self::ExfiltrationSuspected => "exfiltration_suspected",
        }
    }

    /// Kinds anyone on the network can cause in bulk (a refused request): they queue
    /// apart, behind every other kind, so a flood of them cannot delay the ones that
    /// matter.
    pub fn routine(self) -> bool {
        matches!(self, Self::Denied | Self::XksAuthFailed)
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serialized_form_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for k in AlertKind::ALL {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
            assert!(seen.insert(k.as_str()), "{k} twice");
        }
    }

    /// The operations guide says what each kind means and what to do.
    #[test]
    fn every_kind_is_in_the_operations_guide() {
        let guide = include_str!("../../../docs/operations.md");
        for k in AlertKind::ALL {
            assert!(
                guide.contains(&format!("| `{k}` |"))
                    || guide.contains(&format!("`{k}` /"))
                    || guide.contains(&format!("/ `{k}` |")),
                "docs/operations.md does not say what `{k}` means"
            );
        }
    }
}
