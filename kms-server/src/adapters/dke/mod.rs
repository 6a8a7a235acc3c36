//! Microsoft Purview Double Key Encryption (issue 11; `docs/microsoft-dke.md`): the
//! customer-held key service that Office clients call directly, on the public HTTPS
//! listener ([`crate::app::public`]: server certificate only; users authenticate with Entra ID
//! bearer tokens, verified by [`crate::adapters::jwt`]).
//!
//! - `GET /dke/{keyName}`: anonymous; the current public key of the mapped Keyhold RSA
//!   key, with `kid` = `{url}/{keyName}/{keyId}`, where `keyId` is `<Keyhold key id>-<version>`.
//! - `POST /dke/{keyName}/{keyId}/decrypt`: RSA-OAEP-SHA-256 (no label) with that version's
//!   private key, on the keyring's constant-time RSA path; rolled keys keep decrypting by
//!   their key id until their version is retired.
//!
//! Every call goes through the keyring as the configured DKE identity (its grants: `wrap`
//! to publish a key, `unwrap` to decrypt), so disabling the key stops DKE at once, and is
//! audited like a native call, with the user's email or UPN, never key bytes.

pub mod settings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::access::policy::Principal;
use crate::adapters::jwt::{JwtError, Verifier};
use crate::api::AppState;
use crate::base::error::Error;
use crate::crypto::secret::SecretJson;
use kms_client::api::SecretBytes;
use settings::{DkeSettings, KeyMapping};

/// The one algorithm of `decrypt`.
pub const ALG: &str = "RSA-OAEP-256";
/// Largest request body.
pub const MAX_BODY: usize = 16 * 1024;

/// The DKE endpoint.
pub struct Dke {
    app: Arc<AppState>,
    settings: DkeSettings,
    verifier: Verifier,
    principal: Principal,
    keys: HashMap<String, KeyMapping>,
    challenge: HeaderValue,
    /// The 401's `resource` and `authorization` headers, as the sample service sends them
    /// beside `WWW-Authenticate`.
    resource: HeaderValue,
    authorization: HeaderValue,
}

/// The claims DKE reads (besides those [`Verifier`] checks).
#[derive(Debug, Default, Deserialize)]
struct Claims {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    upn: Option<String>,
    #[serde(default)]
    unique_name: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

impl Claims {
    /// The user, lower-cased: `email`, else `upn`, else `unique_name`.
    fn user(&self) -> Option<String> {
        self.email
            .as_ref()
            .or(self.upn.as_ref())
            .or(self.unique_name.as_ref())
            .map(|u| u.to_lowercase())
    }
}

/// The decrypt body (the sample service's `EncryptedData`); other fields are ignored, as
/// the sample's model binding ignores them.
#[derive(Debug, Deserialize)]
struct DecryptRequest {
    alg: String,
    value: String,
}

/// What a request leaves for its audit record.
#[derive(Default)]
struct Facts {
    user: Option<String>,
    key: Option<String>,
    version: Option<u32>,
    dke_key: Option<String>,
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// The key id DKE clients see: the Keyhold key id and the version.
fn key_id(id: &str, version: u32) -> String {
    format!("{id}-{version}")
}

fn parse_key_id(s: &str) -> Option<(&str, u32)> {
    let (id, version) = s.rsplit_once('-')?;
    Some((id, version.parse().ok()?))
}

/// `cache.exp`: `yyyy-MM-ddTHH:mm:ss` (UTC) at `secs` from now.
fn cache_exp(after: std::time::Duration) -> String {
    let at = std::time::SystemTime::now() + after;
    let text = humantime::format_rfc3339_seconds(at).to_string();
    text.trim_end_matches('Z').to_owned()
}

impl Dke {
    /// The endpoint for `settings` (its key set is read at the first token).
    pub fn new(
        app: Arc<AppState>,
        settings: &DkeSettings,
    ) -> Result<Self, crate::adapters::SetupError> {
        let challenge = HeaderValue::from_str(&format!(
            "Bearer resource=\"{aud}\", authorization=\"{auth}\", realm=\"{aud}\"",
            aud = settings.jwt.audiences.first().cloned().unwrap_or_default(),
            auth = settings.authorization_url,
        ))
        .map_err(|_| {
            crate::adapters::SetupError::new(
                "dke.authorization_url",
                "the challenge it makes is not a valid header value",
            )
        })?;
        let header = |value: &str, setting: &str| {
            HeaderValue::from_str(value)
                .map_err(|_| crate::adapters::SetupError::new(setting, "not a valid header value"))
        };
        let resource = header(
            &settings.jwt.audiences.first().cloned().unwrap_or_default(),
            "dke.url",
        )?;
        let authorization = header(&settings.authorization_url, "dke.authorization_url")?;
        Ok(Self {
            app,
            resource,
            authorization,
            verifier: Verifier::new(settings.jwt.clone()),
            principal: Principal::adapter(&settings.identity, &settings.tenant),
            keys: settings
                .keys
                .iter()
                .map(|k| (k.name.clone(), k.clone()))
                .collect(),
            challenge,
            settings: settings.clone(),
        })
    }

    fn unauthorized(&self, message: &str) -> Response {
        let mut resp = refuse(StatusCode::UNAUTHORIZED, message);
        let headers = resp.headers_mut();
        headers.insert(header::WWW_AUTHENTICATE, self.challenge.clone());
        headers.insert("resource", self.resource.clone());
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        resp
    }

    /// A core error as DKE answers it: every variant named (a new one must be placed
    /// here), server faults as 5xx.
    fn keyring_error(e: &Error) -> Response {
        match e {
            Error::PermissionDenied(_)
            | Error::LockedOut
            | Error::Braked(_)
            | Error::Unauthenticated => {
                refuse(StatusCode::FORBIDDEN, "this key may not be used here")
            }
            Error::DecryptFailed => refuse(StatusCode::BAD_REQUEST, "the value does not decrypt"),
            Error::NotFound | Error::KeyDisabled(_) | Error::InvalidState(_) => {
                refuse(StatusCode::BAD_REQUEST, "the key is unknown or unusable")
            }
            Error::InvalidRequest(_)
            | Error::AlreadyExists
            | Error::PayloadTooLarge(_)
            | Error::UnsupportedMediaType
            | Error::BodyTimeout(_)
            | Error::NoRoute
            | Error::MethodNotAllowed => {
                refuse(StatusCode::BAD_REQUEST, "the request is not valid")
            }
            Error::Sealed
            | Error::Storage(_)
            | Error::AuditUnavailable
            | Error::MasterKeyChanged => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key service is unavailable",
            ),
            // A stored version that does not open is the server's fault, not the caller's.
            Error::Corrupt(_) | Error::Unreadable(_) | Error::Internal(_) | Error::Seal(_) => {
                refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the Keyhold log",
                )
            }
        }
    }

    async fn public_key(&self, name: &str, facts: &mut Facts) -> Response {
        let Some(mapping) = self.keys.get(name) else {
            return refuse(StatusCode::BAD_REQUEST, "unknown key");
        };
        facts.dke_key = Some(name.to_owned());
        facts.key = Some(mapping.key.clone());
        let found = self
            .app
            .keyring
            .public_key(&self.principal, &mapping.key, None);
        let (info, version, der) = match found {
            Ok(f) => f,
            Err(e) => return Self::keyring_error(&e),
        };
        facts.version = Some(version);
        use rsa::pkcs8::DecodePublicKey as _;
        use rsa::traits::PublicKeyParts as _;
        let Ok(public) = rsa::RsaPublicKey::from_public_key_der(&der) else {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "public key encoding");
        };
        let e = public
            .e()
            .to_bytes_be()
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let mut body = json!({
            "key": {
                "kty": "RSA",
                "n": B64.encode(public.n().to_bytes_be()),
                "e": e,
                "alg": "RS256",
                "kid": format!("{}/{name}/{}", self.settings.url, key_id(&info.id, version)),
            }
        });
        if let Some(after) = self.settings.key_cache {
            body["cache"] = json!({"exp": cache_exp(after)});
        }
        Json(body).into_response()
    }

    async fn decrypt(
        self: &Arc<Self>,
        name: &str,
        kid: &str,
        headers: &HeaderMap,
        body: &[u8],
        facts: &mut Facts,
    ) -> Response {
        let Some(token) = crate::adapters::bearer(headers) else {
            return self.unauthorized("a bearer token is required");
        };
        // Never blocks the async worker: a key set read runs on the blocking pool, once at
        // a time, and not again during the back-off after a failure.
        let claims = match self.verifier.verify_async::<Claims>(&token).await {
            Ok(c) => c,
            Err(JwtError::KeySet(e)) => {
                // The fetch's failure is logged once by the verifier; this, once per request.
                tracing::debug!(error = %e, "DKE: the token issuer's key set is unavailable");
                let mut resp = refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the token issuer's keys are unavailable",
                );
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(self.verifier.retry_after().as_secs().max(1)),
                );
                return resp;
            }
            Err(e) => return self.unauthorized(&e.to_string()),
        };
        facts.user = claims.user();
        let Some(mapping) = self.keys.get(name) else {
            return refuse(StatusCode::BAD_REQUEST, "unknown key");
        };
        facts.dke_key = Some(name.to_owned());
        facts.key = Some(mapping.key.clone());
        let by_user = facts
            .user
            .as_ref()
            .is_some_and(|u| mapping.emails.iter().any(|m| m == u));
        let by_group = claims
            .groups
            .iter()
            .chain(&claims.roles)
            .any(|g| mapping.groups.contains(g));
        if !(by_user || by_group) {
            self.app
                .alerts
                .raise(crate::security::alert::AlertEvent::new(
                    crate::base::event::AlertKind::Denied,
                    facts.user.as_deref(),
                    format!("DKE decrypt with {name}: user not allowed"),
                ));
            return refuse(StatusCode::FORBIDDEN, "this user may not use this key");
        }
        let Ok(req) = serde_json::from_slice::<DecryptRequest>(body) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "expected {\"alg\":\"RSA-OAEP-256\",\"value\":\"<base64>\"}",
            );
        };
        if req.alg != ALG {
            return refuse(StatusCode::BAD_REQUEST, "alg must be RSA-OAEP-256");
        }
        let Ok(ciphertext) = B64.decode(req.value.as_bytes()) else {
            return refuse(StatusCode::BAD_REQUEST, "value is not base64");
        };
        let Some((id, version)) = parse_key_id(kid) else {
            return refuse(StatusCode::BAD_REQUEST, "unknown key id");
        };
        facts.version = Some(version);
        let (me, id, key) = (self.clone(), id.to_owned(), mapping.key.clone());
        let opened = crate::api::blocking(move || {
            let mut lookups = me.app.keyring.lookups()?;
            // The key id names the Keyhold key: a key destroyed and made again under the
            // same name is another key.
            if lookups.key_id(&me.principal, &key)? != id {
                return Err(Error::DecryptFailed);
            }
            lookups.decrypt_unlabelled(&me.principal, &key, version, &ciphertext)
        })
        .await;
        match opened {
            Ok(u) => {
                // `{"value": <the plaintext, base64>}`.
                #[derive(serde::Serialize)]
                struct Decrypted {
                    value: SecretBytes,
                }
                SecretJson {
                    value: Decrypted {
                        value: SecretBytes::new(u.plaintext.expose_secret().to_vec()),
                    },
                    capacity: 64,
                }
                .into_response()
            }
            Err(e) => Self::keyring_error(&e),
        }
    }

    /// Audits and finishes one request (the record is durable before the response leaves).
    async fn finish(&self, op: &str, started: Instant, facts: Facts, resp: Response) -> Response {
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("protocol".to_owned(), "dke".to_owned());
        if let Some(u) = &facts.user {
            attributes.insert("user".to_owned(), u.clone());
        }
        if let Some(k) = &facts.dke_key {
            attributes.insert("dkeKey".to_owned(), k.clone());
        }
        let call = crate::api::AdapterCall {
            operation: format!("DKE {op}"),
            route: format!("dke {op}"),
            method: if op == "decrypt" { "POST" } else { "GET" },
            principal: &self.principal,
            key: facts.key,
            version: facts.version,
            attributes,
            started,
        };
        self.app
            .finish_call(call, resp, || {
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the audit trail is unavailable",
                )
            })
            .await
    }
}

async fn get_key(State(dke): State<Arc<Dke>>, Path(name): Path<String>) -> Response {
    let started = Instant::now();
    let mut facts = Facts::default();
    let resp = dke.public_key(&name, &mut facts).await;
    dke.finish("key", started, facts, resp).await
}

async fn decrypt(
    State(dke): State<Arc<Dke>>,
    Path((name, kid)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let started = Instant::now();
    let mut facts = Facts::default();
    let resp = dke.decrypt(&name, &kid, &headers, &body, &mut facts).await;
    dke.finish("decrypt", started, facts, resp).await
}

/// The routes of the public listener for DKE.
pub fn router(dke: Arc<Dke>, mount: &str) -> Router {
    Router::new()
        .route(&crate::adapters::mounted(mount, "/{name}"), get(get_key))
        .route(
            &crate::adapters::mounted(mount, "/{name}/{kid}/decrypt"),
            post(decrypt),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(dke)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_and_cache_dates() {
        assert_eq!(parse_key_id(&key_id("ab12", 3)), Some(("ab12", 3)));
        assert_eq!(parse_key_id("ab12"), None);
        assert_eq!(parse_key_id("ab12-x"), None);
        let exp = cache_exp(std::time::Duration::from_secs(86_400));
        // yyyy-MM-ddTHH:mm:ss
        assert_eq!(exp.len(), 19, "{exp}");
        assert_eq!(&exp[10..11], "T");
        let claims = Claims {
            upn: Some("Alice@Example.com".into()),
            ..Claims::default()
        };
        assert_eq!(claims.user().as_deref(), Some("alice@example.com"));
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
            let status = Dke::keyring_error(e).status();
            assert!(status.is_server_error(), "{e:?}: {status}");
        }
        for e in &client {
            let status = Dke::keyring_error(e).status();
            assert!(status.is_client_error(), "{e:?}: {status}");
        }
    }
}
