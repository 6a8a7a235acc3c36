//! The native v1 API: the router, the shared state, and the extractors every handler
//! uses. One file per group of routes: [`keys`] (management), [`crypto`] (key use),
//! [`sys`] (seal state), [`approvals`] (dual control).
//!
//! The request path, in order: the TLS layer has already verified the client certificate
//! and attached its identity ([`PeerIdentity`]); [`track`] counts and times the request
//! and gives it an id; the [`Caller`] extractor resolves the identity to a principal;
//! the handler checks the role, validates the body ([`ApiJson`]) and calls the keyring.
//! Grants, lockout and audit slot in at [`Caller`] and [`track`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::access::policy::{Policy, Principal};
use crate::base::error::Error;
use crate::base::metrics::Metrics;
use crate::crypto::seal::Sealer;
use crate::keyring::Keyring;

pub mod approvals;
pub mod audit;
mod completion;
pub mod crypto;
pub mod keys;
pub mod ops;
pub mod sys;

pub(crate) use completion::count_failure;
use completion::track;
pub use completion::{AdapterCall, Completion, Denial, KeyUsed, Used};

/// The verified client certificate of the connection, attached by the accept loop to
/// every request on that connection.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    /// Its identity; `None`: the certificate chained to the CA but carried no identity in
    /// the configured sources.
    pub identity: Option<Arc<str>>,
    /// Its (issuer, serial), checked against the current CRLs on every request.
    pub revocation_key: Option<Arc<[u8]>>,
}

/// Builds the unseal source from settings plus an optional operator-supplied passphrase.
pub type SealerFactory =
    dyn Fn(Option<zeroize::Zeroizing<String>>) -> Box<dyn Sealer> + Send + Sync;

/// State shared by every handler.
pub struct AppState {
    /// Keys.
    pub keyring: Arc<Keyring>,
    /// Identities.
    pub policy: Policy,
    /// What the API and the adapters read of the configuration.
    pub settings: ApiSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Unseal source.
    pub sealer: Box<SealerFactory>,
    /// The audit trail.
    pub audit: crate::security::audit::AuditLog,
    /// Lockouts after repeated denials.
    pub lockouts: crate::access::lockout::Lockouts,
    /// Alerts.
    pub alerts: crate::security::alert::Alerter,
    /// TLS configuration and revoked certificates (reloadable).
    pub tls: Arc<crate::security::tls::TlsReloader>,
    /// Unseal shares received so far (Shamir method), in memory only.
    pub pending_shares: std::sync::Mutex<Vec<crate::crypto::seal::ShareInput>>,
    /// On a shared store: this node and its peers, as last reported (see
    /// `server::change_follower`).
    pub cluster: std::sync::RwLock<Option<kms_client::api::ClusterStatus>>,
    next_request_id: AtomicU64,
}

/// What the native API and the protocol adapters read of the configuration; the app
/// layer (`server`) builds it from [`crate::app::config::Settings`] and keeps the rest.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Deadline for a request's body.
    pub body_timeout: std::time::Duration,
    /// Items per batch request, at most.
    pub max_batch_items: usize,
    /// How the master key is sealed.
    pub seal_method: crate::crypto::seal::SealMethod,
    /// The store's engine.
    pub store_engine: crate::storage::Engine,
}

/// The services behind the API, built by [`crate::app::server::run`].
pub struct Services {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Unseal source.
    pub sealer: Box<SealerFactory>,
    /// The audit trail.
    pub audit: crate::security::audit::AuditLog,
    /// TLS configuration and revoked certificates.
    pub tls: Arc<crate::security::tls::TlsReloader>,
    /// Identities.
    pub policy: Policy,
    /// Alerts.
    pub alerts: crate::security::alert::Alerter,
    /// Lockouts (shared through the store on a shared store).
    pub lockouts: crate::access::lockout::Lockouts,
}

impl AppState {
    /// Shared state.
    pub fn new(keyring: Arc<Keyring>, settings: ApiSettings, services: Services) -> Self {
        let Services {
            metrics,
            sealer,
            audit,
            tls,
            policy,
            alerts,
            lockouts,
        } = services;
        Self {
            tls,
            policy,
            keyring,
            lockouts,
            alerts,
            settings,
            metrics,
            sealer,
            audit,
            pending_shares: std::sync::Mutex::new(Vec::new()),
            cluster: std::sync::RwLock::new(None),
            next_request_id: AtomicU64::new(1),
        }
    }
}

impl AppState {
    /// A fresh request id (shared by every listener, so ids are unique in the audit trail).
    pub fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// The API router, with `more` routes (the app layer's: the Transit-compatible API)
/// served under the same completion middleware and body limit.
pub fn router(state: Arc<AppState>, more: Router<Arc<AppState>>) -> Router {
    let limit = state.settings.max_body_bytes;
    Router::new()
        .merge(more)
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route("/v1/keys/{name}", get(keys::get))
        .route("/v1/keys/{name}/rotate", post(keys::rotate))
        .route("/v1/keys/{name}/disable", post(keys::disable))
        .route("/v1/keys/{name}/enable", post(keys::enable))
        .route(
            "/v1/keys/{name}/schedule-deletion",
            post(keys::schedule_deletion),
        )
        .route(
            "/v1/keys/{name}/cancel-deletion",
            post(keys::cancel_deletion),
        )
        .route(
            "/v1/keys/{name}/min-decrypt-version",
            put(keys::min_decrypt_version),
        )
        .route(
            "/v1/keys/{name}/min-decrypt-version/dry-run",
            post(keys::min_version_dry_run),
        )
        .route(
            "/v1/keys/{name}/grants",
            put(keys::set_grants).patch(keys::edit_grants),
        )
        .route("/v1/keys/{name}/public-key", get(keys::public_key))
        .route("/v1/keys/{name}/datakey", post(crypto::datakey))
        .route("/v1/keys/{name}/wrap", post(crypto::wrap))
        .route("/v1/unwrap", post(crypto::unwrap))
        .route("/v1/rewrap", post(crypto::rewrap))
        .route("/v1/batch", post(crypto::batch))
        .route("/v1/sys/status", get(sys::status))
        .route("/v1/sys/unseal", post(sys::unseal))
        .route("/v1/sys/seal", post(sys::seal))
        .route("/v1/sys/lockouts", get(sys::lockouts))
        .route("/v1/sys/lockouts/lift", post(sys::lift_lockout))
        .route(
            "/v1/sys/identities",
            get(sys::identities).put(sys::set_identity),
        )
        .route("/v1/sys/identities/remove", post(sys::remove_identity))
        .route("/v1/sys/backup", get(sys::backup))
        .route("/v1/sys/brake", get(sys::brake))
        .route("/v1/sys/brake/release", post(sys::release_brake))
        .route("/v1/sys/rotate-master", post(sys::rotate_master))
        .route("/v1/approvals", get(approvals::list))
        .route(
            "/v1/approvals/policy",
            get(approvals::policies).put(approvals::set_policy),
        )
        .route("/v1/approvals/{id}", get(approvals::show))
        .route("/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/v1/approvals/{id}/deny", post(approvals::deny))
        .route("/v1/audit", get(audit::list))
        .fallback(|| async { Error::NoRoute })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// The request id, for logs and (later) the audit record.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub u64);

/// What a handler learned about the request, for its audit record (key, version,
/// context hash). Handlers fill it through the [`AuditNote`] extractor.
#[derive(Debug, Default)]
pub struct AuditInfo {
    /// Key name.
    pub key: Option<String>,
    /// Key version.
    pub version: Option<u32>,
    /// Keyed context hash.
    pub context_hash: Option<String>,
    /// The caller's tenant, once its identity was resolved.
    pub tenant: Option<String>,
    /// What else the record says (a batch: its items' keys, versions and outcomes).
    pub attributes: Option<std::collections::BTreeMap<String, String>>,
}

/// A handle to this request's [`AuditInfo`].
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<std::sync::Mutex<AuditInfo>>);

impl AuditNote {
    /// What was noted, taken out (at completion).
    fn take(&self) -> AuditInfo {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn with(&self, f: impl FnOnce(&mut AuditInfo)) {
        let mut info = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut info);
    }

    /// Records an attribute.
    pub fn attribute(&self, name: &str, value: String) {
        self.with(|i| {
            i.attributes
                .get_or_insert_with(Default::default)
                .insert(name.to_owned(), value);
        });
    }

    /// Records the key name.
    pub fn key(&self, name: &str) {
        self.with(|i| i.key = Some(name.to_owned()));
    }

    /// Records the key name and version used.
    pub fn key_version(&self, name: &str, version: u32) {
        self.with(|i| {
            i.key = Some(name.to_owned());
            i.version = Some(version);
        });
    }

    /// Records the keyed hash of the context.
    pub fn context(&self, keyring: &Keyring, context: &kms_client::api::Context) {
        if context.is_empty() {
            return;
        }
        let hash = keyring.audit_context_hash(context);
        self.with(|i| i.context_hash = hash);
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditNote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<AuditNote>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let identity = parts
            .extensions
            .get::<PeerIdentity>()
            .and_then(|p| p.identity.clone())
            .ok_or(Error::Unauthenticated)?;
        let principal = state.policy.resolve(&identity)?;
        if let Some(note) = parts.extensions.get::<AuditNote>() {
            note.with(|i| i.tenant = Some(principal.tenant.clone()));
        }
        Ok(Caller(principal))
    }
}

/// A JSON body whose rejections become the API's error body (400, 413, 415).
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<Arc<AppState>> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = state.settings.max_body_bytes;
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<media_type::MediaType>().ok())
            .is_some_and(|m| m.is_json());
        if !is_json {
            return Err(Error::UnsupportedMediaType);
        }
        // The body's deadline is the listener's (`request_body`): a stalled body fails
        // the read with `TimedOut`, answered 408.
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(limit),
                _ if crate::transport::request_body::timed_out(&r) => {
                    Error::BodyTimeout(state.settings.body_timeout.as_secs())
                }
                _ => Error::InvalidRequest("the request body could not be read".into()),
            })?;
        // Every request body is a JSON object. serde would also build a struct from an
        // array of its fields in order (`[]` → all defaults): refuse that shape.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Error::InvalidRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        // serde_json directly on the way in; only a body that fails is read again through
        // axum's `Json`, whose rejection names the failing field's path (the path tracking
        // costs on every request, so it is paid only for the error message).
        // The body's UTF-8 is checked once, in bulk, rather than string by string.
        if let Some(v) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| serde_json::from_str::<T>(text).ok())
        {
            return Ok(ApiJson(v));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection, limit)),
        }
    }
}

/// `application/json` or `application/<something>+json`, as axum's `Json` accepts.
mod media_type {
    /// A parsed media type: type, subtype (parameters ignored).
    pub(super) struct MediaType {
        essence: String,
    }

    impl std::str::FromStr for MediaType {
        type Err = ();
        fn from_str(s: &str) -> Result<Self, ()> {
            let essence = s.split(';').next().ok_or(())?.trim().to_ascii_lowercase();
            if essence.split('/').count() != 2 {
                return Err(());
            }
            Ok(Self { essence })
        }
    }

    impl MediaType {
        pub(super) fn is_json(&self) -> bool {
            self.essence == "application/json"
                || (self.essence.starts_with("application/") && self.essence.ends_with("+json"))
        }
    }
}

fn json_rejection(rejection: JsonRejection, limit: usize) -> Error {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(limit),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::UnsupportedMediaType,
        _ => {
            // serde's message names the field and position; cap its length. Our base64
            // and secret types never echo their input.
            let mut text = rejection.body_text();
            if text.len() > 300 {
                let mut cut = 300;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            Error::InvalidRequest(text)
        }
    }
}

/// A `{name}` path segment, validated as a key name.
pub struct KeyName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for KeyName {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(name) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e: PathRejection| Error::InvalidRequest(e.body_text()))?;
        crate::keyring::validate_name(&name)?;
        // The key a route names is in its audit record, whatever the handler does next.
        if let Some(note) = parts.extensions.get::<AuditNote>() {
            note.key(&name);
        }
        Ok(KeyName(name))
    }
}

/// Runs blocking keyring work (store writes, fsync, KDF) off the async workers.
pub async fn blocking<T, F>(f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Internal("blocking task failed"))?
}
