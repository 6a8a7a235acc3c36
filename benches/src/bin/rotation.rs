//! Rotation cost against the number of existing versions: one stored record per version,
//! so a rotation should cost the same with 1 or 10 000 versions. For each count, a key
//! gets that many versions, then `--rotations` more are timed one by one (redb store,
//! erasure file, durable commits, as the server runs them); prints the median and p90.
//!
//! Usage: `cargo run --release -p keyhold-benches --bin rotation -- [--rotations 200]`

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use kms_client::api::{Algorithm, Grant, GrantOperation};
use kms_server::crypto::seal::KeyFileSealer;
use kms_server::keyring::Keyring;
use kms_server::storage::erasure::ErasureFile;
use kms_server::storage::RedbStore;

#[derive(Parser)]
struct Args {
    /// Rotations timed per version count.
    #[arg(long, default_value_t = 200)]
    rotations: usize,
    /// Version counts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
    versions: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = Arc::new(RedbStore::open(&dir.path().join("s.redb"))?);
    let key_file = dir.path().join("m.key");
    KeyFileSealer::generate(&key_file)?;
    let sealer = KeyFileSealer::new(&key_file);
    let erasure = Arc::new(ErasureFile::open(&dir.path().join("s.erasure"))?);
    let ring = Keyring::new(store).with_erasure(erasure);
    ring.initialize(&sealer)?;
    ring.unseal(&sealer)?;
    println!("| existing versions | rotations timed | median ms | p90 ms |");
    println!("|---|---|---|---|");
    for versions in args.versions {
        let name = format!("k{versions}");
        let grant = vec![Grant::new("app", &GrantOperation::ALL)];
        ring.create_key("t", &name, Algorithm::Aes256Gcm, None, grant)?;
        for _ in 1..versions {
            ring.rotate("t", &name)?;
        }
        let mut times: Vec<f64> = (0..args.rotations)
            .map(|_| {
                let t = Instant::now();
                ring.rotate("t", &name)
                    .map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()
            .context("rotate")?;
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "| {versions} | {} | {:.2} | {:.2} |",
            args.rotations,
            at(0.5),
            at(0.9)
        );
    }
    Ok(())
}
