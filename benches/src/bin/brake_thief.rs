//! A thief with a stolen certificate: makes `--deks` wrapped DEKs under the demo key (as
//! the provider stored them; datakey is not charged to the brake), then unwraps them all
//! as fast as it can — `--concurrency` connections, each sending `POST /v1/batch` of 100
//! unwraps one after another — until the server refuses everything (the brake's hold) or
//! every DEK is out. Prints one JSON line: DEKs obtained, the seconds from the first
//! request to the last DEK obtained, and the rate.
//!
//! Run against a server without the brake, it measures full speed; against one with it,
//! how many DEKs the brake lets out first (`benches/brake.sh` runs both, beside each other).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kms_client::api::{BatchItem, BatchResult, Context};

#[derive(Parser)]
struct Args {
    /// `https://127.0.0.1:PORT`.
    #[arg(long)]
    endpoint: String,
    /// The dev PKI directory (`ca.pem`, `app.pem`, `app-key.pem`).
    #[arg(long)]
    pki: std::path::PathBuf,
    /// Wrapped DEKs to make, then to unwrap.
    #[arg(long, default_value_t = 200_000)]
    deks: usize,
    /// Connections unwrapping at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Make the DEKs at this endpoint instead (a twin server without the brake), and write
    /// nothing else there.
    #[arg(long)]
    make_at: Option<String>,
}

fn client(endpoint: &str, pki: &std::path::Path) -> anyhow::Result<kms_client::Client> {
    Ok(kms_client::Client::builder()
        .endpoint(endpoint)
        .ca_pem_file(pki.join("ca.pem"))?
        .identity_pem_files(pki.join("app.pem"), pki.join("app-key.pem"))?
        .build()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let maker = client(args.make_at.as_deref().unwrap_or(&args.endpoint), &args.pki)?;
    let ctx: Context = [("tenant".to_owned(), "acme".to_owned())].into();
    let mut wrapped = Vec::with_capacity(args.deks);
    while wrapped.len() < args.deks {
        let n = (args.deks - wrapped.len()).min(100);
        let items = (0..n)
            .map(|_| BatchItem::Datakey {
                key: "demo".into(),
                context: ctx.clone(),
            })
            .collect();
        for r in maker.batch(items).await? {
            match r {
                BatchResult::Datakey(d) => wrapped.push(d.wrapped),
                other => anyhow::bail!("datakey failed: {other:?}"),
            }
        }
    }
    let batches: Arc<Vec<Vec<_>>> = Arc::new(wrapped.chunks(100).map(<[_]>::to_vec).collect());
    let thief = client(&args.endpoint, &args.pki)?;
    let next = Arc::new(AtomicU64::new(0));
    let got = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let last = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (ctx, thief, batches, next, got, stopped, last) = (
                ctx.clone(),
                thief.clone(),
                batches.clone(),
                next.clone(),
                got.clone(),
                stopped.clone(),
                last.clone(),
            );
            tokio::spawn(async move {
                while !stopped.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(chunk) = batches.get(i) else { break };
                    let items = chunk
                        .iter()
                        .map(|w| BatchItem::Unwrap {
                            wrapped: w.clone(),
                            context: ctx.clone(),
                        })
                        .collect();
                    let Ok(results) = thief.batch(items).await else {
                        stopped.store(true, Ordering::Relaxed);
                        break;
                    };
                    let ok = results
                        .iter()
                        .filter(|r| matches!(r, BatchResult::Unwrap(_)))
                        .count() as u64;
                    if ok > 0 {
                        got.fetch_add(ok, Ordering::Relaxed);
                        *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    }
                    if ok < results.len() as u64 {
                        stopped.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let got = got.load(Ordering::Relaxed);
    let until = last
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(started);
    let secs = until.duration_since(started).as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "deks": got,
            "seconds": secs,
            "rate": if secs > 0.0 { got as f64 / secs } else { 0.0 },
            "concurrency": args.concurrency,
        })
    );
    Ok(())
}
