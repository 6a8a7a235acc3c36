//! `kms-server init`: a new store's master key, sealed by the configured method (a key
//! file made if missing, a passphrase that meets the seal's rule, Shamir shares printed
//! once, or a PKCS#11 token); and what the other key-touching subcommands share: the
//! configuration loaded with the process hardened first, a new passphrase read.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use zeroize::Zeroizing;

use crate::app::config::Settings;
use crate::app::server;
use crate::crypto::seal::{KeyFileSealer, SealMethod};
use crate::keyring::Keyring;

/// Loads the configuration and hardens the process (before any secret is read).
pub fn load_hardened(config: &std::path::Path) -> anyhow::Result<Settings> {
    let settings = Settings::load(config)?;
    crate::base::process::harden(&settings.process)?;
    Ok(settings)
}

/// A new passphrase: from a file (its last newline dropped), the environment, or asked
/// twice on the terminal.
pub fn read_new_passphrase(file: Option<PathBuf>) -> anyhow::Result<Zeroizing<String>> {
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

/// Initializes the store of `config`.
pub fn init(
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
            let (sealer, dealt) = crate::crypto::seal::ShamirSealer::deal(shares, threshold)?;
            printed_shares = dealt;
            Box::new(sealer) as Box<dyn crate::crypto::seal::Sealer>
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
            crate::crypto::seal::check_new_passphrase(&pass)?;
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
