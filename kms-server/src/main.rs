//! `kms-server`: parse arguments, load the configuration, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kms_server::app::config::Settings;
use kms_server::app::server::{self, Listeners};
use kms_server::tools;
use tokio::net::TcpListener;

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
    let kmip = match settings.kmip.as_ref().map(|k| k.listen) {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the KMIP listener to {addr}"))?,
        ),
        None => None,
    };
    server::run(
        Listeners {
            api,
            ops,
            xks,
            public,
            kmip,
        },
        settings,
        shutdown_signal(),
    )
    .await?;
    Ok(())
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
        } => tools::init::init(
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
        } => tools::restore::restore(config, input, passphrase_file, share_files),
        Command::Serve { config } => {
            let settings = tools::init::load_hardened(&config)?;
            rt.block_on(serve(settings))
        }
        Command::Health { ops } => tools::health::health(ops),
        Command::Migrate { config } => {
            let settings = tools::init::load_hardened(&config)?;
            let store = server::open_store(&settings)?;
            println!("{} store schema is up to date", store.engine());
            Ok(())
        }
        Command::MigrateStore {
            from_config,
            config,
        } => tools::migrate::migrate_store(&from_config, &config),
        Command::XksCredential {
            credentials,
            console_json,
            prefix,
        } => tools::xks_credential::xks_credential(&credentials, &console_json, &prefix),
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
