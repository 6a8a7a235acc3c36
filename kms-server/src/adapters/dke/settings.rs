//! The `[dke]` table: the token issuer (Microsoft Entra ID, or a test issuer), and which
//! Keyhold keys serve which DKE key names, for whom. DKE is served on the public listener
//! (`[public]`, [`crate::app::public`]) under `/dke`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::adapters::jwt::{JwksSource, JwtSettings};

/// Where Office clients get a token when they have none (the challenge's `authorization`).
pub const ENTRA_AUTHORIZE: &str = "https://login.windows.net/common/oauth2/authorize";

fn default_mount() -> String {
    "/dke".to_owned()
}
fn default_leeway() -> u64 {
    300
}
fn default_refresh() -> u64 {
    3600
}
fn default_cache() -> u64 {
    86_400
}
fn default_authorize() -> String {
    ENTRA_AUTHORIZE.to_owned()
}

/// `[dke]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileDke {
    /// The service's own URL (`https://dke.example.com`): the tokens' audience, the
    /// challenge's `resource` and `realm`, and the base of every key's `kid`.
    url: String,
    /// Where the DKE routes are mounted on the public listener: `/dke` (the default), or
    /// `/` for the key URL at the root of its host, as Microsoft's deployment checklist
    /// asks (`https://<host>/<key name>`, the sample service's routes).
    #[serde(default = "default_mount")]
    mount: String,
    /// The host name this protocol is served on, alone (SNI and `Host`): another protocol
    /// can then sit at the root of another name on the same listener. Unset: every host
    /// name the listener answers to.
    #[serde(default)]
    host: Option<String>,
    issuers: Vec<String>,
    /// A file, or an `https://` URL.
    jwks: String,
    #[serde(default)]
    jwks_ca: Option<PathBuf>,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
    #[serde(default = "default_refresh")]
    jwks_refresh_secs: u64,
    /// How long clients may cache a public key (`cache.exp`); 0: no `cache` (clients
    /// fetch the key for every encryption).
    #[serde(default = "default_cache")]
    key_cache_secs: u64,
    #[serde(default = "default_authorize")]
    authorization_url: String,
    /// The Keyhold tenant of the keys, and the identity whose grants DKE calls use
    /// (`wrap` to publish a key, `unwrap` to decrypt with it).
    tenant: String,
    identity: String,
    #[serde(default)]
    keys: Vec<FileKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    /// The DKE key name (the URL's first segment).
    name: String,
    /// The Keyhold key (an RSA key of `tenant`).
    key: String,
    /// Users allowed to decrypt, by `email` or `upn` claim (compared case-insensitively).
    #[serde(default)]
    emails: Vec<String>,
    /// Directory groups or roles allowed (`groups` or `roles` claim).
    #[serde(default)]
    groups: Vec<String>,
}

/// One DKE key name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMapping {
    /// DKE key name.
    pub name: String,
    /// Keyhold key name.
    pub key: String,
    /// Allowed users, lower-cased.
    pub emails: Vec<String>,
    /// Allowed groups or roles.
    pub groups: Vec<String>,
}

/// `[dke]`, validated.
#[derive(Debug, Clone)]
pub struct DkeSettings {
    /// The service URL, without a trailing slash.
    pub url: String,
    /// Where the routes are mounted (`/dke`, or `/`).
    pub mount: String,
    /// The host name it is served on alone (None: every host name of the listener).
    pub host: Option<String>,
    /// Token checks.
    pub jwt: JwtSettings,
    /// `cache.exp` distance (None: no `cache`).
    pub key_cache: Option<Duration>,
    /// The challenge's `authorization`.
    pub authorization_url: String,
    /// Tenant of the keys.
    pub tenant: String,
    /// Identity of the DKE calls.
    pub identity: String,
    /// The keys, by DKE name.
    pub keys: Vec<KeyMapping>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FileDke {
    /// Validates into [`DkeSettings`]; errors are (dotted field under `dke`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<DkeSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("dke.{f}"), m.to_owned()));
        let Some(url) = crate::adapters::service_url(&self.url) else {
            return e("url", "must be the service's https:// URL");
        };
        if !crate::adapters::valid_mount(&self.mount) {
            return e(
                "mount",
                "\"/\" (the key URL at the root of its host) or /segments of A-Z a-z 0-9 . _ -",
            );
        }
        let host = match self.host.as_deref().map(crate::adapters::valid_host) {
            None => None,
            Some(Some(h)) => Some(h),
            Some(None) => {
                return e(
                    "host",
                    "a DNS host name (dke.example.com), no port or scheme",
                )
            }
        };
        if self.issuers.is_empty() || self.issuers.iter().any(String::is_empty) {
            return e("issuers", "at least one token issuer (`iss`)");
        }
        let jwks = match JwksSource::from_config(&self.jwks, self.jwks_ca.as_deref(), &resolve) {
            Ok(j) => j,
            Err(m) => return e("jwks", &m),
        };
        if self.tenant.is_empty() || self.identity.is_empty() {
            return e("tenant", "tenant and identity are required");
        }
        let mut keys: Vec<KeyMapping> = Vec::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            if !valid_name(&k.name) {
                return e(
                    &format!("keys[{i}].name"),
                    "1 to 64 letters, digits, '-' or '_'",
                );
            }
            if keys.iter().any(|m| m.name == k.name) {
                return e(&format!("keys[{i}].name"), "used twice");
            }
            if k.emails.is_empty() && k.groups.is_empty() {
                return e(
                    &format!("keys[{i}]"),
                    "needs emails or groups: nobody could decrypt",
                );
            }
            keys.push(KeyMapping {
                name: k.name,
                key: k.key,
                emails: k.emails.iter().map(|m| m.to_lowercase()).collect(),
                groups: k.groups,
            });
        }
        Ok(DkeSettings {
            jwt: JwtSettings {
                issuers: self.issuers,
                audiences: vec![url.clone(), format!("{url}/")],
                jwks,
                leeway: Duration::from_secs(self.leeway_secs),
                refresh: Duration::from_secs(self.jwks_refresh_secs.max(60)),
            },
            url,
            mount: self.mount,
            host,
            key_cache: (self.key_cache_secs > 0).then(|| Duration::from_secs(self.key_cache_secs)),
            authorization_url: self.authorization_url,
            tenant: self.tenant,
            identity: self.identity,
            keys,
        })
    }
}
