//! Google Cloud External Key Manager (issue 12; `docs/google-cloud-ekm.md`): Keyhold as
//! the external key manager Cloud KMS calls for `EXTERNAL` and `EXTERNAL_VPC` keys, on the
//! public listener ([`crate::app::public`]) under `/ekm`.
//!
//! The partner API is not published; the wire mapping below follows the public STET
//! messages (`confidential_wrap.proto`) and lives in this one module ([`wire`]), to be
//! corrected against the partner specification:
//!
//! - `POST /ekm/{keyPath}:wrap`: `{plaintext, additionalAuthenticatedData,
//!   additionalContext}` → `{wrappedBlob}`;
//! - `POST /ekm/{keyPath}:unwrap`: `{wrappedBlob, additionalAuthenticatedData,
//!   additionalContext}` → `{plaintext, allowedCacheDuration}`.
//!
//! Every call: a Google OIDC bearer token (issuer, audience = `[ekm] url`, expiry) whose
//! `email` is on the key path's caller list; the Key Access Justification policy of the
//! key path (allowed reasons, a missing reason allowed or not; health checks are
//! authenticated but not held to it); the AAD bound into the wrapped blob; an audit
//! record with the caller, the justification and the resource.
//!
//! Errors never say "permission denied" for what is not a permanent refusal: Cloud EKM
//! disables the key version on `PERMISSION_DENIED`. A caller not on the list is
//! `PERMISSION_DENIED` (403); a justification refused by policy is `FAILED_PRECONDITION`
//! (400), so a refused access does not disable the key for allowed ones; a bad token is
//! `UNAUTHENTICATED` (401); an unknown key path `NOT_FOUND` (404); a blob that does not
//! open `INVALID_ARGUMENT` (400); a sealed server, an unreachable store or token key set,
//! a disabled key `UNAVAILABLE` (503) or `FAILED_PRECONDITION` (disabled key, 400).

pub mod settings;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;

use crate::access::policy::Principal;
use crate::adapters::jwt::{JwtError, Verifier};
use crate::api::AppState;
use crate::base::error::Error;
use crate::crypto::secret::SecretJson;
use kms_client::api::SecretBytes;
use settings::{EkmSettings, KeyPolicy};

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest plaintext (a data key, or a small secret).
pub const MAX_PLAINTEXT: usize = 8192;

/// The wire messages of `google.cloud.ekms.v0` (as GoogleCloudPlatform/stet copies them
/// in `proto/confidential_wrap.proto`) in protojson, read as a protojson reader does
/// (protobuf.dev, "ProtoJSON Format"): lowerCamelCase or the proto's own snake_case names;
/// a field left out or `null` is its default (proto3 leaves empty fields out, so an empty
/// plaintext or blob may come as no field at all); an enum by name or number; unknown
/// fields ignored. Bytes are base64; durations "300s".
pub mod wire {
    use serde::{Deserialize, Deserializer};

    /// A field that may be `null`: its default, as protojson reads it.
    fn or_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// `AccessReasonContext.Reason` by name, or by number (its place in
    /// [`super::settings::REASONS`], the enum's order); an unknown number becomes a name
    /// no policy allows.
    fn reason<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum NameOrNumber {
            Name(String),
            Number(u64),
        }
        Ok(match Option::<NameOrNumber>::deserialize(d)? {
            None => String::new(),
            Some(NameOrNumber::Name(n)) => n,
            Some(NameOrNumber::Number(n)) => usize::try_from(n)
                .ok()
                .and_then(|i| super::settings::REASONS.get(i))
                .map_or_else(|| format!("UNKNOWN_REASON_{n}"), |r| (*r).to_owned()),
        })
    }

    /// `RequestContext`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct RequestContext {
        /// The Cloud KMS key version's full resource name.
        #[serde(alias = "full_resource_name", deserialize_with = "or_default")]
        pub full_resource_name: String,
        /// Its relative name.
        #[serde(alias = "relative_resource_name", deserialize_with = "or_default")]
        pub relative_resource_name: String,
        /// The justification.
        #[serde(alias = "access_reason_context", deserialize_with = "or_default")]
        pub access_reason_context: Option<AccessReasonContext>,
        /// A health check (no customer data).
        #[serde(alias = "is_key_health_check", deserialize_with = "or_default")]
        pub is_key_health_check: bool,
    }

    /// `AccessReasonContext`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct AccessReasonContext {
        /// One of [`super::settings::REASONS`].
        #[serde(deserialize_with = "reason")]
        pub reason: String,
    }

    /// `WrapRequest`.
    // No `Debug`: it carries key material or tokens.
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct WrapRequest {
        /// Base64 (left out when empty).
        #[serde(default, deserialize_with = "or_default")]
        pub plaintext: String,
        /// Base64.
        #[serde(
            default,
            alias = "additional_authenticated_data",
            deserialize_with = "or_default"
        )]
        pub additional_authenticated_data: String,
        /// The context.
        #[serde(default, alias = "additional_context", deserialize_with = "or_default")]
        pub additional_context: RequestContext,
    }

    /// `UnwrapRequest`.
    // No `Debug`: it carries key material or tokens.
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct UnwrapRequest {
        /// Base64 (left out when empty: then it opens to nothing and is refused).
        #[serde(default, alias = "wrapped_blob", deserialize_with = "or_default")]
        pub wrapped_blob: String,
        /// Base64.
        #[serde(
            default,
            alias = "additional_authenticated_data",
            deserialize_with = "or_default"
        )]
        pub additional_authenticated_data: String,
        /// The context.
        #[serde(default, alias = "additional_context", deserialize_with = "or_default")]
        pub additional_context: RequestContext,
    }
}

/// A refusal, Google style: `{"error": {"code", "message", "status"}}`.
#[derive(Debug)]
pub struct EkmError {
    status: StatusCode,
    name: &'static str,
    message: String,
}

impl EkmError {
    fn new(status: StatusCode, name: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            name,
            message: message.into(),
        }
    }
}

impl IntoResponse for EkmError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.status.as_u16(), "message": self.message, "status": self.name}});
        (self.status, Json(body)).into_response()
    }
}

fn invalid(m: &str) -> EkmError {
    EkmError::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", m)
}
fn unavailable(m: &str) -> EkmError {
    EkmError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", m)
}

const MAGIC: &[u8; 4] = b"khe\x01";

/// The AAD of a wrapped blob: the key path, the caller's AAD, the version, and whether it
/// is a health check's. The justification policy is not applied to health checks (Cloud
/// EKM sends them with no justification); binding the flag into the AAD makes that no way
/// around the policy: a health check's blob unwraps only as a health check, and a blob of
/// customer data never does.
fn aad(path: &str, aad: &[u8], version: u32, health: bool) -> Vec<u8> {
    let mut out = if health {
        b"keyhold-ekm-health-check/v1\0".to_vec()
    } else {
        b"keyhold-ekm-wrap/v1\0".to_vec()
    };
    out.extend_from_slice(&(path.len() as u32).to_be_bytes());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(&(aad.len() as u32).to_be_bytes());
    out.extend_from_slice(aad);
    out.extend_from_slice(&version.to_be_bytes());
    out
}

#[derive(Default)]
struct Facts {
    caller: Option<String>,
    reason: Option<String>,
    resource: Option<String>,
    health: bool,
    key: Option<String>,
    version: Option<u32>,
}

/// The EKM endpoint.
pub struct Ekm {
    app: Arc<AppState>,
    verifier: Verifier,
    principal: Principal,
    keys: BTreeMap<String, KeyPolicy>,
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    email: Option<String>,
}

impl Ekm {
    /// The endpoint for `settings`.
    pub fn new(app: Arc<AppState>, settings: &EkmSettings) -> Self {
        Self {
            app,
            verifier: Verifier::new(settings.jwt.clone()),
            principal: Principal::adapter(&settings.identity, &settings.tenant),
            keys: settings
                .keys
                .iter()
                .map(|k| (k.path.clone(), k.clone()))
                .collect(),
        }
    }

    /// A core error as EKM answers it: every variant named (a new one must be placed
    /// here), server faults as 5xx.
    fn keyring_error(e: &Error) -> EkmError {
        let precondition =
            |m: &str| EkmError::new(StatusCode::BAD_REQUEST, "FAILED_PRECONDITION", m);
        match e {
            Error::Sealed
            | Error::Storage(_)
            | Error::AuditUnavailable
            | Error::MasterKeyChanged => unavailable("the key manager is unavailable"),
            Error::DecryptFailed => invalid("the wrapped blob does not open with this AAD and key"),
            Error::KeyDisabled(_) => precondition("the key is disabled in the key manager"),
            // The grant of the EKM identity: a configuration refusal, permanent.
            Error::PermissionDenied(_)
            | Error::LockedOut
            | Error::Braked(_)
            | Error::Unauthenticated => EkmError::new(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "the key manager's policy does not let this key be used here",
            ),
            Error::NotFound | Error::InvalidState(_) => precondition("the key is unusable"),
            Error::InvalidRequest(_)
            | Error::AlreadyExists
            | Error::PayloadTooLarge(_)
            | Error::UnsupportedMediaType
            | Error::BodyTimeout(_)
            | Error::NoRoute
            | Error::MethodNotAllowed => invalid("the request is not valid"),
            // A stored version that does not open is the server's fault, not the caller's.
            Error::Corrupt(_) | Error::Unreadable(_) | Error::Internal(_) | Error::Seal(_) => {
                EkmError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL",
                    "internal error; see the Keyhold log",
                )
            }
        }
    }

    /// Token, caller list, justification policy: the key path's policy when all pass.
    async fn admit(
        self: &Arc<Self>,
        path: &str,
        headers: &HeaderMap,
        context: &wire::RequestContext,
        facts: &mut Facts,
    ) -> Result<KeyPolicy, EkmError> {
        // STET sends only the relative name.
        facts.resource = [&context.full_resource_name, &context.relative_resource_name]
            .into_iter()
            .find(|r| !r.is_empty())
            .cloned();
        facts.health = context.is_key_health_check;
        let reason = context
            .access_reason_context
            .as_ref()
            .map(|r| r.reason.clone())
            .filter(|r| !r.is_empty() && r != "REASON_UNSPECIFIED");
        facts.reason = reason.clone();
        let token = crate::adapters::bearer(headers).ok_or_else(|| {
            EkmError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "a bearer token is required",
            )
        })?;
        // Never blocks the async worker nor holds a blocking thread per request: a key set
        // read runs on the blocking pool, once at a time, with a back-off after a failure.
        let verified = self.verifier.verify_async::<Claims>(&token).await;
        let claims = match verified {
            Ok(c) => c,
            Err(JwtError::KeySet(e)) => {
                tracing::error!(error = %e, "EKM: the token issuer's key set is unavailable");
                return Err(unavailable("the token issuer's keys are unavailable"));
            }
            Err(e) => {
                return Err(EkmError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHENTICATED",
                    e.to_string(),
                ))
            }
        };
        let caller = claims.email.map(|e| e.to_lowercase());
        facts.caller = caller.clone();
        let policy =
            self.keys.get(path).cloned().ok_or_else(|| {
                EkmError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown key path")
            })?;
        facts.key = Some(policy.key.clone());
        if !caller.as_ref().is_some_and(|c| policy.callers.contains(c)) {
            self.app
                .alerts
                .raise(crate::security::alert::AlertEvent::new(
                    crate::base::event::AlertKind::Denied,
                    caller.as_deref(),
                    format!("EKM {path}: caller not allowed"),
                ));
            return Err(EkmError::new(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "this caller may not use this key",
            ));
        }
        if !context.is_key_health_check {
            let allowed = match &reason {
                None => policy.allow_missing_reason,
                Some(r) => policy.allowed_reasons.is_empty() || policy.allowed_reasons.contains(r),
            };
            if !allowed {
                self.app
                    .alerts
                    .raise(crate::security::alert::AlertEvent::new(
                        crate::base::event::AlertKind::Denied,
                        caller.as_deref(),
                        format!(
                            "EKM {path}: justification {} refused by policy",
                            reason.as_deref().unwrap_or("(none)")
                        ),
                    ));
                return Err(EkmError::new(
                    StatusCode::BAD_REQUEST,
                    "FAILED_PRECONDITION",
                    format!(
                        "the key manager's justification policy refuses {}",
                        reason
                            .as_deref()
                            .unwrap_or("a request without a justification")
                    ),
                ));
            }
        }
        Ok(policy)
    }

    async fn wrap(
        self: &Arc<Self>,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
        facts: &mut Facts,
    ) -> Result<Response, EkmError> {
        let req: wire::WrapRequest =
            serde_json::from_slice(body).map_err(|e| invalid(&format!("the request body: {e}")))?;
        let policy = self
            .admit(path, headers, &req.additional_context, facts)
            .await?;
        let plaintext = zeroize::Zeroizing::new(
            B64.decode(req.plaintext.as_bytes())
                .map_err(|_| invalid("plaintext is not base64"))?,
        );
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(invalid("plaintext is too long"));
        }
        let extra = B64
            .decode(req.additional_authenticated_data.as_bytes())
            .map_err(|_| invalid("additionalAuthenticatedData is not base64"))?;
        let (me, path) = (self.clone(), path.to_owned());
        let health = req.additional_context.is_key_health_check;
        let sealed = crate::api::blocking(move || {
            let mut lookups = me.app.keyring.lookups()?;
            lookups.encrypt_detached(
                &me.principal,
                &policy.key,
                |v| aad(&path, &extra, v, health),
                &plaintext,
            )
        })
        .await
        .map_err(|e| Self::keyring_error(&e))?;
        facts.version = Some(sealed.version);
        let mut blob = MAGIC.to_vec();
        blob.extend_from_slice(&sealed.version.to_be_bytes());
        blob.extend_from_slice(&sealed.iv);
        blob.extend_from_slice(&sealed.tag);
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(Json(json!({"wrappedBlob": B64.encode(blob)})).into_response())
    }

    async fn unwrap(
        self: &Arc<Self>,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
        facts: &mut Facts,
    ) -> Result<Response, EkmError> {
        use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};
        let req: wire::UnwrapRequest =
            serde_json::from_slice(body).map_err(|e| invalid(&format!("the request body: {e}")))?;
        let policy = self
            .admit(path, headers, &req.additional_context, facts)
            .await?;
        let blob = B64
            .decode(req.wrapped_blob.as_bytes())
            .map_err(|_| invalid("wrappedBlob is not base64"))?;
        let rest = blob
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| invalid("not a Keyhold wrapped blob"))?;
        let parsed = (|| {
            let (v, rest) = rest.split_at_checked(4)?;
            let (iv, rest) = rest.split_at_checked(DETACHED_SALT_LEN)?;
            let (tag, ct) = rest.split_at_checked(TAG_LEN)?;
            Some((
                u32::from_be_bytes(v.try_into().ok()?),
                <[u8; DETACHED_SALT_LEN]>::try_from(iv).ok()?,
                <[u8; TAG_LEN]>::try_from(tag).ok()?,
                ct.to_vec(),
            ))
        })();
        let (version, iv, tag, ct) = parsed.ok_or_else(|| invalid("not a Keyhold wrapped blob"))?;
        facts.version = Some(version);
        let extra = B64
            .decode(req.additional_authenticated_data.as_bytes())
            .map_err(|_| invalid("additionalAuthenticatedData is not base64"))?;
        let (me, path, key) = (self.clone(), path.to_owned(), policy.key.clone());
        let health = req.additional_context.is_key_health_check;
        let opened = crate::api::blocking(move || {
            let mut lookups = me.app.keyring.lookups()?;
            lookups.decrypt_detached(
                &me.principal,
                &key,
                version,
                &iv,
                &ct,
                &tag,
                &aad(&path, &extra, version, health),
            )
        })
        .await
        .map_err(|e| Self::keyring_error(&e))?;
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Unwrapped {
            plaintext: SecretBytes,
            allowed_cache_duration: String,
        }
        Ok(SecretJson {
            value: Unwrapped {
                plaintext: SecretBytes::new(opened.plaintext.expose_secret().to_vec()),
                allowed_cache_duration: format!("{}s", policy.cache.as_secs()),
            },
            capacity: 128,
        }
        .into_response())
    }

    /// Audits and finishes one request (the record is durable before the answer leaves).
    async fn finish(&self, op: &str, started: Instant, facts: Facts, resp: Response) -> Response {
        let mut attributes = BTreeMap::new();
        attributes.insert("protocol".to_owned(), "ekm".to_owned());
        for (k, v) in [
            ("caller", &facts.caller),
            ("justification", &facts.reason),
            ("resource", &facts.resource),
        ] {
            if let Some(v) = v {
                attributes.insert(k.to_owned(), v.chars().take(256).collect());
            }
        }
        if facts.health {
            attributes.insert("healthCheck".to_owned(), "true".to_owned());
        }
        let call = crate::api::AdapterCall {
            operation: format!("EKM {op}"),
            route: format!("ekm {op}"),
            method: "POST",
            principal: &self.principal,
            key: facts.key,
            version: facts.version,
            attributes,
            started,
        };
        self.app
            .finish_call(call, resp, || {
                unavailable("the audit trail is unavailable").into_response()
            })
            .await
    }
}

/// `POST /ekm/{keyPath}:wrap|:unwrap`.
async fn call(
    State(ekm): State<Arc<Ekm>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let started = Instant::now();
    let mut facts = Facts::default();
    let (path, op) = match rest.rsplit_once(':') {
        Some((p, o)) if o == "wrap" || o == "unwrap" => (p.trim_matches('/').to_owned(), o),
        _ => {
            let resp = EkmError::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "expected {keyPath}:wrap or :unwrap",
            )
            .into_response();
            return ekm.finish("unknown", started, facts, resp).await;
        }
    };
    let result = if op == "wrap" {
        ekm.wrap(&path, &headers, &body, &mut facts).await
    } else {
        ekm.unwrap(&path, &headers, &body, &mut facts).await
    };
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    ekm.finish(op, started, facts, resp).await
}

/// The routes of the public listener for EKM.
pub fn router(ekm: Arc<Ekm>, mount: &str) -> Router {
    // At the root, every path the other protocols do not route is a key path.
    Router::new()
        .route(&crate::adapters::mounted(mount, "/{*rest}"), post(call))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(ekm)
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
            let status = Ekm::keyring_error(e).status;
            assert!(status.is_server_error(), "{e:?}: {status}");
        }
        for e in &client {
            let status = Ekm::keyring_error(e).status;
            assert!(status.is_client_error(), "{e:?}: {status}");
        }
    }
}
