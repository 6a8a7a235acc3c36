//! Google Workspace client-side encryption (issue 11; `docs/google-cse.md`): Keyhold as
//! the customer's key access control list service (KACLS) that Drive, Docs, Meet,
//! Calendar and Gmail clients call from the user's browser, on the public listener
//! ([`crate::app::public`]) under `/cse`.
//!
//! Built: `GET /status`, `POST /wrap`, `/unwrap`, `/digest`, `/privilegedwrap`,
//! `/privilegedunwrap`, `/rewrap` (migration from another key service, with a
//! KACLS-to-KACLS token this service signs), `GET /certs`, CORS for Google's client
//! origin, the structured error body. Every call checks what the protocol makes
//! mandatory: both tokens (Google's authorization token, the IdP's authentication token)
//! verified by [`crate::adapters::jwt`]; their emails equal (the authentication token's
//! `google_email` wins over its `email`); guests (`google-visitor`, `customer-idp`)
//! refused unless allowed; the role fits the operation; the token's `kacls_url` is ours;
//! the perimeter allowed. A wrapped key binds the resource name and perimeter id
//! (AES-256-GCM AAD); unwrap checks the token's resource name against the bound one and
//! the perimeter rules against the bound perimeter. The privileged operations take the
//! IdP's token of a user in `privileged_users`; `privilegedunwrap` also takes a migration
//! peer's KACLS-to-KACLS token for the same resource. `/delegate` issues delegated
//! authentication tokens that `wrap` and `unwrap` accept with a matching delegated
//! authorization token (`delegate.rs`). Not built: Gmail's private-key operations.
//!
//! The wire types and the wrapped-key layout are in `wire.rs`, the routes in `routes.rs`,
//! the signing key in `signer.rs`.

mod delegate;
mod routes;
pub mod settings;
mod signer;
mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::access::policy::Principal;
use crate::adapters::jwt::{JwtError, Verifier};
use crate::api::AppState;
use crate::base::error::Error;
use crate::crypto::secret::SecretJson;
use kms_client::api::SecretBytes;
use settings::CseSettings;
use signer::Signer;
use wire::*;

pub use routes::router;

/// The origin Google's clients run in.
pub const GOOGLE_ORIGIN: &str = "https://client-side-encryption.google.com";
/// Largest DEK a client may have wrapped.
pub const MAX_KEY: usize = 128;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
const MAGIC: &[u8; 4] = b"khc\x01";

/// A refusal in the protocol's error format.
#[derive(Debug)]
pub struct CseError {
    status: StatusCode,
    message: String,
    /// `Retry-After` (seconds), for a 503 that will pass.
    retry_after: Option<u64>,
}

impl CseError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for CseError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.status.as_u16(),
            "message": self.message,
            "details": self.status.canonical_reason().unwrap_or(""),
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn bad(m: &str) -> CseError {
    CseError::new(StatusCode::BAD_REQUEST, m)
}
fn denied(m: &str) -> CseError {
    CseError::new(StatusCode::FORBIDDEN, m)
}

/// `{"key": <the DEK, base64>}`, the answer of `unwrap` and `privilegedunwrap`, written
/// through [`SecretJson`].
fn key_answer(dek: &[u8]) -> Response {
    #[derive(serde::Serialize)]
    struct KeyAnswer {
        key: SecretBytes,
    }
    SecretJson {
        value: KeyAnswer {
            key: SecretBytes::new(dek.to_vec()),
        },
        capacity: 64,
    }
    .into_response()
}

/// The JWK set `/cse/certs` publishes for the signing key at `path` (what a key service
/// that accepts this one's migration tokens configures as its `migration_peers` key set).
pub fn signing_jwks(
    path: &std::path::Path,
) -> Result<serde_json::Value, crate::adapters::SetupError> {
    let signer =
        Signer::load(path).map_err(|e| crate::adapters::SetupError::new("cse.signing_key", e))?;
    Ok(json!({"keys": [signer.jwk]}))
}

/// The resource key hash: base64(HMAC-SHA256(key = DEK, "ResourceKeyDigest:" ‖
/// resource name ‖ ":" ‖ perimeter id)).
pub fn resource_key_hash(dek: &[u8], resource_name: &str, perimeter_id: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, dek);
    let msg = format!("ResourceKeyDigest:{resource_name}:{perimeter_id}");
    B64.encode(ring::hmac::sign(&key, msg.as_bytes()).as_ref())
}

/// What a request leaves for its audit record.
#[derive(Default)]
struct Facts {
    user: Option<String>,
    resource: Option<String>,
    reason: Option<String>,
    version: Option<u32>,
    delegated_to: Option<String>,
}

/// The CSE endpoint.
pub struct Cse {
    app: Arc<AppState>,
    settings: CseSettings,
    authorization: Vec<(Vec<String>, Verifier)>,
    authentication: Vec<(Vec<String>, Verifier)>,
    migration_peers: Vec<(Vec<String>, Verifier)>,
    /// The delegated tokens this KACLS signed (issuer and audience: its URL, its key).
    delegated: Vec<(Vec<String>, Verifier)>,
    signer: Option<Signer>,
    principal: Principal,
}

/// The unverified `iss` of a token: only to choose which issuer's keys verify it.
fn issuer_of(token: &str) -> Option<String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v.get("iss")?.as_str()?.to_owned())
}

/// Verifies a token with its issuer's verifier, off the async workers' blocking paths
/// ([`Verifier::verify_async`]): an issuer whose key set is unreachable costs a 503 with
/// `Retry-After`, not a stalled listener.
async fn verify<C: DeserializeOwned>(
    verifiers: &[(Vec<String>, Verifier)],
    token: &str,
    which: &str,
) -> Result<C, CseError> {
    let iss = issuer_of(token).ok_or_else(|| {
        CseError::new(
            StatusCode::UNAUTHORIZED,
            format!("the {which} token is malformed"),
        )
    })?;
    let (_, v) = verifiers
        .iter()
        .find(|(i, _)| i.contains(&iss))
        .ok_or_else(|| {
            CseError::new(
                StatusCode::UNAUTHORIZED,
                format!("the {which} token's issuer is not accepted"),
            )
        })?;
    v.verify_async::<C>(token).await.map_err(|e| match e {
        JwtError::KeySet(m) => {
            // The fetch's failure is logged once by the verifier; this, once per request.
            tracing::debug!(error = %m, issuer = %iss, "CSE: a token issuer's key set is unavailable");
            CseError {
                retry_after: Some(v.retry_after().as_secs().max(1)),
                ..CseError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "a token issuer's keys are unavailable",
                )
            }
        }
        other => CseError::new(
            StatusCode::UNAUTHORIZED,
            format!("the {which} token: {other}"),
        ),
    })
}

impl Cse {
    /// The endpoint for `settings`; fails when the signing key does not load.
    pub fn new(
        app: Arc<AppState>,
        settings: &CseSettings,
    ) -> Result<Self, crate::adapters::SetupError> {
        let verifiers = |list: &[crate::adapters::jwt::JwtSettings]| {
            list.iter()
                .map(|s| (s.issuers.clone(), Verifier::new(s.clone())))
                .collect()
        };
        let signer = match &settings.signing_key {
            Some(p) => Some(
                Signer::load(p)
                    .map_err(|e| crate::adapters::SetupError::new("cse.signing_key", e))?,
            ),
            None => None,
        };
        let delegated = signer
            .iter()
            .map(|s| {
                let own = crate::adapters::jwt::JwtSettings {
                    issuers: vec![settings.kacls_url.clone()],
                    audiences: vec![settings.kacls_url.clone()],
                    jwks: delegate::own_key_set(&s.jwk),
                    leeway: std::time::Duration::from_secs(60),
                    refresh: std::time::Duration::from_secs(3600),
                };
                (own.issuers.clone(), Verifier::new(own))
            })
            .collect();
        Ok(Self {
            app,
            delegated,
            authorization: verifiers(&settings.authorization),
            authentication: verifiers(&settings.authentication),
            migration_peers: verifiers(&settings.migration_peers),
            signer,
            principal: Principal::adapter(&settings.identity, &settings.tenant),
            settings: settings.clone(),
        })
    }

    /// The authorization token's checks that do not depend on the operation's other
    /// inputs: valid, our `kacls_url` and owner domain, no guest unless allowed, the role
    /// allowed (`roles` empty: any role).
    async fn authorize(
        &self,
        token: &str,
        roles: &[&str],
        facts: &mut Facts,
    ) -> Result<Authz, CseError> {
        let authz: Authz = verify(&self.authorization, token, "authorization").await?;
        facts.user = Some(authz.email.to_lowercase());
        facts.resource = Some(authz.resource_name.clone());
        facts.delegated_to.clone_from(&authz.delegated_to);
        if authz.kacls_url.trim_end_matches('/') != self.settings.kacls_url {
            return Err(denied(
                "the authorization token is for another KACLS (kacls_url)",
            ));
        }
        if let (Some(ours), Some(theirs)) = (&self.settings.owner_domain, &authz.kacls_owner_domain)
        {
            if theirs.to_lowercase() != *ours {
                return Err(denied(
                    "the authorization token is for another domain's KACLS (kacls_owner_domain)",
                ));
            }
        }
        if matches!(
            authz.email_type.as_deref(),
            Some("google-visitor" | "customer-idp")
        ) && !self.settings.allow_guests
        {
            return Err(denied("guest access is not allowed here"));
        }
        if !roles.is_empty() && !roles.contains(&authz.role.as_str()) {
            return Err(denied(&format!("role {} may not do this", authz.role)));
        }
        Ok(authz)
    }

    /// The authentication token of `wrap` and `unwrap`: [`Cse::identify`], and delegated
    /// only together with a matching delegated authorization token.
    async fn authenticate(&self, token: &str, authz: &Authz) -> Result<(), CseError> {
        let authn = self.identify(token, authz).await?;
        delegate::delegation_matches(&authn, authz)
    }

    /// The authentication token: valid (the IdP's, or a delegated one this KACLS signed),
    /// and the same user as the authorization token.
    async fn identify(&self, token: &str, authz: &Authz) -> Result<Authn, CseError> {
        let own = issuer_of(token)
            .is_some_and(|iss| self.delegated.iter().any(|(i, _)| i.contains(&iss)));
        let verifiers = if own {
            &self.delegated
        } else {
            &self.authentication
        };
        let authn: Authn = verify(verifiers, token, "authentication").await?;
        let email = authn
            .google_email
            .as_ref()
            .or(authn.email.as_ref())
            .ok_or_else(|| {
                CseError::new(
                    StatusCode::UNAUTHORIZED,
                    "the authentication token has no email",
                )
            })?;
        if email.to_lowercase() != authz.email.to_lowercase() {
            return Err(denied(
                "the authentication and authorization tokens name different users",
            ));
        }
        Ok(authn)
    }

    fn perimeter(&self, perimeter_id: &str) -> Result<(), CseError> {
        if perimeter_id.is_empty()
            || self.settings.perimeters.is_empty()
            || self.settings.perimeters.iter().any(|p| p == perimeter_id)
        {
            Ok(())
        } else {
            Err(denied("the perimeter does not allow this"))
        }
    }

    /// A core error as CSE answers it: every variant named (a new one must be placed
    /// here), server faults as 5xx.
    fn keyring_error(e: &Error) -> CseError {
        let unavailable = || {
            CseError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key service is unavailable",
            )
        };
        match e {
            Error::PermissionDenied(_)
            | Error::LockedOut
            | Error::Braked(_)
            | Error::Unauthenticated => denied("this key may not be used here"),
            Error::DecryptFailed => denied("the wrapped key does not belong to this resource"),
            Error::NotFound => bad("the key is unknown"),
            Error::KeyDisabled(_) | Error::InvalidState(_) => bad("the key is unusable"),
            Error::InvalidRequest(_)
            | Error::AlreadyExists
            | Error::PayloadTooLarge(_)
            | Error::UnsupportedMediaType
            | Error::BodyTimeout(_)
            | Error::NoRoute
            | Error::MethodNotAllowed => bad("the request is not valid"),
            Error::Sealed
            | Error::Storage(_)
            | Error::AuditUnavailable
            | Error::MasterKeyChanged => unavailable(),
            // A stored version that does not open is the server's fault, not the caller's.
            Error::Corrupt(_) | Error::Unreadable(_) | Error::Internal(_) | Error::Seal(_) => {
                CseError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the Keyhold log",
                )
            }
        }
    }

    async fn wrap(
        self: &Arc<Self>,
        req: WrapRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        let authz = self
            .authorize(&req.authorization, &["writer", "upgrader"], facts)
            .await?;
        self.authenticate(&req.authentication, &authz).await?;
        let perimeter_id = authz.perimeter_id.clone().unwrap_or_default();
        self.perimeter(&perimeter_id)?;
        let dek = zeroize::Zeroizing::new(
            B64.decode(req.key.as_bytes())
                .map_err(|_| bad("key is not base64"))?,
        );
        if dek.is_empty() || dek.len() > MAX_KEY {
            return Err(bad("key must be 1 to 128 bytes"));
        }
        let out = self
            .seal(dek, authz.resource_name.clone(), perimeter_id, facts)
            .await?;
        Ok(Json(json!({"wrapped_key": B64.encode(out)})).into_response())
    }

    /// Wraps `dek` bound to `resource` and `perimeter_id`: the wrapped key's bytes.
    async fn seal(
        self: &Arc<Self>,
        dek: zeroize::Zeroizing<Vec<u8>>,
        resource: String,
        perimeter_id: String,
        facts: &mut Facts,
    ) -> Result<Vec<u8>, CseError> {
        let me = self.clone();
        let perimeter = perimeter_id.clone();
        let sealed = crate::api::blocking(move || {
            let mut lookups = me.app.keyring.lookups()?;
            lookups.encrypt_detached(
                &me.principal,
                &me.settings.key,
                |v| aad(&resource, &perimeter, v),
                &dek,
            )
        })
        .await
        .map_err(|e| Self::keyring_error(&e))?;
        facts.version = Some(sealed.version);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&sealed.version.to_be_bytes());
        out.extend_from_slice(&sealed.iv);
        out.extend_from_slice(&sealed.tag);
        out.extend_from_slice(&(perimeter_id.len() as u16).to_be_bytes());
        out.extend_from_slice(perimeter_id.as_bytes());
        out.extend_from_slice(&sealed.ciphertext);
        Ok(out)
    }

    /// Opens a wrapped key for `authz`'s resource, with the perimeter check on the
    /// perimeter bound into it.
    async fn open(
        self: &Arc<Self>,
        wrapped_key: &str,
        resource_name: &str,
        facts: &mut Facts,
    ) -> Result<(zeroize::Zeroizing<Vec<u8>>, String), CseError> {
        let bytes = B64
            .decode(wrapped_key.as_bytes())
            .map_err(|_| bad("wrapped_key is not base64"))?;
        let w =
            parse_wrapped(&bytes).ok_or_else(|| bad("wrapped_key is not a Keyhold wrapped key"))?;
        facts.version = Some(w.version);
        self.perimeter(&w.perimeter_id)?;
        let me = self.clone();
        let aad = aad(resource_name, &w.perimeter_id, w.version);
        let (version, iv, tag, ct) = (w.version, w.iv, w.tag, w.ciphertext.to_vec());
        let opened = crate::api::blocking(move || {
            let mut lookups = me.app.keyring.lookups()?;
            lookups.decrypt_detached(
                &me.principal,
                &me.settings.key,
                version,
                &iv,
                &ct,
                &tag,
                &aad,
            )
        })
        .await
        .map_err(|e| Self::keyring_error(&e))?;
        Ok((
            zeroize::Zeroizing::new(opened.plaintext.expose_secret().to_vec()),
            w.perimeter_id,
        ))
    }

    async fn unwrap(
        self: &Arc<Self>,
        req: UnwrapRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        let authz = self
            .authorize(&req.authorization, &["reader", "writer", "upgrader"], facts)
            .await?;
        self.authenticate(&req.authentication, &authz).await?;
        let (dek, _) = self
            .open(&req.wrapped_key, &authz.resource_name, facts)
            .await?;
        Ok(key_answer(&dek))
    }

    async fn digest(
        self: &Arc<Self>,
        req: DigestRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        let authz = self
            // `verifier`: Google's migration service checking a migrated key ("Allowed to
            // call digest only": the reference's authorization tokens).
            .authorize(
                &req.authorization,
                &["reader", "writer", "upgrader", "verifier"],
                facts,
            )
            .await?;
        let (dek, perimeter_id) = self
            .open(&req.wrapped_key, &authz.resource_name, facts)
            .await?;
        let hash = resource_key_hash(&dek, &authz.resource_name, &perimeter_id);
        Ok(Json(json!({"resource_key_hash": hash})).into_response())
    }

    /// The authentication token of a privileged operation: a user in `privileged_users`.
    async fn privileged(&self, token: &str, facts: &mut Facts) -> Result<(), CseError> {
        let authn: Authn = verify(&self.authentication, token, "authentication").await?;
        let user = authn
            .google_email
            .or(authn.email)
            .map(|u| u.to_lowercase())
            .ok_or_else(|| {
                CseError::new(
                    StatusCode::UNAUTHORIZED,
                    "the authentication token has no email",
                )
            })?;
        facts.user = Some(user.clone());
        if !self.settings.privileged_users.contains(&user) {
            return Err(denied("this user may not use the privileged operations"));
        }
        Ok(())
    }

    async fn privilegedwrap(
        self: &Arc<Self>,
        req: PrivilegedWrapRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        facts.resource = Some(req.resource_name.clone());
        self.privileged(&req.authentication, facts).await?;
        self.perimeter(&req.perimeter_id)?;
        let dek = zeroize::Zeroizing::new(
            B64.decode(req.key.as_bytes())
                .map_err(|_| bad("key is not base64"))?,
        );
        if dek.is_empty() || dek.len() > MAX_KEY {
            return Err(bad("key must be 1 to 128 bytes"));
        }
        let out = self
            .seal(dek, req.resource_name, req.perimeter_id, facts)
            .await?;
        Ok(Json(json!({"wrapped_key": B64.encode(out)})).into_response())
    }

    /// A privileged user's, or a migration peer's KACLS-to-KACLS token for this resource.
    async fn privilegedunwrap(
        self: &Arc<Self>,
        req: PrivilegedUnwrapRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        facts.resource = Some(req.resource_name.clone());
        let from_peer = issuer_of(&req.authentication)
            .is_some_and(|iss| self.migration_peers.iter().any(|(i, _)| i.contains(&iss)));
        if from_peer {
            let m: Migration =
                verify(&self.migration_peers, &req.authentication, "migration").await?;
            facts.user = m.email.as_deref().map(str::to_lowercase);
            if m.kacls_url.trim_end_matches('/') != self.settings.kacls_url.trim_end_matches('/') {
                return Err(denied(
                    "the migration token is for another key service (kacls_url)",
                ));
            }
            if m.resource_name != req.resource_name {
                return Err(denied("the migration token is for another resource"));
            }
        } else {
            self.privileged(&req.authentication, facts).await?;
        }
        let (dek, _) = self
            .open(&req.wrapped_key, &req.resource_name, facts)
            .await?;
        Ok(key_answer(&dek))
    }

    /// Migrates a key wrapped by another KACLS here: asks it to unwrap (its
    /// `privilegedunwrap`, with a KACLS-to-KACLS token signed by this KACLS for that
    /// service, that user and that resource), wraps the key here bound to the same
    /// resource, and returns it with its resource key hash.
    async fn rewrap(
        self: &Arc<Self>,
        req: RewrapRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        let authz = self
            .authorize(
                &req.authorization,
                // "`migrator`: Allowed to call rewrap only" (the reference's
                // authorization tokens): no other role migrates a key.
                &["migrator"],
                facts,
            )
            .await?;
        let original = req.original_kacls_url.trim_end_matches('/').to_owned();
        if !self.settings.migration_sources.contains(&original) {
            return Err(denied("keys are not migrated from that key service"));
        }
        let perimeter_id = authz.perimeter_id.clone().unwrap_or_default();
        self.perimeter(&perimeter_id)?;
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| denied("this key service has no signing key for migration"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // As Google's reference defines it: issued by this KACLS for the KACLS the data is
        // decrypted on (`kacls_url`), audience `kacls-migration`. `email` is an extra claim
        // ("free to use any other claims") for the original's record.
        let token = signer.sign(&json!({
            "iss": self.settings.kacls_url, "aud": settings::MIGRATION_AUDIENCE,
            "kacls_url": original, "resource_name": authz.resource_name,
            "email": authz.email, "iat": now, "exp": now + 300,
        }))?;
        let body = json!({"authentication": token, "wrapped_key": req.wrapped_key,
                          "resource_name": authz.resource_name, "reason": req.reason})
        .to_string();
        let url = format!("{original}/privilegedunwrap");
        let ca = self.settings.migration_ca.clone();
        let answer = crate::transport::http_client::request(
            "POST",
            &url,
            crate::transport::http_client::Schemes::Https,
            ca.as_deref(),
            Some(body.as_bytes()),
            std::time::Duration::from_secs(10),
        )
        .await;
        let (status, bytes) = answer.map_err(|e| {
            tracing::warn!(error = %e, "CSE rewrap: the original key service is unreachable");
            CseError::new(
                StatusCode::BAD_GATEWAY,
                "the original key service is unreachable",
            )
        })?;
        let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status != 200 {
            let why = reply["message"].as_str().unwrap_or("no reason given");
            return Err(CseError::new(
                StatusCode::BAD_GATEWAY,
                format!("the original key service refused ({status}): {why}"),
            ));
        }
        let dek = zeroize::Zeroizing::new(
            reply["key"]
                .as_str()
                .and_then(|k| B64.decode(k).ok())
                .filter(|k| !k.is_empty() && k.len() <= MAX_KEY)
                .ok_or_else(|| {
                    CseError::new(
                        StatusCode::BAD_GATEWAY,
                        "the original key service gave no key",
                    )
                })?,
        );
        let hash = resource_key_hash(&dek, &authz.resource_name, &perimeter_id);
        let out = self
            .seal(dek, authz.resource_name.clone(), perimeter_id, facts)
            .await?;
        Ok(
            Json(json!({"resource_key_hash": hash, "wrapped_key": B64.encode(out)}))
                .into_response(),
        )
    }

    /// Audits and finishes one request (the record is durable before the answer leaves),
    /// and adds the CORS header for Google's origin.
    async fn finish(
        &self,
        op: &str,
        origin: Option<&HeaderValue>,
        started: Instant,
        facts: Facts,
        resp: Response,
    ) -> Response {
        let mut attributes = BTreeMap::new();
        attributes.insert("protocol".to_owned(), "cse".to_owned());
        for (k, v) in [
            ("user", &facts.user),
            ("resource", &facts.resource),
            ("reason", &facts.reason),
            ("delegated_to", &facts.delegated_to),
        ] {
            if let Some(v) = v {
                attributes.insert(k.to_owned(), v.chars().take(256).collect());
            }
        }
        let get = matches!(op, "status" | "certs");
        let call = crate::api::AdapterCall {
            operation: format!("CSE {op}"),
            route: format!("cse {op}"),
            method: if get { "GET" } else { "POST" },
            principal: &self.principal,
            key: (!get).then(|| self.settings.key.clone()),
            version: facts.version,
            attributes,
            started,
        };
        let mut resp = self
            .app
            .finish_call(call, resp, || {
                CseError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the audit trail is unavailable",
                )
                .into_response()
            })
            .await;
        if origin.is_some_and(|o| o == GOOGLE_ORIGIN) {
            resp.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static(GOOGLE_ORIGIN),
            );
            resp.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("origin"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};

    /// Google's documented vector.
    #[test]
    fn resource_key_hash_vector() {
        assert_eq!(
            resource_key_hash(&[0xf0, 0x0d], "my_resource", "my_perimeter"),
            "EfRLb/AKdtsPSfX+vZ/Pi8h6bmKhBTu4egOABRnEdCg="
        );
    }

    #[test]
    fn wrapped_keys_parse_only_whole() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&[1; DETACHED_SALT_LEN]);
        b.extend_from_slice(&[2; TAG_LEN]);
        b.extend_from_slice(&3u16.to_be_bytes());
        b.extend_from_slice(b"per");
        b.extend_from_slice(&[9; 32]);
        let w = parse_wrapped(&b).unwrap();
        assert_eq!(
            (w.version, w.perimeter_id.as_str(), w.ciphertext.len()),
            (7, "per", 32)
        );
        for cut in 0..b.len() - 32 {
            assert!(parse_wrapped(&b[..cut]).is_none(), "{cut}");
        }
        assert!(parse_wrapped(&b[..b.len() - 32]).is_none(), "no ciphertext");
    }
}

/// Issue 23: every core error has its answer, and the server's faults are 5xx (the map
/// ended in a wildcard answering 400, so a corrupt record or an internal fault reached
/// the caller as the caller's error).
#[cfg(test)]
mod error_map_tests {
    use super::*;

    #[test]
    fn server_faults_are_5xx_and_the_rest_4xx() {
        let (server, client) = crate::base::error::every_variant();
        for e in &server {
            let status = Cse::keyring_error(e).status;
            assert!(status.is_server_error(), "{e:?}: {status}");
        }
        for e in &client {
            let status = Cse::keyring_error(e).status;
            assert!(status.is_client_error(), "{e:?}: {status}");
        }
    }
}
