//! `kmsctl`: the Keyhold operator CLI. Parses arguments, resolves the connection settings
//! (flags, then environment, then profile, then `--dev`), calls `kms_client::Client`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

mod approvals;
mod bulk;
mod files;
mod output;
mod report;
mod secrets;
mod settings;

use settings::Role;

/// Keyhold operator CLI: manage keys, use them, encrypt files.
#[derive(Parser, Debug)]
#[command(name = "kmsctl", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Server endpoint, https://host:port; repeat for failover, tried in order.
    #[arg(
        long = "endpoint",
        global = true,
        env = "KMSCTL_ENDPOINT",
        value_delimiter = ','
    )]
    pub(crate) endpoints: Vec<String>,
    /// CA certificate (PEM) that the server's certificate chains to.
    #[arg(long, global = true, env = "KMSCTL_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Client certificate (PEM): your identity.
    #[arg(long, global = true, env = "KMSCTL_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "KMSCTL_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Profile in the config file.
    #[arg(long, global = true, env = "KMSCTL_PROFILE")]
    pub(crate) profile: Option<String>,
    /// Config file (default: $XDG_CONFIG_HOME/keyhold/kmsctl.toml or ~/.config/keyhold/kmsctl.toml).
    #[arg(long, global = true, env = "KMSCTL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Use the certificates of a `kms-server dev` data dir (admin identity for keys and
    /// sys commands, app identity for key use).
    #[arg(long, global = true, env = "KMSCTL_DEV")]
    pub(crate) dev: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, env = "KMSCTL_OUTPUT")]
    pub(crate) output: Option<Output>,
    /// Per-request timeout, seconds.
    #[arg(long, global = true, default_value_t = 30)]
    pub(crate) timeout: u64,
    /// Largest answer read from the server, MiB (backups: at least 1 GiB). Past it the
    /// command fails rather than fill memory.
    #[arg(
        long,
        global = true,
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..=4096)
    )]
    pub(crate) max_response_mib: u32,
    /// Run the operation an approved request describes (dual control): its id, from
    /// `kmsctl approvals list`. Only its requester can, once.
    #[arg(long, global = true, value_name = "ID")]
    pub(crate) approval: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Output {
    /// Human-readable.
    Table,
    /// JSON, as the API returns it.
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Manage keys (admin).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Get a fresh data key (prints it in clear and wrapped).
    Datakey {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Encryption context entry, key=value (repeatable).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// Wrap a DEK you supply, read from stdin or a file (standard base64).
    ///
    /// The DEK is never taken on the command line: every user of the machine can read
    /// command lines (`ps`), and shells keep them in their history.
    ///
    /// With --public-key FILE (the JSON of `kmsctl keys public-key NAME -o json`), wraps
    /// offline under that RSA key version: no server is contacted.
    Wrap {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Read the DEK (standard base64, 16 to 64 bytes) from this file, or from stdin
        /// with `-`.
        #[arg(
            long = "plaintext-file",
            value_name = "FILE|-",
            required_unless_present = "plaintext"
        )]
        plaintext_file: Option<PathBuf>,
        /// Removed (refused with the reason): the DEK on the command line.
        #[arg(long, hide = true)]
        plaintext: Option<String>,
        /// Encryption context entry, key=value (repeatable).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Wrap offline with this exported RSA public key (JSON).
        #[arg(long = "public-key")]
        public_key: Option<PathBuf>,
    },
    /// Unwrap a wrapped DEK (base64); prints the DEK.
    Unwrap {
        /// The wrapped DEK, standard base64.
        #[arg(long)]
        wrapped: String,
        /// Encryption context entry, key=value (repeatable).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// Re-wrap a wrapped DEK under its key's current version (the DEK stays in the server).
    ///
    /// With --in, rewraps a whole JSON-lines file of {"wrapped": ..., "context": {...}}
    /// (other fields kept) through batch requests, with a progress bar.
    Rewrap {
        /// The wrapped DEK, standard base64.
        #[arg(long, required_unless_present = "input", conflicts_with = "input")]
        wrapped: Option<String>,
        /// Encryption context entry, key=value (repeatable; single DEK only).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// A JSON-lines file of wrapped DEKs (`-` for stdin).
        #[arg(long = "in")]
        input: Option<PathBuf>,
        /// Where to write the rewrapped lines (stdout when omitted); written in full or not
        /// at all.
        #[arg(long = "out", requires = "input")]
        out: Option<PathBuf>,
        /// Items per batch request.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
    },
    /// Run a batch: a JSON file (or stdin) of {"items":[{"op":...}, ...]}.
    Batch {
        /// The batch file; stdin when omitted.
        #[arg(long = "in")]
        input: Option<PathBuf>,
    },
    /// Encrypt a file (or stdin) into the envelope format.
    Encrypt {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Input; stdin when omitted.
        #[arg(long = "in")]
        input: Option<PathBuf>,
        /// Output; stdout when omitted. Written to a temporary file and renamed on success.
        #[arg(long = "out")]
        out: Option<PathBuf>,
        /// Encryption context entry, key=value (repeatable); needed again to decrypt.
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// Decrypt an envelope file (or stdin). The output file appears only if everything
    /// authenticated.
    Decrypt {
        /// Input; stdin when omitted.
        #[arg(long = "in")]
        input: Option<PathBuf>,
        /// Output; stdout when omitted (then only authenticated segments are written, but a
        /// later failure leaves a partial stream: prefer --out).
        #[arg(long = "out")]
        out: Option<PathBuf>,
        /// Encryption context entry, key=value (repeatable).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// Read and verify the audit trail (auditor).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Dual control: requests for approval and the approval policies (admin; --service:
    /// sys).
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCmd),
    /// Seal state (admin).
    #[command(subcommand)]
    Sys(SysCmd),
    /// Write a usage report: one self-contained HTML file (admin; the audit trail with an
    /// auditor identity): unwraps and wraps over time per key and per identity, versions
    /// and their age, keys due for rotation, pending approvals, the brake, recent security
    /// events. No key material; opens offline.
    Report {
        /// The HTML file to write (replaced whole, or left as it was).
        #[arg(long = "out")]
        out: PathBuf,
        /// The period: 7d, 24h, 90m...
        #[arg(long, default_value = "7d")]
        since: String,
        /// A key without a rotation period is due when its current version is this old.
        #[arg(long, default_value = "365d")]
        rotate_after: String,
        /// Audit records read at most (the newest of the period).
        #[arg(long, default_value_t = 2_000_000)]
        max_records: u64,
        /// An auditor's certificate (PEM), to read the audit trail (with --dev: the dev
        /// auditor's).
        #[arg(long, requires = "auditor_key")]
        auditor_cert: Option<PathBuf>,
        /// That auditor's private key (PEM).
        #[arg(long, requires = "auditor_cert")]
        auditor_key: Option<PathBuf>,
    },
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeysCmd {
    /// List the tenant's keys.
    List,
    /// Show one key.
    Get {
        /// Key name.
        name: String,
    },
    /// Create a key.
    Create {
        /// Key name: 1 to 128 of A-Z a-z 0-9 . _ -
        name: String,
        /// Automatic rotation period, e.g. 90d.
        #[arg(long)]
        rotation_period: Option<String>,
        /// aes-256-gcm (default), rsa-oaep-3072-sha256, rsa-oaep-4096-sha256 or
        /// rsa-oaep-2048-sha256 (Microsoft DKE keys only).
        #[arg(long, value_parser = parse_algorithm)]
        algorithm: Option<kms_client::api::Algorithm>,
        /// Let an identity use the key: IDENTITY (every operation) or
        /// IDENTITY=op,op with ops from datakey, wrap, unwrap, rewrap (repeatable).
        /// Without any, no one may use the key (default deny) until `keys grant`.
        #[arg(long = "grant", value_parser = parse_grant)]
        grants: Vec<kms_client::api::Grant>,
    },
    /// Print an RSA key's public key for offline wrapping (app with a wrap or datakey
    /// grant): PEM with -o table, everything (PEM, JWK, id, version) with -o json.
    PublicKey {
        /// Key name.
        name: String,
        /// A version; the current one when omitted.
        #[arg(long)]
        version: Option<u32>,
    },
    /// Add a new version that becomes the wrapping version.
    Rotate {
        /// Key name.
        name: String,
    },
    /// Disable (revoke) a key: no wrap, no unwrap, reversible.
    Disable {
        /// Key name.
        name: String,
    },
    /// Enable a disabled key.
    Enable {
        /// Key name.
        name: String,
    },
    /// Schedule a key's destruction (crypto-shredding): unusable at once, destroyed
    /// after the window unless cancelled.
    ScheduleDeletion {
        /// Key name.
        name: String,
        /// Days until destruction, 7 to 30.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion; the key comes back disabled (enable it to use it).
    CancelDeletion {
        /// Key name.
        name: String,
    },
    /// Retire versions below VERSION: they no longer unwrap. With --dry-run, only report
    /// how many recent unwraps that would have refused.
    MinDecryptVersion {
        /// Key name.
        name: String,
        /// The oldest version that still unwraps.
        version: u32,
        /// Change nothing; report the unwraps of older versions in the window.
        #[arg(long)]
        dry_run: bool,
        /// The dry run's window, days (1 to 30).
        #[arg(long, default_value_t = 7)]
        window_days: u32,
    },
    /// Show who may use a key.
    Grants {
        /// Key name.
        name: String,
    },
    /// Let an identity use a key (adds to the key's grants).
    Grant {
        /// Key name.
        name: String,
        /// The identity, as read from its certificate (e.g. spiffe://acme/app).
        identity: String,
        /// Operation to allow (repeatable; all four when omitted).
        #[arg(long = "op")]
        ops: Vec<kms_client::api::GrantOperation>,
        /// Only when the request's context holds key=value (repeatable).
        #[arg(long = "context-subset", value_parser = parse_kv)]
        context_subset: Vec<(String, String)>,
        /// Only when the request's context is exactly these pairs (repeatable).
        #[arg(long = "context-equals", value_parser = parse_kv)]
        context_equals: Vec<(String, String)>,
    },
    /// Remove every grant of an identity on a key.
    Ungrant {
        /// Key name.
        name: String,
        /// The identity.
        identity: String,
    },
    /// Replace a key's grants with a JSON file (or stdin) of {"grants":[...]}.
    SetGrants {
        /// Key name.
        name: String,
        /// The grants file; stdin when omitted.
        #[arg(long = "in")]
        input: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AuditCmd {
    /// List records.
    List {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Read the whole chain and check it: no record deleted, edited, inserted or reordered,
    /// and the head (with its MAC) matches.
    Verify {
        /// Accept a head whose MAC the server cannot check (sealed server).
        #[arg(long)]
        allow_unverified_head: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SysCmd {
    /// Show the seal state.
    Status,
    /// Unseal: asks for the passphrase (or reads --passphrase-file); without a passphrase
    /// method, retries the server's configured source.
    Unseal {
        /// Read the passphrase from this file (`-`: stdin).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Do not ask for a passphrase (key-file servers).
        #[arg(long)]
        no_passphrase: bool,
        /// Submit one Shamir unseal share (shamir servers): read from this file, or `-`
        /// to be asked for it without echo. Each operator submits their own.
        #[arg(long, conflicts_with_all = ["passphrase_file", "no_passphrase"])]
        share: Option<PathBuf>,
    },
    /// Seal: wipe the master key and every KEK from the server's memory.
    Seal,
    /// List identities locked out after repeated denials.
    Lockouts,
    /// Write an encrypted, integrity-checked backup of every key to a file (restore it
    /// into a new store with `kms-server restore`).
    Backup {
        /// The backup file (written in full or not at all).
        #[arg(long = "out")]
        out: PathBuf,
    },
    /// Replace the master key: every KEK version is re-sealed under a new one, in one
    /// transaction; wrapped DEKs keep working. Take a new backup afterwards.
    RotateMaster {
        /// Passphrase servers: read the passphrase from this file, `-` for stdin (else
        /// asked).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Key-file servers: do not ask for a passphrase.
        #[arg(long)]
        no_passphrase: bool,
    },
    /// List your tenant's identities and roles.
    Identities,
    /// Map an identity (as its certificate carries it) to a role in your tenant.
    SetIdentity {
        /// The identity, e.g. spiffe://acme/billing.
        identity: String,
        /// Its role.
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Remove an identity added with set-identity.
    RemoveIdentity {
        /// The identity.
        identity: String,
    },
    /// The exfiltration brake: its mode and the identities and keys it holds.
    Brake,
    /// Release the exfiltration brake's hold on an identity or a key of your tenant.
    BrakeRelease {
        /// The identity.
        #[arg(long, required_unless_present = "key", conflicts_with = "key")]
        identity: Option<String>,
        /// The key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Let a locked-out identity in again.
    Unlock {
        /// The identity (as in the audit trail, e.g. a SPIFFE URI).
        #[arg(long)]
        identity: String,
    },
}

/// Roles, for `sys set-identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoleArg {
    /// Key management, seal, policy.
    Admin,
    /// Key use (with grants).
    App,
    /// Read-only metadata and audit.
    Auditor,
}

impl From<RoleArg> for kms_client::api::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Admin => Self::Admin,
            RoleArg::App => Self::App,
            RoleArg::Auditor => Self::Auditor,
        }
    }
}

fn parse_grant(s: &str) -> Result<kms_client::api::Grant, String> {
    use kms_client::api::{Grant, GrantOperation};
    let (identity, ops) = match s.rsplit_once('=') {
        Some((identity, ops)) => {
            let ops = ops
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<GrantOperation>, String>>()?;
            (identity, ops)
        }
        None => (s, GrantOperation::ALL.to_vec()),
    };
    if identity.is_empty() {
        return Err(format!("`{s}`: expected IDENTITY or IDENTITY=op,op"));
    }
    Ok(Grant::new(identity, &ops))
}

fn parse_algorithm(s: &str) -> Result<kms_client::api::Algorithm, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!("`{s}`: expected aes-256-gcm, rsa-oaep-3072-sha256, rsa-oaep-4096-sha256 or rsa-oaep-2048-sha256")
    })
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}`: expected key=value")),
    }
}

impl Command {
    fn role(&self) -> Role {
        match self {
            Command::Keys(KeysCmd::PublicKey { .. }) => Role::App,
            // The service's operations belong to the sys role; a tenant admin also reads
            // the status and its tenant's lockouts.
            Command::Sys(
                SysCmd::Seal
                | SysCmd::Unseal { .. }
                | SysCmd::Backup { .. }
                | SysCmd::RotateMaster { .. },
            ) => Role::Sys,
            Command::Approvals(cmd) if cmd.service() => Role::Sys,
            Command::Keys(_) | Command::Sys(_) | Command::Approvals(_) | Command::Report { .. } => {
                Role::Admin
            }
            Command::Audit(_) => Role::Auditor,
            _ => Role::App,
        }
    }
}

/// A client of `resolved`'s endpoints and CA with the identity in `cert` and `key`.
fn connect(
    cli: &Cli,
    resolved: &settings::Resolved,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<kms_client::Client> {
    let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let mut client_key = secrets::read_private_key(key)?;
    let max_response = usize::try_from(u64::from(cli.max_response_mib) << 20)?;
    Ok(kms_client::Client::builder()
        .endpoints(resolved.endpoints.clone())
        .ca_pem_file(&resolved.tls_ca)?
        // The key moves into the builder, which wipes it in turn.
        .identity_pem(cert, std::mem::take(&mut *client_key))
        .request_timeout(Duration::from_secs(cli.timeout))
        .max_response_bytes(max_response)
        .max_backup_bytes(max_response.max(kms_client::DEFAULT_MAX_BACKUP))
        .build()?)
}

/// `kmsctl report`: reads as the admin `client` (and as the auditor given, or the dev
/// one), writes the file whole.
async fn write_report(
    cli: &Cli,
    resolved: &settings::Resolved,
    client: &kms_client::Client,
) -> anyhow::Result<()> {
    let Command::Report {
        out,
        since,
        rotate_after,
        max_records,
        auditor_cert,
        auditor_key,
    } = &cli.command
    else {
        anyhow::bail!("not a report");
    };
    let since = Duration::from_secs(approvals::duration_secs("--since", since)?);
    let rotate_after =
        Duration::from_secs(approvals::duration_secs("--rotate-after", rotate_after)?);
    let dev_auditor = cli
        .dev
        .as_ref()
        .map(|d| (d.join("pki/auditor.pem"), d.join("pki/auditor-key.pem")));
    let auditor = match (auditor_cert, auditor_key, dev_auditor) {
        (Some(c), Some(k), _) => Some(connect(cli, resolved, c, k)?),
        (None, None, Some((c, k))) if c.exists() => Some(connect(cli, resolved, &c, &k)?),
        _ => None,
    };
    let window = report::Window::last(since, std::time::SystemTime::now());
    let report = report::gather(client, auditor.as_ref(), window, rotate_after, *max_records).await;
    let mut staged = files::Staged::create(out)?;
    std::io::Write::write_all(staged.writer(), report.html().as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    staged.commit()?;
    eprintln!("report written to {}", out.display());
    Ok(())
}

/// Why `wrap --plaintext` is refused.
const PLAINTEXT_ON_THE_COMMAND_LINE: &str = "--plaintext is refused: a DEK on the command line \
     is visible to other users of this machine (ps, /proc/PID/cmdline) and stays in your shell \
     history (consider this one exposed). Give it on stdin with --plaintext-file - \
     (for example `kmsctl wrap --key NAME --plaintext-file - < dek.b64`) or in a file with \
     --plaintext-file FILE";

/// The passphrase for `sys unseal` and `sys rotate-master`: from `file` (`-`: stdin),
/// else asked for on a terminal, else none (the server's own source).
fn passphrase(
    file: Option<&std::path::Path>,
    no_passphrase: bool,
) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
    if no_passphrase {
        Ok(None)
    } else if let Some(f) = file {
        secrets::read_secret(f, "passphrase", secrets::MAX_PASSPHRASE).map(Some)
    } else if std::io::stdin().is_terminal() {
        Ok(Some(zeroize::Zeroizing::new(rpassword::prompt_password(
            "Unseal passphrase: ",
        )?)))
    } else {
        Ok(None)
    }
}

/// `kmsctl wrap --public-key FILE`: wraps under an exported RSA public key, no server.
fn wrap_offline(
    cli: &Cli,
    key: &str,
    dek: &[u8],
    context: &[(String, String)],
    file: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let exported: kms_client::api::PublicKeyResponse =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not the JSON of `kmsctl keys public-key -o json`",
                file.display()
            )
        })?;
    if exported.key != key {
        anyhow::bail!(
            "{} is the public key of {}, not of {key}",
            file.display(),
            exported.key
        );
    }
    let wrapper = kms_client::rsa_oaep::OfflineWrapper::from_response(&exported)?;
    let ctx: kms_client::api::Context = context.iter().cloned().collect();
    let wrapped = wrapper.wrap(dek, &ctx)?;
    output::Printer::new(cli.output.unwrap_or(Output::Table)).wrapped(
        &kms_client::api::WrapResponse {
            wrapped: wrapped.into(),
            key: wrapper.key().to_owned(),
            version: wrapper.version(),
        },
    )
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions { shell } = &cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(*shell, &mut cmd, "kmsctl", &mut std::io::stdout());
        return Ok(());
    }
    // The DEK to wrap is read first: a refusal comes before any connection.
    let dek = match &cli.command {
        Command::Wrap {
            plaintext: Some(_), ..
        } => anyhow::bail!(PLAINTEXT_ON_THE_COMMAND_LINE),
        Command::Wrap {
            plaintext_file: Some(source),
            ..
        } => Some(secrets::read_dek(source)?),
        Command::Wrap { .. } => anyhow::bail!("give the DEK with --plaintext-file FILE|-"),
        _ => None,
    };
    if let (
        Command::Wrap {
            key,
            context,
            public_key: Some(file),
            ..
        },
        Some(dek),
    ) = (&cli.command, &dek)
    {
        return wrap_offline(&cli, key, dek, context, file);
    }
    let resolved = settings::resolve(&cli, cli.command.role())?;
    let client = connect(&cli, &resolved, &resolved.tls_cert, &resolved.tls_key)?;
    let client = match &cli.approval {
        Some(id) => client.with_approval(id),
        None => client,
    };
    let out = output::Printer::new(resolved.output);
    let ctx =
        |pairs: &Vec<(String, String)>| pairs.iter().cloned().collect::<kms_client::api::Context>();
    match &cli.command {
        Command::Keys(cmd) => match cmd {
            KeysCmd::List => out.key_list(&client.list_keys().await?),
            KeysCmd::Get { name } => out.key(&client.get_key(name).await?),
            KeysCmd::Create {
                name,
                rotation_period,
                algorithm,
                grants,
            } => {
                let req = kms_client::api::CreateKeyRequest {
                    name: name.clone(),
                    algorithm: *algorithm,
                    rotation_period: rotation_period.clone(),
                    grants: grants.clone(),
                };
                out.key(&client.create_key(&req).await?)
            }
            KeysCmd::PublicKey { name, version } => {
                out.public_key(&client.public_key(name, *version).await?)
            }
            KeysCmd::Rotate { name } => out.key(&client.rotate_key(name).await?),
            KeysCmd::Disable { name } => out.key(&client.disable_key(name).await?),
            KeysCmd::Enable { name } => out.key(&client.enable_key(name).await?),
            KeysCmd::ScheduleDeletion { name, days } => {
                out.key(&client.schedule_deletion(name, *days).await?)
            }
            KeysCmd::CancelDeletion { name } => out.key(&client.cancel_deletion(name).await?),
            KeysCmd::MinDecryptVersion {
                name,
                version,
                dry_run: true,
                window_days,
            } => out.dry_run(
                &client
                    .min_version_dry_run(name, *version, Some(*window_days))
                    .await?,
            ),
            KeysCmd::MinDecryptVersion { name, version, .. } => {
                out.key(&client.set_min_decrypt_version(name, *version).await?)
            }
            KeysCmd::Grants { name } => out.grants(&client.get_key(name).await?),
            KeysCmd::Grant {
                name,
                identity,
                ops,
                context_subset,
                context_equals,
            } => {
                let ops = if ops.is_empty() {
                    kms_client::api::GrantOperation::ALL.to_vec()
                } else {
                    ops.clone()
                };
                let mut grant = kms_client::api::Grant::new(identity.clone(), &ops);
                if !context_subset.is_empty() {
                    grant.constraints.context_subset = Some(ctx(context_subset));
                }
                if !context_equals.is_empty() {
                    grant.constraints.context_equals = Some(ctx(context_equals));
                }
                // One atomic change on the server: a concurrent grant or ungrant by
                // another operator is never undone by this one.
                out.grants(&client.edit_grants(name, vec![grant], Vec::new()).await?)
            }
            KeysCmd::Ungrant { name, identity } => {
                // The read only decides the message; the removal itself is atomic.
                let grants = client.get_key(name).await?.grants;
                if !grants.iter().any(|g| &g.identity == identity) {
                    anyhow::bail!("{identity} has no grant on key {name}: nothing to remove");
                }
                let info = client
                    .edit_grants(name, Vec::new(), vec![identity.clone()])
                    .await?;
                if info.grants.iter().any(|g| &g.identity == identity) {
                    // Another operator granted it again meanwhile.
                    anyhow::bail!("{identity} was granted {name} again by a concurrent change");
                }
                out.grants(&info)
            }
            KeysCmd::SetGrants { name, input } => {
                let text = files::read_all(input.as_deref())?;
                let req: kms_client::api::SetGrantsRequest = serde_json::from_slice(&text)
                    .context("the grants file is not {\"grants\":[{\"identity\":...,\"operations\":[...]}]} JSON")?;
                out.grants(&client.set_grants(name, req.grants).await?)
            }
        },
        Command::Datakey { key, context } => {
            out.datakey(&client.datakey(key, &ctx(context)).await?)
        }
        Command::Wrap { key, context, .. } => {
            let Some(dek) = &dek else {
                anyhow::bail!("give the DEK with --plaintext-file FILE|-")
            };
            out.wrapped(&client.wrap(key, dek, &ctx(context)).await?)
        }
        Command::Unwrap { wrapped, context } => {
            let w = output::b64_decode(wrapped, "--wrapped")?;
            out.unwrapped(&client.unwrap(&w, &ctx(context)).await?)
        }
        Command::Rewrap {
            input: Some(input),
            out: target,
            batch_size,
            ..
        } => {
            let input = (input.as_os_str() != "-").then_some(input.as_path());
            bulk::rewrap_file(&client, input, target.as_deref(), *batch_size).await
        }
        Command::Rewrap {
            wrapped: Some(wrapped),
            context,
            ..
        } => {
            let w = output::b64_decode(wrapped, "--wrapped")?;
            out.wrapped(&client.rewrap(&w, &ctx(context)).await?)
        }
        Command::Rewrap { .. } => anyhow::bail!("give --wrapped or --in"),
        Command::Batch { input } => {
            let text = files::read_all(input.as_deref())?;
            let req: kms_client::api::BatchRequest = serde_json::from_slice(&text)
                .context("the batch file is not {\"items\":[{\"op\":...}]} JSON")?;
            out.batch(&client.batch(req.items).await?)
        }
        Command::Encrypt {
            key,
            input,
            out,
            context,
        } => {
            files::encrypt(
                &client,
                key,
                input.as_deref(),
                out.as_deref(),
                &ctx(context),
            )
            .await
        }
        Command::Decrypt {
            input,
            out,
            context,
        } => files::decrypt(&client, input.as_deref(), out.as_deref(), &ctx(context)).await,
        Command::Audit(cmd) => match cmd {
            AuditCmd::List { after, limit } => out.audit(&client.audit_page(*after, *limit).await?),
            AuditCmd::Verify {
                allow_unverified_head,
            } => match client.audit_verify(!allow_unverified_head).await? {
                Ok(n) => {
                    let checkpoint = client.audit_page(0, 1).await?.checkpoint;
                    match checkpoint {
                        Some(cp) => println!(
                            "audit chain verified: records {} to {n} from the retention checkpoint at record {} (older records archived and purged), checkpoint and head MACs checked by the server",
                            cp.seq + 1,
                            cp.seq
                        ),
                        None => println!(
                            "audit chain verified: {n} records, head MAC checked by the server"
                        ),
                    }
                    Ok(())
                }
                Err(violation) => anyhow::bail!("audit chain verification FAILED: {violation}"),
            },
        },
        Command::Sys(cmd) => match cmd {
            SysCmd::Status => out.status(&client.sys_status().await?),
            SysCmd::Unseal {
                share: Some(source),
                ..
            } => {
                let share = if source.as_os_str() == "-" {
                    zeroize::Zeroizing::new(rpassword::prompt_password("Unseal share: ")?)
                } else {
                    secrets::read_secret(source, "unseal share", secrets::MAX_PASSPHRASE)?
                };
                let status = client.unseal_share(share.trim()).await;
                drop(share);
                out.status(&status?)
            }
            SysCmd::Unseal {
                passphrase_file,
                no_passphrase,
                ..
            } => {
                let pass = passphrase(passphrase_file.as_deref(), *no_passphrase)?;
                let status = client.unseal(pass.as_deref().map(String::as_str)).await;
                // Wiped now, before anything else runs.
                drop(pass);
                out.status(&status?)
            }
            SysCmd::Seal => out.status(&client.seal().await?),
            SysCmd::Lockouts => out.lockouts(&client.lockouts().await?),
            SysCmd::Identities => out.identities(&client.identities().await?),
            SysCmd::RotateMaster {
                passphrase_file,
                no_passphrase,
            } => {
                let pass = passphrase(passphrase_file.as_deref(), *no_passphrase)?;
                let rotated = client
                    .rotate_master(pass.as_deref().map(String::as_str))
                    .await;
                // Wiped now, before anything else runs.
                drop(pass);
                let n = rotated?;
                println!("master key rotated: {n} KEK versions re-sealed (take a new backup)");
                Ok(())
            }
            SysCmd::Backup { out: path } => {
                let backup = client.backup().await?;
                files::write_json_file(path, &backup)?;
                eprintln!("wrote the backup to {}", path.display());
                Ok(())
            }
            SysCmd::SetIdentity { identity, role } => {
                out.identities(&client.set_identity(identity, (*role).into()).await?)
            }
            SysCmd::RemoveIdentity { identity } => {
                out.identities(&client.remove_identity(identity).await?)
            }
            SysCmd::Brake => {
                let status = client.brake_status().await?;
                if resolved.output == Output::Json {
                    return output::json(&status);
                }
                println!("mode: {}, action: {}", status.mode, status.action);
                for h in &status.holds {
                    println!(
                        "held: {:?} {} (tenant {}) for {} s",
                        h.kind, h.name, h.tenant, h.held_secs
                    );
                }
                if status.holds.is_empty() {
                    println!("no holds");
                }
                Ok(())
            }
            SysCmd::BrakeRelease { identity, key } => {
                let req = kms_client::api::ReleaseBrakeRequest {
                    identity: identity.clone(),
                    key: key.clone(),
                };
                if client.release_brake(&req).await? {
                    println!("released");
                } else {
                    println!("it was not held");
                }
                Ok(())
            }
            SysCmd::Unlock { identity } => {
                let lifted = client.lift_lockout(identity).await?;
                if lifted {
                    println!("lifted the lockout of {identity}");
                } else {
                    println!("{identity} was not locked out");
                }
                Ok(())
            }
        },
        Command::Approvals(cmd) => approvals::run(cmd, &client, &out).await,
        Command::Report { .. } => write_report(&cli, &resolved, &client).await,
        Command::Completions { .. } => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    files::remove_partial_files_on_interrupt();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let pending = e.chain().find_map(|c| match c.downcast_ref() {
                Some(kms_client::Error::ApprovalPending(p)) => Some(p),
                _ => None,
            });
            if let Some(p) = pending {
                eprintln!("{}", approvals::pending_text(p));
                return ExitCode::from(approvals::PENDING_EXIT);
            }
            eprintln!("{}", output::explain(&e));
            ExitCode::FAILURE
        }
    }
}
