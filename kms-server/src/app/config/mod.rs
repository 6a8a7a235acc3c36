//! Configuration: a TOML file parsed, then validated into typed [`Settings`] at start-up.
//! A bad file fails with the file and the field named. `deploy/kms-server.toml` is the
//! commented example.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::storage::Engine;
mod audit;
mod checks;

use crate::access::policy::IdentityMapping;
use crate::access::policy::IdentitySource;
use crate::crypto::seal::{Argon2Params, SealMethod};
use crate::security::tls::TlsSettings;
use audit::{audit_policy, FileAudit};
pub use checks::*;
use checks::{
    check_alerts_and_identities, check_bounds, check_seal_and_erasure, check_tls_files, Adapters,
    FileAdapters,
};

/// A configuration error: which file, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("config {file}: {field}: {message}")]
pub struct ConfigError {
    /// The file (or `<inline>`).
    pub file: String,
    /// The field, dotted (`tls.cert`), or `<syntax>` for a parse error.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_ops_listen() -> String {
    "127.0.0.1:9443".into()
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_body_timeout() -> u64 {
    10
}
fn default_header_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_per_source() -> usize {
    256
}

fn default_max_batch() -> usize {
    1000
}
fn default_min_tls() -> String {
    "1.3".into()
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_sources() -> Vec<IdentitySource> {
    vec![
        IdentitySource::UriSan,
        IdentitySource::DnsSan,
        IdentitySource::SubjectCn,
    ]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_ops_listen")]
    ops_listen: String,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_max_batch")]
    max_batch_items: usize,
    #[serde(default = "default_body_timeout")]
    body_timeout_secs: u64,
    #[serde(default = "default_header_timeout")]
    header_timeout_secs: u64,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_handshakes")]
    max_handshakes: usize,
    #[serde(default = "default_per_source")]
    per_source_connections: usize,
    store: FileStore,
    seal: FileSeal,
    tls: FileTls,
    #[serde(default)]
    identity: FileIdentity,
    #[serde(default)]
    identities: Vec<IdentityMapping>,
    #[serde(default)]
    audit: FileAudit,
    #[serde(default)]
    lockout: FileLockout,
    #[serde(default)]
    brake: crate::access::brake::BrakeSettings,
    #[serde(default)]
    alerts: FileAlerts,
    #[serde(default)]
    keys: FileKeys,
    #[serde(default)]
    process: FileProcess,
    #[serde(default)]
    xks: Option<crate::adapters::xks::settings::FileXks>,
    #[serde(default)]
    public: Option<crate::app::public::FilePublic>,
    #[serde(default)]
    dke: Option<crate::adapters::dke::settings::FileDke>,
    #[serde(default)]
    cse: Option<crate::adapters::cse::settings::FileCse>,
    #[serde(default)]
    ekm: Option<crate::adapters::ekm::settings::FileEkm>,
    #[serde(default)]
    salesforce: Option<crate::adapters::salesforce::settings::FileSalesforce>,
    #[serde(default)]
    kubernetes: Vec<crate::adapters::kubernetes::settings::FileKubernetes>,
    #[serde(default)]
    kmip: Option<crate::adapters::kmip::settings::FileKmip>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProcess {
    #[serde(default)]
    mlock: crate::base::process::Mlock,
    #[serde(default)]
    allow_root: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    /// How often due rotations and destructions are looked for.
    #[serde(default = "default_sweep")]
    sweep_interval_secs: u64,
    /// How many keys the keyring keeps decrypted in memory.
    #[serde(default = "default_cache_keys")]
    cache_keys: usize,
}

impl Default for FileKeys {
    fn default() -> Self {
        Self {
            sweep_interval_secs: default_sweep(),
            cache_keys: default_cache_keys(),
        }
    }
}

fn default_cache_keys() -> usize {
    crate::keyring::DEFAULT_CACHE_KEYS
}

fn default_sweep() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAlerts {
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    webhook_ca: Option<PathBuf>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default = "default_coalesce")]
    coalesce_secs: u64,
}

fn default_coalesce() -> u64 {
    crate::security::alert::DEFAULT_COALESCE.as_secs()
}

impl Default for FileAlerts {
    fn default() -> Self {
        Self {
            webhook: None,
            webhook_ca: None,
            command: None,
            coalesce_secs: default_coalesce(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLockout {
    #[serde(default = "default_threshold")]
    threshold: u32,
    #[serde(default = "default_window")]
    window_secs: u64,
    #[serde(default = "default_lock")]
    duration_secs: u64,
}

fn default_threshold() -> u32 {
    5
}
fn default_window() -> u64 {
    60
}
fn default_lock() -> u64 {
    900
}

impl Default for FileLockout {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
            window_secs: default_window(),
            duration_secs: default_lock(),
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    #[serde(default = "default_engine")]
    engine: Engine,
    path: PathBuf,
    /// `engine = "postgres"`: the connection string (no password in it).
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    tls_ca: Option<PathBuf>,
    #[serde(default = "default_pool")]
    pool_size: usize,
    #[serde(default = "yes")]
    listen: bool,
    #[serde(default)]
    node_id: Option<String>,
    /// `engine = "postgres"`: where erasure keys live (`crate::storage::erasure::shared`).
    #[serde(default)]
    erasure: Option<ErasureMode>,
    #[serde(default)]
    erasure_retention_secs: Option<u64>,
    /// `engine = "sled"`: the operator accepts sled's known risks (a kill -9 can leave a
    /// store that no longer opens: `storage/STORAGE.md`). Without it the server refuses to
    /// create a new sled store; an existing one still opens, with a warning.
    #[serde(default)]
    accept_sled_risks: bool,
}

/// Where a shared store keeps its keys' erasure keys (`[store] erasure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErasureMode {
    /// In the database under epoch keys rooted in the sealing HSM (the default when
    /// `[seal] method = "pkcs11"`).
    Token,
    /// None: keys are sealed under the master key alone, and destruction is only as final
    /// as the database's WAL and backup retention (the default with any other seal).
    None,
}

fn default_pool() -> usize {
    8
}

fn default_engine() -> Engine {
    Engine::Redb
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSeal {
    method: SealMethod,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    passphrase_file: Option<PathBuf>,
    #[serde(default)]
    argon2: Option<Argon2Params>,
    #[serde(default)]
    pkcs11: Option<crate::crypto::seal::Pkcs11Settings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    #[serde(default = "default_min_tls")]
    min_version: String,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout_secs: u64,
    #[serde(default)]
    crls: Vec<PathBuf>,
    #[serde(default = "default_crl_poll")]
    crl_poll_secs: u64,
}

fn default_crl_poll() -> u64 {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIdentity {
    #[serde(default = "default_sources")]
    sources: Vec<IdentitySource>,
}

impl Default for FileIdentity {
    fn default() -> Self {
        Self {
            sources: default_sources(),
        }
    }
}

/// Where the store lives.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Engine.
    pub engine: Engine,
    /// Database path (embedded engines); with PostgreSQL, where the node keeps its
    /// local files (the audit chain and erasure files, until they move to the database).
    pub path: PathBuf,
    /// The database, for `engine = "postgres"`.
    pub postgres: Option<crate::storage::PgSettings>,
    /// This node's id among the nodes of a shared store (`[store] node_id`, else the
    /// environment's `KEYHOLD_NODE_ID`; `None`: `<host>:<API port>`).
    pub node_id: Option<String>,
    /// On a shared store with `[store] erasure = "token"`: how long a retired erasure
    /// epoch's HSM key is kept, seconds ([`crate::storage::erasure::shared`]). `None`: no erasure
    /// keys in the database.
    pub shared_erasure_retention_secs: Option<u64>,
    /// `[store] accept_sled_risks`: whether a new sled store may be created
    /// (`crate::app::server::open_store`; see `storage/STORAGE.md`).
    pub accept_sled_risks: bool,
}

/// How the server unseals.
#[derive(Debug, Clone)]
pub struct SealSettings {
    /// Method.
    pub method: SealMethod,
    /// Key file (method `key-file`).
    pub key_file: Option<PathBuf>,
    /// File holding the passphrase (method `passphrase`); without it, the server waits for
    /// `POST /v1/sys/unseal` or the `KEYHOLD_PASSPHRASE` environment variable.
    pub passphrase_file: Option<PathBuf>,
    /// Argon2id parameters used by `init`.
    pub argon2: Argon2Params,
    /// The token (method `pkcs11`), paths resolved.
    pub pkcs11: Option<crate::crypto::seal::Pkcs11Settings>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// mTLS API address.
    pub listen: SocketAddr,
    /// Plain-HTTP ops address, `None` when set to `"off"`.
    pub ops_listen: Option<SocketAddr>,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Batch size limit.
    pub max_batch_items: usize,
    /// How long a request body may take to arrive once its headers have (a client that
    /// stalls mid-body gets 408 and the connection is freed).
    pub body_timeout: std::time::Duration,
    /// How long an HTTP/1.1 request's headers may take to arrive.
    pub header_timeout: std::time::Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// Established connections per listener.
    pub max_connections: usize,
    /// TLS handshakes in progress per listener.
    pub max_handshakes: usize,
    /// Connections per listener from one IPv4 address or IPv6 /64; 0: unbounded.
    pub per_source_connections: usize,
    /// Store.
    pub store: StoreSettings,
    /// Seal.
    pub seal: SealSettings,
    /// TLS.
    pub tls: TlsSettings,
    /// Identity sources, in order.
    pub identity_sources: Vec<IdentitySource>,
    /// Identity mappings.
    pub identities: Vec<IdentityMapping>,
    /// Where audit records are also written as JSON lines.
    pub audit_sink: crate::security::audit::Sink,
    /// Whether the audit trail is kept (always, outside cost measurements).
    pub audit_enabled: bool,
    /// The audit chain file.
    pub audit_path: PathBuf,
    /// Free space under which `audit_disk_low` is raised, bytes (0: never).
    pub audit_min_free: u64,
    /// The audit writer's commit window and durability (`[audit] durability`,
    /// `max_lag_ms`, `commit_window_us`).
    pub audit_policy: crate::security::audit::CommitPolicy,
    /// Lockout after repeated denials.
    pub lockout: crate::access::lockout::LockoutPolicy,
    /// The exfiltration brake (`[brake]`).
    pub brake: crate::access::brake::BrakeSettings,
    /// The audit trail's exporters (`[[audit.export]]`).
    pub audit_export: Vec<crate::security::audit::export::ExportTarget>,
    /// The audit trail's retention (`[audit.retention]`).
    pub audit_retention: Option<crate::security::audit::retention::RetentionSettings>,
    /// How often automatic rotations and due destructions run.
    pub sweep_interval: std::time::Duration,
    /// Most keys kept decrypted in the keyring's cache (`[keys] cache_keys`).
    pub cache_keys: usize,
    /// Alert destinations.
    pub alerts: crate::security::alert::AlertSettings,
    /// Process hardening (`[process]`).
    pub process: crate::base::process::ProcessSettings,
    /// The AWS KMS external key store listener (`[xks]`), if configured.
    pub xks: Option<crate::adapters::xks::settings::XksSettings>,
    /// The public listener of the end-user protocols (`[public]`), if configured.
    pub public: Option<crate::app::public::PublicSettings>,
    /// Microsoft Double Key Encryption on the public listener (`[dke]`), if configured.
    pub dke: Option<crate::adapters::dke::settings::DkeSettings>,
    /// Google Workspace client-side encryption on the public listener (`[cse]`), if
    /// configured.
    pub cse: Option<crate::adapters::cse::settings::CseSettings>,
    /// Google Cloud EKM on the public listener (`[ekm]`), if configured.
    pub ekm: Option<crate::adapters::ekm::settings::EkmSettings>,
    /// Salesforce cache-only keys on the public listener (`[salesforce]`), if configured.
    pub salesforce: Option<crate::adapters::salesforce::settings::SalesforceSettings>,
    /// Kubernetes KMS v2 plugin sockets (`[[kubernetes]]`).
    pub kubernetes: Vec<crate::adapters::kubernetes::KubernetesSettings>,
    /// The KMIP listener (`[kmip]`), if configured.
    pub kmip: Option<crate::adapters::kmip::KmipSettings>,
}

impl Settings {
    /// Every configured certificate identity can be carried by a source `[identity]
    /// sources` reads (see [`crate::security::tls::canonical_identity`]); the identities the
    /// protocol adapters act as are not certificate names and are not checked.
    fn check_identity_sources(&self) -> Result<(), (String, String)> {
        let adapters: HashSet<&str> = [
            self.dke.as_ref().map(|d| d.identity.as_str()),
            self.cse.as_ref().map(|c| c.identity.as_str()),
            self.ekm.as_ref().map(|e| e.identity.as_str()),
            self.salesforce.as_ref().map(|s| s.identity.as_str()),
        ]
        .into_iter()
        .flatten()
        .chain(self.kubernetes.iter().map(|k| k.identity.as_str()))
        .chain(
            self.xks
                .iter()
                .flat_map(|x| x.stores.iter().map(|s| s.identity.as_str())),
        )
        .collect();
        for (i, m) in self.identities.iter().enumerate() {
            let source = crate::security::tls::source_of_name(&m.identity);
            if adapters.contains(m.identity.as_str()) || self.identity_sources.contains(&source) {
                continue;
            }
            return Err((
                format!("identities[{i}].identity"),
                format!(
                    "`{}` can only be presented in a certificate's {source:?}, which \
                     [identity] sources does not read (a common name shaped like a host \
                     name or URI is written `subject-cn:NAME`, a single-label DNS name \
                     `dns-san:NAME`)",
                    m.identity
                ),
            ));
        }
        Ok(())
    }

    /// Reads and validates `path`. Relative paths inside are relative to its folder.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            field: "<file>".into(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base, &path.display().to_string())
    }

    /// Parses and validates TOML `text`; `base` resolves relative paths, `origin` names
    /// the file in errors.
    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<Settings, ConfigError> {
        let err = |field: &str, message: String| ConfigError {
            file: origin.to_owned(),
            field: field.to_owned(),
            message,
        };
        let raw: FileConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().to_owned();
            let field = match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("<syntax, line {line}>")
                }
                None => "<syntax>".into(),
            };
            err(&field, message)
        })?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let (listen, ops_listen) =
            checks::listen_addrs(&raw.listen, &raw.ops_listen).map_err(|(f, m)| err(f, m))?;
        check_bounds(&raw).map_err(|(f, m)| err(&f, m))?;
        let tls = &raw.tls;
        let allow_tls12 = check_tls_files(tls, &resolve).map_err(|(f, m)| err(&f, m))?;
        let seal = &raw.seal;
        let shared_erasure_retention_secs =
            check_seal_and_erasure(&raw).map_err(|(f, m)| err(&f, m))?;
        let argon2 = seal.argon2.unwrap_or_default();
        argon2.validate().map_err(|m| err("seal.argon2", m))?;
        check_alerts_and_identities(&raw).map_err(|(f, m)| err(&f, m))?;
        raw.brake.check().map_err(|m| err("brake", m))?;
        let (audit_export, audit_retention) =
            audit::streams(&raw.audit, raw.store.engine, &resolve).map_err(|(f, m)| err(f, m))?;
        let store = store_settings(&raw.store, &resolve, shared_erasure_retention_secs)
            .map_err(|(f, m)| err(f, m.into()))?;
        let Adapters {
            xks,
            public,
            dke,
            cse,
            ekm,
            salesforce,
            kubernetes,
            kmip,
        } = Adapters::validate(
            FileAdapters {
                xks: raw.xks,
                public: raw.public,
                dke: raw.dke,
                cse: raw.cse,
                ekm: raw.ekm,
                salesforce: raw.salesforce,
                kubernetes: raw.kubernetes,
                kmip: raw.kmip,
            },
            &resolve,
            listen,
            ops_listen,
        )
        .map_err(|(f, m)| err(&f, m))?;
        let settings = Settings {
            xks,
            public,
            dke,
            cse,
            ekm,
            salesforce,
            kubernetes,
            kmip,
            listen,
            ops_listen,
            max_body_bytes: raw.max_body_bytes,
            max_batch_items: raw.max_batch_items,
            body_timeout: std::time::Duration::from_secs(raw.body_timeout_secs),
            header_timeout: std::time::Duration::from_secs(raw.header_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(raw.idle_timeout_secs),
            max_connections: raw.max_connections,
            max_handshakes: raw.max_handshakes,
            per_source_connections: raw.per_source_connections,
            store,
            seal: seal_settings(seal, &resolve, argon2),
            tls: tls_settings(tls, &resolve, allow_tls12),
            identity_sources: raw.identity.sources,
            identities: raw.identities,
            audit_sink: checks::audit_sink(raw.audit.jsonl.as_deref(), &resolve),
            audit_enabled: raw.audit.enabled,
            audit_policy: audit_policy(&raw.audit),
            audit_min_free: raw.audit.min_free_mib.saturating_mul(1 << 20),
            audit_path: audit::chain_path(&raw.audit, &raw.store.path, &resolve),
            sweep_interval: std::time::Duration::from_secs(raw.keys.sweep_interval_secs),
            cache_keys: raw.keys.cache_keys,
            lockout: crate::access::lockout::LockoutPolicy {
                threshold: raw.lockout.threshold,
                window: std::time::Duration::from_secs(raw.lockout.window_secs),
                duration: std::time::Duration::from_secs(raw.lockout.duration_secs),
            },
            brake: raw.brake,
            audit_export,
            audit_retention,
            alerts: crate::security::alert::AlertSettings {
                webhook: raw.alerts.webhook,
                webhook_ca: raw.alerts.webhook_ca.as_deref().map(resolve),
                command: raw.alerts.command,
                coalesce: std::time::Duration::from_secs(raw.alerts.coalesce_secs),
            },
            process: crate::base::process::ProcessSettings {
                mlock: raw.process.mlock,
                allow_root: raw.process.allow_root,
            },
        };
        settings
            .check_identity_sources()
            .map_err(|(field, message)| err(&field, message))?;
        Ok(settings)
    }
}

/// `[store]`: the engine and where its data lives.
fn store_settings(
    raw: &FileStore,
    resolve: &dyn Fn(&Path) -> PathBuf,
    shared_erasure_retention_secs: Option<u64>,
) -> Result<StoreSettings, (&'static str, &'static str)> {
    if raw.accept_sled_risks && raw.engine != Engine::Sled {
        return Err(("store.accept_sled_risks", "only for engine = \"sled\""));
    }
    let postgres =
        match (raw.engine, &raw.url) {
            (Engine::Postgres, Some(url)) => Some(crate::storage::PgSettings {
                url: url.clone(),
                password_file: raw.password_file.as_deref().map(resolve),
                tls_ca: raw.tls_ca.as_deref().map(resolve),
                pool_size: raw.pool_size,
                listen: raw.listen,
            }),
            (Engine::Postgres, None) => return Err((
                "store.url",
                "required with engine = \"postgres\" (a connection string without the password)",
            )),
            (_, Some(_)) => return Err(("store.url", "only for engine = \"postgres\"")),
            (_, None) => None,
        };
    Ok(StoreSettings {
        engine: raw.engine,
        path: resolve(&raw.path),
        postgres,
        // In a Deployment the pod's name is the natural id, and one ConfigMap serves every
        // pod: the environment may give it.
        node_id: raw.node_id.clone().or_else(|| {
            std::env::var("KEYHOLD_NODE_ID")
                .ok()
                .filter(|id| !id.trim().is_empty())
        }),
        shared_erasure_retention_secs,
        accept_sled_risks: raw.accept_sled_risks,
    })
}

/// `[seal]`, its paths resolved.
fn seal_settings(
    seal: &FileSeal,
    resolve: &dyn Fn(&Path) -> PathBuf,
    argon2: Argon2Params,
) -> SealSettings {
    SealSettings {
        method: seal.method,
        key_file: seal.key_file.as_deref().map(resolve),
        passphrase_file: seal.passphrase_file.as_deref().map(resolve),
        pkcs11: seal
            .pkcs11
            .as_ref()
            .map(|p| crate::crypto::seal::Pkcs11Settings {
                module: resolve(&p.module),
                token_label: p.token_label.clone(),
                key_label: p.key_label.clone(),
                pin_file: p.pin_file.as_deref().map(resolve),
            }),
        argon2,
    }
}

/// `[tls]`, its paths resolved.
fn tls_settings(
    tls: &FileTls,
    resolve: &dyn Fn(&Path) -> PathBuf,
    allow_tls12: bool,
) -> TlsSettings {
    TlsSettings {
        cert: resolve(&tls.cert),
        key: resolve(&tls.key),
        client_ca: resolve(&tls.client_ca),
        allow_tls12,
        handshake_timeout: std::time::Duration::from_secs(tls.handshake_timeout_secs),
        crls: tls.crls.iter().map(|p| resolve(p)).collect(),
        crl_poll: (tls.crl_poll_secs > 0)
            .then(|| std::time::Duration::from_secs(tls.crl_poll_secs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["c.pem", "k.pem", "ca.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let text = r#"
[store]
path = "s.redb"
[seal]
method = "key-file"
key_file = "m.key"
[tls]
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"
[[identities]]
identity = "spiffe://x/app"
tenant = "acme"
role = "app"
"#
        .to_string();
        (dir, text)
    }

    #[test]
    fn good_file_resolves_paths() {
        let (dir, text) = base();
        let s = Settings::parse(&text, dir.path(), "t.toml").unwrap();
        assert_eq!(s.store.path, dir.path().join("s.redb"));
        assert_eq!(s.listen.port(), 8443);
        assert!(!s.tls.allow_tls12);
        assert_eq!(s.identities[0].role, crate::access::policy::Role::App);
    }

    #[test]
    fn bad_values_name_the_field() {
        let (dir, text) = base();
        let cases = [
            ("listen = \"nope\"\n", "listen"),
            ("max_body_bytes = 5\n", "max_body_bytes"),
            ("bogus = 1\n", "<syntax"),
        ];
        for (prefix, field) in cases {
            let e = Settings::parse(&format!("{prefix}{text}"), dir.path(), "t.toml").unwrap_err();
            assert!(e.field.starts_with(field), "{e}");
            assert!(e.to_string().contains("t.toml"), "{e}");
        }
        let e = Settings::parse(&text.replace("c.pem", "missing.pem"), dir.path(), "t.toml")
            .unwrap_err();
        assert_eq!(e.field, "tls.cert");
        let e = Settings::parse(
            &text.replace("role = \"app\"", "role = \"root\""),
            dir.path(),
            "t.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("root"), "{e}");
        let dup = format!("{text}\n[[identities]]\nidentity = \"spiffe://x/app\"\ntenant = \"b\"\nrole = \"admin\"\n");
        let e = Settings::parse(&dup, dir.path(), "t.toml").unwrap_err();
        assert_eq!(e.field, "identities[1].identity");
        let e = Settings::parse(
            &text.replace("tenant = \"acme\"", "tenant = \"a b\""),
            dir.path(),
            "t.toml",
        )
        .unwrap_err();
        assert_eq!(e.field, "identities[0].tenant");
        // An identity no configured source can carry is a mistake, said at start.
        let cn_only = format!("{text}\n[identity]\nsources = [\"subject-cn\"]\n");
        let e = Settings::parse(&cn_only, dir.path(), "t.toml").unwrap_err();
        assert_eq!(e.field, "identities[0].identity");
        assert!(e.message.contains("subject-cn:"), "{e}");
        let named = cn_only.replace("spiffe://x/app", "subject-cn:spiffe://x/app");
        Settings::parse(&named, dir.path(), "t.toml").unwrap();
        // An unknown key is refused, at the top level as in a table.
        let e =
            Settings::parse(&format!("bogus_key = 1\n{text}"), dir.path(), "t.toml").unwrap_err();
        assert!(e.message.contains("bogus_key"), "{e}");
        // Each bound's message comes from its constant.
        let e = Settings::parse(
            &format!("max_connections = 0\n{text}"),
            dir.path(),
            "t.toml",
        )
        .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("max_connections", "must be 1 to 1000000")
        );
    }

    /// `accept_sled_risks` is read for sled and refused elsewhere (the refusal to create a
    /// sled store without it is `storage::sled_engine::tests`).
    #[test]
    fn accept_sled_risks_is_only_for_sled() {
        let (dir, text) = base();
        let s = Settings::parse(&text, dir.path(), "t.toml").unwrap();
        assert!(!s.store.accept_sled_risks);
        let sled = text.replace(
            "path = \"s.redb\"",
            "engine = \"sled\"\npath = \"s.sled\"\naccept_sled_risks = true",
        );
        let s = Settings::parse(&sled, dir.path(), "t.toml").unwrap();
        assert!(s.store.accept_sled_risks);
        let redb = text.replace(
            "path = \"s.redb\"",
            "path = \"s.redb\"\naccept_sled_risks = true",
        );
        let e = Settings::parse(&redb, dir.path(), "t.toml").unwrap_err();
        assert_eq!(e.field, "store.accept_sled_risks");
    }

    #[test]
    fn erasure_keys_in_the_database_need_postgres_and_an_hsm() {
        let (dir, text) = base();
        let pg = text.replace(
            "path = \"s.redb\"",
            "engine = \"postgres\"\npath = \"n\"\nurl = \"host=/tmp dbname=k\"",
        );
        let hsm = pg.replace(
            "method = \"key-file\"\nkey_file = \"m.key\"",
            "method = \"pkcs11\"\n[seal.pkcs11]\nmodule = \"/m.so\"\ntoken_label = \"t\"",
        );
        let parse = |t: &str| Settings::parse(t, dir.path(), "t.toml");
        // With an HSM: on by default, 7 days of retention; "none" turns it off.
        let s = parse(&hsm).unwrap();
        assert_eq!(s.store.shared_erasure_retention_secs, Some(7 * 86_400));
        let s = parse(&hsm.replace("url =", "erasure_retention_secs = 0\nurl =")).unwrap();
        assert_eq!(s.store.shared_erasure_retention_secs, Some(0));
        let s = parse(&hsm.replace("url =", "erasure = \"none\"\nurl =")).unwrap();
        assert_eq!(s.store.shared_erasure_retention_secs, None);
        // Without one: off, and asking for it is an error naming the field.
        assert_eq!(
            parse(&pg).unwrap().store.shared_erasure_retention_secs,
            None
        );
        for (t, field) in [
            (
                pg.replace("url =", "erasure = \"token\"\nurl ="),
                "store.erasure",
            ),
            (
                pg.replace("url =", "erasure_retention_secs = 5\nurl ="),
                "store.erasure_retention_secs",
            ),
            (
                text.replace(
                    "path = \"s.redb\"",
                    "path = \"s.redb\"\nerasure = \"token\"",
                ),
                "store.erasure",
            ),
            (
                hsm.replace("url =", "erasure_retention_secs = 99999999\nurl ="),
                "store.erasure_retention_secs",
            ),
        ] {
            assert_eq!(parse(&t).unwrap_err().field, field, "{t}");
        }
    }

    /// Issue 25: the audit trail's durability and commit window.
    #[test]
    fn audit_durability_and_window_are_read_and_bounded() {
        use crate::security::audit::{CommitPolicy, Durability};
        let (dir, text) = base();
        let s = Settings::parse(&text, dir.path(), "t.toml").unwrap();
        assert_eq!(s.audit_policy, CommitPolicy::default());
        assert_eq!(s.audit_policy.durability, Durability::PerRequest);
        let lag = format!(
            "{text}\n[audit]\ndurability = \"bounded-lag\"\nmax_lag_ms = 25\ncommit_window_us = 0\n"
        );
        let s = Settings::parse(&lag, dir.path(), "t.toml").unwrap();
        assert_eq!(
            s.audit_policy,
            CommitPolicy {
                window: std::time::Duration::ZERO,
                durability: Durability::BoundedLag(std::time::Duration::from_millis(25)),
            }
        );
        for (bad, field) in [
            ("durability = \"never\"", "<syntax"),
            ("max_lag_ms = 0", "audit.max_lag_ms"),
            ("max_lag_ms = 1001", "audit.max_lag_ms"),
            ("commit_window_us = 10001", "audit.commit_window_us"),
        ] {
            let e = Settings::parse(&format!("{text}\n[audit]\n{bad}\n"), dir.path(), "t.toml")
                .unwrap_err();
            assert!(e.field.starts_with(field), "{bad}: {e}");
        }
    }

    /// Issue 24: DKE and EKM can both sit at the root of one listener only on two host
    /// names; a host must be a plain DNS name.
    #[test]
    fn two_protocols_at_the_root_need_two_host_names() {
        let (dir, text) = base();
        std::fs::write(dir.path().join("jwks.json"), "{\"keys\": []}").unwrap();
        let public = "\n[public]\nlisten = \"127.0.0.1:8444\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let config = |dke_host: &str, ekm_host: &str| {
            format!(
                r#"{text}{public}
[dke]
url = "https://dke.example.com"
mount = "/"
{dke_host}
issuers = ["https://sts.windows.net/t/"]
jwks = "jwks.json"
tenant = "acme"
identity = "dke:office"
[[dke.keys]]
name = "confidential"
key = "office-dke"
emails = ["alice@example.com"]

[ekm]
url = "https://ekm.example.com"
mount = "/"
{ekm_host}
jwks = "jwks.json"
tenant = "acme"
identity = "ekm:cloud"
[[ekm.keys]]
path = "v0/k1"
key = "ekm-kek"
callers = ["agent@example.com"]
"#
            )
        };
        let e = Settings::parse(&config("", ""), dir.path(), "t.toml").unwrap_err();
        assert_eq!(e.field, "ekm.mount", "{e}");
        assert!(e.message.contains("[dke] host"), "{e}");
        let same = config("host = \"kms.example.com\"", "host = \"KMS.example.com\"");
        let e = Settings::parse(&same, dir.path(), "t.toml").unwrap_err();
        assert_eq!(e.field, "ekm.mount", "{e}");
        let two = config("host = \"dke.example.com\"", "host = \"EKM.example.com\"");
        let s = Settings::parse(&two, dir.path(), "t.toml").unwrap();
        assert_eq!(s.dke.unwrap().host.as_deref(), Some("dke.example.com"));
        assert_eq!(s.ekm.unwrap().host.as_deref(), Some("ekm.example.com"));
        // One named, the other on every name: allowed (the named host is the named one's).
        Settings::parse(
            &config("host = \"dke.example.com\"", ""),
            dir.path(),
            "t.toml",
        )
        .unwrap();
        for bad in ["https://dke.example.com", "dke.example.com:443", "10.0.0.1"] {
            let e = Settings::parse(
                &config(&format!("host = \"{bad}\""), ""),
                dir.path(),
                "t.toml",
            )
            .unwrap_err();
            assert_eq!(e.field, "dke.host", "{bad}: {e}");
        }
    }

    #[test]
    fn public_and_dke_tables_are_validated_field_by_field() {
        let (dir, text) = base();
        std::fs::write(dir.path().join("jwks.json"), "{\"keys\": []}").unwrap();
        let public = "\n[public]\nlisten = \"127.0.0.1:8444\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let dke = r#"
[dke]
url = "https://dke.example.com/dke/"
issuers = ["https://sts.windows.net/t/"]
jwks = "jwks.json"
tenant = "acme"
identity = "dke:office"
[[dke.keys]]
name = "confidential"
key = "office-dke"
emails = ["Alice@Example.com"]
"#;
        let s = Settings::parse(&format!("{text}{public}{dke}"), dir.path(), "t.toml").unwrap();
        let d = s.dke.unwrap();
        assert_eq!(d.url, "https://dke.example.com/dke");
        assert_eq!(d.keys[0].emails, ["alice@example.com"]);
        assert_eq!(s.public.unwrap().listen.port(), 8444);
        // DKE needs the public listener; each bad field is named.
        let e = Settings::parse(&format!("{text}{dke}"), dir.path(), "t.toml").unwrap_err();
        assert_eq!(e.field, "dke");
        for (from, to, field) in [
            (
                "url = \"https://dke.example.com/dke/\"",
                "url = \"http://dke\"",
                "dke.url",
            ),
            (
                "issuers = [\"https://sts.windows.net/t/\"]",
                "issuers = []",
                "dke.issuers",
            ),
            (
                "jwks = \"jwks.json\"",
                "jwks = \"missing.json\"",
                "dke.jwks",
            ),
            (
                "jwks = \"jwks.json\"",
                "jwks = \"http://idp/keys\"",
                "dke.jwks",
            ),
            (
                "name = \"confidential\"",
                "name = \"a/b\"",
                "dke.keys[0].name",
            ),
            (
                "emails = [\"Alice@Example.com\"]",
                "emails = []",
                "dke.keys[0]",
            ),
        ] {
            let bad = format!("{text}{public}{}", dke.replace(from, to));
            let e = Settings::parse(&bad, dir.path(), "t.toml").unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let e = Settings::parse(
            &format!("{text}{}{dke}", public.replace("c.pem", "missing.pem")),
            dir.path(),
            "t.toml",
        )
        .unwrap_err();
        assert_eq!(e.field, "public.cert");
    }

    #[test]
    fn xks_table_is_validated_field_by_field() {
        let (dir, text) = base();
        let xks = r#"
[xks]
listen = "127.0.0.1:9444"
cert = "c.pem"
key = "k.pem"
[[xks.stores]]
name = "aws"
prefix = "/aws/prod"
region = "eu-west-1"
tenant = "acme"
credentials = "creds.toml"
[[xks.stores.keys]]
external_id = "ext-1"
key = "k1"
"#;
        let s = Settings::parse(&format!("{text}{xks}"), dir.path(), "t.toml").unwrap();
        let x = s.xks.unwrap();
        assert_eq!(x.stores[0].identity, "xks:aws");
        assert_eq!(x.stores[0].rate_limit, 3600);
        assert_eq!(x.stores[0].credentials, dir.path().join("creds.toml"));
        assert_eq!(x.max_skew, std::time::Duration::from_secs(300));
        let cases = [
            ("prefix = \"/aws/prod\"", "prefix = \"aws\"", "xks.stores[0].prefix"),
            ("prefix = \"/aws/prod\"", "prefix = \"/aws/\"", "xks.stores[0].prefix"),
            ("prefix = \"/aws/prod\"", "prefix = \"/a.b\"", "xks.stores[0].prefix"),
            ("region = \"eu-west-1\"", "region = \"EU WEST\"", "xks.stores[0].region"),
            ("external_id = \"ext-1\"", "external_id = \"ext 1\"", "xks.stores[0].keys[0].external_id"),
            ("key = \"k1\"", "key = \"bad name!\"", "xks.stores[0].keys[0].key"),
            ("cert = \"c.pem\"\nkey = \"k.pem\"\n[[xks", "cert = \"c.pem\"\nkey = \"k.pem\"\nhealth_cache_secs = 61\n[[xks", "xks.health_cache_secs"),
            ("cert = \"c.pem\"\nkey = \"k.pem\"\n[[xks", "cert = \"c.pem\"\nkey = \"k.pem\"\nclient_subject = \"cks.kms.eu-west-1.amazonaws.com\"\n[[xks", "xks.client_subject"),
            ("listen = \"127.0.0.1:9444\"", "listen = \"127.0.0.1:8443\"", "xks.listen"),
        ];
        for (from, to, field) in cases {
            let bad = format!("{text}{}", xks.replacen(from, to, 1));
            assert_ne!(bad, format!("{text}{xks}"), "{from}");
            let e = Settings::parse(&bad, dir.path(), "t.toml").unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        // Two stores may not share a prefix, a name or an identity.
        let second = xks.split("[[xks.stores]]").nth(1).unwrap().replace(
            "[[xks.stores.keys]]\nexternal_id = \"ext-1\"\nkey = \"k1\"\n",
            "",
        );
        for (from, to) in [
            ("name = \"aws\"", "name = \"aws2\""),
            ("prefix = \"/aws/prod\"", "prefix = \"/other\""),
        ] {
            let two = format!("{text}{xks}[[xks.stores]]{}", second.replace(from, to));
            assert!(Settings::parse(&two, dir.path(), "t.toml")
                .unwrap_err()
                .field
                .starts_with("xks.stores[1]."));
        }
    }
}
