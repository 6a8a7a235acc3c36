//! Dual control (`docs/approvals.md`): an approval policy (a tenant's, or the service's)
//! names operations that wait for M approvals by *other* operators of the same scope
//! within a window; any of them can deny; once approved, the requester runs it once, as
//! it was described, by sending it again with the request's id.
//!
//! Requests and policies live in the store's meta table, each with a MAC under the master
//! key's hierarchy ([`crate::crypto::authstate`]): whoever can write the table without
//! the master key cannot approve a request, forge one, or change a policy. Every change is
//! a compare-and-set on the record's stored bytes, so two approvers, or two runs, at once
//! on two nodes of a shared store cannot both win: a request runs at most once (it is
//! marked run before it runs; a node stopping in between leaves it run without an
//! outcome, visible, never run twice).

use kms_client::api::{
    ApprovalAction, ApprovalInfo, ApprovalPolicy, ApprovalScope, ApprovalStatus, Gate, Vote,
};
use serde::{Deserialize, Serialize};

use crate::access::policy::{Operation, Principal};
use crate::base::error::Error;
use crate::crypto::authstate::StateSigner;
use crate::storage::{KeyStore, StoreError, Table, WriteBatch};

/// Requests: `approval/request/<id>`.
const REQUEST_PREFIX: &str = "approval/request/";
/// Policies, under `policy/` so that backups carry them: `policy/approvals/tenant/<tenant>`
/// and `policy/approvals/service`.
const POLICY_PREFIX: &str = "policy/approvals/";
const REQUEST_DOMAIN: &str = "approval-request/v1";
const POLICY_DOMAIN: &str = "approval-policy/v1";
/// Compare-and-set attempts before giving up (another writer kept winning).
const TRIES: usize = 8;
/// The longest reason kept with a vote.
const MAX_REASON: usize = 256;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredVote {
    identity: String,
    at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRequest {
    scope: ApprovalScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    operation: Gate,
    action: ApprovalAction,
    requested_by: String,
    requested_at: u64,
    expires_at: u64,
    required: u32,
    approvals: Vec<StoredVote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    denial: Option<StoredVote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    executed_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPolicy {
    policy: ApprovalPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

fn rfc3339(at: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at))
        .to_string()
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|_| Error::Internal("record serialization failed"))
}

/// Checks a policy for `scope`: 1 to 9 approvers, a window of a minute to 30 days, and
/// only the operations of that scope.
pub fn validate(scope: ApprovalScope, policy: &ApprovalPolicy) -> Result<(), Error> {
    if !(1..=9).contains(&policy.approvers) {
        return Err(Error::InvalidRequest("approvers must be 1 to 9".into()));
    }
    if !(60..=30 * 86_400).contains(&policy.window_secs) {
        return Err(Error::InvalidRequest(
            "window_secs must be between 60 and 2592000 (30 days)".into(),
        ));
    }
    for g in &policy.operations {
        let fits = *g == Gate::Policy || g.service_wide() == (scope == ApprovalScope::Service);
        if !fits {
            return Err(Error::InvalidRequest(format!(
                "{} is not an operation of the {} policy",
                g.as_str(),
                match scope {
                    ApprovalScope::Tenant => "tenant",
                    ApprovalScope::Service => "service",
                }
            )));
        }
    }
    Ok(())
}

/// Whether `who` belongs to `scope` (of `tenant`) as an operator: a tenant's admins, the
/// service's `sys` operators.
fn operator_of(who: &Principal, scope: ApprovalScope, tenant: Option<&str>) -> bool {
    match scope {
        ApprovalScope::Tenant => {
            tenant == Some(who.tenant.as_str()) && who.authorize(Operation::ManageKeys).is_ok()
        }
        ApprovalScope::Service => who.authorize(Operation::Service).is_ok(),
    }
}

/// Whether `who` may read requests of `scope`: its operators, and a tenant's auditors.
fn reader_of(who: &Principal, scope: ApprovalScope, tenant: Option<&str>) -> bool {
    operator_of(who, scope, tenant)
        || (scope == ApprovalScope::Tenant
            && tenant == Some(who.tenant.as_str())
            && who.authorize(Operation::ReadKeys).is_ok())
}

/// The scope an operation belongs to (a policy change: the scope of that policy).
pub fn scope_of(gate: Gate) -> ApprovalScope {
    if gate.service_wide() {
        ApprovalScope::Service
    } else {
        ApprovalScope::Tenant
    }
}

/// The approval records of one store, as of `now` (unix seconds).
pub struct Approvals<'a> {
    /// The store.
    pub store: &'a dyn KeyStore,
    /// Signs and checks the records.
    pub signer: &'a dyn StateSigner,
    /// The time.
    pub now: u64,
}

impl Approvals<'_> {
    fn policy_key(scope: ApprovalScope, tenant: &str) -> Vec<u8> {
        match scope {
            ApprovalScope::Tenant => format!("{POLICY_PREFIX}tenant/{tenant}").into_bytes(),
            ApprovalScope::Service => format!("{POLICY_PREFIX}service").into_bytes(),
        }
    }

    /// The policy of `scope` (`tenant`'s for a tenant), if any. A stored policy that fails
    /// its MAC is reported and refused (503-like: nothing held by it runs unapproved).
    pub fn policy(
        &self,
        scope: ApprovalScope,
        tenant: &str,
    ) -> Result<Option<ApprovalPolicy>, Error> {
        let key = Self::policy_key(scope, tenant);
        let Some(bytes) = self.store.get(Table::Meta, &key).map_err(Error::Storage)? else {
            return Ok(None);
        };
        let stored: StoredPolicy =
            serde_json::from_slice(&bytes).map_err(|_| Error::Corrupt("approval policy"))?;
        let message = json(&(&key, &stored.policy))?;
        let ok = match &stored.mac {
            Some(tag) => self.signer.verify(POLICY_DOMAIN, &message, tag)?,
            None => false,
        };
        if !ok {
            self.signer.report(
                crate::base::event::AlertKind::RecordTampered,
                format!(
                    "the approval policy {} fails its MAC",
                    String::from_utf8_lossy(&key)
                ),
            );
            return Err(Error::Corrupt("approval policy fails its MAC"));
        }
        Ok(Some(stored.policy))
    }

    /// Sets (or, with `None`, removes) the policy of `scope`.
    pub fn set_policy(
        &self,
        scope: ApprovalScope,
        tenant: &str,
        policy: Option<ApprovalPolicy>,
    ) -> Result<(), Error> {
        let key = Self::policy_key(scope, tenant);
        let mut batch = WriteBatch::new();
        match policy {
            None => {
                batch.delete(Table::Meta, &key);
            }
            Some(mut policy) => {
                validate(scope, &policy)?;
                policy.operations.sort();
                policy.operations.dedup();
                let mac = self.signer.sign(POLICY_DOMAIN, &json(&(&key, &policy))?)?;
                let stored = StoredPolicy {
                    policy,
                    mac: Some(mac),
                };
                batch.put(Table::Meta, &key, &json(&stored)?);
            }
        }
        self.store.commit(&batch).map_err(Error::Storage)
    }

    fn request_key(id: &str) -> Vec<u8> {
        format!("{REQUEST_PREFIX}{id}").into_bytes()
    }

    fn sign(&self, id: &str, r: &mut StoredRequest) -> Result<Vec<u8>, Error> {
        r.mac = None;
        let mac = self.signer.sign(REQUEST_DOMAIN, &json(&(id, &*r))?)?;
        r.mac = Some(mac);
        json(r)
    }

    /// Request `id` and its stored bytes (for the compare-and-set), its MAC checked.
    fn load(&self, id: &str) -> Result<(StoredRequest, Vec<u8>), Error> {
        let bytes = self
            .store
            .get(Table::Meta, &Self::request_key(id))
            .map_err(Error::Storage)?
            .ok_or(Error::NotFound)?;
        let r = self.parse(id, &bytes)?;
        Ok((r, bytes))
    }

    fn parse(&self, id: &str, bytes: &[u8]) -> Result<StoredRequest, Error> {
        let mut r: StoredRequest =
            serde_json::from_slice(bytes).map_err(|_| Error::Corrupt("approval request"))?;
        let tag = r.mac.take();
        let ok = match &tag {
            Some(tag) => self.signer.verify(REQUEST_DOMAIN, &json(&(id, &r))?, tag)?,
            None => false,
        };
        if !ok {
            self.signer.report(
                crate::base::event::AlertKind::RecordTampered,
                format!("approval request {id} fails its MAC"),
            );
            return Err(Error::Corrupt("approval request fails its MAC"));
        }
        r.mac = tag;
        Ok(r)
    }

    fn status(&self, r: &StoredRequest) -> ApprovalStatus {
        if r.executed_at.is_some() {
            ApprovalStatus::Executed
        } else if r.denial.is_some() {
            ApprovalStatus::Denied
        } else if self.now >= r.expires_at {
            ApprovalStatus::Expired
        } else if r.approvals.len() >= r.required as usize {
            ApprovalStatus::Approved
        } else {
            ApprovalStatus::Pending
        }
    }

    fn info(&self, id: &str, r: &StoredRequest) -> ApprovalInfo {
        let vote = |v: &StoredVote| Vote {
            identity: v.identity.clone(),
            at: rfc3339(v.at),
            reason: v.reason.clone(),
        };
        ApprovalInfo {
            id: id.to_owned(),
            scope: r.scope,
            tenant: r.tenant.clone(),
            operation: r.operation,
            action: r.action.clone(),
            requested_by: r.requested_by.clone(),
            requested_at: rfc3339(r.requested_at),
            expires_at: rfc3339(r.expires_at),
            required: r.required,
            approvals: r.approvals.iter().map(vote).collect(),
            denial: r.denial.as_ref().map(vote),
            status: self.status(r),
            executed_at: r.executed_at.map(rfc3339),
            outcome: r.outcome.clone(),
        }
    }

    /// Records `who`'s request to run `action` (an operation `policy`, of `scope`, holds).
    pub fn request(
        &self,
        who: &Principal,
        scope: ApprovalScope,
        gate: Gate,
        action: ApprovalAction,
        policy: &ApprovalPolicy,
    ) -> Result<ApprovalInfo, Error> {
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| Error::Internal("random generator failed"))?;
        let id = kms_client::hex::encode(&id);
        let mut r = StoredRequest {
            scope,
            tenant: (scope == ApprovalScope::Tenant).then(|| who.tenant.clone()),
            operation: gate,
            action,
            requested_by: who.identity.clone(),
            requested_at: self.now,
            expires_at: self.now + policy.window_secs,
            required: policy.approvers,
            approvals: Vec::new(),
            denial: None,
            executed_at: None,
            outcome: None,
            mac: None,
        };
        let bytes = self.sign(&id, &mut r)?;
        let key = Self::request_key(&id);
        let mut batch = WriteBatch::new();
        batch
            .require(Table::Meta, &key, None)
            .put(Table::Meta, &key, &bytes);
        self.store.commit(&batch).map_err(Error::Storage)?;
        Ok(self.info(&id, &r))
    }

    /// Request `id`, if `who` may read it.
    pub fn show(&self, who: &Principal, id: &str) -> Result<ApprovalInfo, Error> {
        let (r, _) = self.load(id)?;
        if !reader_of(who, r.scope, r.tenant.as_deref()) {
            // As if it did not exist: ids of other tenants are not confirmed.
            return Err(Error::NotFound);
        }
        Ok(self.info(id, &r))
    }

    /// The requests `who` may read, newest first. A record that fails its MAC is left
    /// out (and reported).
    pub fn list(&self, who: &Principal) -> Result<Vec<ApprovalInfo>, Error> {
        let rows = self
            .store
            .scan_prefix(Table::Meta, REQUEST_PREFIX.as_bytes())
            .map_err(Error::Storage)?;
        let mut out = Vec::new();
        for (key, bytes) in rows {
            let Some(id) = key
                .strip_prefix(REQUEST_PREFIX.as_bytes())
                .and_then(|k| std::str::from_utf8(k).ok())
            else {
                continue;
            };
            let Ok(r) = self.parse(id, &bytes) else {
                continue;
            };
            if reader_of(who, r.scope, r.tenant.as_deref()) {
                out.push((r.requested_at, self.info(id, &r)));
            }
        }
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(out.into_iter().map(|(_, i)| i).collect())
    }

    /// Applies `change` to request `id` with a compare-and-set on its stored bytes,
    /// again from a fresh read when another writer came first.
    fn update(
        &self,
        id: &str,
        mut change: impl FnMut(&mut StoredRequest, ApprovalStatus) -> Result<(), Error>,
    ) -> Result<ApprovalInfo, Error> {
        let key = Self::request_key(id);
        for _ in 0..TRIES {
            let (mut r, old) = self.load(id)?;
            let status = self.status(&r);
            change(&mut r, status)?;
            let bytes = self.sign(id, &mut r)?;
            let mut batch = WriteBatch::new();
            batch
                .require(Table::Meta, &key, Some(&old))
                .put(Table::Meta, &key, &bytes);
            match self.store.commit(&batch) {
                Ok(()) => return Ok(self.info(id, &r)),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(Error::Storage(e)),
            }
        }
        Err(Error::Storage(StoreError::Conflict("meta")))
    }

    /// `who` approves (or, `approve` false, denies) request `id`. The requester cannot
    /// decide on their own request; an operator of the request's scope can, once; a
    /// request that is no longer pending (approved requests can still be denied until
    /// they run) cannot be decided on.
    pub fn decide(
        &self,
        who: &Principal,
        id: &str,
        approve: bool,
        reason: Option<String>,
    ) -> Result<ApprovalInfo, Error> {
        if reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON)
        {
            return Err(Error::InvalidRequest(format!(
                "reason is at most {MAX_REASON} characters"
            )));
        }
        let now = self.now;
        self.update(id, |r, status| {
            if !reader_of(who, r.scope, r.tenant.as_deref()) {
                return Err(Error::NotFound);
            }
            if !operator_of(who, r.scope, r.tenant.as_deref()) {
                return Err(Error::PermissionDenied(
                    "deciding on a request needs an operator of its scope (a tenant's admin, the service's sys)",
                ));
            }
            if who.identity == r.requested_by {
                return Err(Error::PermissionDenied(
                    "the requester cannot approve or deny their own request: another operator must",
                ));
            }
            if r.approvals.iter().any(|v| v.identity == who.identity) {
                return Err(Error::InvalidState("this identity already approved this request"));
            }
            match (status, approve) {
                (ApprovalStatus::Pending, _) | (ApprovalStatus::Approved, false) => {}
                (ApprovalStatus::Approved, true) => {
                    return Err(Error::InvalidState("the request is already approved"))
                }
                (ApprovalStatus::Denied, _) => return Err(Error::InvalidState("the request was denied")),
                (ApprovalStatus::Expired, _) => return Err(Error::InvalidState("the request expired")),
                (ApprovalStatus::Executed, _) => return Err(Error::InvalidState("the request already ran")),
            }
            let vote = StoredVote {
                identity: who.identity.clone(),
                at: now,
                reason: reason.clone(),
            };
            if approve {
                r.approvals.push(vote);
            } else {
                r.denial = Some(vote);
            }
            Ok(())
        })
    }

    /// Marks request `id` run, for `who` about to run `gate` with `action`: only its
    /// requester, only approved and unexpired, only exactly what was approved, only once.
    pub fn claim(
        &self,
        who: &Principal,
        id: &str,
        gate: Gate,
        action: &ApprovalAction,
    ) -> Result<ApprovalInfo, Error> {
        let now = self.now;
        self.update(id, |r, status| {
            if !reader_of(who, r.scope, r.tenant.as_deref()) {
                return Err(Error::NotFound);
            }
            if r.requested_by != who.identity {
                return Err(Error::PermissionDenied(
                    "an approved request is run by the identity that asked for it",
                ));
            }
            if r.operation != gate || r.action != *action {
                return Err(Error::InvalidRequest(format!(
                    "this is not the request approved as {id}: it approved {} {} with the body shown by `kmsctl approvals show {id}`",
                    r.action.method, r.action.path
                )));
            }
            match status {
                ApprovalStatus::Approved => {}
                ApprovalStatus::Pending => {
                    return Err(Error::InvalidState("the request is still waiting for approvals"))
                }
                ApprovalStatus::Denied => return Err(Error::InvalidState("the request was denied")),
                ApprovalStatus::Expired => return Err(Error::InvalidState("the request expired")),
                ApprovalStatus::Executed => return Err(Error::InvalidState("the request already ran")),
            }
            r.executed_at = Some(now);
            Ok(())
        })
    }

    /// Records how the run of request `id` went.
    pub fn finish(&self, id: &str, outcome: String) -> Result<ApprovalInfo, Error> {
        self.update(id, |r, _| {
            r.outcome.get_or_insert_with(|| outcome.clone());
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kms_client::api::Role;

    use super::*;
    use crate::crypto::authstate::testing::TestSigner;

    fn who(identity: &str, tenant: &str, role: Role) -> Principal {
        Principal {
            identity: identity.into(),
            tenant: tenant.into(),
            role,
        }
    }

    fn action() -> ApprovalAction {
        ApprovalAction {
            method: "POST".into(),
            path: "/v1/keys/k/schedule-deletion".into(),
            body: serde_json::json!({"pending_window_days": 7}),
        }
    }

    fn temporary() -> (tempfile::TempDir, Arc<dyn KeyStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(crate::storage::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        (dir, store)
    }

    fn policy() -> ApprovalPolicy {
        ApprovalPolicy {
            operations: vec![Gate::Destroy],
            approvers: 2,
            window_secs: 3600,
        }
    }

    #[test]
    fn two_other_admins_approve_then_the_requester_runs_it_once() {
        let (_dir, store) = temporary();
        let signer = TestSigner::new();
        let at = |now| Approvals {
            store: store.as_ref(),
            signer: &signer,
            now,
        };
        let (a, b, c) = (
            who("a", "t", Role::Admin),
            who("b", "t", Role::Admin),
            who("c", "t", Role::Admin),
        );
        let r = at(100)
            .request(
                &a,
                ApprovalScope::Tenant,
                Gate::Destroy,
                action(),
                &policy(),
            )
            .unwrap();
        assert_eq!(r.status, ApprovalStatus::Pending);
        assert!(matches!(
            at(101).decide(&a, &r.id, true, None),
            Err(Error::PermissionDenied(_))
        ));
        let other = who("x", "other", Role::Admin);
        assert!(matches!(
            at(101).decide(&other, &r.id, true, None),
            Err(Error::NotFound)
        ));
        at(102).decide(&b, &r.id, true, None).unwrap();
        assert!(matches!(
            at(103).decide(&b, &r.id, true, None),
            Err(Error::InvalidState(_))
        ));
        assert!(matches!(
            at(103).claim(&a, &r.id, Gate::Destroy, &action()),
            Err(Error::InvalidState(_))
        ));
        let done = at(104).decide(&c, &r.id, true, None).unwrap();
        assert_eq!(done.status, ApprovalStatus::Approved);
        // Only the requester, only what was approved.
        assert!(at(105).claim(&b, &r.id, Gate::Destroy, &action()).is_err());
        let mut changed = action();
        changed.body = serde_json::json!({"pending_window_days": 30});
        assert!(at(105).claim(&a, &r.id, Gate::Destroy, &changed).is_err());
        let ran = at(105).claim(&a, &r.id, Gate::Destroy, &action()).unwrap();
        assert_eq!(ran.status, ApprovalStatus::Executed);
        assert!(at(106).claim(&a, &r.id, Gate::Destroy, &action()).is_err());
    }

    #[test]
    fn an_expired_or_denied_request_never_runs() {
        let (_dir, store) = temporary();
        let signer = TestSigner::new();
        let at = |now| Approvals {
            store: store.as_ref(),
            signer: &signer,
            now,
        };
        let (a, b, c) = (
            who("a", "t", Role::Admin),
            who("b", "t", Role::Admin),
            who("c", "t", Role::Admin),
        );
        let r = at(0)
            .request(
                &a,
                ApprovalScope::Tenant,
                Gate::Destroy,
                action(),
                &policy(),
            )
            .unwrap();
        at(10).decide(&b, &r.id, true, None).unwrap();
        at(20).decide(&c, &r.id, true, None).unwrap();
        assert_eq!(
            at(3600).show(&a, &r.id).unwrap().status,
            ApprovalStatus::Expired
        );
        assert!(at(3600).claim(&a, &r.id, Gate::Destroy, &action()).is_err());

        let r = at(0)
            .request(
                &a,
                ApprovalScope::Tenant,
                Gate::Destroy,
                action(),
                &policy(),
            )
            .unwrap();
        at(1).decide(&b, &r.id, true, None).unwrap();
        at(2)
            .decide(&c, &r.id, false, Some("not this key".into()))
            .unwrap();
        assert!(at(3).decide(&b, &r.id, true, None).is_err());
        assert!(at(3).claim(&a, &r.id, Gate::Destroy, &action()).is_err());
    }

    #[test]
    fn a_record_written_outside_keyhold_is_refused() {
        let (_dir, store) = temporary();
        let signer = TestSigner::new();
        let ledger = Approvals {
            store: store.as_ref(),
            signer: &signer,
            now: 0,
        };
        let a = who("a", "t", Role::Admin);
        let r = ledger
            .request(
                &a,
                ApprovalScope::Tenant,
                Gate::Destroy,
                action(),
                &policy(),
            )
            .unwrap();
        let key = Approvals::request_key(&r.id);
        let stored = store.get(Table::Meta, &key).unwrap().unwrap();
        let forged = String::from_utf8(stored).unwrap().replace(
            "\"approvals\":[]",
            "\"approvals\":[{\"identity\":\"b\",\"at\":1},{\"identity\":\"c\",\"at\":1}]",
        );
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, &key, forged.as_bytes());
        store.commit(&batch).unwrap();
        assert!(ledger.claim(&a, &r.id, Gate::Destroy, &action()).is_err());
        assert!(ledger.list(&a).unwrap().is_empty());
    }

    #[test]
    fn policies_hold_only_their_scope_s_operations() {
        let mut p = policy();
        p.operations = vec![Gate::RotateMaster];
        assert!(validate(ApprovalScope::Tenant, &p).is_err());
        assert!(validate(ApprovalScope::Service, &p).is_ok());
        p.operations = vec![Gate::Destroy];
        assert!(validate(ApprovalScope::Service, &p).is_err());
        p.approvers = 0;
        assert!(validate(ApprovalScope::Tenant, &p).is_err());
    }
}
