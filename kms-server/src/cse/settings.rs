//! The `[cse]` table: Google Workspace client-side encryption on the public listener
//! (`/cse`): this KACLS's URL, the token issuers (Google's authorization tokens, the
//! customer's IdP's authentication tokens), the Keyhold key that wraps, and the guest and
//! perimeter rules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::jwt::{JwksSource, JwtSettings};

/// The audience of Google's authorization tokens.
pub const AUTHZ_AUDIENCE: &str = "cse-authorization";

fn default_leeway() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIssuer {
    issuer: String,
    /// A file, or an `https://` URL.
    jwks: String,
    #[serde(default)]
    jwks_ca: Option<PathBuf>,
    /// Authentication issuers only: the audience their tokens carry.
    #[serde(default)]
    audience: Option<String>,
}

/// `[cse]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileCse {
    /// This KACLS's URL, as configured in the Google admin console: every authorization
    /// token's `kacls_url` must equal it.
    kacls_url: String,
    tenant: String,
    identity: String,
    /// The AES-256 Keyhold key that wraps.
    key: String,
    #[serde(default)]
    authorization: Vec<FileIssuer>,
    #[serde(default)]
    authentication: Vec<FileIssuer>,
    /// Accept `google-visitor` and `customer-idp` email types (guest access).
    #[serde(default)]
    allow_guests: bool,
    /// Perimeter ids allowed (besides the empty one); empty: any.
    #[serde(default)]
    perimeters: Vec<String>,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
}

/// `[cse]`, validated.
#[derive(Debug, Clone)]
pub struct CseSettings {
    /// Our URL, without a trailing slash.
    pub kacls_url: String,
    /// Tenant of the key.
    pub tenant: String,
    /// Identity of the CSE calls (its grants: `wrap`, `unwrap`).
    pub identity: String,
    /// The wrapping key.
    pub key: String,
    /// Google's authorization token issuers.
    pub authorization: Vec<JwtSettings>,
    /// The IdP's authentication token issuers.
    pub authentication: Vec<JwtSettings>,
    /// Guest access.
    pub allow_guests: bool,
    /// Allowed perimeter ids (empty: any).
    pub perimeters: Vec<String>,
}

impl FileCse {
    /// Validates; errors are (dotted field under `cse`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<CseSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("cse.{f}"), m.to_owned()));
        let kacls_url = self.kacls_url.trim_end_matches('/').to_owned();
        if !kacls_url.starts_with("https://") || kacls_url.len() <= "https://".len() {
            return e("kacls_url", "must be this KACLS's https:// URL");
        }
        if self.tenant.is_empty() || self.identity.is_empty() || self.key.is_empty() {
            return e("tenant", "tenant, identity and key are required");
        }
        let leeway = Duration::from_secs(self.leeway_secs);
        let issuers = |list: Vec<FileIssuer>, field: &str, authz: bool| {
            if list.is_empty() {
                return Err((format!("cse.{field}"), "at least one issuer".to_owned()));
            }
            let mut out = Vec::new();
            for (i, f) in list.into_iter().enumerate() {
                let at = |m: &str| (format!("cse.{field}[{i}]"), m.to_owned());
                let jwks = if f.jwks.starts_with("https://") {
                    JwksSource::Url {
                        url: f.jwks,
                        ca: f.jwks_ca.as_deref().map(&resolve),
                    }
                } else if f.jwks.contains("://") {
                    return Err(at("jwks: a file, or an https:// URL"));
                } else {
                    let p = resolve(Path::new(&f.jwks));
                    if !p.is_file() {
                        return Err(at(&format!("jwks: {} is not a readable file", p.display())));
                    }
                    JwksSource::File(p)
                };
                let audience = match (authz, f.audience) {
                    (true, None) => AUTHZ_AUDIENCE.to_owned(),
                    (true, Some(_)) => return Err(at("audience: Google's is fixed")),
                    (false, Some(a)) if !a.is_empty() => a,
                    (false, _) => return Err(at("audience is required")),
                };
                if f.issuer.is_empty() {
                    return Err(at("issuer is required"));
                }
                out.push(JwtSettings {
                    issuers: vec![f.issuer],
                    audiences: vec![audience],
                    jwks,
                    leeway,
                    refresh: Duration::from_secs(3600),
                });
            }
            Ok(out)
        };
        Ok(CseSettings {
            authorization: issuers(self.authorization, "authorization", true)?,
            authentication: issuers(self.authentication, "authentication", false)?,
            kacls_url,
            tenant: self.tenant,
            identity: self.identity,
            key: self.key,
            allow_guests: self.allow_guests,
            perimeters: self.perimeters,
        })
    }
}
