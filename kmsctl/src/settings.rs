//! Where kmsctl's connection settings come from, in order of precedence: flags, then
//! environment variables (`KMSCTL_*`, merged into the flags by clap), then the profile
//! in the config file, then `--dev <data-dir>`.
//!
//! Relative paths in flags and variables are the working directory's; relative paths in a
//! profile (`tls_ca`, `tls_cert`, `tls_key`, `dev`) are the config file's folder's, so a
//! profile names the same files wherever kmsctl runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::{Cli, Output};

/// Which dev identity a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Admin,
    App,
    Auditor,
    Sys,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[serde(default)]
    endpoints: Vec<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    output: Option<Output>,
    dev: Option<PathBuf>,
}

impl Profile {
    /// The profile with its relative paths taken from `dir` (its config file's folder).
    fn relative_to(mut self, dir: &Path) -> Self {
        for path in [
            &mut self.tls_ca,
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.dev,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
        self
    }
}

/// The settings a command runs with.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls_ca: PathBuf,
    pub(crate) tls_cert: PathBuf,
    pub(crate) tls_key: PathBuf,
    pub(crate) output: Output,
}

fn default_config_path() -> Option<PathBuf> {
    if let Ok(x) = std::env::var("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(x).join("keyhold/kmsctl.toml"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".config/keyhold/kmsctl.toml"))
}

fn load_profile(cli: &Cli) -> anyhow::Result<Profile> {
    let (path, explicit) = match &cli.config {
        Some(p) => (Some(p.clone()), true),
        None => (default_config_path(), false),
    };
    let file = match path {
        Some(p) if p.exists() => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let cfg: ConfigFile = toml::from_str(&text)
                .with_context(|| format!("{}: not a valid kmsctl config", p.display()))?;
            Some((p, cfg))
        }
        Some(p) if explicit => bail!("config file {} does not exist", p.display()),
        _ => None,
    };
    let wanted = cli.profile.clone();
    match file {
        None => match wanted {
            Some(name) => bail!("profile `{name}` requested but there is no config file"),
            None => Ok(Profile::default()),
        },
        Some((path, cfg)) => {
            let name = wanted.or(cfg.default_profile.clone());
            let profile = match name {
                None => cfg.profiles.get("default").cloned().unwrap_or_default(),
                Some(name) => cfg.profiles.get(&name).cloned().with_context(|| {
                    format!(
                        "no profile `{name}` in {} (profiles: {})",
                        path.display(),
                        cfg.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })?,
            };
            let dir = path.parent().unwrap_or(Path::new(""));
            Ok(profile.relative_to(dir))
        }
    }
}

/// Reads the `listen` address from a dev data dir's kms-server.toml.
fn dev_endpoint(dir: &Path) -> anyhow::Result<String> {
    let cfg = dir.join("kms-server.toml");
    let text = std::fs::read_to_string(&cfg).with_context(|| {
        format!(
            "{} not found: is {} a `kms-server dev` data dir? Start one with `kms-server dev --data-dir {}`",
            cfg.display(),
            dir.display(),
            dir.display()
        )
    })?;
    #[derive(Deserialize)]
    struct Listen {
        listen: String,
    }
    let l: Listen =
        toml::from_str(&text).with_context(|| format!("{}: no `listen`", cfg.display()))?;
    let addr: std::net::SocketAddr = l
        .listen
        .parse()
        .with_context(|| format!("{}: bad listen", cfg.display()))?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    Ok(format!("https://{host}:{}", addr.port()))
}

/// Resolves the settings for a command that needs `role` (only used with `--dev`).
pub(crate) fn resolve(cli: &Cli, role: Role) -> anyhow::Result<Resolved> {
    let profile = load_profile(cli)?;
    let dev = cli.dev.clone().or(profile.dev.clone());
    let who = match role {
        Role::Admin => "admin",
        Role::App => "app",
        Role::Auditor => "auditor",
        Role::Sys => "sys",
    };
    let dev_file = |f: String| dev.as_ref().map(|d| d.join("pki").join(f));
    let endpoints = if !cli.endpoints.is_empty() {
        cli.endpoints.clone()
    } else if !profile.endpoints.is_empty() {
        profile.endpoints.clone()
    } else if let Some(d) = &dev {
        vec![dev_endpoint(d)?]
    } else {
        bail!("no endpoint: pass --endpoint https://host:port, set KMSCTL_ENDPOINT, add a profile, or use --dev <data-dir>");
    };
    let pick = |flag: &Option<PathBuf>,
                prof: &Option<PathBuf>,
                dev: Option<PathBuf>,
                what: &str,
                flag_name: &str| {
        flag.clone().or(prof.clone()).or(dev).with_context(|| {
            format!("no {what}: pass {flag_name}, set it in a profile, or use --dev <data-dir>")
        })
    };
    Ok(Resolved {
        endpoints,
        tls_ca: pick(
            &cli.tls_ca,
            &profile.tls_ca,
            dev_file("ca.pem".into()),
            "CA certificate",
            "--tls-ca",
        )?,
        tls_cert: pick(
            &cli.tls_cert,
            &profile.tls_cert,
            dev_file(format!("{who}.pem")),
            "client certificate",
            "--tls-cert",
        )?,
        tls_key: pick(
            &cli.tls_key,
            &profile.tls_key,
            dev_file(format!("{who}-key.pem")),
            "client key",
            "--tls-key",
        )?,
        output: cli.output.or(profile.output).unwrap_or(Output::Table),
    })
}
