//! The `[xks]` table of the configuration: the XKS listener, and one `[[xks.stores]]` per
//! logical key store (a URI prefix with its own region, tenant, credentials, rate and
//! mapped keys). Parsed with the rest of the file by [`crate::app::config::Settings::parse`],
//! which reports errors with the file and the dotted field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The path every XKS URI carries after its prefix.
pub const API_ROOT: &str = "/kms/xks/v1";
/// The longest `XksProxyUriPath` AWS accepts (`<prefix>/kms/xks/v1`).
pub const MAX_URI_PATH: usize = 128;
/// The longest external key id.
pub const MAX_EXTERNAL_ID: usize = 128;
/// The AWS default quota of one external key store, requests per second.
pub const AWS_DEFAULT_QUOTA: u32 = 1800;

fn default_fleet() -> u32 {
    1
}
fn default_health_cache() -> u64 {
    10
}
fn default_skew() -> u64 {
    300
}
fn default_poll() -> u64 {
    2
}
fn default_rate() -> u32 {
    2 * AWS_DEFAULT_QUOTA
}

/// `[xks]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileXks {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_subject: Option<String>,
    #[serde(default = "default_fleet")]
    fleet_size: u32,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default = "default_health_cache")]
    health_cache_secs: u64,
    #[serde(default = "default_skew")]
    max_skew_secs: u64,
    #[serde(default = "default_poll")]
    credentials_poll_secs: u64,
    #[serde(default)]
    stores: Vec<FileStore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    name: String,
    #[serde(default)]
    prefix: String,
    region: String,
    tenant: String,
    #[serde(default)]
    identity: Option<String>,
    credentials: PathBuf,
    #[serde(default = "default_rate")]
    rate_limit: u32,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    keys: Vec<FileKeyMap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyMap {
    external_id: String,
    key: String,
    #[serde(default)]
    rules: Vec<Rule>,
}

/// One secondary-authorization rule of a mapped key: a request is allowed when every
/// list the rule has matches (an absent list matches anything). Patterns may hold `*`
/// (any run of characters); everything else matches exactly.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Named in the audit record of every request it decides.
    pub name: String,
    /// `awsPrincipalArn` patterns.
    #[serde(default)]
    pub principals: Option<Vec<String>>,
    /// `kmsOperation` values (`Encrypt`, `Decrypt`, `GenerateDataKey`, `ReEncrypt`,
    /// `DescribeKey`, `CreateKey`, ...), patterns allowed.
    #[serde(default)]
    pub operations: Option<Vec<String>>,
    /// `kmsViaService` values (`s3`, `ebs`, ...); a request without one does not match.
    #[serde(default)]
    pub via_services: Option<Vec<String>>,
    /// `awsSourceVpc` values; a request without one does not match.
    #[serde(default)]
    pub source_vpcs: Option<Vec<String>>,
    /// `awsSourceVpce` values; a request without one does not match.
    #[serde(default)]
    pub vpc_endpoints: Option<Vec<String>>,
}

/// The XKS listener and its key stores, validated.
#[derive(Debug, Clone)]
pub struct XksSettings {
    /// Listener address.
    pub listen: SocketAddr,
    /// Server certificate chain (for AWS: issued by a public CA for the proxy's FQDN).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// mTLS: the CA bundle client certificates must chain to (`None`: no client
    /// certificate asked for; SigV4 alone authenticates).
    pub client_ca: Option<PathBuf>,
    /// mTLS: the subject common name the client certificate must carry
    /// (`cks.kms.<region>.amazonaws.com`); a mismatch ends the handshake.
    pub client_subject: Option<String>,
    /// `xksProxyFleetSize` reported by health.
    pub fleet_size: u32,
    /// This node's id in `ekmFleetDetails`.
    pub node_id: String,
    /// How long a deep health result is reused (at most 60 s).
    pub health_cache: Duration,
    /// How far `X-Amz-Date` may be from now.
    pub max_skew: Duration,
    /// How often credential files are checked for change (`None`: SIGHUP only).
    pub credentials_poll: Option<Duration>,
    /// The key stores.
    pub stores: Vec<StoreSettings>,
}

/// One logical key store.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Its name (logs, metrics, default identity).
    pub name: String,
    /// The URI prefix before `/kms/xks/v1` (`""` or `/a/b`).
    pub prefix: String,
    /// The AWS region of the KMS that calls it (the SigV4 scope's region).
    pub region: String,
    /// The Keyhold tenant whose keys it maps.
    pub tenant: String,
    /// The identity its requests act as: grants on the mapped keys name it.
    pub identity: String,
    /// The credentials file (re-read on change and on SIGHUP).
    pub credentials: PathBuf,
    /// Requests per second allowed (token bucket).
    pub rate_limit: u32,
    /// Bucket size.
    pub burst: u32,
    /// External key id → mapped key.
    pub keys: Vec<KeyMapping>,
}

/// One external key id and the Keyhold key behind it.
#[derive(Debug, Clone)]
pub struct KeyMapping {
    /// The id AWS knows.
    pub external_id: String,
    /// The Keyhold key name (in the store's tenant).
    pub key: String,
    /// Secondary authorization; empty: every request that passed SigV4 is allowed.
    pub rules: Vec<Rule>,
}

fn is_prefix_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-')
}

/// Whether `id` is a valid external key id: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn valid_external_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_EXTERNAL_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl FileXks {
    /// Validates into [`XksSettings`]; `resolve` makes relative paths absolute; errors are
    /// (dotted field under `xks`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<XksSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("xks.{f}"), m.to_owned()));
        let listen: SocketAddr = match self.listen.parse() {
            Ok(a) => a,
            Err(_) => return e("listen", "must be host:port"),
        };
        let (cert, key) = (resolve(&self.cert), resolve(&self.key));
        for (f, p) in [("cert", &cert), ("key", &key)] {
            if !p.is_file() {
                return e(f, &format!("{} is not a readable file", p.display()));
            }
        }
        let client_ca = self.client_ca.as_deref().map(&resolve);
        if let Some(p) = &client_ca {
            if !p.is_file() {
                return e(
                    "client_ca",
                    &format!("{} is not a readable file", p.display()),
                );
            }
        }
        if let Some(s) = &self.client_subject {
            if client_ca.is_none() {
                return e(
                    "client_subject",
                    "needs client_ca (the CA the subject's certificate chains to)",
                );
            }
            if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
                return e("client_subject", "must be 1 to 256 printable characters");
            }
        }
        if self.fleet_size == 0 || self.fleet_size > 1000 {
            return e("fleet_size", "must be 1 to 1000");
        }
        if !(1..=60).contains(&self.health_cache_secs) {
            return e("health_cache_secs", "must be 1 to 60 (the specification allows a cached health result of at most a minute)");
        }
        if !(1..=300).contains(&self.max_skew_secs) {
            return e("max_skew_secs", "must be 1 to 300");
        }
        if self.credentials_poll_secs > 3600 {
            return e("credentials_poll_secs", "must be 0 (SIGHUP only) to 3600");
        }
        let node_id = match self.node_id {
            Some(n)
                if !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_graphic()) =>
            {
                n
            }
            Some(_) => return e("node_id", "must be 1 to 64 printable ASCII characters"),
            None => crate::base::process::hostname(),
        };
        if self.stores.is_empty() {
            return e("stores", "name at least one [[xks.stores]]");
        }
        let mut seen = Seen::default();
        let stores = self
            .stores
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.validate(i, &resolve, &mut seen))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(XksSettings {
            listen,
            cert,
            key,
            client_ca,
            client_subject: self.client_subject,
            fleet_size: self.fleet_size,
            node_id,
            health_cache: Duration::from_secs(self.health_cache_secs),
            max_skew: Duration::from_secs(self.max_skew_secs),
            credentials_poll: (self.credentials_poll_secs > 0)
                .then(|| Duration::from_secs(self.credentials_poll_secs)),
            stores,
        })
    }
}

/// Names, prefixes and identities already used by the stores before: each must be unique.
#[derive(Default)]
struct Seen {
    names: HashSet<String>,
    prefixes: HashSet<String>,
    identities: HashSet<String>,
}

impl FileStore {
    /// One `[[xks.stores]]` entry, the `i`th.
    fn validate(
        self,
        i: usize,
        resolve: &impl Fn(&Path) -> PathBuf,
        seen: &mut Seen,
    ) -> Result<StoreSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("xks.{f}"), m.to_owned()));
        let s = self;
        let f = |x: &str| format!("stores[{i}].{x}");
        if s.name.is_empty()
            || s.name.len() > 64
            || !s
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return e(&f("name"), "must be 1 to 64 of A-Z a-z 0-9 . _ -");
        }
        if !seen.names.insert(s.name.clone()) {
            return e(&f("name"), "is used by another store");
        }
        let prefix_ok = s.prefix.is_empty()
            || (s.prefix.starts_with('/')
                && !s.prefix.ends_with('/')
                && !s.prefix.contains("//")
                && s.prefix.bytes().all(is_prefix_char));
        if !prefix_ok {
            return e(
                &f("prefix"),
                "must be empty or /segments of A-Z a-z 0-9 _ - (no trailing /)",
            );
        }
        if s.prefix.len() + API_ROOT.len() > MAX_URI_PATH {
            return e(
                &f("prefix"),
                &format!("with {API_ROOT} it must fit in {MAX_URI_PATH} characters"),
            );
        }
        if !seen.prefixes.insert(s.prefix.clone()) {
            return e(&f("prefix"), "is used by another store");
        }
        if s.region.is_empty()
            || s.region.len() > 32
            || !s
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return e(&f("region"), "must be an AWS region name such as eu-west-1");
        }
        if !valid_tenant(&s.tenant) {
            return e(
                &f("tenant"),
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            );
        }
        let identity = s.identity.unwrap_or_else(|| format!("xks:{}", s.name));
        if identity.is_empty() || identity.len() > 1024 || identity.chars().any(char::is_control) {
            return e(&f("identity"), "must be 1 to 1024 printable characters");
        }
        if !seen.identities.insert(identity.clone()) {
            return e(
                &f("identity"),
                "is used by another store (the identity names the store in grants and audit records)",
            );
        }
        let credentials = resolve(&s.credentials);
        if s.rate_limit == 0 || s.rate_limit > 1_000_000 {
            return e(&f("rate_limit"), "must be 1 to 1000000 requests per second");
        }
        let burst = s.burst.unwrap_or(s.rate_limit);
        if burst == 0 || burst > 10_000_000 {
            return e(&f("burst"), "must be 1 to 10000000");
        }
        let keys = validate_keys(&f, s.keys)?;
        Ok(StoreSettings {
            name: s.name,
            prefix: s.prefix,
            region: s.region,
            tenant: s.tenant,
            identity,
            credentials,
            rate_limit: s.rate_limit,
            burst,
            keys,
        })
    }
}

/// A store's `[[xks.stores.keys]]`: external ids unique, Keyhold key names valid, rules
/// named once each and no empty list.
fn validate_keys(
    f: &dyn Fn(&str) -> String,
    file_keys: Vec<FileKeyMap>,
) -> Result<Vec<KeyMapping>, (String, String)> {
    let e = |f: &str, m: &str| Err((format!("xks.{f}"), m.to_owned()));
    let mut ids = HashSet::new();
    let mut keys = Vec::with_capacity(file_keys.len());
    for (j, k) in file_keys.into_iter().enumerate() {
        let g = |x: &str| f(&format!("keys[{j}].{x}"));
        if !valid_external_id(&k.external_id) {
            return e(&g("external_id"), "must be 1 to 128 of A-Z a-z 0-9 . _ -");
        }
        if !ids.insert(k.external_id.clone()) {
            return e(&g("external_id"), "is mapped twice in this store");
        }
        if let Err(err) = crate::keyring::validate_name(&k.key) {
            return e(&g("key"), &err.to_string());
        }
        let mut rule_names = HashSet::new();
        for (r, rule) in k.rules.iter().enumerate() {
            let h = g(&format!("rules[{r}].name"));
            if rule.name.is_empty()
                || rule.name.len() > 128
                || rule.name.chars().any(|c| !c.is_ascii_graphic())
            {
                return e(
                    &h,
                    "must be 1 to 128 printable ASCII characters without spaces",
                );
            }
            if !rule_names.insert(rule.name.clone()) {
                return e(&h, "is used by another rule of this key");
            }
            let lists = [
                &rule.principals,
                &rule.operations,
                &rule.via_services,
                &rule.source_vpcs,
                &rule.vpc_endpoints,
            ];
            if lists.iter().any(|l| l.as_ref().is_some_and(Vec::is_empty)) {
                return e(
                    &g(&format!("rules[{r}]")),
                    "a list, when given, names at least one value",
                );
            }
        }
        keys.push(KeyMapping {
            external_id: k.external_id,
            key: k.key,
            rules: k.rules,
        });
    }
    Ok(keys)
}
