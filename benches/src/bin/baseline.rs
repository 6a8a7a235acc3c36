//! The load-run baseline: a bare axum + rustls server with the same mutual-TLS
//! configuration as kms-server, whose one endpoint does a single AES-256-GCM seal of 32
//! bytes per request. What Keyhold adds on top of "TLS + one AEAD" shows as the ratio.
//!
//! Usage: baseline --listen 127.0.0.1:PORT --cert S.pem --key S-key.pem --client-ca CA.pem

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use tower::ServiceExt;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    client_ca: PathBuf,
}

struct State {
    key: LessSafeKey,
    rng: SystemRandom,
}

async fn seal(
    axum::extract::State(s): axum::extract::State<Arc<State>>,
    _body: axum::body::Bytes,
) -> String {
    let mut nonce = [0u8; 12];
    let mut data = vec![0u8; 32];
    if s.rng.fill(&mut nonce).is_err() || s.rng.fill(&mut data).is_err() {
        return String::new();
    }
    let _ = s.key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::empty(),
        &mut data,
    );
    format!("{{\"sealed\":\"{}\"}}", B64.encode(&data))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = kms_server::security::tls::server_config(&kms_server::security::tls::TlsSettings {
        cert: args.cert,
        key: args.key,
        client_ca: args.client_ca,
        allow_tls12: false,
        handshake_timeout: std::time::Duration::from_secs(10),
        crls: Vec::new(),
        crl_poll: None,
    })?;
    let rng = SystemRandom::new();
    let mut k = [0u8; 32];
    rng.fill(&mut k).map_err(|_| anyhow::anyhow!("rng"))?;
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).map_err(|_| anyhow::anyhow!("key"))?);
    let app = Router::new()
        .route("/seal", post(seal))
        .with_state(Arc::new(State { key, rng }));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .context("bind")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req)
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
