//! Salesforce Shield Platform Encryption cache-only keys (issue 12; `docs/salesforce.md`):
//! Salesforce's callout fetches a data key by its key identifier from Keyhold, on the public
//! listener ([`crate::app::public`]) under `/salesforce`, and keeps it only in its cache.
//!
//! `GET /salesforce/{kid}[?requestId=<32 hex>]` with the configured credentials (the Named
//! Credential's `Authorization: Basic` with `username` and the secret, or `Authorization:
//! Bearer <secret>`, compared in constant time, and/or, with `client_ca`, a client
//! certificate from that CA, optionally pinned by SHA-256; the public listener then asks
//! every client for a certificate but lets those without one through to the routes that
//! do not need one) answers `{"kid", "jwe"}`: the 32-byte
//! data key in a JWE compact serialization, protected header exactly
//! `{"alg":"RSA-OAEP","enc":"A256GCM","kid":<kid>}` (plus `"jti":<requestId>` when the
//! callout sends one: replay detection's nonce, without which Salesforce aborts the
//! callout), the content key wrapped with RSAES-OAEP
//! (SHA-1, as JOSE `RSA-OAEP` defines) under the public key of Salesforce's BYOK
//! certificate, a 96-bit IV, AAD = the ASCII of the encoded header, a 128-bit tag.
//!
//! The data key itself is a Keyhold data key: made under an AES-256 Keyhold key with the
//! context `{"salesforce": <kid>}` and configured in wrapped form; each callout unwraps it
//! through the keyring as `[salesforce] identity`. So disabling the Keyhold key refuses
//! every callout (Salesforce loses the key at its next fetch), destroying it shreds every
//! data key made under it, and rotation is a new key identifier with a new data key.

pub mod settings;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::adapters::SetupError;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use serde_json::json;

use crate::access::policy::Principal;
use crate::api::AppState;
use crate::base::error::Error;
use settings::SalesforceSettings;

/// The context a served data key is made under.
pub const CONTEXT_KEY: &str = "salesforce";
/// The data key's length.
pub const KEY_LEN: usize = 32;

/// The Salesforce endpoint.
pub struct Salesforce {
    app: Arc<AppState>,
    settings: SalesforceSettings,
    principal: Principal,
    /// Salesforce's certificate's public key (RSA-OAEP, SHA-1).
    certificate: aws_lc_rs::rsa::OaepPublicEncryptingKey,
    /// The Named Credential's secret, when one is configured.
    secret: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The Named Credential's JWTs, when it authenticates with them: their verifier and
    /// the subject they must name.
    jwt: Option<(crate::adapters::jwt::Verifier, Option<String>)>,
}

/// The claims a Salesforce JWT is checked for besides those the verifier checks.
#[derive(serde::Deserialize)]
struct JwtClaims {
    #[serde(default)]
    sub: Option<String>,
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

impl Salesforce {
    /// The endpoint for `settings`; fails when the certificate or credential do not load.
    pub fn new(app: Arc<AppState>, settings: &SalesforceSettings) -> Result<Self, SetupError> {
        let cert_error = |reason: &str| SetupError::new("salesforce.certificate", reason);
        use x509_parser::prelude::{FromDer, X509Certificate};
        let certs = crate::base::pem::load_certs(&settings.certificate)
            .map_err(|e| SetupError::new("salesforce.certificate", e))?;
        let der = certs
            .first()
            .ok_or_else(|| cert_error("no certificate in the file"))?;
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|_| cert_error("not an X.509 certificate"))?;
        let public = aws_lc_rs::rsa::PublicEncryptingKey::from_der(cert.public_key().raw)
            .map_err(|_| cert_error("not an RSA public key"))?;
        let certificate = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(public)
            .map_err(|_| cert_error("unusable RSA key"))?;
        let secret = match &settings.credential_file {
            None => None,
            Some(path) => {
                let secret = zeroize::Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| SetupError::new("salesforce.credential_file", e))?
                        .trim()
                        .as_bytes()
                        .to_vec(),
                );
                if secret.len() < 16 {
                    return Err(SetupError::new(
                        "salesforce.credential_file",
                        "the secret must be at least 16 characters",
                    ));
                }
                Some(secret)
            }
        };
        Ok(Self {
            app,
            principal: Principal::adapter(&settings.identity, &settings.tenant),
            certificate,
            secret,
            jwt: settings
                .jwt
                .as_ref()
                .map(|(s, sub)| (crate::adapters::jwt::Verifier::new(s.clone()), sub.clone())),
            settings: settings.clone(),
        })
    }

    /// Whether the callout carries every configured credential: the Named Credential's
    /// secret, and a client certificate from `client_ca` (pinned, when pins are set);
    /// otherwise what is missing, for the alert.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        presented: crate::adapters::ClientCertificate,
    ) -> Result<(), &'static str> {
        if let Some(secret) = &self.secret {
            let accepted = match &self.settings.username {
                Some(user) => basic_matches(headers, user, secret),
                None => {
                    let given = crate::adapters::bearer(headers).unwrap_or_default();
                    bool::from(subtle::ConstantTimeEq::ct_eq(
                        given.as_bytes(),
                        secret.as_slice(),
                    ))
                }
            };
            if !accepted {
                return Err("wrong credential");
            }
        }
        if let Some((verifier, subject)) = &self.jwt {
            let token = crate::adapters::bearer(headers).ok_or("no JWT")?;
            match verifier.verify_async::<JwtClaims>(&token).await {
                Ok(claims) => {
                    if subject
                        .as_ref()
                        .is_some_and(|s| claims.sub.as_ref() != Some(s))
                    {
                        return Err("JWT for another subject");
                    }
                }
                Err(crate::adapters::jwt::JwtError::KeySet(e)) => {
                    tracing::error!(error = %e, "Salesforce: the JWT signing certificate is unreadable");
                    return Err("the JWT signing certificate is unreadable");
                }
                Err(_) => return Err("JWT not accepted"),
            }
        }
        if self.settings.client_ca.is_some() {
            // The handshake verified a presented certificate against client_ca.
            let Some(fingerprint) = presented.0 else {
                return Err("no client certificate");
            };
            let pins = &self.settings.client_certificate_sha256;
            if !pins.is_empty()
                && !pins.iter().any(|pin| {
                    bool::from(subtle::ConstantTimeEq::ct_eq(&pin[..], &fingerprint[..]))
                })
            {
                return Err("client certificate not pinned");
            }
        }
        Ok(())
    }

    /// The JWE of `dek` for `kid` (and `nonce` as `jti`).
    fn jwe(&self, kid: &str, nonce: Option<&str>, dek: &[u8]) -> Result<String, &'static str> {
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
        use ring::rand::SecureRandom as _;
        let header = match nonce {
            Some(n) => json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid, "jti": n}),
            None => json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid}),
        };
        let encoded_header = B64URL.encode(header.to_string());
        let rng = ring::rand::SystemRandom::new();
        let mut cek = zeroize::Zeroizing::new([0u8; 32]);
        let mut iv = [0u8; 12];
        rng.fill(&mut cek[..]).map_err(|_| "random")?;
        rng.fill(&mut iv).map_err(|_| "random")?;
        let mut encrypted_key = vec![0u8; self.certificate.ciphertext_size()];
        let written = self
            .certificate
            .encrypt(
                &aws_lc_rs::rsa::OAEP_SHA1_MGF1SHA1,
                &cek[..],
                &mut encrypted_key,
                None,
            )
            .map_err(|_| "RSA-OAEP")?
            .len();
        encrypted_key.truncate(written);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek[..]).map_err(|_| "AES")?);
        let mut payload = dek.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(encoded_header.as_bytes()),
                &mut payload,
            )
            .map_err(|_| "AES-GCM")?;
        Ok(format!(
            "{encoded_header}.{}.{}.{}.{}",
            B64URL.encode(&encrypted_key),
            B64URL.encode(iv),
            B64URL.encode(&payload),
            B64URL.encode(tag.as_ref())
        ))
    }

    async fn callout(
        self: &Arc<Self>,
        kid: &str,
        nonce: Option<String>,
        headers: &HeaderMap,
        presented: crate::adapters::ClientCertificate,
        facts: &mut (Option<String>, Option<u32>),
    ) -> Response {
        if let Err(why) = self.authenticate(headers, presented).await {
            self.app
                .alerts
                .raise(crate::security::alert::AlertEvent::new(
                    crate::base::event::AlertKind::Denied,
                    None,
                    format!("Salesforce callout for {kid}: {why}"),
                ));
            return refuse(
                StatusCode::UNAUTHORIZED,
                "the callout's credential is not accepted",
            );
        }
        let Some(entry) = self.settings.keys.iter().find(|k| k.kid == kid).cloned() else {
            return refuse(StatusCode::NOT_FOUND, "unknown key identifier");
        };
        if nonce.as_deref().is_some_and(|n| !valid_request_id(n)) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "requestId must be 32 lowercase hex characters",
            );
        }
        facts.0 = Some(entry.key.clone());
        let me = self.clone();
        let kid_owned = kid.to_owned();
        let opened = crate::api::blocking(move || {
            let context: kms_client::api::Context =
                [(CONTEXT_KEY.to_owned(), kid_owned)].into_iter().collect();
            let mut lookups = me.app.keyring.lookups()?;
            lookups.unwrap(&me.principal, &entry.wrapped, &context)
        })
        .await;
        let dek = match opened {
            Ok(u) if u.plaintext.expose_secret().len() == KEY_LEN => {
                facts.1 = Some(u.version);
                u
            }
            Ok(_) => {
                return refuse(
                    StatusCode::CONFLICT,
                    "the configured data key is not 32 bytes",
                )
            }
            Err(Error::Sealed | Error::Storage(_)) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the key service is unavailable",
                )
            }
            Err(e) => {
                tracing::warn!(kid, error = %e, "Salesforce callout refused");
                return refuse(
                    StatusCode::FORBIDDEN,
                    "this key is not served (disabled, destroyed or not granted)",
                );
            }
        };
        match self.jwe(kid, nonce.as_deref(), dek.plaintext.expose_secret()) {
            Ok(jwe) => Json(json!({"kid": kid, "jwe": jwe})).into_response(),
            Err(what) => {
                tracing::error!(what, "Salesforce: building the JWE failed");
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the key could not be packaged",
                )
            }
        }
    }
}

/// The callout's query: replay detection's nonce, `requestId` (what Salesforce's guide
/// calls the RequestIdentifier's nonce; the parameter name as p15r/distributey reads it
/// from real orgs' callouts). Other parameters are ignored.
#[derive(serde::Deserialize)]
struct CalloutQuery {
    #[serde(default, rename = "requestId")]
    request_id: Option<String>,
}

/// Replay detection's nonce as Salesforce makes it: 32 lowercase hex characters (128 bits;
/// Security Implementation Guide, "Replay Detection for Cache-Only Keys").
fn valid_request_id(n: &str) -> bool {
    n.len() == 32 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `Authorization: Basic` carries `user` and `password` (RFC 7617), both compared
/// in constant time.
fn basic_matches(headers: &HeaderMap, user: &str, password: &[u8]) -> bool {
    let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = B64.decode(encoded.trim()) else {
        return false;
    };
    let decoded = zeroize::Zeroizing::new(decoded);
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    let (given_user, given_password) = (&decoded[..colon], &decoded[colon + 1..]);
    let user_ok = subtle::ConstantTimeEq::ct_eq(given_user, user.as_bytes());
    let password_ok = subtle::ConstantTimeEq::ct_eq(given_password, password);
    bool::from(user_ok & password_ok)
}

async fn callout(
    State(sf): State<Arc<Salesforce>>,
    Path(kid): Path<String>,
    query: Result<Query<CalloutQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    presented: Option<axum::Extension<crate::adapters::ClientCertificate>>,
) -> Response {
    let started = Instant::now();
    let mut facts = (None, None);
    let nonce = query.ok().and_then(|Query(q)| q.request_id);
    let presented = presented.map_or(crate::adapters::ClientCertificate(None), |e| e.0);
    let resp = sf
        .callout(&kid, nonce.clone(), &headers, presented, &mut facts)
        .await;
    let mut attributes = BTreeMap::new();
    attributes.insert("protocol".to_owned(), "salesforce".to_owned());
    attributes.insert("kid".to_owned(), kid.chars().take(128).collect());
    if nonce.is_some() {
        attributes.insert("nonce".to_owned(), "echoed".to_owned());
    }
    let call = crate::api::AdapterCall {
        operation: "SALESFORCE callout".to_owned(),
        route: "salesforce callout".to_owned(),
        method: "GET",
        principal: &sf.principal,
        key: facts.0,
        version: facts.1,
        attributes,
        started,
    };
    sf.app
        .finish_call(call, resp, || {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit trail is unavailable",
            )
        })
        .await
}

/// The routes of the public listener for Salesforce.
pub fn router(sf: Arc<Salesforce>) -> Router {
    Router::new()
        .route("/salesforce/{kid}", get(callout))
        .with_state(sf)
}

/// The wrapped data keys' bytes, from the configuration's base64.
pub(crate) fn decode_wrapped(s: &str) -> Option<Vec<u8>> {
    B64.decode(s.trim().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_salesforce_nonces_only() {
        // The nonce shown in Salesforce's guide ("Replay Detection for Cache-Only Keys").
        assert!(valid_request_id("e5ab58fd2ced013f2a46d5c8144dd439"));
        for bad in [
            "",
            "n-42",
            "e5ab58fd2ced013f2a46d5c8144dd43",
            "e5ab58fd2ced013f2a46d5c8144dd4390",
            "E5AB58FD2CED013F2A46D5C8144DD439",
            "e5ab58fd2ced013f2a46d5c8144dd43g",
        ] {
            assert!(!valid_request_id(bad), "{bad}");
        }
    }

    #[test]
    fn basic_auth_needs_the_user_and_the_password() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::header::AUTHORIZATION,
                value.parse().expect("header value"),
            );
            h
        };
        // RFC 7617 section 2's example: "Aladdin" / "open sesame".
        let good = with("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(basic_matches(&good, "Aladdin", b"open sesame"));
        assert!(basic_matches(
            &with("basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            "Aladdin",
            b"open sesame"
        ));
        assert!(!basic_matches(&good, "Aladdin", b"open sesame!"));
        assert!(!basic_matches(&good, "aladdin", b"open sesame"));
        assert!(!basic_matches(
            &with("Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            "Aladdin",
            b"open sesame"
        ));
        assert!(!basic_matches(
            &with("Basic !!!"),
            "Aladdin",
            b"open sesame"
        ));
        // No colon: no user id.
        let no_colon = format!("Basic {}", B64.encode("Aladdinopen sesame"));
        assert!(!basic_matches(&with(&no_colon), "Aladdin", b"open sesame"));
        assert!(!basic_matches(&HeaderMap::new(), "Aladdin", b"open sesame"));
    }
}
