//! Who may do what: a verified certificate's identity → a [`Principal`] (tenant and role),
//! and the role check for each operation. Default deny: an identity not in the
//! configuration can do nothing.
//!
//! Roles: `admin` manages keys and the seal but cannot use keys (no datakey, wrap, unwrap,
//! rewrap); `app` uses its tenant's keys but cannot manage them; `auditor` reads key
//! metadata.

use std::collections::HashMap;

use serde::Deserialize;

use crate::config::IdentityMapping;
use crate::error::Error;

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

/// A role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Operators: key management, seal/unseal.
    Admin,
    /// Applications: key use.
    App,
    /// Auditors: read-only metadata.
    Auditor,
}

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

/// The identity table.
#[derive(Debug, Default)]
pub struct Policy {
    by_identity: HashMap<String, Principal>,
}

impl Policy {
    /// Builds the table from configuration (already validated: no duplicates).
    pub fn new(mappings: &[IdentityMapping]) -> Self {
        let by_identity = mappings
            .iter()
            .map(|m| {
                (
                    m.identity.clone(),
                    Principal {
                        identity: m.identity.clone(),
                        tenant: m.tenant.clone(),
                        role: m.role,
                    },
                )
            })
            .collect();
        Self { by_identity }
    }

    /// The principal for a verified identity; unknown identities are denied.
    pub fn resolve(&self, identity: &str) -> Result<Principal, Error> {
        self.by_identity
            .get(identity)
            .cloned()
            .ok_or(Error::PermissionDenied("this identity has no role here"))
    }
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
