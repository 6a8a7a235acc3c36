//! Test harness: a generated PKI, a real `kms-server` on port 0 over real mTLS, and
//! clients for each identity. Used by the `e2e` integration binary and the crash writer.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod fault_proxy;
pub mod forensics;
pub mod lazyfs;
pub mod pg;
pub mod softhsm;
pub mod xks;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_server::crypto::seal::KeyFileSealer;
use kms_server::keyring::Keyring;
use kms_server::tools::pki::{Issued, Pki};
use kms_server::{app::server, Settings};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TENANT_A: &str = "acme";
pub const TENANT_B: &str = "globex";
pub const ADMIN_A: &str = "spiffe://test/acme/admin";
pub const APP_A: &str = "spiffe://test/acme/app";
pub const ADMIN_B: &str = "spiffe://test/globex/admin";
pub const APP_B: &str = "spiffe://test/globex/app";
pub const AUDITOR_A: &str = "spiffe://test/acme/auditor";
pub const STRANGER: &str = "spiffe://test/nobody";
pub const TENANT_C: &str = "initech";
/// The service operator (role `sys`: seal, unseal, backup, master-key rotation).
pub const SYS: &str = "spiffe://test/ops/sys";

/// Every mapped test identity: (certificate file stem, identity, tenant, role). Three
/// tenants, each with an admin, two apps and an auditor.
pub const IDENTITIES: &[(&str, &str, &str, &str)] = &[
    ("admin-a", ADMIN_A, TENANT_A, "admin"),
    ("app-a", APP_A, TENANT_A, "app"),
    ("app2-a", "spiffe://test/acme/app2", TENANT_A, "app"),
    ("auditor-a", AUDITOR_A, TENANT_A, "auditor"),
    ("admin-b", ADMIN_B, TENANT_B, "admin"),
    ("app-b", APP_B, TENANT_B, "app"),
    ("app2-b", "spiffe://test/globex/app2", TENANT_B, "app"),
    (
        "auditor-b",
        "spiffe://test/globex/auditor",
        TENANT_B,
        "auditor",
    ),
    ("sys", SYS, "ops", "sys"),
    ("admin-c", "spiffe://test/initech/admin", TENANT_C, "admin"),
    ("app-c", "spiffe://test/initech/app", TENANT_C, "app"),
    ("app2-c", "spiffe://test/initech/app2", TENANT_C, "app"),
    (
        "auditor-c",
        "spiffe://test/initech/auditor",
        TENANT_C,
        "auditor",
    ),
];
/// The identity the crash-test writer acts as (tenant `crash`).
pub const CRASH_WRITER: &str = "crash-writer";
/// The second identity the crash writer grants (grant changes under SIGKILL).
pub const CRASH_READER: &str = "spiffe://test/crash/reader";

/// A keyring over `store_path` with its erasure file beside it, as the server opens it
/// (for the crash writer and the checks after a kill).
///
/// Retries for up to 5 s while the store is locked: sled releases its file lock from a
/// background thread after the last handle is dropped, so the next opener (the parent's
/// next check, or the next writer) can briefly find it still held.
///
/// For [`Engine::Postgres`](kms_server::storage::Engine::Postgres), `store_path` is a
/// file holding the database's connection string, and the keyring is opened as a node of
/// a shared store is: with no new erasure keys (`docs/ha.md`), or, when a file
/// `<store_path>.token` names a PKCS#11 token (its label, its PIN file and the module,
/// one per line), with erasure keys in the database under epoch keys in that token,
/// retained for no time.
pub fn keyring_with_erasure(engine: kms_server::storage::Engine, store_path: &Path) -> Keyring {
    if engine == kms_server::storage::Engine::Postgres {
        let url = std::fs::read_to_string(store_path).unwrap();
        let settings = kms_server::storage::PgSettings {
            url: url.trim().to_owned(),
            password_file: None,
            tls_ca: None,
            pool_size: 2,
            listen: false,
        };
        let store = kms_server::storage::open_with(engine, store_path, Some(&settings))
            .unwrap_or_else(|e| panic!("open the PostgreSQL store: {e:?}"));
        let ring = Keyring::new(store.clone()).without_new_erasure_keys();
        let Ok(token) = std::fs::read_to_string(store_path.with_extension("token")) else {
            return ring;
        };
        let mut lines = token.lines();
        let (label, pin_file, module) = (
            lines.next().unwrap(),
            lines.next().unwrap(),
            lines.next().unwrap(),
        );
        let sealer =
            kms_server::crypto::seal::Pkcs11Sealer::new(kms_server::crypto::seal::Pkcs11Settings {
                module: module.into(),
                token_label: label.to_owned(),
                key_label: "keyhold-crash".into(),
                pin_file: Some(pin_file.into()),
            });
        let pool = store.cluster().map(|c| c.pool()).unwrap();
        return ring.with_shared_erasure(kms_server::storage::erasure::SharedErasure::new(
            pool, sealer, 0,
        ));
    }
    let mut tries = 0;
    let store = loop {
        match kms_server::storage::open(engine, store_path) {
            Ok(store) => break store,
            // A sled store stays locked for a moment after its last handle is dropped (its
            // background threads hold the file): `Locked`, or sled's own "could not acquire
            // lock" from builds that did not map it.
            Err(e)
                if tries < 100
                    && (matches!(e, kms_server::storage::StoreError::Locked(_))
                        || format!("{e:?}").contains("lock")) =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("open the store: {e:?}"),
        }
    };
    let erasure =
        kms_server::storage::erasure::ErasureFile::open(&store_path.with_extension("erasure"))
            .unwrap();
    Keyring::new(store).with_erasure(Arc::new(erasure))
}

/// The app identity in the tenant of a test admin certificate (`admin-a`, `admin-b`).
pub fn app_of(admin: &str) -> &'static str {
    match admin {
        "admin-b" => APP_B,
        _ => APP_A,
    }
}

/// A create request for `name` that grants every key operation to `grantee` (grants are
/// default deny: without one, no app may use the key).
pub fn create_granted(name: &str, grantee: &str) -> kms_client::api::CreateKeyRequest {
    kms_client::api::CreateKeyRequest {
        name: name.into(),
        algorithm: None,
        rotation_period: None,
        grants: vec![kms_client::api::Grant::new(
            grantee,
            &kms_client::api::GrantOperation::ALL,
        )],
    }
}

/// Files of a test PKI on disk.
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA, to issue revocation lists (`None` for a copied data dir).
    pub ca: Option<std::sync::Arc<Pki>>,
}

impl TestPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}.pem"))
    }
    pub fn key(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}-key.pem"))
    }
    /// Issues a new client certificate `stem`.pem with URI SAN `uri`.
    pub fn issue(&self, stem: &str, uri: &str) {
        let ca = self.ca.as_ref().expect("a generated PKI");
        write_issued(&self.dir, stem, &ca.issue_client(stem, Some(uri)).unwrap());
    }
    /// Issues a new client certificate `stem`.pem whose only name is the common name `cn`.
    pub fn issue_common_name_only(&self, stem: &str, cn: &str) {
        let ca = self.ca.as_ref().expect("a generated PKI");
        write_issued(&self.dir, stem, &ca.issue_client(cn, None).unwrap());
    }
    /// The CRL file the server watches (`[tls] crls`).
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    /// Writes a CRL revoking nothing whose `nextUpdate` passed a minute ago.
    pub fn expired_crl(&self, number: u64) {
        let now = std::time::SystemTime::now();
        let crl = self
            .ca
            .as_ref()
            .expect("a generated PKI")
            .revocation_list_between(
                &[],
                number,
                now - std::time::Duration::from_secs(2 * 86_400),
                now - std::time::Duration::from_secs(60),
            )
            .unwrap();
        let tmp = self.dir.join("crl.pem.tmp");
        std::fs::write(&tmp, crl).unwrap();
        std::fs::rename(tmp, self.crl()).unwrap();
    }

    /// Revokes these certificates (by file stem): writes a new CRL listing exactly them.
    pub fn revoke(&self, whos: &[&str], number: u64) {
        let pems: Vec<String> = whos
            .iter()
            .map(|w| std::fs::read_to_string(self.cert(w)).unwrap())
            .collect();
        let refs: Vec<&str> = pems.iter().map(String::as_str).collect();
        let crl = self
            .ca
            .as_ref()
            .expect("a generated PKI")
            .revocation_list(&refs, number)
            .unwrap();
        // Write then rename, as an operator's tooling should: the server never reads half.
        let tmp = self.dir.join("crl.pem.tmp");
        std::fs::write(&tmp, crl).unwrap();
        std::fs::rename(tmp, self.crl()).unwrap();
    }
}

fn write_issued(dir: &Path, name: &str, issued: &Issued) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::write(dir.join(format!("{name}.pem")), &issued.cert_pem).unwrap();
    // Private keys are their owner's only, as everywhere (kmsctl refuses others).
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(format!("{name}-key.pem")))
        .unwrap()
        .write_all(issued.key_pem.as_bytes())
        .unwrap();
}

/// Generates the test PKI: server, every [`IDENTITIES`] entry, a stranger (valid CA, no
/// mapping), and `foreign` (same identity as app A, signed by another CA).
pub fn generate_pki(dir: &Path) -> TestPki {
    std::fs::create_dir_all(dir).unwrap();
    let ca = Pki::generate("keyhold test CA").unwrap();
    std::fs::write(dir.join("ca.pem"), ca.ca_pem()).unwrap();
    write_issued(
        dir,
        "server",
        &ca.issue_server(&["localhost", "127.0.0.1"]).unwrap(),
    );
    let people = IDENTITIES
        .iter()
        .map(|(stem, id, _, _)| (*stem, *id))
        .chain([("stranger", STRANGER)]);
    for (name, uri) in people {
        write_issued(dir, name, &ca.issue_client(name, Some(uri)).unwrap());
    }
    let foreign = Pki::generate("someone else's CA").unwrap();
    write_issued(
        dir,
        "foreign",
        &foreign.issue_client("app-a", Some(APP_A)).unwrap(),
    );
    // An empty CRL to start with: the server always runs with revocation checking on.
    std::fs::write(dir.join("crl.pem"), ca.revocation_list(&[], 1).unwrap()).unwrap();
    TestPki {
        dir: dir.to_path_buf(),
        ca: Some(std::sync::Arc::new(ca)),
    }
}

/// How the test server seals.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TestSeal {
    KeyFile,
    Passphrase,
    /// 3 of 5 shares, in [`TestServer::shares`].
    Shamir,
}

pub const TEST_PASSPHRASE: &str = "correct horse battery staple";

/// Writes the server config for a test instance.
pub fn write_config(dir: &Path, seal: TestSeal, extra: &str, tls_extra: &str) -> PathBuf {
    let seal_section = match seal {
        TestSeal::KeyFile => "method = \"key-file\"\nkey_file = \"master.key\"\n".to_string(),
        TestSeal::Passphrase => {
            "method = \"passphrase\"\nargon2 = { m_cost_kib = 8192, t_cost = 1, p_cost = 1 }\n"
                .to_string()
        }
        TestSeal::Shamir => "method = \"shamir\"\n".to_string(),
    };
    let mut identities = String::new();
    for (_, id, tenant, role) in IDENTITIES {
        identities.push_str(&format!(
            "[[identities]]\nidentity = \"{id}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\n\n"
        ));
    }
    let text = format!(
        r#"listen = "127.0.0.1:0"
ops_listen = "127.0.0.1:0"

[store]
path = "store.redb"

[seal]
{seal_section}
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
crls = ["pki/crl.pem"]
{tls_extra}

# CI runs the tests as root; production keeps the defaults (see the hardening test).
[process]
allow_root = true
mlock = "best-effort"

{identities}
{extra}
"#
    );
    let path = dir.join("kms-server.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Two distinct free loopback ports (both held until chosen, so they differ).
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Puts fixed API and ops ports into a config from [`write_config`] (for a server run as
/// a separate process, whose port 0 the test could not learn).
pub fn set_ports(config: &Path, api: u16, ops: u16) {
    let text = std::fs::read_to_string(config).unwrap();
    let fixed = text.replacen(
        "listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{api}\"\nops_listen = \"127.0.0.1:{ops}\""),
        1,
    );
    assert_ne!(fixed, text, "no port-0 listeners in {}", config.display());
    std::fs::write(config, fixed).unwrap();
}

/// The store a test server gets.
enum StoreChoice {
    /// redb in the server's directory.
    Embedded,
    /// PostgreSQL: the database at this connection string, or a fresh one.
    Postgres(Option<String>),
}

/// A running server.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    pub config: PathBuf,
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    /// The XKS listener, when the config has `[xks]`.
    pub xks_addr: Option<SocketAddr>,
    /// The public listener, when the config has `[public]`.
    pub public_addr: Option<SocketAddr>,
    /// The KMIP listener, when the config has `[kmip]`.
    pub kmip_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::StartError>>>,
    /// Seconds added to the system clock for this server (see [`TestServer::advance_clock`]).
    clock_offset: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The unseal shares, for [`TestSeal::Shamir`].
    pub shares: Vec<String>,
}

impl TestServer {
    /// A fresh store sealed with a key file, unsealed at start.
    pub async fn start() -> TestServer {
        Self::start_with(TestSeal::KeyFile, "").await
    }

    /// A fresh store with the given seal method and extra config (appended: tables welcome).
    pub async fn start_with(seal: TestSeal, extra: &str) -> TestServer {
        Self::start_full(seal, extra, "", StoreChoice::Embedded).await
    }

    /// Like [`TestServer::start_with`], with lines added to the `[tls]` table too.
    pub async fn start_with_tls(tls_extra: &str) -> TestServer {
        Self::start_full(TestSeal::KeyFile, "", tls_extra, StoreChoice::Embedded).await
    }

    /// Extra config and lines added to the `[tls]` table.
    pub async fn start_with_both(extra: &str, tls_extra: &str) -> TestServer {
        Self::start_full(TestSeal::KeyFile, extra, tls_extra, StoreChoice::Embedded).await
    }

    /// A server whose store is a fresh PostgreSQL database ([`pg::fresh_database`]).
    pub async fn start_on_postgres() -> TestServer {
        Self::start_on_postgres_with("").await
    }

    /// Like [`TestServer::start_on_postgres`], with extra config (appended).
    pub async fn start_on_postgres_with(extra: &str) -> TestServer {
        Self::start_full(TestSeal::KeyFile, extra, "", StoreChoice::Postgres(None)).await
    }

    /// A server on the PostgreSQL database at `url` (e.g. a [`pg::PrivateServer`]'s).
    pub async fn start_on_postgres_at(url: &str) -> TestServer {
        let store = StoreChoice::Postgres(Some(url.to_owned()));
        Self::start_full(TestSeal::KeyFile, "", "", store).await
    }

    async fn start_full(
        seal: TestSeal,
        extra: &str,
        tls_extra: &str,
        store: StoreChoice,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_pki(&dir.path().join("pki"));
        let config = if let StoreChoice::Postgres(url) = store {
            let config = write_config(dir.path(), seal, extra, tls_extra);
            let url = url.unwrap_or_else(pg::fresh_database);
            let text = std::fs::read_to_string(&config).unwrap().replacen(
                "[store]\npath = \"store.redb\"",
                &format!("[store]\nengine = \"postgres\"\npath = \"node\"\nurl = \"{url}\"\npool_size = 4"),
                1,
            );
            assert!(text.contains("engine = \"postgres\""));
            std::fs::write(&config, text).unwrap();
            config
        } else {
            write_config(dir.path(), seal, extra, tls_extra)
        };
        let settings = Settings::load(&config).unwrap();
        let keyring = Keyring::new(server::open_store(&settings).unwrap());
        let mut shares = Vec::new();
        let sealer: Box<dyn kms_server::crypto::seal::Sealer> = match seal {
            TestSeal::Shamir => {
                let (sealer, dealt) = kms_server::crypto::seal::ShamirSealer::deal(5, 3).unwrap();
                shares = dealt.iter().map(|s| s.to_string()).collect();
                Box::new(sealer)
            }
            TestSeal::KeyFile => {
                KeyFileSealer::generate(settings.seal.key_file.as_ref().unwrap()).unwrap();
                server::sealer_for(&settings.seal, None)
            }
            TestSeal::Passphrase => {
                server::sealer_for(&settings.seal, Some(zeroize_string(TEST_PASSPHRASE)))
            }
        };
        keyring.initialize(sealer.as_ref()).unwrap();
        drop(keyring);
        let mut s = TestServer {
            dir,
            pki,
            config,
            addr: "127.0.0.1:0".parse().unwrap(),
            ops_addr: "127.0.0.1:0".parse().unwrap(),
            xks_addr: None,
            public_addr: None,
            kmip_addr: None,
            stop: None,
            task: None,
            clock_offset: Default::default(),
            shares,
        };
        s.launch().await;
        s
    }

    async fn launch(&mut self) {
        // reqwest's plain-HTTP clients (the ops listener) need a process-wide provider.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let settings = Settings::load(&self.config).unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let xks = match &settings.xks {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        self.xks_addr = xks.as_ref().map(|l| l.local_addr().unwrap());
        // The public listener on the configured port when the test chose one (its URL is
        // in the config, e.g. a CSE kacls_url another server calls), else any.
        let public = match &settings.public {
            Some(p) if p.listen.port() != 0 => Some(TcpListener::bind(p.listen).await.unwrap()),
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        self.public_addr = public.as_ref().map(|l| l.local_addr().unwrap());
        let kmip = match &settings.kmip {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        self.kmip_addr = kmip.as_ref().map(|l| l.local_addr().unwrap());
        self.addr = api.local_addr().unwrap();
        self.ops_addr = ops.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let offset = self.clock_offset.clone();
        let clock = kms_server::base::clock::Clock::ahead_of_system(offset);
        let task = tokio::spawn(server::run_with_clock(
            server::Listeners {
                api,
                ops: Some(ops),
                xks,
                public,
                kmip,
            },
            settings,
            async move {
                let _ = rx.await;
            },
            clock,
        ));
        self.stop = Some(tx);
        self.task = Some(task);
        // Ready when the ops listener answers (the API listener is already bound).
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(self.ops_url("/healthz")).send().await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("server did not come up");
    }

    /// Moves this server's clock forward (rotation periods and deletion windows pass).
    pub fn advance_clock(&self, by: std::time::Duration) {
        self.clock_offset
            .fetch_add(by.as_secs(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops the server and waits until it has released the store.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// A second server over a copy of this (stopped) server's data dir: same master key,
    /// same keys. For failover tests until the shared store exists.
    pub async fn copy_of(&self) -> TestServer {
        assert!(
            self.task.is_none(),
            "stop the server before copying its data dir"
        );
        let dir = tempfile::tempdir().unwrap();
        copy_dir(self.dir.path(), dir.path());
        Self::open_dir(dir).await
    }

    /// A server over a data dir prepared by the test (config `kms-server.toml`, `pki/`,
    /// the seal secret, a store made by `kms-server init` or `restore`).
    pub async fn open_dir(dir: tempfile::TempDir) -> TestServer {
        let mut s = TestServer {
            pki: TestPki {
                dir: dir.path().join("pki"),
                ca: None,
            },
            config: dir.path().join("kms-server.toml"),
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            ops_addr: "127.0.0.1:0".parse().unwrap(),
            xks_addr: None,
            public_addr: None,
            kmip_addr: None,
            stop: None,
            task: None,
            clock_offset: Default::default(),
            shares: Vec::new(),
        };
        s.launch().await;
        s
    }

    /// Another node over this server's PostgreSQL store: the same config, master key (or
    /// token PIN) and PKI, its own local files (audit chain) and ports.
    pub async fn another_node(&self) -> TestServer {
        self.node_on(None).await
    }

    /// Like [`TestServer::another_node`], over the PostgreSQL database at `url` (e.g. a
    /// restored copy of this server's).
    pub async fn node_on_database(&self, url: &str) -> TestServer {
        self.node_on(Some(url)).await
    }

    async fn node_on(&self, url: Option<&str>) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&self.dir.path().join("pki"), &dir.path().join("pki"));
        for f in ["kms-server.toml", "master.key", "hsm.pin"] {
            if self.dir.path().join(f).exists() {
                std::fs::copy(self.dir.path().join(f), dir.path().join(f)).unwrap();
            }
        }
        if let Some(url) = url {
            let config = dir.path().join("kms-server.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            let moved: String = text
                .lines()
                .map(|l| {
                    if l.starts_with("url = ") {
                        format!("url = \"{url}\"\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            assert_ne!(moved, text, "no store url in the config");
            std::fs::write(&config, moved).unwrap();
        }
        let node = Self::open_dir(dir).await;
        node.wait_ready().await;
        node
    }

    /// A server on a fresh PostgreSQL database, sealed with the SoftHSM token `hsm` (so its
    /// keys' erasure keys live in the database under epoch keys in the token), initialized
    /// by `kms-server init`. The process must already see the token: set `SOFTHSM2_CONF`
    /// to `hsm.conf` before anything in it uses PKCS#11.
    pub async fn start_on_postgres_with_token(hsm: &softhsm::SoftHsm, extra: &str) -> TestServer {
        Self::start_with_token(hsm, extra, true).await
    }

    /// A server sealed with the SoftHSM token `hsm`, on a fresh PostgreSQL database
    /// (`on_postgres`) or an embedded store; see [`TestServer::start_on_postgres_with_token`].
    pub async fn start_with_token(
        hsm: &softhsm::SoftHsm,
        extra: &str,
        on_postgres: bool,
    ) -> TestServer {
        assert_eq!(
            std::env::var_os("SOFTHSM2_CONF").as_deref(),
            Some(hsm.conf.as_os_str()),
            "set SOFTHSM2_CONF to the token's configuration first"
        );
        let dir = tempfile::tempdir().unwrap();
        generate_pki(&dir.path().join("pki"));
        let config = write_config(dir.path(), TestSeal::KeyFile, extra, "");
        std::fs::write(dir.path().join("hsm.pin"), format!("{}\n", hsm.pin)).unwrap();
        let mut text = std::fs::read_to_string(&config).unwrap();
        if on_postgres {
            let url = pg::fresh_database();
            text = text.replacen(
                "[store]\npath = \"store.redb\"",
                &format!("[store]\nengine = \"postgres\"\npath = \"node\"\nurl = \"{url}\"\npool_size = 4"),
                1,
            );
            assert!(text.contains("engine = \"postgres\""));
        }
        let text = text.replacen(
            "method = \"key-file\"\nkey_file = \"master.key\"\n",
            &format!(
                "method = \"pkcs11\"\n[seal.pkcs11]\nmodule = \"{}\"\n\
                     token_label = \"{}\"\npin_file = \"hsm.pin\"\n",
                softhsm::MODULE,
                hsm.token_label
            ),
            1,
        );
        assert!(text.contains("method = \"pkcs11\""));
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(workspace_bin("kms-server"))
            .args(["init", "--config"])
            .arg(&config)
            .env(hsm.env().0, hsm.env().1)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kms-server init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let node = Self::open_dir(dir).await;
        node.wait_ready().await;
        node
    }

    /// Another node over this server's PostgreSQL store, run as its own `kms-server serve`
    /// process, so a test can kill it with SIGKILL mid-request.
    pub async fn node_process(&self) -> NodeProcess {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&self.dir.path().join("pki"), &dir.path().join("pki"));
        for f in ["kms-server.toml", "master.key"] {
            std::fs::copy(self.dir.path().join(f), dir.path().join(f)).unwrap();
        }
        let config = dir.path().join("kms-server.toml");
        let (api, ops) = free_ports();
        set_ports(&config, api, ops);
        let log = dir.path().join("server.log");
        let child = std::process::Command::new(workspace_bin("kms-server"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut node = NodeProcess {
            dir,
            child,
            api,
            ops,
        };
        node.wait_ready().await;
        node
    }

    /// Waits (up to 10 s) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..500 {
            if let Ok(r) = client.get(self.ops_url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("server not ready after 10 s");
    }

    /// Starts a stopped server again (new ports).
    pub async fn start_again(&mut self) {
        assert!(self.task.is_none());
        self.launch().await;
    }

    /// Stops and starts again on the same store and config (new ports).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops_addr)
    }

    /// An mTLS client presenting `who`'s certificate (`None`: no certificate).
    pub fn client(&self, who: Option<&str>) -> reqwest::Client {
        client_for(&self.pki, who, false)
    }

    /// A `kms_client::Client` for `who` on this server.
    pub fn kms_client(&self, who: &str) -> kms_client::Client {
        kms_client_for(&self.pki, who, &[self.url("")])
    }

    /// Same, HTTP/2 only.
    pub fn client_h2(&self, who: Option<&str>) -> reqwest::Client {
        client_for(&self.pki, who, true)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A workspace binary built next to the running test (`target/<profile>/<name>`).
/// `cargo test --workspace` builds `kms-server` and `kmsctl` because their packages have
/// integration tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p kmsctl -p kms-server`, or run `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// Runs `cmd`, asserts it exited 0 (showing its stderr if not), and returns its stdout.
pub fn stdout_of(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn zeroize_string(s: &str) -> zeroize::Zeroizing<String> {
    zeroize::Zeroizing::new(s.to_owned())
}

/// A node run as its own `kms-server serve` process ([`TestServer::node_process`]);
/// killed when dropped.
pub struct NodeProcess {
    pub dir: tempfile::TempDir,
    pub child: std::process::Child,
    pub api: u16,
    pub ops: u16,
}

impl NodeProcess {
    /// The API URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.api)
    }

    /// Waits (up to 30 s) until `/readyz` answers 200; panics with the log if the process
    /// exited.
    pub async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        for _ in 0..1500 {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{}/readyz", self.ops))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the node exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("node not ready after 30 s");
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `kms_client::Client` for `who` over `endpoints`, in order.
pub fn kms_client_for(pki: &TestPki, who: &str, endpoints: &[String]) -> kms_client::Client {
    kms_client::Client::builder()
        .endpoints(endpoints.iter().cloned())
        .ca_pem_file(pki.ca())
        .unwrap()
        .identity_pem_files(pki.cert(who), pki.key(who))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(2))
        .request_timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A TCP connection to `to` from the source address `from` (Linux routes all of 127/8 to
/// loopback: tests play several network sources with 127.0.0.x).
pub async fn connect_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// A rustls server config with the test PKI's server certificate (no client
/// authentication): for test peers that play a remote service (a webhook, a fake server).
pub fn rustls_server(pki: &TestPki) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            kms_server::base::pem::load_certs(&pki.cert("server")).unwrap(),
            kms_server::base::pem::load_key(&pki.key("server")).unwrap(),
        )
        .unwrap()
}

/// A rustls client config trusting the test CA, with `who`'s identity if given.
pub fn rustls_client(pki: &TestPki, who: Option<&str>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in kms_server::base::pem::load_certs(&pki.ca()).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match who {
        Some(who) => builder
            .with_client_auth_cert(
                kms_server::base::pem::load_certs(&pki.cert(who)).unwrap(),
                kms_server::base::pem::load_key(&pki.key(who)).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

pub fn client_for(pki: &TestPki, who: Option<&str>, h2: bool) -> reqwest::Client {
    let mut tls = rustls_client(pki, who);
    tls.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .timeout(std::time::Duration::from_secs(20));
    if h2 {
        b = b.http2_prior_knowledge();
    }
    b.build().unwrap()
}

/// A local token issuer for the end-user protocols' tests (DKE, CSE, EKM): an RSA-2048
/// key, its JWK set, and RS256 tokens signed with it (by `jsonwebtoken`).
pub struct TokenIssuer {
    /// The private key, PKCS#8 PEM (for tools we did not write, e.g. PyJWT).
    pub pem: String,
    /// The key id in the JWK set and in every token's header.
    pub kid: String,
    /// The JWK set (`{"keys": [...]}`) verifiers are given.
    pub jwks: serde_json::Value,
}

impl TokenIssuer {
    /// A new issuer whose key is `kid`.
    pub fn new(kid: &str) -> TokenIssuer {
        use aws_lc_rs::encoding::AsDer as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
        use rsa::traits::PublicKeyParts as _;
        let generated =
            aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .unwrap();
        let key = rsa::RsaPrivateKey::from_pkcs8_der(generated.as_der().unwrap().as_ref()).unwrap();
        TokenIssuer {
            pem: key.to_pkcs8_pem(Default::default()).unwrap().to_string(),
            kid: kid.to_owned(),
            jwks: serde_json::json!({"keys": [{
                "kty": "RSA", "kid": kid, "use": "sig",
                "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            }]}),
        }
    }

    /// Writes the JWK set to `path`.
    pub fn write_jwks(&self, path: &Path) {
        std::fs::write(path, self.jwks.to_string()).unwrap();
    }

    /// An RS256 token of `claims`, under this issuer's key id.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(self.pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }
}

/// A client Keyhold did not write, run as a child process that reads one JSON command per
/// line on stdin and answers one JSON line on stdout (`tests/fixtures/*/…py`); killed
/// when dropped.
pub struct JsonLines {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl JsonLines {
    /// Starts `cmd`; `needs` says what CI installs for it, should it not start.
    pub fn spawn(mut cmd: std::process::Command, needs: &str) -> JsonLines {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}: {needs}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        JsonLines {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends `cmd`, returns the answer.
    pub fn call(&mut self, cmd: serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?} for {cmd}"))
    }
}

impl Drop for JsonLines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
