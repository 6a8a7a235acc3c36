//! `kms-server xks-credential`: a new SigV4 access key for an XKS key store, appended to
//! the credentials file, and the AWS console's JSON file written once.

use std::path::Path;

use anyhow::Context as _;

/// Makes a credential and writes both files.
pub fn xks_credential(credentials: &Path, console_json: &Path, prefix: &str) -> anyhow::Result<()> {
    use crate::adapters::xks::credentials;
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
