//! `kms-server health`: the container health check, `GET /healthz` on the ops listener.

use std::net::SocketAddr;

use crate::transport::http_client::{self, Schemes};

/// Asks the ops listener at `ops` whether the server is healthy (3 s at most).
pub fn health(ops: SocketAddr) -> anyhow::Result<()> {
    let url = format!("http://{ops}/healthz");
    let deadline = std::time::Duration::from_secs(3);
    let (status, _) =
        http_client::request_blocking("GET", &url, Schemes::HttpOrHttps, None, None, deadline)
            .map_err(|e| anyhow::anyhow!("connecting to the ops listener at {ops}: {e}"))?;
    if status == 200 {
        println!("{ops}: healthy");
        Ok(())
    } else {
        anyhow::bail!("{ops}/healthz answered: HTTP {status}")
    }
}
