//! The `[salesforce]` table: the callout credential, Salesforce's BYOK certificate, and the
//! served keys (key identifier → a Keyhold data key, wrapped).

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    /// The unique key identifier configured in Salesforce.
    kid: String,
    /// The AES-256 Keyhold key the data key was made under.
    key: String,
    /// The data key, wrapped (base64): `POST /v1/keys/{key}/datakey` with the context
    /// `{"salesforce": <kid>}`, as the Salesforce identity.
    wrapped: String,
}

/// `[salesforce.jwt]` as written: a Named Credential with JWT authentication signs a
/// fresh token per callout with a certificate of Salesforce's Certificate and Key
/// Management (RS256 or RS512; header `kid` = the certificate's unique name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    /// The JWT signing certificate, downloaded from Salesforce (PEM).
    certificate: PathBuf,
    /// Its unique name in Salesforce: the tokens' `kid`.
    key_name: String,
    /// The Named Credential's Issuer (`iss`).
    issuer: String,
    /// Its audience (`aud`).
    audience: String,
    /// Its Named Principal Subject (`sub`), when it sets one.
    #[serde(default)]
    subject: Option<String>,
}

/// `[salesforce]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSalesforce {
    tenant: String,
    identity: String,
    /// The secret the Named Credential sends, mode 600: its password with `username`
    /// (Basic auth, as a Named Credential with password authentication sends it), else a
    /// bearer token (`Authorization: Bearer`, a custom header).
    #[serde(default)]
    credential_file: Option<PathBuf>,
    /// JWT authentication of the Named Credential (instead of `credential_file`).
    #[serde(default)]
    jwt: Option<FileJwt>,
    /// The Named Credential's user name: with it, a callout must carry
    /// `Authorization: Basic base64(username ":" secret)`.
    #[serde(default)]
    username: Option<String>,
    /// CA bundle (PEM) that Salesforce's mutual-authentication client certificate chains
    /// to: with it, a callout must present such a certificate.
    #[serde(default)]
    client_ca: Option<PathBuf>,
    /// CRLs (PEM) of `client_ca`: a revoked client certificate is refused at the
    /// handshake, and an open connection of one is closed at the reload.
    #[serde(default)]
    client_crls: Vec<PathBuf>,
    /// SHA-256 fingerprints (hex) of the accepted client certificates (optional pins).
    #[serde(default)]
    client_certificate_sha256: Vec<String>,
    /// The BYOK-compatible certificate downloaded from Salesforce (PEM).
    certificate: PathBuf,
    #[serde(default)]
    keys: Vec<FileKey>,
}

/// One served key.
#[derive(Debug, Clone)]
pub struct ServedKey {
    /// Key identifier.
    pub kid: String,
    /// Keyhold key.
    pub key: String,
    /// The wrapped data key.
    pub wrapped: Vec<u8>,
}

/// `[salesforce]`, validated.
#[derive(Debug, Clone)]
pub struct SalesforceSettings {
    /// Tenant.
    pub tenant: String,
    /// Identity of the callouts (grant: `unwrap` under the context above).
    pub identity: String,
    /// The credential file (`None`: the client certificate is the credential).
    pub credential_file: Option<PathBuf>,
    /// The Basic-auth user name (`None`: the secret is a bearer token).
    pub username: Option<String>,
    /// JWT authentication: the tokens' checks, and the subject they must name.
    pub jwt: Option<(crate::adapters::jwt::JwtSettings, Option<String>)>,
    /// The client certificates' CA (`None`: no client certificate is asked for).
    pub client_ca: Option<PathBuf>,
    /// CRLs of `client_ca` (reloaded on change and SIGHUP).
    pub client_crls: Vec<PathBuf>,
    /// Pinned client certificates (SHA-256 of the DER); empty: any from `client_ca`.
    pub client_certificate_sha256: Vec<[u8; 32]>,
    /// Salesforce's certificate.
    pub certificate: PathBuf,
    /// Served keys.
    pub keys: Vec<ServedKey>,
}

impl FileJwt {
    /// Validates; errors are (dotted field under `salesforce`, message).
    fn validate(
        self,
        resolve: &impl Fn(&Path) -> PathBuf,
    ) -> Result<(crate::adapters::jwt::JwtSettings, Option<String>), (String, String)> {
        let err = |f: &str, m: &str| Err((f.to_owned(), m.to_owned()));
        let j = self;
        let certificate = resolve(&j.certificate);
        if !certificate.is_file() {
            return err(
                "jwt.certificate",
                &format!("{} is not a readable file", certificate.display()),
            );
        }
        for (f, v) in [
            ("jwt.key_name", &j.key_name),
            ("jwt.issuer", &j.issuer),
            ("jwt.audience", &j.audience),
        ] {
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                return err(f, "1 to 256 printable characters");
            }
        }
        Ok((
            crate::adapters::jwt::JwtSettings {
                issuers: vec![j.issuer],
                audiences: vec![j.audience],
                jwks: crate::adapters::jwt::JwksSource::Certificate {
                    path: certificate,
                    kid: j.key_name,
                },
                // Salesforce's tokens live 2 to 5 minutes; clocks may differ a little.
                leeway: std::time::Duration::from_secs(10),
                refresh: std::time::Duration::from_secs(3600),
            },
            j.subject,
        ))
    }
}

impl FileSalesforce {
    /// Validates; errors are (dotted field under `salesforce`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<SalesforceSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("salesforce.{f}"), m.to_owned()));
        let credential_file = self.credential_file.as_deref().map(&resolve);
        let client_ca = self.client_ca.as_deref().map(&resolve);
        let certificate = resolve(&self.certificate);
        if credential_file.is_none() && client_ca.is_none() && self.jwt.is_none() {
            return e(
                "credential_file",
                "a callout needs a credential: credential_file, jwt or client_ca (with one of the others, or alone)",
            );
        }
        if credential_file.is_some() && self.jwt.is_some() {
            return e(
                "jwt",
                "a Named Credential sends a secret or a JWT: give credential_file or jwt, not both",
            );
        }
        let jwt = match self.jwt {
            None => None,
            Some(j) => Some(
                j.validate(&resolve)
                    .map_err(|(f, m)| (format!("salesforce.{f}"), m))?,
            ),
        };
        for (f, p) in [
            ("credential_file", credential_file.as_ref()),
            ("client_ca", client_ca.as_ref()),
            ("certificate", Some(&certificate)),
        ] {
            if let Some(p) = p.filter(|p| !p.is_file()) {
                return e(f, &format!("{} is not a readable file", p.display()));
            }
        }
        if let Some(user) = &self.username {
            if credential_file.is_none() {
                return e("username", "needs credential_file (the password)");
            }
            // RFC 7617: the user id cannot contain a colon.
            if user.is_empty()
                || user.len() > 128
                || user.contains(':')
                || user.chars().any(char::is_control)
            {
                return e(
                    "username",
                    "1 to 128 printable characters without ':' (RFC 7617)",
                );
            }
        }
        let client_crls: Vec<PathBuf> = self.client_crls.iter().map(|p| resolve(p)).collect();
        if client_ca.is_none() && !client_crls.is_empty() {
            return e("client_crls", "only with client_ca");
        }
        for (i, p) in client_crls.iter().enumerate() {
            if !p.is_file() {
                return e(
                    &format!("client_crls[{i}]"),
                    &format!("{} is not a readable file", p.display()),
                );
            }
        }
        if client_ca.is_none() && !self.client_certificate_sha256.is_empty() {
            return e("client_certificate_sha256", "only with client_ca");
        }
        let pins = pins(&self.client_certificate_sha256)
            .map_err(|(f, m)| (format!("salesforce.{f}"), m))?;
        if self.tenant.is_empty() || self.identity.is_empty() {
            return e("tenant", "tenant and identity are required");
        }
        let mut keys: Vec<ServedKey> = Vec::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            let valid = !k.kid.is_empty()
                && k.kid.len() <= 128
                && k.kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid {
                return e(
                    &format!("keys[{i}].kid"),
                    "1 to 128 letters, digits, '-', '_', '.'",
                );
            }
            if keys.iter().any(|s| s.kid == k.kid) {
                return e(&format!("keys[{i}].kid"), "used twice");
            }
            let Some(wrapped) = super::decode_wrapped(&k.wrapped) else {
                return e(&format!("keys[{i}].wrapped"), "not base64");
            };
            keys.push(ServedKey {
                kid: k.kid,
                key: k.key,
                wrapped,
            });
        }
        Ok(SalesforceSettings {
            tenant: self.tenant,
            identity: self.identity,
            credential_file,
            username: self.username,
            jwt,
            client_ca,
            client_crls,
            client_certificate_sha256: pins,
            certificate,
            keys,
        })
    }
}

/// `client_certificate_sha256`: SHA-256 fingerprints, 64 hex digits each (colons allowed).
fn pins(hexes: &[String]) -> Result<Vec<[u8; 32]>, (String, String)> {
    hexes
        .iter()
        .enumerate()
        .map(|(i, hex)| {
            crate::crypto::seal::unhex(&hex.replace(':', "").to_ascii_lowercase())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    (
                        format!("client_certificate_sha256[{i}]"),
                        "64 hex digits (colons allowed)".to_owned(),
                    )
                })
        })
        .collect()
}
