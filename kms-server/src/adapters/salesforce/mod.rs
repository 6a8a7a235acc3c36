//! Salesforce Shield Platform Encryption cache-only keys (issue 12; `docs/salesforce.md`):
//! Salesforce's callout fetches a data key by its key identifier from Keyhold, on the public
//! listener ([`crate::app::public`]) under `/salesforce`, and keeps it only in its cache.
//!
//! `GET /salesforce/{kid}[?nonce=...]` with the configured credentials (`Authorization:
//! Bearer <secret>`, compared in constant time, and/or, with `client_ca`, a client
//! certificate from that CA, optionally pinned by SHA-256; the public listener then asks
//! every client for a certificate but lets those without one through to the routes that
//! do not need one) answers `{"kid", "jwe"}`: the 32-byte
//! data key in a JWE compact serialization, protected header exactly
//! `{"alg":"RSA-OAEP","enc":"A256GCM","kid":<kid>}` (plus `"jti":<nonce>` when the
//! callout sends one, for replay detection), the content key wrapped with RSAES-OAEP
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
            settings: settings.clone(),
        })
    }

    /// Whether the callout carries every configured credential: the Named Credential's
    /// secret, and a client certificate from `client_ca` (pinned, when pins are set);
    /// otherwise what is missing, for the alert.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        presented: crate::adapters::ClientCertificate,
    ) -> Result<(), &'static str> {
        if let Some(secret) = &self.secret {
            let given = crate::adapters::bearer(headers).unwrap_or_default();
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                given.as_bytes(),
                secret.as_slice(),
            )) {
                return Err("wrong credential");
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
        if let Err(why) = self.authenticate(headers, presented) {
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
        if nonce
            .as_ref()
            .is_some_and(|n| n.len() > 256 || n.chars().any(char::is_control))
        {
            return refuse(StatusCode::BAD_REQUEST, "bad nonce");
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

#[derive(serde::Deserialize)]
struct CalloutQuery {
    #[serde(default)]
    nonce: Option<String>,
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
    let nonce = query.ok().and_then(|Query(q)| q.nonce);
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
