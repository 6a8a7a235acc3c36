//! `kms-server migrate-store`: a verified copy of a store into another engine, with its
//! audit chain and erasure keys.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::app::config::Settings;
use crate::app::server;

use super::init::load_hardened;

/// Copies the store of `from_config` into the (empty) store of `config`.
pub fn migrate_store(from_config: &Path, config: &Path) -> anyhow::Result<()> {
    let from = Settings::load(from_config)?;
    let to = load_hardened(config)?;
    // The files beside the store go first, and only into places that are free: a failed
    // copy leaves the target store empty, so the command can simply be run again.
    let from_erasure = from.store.path.with_extension("erasure");
    // Into a shared store with erasure keys in the database, the erasure keys move into
    // its table (below) rather than into a file on this node.
    let adopt = to.store.engine == crate::storage::Engine::Postgres
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
    if to.store.engine != crate::storage::Engine::Postgres && to.audit_path.exists() {
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
    let copied = crate::storage::migrate::migrate(source.as_ref(), target.as_ref())?;
    // Then the audit chain: into PostgreSQL in one transaction, refused if the database
    // already holds a chain; into a file, which must not exist.
    let records = crate::security::audit::copy_chain(
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
        let file = crate::storage::erasure::ErasureFile::open(&from_erasure)?;
        let keyring = server::open_keyring(&to, crate::base::clock::Clock::system())?;
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
