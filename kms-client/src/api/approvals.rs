//! Dual control (`docs/approvals.md`): operations a tenant's (or the service's) approval
//! policy names wait for M other operators' approvals, then run once when their requester
//! sends them again with the approval's id (the `Keyhold-Approval` header).

use serde::{Deserialize, Serialize};

/// The header that redeems an approved request: its id.
pub const APPROVAL_HEADER: &str = "keyhold-approval";

/// An operation an approval policy can hold for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gate {
    /// Scheduling a key's deletion (native `schedule-deletion`; KMIP Destroy is refused
    /// while gated).
    Destroy,
    /// Raising a key's `min-decrypt-version` (retires versions).
    MinDecryptVersion,
    /// A grant that gives a key to an identity it did not grant before.
    Grant,
    /// Mapping an identity to the admin role (`PUT /v1/sys/identities`): a new
    /// operator, who could then approve.
    Identity,
    /// Changing this approval policy.
    Policy,
    /// Exporting a backup (service-wide).
    BackupExport,
    /// Rotating the master key (service-wide).
    RotateMaster,
}

impl Gate {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Destroy => "destroy",
            Gate::MinDecryptVersion => "min-decrypt-version",
            Gate::Grant => "grant",
            Gate::Identity => "identity",
            Gate::Policy => "policy",
            Gate::BackupExport => "backup-export",
            Gate::RotateMaster => "rotate-master",
        }
    }

    /// Whether the operation is the whole service's (the `sys` role's), not a tenant's.
    pub fn service_wide(self) -> bool {
        matches!(self, Gate::BackupExport | Gate::RotateMaster)
    }
}

/// Whose policy: the caller's tenant's, or the service's (the `sys` role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalScope {
    /// The caller's tenant: its admins request and approve.
    Tenant,
    /// The service: its `sys` operators request and approve.
    Service,
}

fn default_window() -> u64 {
    86_400
}

/// An approval policy: which operations wait, for how many approvers, how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPolicy {
    /// The operations held for approval (a tenant's: destroy, min-decrypt-version, grant,
    /// identity, policy; the service's: backup-export, rotate-master, policy).
    pub operations: Vec<Gate>,
    /// Distinct approvers needed besides the requester (1 to 9).
    pub approvers: u32,
    /// How long a request may wait for its approvals and then be run, seconds (60 to
    /// 30 days; default one day).
    #[serde(default = "default_window")]
    pub window_secs: u64,
}

/// `PUT /v1/approvals/policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetApprovalPolicyRequest {
    /// Which policy.
    pub scope: ApprovalScope,
    /// The new policy; `None` removes it (no operation waits).
    pub policy: Option<ApprovalPolicy>,
}

/// `GET /v1/approvals/policy`: the policies that apply to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalPolicies {
    /// The caller's tenant's.
    pub tenant: Option<ApprovalPolicy>,
    /// The service's.
    pub service: Option<ApprovalPolicy>,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStatus {
    /// Waiting for approvals.
    Pending,
    /// Approved: its requester may run it once, before it expires.
    Approved,
    /// An approver denied it: it never runs.
    Denied,
    /// Its window passed before it ran: it never runs.
    Expired,
    /// Run (its outcome says how it went).
    Executed,
}

/// An approval or a denial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// Who.
    pub identity: String,
    /// When (RFC 3339).
    pub at: String,
    /// Why (a denial's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What was asked, as approvers see it and as it must be sent again to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalAction {
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The request's body (secrets, such as a master-key passphrase, are never kept:
    /// they are sent again when it runs).
    pub body: serde_json::Value,
}

/// One request for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalInfo {
    /// Its id.
    pub id: String,
    /// Whose policy holds it.
    pub scope: ApprovalScope,
    /// The tenant (a tenant's request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The operation.
    pub operation: Gate,
    /// What exactly.
    pub action: ApprovalAction,
    /// Who asked.
    pub requested_by: String,
    /// When (RFC 3339).
    pub requested_at: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
    /// Approvals needed.
    pub required: u32,
    /// Approvals given.
    pub approvals: Vec<Vote>,
    /// The denial, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<Vote>,
    /// Where it stands.
    pub status: ApprovalStatus,
    /// When it ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_at: Option<String>,
    /// How it went: `ok`, or the error; absent while it runs (or if the node stopped
    /// while it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// `GET /v1/approvals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalList {
    /// Newest first.
    pub approvals: Vec<ApprovalInfo>,
}

/// `POST /v1/approvals/{id}/approve` and `/deny`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideRequest {
    /// Why (shown with a denial; at most 256 characters).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer (202 Accepted) to an operation its policy holds for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalPending {
    /// What to do next.
    pub message: String,
    /// The request.
    pub approval: ApprovalInfo,
}
