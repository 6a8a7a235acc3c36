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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;

/// The least time between two fetches caused by unknown key ids.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

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
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
    /// Last fetch forced by an unknown key id.
    forced: Option<Instant>,
}

/// Verifies tokens against one issuer configuration.
pub struct Verifier {
    settings: JwtSettings,
    cache: RwLock<Cache>,
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
fn usable(set: &JwkSet) -> HashMap<String, Key> {
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
        keys.insert(kid, Key { decoding, rsa, alg });
    }
    keys
}

fn fetch(source: &JwksSource) -> Result<JwkSet, JwtError> {
    let bytes = match source {
        JwksSource::File(path) => {
            std::fs::read(path).map_err(|e| JwtError::KeySet(format!("{}: {e}", path.display())))?
        }
        JwksSource::Url { url, ca } => fetch_https(url, ca.as_deref())?,
    };
    serde_json::from_slice(&bytes).map_err(|e| JwtError::KeySet(format!("not a JWK set: {e}")))
}

/// GET over HTTPS, expecting 200 ([`crate::https::request`]).
fn fetch_https(url: &str, ca: Option<&std::path::Path>) -> Result<Vec<u8>, JwtError> {
    match crate::https::request("GET", url, ca, None) {
        Ok((200, body)) => Ok(body),
        Ok((status, _)) => Err(JwtError::KeySet(format!("{url}: HTTP {status}"))),
        Err(e) => Err(JwtError::KeySet(e)),
    }
}

impl Verifier {
    /// A verifier; the key set is read at the first token (or [`Verifier::refresh`]).
    pub fn new(settings: JwtSettings) -> Self {
        Self {
            settings,
            cache: RwLock::new(Cache {
                keys: HashMap::new(),
                fetched: None,
                forced: None,
            }),
        }
    }

    /// Reads the key set now. Blocking (a file or an HTTPS fetch). On failure the keys
    /// already cached stay in use.
    pub fn refresh(&self) -> Result<usize, JwtError> {
        let set = fetch(&self.settings.jwks)?;
        let keys = usable(&set);
        let n = keys.len();
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.keys = keys;
        cache.fetched = Some(Instant::now());
        Ok(n)
    }

    fn stale(&self) -> bool {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fetched
            .is_none_or(|t| t.elapsed() >= self.settings.refresh)
    }

    /// Verifies `token` and returns its claims. Blocking when the key set must be read
    /// (stale, or an unknown `kid`): call it off the async workers.
    pub fn verify<C: DeserializeOwned>(&self, token: &str) -> Result<C, JwtError> {
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
        let kid = header.kid.ok_or(JwtError::UnknownKey)?;
        if self.stale() {
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, "JWT key set refresh failed: using the cached keys");
            }
        }
        let known = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys
            .contains_key(&kid);
        if !known {
            // Perhaps a key the issuer just added: read the set again, not too often.
            let may = {
                let mut cache = self
                    .cache
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let may = cache.forced.is_none_or(|t| t.elapsed() >= MIN_REFETCH);
                if may {
                    cache.forced = Some(Instant::now());
                }
                may
            };
            if may {
                let _ = self.refresh();
            }
        }
        let cache = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = cache.keys.get(&kid).ok_or(JwtError::UnknownKey)?;
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
        // The system's CAs do not vouch for this server: no keys.
        let untrusted = Verifier::new(settings(None));
        assert!(matches!(untrusted.refresh(), Err(JwtError::KeySet(_))));
        assert_eq!(
            untrusted
                .verify::<Value>(&sign(&a, "a", Algorithm::RS256, &claims(300)))
                .unwrap_err(),
            JwtError::UnknownKey
        );
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
}
