//! Bearer tokens for the end-user protocols (issue 11: Microsoft DKE, Google Workspace
//! CSE), verified with the `jsonwebtoken` crate against a JSON Web Key Set, never by
//! hand-rolled signature checks.
//!
//! What a token must be to pass [`Verifier::verify`]:
//! - signed with an algorithm of the allow-list (asymmetric only: RS256/384/512,
//!   PS256/384/512, ES256/384; never `none`, never HMAC), and the same algorithm the key
//!   is for: the key named by the header's `kid` must be an RSA key for RS/PS and an EC
//!   key for ES, and if the key set declares an `alg` for it, exactly that one. A key
//!   set's symmetric (`oct`) keys are dropped when it is loaded, so no public value can
//!   ever serve as an HMAC secret (the classic RS/HS confusion);
//! - issued by one of the configured issuers (`iss`), for one of the configured audiences
//!   (`aud`), not expired (`exp`, required) and not before its `nbf`, with the configured
//!   clock-skew tolerance.
//!
//! The key set comes from a file or an HTTPS URL and is cached: read again every
//! `refresh`, and at once (at most every [`MIN_REFETCH`]) when a token names a key id the
//! cache does not know, so an issuer's key rotation is picked up without a restart and a
//! flood of unknown ids cannot turn into a flood of fetches.
//!
//! Reading the key set is the one part that may block (a file, or an HTTPS fetch of up to
//! 10 s a step), and the tokens arrive anonymously, so an issuer's outage must not become
//! the server's:
//! - [`Verifier::verify_async`] (the listeners' path) never blocks an async worker: the
//!   fetch runs on the blocking pool, and a call that needs its result awaits it (at most
//!   [`FETCH_WAIT`]); a due refresh of a set whose key the token names runs in the
//!   background while the cached key verifies;
//! - single flight: one fetch at a time per verifier; concurrent calls needing it wait for
//!   that one;
//! - negative caching: after a failed fetch none is started for a back-off of
//!   [`BACKOFF_MIN`], doubling with each further failure up to [`BACKOFF_MAX`]; a token
//!   whose key is not cached meanwhile fails at once with [`JwtError::KeySet`] (the
//!   protocols answer 503, with [`Verifier::retry_after`]), while the keys already cached
//!   keep verifying.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// The least time between two fetches caused by unknown key ids.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);
/// The back-off after a failed fetch; it doubles with each further failure.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
/// The longest back-off while the key set stays unavailable.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a verification waits for a fetch under way before it gives up.
pub const FETCH_WAIT: Duration = Duration::from_secs(15);

/// Algorithms a token may be signed with: asymmetric ones only.
pub const ALLOWED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JSON file (read again at every refresh).
    File(PathBuf),
    /// An `https://` URL, fetched with the system's CA bundle or `ca`.
    Url {
        /// The URL.
        url: String,
        /// A CA bundle (PEM) the server must chain to; `None`: the system's.
        ca: Option<PathBuf>,
    },
    /// An issuer that publishes a certificate, not a key set (Salesforce's JWT signing
    /// certificate): its RSA public key under `kid`, the name the issuer puts in the
    /// header. Read again at every refresh.
    Certificate {
        /// The certificate (PEM).
        path: PathBuf,
        /// The key id tokens carry.
        kid: String,
    },
    /// A key set known when the verifier is built: this service's own signing key (the
    /// delegated tokens CSE issues and later accepts).
    Static(serde_json::Value),
}

impl JwksSource {
    /// From a configuration value: an `https://` URL (with `ca`, resolved), or a file
    /// (resolved; it must exist). The error says what is wrong, for the caller's field.
    pub fn from_config(
        value: &str,
        ca: Option<&std::path::Path>,
        resolve: impl Fn(&std::path::Path) -> PathBuf,
    ) -> Result<Self, String> {
        if value.starts_with("https://") {
            Ok(JwksSource::Url {
                url: value.to_owned(),
                ca: ca.map(&resolve),
            })
        } else if value.contains("://") {
            Err("a file, or an https:// URL".to_owned())
        } else {
            let p = resolve(std::path::Path::new(value));
            if p.is_file() {
                Ok(JwksSource::File(p))
            } else {
                Err(format!("{} is not a readable file", p.display()))
            }
        }
    }
}

/// What a [`Verifier`] checks.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// The key set.
    pub jwks: JwksSource,
    /// Clock-skew tolerance for `exp` and `nbf`.
    pub leeway: Duration,
    /// How often the key set is read again.
    pub refresh: Duration,
}

/// Why a token was refused. The messages say what failed, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a JWT, or its header is unreadable.
    #[error("the bearer token is malformed")]
    Malformed,
    /// `alg` is not on the allow-list (`none`, HMAC, ...).
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    /// No key with the header's `kid` (or no `kid`).
    #[error("the token names no known signing key")]
    UnknownKey,
    /// The key does not match the algorithm.
    #[error("the token's algorithm does not match its key")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    Signature,
    /// Expired, or not yet valid.
    #[error("the token is expired or not yet valid")]
    Time,
    /// Wrong issuer.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// Wrong audience.
    #[error("the token's audience is not accepted")]
    Audience,
    /// The claims are not what the protocol needs.
    #[error("the token's claims are invalid")]
    Claims,
    /// The key set could not be read.
    #[error("the token issuer's key set is unavailable: {0}")]
    KeySet(String),
}

/// One usable key of the set.
struct Key {
    decoding: DecodingKey,
    /// RSA (true) or EC (false).
    rsa: bool,
    /// The `alg` the set declares for it, if any.
    alg: Option<Algorithm>,
}

struct Cache {
    keys: HashMap<String, Arc<Key>>,
    /// Last good read.
    fetched: Option<Instant>,
    /// Last fetch forced by an unknown key id.
    forced: Option<Instant>,
    /// A fetch is under way (single flight: at most one).
    fetching: bool,
    /// Failed fetches since the last good one.
    failures: u32,
    /// Why the last fetch failed; cleared by a good one.
    last_error: Option<String>,
    /// No fetch starts before this (the back-off after a failure).
    retry_at: Option<Instant>,
}

impl Cache {
    /// Why a key id the cache does not hold cannot be had now: the key set is
    /// unavailable (its last fetch failed), or the id is unknown.
    fn missing(&self) -> JwtError {
        match &self.last_error {
            Some(e) => JwtError::KeySet(e.clone()),
            None => JwtError::UnknownKey,
        }
    }
}

/// A verifier's state, shared with the fetch it runs on the blocking pool.
struct Shared {
    source: JwksSource,
    /// The issuer, for the log.
    issuer: String,
    /// The back-off after a first failure, and its ceiling.
    backoff: (Duration, Duration),
    cache: Mutex<Cache>,
    /// Wakes the blocking waiters when a fetch ends.
    ended_blocking: Condvar,
    /// Wakes the async waiters when a fetch ends (its value: fetches ended).
    ended: watch::Sender<u64>,
    /// Fetches started.
    attempts: AtomicU64,
}

/// What a verification does next.
enum Plan {
    /// Verify with this cached key.
    Use(Arc<Key>),
    /// Verify with this cached key; the refresh that is due is this call's to run.
    UseAndRefresh(Arc<Key>, Flight),
    /// Run this fetch, wait for it, and look again.
    Lead(Flight, watch::Receiver<u64>),
    /// Wait for the fetch under way, and look again.
    Wait(watch::Receiver<u64>),
    /// Fail.
    Fail(JwtError),
}

/// The one fetch under way. Dropped, it ends the flight (records the result, clears
/// the single-flight flag, wakes the waiters), also when it never ran (its task dropped
/// at shutdown) or panicked.
struct Flight {
    shared: Arc<Shared>,
    result: Option<Result<HashMap<String, Arc<Key>>, JwtError>>,
}

impl Flight {
    /// Reads the key set (blocking); the number of usable keys.
    fn run(mut self) -> Result<usize, JwtError> {
        self.shared.attempts.fetch_add(1, Ordering::Relaxed);
        let result = fetch(&self.shared.source).map(|set| usable(&set));
        let out = match &result {
            Ok(keys) => Ok(keys.len()),
            Err(e) => Err(e.clone()),
        };
        self.result = Some(result);
        out
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(JwtError::KeySet(
                "the key set fetch was interrupted".to_owned(),
            ))
        });
        self.shared.end(result);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The back-off after `failures` failed fetches in a row: the first, doubled for each
    /// further failure, at most the ceiling.
    fn backoff_after(&self, failures: u32) -> Duration {
        let (first, ceiling) = self.backoff;
        let doublings = failures.saturating_sub(1).min(16);
        first.saturating_mul(1u32 << doublings).min(ceiling)
    }

    /// Starts a flight; the caller holds the lock and has checked none is under way.
    fn take_off(self: &Arc<Self>, cache: &mut Cache) -> Flight {
        cache.fetching = true;
        Flight {
            shared: self.clone(),
            result: None,
        }
    }

    /// What a verification of a token naming `kid` does next. `may_fetch`: false once it
    /// has waited for a fetch (it looks once more, and fetches no more).
    fn plan(self: &Arc<Self>, kid: &str, refresh: Duration, may_fetch: bool) -> Plan {
        let now = Instant::now();
        let mut cache = self.lock();
        let stale = cache
            .fetched
            .is_none_or(|t| now.duration_since(t) >= refresh);
        let backing_off = cache.retry_at.is_some_and(|t| now < t);
        if let Some(key) = cache.keys.get(kid).cloned() {
            if stale && may_fetch && !cache.fetching && !backing_off {
                let flight = self.take_off(&mut cache);
                return Plan::UseAndRefresh(key, flight);
            }
            return Plan::Use(key);
        }
        if !may_fetch {
            return Plan::Fail(cache.missing());
        }
        if cache.fetching {
            // Subscribed under the lock: the fetch's end cannot slip by unseen.
            return Plan::Wait(self.ended.subscribe());
        }
        if backing_off {
            return Plan::Fail(cache.missing());
        }
        // Perhaps a key the issuer just added: read the set again, not too often.
        let may_force = cache
            .forced
            .is_none_or(|t| now.duration_since(t) >= MIN_REFETCH);
        if !(stale || may_force) {
            return Plan::Fail(cache.missing());
        }
        if !stale {
            cache.forced = Some(now);
        }
        let flight = self.take_off(&mut cache);
        Plan::Lead(flight, self.ended.subscribe())
    }

    /// Ends the flight under way with its result, and wakes its waiters.
    fn end(&self, result: Result<HashMap<String, Arc<Key>>, JwtError>) {
        let now = Instant::now();
        let mut cache = self.lock();
        cache.fetching = false;
        match result {
            Ok(keys) => {
                if cache.failures > 0 {
                    tracing::info!(issuer = %self.issuer, keys = keys.len(), "JWT key set available again");
                }
                cache.keys = keys;
                cache.fetched = Some(now);
                cache.failures = 0;
                cache.last_error = None;
                cache.retry_at = None;
            }
            Err(e) => {
                cache.failures = cache.failures.saturating_add(1);
                let wait = self.backoff_after(cache.failures);
                cache.retry_at = Some(now + wait);
                let message = match e {
                    JwtError::KeySet(m) => m,
                    other => other.to_string(),
                };
                // Once a fetch, not once a request.
                tracing::warn!(
                    issuer = %self.issuer,
                    error = %message,
                    failures = cache.failures,
                    retry_in_secs = wait.as_secs(),
                    "JWT key set fetch failed: the cached keys stay in use; no fetch before the back-off ends"
                );
                cache.last_error = Some(message);
            }
        }
        drop(cache);
        self.ended_blocking.notify_all();
        self.ended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Blocks until no fetch is under way, at most [`FETCH_WAIT`].
    fn wait_blocking(&self) -> Result<(), JwtError> {
        let deadline = Instant::now() + FETCH_WAIT;
        let mut cache = self.lock();
        while cache.fetching {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(too_long());
            }
            cache = match self.ended_blocking.wait_timeout(cache, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        Ok(())
    }
}

fn too_long() -> JwtError {
    JwtError::KeySet(format!(
        "the key set fetch under way took more than {} s",
        FETCH_WAIT.as_secs()
    ))
}

/// Runs a fetch on the blocking pool (inline when there is no runtime). Detached: it
/// completes, and its result is cached, even if the request that started it is dropped.
fn start(flight: Flight) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || flight.run());
        }
        Err(_) => {
            let _ = flight.run();
        }
    }
}

/// Waits for the fetch under way to end, at most [`FETCH_WAIT`], without blocking.
async fn wait(mut ended: watch::Receiver<u64>) -> Result<(), JwtError> {
    match tokio::time::timeout(FETCH_WAIT, ended.changed()).await {
        // `changed` fails only when the sender (in `Shared`) is gone: look again anyway.
        Ok(_) => Ok(()),
        Err(_) => Err(too_long()),
    }
}

/// Verifies tokens against one issuer configuration.
pub struct Verifier {
    settings: JwtSettings,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.settings.issuers)
            .field("audiences", &self.settings.audiences)
            .finish_non_exhaustive()
    }
}

/// The usable keys of a key set: RSA and EC keys with a `kid`; symmetric and
/// unidentified keys are left out.
fn usable(set: &JwkSet) -> HashMap<String, Arc<Key>> {
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let rsa = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => true,
            AlgorithmParameters::EllipticCurve(_) => false,
            // `oct` (an HMAC secret) and OKP: never.
            _ => continue,
        };
        let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        keys.insert(kid, Arc::new(Key { decoding, rsa, alg }));
    }
    keys
}

fn fetch(source: &JwksSource) -> Result<JwkSet, JwtError> {
    let bytes = match source {
        JwksSource::File(path) => {
            std::fs::read(path).map_err(|e| JwtError::KeySet(format!("{}: {e}", path.display())))?
        }
        JwksSource::Url { url, ca } => fetch_https(url, ca.as_deref())?,
        JwksSource::Certificate { path, kid } => return certificate_key_set(path, kid),
        JwksSource::Static(set) => {
            return serde_json::from_value(set.clone())
                .map_err(|e| JwtError::KeySet(format!("not a JWK set: {e}")))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| JwtError::KeySet(format!("not a JWK set: {e}")))
}

/// The key set of one certificate: its RSA public key as a JWK under `kid`.
fn certificate_key_set(path: &std::path::Path, kid: &str) -> Result<JwkSet, JwtError> {
    use base64::Engine as _;
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let unusable = |why: &str| JwtError::KeySet(format!("{}: {why}", path.display()));
    let certs = crate::base::pem::load_certs(path).map_err(|e| unusable(&e.to_string()))?;
    let der = certs.first().ok_or_else(|| unusable("no certificate"))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| unusable("not an X.509 certificate"))?;
    let public = rsa::RsaPublicKey::from_public_key_der(cert.public_key().raw)
        .map_err(|_| unusable("not an RSA public key"))?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = serde_json::json!({"keys": [{
        "kty": "RSA", "use": "sig", "kid": kid,
        "n": b64.encode(public.n().to_bytes_be()), "e": b64.encode(public.e().to_bytes_be()),
    }]});
    serde_json::from_value(jwk).map_err(|e| unusable(&e.to_string()))
}

/// GET over HTTPS within 10 s, expecting 200 ([`http_client::request_blocking`]).
fn fetch_https(url: &str, ca: Option<&std::path::Path>) -> Result<Vec<u8>, JwtError> {
    use crate::transport::http_client::{self, Schemes};
    let deadline = std::time::Duration::from_secs(10);
    match http_client::request_blocking("GET", url, Schemes::Https, ca, None, deadline) {
        Ok((200, body)) => Ok(body),
        Ok((status, _)) => Err(JwtError::KeySet(format!("{url}: HTTP {status}"))),
        Err(e) => Err(JwtError::KeySet(e.to_string())),
    }
}

/// The header of a token, and its key id, if its algorithm is allowed.
fn header_of(token: &str) -> Result<(Header, String), JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| {
        // `none` and unknown algorithms fail while the header is read.
        if e.to_string().contains("unknown variant") {
            JwtError::Algorithm
        } else {
            JwtError::Malformed
        }
    })?;
    if !ALLOWED.contains(&header.alg) {
        return Err(JwtError::Algorithm);
    }
    let kid = header.kid.clone().ok_or(JwtError::UnknownKey)?;
    Ok((header, kid))
}

impl Verifier {
    /// A verifier; the key set is read at the first token (or [`Verifier::refresh`]).
    pub fn new(settings: JwtSettings) -> Self {
        Self::with_backoff(settings, BACKOFF_MIN, BACKOFF_MAX)
    }

    fn with_backoff(settings: JwtSettings, first: Duration, ceiling: Duration) -> Self {
        let (ended, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                source: settings.jwks.clone(),
                issuer: settings.issuers.join(" "),
                backoff: (first, ceiling),
                cache: Mutex::new(Cache {
                    keys: HashMap::new(),
                    fetched: None,
                    forced: None,
                    fetching: false,
                    failures: 0,
                    last_error: None,
                    retry_at: None,
                }),
                ended_blocking: Condvar::new(),
                ended,
                attempts: AtomicU64::new(0),
            }),
            settings,
        }
    }

    /// Reads the key set now, back-off or not; if a read is under way, waits for it and
    /// reports its outcome. Blocking (a file or an HTTPS fetch). On failure the keys
    /// already cached stay in use.
    pub fn refresh(&self) -> Result<usize, JwtError> {
        let flight = {
            let mut cache = self.shared.lock();
            (!cache.fetching).then(|| self.shared.take_off(&mut cache))
        };
        if let Some(flight) = flight {
            return flight.run();
        }
        self.shared.wait_blocking()?;
        let cache = self.shared.lock();
        match &cache.last_error {
            Some(e) => Err(JwtError::KeySet(e.clone())),
            None => Ok(cache.keys.len()),
        }
    }

    /// How long a caller refused for an unavailable key set ([`JwtError::KeySet`]) should
    /// wait before it asks again: the rest of the back-off in whole seconds (rounded up),
    /// at least one.
    pub fn retry_after(&self) -> Duration {
        let left = self.shared.lock().retry_at.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Duration::from_secs(secs.max(1))
    }

    /// Verifies `token` and returns its claims, blocking while the key set is read (or a
    /// read under way is waited for): call it off the async workers. The listeners use
    /// [`Verifier::verify_async`].
    pub fn verify<C: DeserializeOwned>(&self, token: &str) -> Result<C, JwtError> {
        let (header, kid) = header_of(token)?;
        let mut may_fetch = true;
        loop {
            match self.shared.plan(&kid, self.settings.refresh, may_fetch) {
                Plan::Use(key) => return self.check(token, &header, &key),
                Plan::UseAndRefresh(_, flight) | Plan::Lead(flight, _) => {
                    let _ = flight.run();
                }
                Plan::Wait(_) => self.shared.wait_blocking()?,
                Plan::Fail(e) => return Err(e),
            }
            may_fetch = false;
        }
    }

    /// Verifies `token` and returns its claims without blocking the async worker: a key
    /// set read runs on the blocking pool; the call waits for it only when the token's key
    /// is not cached (a due refresh of a cached key runs in the background).
    pub async fn verify_async<C: DeserializeOwned>(&self, token: &str) -> Result<C, JwtError> {
        let (header, kid) = header_of(token)?;
        let mut may_fetch = true;
        loop {
            match self.shared.plan(&kid, self.settings.refresh, may_fetch) {
                Plan::Use(key) => return self.check(token, &header, &key),
                Plan::UseAndRefresh(key, flight) => {
                    start(flight);
                    return self.check(token, &header, &key);
                }
                Plan::Lead(flight, ended) => {
                    start(flight);
                    wait(ended).await?;
                }
                Plan::Wait(ended) => wait(ended).await?,
                Plan::Fail(e) => return Err(e),
            }
            may_fetch = false;
        }
    }

    /// Fetches started so far.
    #[cfg(test)]
    fn attempts(&self) -> u64 {
        self.shared.attempts.load(Ordering::Relaxed)
    }

    /// The checks of a token against the key its header names.
    fn check<C: DeserializeOwned>(
        &self,
        token: &str,
        header: &Header,
        key: &Key,
    ) -> Result<C, JwtError> {
        let rsa_alg = !matches!(header.alg, Algorithm::ES256 | Algorithm::ES384);
        if key.rsa != rsa_alg || key.alg.is_some_and(|a| a != header.alg) {
            return Err(JwtError::KeyMismatch);
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&self.settings.issuers);
        validation.set_audience(&self.settings.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<C>(token, &key.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::InvalidSignature => JwtError::Signature,
                    ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => JwtError::Time,
                    ErrorKind::InvalidIssuer => JwtError::Issuer,
                    ErrorKind::InvalidAudience => JwtError::Audience,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                        JwtError::KeyMismatch
                    }
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => JwtError::Claims,
                    _ => JwtError::Malformed,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs8::EncodePrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    use serde_json::{json, Value};

    const ISS: &str = "https://issuer.test/";
    const AUD: &str = "https://kms.test";

    struct Issuer {
        pem: String,
        jwk: Value,
    }

    fn rsa_issuer(kid: &str) -> Issuer {
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::rsa::{KeySize, PrivateDecryptingKey};
        use rsa::pkcs8::DecodePrivateKey as _;
        let generated = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let der = generated.as_der().unwrap();
        let key = rsa::RsaPrivateKey::from_pkcs8_der(der.as_ref()).unwrap();
        let pem = key.to_pkcs8_pem(Default::default()).unwrap().to_string();
        let jwk = json!({
            "kty": "RSA", "kid": kid, "use": "sig",
            "n": B64URL.encode(key.n().to_bytes_be()),
            "e": B64URL.encode(key.e().to_bytes_be()),
        });
        Issuer { pem, jwk }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(delta_exp: i64) -> Value {
        json!({"iss": ISS, "aud": AUD, "email": "alice@example.com",
               "exp": (now() as i64 + delta_exp), "iat": now()})
    }

    fn sign(issuer: &Issuer, kid: &str, alg: Algorithm, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        let key = EncodingKey::from_rsa_pem(issuer.pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn verifier(dir: &std::path::Path, keys: &[&Value]) -> Verifier {
        let path = dir.join("jwks.json");
        std::fs::write(&path, json!({"keys": keys}).to_string()).unwrap();
        Verifier::new(JwtSettings {
            issuers: vec![ISS.into()],
            audiences: vec![AUD.into()],
            jwks: JwksSource::File(path),
            leeway: Duration::from_secs(60),
            refresh: Duration::from_secs(3600),
        })
    }

    /// Replaces the payload (or header) part of a token.
    fn with_part(token: &str, index: usize, json: &Value) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[index] = B64URL.encode(json.to_string());
        parts.join(".")
    }

    #[test]
    fn a_good_token_passes_and_each_bad_one_fails_for_its_own_reason() {
        let dir = tempfile::tempdir().unwrap();
        let a = rsa_issuer("a");
        let v = verifier(dir.path(), &[&a.jwk]);
        let good = sign(&a, "a", Algorithm::RS256, &claims(300));
        let c: Value = v.verify(&good).unwrap();
        assert_eq!(c["email"], "alice@example.com");
        // PS256 with the same RSA key: fine (the set declares no alg for it).
        v.verify::<Value>(&sign(&a, "a", Algorithm::PS256, &claims(300)))
            .unwrap();
        // Within the skew tolerance: still fine; beyond it: expired.
        v.verify::<Value>(&sign(&a, "a", Algorithm::RS256, &claims(-30)))
            .unwrap();
        let err = |t: &str| v.verify::<Value>(t).unwrap_err();
        assert_eq!(
            err(&sign(&a, "a", Algorithm::RS256, &claims(-120))),
            JwtError::Time
        );
        let mut early = claims(300);
        early["nbf"] = json!(now() + 600);
        assert_eq!(
            err(&sign(&a, "a", Algorithm::RS256, &early)),
            JwtError::Time
        );
        let mut c = claims(300);
        c["iss"] = json!("https://evil.test/");
        assert_eq!(err(&sign(&a, "a", Algorithm::RS256, &c)), JwtError::Issuer);
        let mut c = claims(300);
        c["aud"] = json!("https://other.test");
        assert_eq!(
            err(&sign(&a, "a", Algorithm::RS256, &c)),
            JwtError::Audience
        );
        let mut c = claims(300);
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(err(&sign(&a, "a", Algorithm::RS256, &c)), JwtError::Claims);
        // A changed payload under the old signature.
        let mut c = claims(300);
        c["email"] = json!("mallory@example.com");
        assert_eq!(err(&with_part(&good, 1, &c)), JwtError::Signature);
        // Another issuer's key under our kid.
        let b = rsa_issuer("a");
        assert_eq!(
            err(&sign(&b, "a", Algorithm::RS256, &claims(300))),
            JwtError::Signature
        );
        assert_eq!(err("not.a.token"), JwtError::Malformed);
        assert_eq!(err("garbage"), JwtError::Malformed);
    }

    #[test]
    fn none_hmac_and_key_algorithm_confusion_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = rsa_issuer("a");
        // The set also carries an HMAC secret under a kid of its own, and a key that
        // declares RS256 only.
        let mut pinned = rsa_issuer("p").jwk;
        pinned["alg"] = json!("RS256");
        let oct = json!({"kty": "oct", "kid": "h", "k": B64URL.encode(b"public knowledge")});
        let v = verifier(dir.path(), &[&a.jwk, &oct, &pinned]);
        let err = |t: &str| v.verify::<Value>(t).unwrap_err();
        let good = sign(&a, "a", Algorithm::RS256, &claims(300));
        // alg none, no signature.
        let none = with_part(&good, 0, &json!({"alg": "none", "kid": "a", "typ": "JWT"}));
        let unsigned = format!("{}.", none.rsplit_once('.').unwrap().0);
        assert_eq!(err(&unsigned), JwtError::Algorithm);
        // HS256 keyed with the RSA key's public modulus, or with the set's oct key.
        for kid in ["a", "h"] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(kid.into());
            let secret = if kid == "h" {
                b"public knowledge".to_vec()
            } else {
                a.jwk["n"].as_str().unwrap().as_bytes().to_vec()
            };
            let t = jsonwebtoken::encode(&header, &claims(300), &EncodingKey::from_secret(&secret))
                .unwrap();
            assert_eq!(err(&t), JwtError::Algorithm, "{kid}");
        }
        // ES256 naming an RSA key.
        let es = with_part(&good, 0, &json!({"alg": "ES256", "kid": "a", "typ": "JWT"}));
        assert_eq!(err(&es), JwtError::KeyMismatch);
        // A key pinned to RS256 used with PS256.
        let p = rsa_issuer("p");
        let mut p_jwk = p.jwk.clone();
        p_jwk["alg"] = json!("RS256");
        let v = verifier(dir.path(), &[&p_jwk]);
        assert_eq!(
            v.verify::<Value>(&sign(&p, "p", Algorithm::PS256, &claims(300)))
                .unwrap_err(),
            JwtError::KeyMismatch
        );
        v.verify::<Value>(&sign(&p, "p", Algorithm::RS256, &claims(300)))
            .unwrap();
        // No kid at all.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = None;
        let t = jsonwebtoken::encode(
            &header,
            &claims(300),
            &EncodingKey::from_rsa_pem(p.pem.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify::<Value>(&t).unwrap_err(), JwtError::UnknownKey);
    }

    #[test]
    fn a_rotated_issuer_key_is_picked_up_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = rsa_issuer("a");
        let v = verifier(dir.path(), &[&a.jwk]);
        v.verify::<Value>(&sign(&a, "a", Algorithm::RS256, &claims(300)))
            .unwrap();
        // The issuer adds key b: a token under b makes the verifier read the set again.
        let b = rsa_issuer("b");
        std::fs::write(
            dir.path().join("jwks.json"),
            json!({"keys": [&a.jwk, &b.jwk]}).to_string(),
        )
        .unwrap();
        v.verify::<Value>(&sign(&b, "b", Algorithm::RS256, &claims(300)))
            .unwrap();
        // Unknown ids right after do not make it read again (at most every 30 s).
        let c = rsa_issuer("c");
        std::fs::write(
            dir.path().join("jwks.json"),
            json!({"keys": [&a.jwk, &b.jwk, &c.jwk]}).to_string(),
        )
        .unwrap();
        assert_eq!(
            v.verify::<Value>(&sign(&c, "c", Algorithm::RS256, &claims(300)))
                .unwrap_err(),
            JwtError::UnknownKey
        );
        // A broken set keeps the cached keys.
        std::fs::write(dir.path().join("jwks.json"), "not json").unwrap();
        assert!(v.refresh().is_err());
        v.verify::<Value>(&sign(&a, "a", Algorithm::RS256, &claims(300)))
            .unwrap();
    }

    /// The key set over HTTPS from a local server whose certificate chains to a given CA;
    /// a server the CA does not vouch for is refused, and the cached keys stay.
    #[test]
    fn the_key_set_comes_over_https_from_a_server_the_ca_vouches_for() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let a = rsa_issuer("a");
        let body = json!({"keys": [&a.jwk]}).to_string();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into()),
        )
        .unwrap();
        let server_config = std::sync::Arc::new(server_config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = body.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(3) {
                let Ok(tcp) = stream else { continue };
                let conn = rustls::ServerConnection::new(server_config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                // The whole request head.
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{served}",
                    served.len()
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        let settings = |ca: Option<PathBuf>| JwtSettings {
            issuers: vec![ISS.into()],
            audiences: vec![AUD.into()],
            jwks: JwksSource::Url {
                url: format!("https://localhost:{port}/jwks"),
                ca,
            },
            leeway: Duration::from_secs(60),
            refresh: Duration::from_secs(3600),
        };
        let v = Verifier::new(settings(Some(ca)));
        assert_eq!(v.refresh().unwrap(), 1);
        v.verify::<Value>(&sign(&a, "a", Algorithm::RS256, &claims(300)))
            .unwrap();
        // The system's CAs do not vouch for this server: no keys, and during the back-off
        // a token fails as "key set unavailable" without another fetch.
        let untrusted = Verifier::new(settings(None));
        assert!(matches!(untrusted.refresh(), Err(JwtError::KeySet(_))));
        assert!(matches!(
            untrusted.verify::<Value>(&sign(&a, "a", Algorithm::RS256, &claims(300))),
            Err(JwtError::KeySet(_))
        ));
        assert_eq!(untrusted.attempts(), 1);
        // Plain http is refused outright.
        let plain = Verifier::new(JwtSettings {
            jwks: JwksSource::Url {
                url: format!("http://localhost:{port}/jwks"),
                ca: None,
            },
            ..settings(None)
        });
        assert!(matches!(plain.refresh(), Err(JwtError::KeySet(_))));
    }

    fn missing_file_verifier(dir: &std::path::Path, refresh: Duration) -> Verifier {
        Verifier::with_backoff(
            JwtSettings {
                issuers: vec![ISS.into()],
                audiences: vec![AUD.into()],
                jwks: JwksSource::File(dir.join("jwks.json")),
                leeway: Duration::from_secs(60),
                refresh,
            },
            Duration::from_secs(1),
            Duration::from_secs(4),
        )
    }

    #[test]
    fn the_back_off_doubles_from_5_s_to_at_most_60_s() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(dir.path(), &[]);
        let secs: Vec<u64> = (1..=7)
            .map(|n| v.shared.backoff_after(n).as_secs())
            .collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(v.shared.backoff_after(u32::MAX), BACKOFF_MAX);
        // Not backing off: "ask again in a second".
        assert_eq!(v.retry_after(), Duration::from_secs(1));
    }

    /// An unreadable key set is read once per back-off, not once per token; tokens whose
    /// key is not cached fail meanwhile as "key set unavailable"; the set is read again
    /// after the back-off, and a good read ends the outage.
    #[test]
    fn a_failed_fetch_is_not_retried_before_its_back_off_ends() {
        let dir = tempfile::tempdir().unwrap();
        let a = rsa_issuer("a");
        let v = missing_file_verifier(dir.path(), Duration::from_secs(3600));
        let token = sign(&a, "a", Algorithm::RS256, &claims(300));
        for _ in 0..5 {
            assert!(matches!(
                v.verify::<Value>(&token),
                Err(JwtError::KeySet(_))
            ));
        }
        assert_eq!(v.attempts(), 1, "one fetch for five tokens");
        assert!(v.retry_after() <= Duration::from_secs(1) && v.shared.lock().retry_at.is_some());
        // After the back-off: one more fetch (failing again), then again none.
        std::thread::sleep(Duration::from_millis(1100));
        for _ in 0..5 {
            assert!(v.verify::<Value>(&token).is_err());
        }
        assert_eq!(v.attempts(), 2);
        // The issuer is back; after the (doubled) back-off the next token reads the set.
        std::fs::write(
            dir.path().join("jwks.json"),
            json!({"keys": [&a.jwk]}).to_string(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(2100));
        v.verify::<Value>(&token).unwrap();
        assert_eq!(v.attempts(), 3);
        assert!(v.shared.lock().last_error.is_none());
    }

    /// A cached key keeps verifying while its set's refresh fails, and the failing
    /// refresh is not retried by every token.
    #[test]
    fn cached_keys_verify_through_an_outage_without_a_fetch_per_token() {
        let dir = tempfile::tempdir().unwrap();
        let a = rsa_issuer("a");
        std::fs::write(
            dir.path().join("jwks.json"),
            json!({"keys": [&a.jwk]}).to_string(),
        )
        .unwrap();
        // Every read is immediately stale: each token would refresh.
        let v = missing_file_verifier(dir.path(), Duration::ZERO);
        let token = sign(&a, "a", Algorithm::RS256, &claims(300));
        v.verify::<Value>(&token).unwrap();
        std::fs::remove_file(dir.path().join("jwks.json")).unwrap();
        for _ in 0..10 {
            v.verify::<Value>(&token).unwrap();
        }
        // The first read, then one failed refresh; the back-off holds the others.
        assert_eq!(v.attempts(), 2);
        assert!(v.shared.lock().last_error.is_some());
    }

    /// Concurrent tokens needing the key set share one read, which runs on the blocking
    /// pool: the async worker stays free while it hangs. The source is a FIFO, so the
    /// read hangs until the test writes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn concurrent_tokens_share_one_fetch_off_the_async_workers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let a = rsa_issuer("a");
        let v = std::sync::Arc::new(missing_file_verifier(dir.path(), Duration::from_secs(3600)));
        let token = sign(&a, "a", Algorithm::RS256, &claims(300));
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (v, token) = (v.clone(), token.clone());
                tokio::spawn(async move { v.verify_async::<Value>(&token).await })
            })
            .collect();
        let t = Instant::now();
        while v.attempts() == 0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The one worker still runs other tasks while the read hangs.
        let other = tokio::time::timeout(Duration::from_secs(5), tokio::spawn(async { 7 })).await;
        let attempts_while_hanging = v.attempts();
        let jwks = json!({"keys": [&a.jwk]}).to_string();
        tokio::task::spawn_blocking(move || std::fs::write(path, jwks))
            .await
            .unwrap()
            .unwrap();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert_eq!(other.unwrap().unwrap(), 7);
        assert_eq!(attempts_while_hanging, 1);
        assert_eq!(v.attempts(), 1);
    }
}
