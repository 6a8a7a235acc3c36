//! One XKS request, in order: route (unknown prefix or path: 404 before anything else),
//! method (405), body (bounded), SigV4 (401), the store's rate (429), the JSON, the
//! metadata's required fields, the key mapping (404), secondary authorization (403), the
//! operation through the keyring (grants, key state, usage counters), then the audit
//! record — durable before the response leaves, as for the native API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use kms_client::api::{Algorithm, KeyState, SecretBytes};

use crate::transport::request_body::RequestBody;
use serde::de::DeserializeOwned;

use super::api::{
    self, Bytes64, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, ErrorName,
    KeyMetadataResponse, MetadataOnly, Operation, RequestMetadata, XksError,
};
use super::authz::{self, Decision};
use super::credentials::CredentialSet;
use super::health::HealthCache;
use super::settings::{KeyMapping, StoreSettings, XksSettings, API_ROOT};
use super::sigv4::{self, SignedRequest};
use super::throttle::Bucket;
use crate::access::policy::Principal;
use crate::api::{AppState, Completion, Denial};

/// The SigV4 service name of the XKS API.
pub const SERVICE: &str = "kms-xks-proxy";

/// `ciphertextMetadata` of Keyhold: `kh`, format 1, the key version (big-endian u32).
const METADATA_TAG: &[u8; 3] = b"kh\x01";
const METADATA_LEN: usize = 7;

fn ciphertext_metadata(version: u32) -> [u8; METADATA_LEN] {
    let mut m = [0u8; METADATA_LEN];
    m[..3].copy_from_slice(METADATA_TAG);
    m[3..].copy_from_slice(&version.to_be_bytes());
    m
}

fn version_of(metadata: &[u8]) -> Option<u32> {
    let rest = metadata.strip_prefix(METADATA_TAG.as_slice())?;
    Some(u32::from_be_bytes(rest.try_into().ok()?))
}

/// The AES-GCM AAD the specification prescribes: 2-byte big-endian length of the AAD, the
/// AAD, 1-byte length of the `ciphertextMetadata`, the metadata.
pub fn gcm_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    // Both lengths are bounded before this is called (MAX_AAD, MAX_METADATA).
    out.extend_from_slice(&(aad.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata.len().min(u8::MAX as usize) as u8);
    out.extend_from_slice(metadata);
    out
}

/// A logical key store at run time.
struct Store {
    settings: StoreSettings,
    principal: Principal,
    credentials: CredentialSet,
    bucket: Bucket,
    keys: HashMap<String, KeyMapping>,
}

/// The XKS endpoint.
pub struct Xks {
    app: Arc<AppState>,
    max_skew: std::time::Duration,
    stores: HashMap<String, Store>,
    health: HealthCache,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
enum Target<'p> {
    Health,
    Key(&'p str, Operation),
}

/// Splits `path` into (prefix, target); `None`: not an XKS path.
fn route(path: &str) -> Option<(&str, Target<'_>)> {
    if let Some(prefix) = path.strip_suffix("/kms/xks/v1/health") {
        return Some((prefix, Target::Health));
    }
    let (rest, op) = path.rsplit_once('/')?;
    let (rest, id) = rest.rsplit_once('/')?;
    let prefix = rest.strip_suffix("/kms/xks/v1/keys")?;
    let op = match op {
        "metadata" => Operation::Metadata,
        "encrypt" => Operation::Encrypt,
        "decrypt" => Operation::Decrypt,
        _ => return None,
    };
    super::settings::valid_external_id(id).then_some((prefix, Target::Key(id, op)))
}

/// What the audit record and the log say about a request.
#[derive(Default)]
struct Facts {
    store: Option<String>,
    identity: Option<String>,
    tenant: Option<String>,
    operation: Option<Operation>,
    key: Option<String>,
    version: Option<u32>,
    attributes: BTreeMap<String, String>,
}

impl Xks {
    /// The endpoint over the native API's state; fails when a credentials file does not
    /// load.
    pub fn new(
        app: Arc<AppState>,
        settings: &XksSettings,
    ) -> Result<Self, crate::adapters::SetupError> {
        let mut stores = HashMap::new();
        for s in &settings.stores {
            let credentials = CredentialSet::open(&s.credentials).map_err(|e| {
                crate::adapters::SetupError::new(
                    format!("xks.stores[name = {}].credentials", s.name),
                    e,
                )
            })?;
            stores.insert(
                s.prefix.clone(),
                Store {
                    principal: Principal::adapter(&s.identity, &s.tenant),
                    credentials,
                    bucket: Bucket::new(s.rate_limit, s.burst),
                    keys: s
                        .keys
                        .iter()
                        .map(|k| (k.external_id.clone(), k.clone()))
                        .collect(),
                    settings: s.clone(),
                },
            );
        }
        let engine = format!("{:?}", app.settings.store_engine).to_lowercase();
        Ok(Self {
            max_skew: settings.max_skew,
            health: HealthCache::new(
                settings.health_cache,
                settings.fleet_size,
                settings.node_id.clone(),
                &engine,
            ),
            stores,
            app,
        })
    }

    /// The credential sets, for the reloader.
    pub fn credential_sets(&self) -> impl Iterator<Item = (&str, &CredentialSet)> {
        self.stores
            .values()
            .map(|s| (s.settings.name.as_str(), &s.credentials))
    }

    /// Serves one request.
    pub async fn handle(self: Arc<Self>, req: Request<RequestBody>) -> Response {
        let started = Instant::now();
        let id = self.app.next_request_id();
        let mut facts = Facts::default();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let resp = match self.serve(req, &path, &mut facts).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let outcome = resp
            .extensions()
            .get::<ErrorName>()
            .map_or("ok", |n| n.as_str());
        let op_name = facts.operation.map_or("unrouted", Operation::name);
        let denial = match resp.extensions().get::<ErrorName>() {
            Some(ErrorName::AccessDeniedException) => Some(Denial {
                kind: crate::base::event::AlertKind::Denied,
                who: facts.identity.clone(),
                detail: format!("XKS {op_name}: no secondary-authorization rule matched"),
                counts_toward_lockout: false,
            }),
            Some(ErrorName::AuthenticationFailedException) => Some(Denial {
                kind: crate::base::event::AlertKind::XksAuthFailed,
                who: None,
                detail: format!("XKS {op_name} on {path}: SigV4 authentication failed"),
                counts_toward_lockout: false,
            }),
            _ => None,
        };
        // The identity names the key store; the path is kept only when it matched none
        // (every byte of a record is written and synced before the response leaves).
        if facts.operation.is_none() {
            facts
                .attributes
                .insert("path".into(), api::clean_message(&path));
        }
        let done = Completion {
            id,
            started,
            method: method.to_string(),
            route: format!("xks {op_name}"),
            operation: format!("XKS {op_name}"),
            identity: facts.identity.clone(),
            tenant: facts.tenant.clone(),
            key: facts.key.clone(),
            version: facts.version,
            context_hash: None,
            attributes: Some(std::mem::take(&mut facts.attributes)),
            outcome: outcome.to_owned(),
            denial,
            // XKS uses keys (health, metadata, encrypt, decrypt); it changes none.
            key_use: true,
        };
        self.app
            .complete(done, resp, |_| {
                XksError::new(
                    ErrorName::DependencyTimeoutException,
                    "the audit trail is unavailable",
                )
                .into_response()
            })
            .await
    }

    async fn serve(
        &self,
        req: Request<RequestBody>,
        path: &str,
        facts: &mut Facts,
    ) -> Result<Response, XksError> {
        let not_found = || {
            XksError::new(
                ErrorName::InvalidUriPathException,
                format!("no XKS API at this path (expected [/prefix]{API_ROOT}/health or .../keys/<id>/metadata|encrypt|decrypt)"),
            )
        };
        let routed = route(path)
            .and_then(|(prefix, target)| self.stores.get(prefix).map(|store| (store, target)));
        let Some((store, target)) = routed else {
            // Answered before any authentication; the body is read (bounded) only so the
            // record can name the kmsRequestId of a misconfigured key store's calls.
            let (parts, body) = req.into_parts();
            if let Ok(body) = self.read_body(&parts.headers, body).await {
                note_claimed_metadata(facts, &body);
            }
            return Err(not_found());
        };
        facts.store = Some(store.settings.name.clone());
        facts.operation = Some(match target {
            Target::Health => Operation::Health,
            Target::Key(_, op) => op,
        });
        if req.method() != Method::POST {
            let mut r =
                XksError::new(ErrorName::UnsupportedOperationException, "use POST").into_response();
            *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(axum::http::header::ALLOW, HeaderValue::from_static("POST"));
            return Ok(r);
        }
        let (parts, body) = req.into_parts();
        let body = self.read_body(&parts.headers, body).await?;

        self.authenticate(store, &parts, &body, facts)?;
        self.dispatch(store, target, &body, facts).await
    }

    /// SigV4 with the store's current credentials, then the store's rate limit; the
    /// facts name the access key id, the identity and the tenant once it passes.
    fn authenticate(
        &self,
        store: &Store,
        parts: &axum::http::request::Parts,
        body: &[u8],
        facts: &mut Facts,
    ) -> Result<(), XksError> {
        let credentials = store.credentials.current();
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            authority: parts.uri.authority().map(|a| a.as_str()),
            body,
        };
        let expect = sigv4::Expect {
            region: &store.settings.region,
            service: SERVICE,
            now: SystemTime::now(),
            max_skew: self.max_skew,
        };
        match sigv4::verify(&signed, &credentials, &expect) {
            Ok(c) => {
                facts
                    .attributes
                    .insert("accessKeyId".into(), c.access_key_id().to_owned());
            }
            Err(e) => {
                // Unauthenticated, so used for nothing but the record: the claimed
                // kmsRequestId lets the operator find the call in CloudTrail.
                note_claimed_metadata(facts, body);
                tracing::warn!(store = %store.settings.name, reason = %e, "XKS request refused: SigV4");
                return Err(XksError::new(
                    ErrorName::AuthenticationFailedException,
                    "the request signature (AWS SigV4) is not valid for this key store",
                ));
            }
        }
        facts.identity = Some(store.principal.identity.clone());
        facts.tenant = Some(store.principal.tenant.clone());
        if !store.bucket.take() {
            note_claimed_metadata(facts, body);
            return Err(XksError::new(
                ErrorName::ThrottlingException,
                format!(
                    "this key store allows {} requests per second",
                    store.settings.rate_limit
                ),
            ));
        }

        Ok(())
    }

    /// The operation a routed, authenticated request names.
    async fn dispatch(
        &self,
        store: &Store,
        target: Target<'_>,
        body: &[u8],
        facts: &mut Facts,
    ) -> Result<Response, XksError> {
        match target {
            Target::Health => {
                let m: MetadataOnly = parse(body)?;
                note_metadata(facts, &m.request_metadata);
                m.request_metadata.check(Operation::Health)?;
                let status = self.health.status(&self.app.keyring).await;
                let cluster = self
                    .app
                    .cluster
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                Ok(axum::Json(self.health.response(status, cluster.as_ref())).into_response())
            }
            Target::Key(external_id, op) => {
                facts
                    .attributes
                    .insert("externalKeyId".into(), external_id.to_owned());
                match op {
                    Operation::Metadata => {
                        let m: MetadataOnly = parse(body)?;
                        note_metadata(facts, &m.request_metadata);
                        m.request_metadata.check(op)?;
                        let mapping =
                            self.authorize(store, external_id, &m.request_metadata, facts)?;
                        self.metadata(store, mapping)
                    }
                    Operation::Encrypt => {
                        let r: EncryptRequest = parse(body)?;
                        note_metadata(facts, &r.request_metadata);
                        r.request_metadata.check(op)?;
                        let mapping =
                            self.authorize(store, external_id, &r.request_metadata, facts)?;
                        self.encrypt(store, mapping, r, facts)
                    }
                    Operation::Decrypt => {
                        let r: DecryptRequest = parse(body)?;
                        note_metadata(facts, &r.request_metadata);
                        r.request_metadata.check(op)?;
                        let mapping =
                            self.authorize(store, external_id, &r.request_metadata, facts)?;
                        self.decrypt(store, mapping, r, facts)
                    }
                    Operation::Health => Err(XksError::new(
                        ErrorName::InternalException,
                        "unreachable route",
                    )),
                }
            }
        }
    }

    /// The body, at most [`api::MAX_BODY`] bytes (larger: 501, as the specification
    /// answers sizes beyond what is supported), within the body timeout.
    async fn read_body(
        &self,
        headers: &axum::http::HeaderMap,
        body: RequestBody,
    ) -> Result<axum::body::Bytes, XksError> {
        let too_large = || {
            XksError::new(
                ErrorName::UnsupportedOperationException,
                format!("request bodies are limited to {} bytes", api::MAX_BODY),
            )
        };
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > api::MAX_BODY as u64) {
            return Err(too_large());
        }
        // The body's deadline is the listener's (`request_body`).
        Ok(http_body_util::Limited::new(body, api::MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else if crate::transport::request_body::timed_out(&*e) {
                    XksError::validation("the request body did not arrive in time")
                } else {
                    XksError::validation("the request body could not be read")
                }
            })?
            .to_bytes())
    }

    /// The mapping of `external_id` (404 otherwise) and the secondary-authorization
    /// decision (403 when no rule matches).
    fn authorize<'s>(
        &self,
        store: &'s Store,
        external_id: &str,
        meta: &RequestMetadata,
        facts: &mut Facts,
    ) -> Result<&'s KeyMapping, XksError> {
        let mapping = store.keys.get(external_id).ok_or_else(|| {
            XksError::new(
                ErrorName::KeyNotFoundException,
                "no key of this key store has this external key id",
            )
        })?;
        facts.key = Some(mapping.key.clone());
        match authz::decide(&mapping.rules, meta) {
            Decision::NoRules => Ok(mapping),
            Decision::Allowed(rule) => {
                facts.attributes.insert("rule".into(), rule);
                Ok(mapping)
            }
            Decision::Denied => {
                facts
                    .attributes
                    .insert("rule".into(), "(none matched)".into());
                tracing::warn!(
                    key = %mapping.key,
                    principal = meta.aws_principal_arn.as_deref().unwrap_or("-"),
                    operation = %meta.kms_operation,
                    via = meta.kms_via_service.as_deref().unwrap_or("-"),
                    rules = ?mapping.rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                    "XKS request denied: no secondary-authorization rule of the key matches"
                );
                Err(XksError::new(
                    ErrorName::AccessDeniedException,
                    "no authorization rule of this key allows this request",
                ))
            }
        }
    }

    fn metadata(&self, store: &Store, mapping: &KeyMapping) -> Result<Response, XksError> {
        let op = Operation::Metadata;
        let use_ = self
            .app
            .keyring
            .lookups()
            .and_then(|mut l| l.key_use(&store.principal, &mapping.key))
            .map_err(|e| XksError::from_keyring(&e, op))?;
        if use_.algorithm != Algorithm::Aes256Gcm {
            return Err(not_aes());
        }
        if use_.state == KeyState::Destroyed {
            return Err(XksError::from_keyring(
                &crate::base::error::Error::KeyDisabled(KeyState::Destroyed),
                op,
            ));
        }
        let mut usage = Vec::with_capacity(2);
        if use_.can_encrypt {
            usage.push("ENCRYPT");
        }
        if use_.can_decrypt {
            usage.push("DECRYPT");
        }
        Ok(axum::Json(KeyMetadataResponse {
            key_spec: "AES_256",
            key_usage: usage,
            key_status: if use_.state == KeyState::Enabled {
                "ENABLED"
            } else {
                "DISABLED"
            },
        })
        .into_response())
    }

    fn encrypt(
        &self,
        store: &Store,
        mapping: &KeyMapping,
        r: EncryptRequest,
        facts: &mut Facts,
    ) -> Result<Response, XksError> {
        let op = Operation::Encrypt;
        check_algorithm(&r.encryption_algorithm)?;
        let want_cdiv = match r.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some(api::SHA_256) => true,
            Some(_) => {
                return Err(XksError::validation(
                    "ciphertextDataIntegrityValueAlgorithm must be SHA_256",
                ))
            }
        };
        if r.plaintext.len() > api::MAX_PLAINTEXT {
            return Err(XksError::new(
                ErrorName::UnsupportedOperationException,
                format!("plaintext is limited to {} bytes", api::MAX_PLAINTEXT),
            ));
        }
        let aad = r.additional_authenticated_data.unwrap_or_default().0;
        check_aad(&aad)?;
        let mut keys = self
            .app
            .keyring
            .lookups()
            .map_err(|e| XksError::from_keyring(&e, op))?;
        if want_cdiv {
            // KMS reads a matching CDIV as the proxy's assurance that a later Decrypt of
            // this ciphertext succeeds (specification, Encrypt, `ciphertextDataIntegrityValue`):
            // a key this store may not decrypt with cannot give it.
            let use_ = keys
                .key_use(&store.principal, &mapping.key)
                .map_err(|e| XksError::from_keyring(&e, op))?;
            if !use_.can_decrypt {
                return Err(XksError::new(
                    ErrorName::InvalidKeyUsageException,
                    "a ciphertext integrity value promises a later Decrypt, and this key store may not decrypt with this key",
                ));
            }
        }
        let c = keys
            .encrypt_detached(
                &store.principal,
                &mapping.key,
                |version| gcm_aad(&aad, &ciphertext_metadata(version)),
                r.plaintext.expose_secret(),
            )
            .map_err(|e| match e {
                crate::base::error::Error::InvalidRequest(_) => not_aes(),
                e => XksError::from_keyring(&e, op),
            })?;
        facts.version = Some(c.version);
        let metadata = ciphertext_metadata(c.version);
        let cdiv = if want_cdiv {
            // The CDIV over the output first, then the test decryption of those same bytes
            // (specification, Appendix C): a corruption in between fails the decryption, a
            // later one fails KMS's own CDIV check.
            let v = super::cdiv::cdiv(&aad, &metadata, &c.iv, &c.ciphertext, &c.tag);
            keys.verify_detached(
                &store.principal,
                &c,
                &gcm_aad(&aad, &metadata),
                r.plaintext.expose_secret(),
            )
            .map_err(|e| {
                tracing::error!(error = %e, key = %mapping.key, "XKS encrypt: the test decryption failed; nothing returned");
                XksError::new(ErrorName::InternalException, "the encrypt result failed its test decryption")
            })?;
            Some(v)
        } else {
            None
        };
        Ok(axum::Json(EncryptResponse {
            ciphertext: Bytes64(c.ciphertext),
            ciphertext_metadata: Bytes64(metadata.to_vec()),
            initialization_vector: Bytes64(c.iv.to_vec()),
            authentication_tag: Bytes64(c.tag.to_vec()),
            ciphertext_data_integrity_value: cdiv,
        })
        .into_response())
    }

    fn decrypt(
        &self,
        store: &Store,
        mapping: &KeyMapping,
        r: DecryptRequest,
        facts: &mut Facts,
    ) -> Result<Response, XksError> {
        let op = Operation::Decrypt;
        check_algorithm(&r.encryption_algorithm)?;
        if r.ciphertext.0.len() > api::MAX_PLAINTEXT {
            return Err(XksError::new(
                ErrorName::UnsupportedOperationException,
                format!("ciphertext is limited to {} bytes", api::MAX_PLAINTEXT),
            ));
        }
        let aad = r.additional_authenticated_data.unwrap_or_default().0;
        check_aad(&aad)?;
        let metadata = r.ciphertext_metadata.unwrap_or_default().0;
        if metadata.len() > api::MAX_METADATA {
            return Err(XksError::validation(format!(
                "ciphertextMetadata is at most {} bytes",
                api::MAX_METADATA
            )));
        }
        let invalid = || XksError::from_keyring(&crate::base::error::Error::DecryptFailed, op);
        let iv: [u8; 16] = match r.initialization_vector.0.len() {
            16 => r
                .initialization_vector
                .0
                .as_slice()
                .try_into()
                .map_err(|_| invalid())?,
            // A valid length that Keyhold never produces.
            12 => return Err(invalid()),
            _ => {
                return Err(XksError::validation(
                    "initializationVector must be 12 or 16 bytes",
                ))
            }
        };
        let tag: [u8; 16] = r
            .authentication_tag
            .0
            .as_slice()
            .try_into()
            .map_err(|_| XksError::validation("authenticationTag must be 16 bytes"))?;
        let version = version_of(&metadata).ok_or_else(invalid)?;
        let u = self
            .app
            .keyring
            .lookups()
            .and_then(|mut l| {
                l.decrypt_detached(
                    &store.principal,
                    &mapping.key,
                    version,
                    &iv,
                    &r.ciphertext.0,
                    &tag,
                    &gcm_aad(&aad, &metadata),
                )
            })
            .map_err(|e| match e {
                crate::base::error::Error::InvalidRequest(_) => not_aes(),
                e => XksError::from_keyring(&e, op),
            })?;
        facts.version = Some(u.version);
        Ok(crate::crypto::secret::SecretJson {
            value: DecryptResponse {
                plaintext: SecretBytes::new(u.plaintext.expose_secret().to_vec()),
            },
            capacity: 128,
        }
        .into_response())
    }
}

fn not_aes() -> XksError {
    XksError::new(
        ErrorName::KeyNotFoundException,
        "the Keyhold key of this external key id is not AES-256 (XKS serves AES-256 keys only)",
    )
}

fn check_algorithm(algorithm: &str) -> Result<(), XksError> {
    if algorithm != api::AES_GCM {
        return Err(XksError::validation("encryptionAlgorithm must be AES_GCM"));
    }
    Ok(())
}

fn check_aad(aad: &[u8]) -> Result<(), XksError> {
    if aad.len() > api::MAX_AAD {
        return Err(XksError::new(
            ErrorName::UnsupportedOperationException,
            format!(
                "additionalAuthenticatedData is limited to {} bytes",
                api::MAX_AAD
            ),
        ));
    }
    Ok(())
}

fn note_metadata(facts: &mut Facts, meta: &RequestMetadata) {
    facts.attributes.extend(meta.attributes());
}

/// The request metadata of a body refused before it was parsed (401, 429), when it has
/// any: for the audit record only.
fn note_claimed_metadata(facts: &mut Facts, body: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<MetadataOnly>(body) {
        note_metadata(facts, &m.request_metadata);
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, XksError> {
    serde_json::from_slice(body)
        .map_err(|e| XksError::validation(format!("the request body is not valid: {e}")))
}

/// Wraps the endpoint for hyper.
pub fn service(
    xks: Arc<Xks>,
) -> impl hyper::service::Service<
    Request<RequestBody>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req| {
        let xks = xks.clone();
        async move { Ok::<_, std::convert::Infallible>(xks.handle(req).await) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ok = |p: &str| route(p).map(|(pre, t)| format!("{pre}|{t:?}"));
        assert_eq!(ok("/kms/xks/v1/health").as_deref(), Some("|Health"));
        assert_eq!(
            ok("/a/b-c_d/kms/xks/v1/health").as_deref(),
            Some("/a/b-c_d|Health")
        );
        assert_eq!(
            ok("/p/kms/xks/v1/keys/k.1-x_y/encrypt").as_deref(),
            Some("/p|Key(\"k.1-x_y\", Encrypt)")
        );
        assert_eq!(
            ok("/kms/xks/v1/keys/k/metadata").as_deref(),
            Some("|Key(\"k\", Metadata)")
        );
        for bad in [
            "/",
            "/kms/xks/v1",
            "/kms/xks/v1/keys/k/sign",
            "/kms/xks/v1/keys//encrypt",
            "/kms/xks/v1/keys/k%20/encrypt",
            "/kms/xks/v2/keys/k/encrypt",
            "/kms/xks/v1/keys/k/encrypt/",
            "/kms/xks/v1/health/",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    #[test]
    fn metadata_and_aad_layout() {
        let m = ciphertext_metadata(7);
        assert_eq!(m.len(), METADATA_LEN);
        assert!(m.len() <= api::MAX_METADATA);
        assert_eq!(version_of(&m), Some(7));
        assert_eq!(version_of(b"kh\x02\0\0\0\x07"), None);
        assert_eq!(version_of(b"kh\x01\0\0\x07"), None);
        assert_eq!(version_of(b""), None);
        // The specification's example: no AAD and metadata M differs from AAD M, no metadata.
        assert_eq!(gcm_aad(b"", b"M"), b"\0\0\x01M");
        assert_eq!(gcm_aad(b"M", b""), b"\0\x01M\0");
        assert_eq!(gcm_aad(&[9; 300], b"ab")[..2], [1, 44]);
    }
}
