//! Fills a dev-mode data directory with N KEKs through the real keyring (the same code
//! `POST /v1/keys` runs: sealed versions, erasure keys, grants), for the scale run
//! (`benches/scale.sh`). Put the directory on tmpfs while filling — each key is one
//! durable commit — then copy it to disk to measure. Also writes `unwrap-bodies.jsonl`:
//! unwrap requests for wrapped DEKs of `--sample` keys spread over the whole key space.
//!
//! Usage: populate --dir D --keys N [--sample 1000] --listen ADDR --ops-listen ADDR

#![allow(missing_docs)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use clap::Parser;
use kms_client::api::{Algorithm, Context, Grant, GrantOperation};
use kms_server::access::policy::{Principal, Role};
use kms_server::crypto::seal::KeyFileSealer;
use kms_server::tools::dev::{DEV_APP, DEV_TENANT};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    keys: u64,
    #[arg(long, default_value_t = 1000)]
    sample: u64,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    ops_listen: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The store only: the public listener's address is written into the config unused.
    let public: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let config = kms_server::tools::dev::prepare(&args.dir, args.listen, args.ops_listen, public)?;
    let settings = kms_server::app::config::Settings::load(&config)?;
    let keyring =
        kms_server::app::server::open_keyring(&settings, kms_server::base::clock::Clock::system())
            .context("opening the store")?;
    keyring.unseal(&KeyFileSealer::new(args.dir.join("master.key")))?;
    let grant = Grant::new(DEV_APP, &[GrantOperation::Datakey, GrantOperation::Unwrap]);
    let app = Principal {
        identity: DEV_APP.into(),
        tenant: DEV_TENANT.into(),
        role: Role::App,
    };
    let every = (args.keys / args.sample.max(1)).max(1);
    let mut bodies =
        std::io::BufWriter::new(std::fs::File::create(args.dir.join("unwrap-bodies.jsonl"))?);
    let started = Instant::now();
    for i in 0..args.keys {
        let name = format!("k{i:08}");
        keyring.create_key(
            DEV_TENANT,
            &name,
            Algorithm::Aes256Gcm,
            None,
            vec![grant.clone()],
        )?;
        if i % every == 0 {
            let ctx: Context = [("i".to_string(), i.to_string())].into();
            let d = keyring.lookups()?.datakey(&app, &name, &ctx)?;
            let wrapped = base64::engine::general_purpose::STANDARD.encode(&d.wrapped);
            writeln!(
                bodies,
                "{}",
                serde_json::json!({"wrapped": wrapped, "context": ctx})
            )?;
        }
        if (i + 1) % 50_000 == 0 {
            eprintln!(
                "{} keys, {:.0} keys/s",
                i + 1,
                (i + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    bodies.flush()?;
    keyring.seal();
    eprintln!(
        "{} keys in {:.1} s",
        args.keys,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
