//! `kms_client::Client::unwrap` latency at concurrency 1: one caller, sequential unwraps
//! through the real client (pooling, retries, JSON, base64), for `duration` seconds after
//! a warm-up. Loopback only; stops by itself. Prints one JSON line like `loadgen`.

#![allow(missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Parser)]
struct Args {
    /// Endpoint, https://127.0.0.1:PORT (loopback only).
    #[arg(long)]
    endpoint: String,
    /// File with the unwrap request body (`{"wrapped":..., "context":{...}}`).
    #[arg(long)]
    body: PathBuf,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Offer only HTTP/1.1 (as loadgen does).
    #[arg(long)]
    http1: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.endpoint.starts_with("https://127.")
        || args.endpoint.starts_with("https://localhost"))
    {
        bail!("loopback endpoints only");
    }
    let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&args.body)?)?;
    let wrapped = B64.decode(body["wrapped"].as_str().context("body.wrapped")?)?;
    let context: kms_client::api::Context = serde_json::from_value(body["context"].clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The loop runs in a spawned task, on the runtime's worker thread, as loadgen's
    // workers do (block_on would run it on the main thread and add a thread hop per
    // request).
    let task = rt.spawn(async move {
        let client = kms_client::Client::builder()
            .endpoint(args.endpoint.clone())
            .ca_pem_file(&args.ca)?
            .identity_pem_files(&args.cert, &args.key)?
            .http1_only(args.http1)
            .build()?;
        let start = Instant::now() + Duration::from_secs(args.warmup);
        let stop = start + Duration::from_secs(args.duration);
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut errors = 0u64;
        loop {
            let t0 = Instant::now();
            if t0 >= stop {
                break;
            }
            let r = client.unwrap(&wrapped, &context).await;
            let t1 = Instant::now();
            if t0 >= start {
                match r {
                    Ok(_) => hist.record((t1 - t0).as_micros().max(1) as u64)?,
                    Err(_) => errors += 1,
                }
            }
        }
        anyhow::Ok((hist, errors))
    });
    let (hist, errors) = rt.block_on(task)??;
    println!(
        "{}",
        serde_json::json!({
            "label": "client",
            "concurrency": 1,
            "requests": hist.len(),
            "errors": errors,
            "rps": (hist.len() as f64 / args.duration as f64).round(),
            "p50_us": hist.value_at_quantile(0.50),
            "p99_us": hist.value_at_quantile(0.99),
            "p999_us": hist.value_at_quantile(0.999),
        })
    );
    Ok(())
}
