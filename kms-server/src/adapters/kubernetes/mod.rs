//! A Kubernetes KMS v2 plugin (`docs/kubernetes-kms.md`): the API server encrypts
//! Secrets in etcd under a seed it asks the plugin to encrypt, over gRPC on a unix socket
//! (`KeyManagementService` of `k8s.io/kms/apis/v2/api.proto`: [`pb`]).
//!
//! - **One socket per configured key** (`[[kubernetes]]`): file mode 0600 with a
//!   configurable owner, and a peer-credential check on every connection ([`socket`]).
//!   Each call acts as the table's identity: its grants (`wrap` for Encrypt, `unwrap` for
//!   Decrypt) and an audit record, through the one completion path.
//! - **`key_id`** names the Keyhold key and its current version
//!   (`keyhold/<tenant>/<key>/<key id>/v<version>`): a rotation changes it, and the API
//!   server then writes under a new seed (and marks what it reads as stale, for the
//!   `kubectl replace` that re-encrypts it). Status and Encrypt name the same version.
//! - **The ciphertext** carries what Decrypt needs, so annotations stay empty:
//!   `KHK8S1` ‖ version (u32, big-endian) ‖ IV (16) ‖ tag (16) ‖ AES-256-GCM body under
//!   a single-use key derived from the version's KEK (the adapters' detached
//!   construction), with the label and version authenticated. A Decrypt whose `key_id`
//!   does not name the ciphertext's version is refused before any key is touched.
//! - **Limits the API server enforces**, kept on this side too: `key_id` and ciphertext
//!   ≤ 1 KiB (a plaintext of at most 512 bytes; the API server sends a 32-byte seed),
//!   empty annotations. Every call answers within [`CALL_DEADLINE`], well inside the API
//!   server's 3 s; Status says not ok at once while Keyhold is sealed, the key is
//!   disabled or the identity lacks its grants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::api::{GrantOperation, KeyState};
use tonic::Status;
use zeroize::Zeroizing;

use crate::access::policy::Principal;
use crate::api::{blocking, AppState, Completion, Denial};
use crate::base::error::Error;
use crate::base::event::AlertKind;
use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};

pub mod pb;
pub mod settings;
pub mod socket;

pub use settings::KubernetesSettings;

/// The plugin API version Status reports (the `EncryptionConfiguration`'s `apiVersion`).
pub const API_VERSION: &str = "v2";
/// The API server's bound on `key_id` and on the ciphertext (its `KeyIDMaxSize` and
/// `encryptedDEKSourceMaxSize`).
pub const MAX_FIELD: usize = 1024;
/// The largest plaintext Encrypt takes: its ciphertext stays within [`MAX_FIELD`].
pub const MAX_PLAINTEXT: usize = 512;
/// How long a call may take before it is answered `DEADLINE_EXCEEDED` (the API server
/// gives up after 3 s).
pub const CALL_DEADLINE: Duration = Duration::from_secs(2);

const MAGIC: &[u8; 6] = b"KHK8S1";
const HEADER: usize = MAGIC.len() + 4 + DETACHED_SALT_LEN + TAG_LEN;
const AAD_LABEL: &[u8] = b"keyhold kubernetes kms v2\0";
// A plaintext of MAX_PLAINTEXT bytes makes a ciphertext within the API server's 1 KiB.
const _: () = assert!(HEADER + MAX_PLAINTEXT <= MAX_FIELD);

/// One plugin socket's calls: Status, Encrypt and Decrypt of its key, as its identity.
pub struct Plugin {
    state: Arc<AppState>,
    settings: KubernetesSettings,
}

/// What a call did, for its audit record.
#[derive(Default)]
struct Facts {
    tenant: Option<String>,
    version: Option<u32>,
    uid: Option<String>,
}

impl Plugin {
    /// The plugin of one `[[kubernetes]]` table.
    pub fn new(state: Arc<AppState>, settings: KubernetesSettings) -> Self {
        Self { state, settings }
    }

    /// The configured socket.
    pub fn settings(&self) -> &KubernetesSettings {
        &self.settings
    }

    /// Raises a security event (a refused connection).
    pub fn alert(&self, event: crate::security::alert::AlertEvent) {
        self.state.alerts.raise(event);
    }

    fn principal(&self) -> Result<Principal, Error> {
        self.state.policy.resolve(&self.settings.identity)
    }

    /// `Status`: healthy only when unsealed, the key enabled, and both grants there.
    pub async fn status(&self) -> Result<pb::StatusResponse, Status> {
        let mut facts = Facts::default();
        let result = self.status_of(&mut facts).await;
        // A health answer is an answer, not a failure: the record says which it gave.
        let healthy = result.as_ref().is_ok_and(|r| r.healthz == "ok");
        self.finish("Status", facts, healthy, result).await
    }

    async fn status_of(&self, facts: &mut Facts) -> Result<pb::StatusResponse, Error> {
        let unhealthy = |why: String| pb::StatusResponse {
            version: API_VERSION.into(),
            healthz: why,
            key_id: String::new(),
        };
        if self.state.keyring.is_sealed() {
            return Ok(unhealthy("keyhold is sealed".into()));
        }
        let who = self.principal()?;
        facts.tenant = Some(who.tenant.clone());
        let (state, tenant, key) = (
            self.state.clone(),
            who.tenant.clone(),
            self.settings.key.clone(),
        );
        let info = match deadline(blocking(move || state.keyring.key_info(&tenant, &key))).await {
            Ok(info) => info,
            Err(Error::Sealed) => return Ok(unhealthy("keyhold is sealed".into())),
            Err(e) => return Ok(unhealthy(format!("key {}: {e}", self.settings.key))),
        };
        facts.version = Some(info.current_version);
        if info.state != KeyState::Enabled {
            return Ok(unhealthy(format!(
                "key {} is {:?}",
                self.settings.key, info.state
            )));
        }
        let granted = |op: GrantOperation| {
            info.grants
                .iter()
                .any(|g| g.identity == who.identity && g.operations.contains(&op))
        };
        if !granted(GrantOperation::Wrap) || !granted(GrantOperation::Unwrap) {
            return Ok(unhealthy(format!(
                "key {} does not grant wrap and unwrap to {}",
                self.settings.key, who.identity
            )));
        }
        Ok(pb::StatusResponse {
            version: API_VERSION.into(),
            healthz: "ok".into(),
            key_id: key_id(&who.tenant, &info.name, &info.id, info.current_version),
        })
    }

    /// `Encrypt`: the plaintext (the API server's seed) sealed under the key's current
    /// version, with that version's `key_id`.
    pub async fn encrypt(&self, req: pb::EncryptRequest) -> Result<pb::EncryptResponse, Status> {
        let mut facts = Facts {
            uid: Some(clean_uid(&req.uid)),
            ..Facts::default()
        };
        let result = self.encrypt_of(req, &mut facts).await;
        self.finish("Encrypt", facts, true, result).await
    }

    async fn encrypt_of(
        &self,
        mut req: pb::EncryptRequest,
        facts: &mut Facts,
    ) -> Result<pb::EncryptResponse, Error> {
        let plaintext = Zeroizing::new(std::mem::take(&mut req.plaintext));
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(Error::InvalidRequest(format!(
                "plaintext is {} bytes: 1 to {MAX_PLAINTEXT} (the API server sends a 32-byte seed)",
                plaintext.len()
            )));
        }
        let who = self.principal()?;
        facts.tenant = Some(who.tenant.clone());
        let (state, key) = (self.state.clone(), self.settings.key.clone());
        let (c, id) = deadline(blocking(move || {
            let mut keys = state.keyring.lookups()?;
            let c = keys.encrypt_detached(&who, &key, aad, &plaintext)?;
            let id = keys.key_id(&who, &key)?;
            let id = key_id(&who.tenant, &key, &id, c.version);
            Ok((c, id))
        }))
        .await?;
        facts.version = Some(c.version);
        let mut ciphertext = Vec::with_capacity(HEADER + c.ciphertext.len());
        ciphertext.extend_from_slice(MAGIC);
        ciphertext.extend_from_slice(&c.version.to_be_bytes());
        ciphertext.extend_from_slice(&c.iv);
        ciphertext.extend_from_slice(&c.tag);
        ciphertext.extend_from_slice(&c.ciphertext);
        Ok(pb::EncryptResponse {
            ciphertext,
            key_id: id,
            annotations: Default::default(),
        })
    }

    /// `Decrypt`: a ciphertext of [`Plugin::encrypt`], under the version its `key_id`
    /// names (an older one after a rotation, until `min-decrypt-version` retires it).
    pub async fn decrypt(&self, req: pb::DecryptRequest) -> Result<pb::DecryptResponse, Status> {
        let mut facts = Facts {
            uid: Some(clean_uid(&req.uid)),
            ..Facts::default()
        };
        let result = self.decrypt_of(req, &mut facts).await;
        self.finish("Decrypt", facts, true, result).await
    }

    async fn decrypt_of(
        &self,
        req: pb::DecryptRequest,
        facts: &mut Facts,
    ) -> Result<pb::DecryptResponse, Error> {
        if req.key_id.len() > MAX_FIELD || req.ciphertext.len() > MAX_FIELD {
            return Err(Error::InvalidRequest(format!(
                "key_id and ciphertext are at most {MAX_FIELD} bytes each"
            )));
        }
        let parsed = Parsed::of(&req.ciphertext)?;
        facts.version = Some(parsed.version);
        let who = self.principal()?;
        facts.tenant = Some(who.tenant.clone());
        let (state, key) = (self.state.clone(), self.settings.key.clone());
        let body = req.ciphertext[HEADER..].to_vec();
        let asked = req.key_id;
        let opened = deadline(blocking(move || {
            let mut keys = state.keyring.lookups()?;
            let id = keys.key_id(&who, &key)?;
            let expected = key_id(&who.tenant, &key, &id, parsed.version);
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                asked.as_bytes(),
                expected.as_bytes(),
            )) {
                return Err(Error::InvalidRequest(format!(
                    "key_id `{}` does not name this ciphertext's key version ({expected})",
                    crate::adapters::xks::api::clean_message(&asked)
                )));
            }
            let aad = aad(parsed.version);
            keys.decrypt_detached(
                &who,
                &key,
                parsed.version,
                &parsed.iv,
                &body,
                &parsed.tag,
                &aad,
            )
        }))
        .await?;
        Ok(pb::DecryptResponse::new(opened.plaintext.expose_secret()))
    }

    /// Writes the call's audit record through the one completion path, and answers: the
    /// call's result, or `UNAVAILABLE` when the record could not be made durable. A
    /// Status that reports not ok is recorded as `unhealthy`.
    async fn finish<T>(
        &self,
        op: &str,
        facts: Facts,
        healthy: bool,
        result: Result<T, Error>,
    ) -> Result<T, Status> {
        let error = result.as_ref().err();
        let code = error.map(Error::status_and_code);
        let outcome = match code {
            Some((_, c)) => format!("{c:?}"),
            None if healthy => "ok".to_owned(),
            None => "unhealthy".to_owned(),
        };
        let denial = matches!(error, Some(Error::PermissionDenied(_))).then(|| Denial {
            kind: AlertKind::Denied,
            who: Some(self.settings.identity.clone()),
            detail: format!("Kubernetes KMS {op} on {}", self.settings.socket.display()),
            counts_toward_lockout: false,
        });
        let mut attributes = BTreeMap::from([
            ("protocol".to_owned(), "kubernetes-kms-v2".to_owned()),
            (
                "socket".to_owned(),
                self.settings.socket.display().to_string(),
            ),
        ]);
        if let Some(uid) = facts.uid {
            attributes.insert("uid".to_owned(), uid);
        }
        let done = Completion {
            id: self.state.next_request_id(),
            started: Instant::now(),
            method: "POST".to_owned(),
            route: format!("kubernetes {}", op.to_ascii_lowercase()),
            operation: format!("KMSv2 {op}"),
            identity: Some(self.settings.identity.clone()),
            tenant: facts.tenant,
            key: Some(self.settings.key.clone()),
            version: facts.version,
            context_hash: None,
            attributes: Some(attributes),
            outcome,
            denial,
            // Status, Encrypt and Decrypt use the key; none changes it.
            key_use: true,
        };
        let status = code.map_or(axum::http::StatusCode::OK, |(status, _)| status);
        if !self.state.complete_call(done, status).await {
            return Err(Status::unavailable("the audit trail is unavailable"));
        }
        result.map_err(|e| grpc_status(&e))
    }
}

/// Runs `call` within [`CALL_DEADLINE`].
async fn deadline<T>(
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .unwrap_or(Err(Error::Internal(
            "the call took longer than its deadline",
        )))
}

/// The `key_id` of `version` of key `name` (id `id`) of `tenant`.
fn key_id(tenant: &str, name: &str, id: &str, version: u32) -> String {
    format!("keyhold/{tenant}/{name}/{id}/v{version}")
}

/// What the body's AES-GCM authenticates besides itself.
fn aad(version: u32) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// The API server's request uid, as the audit record keeps it.
fn clean_uid(uid: &str) -> String {
    let mut uid = crate::adapters::xks::api::clean_message(uid);
    uid.truncate(64);
    uid
}

/// A ciphertext's header.
#[derive(Clone, Copy)]
struct Parsed {
    version: u32,
    iv: [u8; DETACHED_SALT_LEN],
    tag: [u8; TAG_LEN],
}

impl Parsed {
    fn of(ciphertext: &[u8]) -> Result<Self, Error> {
        let bad = || Error::InvalidRequest("not a Keyhold Kubernetes KMS ciphertext".into());
        if ciphertext.len() < HEADER || !ciphertext.starts_with(MAGIC) {
            return Err(bad());
        }
        let at = MAGIC.len();
        let version = u32::from_be_bytes(ciphertext[at..at + 4].try_into().map_err(|_| bad())?);
        let iv = ciphertext[at + 4..at + 4 + DETACHED_SALT_LEN]
            .try_into()
            .map_err(|_| bad())?;
        let tag = ciphertext[at + 4 + DETACHED_SALT_LEN..HEADER]
            .try_into()
            .map_err(|_| bad())?;
        Ok(Self { version, iv, tag })
    }
}

/// The gRPC status of a refusal; its message says what was wrong, never a secret.
fn grpc_status(e: &Error) -> Status {
    let message = e.to_string();
    match e {
        Error::InvalidRequest(_) | Error::DecryptFailed | Error::PayloadTooLarge(_) => {
            Status::invalid_argument(message)
        }
        Error::PermissionDenied(_) | Error::LockedOut => Status::permission_denied(message),
        Error::Braked(_) => Status::resource_exhausted(message),
        Error::Unauthenticated => Status::unauthenticated(message),
        Error::NotFound => Status::not_found(message),
        Error::KeyDisabled(_) | Error::InvalidState(_) => Status::failed_precondition(message),
        Error::Sealed | Error::AuditUnavailable => Status::unavailable(message),
        Error::Internal(m) if m.contains("deadline") => Status::deadline_exceeded(message),
        _ => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_garbage_is_refused() {
        let mut c = MAGIC.to_vec();
        c.extend_from_slice(&7u32.to_be_bytes());
        c.extend_from_slice(&[1; DETACHED_SALT_LEN]);
        c.extend_from_slice(&[2; TAG_LEN]);
        c.extend_from_slice(&[3; 32]);
        let p = Parsed::of(&c).unwrap();
        assert_eq!((p.version, p.iv, p.tag), (7, [1; 16], [2; 16]));
        for bad in [
            &c[..HEADER - 1],
            b"KHK8S0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            b"",
        ] {
            assert!(matches!(Parsed::of(bad), Err(Error::InvalidRequest(_))));
        }
    }
}
