//! The `[ekm]` table: Google Cloud External Key Manager on the public listener (`/ekm`):
//! the service URL Cloud KMS calls (the tokens' audience), the token issuer, and per key
//! path the Keyhold key, the callers allowed and the Key Access Justification policy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::adapters::jwt::{JwksSource, JwtSettings};

/// The justification reasons Cloud KMS sends (`accessReasonContext.reason`), in the order
/// of the `AccessReasonContext.Reason` enum (index = its number; Google's KMS client
/// libraries, `AccessReason`; 8 and 9 deprecated but still valid).
pub const REASONS: &[&str] = &[
    "REASON_UNSPECIFIED",
    "CUSTOMER_INITIATED_SUPPORT",
    "GOOGLE_INITIATED_SERVICE",
    "THIRD_PARTY_DATA_REQUEST",
    "GOOGLE_INITIATED_REVIEW",
    "CUSTOMER_INITIATED_ACCESS",
    "GOOGLE_INITIATED_SYSTEM_OPERATION",
    "REASON_NOT_EXPECTED",
    "MODIFIED_CUSTOMER_INITIATED_ACCESS",
    "MODIFIED_GOOGLE_INITIATED_SYSTEM_OPERATION",
    "GOOGLE_RESPONSE_TO_PRODUCTION_ALERT",
    "CUSTOMER_AUTHORIZED_WORKFLOW_SERVICING",
];

/// Google ID tokens carry either form of the issuer (Google Identity, "Verify the Google ID
/// token").
fn default_issuers() -> Vec<String> {
    vec![
        "https://accounts.google.com".to_owned(),
        "accounts.google.com".to_owned(),
    ]
}
fn default_mount() -> String {
    "/ekm".to_owned()
}
fn default_leeway() -> u64 {
    300
}
fn default_cache() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    /// The key path Cloud KMS calls with (`v0/my/key`: the EkmConnection key path, or the
    /// path of the external key URI after this service's URL).
    path: String,
    /// The AES-256 Keyhold key.
    key: String,
    /// Callers allowed (the token's `email`: Cloud KMS's service agent of a project).
    callers: Vec<String>,
    /// Justifications allowed; empty: every reason.
    #[serde(default)]
    allowed_reasons: Vec<String>,
    /// Whether a request without a justification is allowed.
    #[serde(default)]
    allow_missing_reason: bool,
    /// `allowedCacheDuration` answered with unwrap (seconds).
    #[serde(default = "default_cache")]
    cache_secs: u64,
}

/// `[ekm]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileEkm {
    /// This service's URL as Cloud KMS calls it: the tokens' audience.
    url: String,
    /// Where the EKM routes are mounted on the public listener: `/ekm` (the default), or
    /// `/` for an EkmConnection over a VPC, which calls `https://<hostname>/<key path>`
    /// from the root (GoogleCloudPlatform/stet, `client/vpc/vpc.go`).
    #[serde(default = "default_mount")]
    mount: String,
    /// The host name this protocol is served on, alone (SNI and `Host`): another protocol
    /// can then sit at the root of another name on the same listener. Unset: every host
    /// name the listener answers to.
    #[serde(default)]
    host: Option<String>,
    #[serde(default = "default_issuers")]
    issuers: Vec<String>,
    /// A file, or an `https://` URL (Google's: `https://www.googleapis.com/oauth2/v3/certs`).
    jwks: String,
    #[serde(default)]
    jwks_ca: Option<PathBuf>,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
    tenant: String,
    identity: String,
    #[serde(default)]
    keys: Vec<FileKey>,
}

/// One key path.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    /// Key path.
    pub path: String,
    /// Keyhold key.
    pub key: String,
    /// Allowed callers, lower-cased.
    pub callers: Vec<String>,
    /// Allowed reasons (empty: all).
    pub allowed_reasons: Vec<String>,
    /// Missing reason allowed.
    pub allow_missing_reason: bool,
    /// `allowedCacheDuration`.
    pub cache: Duration,
}

/// `[ekm]`, validated.
#[derive(Debug, Clone)]
pub struct EkmSettings {
    /// Token checks (audience: the service URL).
    pub jwt: JwtSettings,
    /// Tenant of the keys.
    pub tenant: String,
    /// Identity of the calls (grants: `wrap`, `unwrap`).
    pub identity: String,
    /// Key paths.
    pub keys: Vec<KeyPolicy>,
    /// Where the routes are mounted (`/ekm`, or `/`).
    pub mount: String,
    /// The host name it is served on alone (None: every host name of the listener).
    pub host: Option<String>,
}

impl FileEkm {
    /// Validates; errors are (dotted field under `ekm`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<EkmSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("ekm.{f}"), m.to_owned()));
        let Some(url) = crate::adapters::service_url(&self.url) else {
            return e("url", "must be this service's https:// URL");
        };
        if !crate::adapters::valid_mount(&self.mount) {
            return e(
                "mount",
                "\"/\" (the root, as Cloud EKM over a VPC calls) or /segments of A-Z a-z 0-9 . _ -",
            );
        }
        let host = match self.host.as_deref().map(crate::adapters::valid_host) {
            None => None,
            Some(Some(h)) => Some(h),
            Some(None) => {
                return e(
                    "host",
                    "a DNS host name (ekm.example.com), no port or scheme",
                )
            }
        };
        let jwks = match JwksSource::from_config(&self.jwks, self.jwks_ca.as_deref(), &resolve) {
            Ok(j) => j,
            Err(m) => return e("jwks", &m),
        };
        if self.tenant.is_empty() || self.identity.is_empty() {
            return e("tenant", "tenant and identity are required");
        }
        let mut keys: Vec<KeyPolicy> = Vec::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            let at = |f: &str| format!("keys[{i}]{f}");
            let path = k.path.trim_matches('/').to_owned();
            if path.is_empty()
                || path.contains(':')
                || path
                    .split('/')
                    .any(|seg| seg.is_empty() || seg == "." || seg == "..")
            {
                return e(
                    &at(".path"),
                    "segments of letters, digits, '-', '_', '.' joined by '/'",
                );
            }
            if keys.iter().any(|p| p.path == path) {
                return e(&at(".path"), "used twice");
            }
            if k.callers.is_empty() {
                return e(
                    &at(".callers"),
                    "at least one caller (a service agent's email)",
                );
            }
            if let Some(r) = k
                .allowed_reasons
                .iter()
                .find(|r| !REASONS.contains(&r.as_str()))
            {
                return e(&at(".allowed_reasons"), &format!("unknown reason {r}"));
            }
            keys.push(KeyPolicy {
                path,
                key: k.key,
                callers: k.callers.iter().map(|c| c.to_lowercase()).collect(),
                allowed_reasons: k.allowed_reasons,
                allow_missing_reason: k.allow_missing_reason,
                cache: Duration::from_secs(k.cache_secs),
            });
        }
        Ok(EkmSettings {
            jwt: JwtSettings {
                issuers: self.issuers,
                // Cloud EKM's token audience is the origin, `https://<host>`, without the
                // path or port (GoogleCloudPlatform/stet, client/jwt/jwt.go); the URL itself
                // stays accepted.
                audiences: {
                    let mut a = origin(&url).into_iter().collect::<Vec<_>>();
                    for u in [url.clone(), format!("{url}/")] {
                        if !a.contains(&u) {
                            a.push(u);
                        }
                    }
                    a
                },
                jwks,
                leeway: Duration::from_secs(self.leeway_secs),
                refresh: Duration::from_secs(3600),
            },
            tenant: self.tenant,
            identity: self.identity,
            keys,
            mount: self.mount,
            host,
        })
    }
}

/// `scheme://host` of a URL: no user info, port or path.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = match host_port.strip_prefix('[') {
        // An IPv6 literal keeps its brackets.
        Some(v6) => format!("[{}]", v6.split(']').next()?),
        None => host_port.split(':').next()?.to_owned(),
    };
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audience_is_the_origin() {
        for (url, want) in [
            ("https://ekm.example.com/ekm", "https://ekm.example.com"),
            (
                "https://ekm.example.com:8443/ekm/",
                "https://ekm.example.com",
            ),
            ("https://ekm.example.com", "https://ekm.example.com"),
            (
                "https://u@ekm.example.com:1/x?y#z",
                "https://ekm.example.com",
            ),
            ("https://[2001:db8::1]:8443/ekm", "https://[2001:db8::1]"),
        ] {
            assert_eq!(origin(url).as_deref(), Some(want), "{url}");
        }
        assert_eq!(origin("no scheme"), None);
    }

    #[test]
    fn reasons_are_in_the_enums_order() {
        assert_eq!(REASONS.len(), 12);
        assert_eq!(REASONS[5], "CUSTOMER_INITIATED_ACCESS");
        assert_eq!(REASONS[8], "MODIFIED_CUSTOMER_INITIATED_ACCESS");
        assert_eq!(REASONS[11], "CUSTOMER_AUTHORIZED_WORKFLOW_SERVICING");
    }
}
