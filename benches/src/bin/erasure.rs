//! What erasure keys rooted in the HSM cost on PostgreSQL (`kms_server::storage::erasure::shared`),
//! beside keys sealed under the master key alone on the same store, in one run:
//! key creation (median and p90 ms), reading one erasure key when a node loads a key into
//! its cache (median µs), and a destruction sweep's rotation (re-sealing every remaining
//! erasure key under a new epoch) at each population size.
//!
//! Needs an empty PostgreSQL database (`--url`) and a PKCS#11 token: `SOFTHSM2_CONF`
//! pointing at a SoftHSM configuration, the token label, and the PIN in
//! `KEYHOLD_PKCS11_PIN`. `bash benches/erasure.sh` sets all of that up.
//!
//! Usage: `erasure --url "host=/var/run/postgresql dbname=…" --token keyhold-bench
//! [--creates 300] [--populations 1000,10000]`

use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use kms_client::api::{Algorithm, Grant, GrantOperation};
use kms_server::crypto::seal::{KeyFileSealer, Pkcs11Sealer, Pkcs11Settings};
use kms_server::keyring::Keyring;
use kms_server::storage::erasure::SharedErasure;
use kms_server::storage::{Engine, PgSettings};

#[derive(Parser)]
struct Args {
    /// The empty database (libpq connection string).
    #[arg(long)]
    url: String,
    /// The token's label.
    #[arg(long)]
    token: String,
    /// The PKCS#11 module.
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    module: std::path::PathBuf,
    /// Keys created per variant.
    #[arg(long, default_value_t = 300)]
    creates: usize,
    /// Erasure keys held when a rotation is timed.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    populations: Vec<usize>,
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.9))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = kms_server::storage::open_with(
        Engine::Postgres,
        dir.path(),
        Some(&PgSettings {
            url: args.url.clone(),
            password_file: None,
            tls_ca: None,
            pool_size: 4,
            listen: false,
        }),
    )?;
    let pool = store
        .cluster()
        .map(|c| c.pool())
        .context("a PostgreSQL store")?;
    let token = || {
        Pkcs11Sealer::new(Pkcs11Settings {
            module: args.module.clone(),
            token_label: args.token.clone(),
            key_label: "keyhold-bench".into(),
            pin_file: None,
        })
    };
    let shared = SharedErasure::new(pool, token(), 0);
    // The master key's seal does not matter here: a key file.
    let key_file = dir.path().join("m.key");
    KeyFileSealer::generate(&key_file)?;
    let sealer = KeyFileSealer::new(&key_file);
    let plain = Keyring::new(store.clone()).without_new_erasure_keys();
    plain.initialize(&sealer)?;
    plain.unseal(&sealer)?;
    let rooted = Keyring::new(store.clone()).with_shared_erasure(shared.clone());
    rooted.unseal(&sealer)?;

    println!(
        "key creation on PostgreSQL ({} keys each, one after another):",
        args.creates
    );
    println!("| keys sealed | median ms | p90 ms |");
    println!("|---|---|---|");
    for (label, ring) in [
        ("master key alone", &plain),
        ("erasure key under HSM epoch", &rooted),
    ] {
        let times = (0..args.creates)
            .map(|i| {
                let grant = vec![Grant::new("app", &GrantOperation::ALL)];
                let t = Instant::now();
                ring.create_key(
                    "t",
                    &format!("{}-{i}", label.len()),
                    Algorithm::Aes256Gcm,
                    None,
                    grant,
                )
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<_>, _>>()
            .context("create")?;
        let (p50, p90) = quantiles(times);
        println!("| {label} | {p50:.2} | {p90:.2} |");
    }

    // Reading an erasure key (what a cache miss adds): the slots just made.
    let mut reads = Vec::new();
    for slot in 1..=200u64 {
        let t = Instant::now();
        shared.get(slot)?.context("slot")?;
        reads.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p90) = quantiles(reads);
    println!("\nreading one erasure key (cache miss): median {p50:.0} µs, p90 {p90:.0} µs");

    println!("\nrotation (a destruction sweep re-seals every remaining erasure key):");
    println!("| erasure keys held | rotation s | per key µs |");
    println!("|---|---|---|");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let mut held = args.creates;
    for population in args.populations {
        while held < population {
            shared.allocate(now())?;
            held += 1;
        }
        // One destroyed key makes the epoch dirty.
        let (slot, _) = shared.allocate(now())?;
        shared.erase(slot)?;
        let t = Instant::now();
        shared.rotate(now())?.context("a rotation")?;
        let secs = t.elapsed().as_secs_f64();
        shared.retire(now())?;
        println!("| {held} | {secs:.2} | {:.1} |", secs * 1e6 / held as f64);
    }
    Ok(())
}
