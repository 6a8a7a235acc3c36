//! The `[cse]` table: Google Workspace client-side encryption on the public listener
//! (`/cse`): this KACLS's URL, the token issuers (Google's authorization tokens, the
//! customer's IdP's authentication tokens), the Keyhold key that wraps, and the guest and
//! perimeter rules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::adapters::jwt::{JwksSource, JwtSettings};

/// The audience of Google's authorization tokens.
pub const AUTHZ_AUDIENCE: &str = "cse-authorization";

fn default_leeway() -> u64 {
    300
}

/// The audience of a KACLS-to-KACLS migration token (Google's KACLS reference,
/// "Authentication tokens": "KACLS authentication token for PrivilegedUnwrap").
pub const MIGRATION_AUDIENCE: &str = "kacls-migration";

/// The two forms of Google's ID-token issuer.
const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];

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
    /// Users (authentication token email) allowed the privileged operations.
    #[serde(default)]
    privileged_users: Vec<String>,
    /// This KACLS's signing key (RSA, PKCS#8 PEM, mode 600): `/certs` publishes its public
    /// half, and `rewrap` signs its KACLS-to-KACLS tokens with it.
    #[serde(default)]
    signing_key: Option<PathBuf>,
    /// Key services whose keys `rewrap` may migrate from (their KACLS URLs).
    #[serde(default)]
    migration_sources: Vec<String>,
    /// The CA bundle those services' certificates chain to (default: the system's).
    #[serde(default)]
    migration_ca: Option<PathBuf>,
    /// Key services allowed to migrate keys away from here (`privilegedunwrap` with their
    /// KACLS-to-KACLS tokens): their URL (the tokens' issuer) and key set (their `/certs`).
    #[serde(default)]
    migration_peers: Vec<FileIssuer>,
    /// The Google Workspace domain that owns this KACLS: an authorization token that
    /// carries `kacls_owner_domain` must name it (unset: the claim is not checked).
    #[serde(default)]
    owner_domain: Option<String>,
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
    /// Users allowed the privileged operations, lower-cased.
    pub privileged_users: Vec<String>,
    /// The signing key file.
    pub signing_key: Option<PathBuf>,
    /// Where `rewrap` may migrate from.
    pub migration_sources: Vec<String>,
    /// Their CA bundle.
    pub migration_ca: Option<PathBuf>,
    /// Who may migrate away from here (audience: our `kacls_url`).
    pub migration_peers: Vec<JwtSettings>,
    /// The Google Workspace domain that owns this KACLS, lower-cased.
    pub owner_domain: Option<String>,
}

impl FileCse {
    /// Validates; errors are (dotted field under `cse`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<CseSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("cse.{f}"), m.to_owned()));
        let Some(kacls_url) = crate::adapters::service_url(&self.kacls_url) else {
            return e("kacls_url", "must be this KACLS's https:// URL");
        };
        if self.tenant.is_empty() || self.identity.is_empty() || self.key.is_empty() {
            return e("tenant", "tenant, identity and key are required");
        }
        let leeway = Duration::from_secs(self.leeway_secs);
        // `audience`: Google's fixed one (authorization), required (authentication), or
        // `kacls-migration` (migration peers).
        let issuers = |list: Vec<FileIssuer>, field: &str, kind: u8| {
            if list.is_empty() && kind != 2 {
                return Err((format!("cse.{field}"), "at least one issuer".to_owned()));
            }
            let mut out = Vec::new();
            for (i, f) in list.into_iter().enumerate() {
                let at = |m: &str| (format!("cse.{field}[{i}]"), m.to_owned());
                let jwks = JwksSource::from_config(&f.jwks, f.jwks_ca.as_deref(), &resolve)
                    .map_err(|m| at(&format!("jwks: {m}")))?;
                let audience = match (kind, f.audience) {
                    (0, None) => AUTHZ_AUDIENCE.to_owned(),
                    (2, None) => MIGRATION_AUDIENCE.to_owned(),
                    (0 | 2, Some(_)) => return Err(at("audience: fixed, not configurable")),
                    (_, Some(a)) if !a.is_empty() => a,
                    (_, _) => return Err(at("audience is required")),
                };
                if f.issuer.is_empty() {
                    return Err(at("issuer is required"));
                }
                // Google ID tokens carry either form of Google's issuer (Google Identity,
                // "Verify the Google ID token"): one entry accepts both.
                let issuers = if GOOGLE_ISSUERS.contains(&f.issuer.as_str()) {
                    GOOGLE_ISSUERS.iter().map(|i| (*i).to_owned()).collect()
                } else {
                    vec![f.issuer]
                };
                out.push(JwtSettings {
                    issuers,
                    audiences: vec![audience],
                    jwks,
                    leeway,
                    refresh: Duration::from_secs(3600),
                });
            }
            Ok(out)
        };
        let signing_key = self.signing_key.as_deref().map(&resolve);
        if let Some(p) = &signing_key {
            if !p.is_file() {
                return e(
                    "signing_key",
                    &format!("{} is not a readable file", p.display()),
                );
            }
        }
        if self
            .migration_sources
            .iter()
            .any(|u| !u.starts_with("https://"))
        {
            return e("migration_sources", "https:// URLs only");
        }
        if !self.migration_sources.is_empty() && signing_key.is_none() {
            return e(
                "signing_key",
                "rewrap (migration_sources) needs a signing key",
            );
        }
        Ok(CseSettings {
            authorization: issuers(self.authorization, "authorization", 0)?,
            authentication: issuers(self.authentication, "authentication", 1)?,
            migration_peers: issuers(self.migration_peers, "migration_peers", 2)?,
            privileged_users: self
                .privileged_users
                .iter()
                .map(|u| u.to_lowercase())
                .collect(),
            signing_key,
            migration_sources: self
                .migration_sources
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            migration_ca: self.migration_ca.as_deref().map(&resolve),
            kacls_url,
            tenant: self.tenant,
            identity: self.identity,
            key: self.key,
            allow_guests: self.allow_guests,
            perimeters: self.perimeters,
            owner_domain: self.owner_domain.map(|d| d.to_lowercase()),
        })
    }
}
