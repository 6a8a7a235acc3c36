//! Who may do what: a verified certificate's identity → a [`Principal`] (tenant and role),
//! and the role check for each operation. Default deny: an identity neither in the
//! configuration nor added by an admin at run time can do nothing. (Which keys an app may
//! use, and how, is the keys' grants: see [`crate::keyring`].)
//!
//! Roles: `admin` manages keys and the seal but cannot use keys (no datakey, wrap, unwrap,
//! rewrap); `app` uses its tenant's keys but cannot manage them; `auditor` reads key
//! metadata.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use kms_client::api::IdentityInfo;
use serde::{Deserialize, Serialize};

use crate::config::IdentityMapping;
use crate::error::Error;
use crate::keystore::{KeyStore, Table, WriteBatch};

/// Where an identity is read from in a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The first URI subject alternative name (e.g. a SPIFFE id).
    UriSan,
    /// The first DNS subject alternative name.
    DnsSan,
    /// The subject's common name.
    SubjectCn,
}

pub use kms_client::api::Role;

/// What a request wants to do, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// List or read key metadata.
    ReadKeys,
    /// Create, rotate, enable, disable keys.
    ManageKeys,
    /// datakey, wrap, unwrap, rewrap, batch.
    UseKeys,
    /// Seal status, seal, unseal.
    System,
    /// Read the audit trail.
    ReadAudit,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The identity read from its certificate.
    pub identity: String,
    /// Its tenant.
    pub tenant: String,
    /// Its role.
    pub role: Role,
}

impl Principal {
    /// Whom a protocol adapter (XKS, DKE, CSE, EKM, Salesforce) acts as: its configured
    /// identity, as an app of its tenant, so the key's grants decide what it may do.
    pub fn adapter(identity: &str, tenant: &str) -> Self {
        Self {
            identity: identity.to_owned(),
            tenant: tenant.to_owned(),
            role: Role::App,
        }
    }

    /// Allows or denies `op` for this principal's role.
    pub fn authorize(&self, op: Operation) -> Result<(), Error> {
        let allowed = match op {
            Operation::ReadKeys => matches!(self.role, Role::Admin | Role::Auditor),
            Operation::ManageKeys | Operation::System => self.role == Role::Admin,
            Operation::UseKeys => self.role == Role::App,
            Operation::ReadAudit => self.role == Role::Auditor,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied(match op {
                Operation::ReadKeys => "reading key metadata needs the admin or auditor role",
                Operation::ManageKeys => "managing keys needs the admin role",
                Operation::UseKeys => "using keys needs the app role",
                Operation::System => "seal operations need the admin role",
                Operation::ReadAudit => "reading the audit trail needs the auditor role",
            }))
        }
    }
}

/// Where runtime identities live in the store's meta table.
const RUNTIME_PREFIX: &[u8] = crate::keystore::META_IDENTITY_PREFIX;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredIdentity {
    tenant: String,
    role: Role,
}

/// The identity table: the configuration file's mappings (fixed) plus those set over the
/// admin API at run time (kept in the store, so they survive restarts).
#[derive(Default)]
pub struct Policy {
    fixed: HashMap<String, Principal>,
    runtime: RwLock<HashMap<String, Principal>>,
    store: Option<Arc<dyn KeyStore>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("fixed", &self.fixed.len())
            .finish_non_exhaustive()
    }
}

fn principal(identity: &str, tenant: &str, role: Role) -> Principal {
    Principal {
        identity: identity.to_owned(),
        tenant: tenant.to_owned(),
        role,
    }
}

/// Longest identity accepted.
pub const MAX_IDENTITY_LEN: usize = 1024;

impl Policy {
    /// Builds the table from configuration (already validated: no duplicates), without
    /// runtime identities.
    pub fn new(mappings: &[IdentityMapping]) -> Self {
        let fixed = mappings
            .iter()
            .map(|m| {
                (
                    m.identity.clone(),
                    principal(&m.identity, &m.tenant, m.role),
                )
            })
            .collect();
        Self {
            fixed,
            runtime: RwLock::new(HashMap::new()),
            store: None,
        }
    }

    /// The configuration's mappings plus the runtime identities stored in `store`.
    pub fn with_store(
        mappings: &[IdentityMapping],
        store: Arc<dyn KeyStore>,
    ) -> Result<Self, Error> {
        let mut policy = Self::new(mappings);
        let mut runtime = HashMap::new();
        for (key, value) in store.scan_prefix(Table::Meta, RUNTIME_PREFIX)? {
            let identity = std::str::from_utf8(&key[RUNTIME_PREFIX.len()..])
                .map_err(|_| Error::Corrupt("runtime identity key"))?;
            let stored: StoredIdentity = serde_json::from_slice(&value)
                .map_err(|_| Error::Corrupt("runtime identity record"))?;
            // The configuration file wins over a stale runtime entry.
            if !policy.fixed.contains_key(identity) {
                runtime.insert(
                    identity.to_owned(),
                    principal(identity, &stored.tenant, stored.role),
                );
            }
        }
        policy.runtime = RwLock::new(runtime);
        policy.store = Some(store);
        Ok(policy)
    }

    /// The principal for a verified identity; unknown identities are denied.
    pub fn resolve(&self, identity: &str) -> Result<Principal, Error> {
        if let Some(p) = self.fixed.get(identity) {
            return Ok(p.clone());
        }
        self.runtime
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .cloned()
            .ok_or(Error::PermissionDenied("this identity has no role here"))
    }

    /// A tenant's identities, by identity.
    pub fn list(&self, tenant: &str) -> Vec<IdentityInfo> {
        let runtime = self.runtime.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<IdentityInfo> = self
            .fixed
            .values()
            .map(|p| (p, "config"))
            .chain(runtime.values().map(|p| (p, "runtime")))
            .filter(|(p, _)| p.tenant == tenant)
            .map(|(p, source)| IdentityInfo {
                identity: p.identity.clone(),
                role: p.role,
                source: source.into(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn store(&self) -> Result<&Arc<dyn KeyStore>, Error> {
        self.store
            .as_ref()
            .ok_or(Error::InvalidState("this server keeps no runtime policy"))
    }

    /// Maps `identity` to `role` in `tenant`, durably. Identities of the configuration
    /// file, and runtime identities of other tenants, cannot be changed here.
    pub fn set(&self, tenant: &str, identity: &str, role: Role) -> Result<(), Error> {
        if identity.is_empty()
            || identity.len() > MAX_IDENTITY_LEN
            || identity.chars().any(char::is_control)
        {
            return Err(Error::InvalidRequest(format!(
                "an identity is 1 to {MAX_IDENTITY_LEN} printable characters"
            )));
        }
        let store = self.store()?;
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        let foreign = self.fixed.contains_key(identity)
            || runtime.get(identity).is_some_and(|p| p.tenant != tenant);
        if foreign {
            return Err(Error::InvalidState(
                "this identity is mapped outside your tenant's runtime policy \
                 (in the configuration file or another tenant)",
            ));
        }
        let record = serde_json::to_vec(&StoredIdentity {
            tenant: tenant.to_owned(),
            role,
        })
        .map_err(|_| Error::Internal("record serialization failed"))?;
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, &runtime_key(identity), &record);
        store.commit(&batch)?;
        runtime.insert(identity.to_owned(), principal(identity, tenant, role));
        Ok(())
    }

    /// Removes a runtime identity of `tenant`, durably. `by` (the caller) cannot remove
    /// itself, so a tenant cannot lose its last admin by accident.
    pub fn remove(&self, tenant: &str, identity: &str, by: &str) -> Result<(), Error> {
        if identity == by {
            return Err(Error::InvalidState("you cannot remove your own identity"));
        }
        let store = self.store()?;
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        if runtime.get(identity).is_none_or(|p| p.tenant != tenant) {
            return Err(
                if self.fixed.get(identity).is_some_and(|p| p.tenant == tenant) {
                    Error::InvalidState(
                        "this identity is in the configuration file: remove it there",
                    )
                } else {
                    Error::NotFound
                },
            );
        }
        let mut batch = WriteBatch::new();
        batch.delete(Table::Meta, &runtime_key(identity));
        store.commit(&batch)?;
        runtime.remove(identity);
        Ok(())
    }
}

impl Policy {
    /// The runtime identities this node knows.
    pub fn runtime_identities(&self) -> Vec<String> {
        self.runtime
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Reloads one runtime identity from the store, after another node of a shared store
    /// changed it (the change feed said so): set, changed or removed there, so here too.
    pub fn refresh(&self, identity: &str) -> Result<(), Error> {
        let store = self.store()?;
        if self.fixed.contains_key(identity) {
            return Ok(());
        }
        let stored = match store.get(Table::Meta, &runtime_key(identity))? {
            Some(value) => Some(
                serde_json::from_slice::<StoredIdentity>(&value)
                    .map_err(|_| Error::Corrupt("runtime identity record"))?,
            ),
            None => None,
        };
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        match stored {
            Some(s) => {
                runtime.insert(identity.to_owned(), principal(identity, &s.tenant, s.role));
            }
            None => {
                runtime.remove(identity);
            }
        }
        Ok(())
    }
}

fn runtime_key(identity: &str) -> Vec<u8> {
    let mut k = RUNTIME_PREFIX.to_vec();
    k.extend_from_slice(identity.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role) -> Principal {
        Principal {
            identity: "i".into(),
            tenant: "t".into(),
            role,
        }
    }

    #[test]
    fn role_matrix() {
        use Operation::*;
        let table = [
            (Role::Admin, [true, true, false, true]),
            (Role::App, [false, false, true, false]),
            (Role::Auditor, [true, false, false, false]),
        ];
        for (role, expect) in table {
            for (op, ok) in [ReadKeys, ManageKeys, UseKeys, System]
                .into_iter()
                .zip(expect)
            {
                assert_eq!(p(role).authorize(op).is_ok(), ok, "{role:?} {op:?}");
            }
        }
    }

    #[test]
    fn unknown_identity_denied() {
        let pol = Policy::new(&[IdentityMapping {
            identity: "a".into(),
            tenant: "t".into(),
            role: Role::App,
        }]);
        assert!(pol.resolve("a").is_ok());
        assert!(matches!(pol.resolve("b"), Err(Error::PermissionDenied(_))));
    }
}
