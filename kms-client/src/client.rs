//! The mTLS client: a builder, a connection pool per endpoint (HTTP/1.1 keep-alive, or
//! HTTP/2 when the server offers it through ALPN), retries with exponential backoff and
//! full jitter for calls that are safe to repeat, and failover across endpoints.
//!
//! Retry rules:
//! - A request that never left (connection refused, TLS handshake refused, connect
//!   timeout) is tried on the next endpoint, for every operation.
//! - `503 Sealed` / `503 StorageUnavailable` guarantee nothing changed: next endpoint.
//! - A request that may have reached the server (timeout or broken connection after
//!   sending, `500`) is repeated only if the operation is safe to repeat: reads,
//!   datakey, wrap, unwrap, rewrap, batch, enable/disable, seal/unseal. Never `create` or
//!   `rotate`, whose repetition would change the outcome.
//! - Every other refusal (4xx) is returned at once, with the server's code.
//! - An answer larger than the limit ([`ClientBuilder::max_response_bytes`], 64 MiB by
//!   default; [`ClientBuilder::max_backup_bytes`], 1 GiB, for backups) is
//!   [`Error::ResponseTooLarge`] at once: not read further, not retried.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ZeroizingBuf;
use crate::api::{
    ApprovalInfo, ApprovalList, ApprovalPolicies, ApprovalPolicy, ApprovalScope, DecideRequest,
    SetApprovalPolicyRequest,
};
use crate::api::{
    AuditChain, AuditPage, BatchItem, BatchRequest, BatchResponse, BatchResult, Context,
    CreateKeyRequest, DatakeyRequest, DatakeyResponse, ErrorCode, ErrorResponse, KeyInfo, KeyList,
    Passphrase, PublicKeyResponse, RewrapRequest, SecretBytes, SysStatus, UnsealRequest,
    UnwrapRequest, UnwrapResponse, WrapRequest, WrapResponse, WrappedKey,
};
use crate::api::{
    EditGrantsRequest, Grant, IdentityList, LiftLockoutRequest, LiftLockoutResponse, LockoutList,
    MinDecryptVersionRequest, MinVersionDryRun, MinVersionDryRunRequest, RemoveIdentityRequest,
    Role, ScheduleDeletionRequest, SetGrantsRequest, SetIdentityRequest,
};
use crate::transport::{parse_endpoint, SendError, Transport};
use crate::Error;

/// Retry and backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Rounds over all endpoints before giving up (≥ 1).
    pub max_rounds: u32,
    /// First backoff ceiling; doubles each round.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 4 rounds, 50 ms doubling to at most 2 s, full jitter.
    fn default() -> Self {
        Self {
            max_rounds: 4,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// The default limit on an answer's body: 64 MiB. The largest answers are an audit page
/// (1 000 records, each under about 20 KiB with the server's caps on fields and
/// attributes, so at most about 20 MiB, usually under 1 MiB) and a tenant's key list (not
/// paged: a few KiB per key with its versions and up to 100 grants). Backups have their
/// own limit, [`DEFAULT_MAX_BACKUP`].
pub const DEFAULT_MAX_RESPONSE: usize = 64 << 20;

/// The default limit on a backup's body: 1 GiB. A backup holds every key of the store
/// (hex, about 3 KiB per AES key, more for RSA versions), so some 300 000 keys; the server
/// builds it in memory too.
pub const DEFAULT_MAX_BACKUP: usize = 1 << 30;

/// The smallest limit accepted: every error body and key-use answer fits.
const MIN_MAX_RESPONSE: usize = 4 << 10;

/// Builds a [`Client`].
#[derive(Debug, Default)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    ca_pem: Vec<Vec<u8>>,
    identity: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
    connect_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    retry: RetryPolicy,
    http1_only: bool,
    max_response: Option<usize>,
    max_backup: Option<usize>,
}

/// Whether an operation may be repeated when its first attempt may have reached the
/// server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Safe,
    Unsafe,
}

impl ClientBuilder {
    /// Adds a server endpoint (`https://host:port`); several give failover, in order.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Adds several endpoints, in failover order.
    pub fn endpoints<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Trusts the CA certificates in this PEM (the server's CA).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem.push(pem.into());
        self
    }

    /// Trusts the CA certificates in a PEM file.
    pub fn ca_pem_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let pem = read(path.as_ref())?;
        Ok(self.ca_pem(pem))
    }

    /// The client identity: certificate chain and private key, PEM.
    pub fn identity_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), zeroize::Zeroizing::new(key_pem.into())));
        self
    }

    /// The client identity from PEM files.
    pub fn identity_pem_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let c = read(cert.as_ref())?;
        let k = read(key.as_ref())?;
        Ok(self.identity_pem(c, k))
    }

    /// TCP + TLS connect deadline per endpoint (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }

    /// Deadline for one attempt, from sending to the complete answer (default 30 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }

    /// Offer only HTTP/1.1 in ALPN (default: HTTP/2 when the server offers it, else
    /// HTTP/1.1).
    pub fn http1_only(mut self, yes: bool) -> Self {
        self.http1_only = yes;
        self
    }

    /// Retry and backoff settings.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The most bytes of body read from an answer (default [`DEFAULT_MAX_RESPONSE`],
    /// at least 4 KiB); past it the call fails with [`Error::ResponseTooLarge`]. Backups
    /// have their own limit ([`ClientBuilder::max_backup_bytes`]).
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response = Some(limit);
        self
    }

    /// The most bytes of body read from `GET /v1/sys/backup` (default
    /// [`DEFAULT_MAX_BACKUP`], at least 4 KiB).
    pub fn max_backup_bytes(mut self, limit: usize) -> Self {
        self.max_backup = Some(limit);
        self
    }

    /// Builds the client (no connection is made yet).
    pub fn build(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("at least one endpoint is required".into()));
        }
        let mut endpoints = Vec::new();
        let mut targets = Vec::new();
        for e in &self.endpoints {
            let e = e.trim_end_matches('/');
            let target = parse_endpoint(e).ok_or_else(|| {
                Error::Config(format!(
                    "`{e}`: endpoints are https://host:port (mutual TLS only)"
                ))
            })?;
            endpoints.push(e.to_owned());
            targets.push(target);
        }
        if self.retry.max_rounds == 0 {
            return Err(Error::Config("retry.max_rounds must be at least 1".into()));
        }
        let max_response = self.max_response.unwrap_or(DEFAULT_MAX_RESPONSE);
        let max_backup = self.max_backup.unwrap_or(DEFAULT_MAX_BACKUP);
        if max_response.min(max_backup) < MIN_MAX_RESPONSE {
            return Err(Error::Config(format!(
                "answer size limits must be at least {MIN_MAX_RESPONSE} bytes"
            )));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for pem in &self.ca_pem {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Config(format!("CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("CA certificate: {e}")))?;
            }
        }
        if roots.is_empty() {
            return Err(Error::Config(
                "no CA certificate given to verify the server".into(),
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::Config(format!("client certificate PEM: {e}")))?;
                if chain.is_empty() {
                    return Err(Error::Config(
                        "the client certificate PEM holds no certificate".into(),
                    ));
                }
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| Error::Config(format!("client key PEM: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Config(format!("client identity: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = if self.http1_only {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        let transport = Transport::new(
            Arc::new(tls),
            self.connect_timeout.unwrap_or(Duration::from_secs(5)),
            &targets,
        )
        .map_err(Error::Config)?;
        // What makes two clients interchangeable for a DEK cache: the same servers, the
        // same trust and the same identity (public parts only).
        let mut cache_id = endpoints.join("\n").into_bytes();
        for pem in &self.ca_pem {
            cache_id.extend_from_slice(b"\n--ca--\n");
            cache_id.extend_from_slice(pem);
        }
        if let Some((cert, _)) = &self.identity {
            cache_id.extend_from_slice(b"\n--identity--\n");
            cache_id.extend_from_slice(cert);
        }
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                cache_id: envelope::ProviderId::named(cache_id),
                endpoints,
                preferred: AtomicUsize::new(0),
                request_timeout: self.request_timeout.unwrap_or(Duration::from_secs(30)),
                retry: self.retry,
                max_response,
                max_backup,
            }),
            approval: None,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

struct Inner {
    transport: Transport,
    /// This client's identity for an `envelope::DekCache`.
    cache_id: envelope::ProviderId,
    endpoints: Vec<String>,
    /// The endpoint that answered last; tried first.
    preferred: AtomicUsize,
    request_timeout: Duration,
    retry: RetryPolicy,
    /// Most bytes of body read from an answer; from a backup.
    max_response: usize,
    max_backup: usize,
}

/// A Keyhold client. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// The approved request (dual control) this client's operations run: sent as the
    /// `Keyhold-Approval` header.
    approval: Option<Arc<str>>,
}

impl Client {
    /// This client, sending the id of an approved request (`docs/approvals.md`) with each
    /// of its operations: the operation the request describes runs, once. Shares the
    /// connections of `self`.
    pub fn with_approval(&self, id: &str) -> Client {
        Client {
            inner: self.inner.clone(),
            approval: Some(Arc::from(id)),
        }
    }
}

impl Client {
    /// This client's identity for an `envelope::DekCache`.
    pub(crate) fn provider_id(&self) -> &envelope::ProviderId {
        &self.inner.cache_id
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

/// One attempt's failure, classified for the retry loop.
enum Attempt {
    /// The request never left: always safe to try elsewhere.
    NotSent(Box<dyn std::error::Error + Send + Sync>),
    /// It may have reached the server.
    MaybeSent(Error),
    /// Not to be tried again, anywhere.
    Final(Error),
}

fn check_name(name: &str) -> Result<&str, Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(Error::Config(format!(
            "`{name}` is not a key name (1 to 128 of A-Z a-z 0-9 . _ -)"
        )))
    }
}

impl Client {
    /// A builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    async fn attempt(
        &self,
        idx: usize,
        method: &Method,
        path: &str,
        body: &Bytes,
        limit: usize,
    ) -> Result<(StatusCode, ZeroizingBuf), Attempt> {
        let endpoint = &self.inner.endpoints[idx];
        let approval = self.approval.as_deref();
        let fut = (self.inner.transport).send(idx, method, path, body, limit, approval);
        match tokio::time::timeout(self.inner.request_timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(SendError::NotSent(e))) => Err(Attempt::NotSent(e)),
            Ok(Err(SendError::TooLarge)) => Err(Attempt::Final(Error::ResponseTooLarge {
                endpoint: endpoint.clone(),
                limit,
            })),
            Ok(Err(SendError::MaybeSent(e))) => Err(Attempt::MaybeSent(Error::Transport {
                endpoint: endpoint.clone(),
                source: e,
            })),
            Err(_) => Err(Attempt::MaybeSent(Error::Timeout {
                endpoint: endpoint.clone(),
            })),
        }
    }

    /// Sends one API call with failover and retries; decodes the JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        repeat: Repeat,
    ) -> Result<T, Error> {
        self.call_limited(method, path, body, repeat, self.inner.max_response)
            .await
    }

    /// [`Client::call`], reading at most `limit` bytes of answer.
    async fn call_limited<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        repeat: Repeat,
        limit: usize,
    ) -> Result<T, Error> {
        let n = self.inner.endpoints.len();
        let policy = self.inner.retry;
        let mut last: Option<Error> = None;
        let mut unreachable: Option<Box<dyn std::error::Error + Send + Sync>> = None;
        for round in 0..policy.max_rounds {
            if round > 0 {
                let ceiling = policy
                    .base_delay
                    .saturating_mul(1 << (round - 1).min(16))
                    .min(policy.max_delay);
                let jitter = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let first = self.inner.preferred.load(Ordering::Relaxed);
            for i in 0..n {
                let idx = (first + i) % n;
                match self.attempt(idx, &method, path, &body, limit).await {
                    Ok((status, bytes)) => match decode::<T>(status, bytes.as_slice()) {
                        Ok(v) => {
                            self.inner.preferred.store(idx, Ordering::Relaxed);
                            return Ok(v);
                        }
                        Err(e) => {
                            let retry_elsewhere = match e.code() {
                                Some(ErrorCode::Sealed | ErrorCode::StorageUnavailable) => true,
                                Some(ErrorCode::Internal) => repeat == Repeat::Safe,
                                _ => false,
                            };
                            if !retry_elsewhere {
                                return Err(e);
                            }
                            last = Some(e);
                        }
                    },
                    Err(Attempt::NotSent(e)) => unreachable = Some(e),
                    Err(Attempt::Final(e)) => return Err(e),
                    Err(Attempt::MaybeSent(e)) => {
                        if repeat == Repeat::Unsafe {
                            return Err(e);
                        }
                        last = Some(e);
                    }
                }
            }
        }
        match (last, unreachable) {
            (Some(e), _) => Err(e),
            (None, Some(source)) => Err(Error::Unreachable {
                tried: self.inner.endpoints.join(", "),
                source,
            }),
            (None, None) => Err(Error::Config("no attempt was made".into())),
        }
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        repeat: Repeat,
    ) -> Result<T, Error> {
        self.call(Method::POST, path, json_body(body)?, repeat)
            .await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::GET, path, Bytes::new(), Repeat::Safe)
            .await
    }

    // ---- keys ----

    /// `POST /v1/keys` (not repeated automatically once sent).
    pub async fn create_key(&self, req: &CreateKeyRequest) -> Result<KeyInfo, Error> {
        check_name(&req.name)?;
        self.post("/v1/keys", req, Repeat::Unsafe).await
    }

    /// `GET /v1/keys`.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, Error> {
        let list: KeyList = self.get("/v1/keys").await?;
        Ok(list.keys)
    }

    /// `GET /v1/keys/{name}`.
    pub async fn get_key(&self, name: &str) -> Result<KeyInfo, Error> {
        self.get(&format!("/v1/keys/{}", check_name(name)?)).await
    }

    /// `GET /v1/keys/{name}/public-key`: an RSA KEK version's public key (the current
    /// version when `version` is `None`), for [`crate::rsa_oaep::OfflineWrapper`].
    pub async fn public_key(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<PublicKeyResponse, Error> {
        let name = check_name(name)?;
        match version {
            Some(v) => {
                self.get(&format!("/v1/keys/{name}/public-key?version={v}"))
                    .await
            }
            None => self.get(&format!("/v1/keys/{name}/public-key")).await,
        }
    }

    /// `POST /v1/keys/{name}/rotate` (not repeated automatically once sent).
    pub async fn rotate_key(&self, name: &str) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/rotate", check_name(name)?);
        self.post(&path, &serde_json::json!({}), Repeat::Unsafe)
            .await
    }

    /// `POST /v1/keys/{name}/disable` (idempotent).
    pub async fn disable_key(&self, name: &str) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/disable", check_name(name)?);
        self.post(&path, &serde_json::json!({}), Repeat::Safe).await
    }

    /// `POST /v1/keys/{name}/enable` (idempotent).
    pub async fn enable_key(&self, name: &str) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/enable", check_name(name)?);
        self.post(&path, &serde_json::json!({}), Repeat::Safe).await
    }

    /// `POST /v1/keys/{name}/schedule-deletion`: destroyed after `pending_days` (7–30);
    /// unusable from now on.
    pub async fn schedule_deletion(&self, name: &str, pending_days: u32) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/schedule-deletion", check_name(name)?);
        let req = ScheduleDeletionRequest { pending_days };
        self.post(&path, &req, Repeat::Unsafe).await
    }

    /// `POST /v1/keys/{name}/cancel-deletion`: the key comes back disabled.
    pub async fn cancel_deletion(&self, name: &str) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/cancel-deletion", check_name(name)?);
        self.post(&path, &serde_json::json!({}), Repeat::Unsafe)
            .await
    }

    /// `PUT /v1/keys/{name}/min-decrypt-version` (idempotent).
    pub async fn set_min_decrypt_version(
        &self,
        name: &str,
        version: u32,
    ) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/min-decrypt-version", check_name(name)?);
        let body = json_body(&MinDecryptVersionRequest { version })?;
        self.call(Method::PUT, &path, body, Repeat::Safe).await
    }

    /// `POST /v1/keys/{name}/min-decrypt-version/dry-run`: how many unwraps in the last
    /// `window_days` days a proposed `min_decrypt_version` would have refused.
    pub async fn min_version_dry_run(
        &self,
        name: &str,
        version: u32,
        window_days: Option<u32>,
    ) -> Result<MinVersionDryRun, Error> {
        let path = format!("/v1/keys/{}/min-decrypt-version/dry-run", check_name(name)?);
        let req = MinVersionDryRunRequest {
            version,
            window_days,
        };
        self.post(&path, &req, Repeat::Safe).await
    }

    /// `PUT /v1/keys/{name}/grants`: replaces the key's grants (idempotent).
    pub async fn set_grants(&self, name: &str, grants: Vec<Grant>) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/grants", check_name(name)?);
        let body = json_body(&SetGrantsRequest { grants })?;
        self.call(Method::PUT, &path, body, Repeat::Safe).await
    }

    /// `PATCH /v1/keys/{name}/grants`: removes every grant of the identities in `remove`,
    /// then adds `add`, in one atomic change on the server (retried safely: an addition
    /// already there is not added twice).
    pub async fn edit_grants(
        &self,
        name: &str,
        add: Vec<Grant>,
        remove: Vec<String>,
    ) -> Result<KeyInfo, Error> {
        let path = format!("/v1/keys/{}/grants", check_name(name)?);
        let body = json_body(&EditGrantsRequest { add, remove })?;
        self.call(Method::PATCH, &path, body, Repeat::Safe).await
    }

    // ---- key use ----

    /// A fresh 32-byte DEK under `key`, in clear (zeroizing) and wrapped.
    pub async fn datakey(&self, key: &str, context: &Context) -> Result<DatakeyResponse, Error> {
        let path = format!("/v1/keys/{}/datakey", check_name(key)?);
        let req = DatakeyRequest {
            context: context.clone(),
        };
        self.post(&path, &req, Repeat::Safe).await
    }

    /// Wraps a caller-supplied DEK (16–64 bytes).
    pub async fn wrap(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &Context,
    ) -> Result<WrapResponse, Error> {
        let path = format!("/v1/keys/{}/wrap", check_name(key)?);
        let req = WrapRequest {
            plaintext: SecretBytes::new(plaintext.to_vec()),
            context: context.clone(),
        };
        self.post(&path, &req, Repeat::Safe).await
    }

    /// Unwraps a wrapped DEK with its context.
    pub async fn unwrap(&self, wrapped: &[u8], context: &Context) -> Result<UnwrapResponse, Error> {
        let req = UnwrapRequest {
            wrapped: WrappedKey::from(wrapped.to_vec()),
            context: context.clone(),
        };
        self.post("/v1/unwrap", &req, Repeat::Safe).await
    }

    /// Re-wraps under the key's current version, same context.
    pub async fn rewrap(&self, wrapped: &[u8], context: &Context) -> Result<WrapResponse, Error> {
        let req = RewrapRequest {
            wrapped: WrappedKey::from(wrapped.to_vec()),
            context: context.clone(),
        };
        self.post("/v1/rewrap", &req, Repeat::Safe).await
    }

    /// Runs `items` in one request; one result per item, in order.
    pub async fn batch(&self, items: Vec<BatchItem>) -> Result<Vec<BatchResult>, Error> {
        let resp: BatchResponse = self
            .post("/v1/batch", &BatchRequest { items }, Repeat::Safe)
            .await?;
        Ok(resp.results)
    }

    // ---- audit ----

    /// One page of the audit trail: records with `seq > after` (at most `limit`, ≤ 1000)
    /// and the chain head.
    pub async fn audit_page(&self, after: u64, limit: usize) -> Result<AuditPage, Error> {
        self.get(&format!("/v1/audit?after={after}&limit={limit}"))
            .await
    }

    /// Reads the whole audit trail and verifies it: sequence, links, hashes, the head, the
    /// head's MAC, and the server's own findings about heads it could not vouch for.
    /// Returns `Ok(Ok(records))`, or `Ok(Err(violation))`. `strict`: warnings (an
    /// unverifiable head) are violations too.
    pub async fn audit_verify(&self, strict: bool) -> Result<Result<u64, String>, Error> {
        let mut chain = AuditChain::new();
        let mut warnings = Vec::new();
        let mut after = 0;
        let mut page_size = 1000;
        loop {
            let page = match self.audit_page(after, page_size).await {
                Ok(page) => page,
                // Long records (adapters' attributes) can take a page past the answer
                // limit: fewer records per page then, down to one.
                Err(Error::ResponseTooLarge { .. }) if page_size > 1 => {
                    page_size /= 10;
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Every page's head is checked: the first one predates any record this
            // verification itself causes.
            if page.head.mac_valid == Some(false) {
                return Ok(Err(
                    "the chain head's MAC does not verify: the head was altered".into(),
                ));
            }
            if strict && page.head.mac_valid.is_none() && page.head.seq > 0 {
                warnings.push("the server cannot verify the chain head's MAC now (sealed, or written while sealed)".into());
            }
            if after == 0 {
                if let Some(cp) = &page.checkpoint {
                    // Older records were purged by retention (archived first): the kept
                    // chain verifies from the MAC'd checkpoint.
                    if cp.mac_valid == Some(false) {
                        return Ok(Err(
                            "the retention checkpoint's MAC does not verify: it was altered".into(),
                        ));
                    }
                    if strict && cp.mac_valid.is_none() {
                        warnings.push(
                            "the server cannot verify the retention checkpoint's MAC now (sealed)"
                                .into(),
                        );
                    }
                    chain = AuditChain::from_checkpoint(cp);
                    after = cp.seq;
                }
            }
            let done = page.records.is_empty()
                || page.records.last().map(|r| r.seq) >= Some(page.head.seq);
            for r in &page.records {
                if let Err(e) = chain.push_with(r, &mut warnings) {
                    return Ok(Err(e));
                }
                after = r.seq;
            }
            if done {
                if let Err(e) = chain.finish(&page.head) {
                    return Ok(Err(e));
                }
                if strict && !warnings.is_empty() {
                    return Ok(Err(warnings.join("; ")));
                }
                return Ok(Ok(page.head.seq));
            }
        }
    }

    // ---- sys ----

    /// `GET /v1/sys/status`.
    pub async fn sys_status(&self) -> Result<SysStatus, Error> {
        self.get("/v1/sys/status").await
    }

    /// `POST /v1/sys/unseal`, with a passphrase or (None) to retry the configured source.
    pub async fn unseal(&self, passphrase: Option<&str>) -> Result<SysStatus, Error> {
        let req = UnsealRequest {
            passphrase: passphrase.map(|p| Passphrase::new(p.to_owned())),
            share: None,
        };
        self.post("/v1/sys/unseal", &req, Repeat::Safe).await
    }

    /// `POST /v1/sys/unseal` with one Shamir share (`khs1-...`); the status says how many
    /// of the needed shares the server holds. Not repeated automatically (a repeat is a
    /// duplicate share).
    pub async fn unseal_share(&self, share: &str) -> Result<SysStatus, Error> {
        let req = UnsealRequest {
            passphrase: None,
            share: Some(Passphrase::new(share.to_owned())),
        };
        self.post("/v1/sys/unseal", &req, Repeat::Unsafe).await
    }

    /// `GET /v1/sys/identities`: the caller's tenant's identities and roles.
    pub async fn identities(&self) -> Result<IdentityList, Error> {
        self.get("/v1/sys/identities").await
    }

    /// `PUT /v1/sys/identities`: maps `identity` to `role` in the caller's tenant
    /// (idempotent).
    pub async fn set_identity(&self, identity: &str, role: Role) -> Result<IdentityList, Error> {
        let body = json_body(&SetIdentityRequest {
            identity: identity.to_owned(),
            role,
        })?;
        self.call(Method::PUT, "/v1/sys/identities", body, Repeat::Safe)
            .await
    }

    /// `POST /v1/sys/identities/remove`: removes a runtime identity of the caller's tenant.
    pub async fn remove_identity(&self, identity: &str) -> Result<IdentityList, Error> {
        let req = RemoveIdentityRequest {
            identity: identity.to_owned(),
        };
        self.post("/v1/sys/identities/remove", &req, Repeat::Unsafe)
            .await
    }

    /// `POST /v1/sys/rotate-master`: a new master key, every KEK version re-sealed under it
    /// (passphrase servers: the passphrase, which must open the current one).
    pub async fn rotate_master(&self, passphrase: Option<&str>) -> Result<u64, Error> {
        let req = crate::api::RotateMasterRequest {
            passphrase: passphrase.map(|p| Passphrase::new(p.to_owned())),
        };
        let resp: crate::api::RotateMasterResponse = self
            .post("/v1/sys/rotate-master", &req, Repeat::Unsafe)
            .await?;
        Ok(resp.versions_resealed)
    }

    /// `GET /v1/sys/backup`: the server's encrypted export, as a JSON document to store
    /// as is (restore it with `kms-server restore`).
    pub async fn backup(&self) -> Result<serde_json::Value, Error> {
        let limit = self.inner.max_backup;
        self.call_limited(
            Method::GET,
            "/v1/sys/backup",
            Bytes::new(),
            Repeat::Safe,
            limit,
        )
        .await
    }

    /// `GET /v1/sys/lockouts`: identities locked out now.
    pub async fn lockouts(&self) -> Result<LockoutList, Error> {
        self.get("/v1/sys/lockouts").await
    }

    /// `POST /v1/sys/lockouts/lift`: lets `identity` in again; true if it was locked out.
    pub async fn lift_lockout(&self, identity: &str) -> Result<bool, Error> {
        let req = LiftLockoutRequest {
            identity: identity.to_owned(),
        };
        let resp: LiftLockoutResponse = self
            .post("/v1/sys/lockouts/lift", &req, Repeat::Safe)
            .await?;
        Ok(resp.lifted)
    }

    /// `GET /v1/sys/brake`: the exfiltration brake's mode and holds.
    pub async fn brake_status(&self) -> Result<crate::api::BrakeStatus, Error> {
        self.get("/v1/sys/brake").await
    }

    /// `POST /v1/sys/brake/release`: lifts the hold on an identity or a key; true if it
    /// was held.
    pub async fn release_brake(
        &self,
        req: &crate::api::ReleaseBrakeRequest,
    ) -> Result<bool, Error> {
        let resp: crate::api::ReleaseBrakeResponse = self
            .post("/v1/sys/brake/release", req, Repeat::Safe)
            .await?;
        Ok(resp.released)
    }

    // ---- approvals (dual control) ----

    /// `GET /v1/approvals`: the requests for approval the caller may read, newest first.
    pub async fn approvals(&self) -> Result<ApprovalList, Error> {
        self.get("/v1/approvals").await
    }

    /// `GET /v1/approvals/{id}`.
    pub async fn approval(&self, id: &str) -> Result<ApprovalInfo, Error> {
        self.get(&format!("/v1/approvals/{}", check_approval_id(id)?))
            .await
    }

    /// `POST /v1/approvals/{id}/approve` (or `/deny` when `approve` is false): this
    /// caller's decision on another operator's request. Not repeated automatically (a
    /// repeat is refused as a second vote).
    pub async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        reason: Option<&str>,
    ) -> Result<ApprovalInfo, Error> {
        let verb = if approve { "approve" } else { "deny" };
        let path = format!("/v1/approvals/{}/{verb}", check_approval_id(id)?);
        let req = DecideRequest {
            reason: reason.map(str::to_owned),
        };
        self.post(&path, &req, Repeat::Unsafe).await
    }

    /// `GET /v1/approvals/policy`: the caller's tenant's approval policy and the service's.
    pub async fn approval_policies(&self) -> Result<ApprovalPolicies, Error> {
        self.get("/v1/approvals/policy").await
    }

    /// `PUT /v1/approvals/policy`: sets (or, `None`, removes) the approval policy of
    /// `scope` (may itself wait for approvals: [`Error::ApprovalPending`]).
    pub async fn set_approval_policy(
        &self,
        scope: ApprovalScope,
        policy: Option<ApprovalPolicy>,
    ) -> Result<ApprovalPolicies, Error> {
        let body = json_body(&SetApprovalPolicyRequest { scope, policy })?;
        self.call(Method::PUT, "/v1/approvals/policy", body, Repeat::Unsafe)
            .await
    }

    /// `POST /v1/sys/seal`.
    pub async fn seal(&self) -> Result<SysStatus, Error> {
        self.post("/v1/sys/seal", &serde_json::json!({}), Repeat::Safe)
            .await
    }
}

/// An approval request's id (32 hex digits), checked before it goes into a path.
fn check_approval_id(id: &str) -> Result<&str, Error> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(Error::Config(format!(
            "{id:?} is not an approval request's id (32 hex digits)"
        )))
    }
}

/// A request body as JSON, in a buffer that is wiped once hyper has sent it (a wrap's
/// body holds the DEK).
fn json_body<B: Serialize + ?Sized>(body: &B) -> Result<Bytes, Error> {
    let buf = ZeroizingBuf::json(body, 256).map_err(|e| Error::Config(e.to_string()))?;
    Ok(Bytes::from_owner(buf))
}

fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, Error> {
    if status == StatusCode::ACCEPTED {
        if let Ok(pending) = serde_json::from_slice::<crate::api::ApprovalPending>(bytes) {
            return Err(Error::ApprovalPending(Box::new(pending)));
        }
    }
    if status.is_success() {
        return serde_json::from_slice(bytes).map_err(|e| Error::InvalidResponse {
            status: status.as_u16(),
            detail: format!("unexpected JSON: {e}"),
        });
    }
    match serde_json::from_slice::<ErrorResponse>(bytes) {
        Ok(err) => Err(Error::Api {
            status: status.as_u16(),
            code: err.error.code,
            message: err.error.message,
        }),
        Err(_) => Err(Error::InvalidResponse {
            status: status.as_u16(),
            detail: "an error without the API's error body (is this a Keyhold server?)".into(),
        }),
    }
}
