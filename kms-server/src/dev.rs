//! Dev mode: a throwaway, single-machine Keyhold that works in one command.
//!
//! `kms-server dev` creates, under its data dir (kept between runs): a CA and server,
//! admin and app certificates (`pki/`), a key file that unseals the store, the store,
//! a config file (`kms-server.toml`, the same format production uses), and a demo key
//! `demo` usable by the app identity. Then it serves and prints commands to paste.
//! NOT FOR PRODUCTION: the key file sits next to the store it unseals.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kms_client::api::{Algorithm, Grant, GrantOperation};

use crate::config::Settings;
use crate::error::Error;
use crate::pki::Pki;
use crate::seal::KeyFileSealer;
use crate::server;

/// Tenant of the dev identities.
pub const DEV_TENANT: &str = "dev";
/// The admin identity (URI SAN of `pki/admin.pem`).
pub const DEV_ADMIN: &str = "spiffe://keyhold.dev/admin";
/// The app identity (URI SAN of `pki/app.pem`).
pub const DEV_APP: &str = "spiffe://keyhold.dev/app";
/// The auditor identity (URI SAN of `pki/auditor.pem`).
pub const DEV_AUDITOR: &str = "spiffe://keyhold.dev/auditor";
/// The demo key.
pub const DEMO_KEY: &str = "demo";

/// The files dev mode keeps under its data dir.
#[derive(Debug, Clone)]
pub struct DevLayout {
    /// The data dir.
    pub dir: PathBuf,
}

impl DevLayout {
    /// A file under the data dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Creates (or reuses) the dev PKI, key file, config, store and demo key under `dir`, and
/// returns the config path.
pub fn prepare(dir: &Path, listen: SocketAddr, ops_listen: SocketAddr) -> anyhow::Result<PathBuf> {
    let layout = DevLayout {
        dir: dir.to_path_buf(),
    };
    fs::create_dir_all(layout.path("pki"))?;
    if !layout.path("pki/ca.pem").exists() {
        let ca = Pki::generate("Keyhold dev CA (NOT FOR PRODUCTION)")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
        let admin = ca.issue_client("keyhold-dev-admin", Some(DEV_ADMIN))?;
        let app = ca.issue_client("keyhold-dev-app", Some(DEV_APP))?;
        let auditor = ca.issue_client("keyhold-dev-auditor", Some(DEV_AUDITOR))?;
        for (name, issued) in [
            ("server", &server),
            ("admin", &admin),
            ("app", &app),
            ("auditor", &auditor),
        ] {
            fs::write(layout.path(&format!("pki/{name}.pem")), &issued.cert_pem)?;
            write_private(
                &layout.path(&format!("pki/{name}-key.pem")),
                &issued.key_pem,
            )?;
        }
        fs::write(layout.path("pki/ca.pem"), ca.ca_pem())?;
    }
    let key_file = layout.path("master.key");
    if !key_file.exists() {
        KeyFileSealer::generate(&key_file)?;
    }
    let config_path = layout.path("kms-server.toml");
    let config = format!(
        r#"# Written by `kms-server dev`. NOT FOR PRODUCTION: the key file that unseals the
# store sits beside it. See deploy/kms-server.toml for a production example.
listen = "{listen}"
ops_listen = "{ops_listen}"

[store]
engine = "redb"
path = "keyhold.redb"

[seal]
method = "key-file"
key_file = "master.key"

[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"

# A developer machine: memory locked if the limit allows it, and whoever runs it (root
# included). Production keeps the defaults: mlock required, root refused.
[process]
mlock = "best-effort"
allow_root = true

[[identities]]
identity = "{DEV_ADMIN}"
tenant = "{DEV_TENANT}"
role = "admin"

[[identities]]
identity = "{DEV_APP}"
tenant = "{DEV_TENANT}"
role = "app"

[[identities]]
identity = "{DEV_AUDITOR}"
tenant = "{DEV_TENANT}"
role = "auditor"
"#
    );
    fs::write(&config_path, config)?;
    let settings = Settings::load(&config_path)?;
    let keyring = server::open_keyring(&settings, crate::clock::Clock::system())?;
    let sealer = KeyFileSealer::new(&key_file);
    if keyring.sealed_master_key()?.is_none() {
        keyring.initialize(&sealer)?;
    }
    keyring.unseal(&sealer)?;
    // The demo key is granted to the dev app identity (default deny otherwise).
    let grant = Grant::new(DEV_APP, &GrantOperation::ALL);
    match keyring.create_key(
        DEV_TENANT,
        DEMO_KEY,
        Algorithm::Aes256Gcm,
        None,
        vec![grant],
    ) {
        Ok(_) | Err(Error::AlreadyExists) => {}
        Err(e) => return Err(e.into()),
    }
    keyring.seal();
    Ok(config_path)
}

/// The banner with ready-to-paste commands.
pub fn banner(dir: &Path, listen: SocketAddr, ops_listen: SocketAddr) -> String {
    let d = dir.display();
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if listen.is_ipv6() {
        format!("[{}]", listen.ip())
    } else {
        listen.ip().to_string()
    };
    let url = format!("https://{host}:{}", listen.port());
    let app = format!(
        "curl -sS --cacert {d}/pki/ca.pem --cert {d}/pki/app.pem --key {d}/pki/app-key.pem -H 'content-type: application/json'"
    );
    let admin = format!(
        "curl -sS --cacert {d}/pki/ca.pem --cert {d}/pki/admin.pem --key {d}/pki/admin-key.pem -H 'content-type: application/json'"
    );
    format!(
        r#"
================================================================================
  Keyhold DEV MODE — NOT FOR PRODUCTION
  The master key file sits next to the store it unseals: {d}/master.key
================================================================================
  API (mTLS): {url}     ops (health, metrics): http://{ops_listen}
  data dir:   {d}   (config: {d}/kms-server.toml)

  Get a data key for the demo key (app identity), then unwrap it again:

    W=$({app} -d '{{"context":{{"doc":"42"}}}}' {url}/v1/keys/{DEMO_KEY}/datakey | sed -E 's/.*"wrapped":"([^"]+)".*/\1/'); echo "wrapped: $W"
    {app} -d "{{\"wrapped\":\"$W\",\"context\":{{\"doc\":\"42\"}}}}" {url}/v1/unwrap

  Manage keys (admin identity):

    {admin} {url}/v1/keys
    {admin} -X POST -d '{{"name":"orders"}}' {url}/v1/keys
    {admin} -X POST {url}/v1/keys/{DEMO_KEY}/rotate

  Audit trail (auditor identity): kmsctl --dev {d} audit verify

  Health: curl -sS http://{ops_listen}/readyz
================================================================================
"#
    )
}
