//! `kms-server`: parse arguments, load the configuration, call the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use kms_server::app::config::Settings;
use kms_server::app::server::{self, Listeners};
use kms_server::crypto::seal::{KeyFileSealer, SealMethod};
use kms_server::keyring::Keyring;
use tokio::net::TcpListener;
use zeroize::Zeroizing;

/// mimalloc instead of glibc's allocator: allocation and (cross-thread) free were ~15 % of
/// the server's CPU samples under load (BENCHMARKS.md, audit section).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kms-server",
    version,
    about = "Keyhold: customer-held key management (HYOK) over mutual TLS"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the store and seal a new master key (key file or passphrase, per the config).
    Init {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// For the passphrase method: read the passphrase from this file (else
        /// KEYHOLD_PASSPHRASE, else prompt).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// For the shamir method: how many unseal shares to make (printed once, on stdout).
        #[arg(long, default_value_t = 5)]
        shares: u8,
        /// For the shamir method: how many shares unseal.
        #[arg(long, default_value_t = 3)]
        threshold: u8,
        /// Succeed without doing anything when the store is already initialized (for an
        /// init step that runs before every start, as in the compose example). Without
        /// it, `init` on an initialized store fails.
        #[arg(long)]
        if_uninitialized: bool,
    },
    /// Restore a backup (`kmsctl backup`) into a new, never initialized store, with the
    /// same seal secret as the backed-up server. Verifies everything before writing.
    Restore {
        /// Configuration file (its store must not be initialized).
        #[arg(long, short)]
        config: PathBuf,
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// For the passphrase method: read the passphrase from this file (else
        /// KEYHOLD_PASSPHRASE, else prompt).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// For the shamir method: a file holding one unseal share (repeat for each share;
        /// the threshold is needed).
        #[arg(long = "share-file")]
        share_files: Vec<PathBuf>,
    },
    /// Serve the API (mTLS) and the ops endpoints.
    Serve {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Throwaway dev server with generated certificates and a demo key. NOT FOR PRODUCTION.
    Dev {
        /// Where to keep the dev PKI, key file and store (reused between runs).
        #[arg(long, default_value = "./keyhold-dev")]
        data_dir: PathBuf,
        /// API address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Ops address (health, metrics).
        #[arg(long, default_value = "127.0.0.1:9443")]
        ops_listen: SocketAddr,
        /// Public listener of the end-user protocols (Microsoft DKE).
        #[arg(long, default_value = "127.0.0.1:8444")]
        public_listen: SocketAddr,
        #[command(subcommand)]
        action: Option<DevAction>,
    },
    /// Probe a running server's ops listener (`GET /healthz`); exit 0 when it answers
    /// 200. For container health checks: the image has no shell or curl.
    Health {
        /// The ops listener's address.
        #[arg(long, default_value = "127.0.0.1:9443")]
        ops: SocketAddr,
    },
    /// Make a new SigV4 credential for an AWS XKS key store: appends it to the store's
    /// credentials file (created with mode 600; the server picks it up without restart)
    /// and writes the JSON file the AWS KMS console accepts (mode 600). The secret is
    /// never printed.
    XksCredential {
        /// The key store's credentials file (`[[xks.stores]] credentials`).
        #[arg(long)]
        credentials: PathBuf,
        /// Where to write the AWS console's configuration file.
        #[arg(long)]
        console_json: PathBuf,
        /// The key store's URI prefix (`[[xks.stores]] prefix`), for the console file.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Apply the store's schema migrations (PostgreSQL; `serve` also applies them at
    /// start) and exit.
    Migrate {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy a whole store into another engine (an embedded store into PostgreSQL, or
    /// back), verify it entry by entry, and copy the audit chain and erasure files beside
    /// it. The target must be new; stop the server first. The same seal secret opens it.
    MigrateStore {
        /// The configuration of the store to copy.
        #[arg(long)]
        from_config: PathBuf,
        /// The configuration of the new store (its `[store]`, `[audit] path`).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// What `kms-server dev` can do besides serving.
#[derive(Subcommand)]
enum DevAction {
    /// Print a bearer token from the dev token issuer (for trying the end-user protocols
    /// with curl).
    Token {
        /// The dev data dir (as given to `kms-server dev`).
        #[arg(long, default_value = "./keyhold-dev")]
        data_dir: PathBuf,
        /// The protocol the token is for.
        #[arg(long, value_enum, default_value = "dke")]
        protocol: DevProtocol,
        /// The user (`email` claim).
        #[arg(long)]
        email: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// CSE: the role in the authorization token (reader, writer, upgrader).
        #[arg(long, default_value = "reader")]
        role: String,
        /// CSE: the resource name in the authorization token.
        #[arg(long, default_value = "dev-resource")]
        resource: String,
    },
}

/// End-user protocols with dev tokens.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DevProtocol {
    /// Microsoft Double Key Encryption: one bearer token.
    Dke,
    /// Google Workspace CSE: `{"authentication": ..., "authorization": ...}`.
    Cse,
    /// Google Cloud EKM: one bearer token (`--email`: the caller, a service agent).
    Ekm,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn migrate_store(from_config: &Path, config: &Path) -> anyhow::Result<()> {
    let from = Settings::load(from_config)?;
    let to = load_hardened(config)?;
    // The files beside the store go first, and only into places that are free: a failed
    // copy leaves the target store empty, so the command can simply be run again.
    let from_erasure = from.store.path.with_extension("erasure");
    // Into a shared store with erasure keys in the database, the erasure keys move into
    // its table (below) rather than into a file on this node.
    let adopt = to.store.engine == kms_server::storage::Engine::Postgres
        && to.store.shared_erasure_retention_secs.is_some();
    if from.store.shared_erasure_retention_secs.is_some() && !adopt {
        anyhow::bail!(
            "the source keeps its erasure keys in the database under HSM epoch keys, and the target cannot: \
             migrate into a PostgreSQL store sealed with the same HSM (docs/ha.md)"
        );
    }
    let files: Vec<(PathBuf, PathBuf)> = if adopt {
        Vec::new()
    } else {
        vec![(
            from_erasure.clone(),
            to.store.path.with_extension("erasure"),
        )]
    };
    if to.store.engine != kms_server::storage::Engine::Postgres && to.audit_path.exists() {
        anyhow::bail!(
            "{} exists: the new store's files must not (remove it if it is left from a failed run)",
            to.audit_path.display()
        );
    }
    for (src, dst) in &files {
        if src == dst {
            continue;
        }
        if dst.exists() {
            anyhow::bail!(
                "{} exists: the new store's files must not (remove it if it is left from a failed run)",
                dst.display()
            );
        }
    }
    let source = server::open_store(&from)?;
    let target = server::open_store(&to)?;
    let copied = kms_server::storage::migrate::migrate(source.as_ref(), target.as_ref())?;
    // Then the audit chain: into PostgreSQL in one transaction, refused if the database
    // already holds a chain; into a file, which must not exist.
    let records = kms_server::security::audit::copy_chain(
        source.as_ref(),
        &from.audit_path,
        target.as_ref(),
        &to.audit_path,
    )?;
    for (src, dst) in &files {
        if src != dst && src.exists() {
            std::fs::copy(src, dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            std::fs::File::open(dst)?.sync_all()?;
        }
    }
    println!(
        "copied the {} store into the {} store and verified it:",
        source.engine(),
        target.engine()
    );
    for (table, n, hash) in &copied.tables {
        println!("  {table:<10} {n:>9} entries  sha256 {}", &hash[..16]);
    }
    println!("  audit      {records:>9} records, chain head and MAC kept");
    if adopt && from_erasure.exists() {
        drop(target);
        let file = kms_server::storage::erasure::ErasureFile::open(&from_erasure)?;
        let keyring = server::open_keyring(&to, kms_server::base::clock::Clock::system())?;
        let moved = keyring.adopt_erasure_keys(&file)?;
        println!(
            "  erasure    {moved:>9} keys moved from {} into the database, under the HSM's epoch key",
            from_erasure.display()
        );
    }
    for (src, dst) in &files {
        if src != dst && src.exists() {
            println!("  {} -> {}", src.display(), dst.display());
        }
    }
    Ok(())
}

fn xks_credential(credentials: &Path, console_json: &Path, prefix: &str) -> anyhow::Result<()> {
    use kms_server::adapters::xks::credentials;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (id, secret) = credentials::generate()?;
    let json = credentials::console_json(prefix, &id, &secret);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(console_json)
        .and_then(|mut f| f.write_all(json.as_bytes()))
        .with_context(|| format!("writing {} (it must not exist yet)", console_json.display()))?;
    credentials::append(credentials, &id, &secret)
        .with_context(|| format!("appending to {}", credentials.display()))?;
    credentials::load(credentials).map_err(anyhow::Error::msg)?;
    println!(
        "new access key id {id}: added to {}; the AWS console file is {}",
        credentials.display(),
        console_json.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let api = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the API listener to {}", settings.listen))?;
    let ops = match settings.ops_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the ops listener to {addr}"))?,
        ),
        None => None,
    };
    let xks = match settings.xks.as_ref().map(|x| x.listen) {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the XKS listener to {addr}"))?,
        ),
        None => None,
    };
    let public = match settings.public.as_ref().map(|p| p.listen) {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the public listener to {addr}"))?,
        ),
        None => None,
    };
    server::run(
        Listeners {
            api,
            ops,
            xks,
            public,
        },
        settings,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

fn read_new_passphrase(file: Option<PathBuf>) -> anyhow::Result<Zeroizing<String>> {
    if let Some(f) = file {
        let text = Zeroizing::new(
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
        );
        return Ok(Zeroizing::new(
            text.trim_end_matches(['\n', '\r']).to_owned(),
        ));
    }
    if let Ok(p) = std::env::var(server::PASSPHRASE_ENV) {
        return Ok(Zeroizing::new(p));
    }
    let first = Zeroizing::new(rpassword::prompt_password("New unseal passphrase: ")?);
    let second = Zeroizing::new(rpassword::prompt_password("Repeat it: ")?);
    if *first != *second {
        bail!("the passphrases differ");
    }
    Ok(first)
}

/// Loads the configuration and hardens the process (before any secret is read).
fn load_hardened(config: &std::path::Path) -> anyhow::Result<Settings> {
    let settings = Settings::load(config)?;
    kms_server::base::process::harden(&settings.process)?;
    Ok(settings)
}

fn init(
    config: PathBuf,
    passphrase_file: Option<PathBuf>,
    (shares, threshold): (u8, u8),
    if_uninitialized: bool,
) -> anyhow::Result<()> {
    let settings = load_hardened(&config)?;
    let keyring = Keyring::new(server::open_store(&settings)?);
    if if_uninitialized && keyring.sealed_master_key()?.is_some() {
        eprintln!(
            "the {} store at {} is already initialized: nothing to do",
            keyring.store().engine(),
            settings.store.path.display()
        );
        return Ok(());
    }
    let mut printed_shares = Vec::new();
    let sealer = match settings.seal.method {
        SealMethod::Shamir => {
            let (sealer, dealt) = kms_server::crypto::seal::ShamirSealer::deal(shares, threshold)?;
            printed_shares = dealt;
            Box::new(sealer) as Box<dyn kms_server::crypto::seal::Sealer>
        }
        SealMethod::KeyFile => {
            let path = settings
                .seal
                .key_file
                .clone()
                .context("seal.key_file is required")?;
            if !path.exists() {
                KeyFileSealer::generate(&path)?;
                eprintln!("wrote a new key file: {} (mode 0600). Back it up: without it the store cannot be unsealed.", path.display());
            }
            server::sealer_for(&settings.seal, None)
        }
        // Creates the wrapping key in the token when it has none with the label.
        SealMethod::Pkcs11 => server::sealer_for(&settings.seal, None),
        _ => {
            let pass = read_new_passphrase(passphrase_file)?;
            if pass.chars().count() < 12 {
                bail!("the passphrase must be at least 12 characters");
            }
            server::sealer_for(&settings.seal, Some(pass))
        }
    };
    keyring.initialize(sealer.as_ref())?;
    eprintln!(
        "initialized the {} store at {} (sealed with {})",
        keyring.store().engine(),
        settings.store.path.display(),
        settings.seal.method.as_str()
    );
    if !printed_shares.is_empty() {
        eprintln!(
            "{} unseal shares follow, any {threshold} unseal. They are shown ONCE and kept nowhere: \
             give one to each operator now (`kmsctl sys unseal --share <file or ->`).",
            printed_shares.len()
        );
        for s in &printed_shares {
            println!("{}", s.as_str());
        }
    }
    Ok(())
}

fn restore(
    config: PathBuf,
    input: PathBuf,
    passphrase_file: Option<PathBuf>,
    share_files: Vec<PathBuf>,
) -> anyhow::Result<()> {
    let settings = load_hardened(&config)?;
    let sealer = match settings.seal.method {
        SealMethod::KeyFile | SealMethod::Pkcs11 => server::sealer_for(&settings.seal, None),
        SealMethod::Passphrase => {
            let pass = match passphrase_file {
                Some(f) => read_new_passphrase(Some(f))?,
                None => match std::env::var(server::PASSPHRASE_ENV) {
                    Ok(p) => Zeroizing::new(p),
                    Err(_) => Zeroizing::new(rpassword::prompt_password("Unseal passphrase: ")?),
                },
            };
            server::sealer_for(&settings.seal, Some(pass))
        }
        SealMethod::Shamir => {
            let mut shares = Vec::new();
            for f in &share_files {
                let text = Zeroizing::new(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?,
                );
                let share = kms_server::crypto::seal::ShareInput::parse(&text)?;
                if shares
                    .iter()
                    .any(|s: &kms_server::crypto::seal::ShareInput| s.x() == share.x())
                {
                    bail!("{}: the same share twice", f.display());
                }
                shares.push(share);
            }
            if shares.is_empty() {
                bail!("the shamir method needs the shares: --share-file <file>, once per share");
            }
            Box::new(kms_server::crypto::seal::ShamirSealer::from_shares(shares))
        }
        _ => bail!("this seal method cannot restore yet"),
    };
    let text = std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
    let backup: kms_server::keyring::backup::Backup = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a Keyhold backup", input.display()))?;
    let keyring = Keyring::new(server::open_store(&settings)?);
    let rows = kms_server::keyring::backup::restore(
        &keyring,
        sealer.as_ref(),
        &backup,
        &settings.store.path.with_extension("erasure"),
    )?;
    eprintln!(
        "restored {rows} records from a backup made {} into {}",
        backup.created_at,
        settings.store.path.display()
    );
    Ok(())
}

fn health(ops: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&ops, timeout)
        .with_context(|| format!("connecting to the ops listener at {ops}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {ops}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = Vec::new();
    s.take(4096).read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or("no answer");
    if status.starts_with("HTTP/1.1 200 ") || status.starts_with("HTTP/1.0 200 ") {
        println!("{ops}: healthy");
        Ok(())
    } else {
        bail!("{ops}/healthz answered: {status}")
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = match cli.command {
        Command::Init {
            config,
            passphrase_file,
            shares,
            threshold,
            if_uninitialized,
        } => init(
            config,
            passphrase_file,
            (shares, threshold),
            if_uninitialized,
        ),
        Command::Restore {
            config,
            input,
            passphrase_file,
            share_files,
        } => restore(config, input, passphrase_file, share_files),
        Command::Serve { config } => {
            let settings = load_hardened(&config)?;
            rt.block_on(serve(settings))
        }
        Command::Health { ops } => health(ops),
        Command::Migrate { config } => {
            let settings = load_hardened(&config)?;
            let store = server::open_store(&settings)?;
            println!("{} store schema is up to date", store.engine());
            Ok(())
        }
        Command::MigrateStore {
            from_config,
            config,
        } => migrate_store(&from_config, &config),
        Command::XksCredential {
            credentials,
            console_json,
            prefix,
        } => xks_credential(&credentials, &console_json, &prefix),
        Command::CheckConfig { config } => {
            let settings = Settings::load(&config)?;
            for store in settings.xks.iter().flat_map(|x| &x.stores) {
                kms_server::adapters::xks::credentials::load(&store.credentials)
                    .map_err(|e| anyhow::anyhow!("xks store {}: credentials: {e}", store.name))?;
            }
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Dev {
            action:
                Some(DevAction::Token {
                    data_dir,
                    protocol,
                    email,
                    ttl_secs,
                    role,
                    resource,
                }),
            ..
        } => {
            let what = match protocol {
                DevProtocol::Dke => kms_server::tools::dev::DevToken::Dke,
                DevProtocol::Cse => kms_server::tools::dev::DevToken::Cse { role, resource },
                DevProtocol::Ekm => kms_server::tools::dev::DevToken::Ekm,
            };
            let ttl = std::time::Duration::from_secs(ttl_secs);
            println!(
                "{}",
                kms_server::tools::dev::token(&data_dir, &email, ttl, &what)?
            );
            Ok(())
        }
        Command::Dev {
            data_dir,
            listen,
            ops_listen,
            public_listen,
            action: None,
        } => {
            // Hardened before the dev key file and store are touched, with the dev
            // config's `[process]` settings.
            kms_server::base::process::harden(&kms_server::base::process::ProcessSettings {
                mlock: kms_server::base::process::Mlock::BestEffort,
                allow_root: true,
            })?;
            let config =
                kms_server::tools::dev::prepare(&data_dir, listen, ops_listen, public_listen)?;
            let settings = Settings::load(&config)?;
            eprintln!(
                "{}",
                kms_server::tools::dev::banner(&data_dir, listen, ops_listen, public_listen)
            );
            rt.block_on(serve(settings))
        }
    };
    // Nothing uses the HSM once the runtime has stopped: finalize its module before exit
    // (see `seal::pkcs11::finalize`).
    drop(rt);
    kms_server::crypto::seal::pkcs11_finalize();
    result
}
