//! Who may do what: a verified certificate's identity → a [`Principal`] (tenant and role),
//! and the role check for each operation. Default deny: an identity neither in the
//! configuration nor added by an admin at run time can do nothing. (Which keys an app may
//! use, and how, is the keys' grants: see [`crate::keyring`].)
//!
//! Roles: `admin` manages keys and the seal but cannot use keys (no datakey, wrap, unwrap,
//! rewrap); `app` uses its tenant's keys but cannot manage them; `auditor` reads key
//! metadata.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use kms_client::api::IdentityInfo;
use serde::{Deserialize, Serialize};

use crate::base::error::Error;
use crate::crypto::authstate::StateSigner;
use crate::storage::{KeyStore, Table, WriteBatch};

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

/// One identity → tenant and role.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityMapping {
    /// The identity string read from the certificate (URI SAN, DNS SAN or CN).
    pub identity: String,
    /// Tenant whose keys it works on.
    pub tenant: String,
    /// Role.
    pub role: Role,
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
    /// The tenant's identity policy and its identities' lockouts.
    System,
    /// The whole service: seal, unseal, backup, master-key rotation, every tenant's
    /// lockouts.
    Service,
    /// Seal status.
    Status,
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
            Operation::Service => self.role == Role::Sys,
            Operation::Status => matches!(self.role, Role::Admin | Role::Sys),
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied(match op {
                Operation::ReadKeys => "reading key metadata needs the admin or auditor role",
                Operation::ManageKeys => "managing keys needs the admin role",
                Operation::UseKeys => "using keys needs the app role",
                Operation::System => "the identity policy needs the admin role",
                Operation::Service => {
                    "seal, unseal, backup and master-key rotation need the sys role"
                }
                Operation::Status => "the seal status needs the admin or sys role",
                Operation::ReadAudit => "reading the audit trail needs the auditor role",
            }))
        }
    }
}

/// Where runtime identities live in the store's meta table.
const RUNTIME_PREFIX: &[u8] = crate::storage::META_IDENTITY_PREFIX;
/// The `meta` key of the marker saying every runtime identity carries its MAC (an HMAC
/// itself). Under `policy/`, so backups carry it; outside the identities' prefix.
pub const META_IDENTITIES_MARKER: &[u8] = b"policy/signed/v1";
const MAC_DOMAIN: &str = "runtime-identity/v1";
const MARKER_DOMAIN: &str = "runtime-identities-marker/v1";
const MARKER_MESSAGE: &[u8] = b"every runtime identity is signed";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredIdentity {
    tenant: String,
    role: Role,
    /// The MAC of (identity, tenant, role) ([`crate::crypto::authstate`]); absent in stores from
    /// before identity MACs until their first unseal signs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

/// What a runtime identity's MAC covers.
fn mac_message(identity: &str, tenant: &str, role: Role) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&(identity, tenant, role))
        .map_err(|_| Error::Internal("record serialization failed"))
}

/// A runtime identity as stored, checked at each use.
struct RuntimeEntry {
    principal: Principal,
    mac: Option<String>,
    /// Whether its failure was reported already (once per entry).
    reported: AtomicBool,
}

impl RuntimeEntry {
    fn new(identity: &str, stored: StoredIdentity) -> Arc<Self> {
        Arc::new(Self {
            principal: principal(identity, &stored.tenant, stored.role),
            mac: stored.mac,
            reported: AtomicBool::new(false),
        })
    }
}

/// The identity table: the configuration file's mappings (fixed) plus those set over the
/// admin API at run time (kept in the store, so they survive restarts).
///
/// Runtime identities are stored with a MAC ([`crate::crypto::authstate`]) and checked at each
/// use: one written into the table by hand is refused (403) and reported. While the node
/// is sealed they cannot be checked and answer 503 `Sealed`: the configuration file's
/// identities are the way in then. A store from before identity MACs has its runtime
/// identities signed once, at the first unseal ([`Policy::sign_legacy`]).
#[derive(Default)]
pub struct Policy {
    fixed: HashMap<String, Principal>,
    runtime: RwLock<HashMap<String, Arc<RuntimeEntry>>>,
    store: Option<Arc<dyn KeyStore>>,
    signer: Option<Arc<dyn StateSigner>>,
    /// Set once the store's runtime identities are all signed (the marker is there): from
    /// then on an unsigned one is refused as changed outside Keyhold.
    enforced: AtomicBool,
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
            ..Self::default()
        }
    }

    /// The configuration's mappings plus the runtime identities stored in `store`, checked
    /// with `signer`. When `signer` is unsealed, a store from before identity MACs is
    /// signed now; else at the next unseal (the server calls [`Policy::sign_legacy`]).
    pub fn with_store(
        mappings: &[IdentityMapping],
        store: Arc<dyn KeyStore>,
        signer: Arc<dyn StateSigner>,
    ) -> Result<Self, Error> {
        let mut policy = Self::new(mappings);
        let mut runtime = HashMap::new();
        for (key, value) in store.scan_prefix(Table::Meta, RUNTIME_PREFIX)? {
            let Some((identity, stored)) = parse_row(&key, &value, signer.as_ref()) else {
                continue;
            };
            // The configuration file wins over a stale runtime entry.
            if !policy.fixed.contains_key(&identity) {
                let entry = RuntimeEntry::new(&identity, stored);
                runtime.insert(identity, entry);
            }
        }
        policy.runtime = RwLock::new(runtime);
        policy.store = Some(store);
        policy.signer = Some(signer);
        match policy.sign_legacy() {
            Ok(()) | Err(Error::Sealed) => Ok(policy),
            Err(e) => Err(e),
        }
    }

    /// The principal for a verified identity; unknown identities are denied, and so are
    /// runtime identities whose stored record fails authentication.
    pub fn resolve(&self, identity: &str) -> Result<Principal, Error> {
        if let Some(p) = self.fixed.get(identity) {
            return Ok(p.clone());
        }
        let entry = self
            .runtime
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .cloned()
            .ok_or(Error::PermissionDenied("this identity has no role here"))?;
        self.check(&entry)?;
        Ok(entry.principal.clone())
    }

    /// Whether a runtime identity's record is authentic; a failure is reported once.
    fn check(&self, entry: &RuntimeEntry) -> Result<(), Error> {
        let signer = self
            .signer
            .as_ref()
            .ok_or(Error::Internal("runtime identities without a signer"))?;
        let p = &entry.principal;
        let authentic = match &entry.mac {
            Some(tag) => signer.verify(
                MAC_DOMAIN,
                &mac_message(&p.identity, &p.tenant, p.role)?,
                tag,
            )?,
            // Not signed yet: a store from before identity MACs, not unsealed since.
            None if !self.enforced.load(Ordering::Acquire) => return Err(Error::Sealed),
            None => false,
        };
        if authentic {
            return Ok(());
        }
        if !entry.reported.swap(true, Ordering::AcqRel) {
            tracing::error!(
                identity = %p.identity,
                tenant = %p.tenant,
                "a runtime identity's stored record fails authentication (changed outside Keyhold?): refused"
            );
            signer.report(
                crate::base::event::AlertKind::IdentityTampered,
                format!(
                    "runtime identity {} (tenant {}, role {:?}): its stored record fails authentication",
                    p.identity, p.tenant, p.role
                ),
            );
        }
        Err(Error::PermissionDenied(
            "this identity's stored role fails authentication (changed outside Keyhold): refused; the operators are alerted",
        ))
    }

    /// A tenant's identities, by identity (runtime ones only when authentic).
    pub fn list(&self, tenant: &str) -> Vec<IdentityInfo> {
        let runtime = self.runtime.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<IdentityInfo> = self
            .fixed
            .values()
            .map(|p| (p, "config"))
            .chain(
                runtime
                    .values()
                    .filter(|e| e.principal.tenant == tenant && self.check(e).is_ok())
                    .map(|e| (&e.principal, "runtime")),
            )
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

    fn store(&self) -> Result<(&dyn KeyStore, &dyn StateSigner), Error> {
        self.store
            .as_deref()
            .zip(self.signer.as_deref())
            .ok_or(Error::InvalidState("this server keeps no runtime policy"))
    }

    /// Maps `identity` to `role` in `tenant`, durably (signed: 503 `Sealed` while
    /// sealed). Identities of the configuration file, and runtime identities of other
    /// tenants, cannot be changed here.
    pub fn set(&self, tenant: &str, identity: &str, role: Role) -> Result<(), Error> {
        if role == Role::Sys {
            return Err(Error::PermissionDenied(
                "the sys role is given in the configuration file only",
            ));
        }
        if identity.is_empty()
            || identity.len() > MAX_IDENTITY_LEN
            || identity.chars().any(char::is_control)
        {
            return Err(Error::InvalidRequest(format!(
                "an identity is 1 to {MAX_IDENTITY_LEN} printable characters"
            )));
        }
        let (store, signer) = self.store()?;
        if !self.enforced.load(Ordering::Acquire) {
            // The store's identities are not signed yet (sealed since start).
            return Err(Error::Sealed);
        }
        let mac = signer.sign(MAC_DOMAIN, &mac_message(identity, tenant, role)?)?;
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        let foreign = self.fixed.contains_key(identity)
            || runtime
                .get(identity)
                .is_some_and(|e| e.principal.tenant != tenant && self.check(e).is_ok());
        if foreign {
            return Err(Error::InvalidState(
                "this identity is mapped outside your tenant's runtime policy \
                 (in the configuration file or another tenant)",
            ));
        }
        let stored = StoredIdentity {
            tenant: tenant.to_owned(),
            role,
            mac: Some(mac),
        };
        let record = serde_json::to_vec(&stored)
            .map_err(|_| Error::Internal("record serialization failed"))?;
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, &runtime_key(identity), &record);
        store.commit(&batch)?;
        runtime.insert(identity.to_owned(), RuntimeEntry::new(identity, stored));
        Ok(())
    }

    /// Removes a runtime identity of `tenant`, durably. `by` (the caller) cannot remove
    /// itself, so a tenant cannot lose its last admin by accident.
    pub fn remove(&self, tenant: &str, identity: &str, by: &str) -> Result<(), Error> {
        if identity == by {
            return Err(Error::InvalidState("you cannot remove your own identity"));
        }
        let (store, _) = self.store()?;
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        if runtime
            .get(identity)
            .is_none_or(|e| e.principal.tenant != tenant)
        {
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
        let (store, signer) = self.store()?;
        if self.fixed.contains_key(identity) {
            return Ok(());
        }
        let key = runtime_key(identity);
        let stored = store
            .get(Table::Meta, &key)?
            .and_then(|value| parse_row(&key, &value, signer));
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        match stored {
            Some((_, s)) => {
                runtime.insert(identity.to_owned(), RuntimeEntry::new(identity, s));
            }
            None => {
                runtime.remove(identity);
            }
        }
        Ok(())
    }

    /// Checks the marker saying the store's runtime identities are signed; a store from
    /// before identity MACs gets them, with the marker, in one transaction (the identities
    /// signed are named in a report, for the operators to check). The server calls it at
    /// every unseal; [`Error::Sealed`] while sealed.
    pub fn sign_legacy(&self) -> Result<(), Error> {
        let (store, signer) = self.store()?;
        let marker = signer.sign(MARKER_DOMAIN, MARKER_MESSAGE)?;
        if let Some(stored) = store.get(Table::Meta, META_IDENTITIES_MARKER)? {
            let valid = std::str::from_utf8(&stored)
                .is_ok_and(|m| matches!(signer.verify(MARKER_DOMAIN, MARKER_MESSAGE, m), Ok(true)));
            if !valid {
                signer.report(
                    crate::base::event::AlertKind::IdentityTampered,
                    "the runtime-identity integrity marker does not verify: every unsigned runtime identity is refused".into(),
                );
            }
            self.enforced.store(true, Ordering::Release);
            return Ok(());
        }
        let mut runtime = self.runtime.write().unwrap_or_else(PoisonError::into_inner);
        let mut batch = WriteBatch::new();
        batch
            .require(Table::Meta, META_IDENTITIES_MARKER, None)
            .put(Table::Meta, META_IDENTITIES_MARKER, marker.as_bytes());
        let mut signed = Vec::new();
        for (key, value) in store.scan_prefix(Table::Meta, RUNTIME_PREFIX)? {
            let Some((identity, mut stored)) = parse_row(&key, &value, signer) else {
                continue;
            };
            if stored.mac.is_some() {
                // Signed identities without the marker: it was removed. Sign nothing.
                signer.report(
                    crate::base::event::AlertKind::IdentityTampered,
                    "the runtime-identity integrity marker is missing from a store whose identities are signed: every unsigned runtime identity is refused".into(),
                );
                self.enforced.store(true, Ordering::Release);
                return Ok(());
            }
            stored.mac = Some(signer.sign(
                MAC_DOMAIN,
                &mac_message(&identity, &stored.tenant, stored.role)?,
            )?);
            let record = serde_json::to_vec(&stored)
                .map_err(|_| Error::Internal("record serialization failed"))?;
            batch
                .require(Table::Meta, &key, Some(&value))
                .put(Table::Meta, &key, &record);
            signed.push((identity, stored));
        }
        match store.commit(&batch) {
            Ok(()) => {}
            // Another node signed them first (or an identity changed): the marker says.
            Err(crate::storage::StoreError::Conflict(_)) => {
                drop(runtime);
                let ours = store
                    .get(Table::Meta, META_IDENTITIES_MARKER)?
                    .is_some_and(|m| m == marker.as_bytes());
                if ours {
                    self.enforced.store(true, Ordering::Release);
                    for identity in self.runtime_identities() {
                        self.refresh(&identity)?;
                    }
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        if !signed.is_empty() {
            let names: Vec<&str> = signed.iter().map(|(i, _)| i.as_str()).collect();
            tracing::warn!(
                count = signed.len(),
                "signed the runtime identities of a store from before identity MACs: check them"
            );
            signer.report(
                crate::base::event::AlertKind::IdentitiesSigned,
                format!(
                    "signed {} runtime identities of a store from before identity MACs (check them): {}",
                    names.len(),
                    names.join(", ")
                ),
            );
        }
        for (identity, stored) in signed {
            if !self.fixed.contains_key(&identity) {
                let entry = RuntimeEntry::new(&identity, stored);
                runtime.insert(identity, entry);
            }
        }
        self.enforced.store(true, Ordering::Release);
        Ok(())
    }
}

/// A stored runtime identity; one that does not parse is reported and skipped (refused).
fn parse_row(
    key: &[u8],
    value: &[u8],
    signer: &dyn StateSigner,
) -> Option<(String, StoredIdentity)> {
    let identity = key
        .strip_prefix(RUNTIME_PREFIX)
        .and_then(|id| std::str::from_utf8(id).ok());
    let stored = serde_json::from_slice::<StoredIdentity>(value).ok();
    match identity.zip(stored) {
        Some((identity, stored)) => Some((identity.to_owned(), stored)),
        None => {
            let shown = String::from_utf8_lossy(key.get(..key.len().min(200)).unwrap_or(key));
            tracing::error!(key = %shown, "a runtime identity record does not parse: refused");
            signer.report(
                crate::base::event::AlertKind::IdentityTampered,
                format!("runtime identity record {shown} does not parse: refused"),
            );
            None
        }
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
            (Role::Admin, [true, true, false, true, false, true, false]),
            (Role::App, [false, false, true, false, false, false, false]),
            (
                Role::Auditor,
                [true, false, false, false, false, false, true],
            ),
            (Role::Sys, [false, false, false, false, true, true, false]),
        ];
        for (role, expect) in table {
            for (op, ok) in [
                ReadKeys, ManageKeys, UseKeys, System, Service, Status, ReadAudit,
            ]
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

    use crate::crypto::authstate::testing::TestSigner;

    fn runtime_policy(signer: &Arc<TestSigner>) -> (tempfile::TempDir, Arc<dyn KeyStore>, Policy) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(crate::storage::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let policy = Policy::with_store(&[], store.clone(), signer.clone()).unwrap();
        (dir, store, policy)
    }

    /// Writes a runtime identity row as someone with write access to the table would.
    fn write_row(store: &Arc<dyn KeyStore>, identity: &str, json: &str) {
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, &runtime_key(identity), json.as_bytes());
        store.commit(&batch).unwrap();
    }

    fn row(store: &Arc<dyn KeyStore>, identity: &str) -> String {
        let v = store.get(Table::Meta, &runtime_key(identity)).unwrap();
        String::from_utf8(v.unwrap()).unwrap()
    }

    #[test]
    fn a_runtime_identity_written_or_changed_by_hand_is_refused_and_reported() {
        let signer = Arc::new(TestSigner::new());
        let (_dir, store, policy) = runtime_policy(&signer);
        policy.set("t", "good", Role::App).unwrap();
        assert_eq!(policy.resolve("good").unwrap().role, Role::App);
        // A new admin, and the app made admin (its MAC left as it was).
        write_row(&store, "evil", r#"{"tenant":"t","role":"admin"}"#);
        let promoted = row(&store, "good").replace("\"app\"", "\"admin\"");
        write_row(&store, "good", &promoted);
        for identity in ["evil", "good"] {
            policy.refresh(identity).unwrap();
            for _ in 0..2 {
                assert!(
                    matches!(policy.resolve(identity), Err(Error::PermissionDenied(_))),
                    "{identity}"
                );
            }
        }
        assert_eq!(
            signer.kinds(),
            vec![crate::base::event::AlertKind::IdentityTampered; 2],
            "once each"
        );
        assert!(policy.list("t").is_empty(), "not listed");
        // Nor obeyed by a node starting on this store.
        let fresh = Policy::with_store(&[], store.clone(), signer.clone()).unwrap();
        assert!(fresh.resolve("evil").is_err() && fresh.resolve("good").is_err());
        // Unparseable rows are reported, not a reason to fail the start.
        write_row(&store, "junk", "{");
        assert!(Policy::with_store(&[], store, signer.clone()).is_ok());
        assert!(signer
            .kinds()
            .contains(&crate::base::event::AlertKind::IdentityTampered));
    }

    #[test]
    fn while_sealed_runtime_identities_are_not_obeyed() {
        let signer = Arc::new(TestSigner::new());
        let (_dir, _store, policy) = runtime_policy(&signer);
        policy.set("t", "good", Role::Admin).unwrap();
        signer.set_sealed(true);
        assert!(matches!(policy.resolve("good"), Err(Error::Sealed)));
        assert!(matches!(
            policy.set("t", "new", Role::App),
            Err(Error::Sealed)
        ));
        signer.set_sealed(false);
        assert!(policy.resolve("good").is_ok());
    }

    #[test]
    fn a_store_from_before_identity_macs_is_signed_once_at_unseal() {
        let signer = Arc::new(TestSigner::new());
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(crate::storage::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        write_row(&store, "old", r#"{"tenant":"t","role":"app"}"#);
        signer.set_sealed(true);
        let policy = Policy::with_store(&[], store.clone(), signer.clone()).unwrap();
        assert!(matches!(policy.resolve("old"), Err(Error::Sealed)));
        signer.set_sealed(false);
        assert!(
            matches!(policy.resolve("old"), Err(Error::Sealed)),
            "not signed yet"
        );
        policy.sign_legacy().unwrap();
        assert_eq!(policy.resolve("old").unwrap().role, Role::App);
        assert_eq!(
            signer.kinds(),
            vec![crate::base::event::AlertKind::IdentitiesSigned]
        );
        assert!(row(&store, "old").contains("\"mac\""));
        // From now on, an unsigned row is refused, at this unseal and every later one.
        write_row(&store, "late", r#"{"tenant":"t","role":"admin"}"#);
        policy.refresh("late").unwrap();
        policy.sign_legacy().unwrap();
        assert!(matches!(
            policy.resolve("late"),
            Err(Error::PermissionDenied(_))
        ));
        // The marker deleted: nothing is signed, and that is reported.
        let mut batch = WriteBatch::new();
        batch.delete(Table::Meta, META_IDENTITIES_MARKER);
        store.commit(&batch).unwrap();
        let again = Policy::with_store(&[], store.clone(), signer.clone()).unwrap();
        assert!(matches!(
            again.resolve("late"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(!row(&store, "late").contains("\"mac\""));
        assert!(signer
            .reports
            .lock()
            .unwrap()
            .iter()
            .any(|(_, d)| d.contains("marker is missing")));
    }
}
