//! A bounded load generator for the mTLS load run: `concurrency` keep-alive HTTP/1.1
//! connections, each sending one request after another for `duration` seconds (after a
//! warm-up), recording latency in an HDR histogram. Loopback only; stops by itself.
//!
//! With `--reconnect`, every request comes on a new connection (TCP + mTLS handshake +
//! one HTTP/1.1 request): the rate is then handshakes per second; `--no-resume` turns
//! client-side TLS session resumption off (every handshake full), otherwise rustls resumes
//! when the server issued a ticket.
//!
//! Prints one JSON line: requests, errors, rps, p50/p99/p999 in microseconds.

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    /// Server address (must be loopback). Repeat it for several servers (nodes of a
    /// shared store): connection `i` goes to the `i mod n`-th.
    #[arg(long = "addr", required = true)]
    addrs: Vec<SocketAddr>,
    /// Request path.
    #[arg(long)]
    path: String,
    /// File with the JSON request body (ignored with `--get`).
    #[arg(long)]
    body: PathBuf,
    /// Send GETs without a body instead of POSTs (keep-alive runs only).
    #[arg(long)]
    get: bool,
    /// The body file holds one request body per line; requests cycle through them (each
    /// connection from its own offset), e.g. wrapped DEKs of many different keys.
    #[arg(long)]
    lines: bool,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Hard cap on requests per connection.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Label printed with the result.
    #[arg(long, default_value = "")]
    label: String,
    /// Speak HTTP/2 (ALPN h2) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// A new connection (and TLS handshake) for every request.
    #[arg(long)]
    reconnect: bool,
    /// Disable TLS session resumption in the client.
    #[arg(long)]
    no_resume: bool,
    /// Pace the keep-alive connections to this many requests per second in total (each
    /// connection sends on a fixed schedule; latency counts from the scheduled time, so a
    /// server that falls behind shows it). Unpaced when omitted: as fast as answered.
    #[arg(long)]
    rate: Option<f64>,
    /// An extra request header, `name: value` (repeatable): e.g. a pre-signed SigV4
    /// `authorization` and `x-amz-date`. A `host` given here replaces `localhost`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Speak KMIP instead of HTTP: the body file is one TTLV Request Message, sent as it
    /// is; an answer counts as a success when its first batch item's Result Status is
    /// Success.
    #[arg(long)]
    kmip: bool,
}

enum Either {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Outcome {
    hist: Histogram<u64>,
    errors: u64,
}

async fn worker(
    args: Arc<Args>,
    tls: Arc<rustls::ClientConfig>,
    bodies: Arc<Vec<Bytes>>,
    offset: usize,
    start_measure: Instant,
    stop: Instant,
) -> anyhow::Result<Outcome> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let addr = args.addrs[offset % args.addrs.len()];
    if args.reconnect {
        for n in 0..args.max_requests {
            let body = &bodies[(offset + n as usize * args.concurrency) % bodies.len()];
            let t0 = Instant::now();
            if t0 >= stop {
                break;
            }
            // A failed connection or handshake counts as an error.
            let ok: bool = one_connection(&args, addr, &tls, body)
                .await
                .unwrap_or_default();
            let t1 = Instant::now();
            if t0 >= start_measure {
                if ok {
                    hist.record((t1 - t0).as_micros().max(1) as u64)?;
                } else {
                    errors += 1;
                }
            }
        }
        return Ok(Outcome { hist, errors });
    }
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    if args.kmip {
        return kmip_worker(&args, stream, &bodies, offset, start_measure, stop).await;
    }
    let io = TokioIo::new(stream);
    let mut sender = if args.http2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Either::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Either::H1(s)
    };
    let extra = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected `name: value`"))?;
            Ok((
                hyper::header::HeaderName::from_bytes(name.trim().as_bytes())?,
                hyper::header::HeaderValue::from_str(value.trim())?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let uri = if args.http2 {
        format!("https://localhost:{}{}", addr.port(), args.path)
    } else {
        args.path.clone()
    };
    let interval = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(args.concurrency as f64 / r));
    // Connections start spread over one interval, not all at once.
    let mut next = Instant::now()
        + interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64(offset as f64 / args.concurrency as f64)
        });
    for n in 0..args.max_requests {
        let body = &bodies[(offset + n as usize * args.concurrency) % bodies.len()];
        let t0 = match interval {
            Some(iv) => {
                tokio::time::sleep_until(next.into()).await;
                let scheduled = next;
                next += iv;
                scheduled
            }
            None => Instant::now(),
        };
        if Instant::now() >= stop {
            break;
        }
        let mut req = if args.get {
            hyper::Request::get(uri.as_str())
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))?
        } else {
            hyper::Request::post(uri.as_str())
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))?
        };
        for (name, value) in &extra {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let resp = match &mut sender {
            Either::H1(s) => s.send_request(req).await?,
            Either::H2(s) => s.send_request(req).await?,
        };
        let ok = resp.status().is_success();
        let _ = resp.into_body().collect().await?;
        let t1 = Instant::now();
        if t0 >= start_measure {
            if ok {
                hist.record((t1 - t0).as_micros().max(1) as u64)?;
            } else {
                errors += 1;
            }
        }
    }
    Ok(Outcome { hist, errors })
}

/// KMIP on one connection: one request after another, each answer read whole.
async fn kmip_worker(
    args: &Args,
    mut stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    bodies: &[Bytes],
    offset: usize,
    start_measure: Instant,
    stop: Instant,
) -> anyhow::Result<Outcome> {
    use kms_server::adapters::kmip::{tags, ttlv};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let mut answer = Vec::new();
    for n in 0..args.max_requests {
        let body = &bodies[(offset + n as usize * args.concurrency) % bodies.len()];
        let t0 = Instant::now();
        if t0 >= stop {
            break;
        }
        stream.write_all(body).await?;
        let mut head = [0u8; 8];
        stream.read_exact(&mut head).await?;
        answer.resize(8 + ttlv::message_length(&head) as usize, 0);
        answer[..8].copy_from_slice(&head);
        stream.read_exact(&mut answer[8..]).await?;
        let t1 = Instant::now();
        let ok = ttlv::Item::decode(&answer, ttlv::Limits::default())
            .ok()
            .and_then(|m| {
                let status = m.child(tags::BATCH_ITEM)?.child(tags::RESULT_STATUS)?;
                Some(status.value == ttlv::Value::Enumeration(tags::STATUS_SUCCESS))
            })
            .unwrap_or(false);
        if t0 >= start_measure {
            if ok {
                hist.record((t1 - t0).as_micros().max(1) as u64)?;
            } else {
                errors += 1;
            }
        }
    }
    Ok(Outcome { hist, errors })
}

/// Connect, handshake, one request, close. Whether it succeeded.
async fn one_connection(
    args: &Args,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    body: &Bytes,
) -> anyhow::Result<bool> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(args.path.as_str())
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(Full::new(body.clone()))?;
    let resp = s.send_request(req).await?;
    let ok = resp.status().is_success();
    let _ = resp.into_body().collect().await?;
    drop(s);
    let _ = conn.await;
    Ok(ok)
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if !args.addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!("the load generator only targets loopback addresses");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in kms_server::base::pem::load_certs(&args.ca)? {
        roots.add(c)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            kms_server::base::pem::load_certs(&args.cert)?,
            kms_server::base::pem::load_key(&args.key)?,
        )?;
    if args.no_resume {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    tls.alpn_protocols = if args.kmip {
        Vec::new()
    } else if args.http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let tls = Arc::new(tls);
    let text = std::fs::read(&args.body).context("reading the body file")?;
    let bodies: Vec<Bytes> = if args.lines && !args.kmip {
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(Bytes::copy_from_slice)
            .collect()
    } else {
        vec![Bytes::from(text)]
    };
    if bodies.is_empty() {
        bail!("the body file is empty");
    }
    let bodies = Arc::new(bodies);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let start_measure = Instant::now() + Duration::from_secs(args.warmup);
        let stop = start_measure + Duration::from_secs(args.duration);
        let mut tasks = Vec::new();
        for i in 0..args.concurrency {
            tasks.push(tokio::spawn(worker(
                args.clone(),
                tls.clone(),
                bodies.clone(),
                i,
                start_measure,
                stop,
            )));
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut errors = 0;
        for t in tasks {
            let o = t.await??;
            hist.add(&o.hist)?;
            errors += o.errors;
        }
        anyhow::Ok((hist, errors))
    })?;
    let (hist, errors) = result;
    let secs = args.duration as f64;
    println!(
        "{}",
        serde_json::json!({
            "label": args.label,
            "concurrency": args.concurrency,
            "requests": hist.len(),
            "errors": errors,
            "rps": (hist.len() as f64 / secs).round(),
            "p50_us": hist.value_at_quantile(0.50),
            "p99_us": hist.value_at_quantile(0.99),
            "p999_us": hist.value_at_quantile(0.999),
        })
    );
    Ok(())
}
