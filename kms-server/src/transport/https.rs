//! A small blocking HTTPS client for the few calls the server itself makes: a token
//! issuer's JWK set ([`crate::adapters::jwt`]) and, for Google CSE migration, another key service
//! ([`crate::adapters::cse`]). One request per connection; https only.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// One HTTPS request (HTTP/1.1, rustls, TLS 1.2+, 10 s for each step, answers of 1 MiB at
/// most), blocking: run it off the async workers. `ca`: the CA bundle (PEM) the server
/// must chain to (default: the system's). Returns the status and the body.
pub fn request(
    method: &str,
    url: &str,
    ca: Option<&Path>,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    use std::io::{Read, Write};
    let err = |m: String| m;
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| err("the key set URL must be https://".into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| err(format!("bad port in {url}")))?,
        ),
        None => (authority, 443),
    };
    let ca_path = ca
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::base::pem::load_certs(&ca_path).map_err(|e| err(e.to_string()))? {
        let _ = roots.add(cert);
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| err(format!("bad host in {url}")))?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| err(e.to_string()))?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| err(format!("{host}: {e}")))?
        .next()
        .ok_or_else(|| err(format!("{host}: no address")))?;
    let timeout = Duration::from_secs(10);
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| err(format!("{url}: {e}")))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| err(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n"
    )
    .into_bytes();
    if let Some(b) = body {
        request.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .as_bytes(),
        );
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body.unwrap_or_default());
    tls.write_all(&request)
        .and_then(|()| tls.flush())
        .map_err(|e| err(format!("{url}: {e}")))?;
    let mut response = Vec::new();
    let read = tls.take(1 << 20).read_to_end(&mut response);
    // A server that closes without close_notify still sent its whole answer.
    if let Err(e) = read {
        if response.is_empty() {
            return Err(err(format!("{url}: {e}")));
        }
    }
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| err(format!("{url}: not an HTTP answer")))?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| err(format!("{url}: not an HTTP answer")))?;
    let answer = response[split + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if chunked {
        let whole = dechunk(&answer).ok_or_else(|| err(format!("{url}: bad chunked body")))?;
        return Ok((status, whole));
    }
    Ok((status, answer))
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_read_whole() {
        assert_eq!(
            dechunk(b"4\r\n{\"ke\r\n8;x=y\r\nys\":[]}\n\r\n0\r\n\r\n").unwrap(),
            b"{\"keys\":[]}\n".to_vec()
        );
        assert!(dechunk(b"zz\r\n").is_none());
        assert!(dechunk(b"10\r\nshort\r\n").is_none());
    }
}
