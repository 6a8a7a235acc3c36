//! `kms-server restore`: a verified backup installed into an empty store, unsealed by the
//! method it was sealed with.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use zeroize::Zeroizing;

use crate::app::server;
use crate::crypto::seal::SealMethod;
use crate::keyring::Keyring;

use super::init::{load_hardened, read_new_passphrase};

/// Restores the backup `input` into the store of `config`.
pub fn restore(
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
                let share = crate::crypto::seal::ShareInput::parse(&text)?;
                if shares
                    .iter()
                    .any(|s: &crate::crypto::seal::ShareInput| s.x() == share.x())
                {
                    bail!("{}: the same share twice", f.display());
                }
                shares.push(share);
            }
            if shares.is_empty() {
                bail!("the shamir method needs the shares: --share-file <file>, once per share");
            }
            Box::new(crate::crypto::seal::ShamirSealer::from_shares(shares))
        }
    };
    let text = std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
    let backup: crate::keyring::backup::Backup = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a Keyhold backup", input.display()))?;
    let keyring = Keyring::new(server::open_store(&settings)?);
    let rows = crate::keyring::backup::restore(
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
