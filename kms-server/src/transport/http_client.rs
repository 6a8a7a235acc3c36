//! The server's one outbound HTTP client, for the few calls the server itself makes: a
//! token issuer's JWK set ([`crate::adapters::jwt`]), another key service during Google
//! CSE migration ([`crate::adapters::cse`]), alert webhooks ([`crate::security::alert`])
//! and the OTLP audit exporter ([`crate::security::audit::export`]).
//!
//! hyper's HTTP/1.1 client over tokio, with rustls (aws-lc-rs, TLS 1.2+) for `https://`;
//! one request per connection (these calls are rare), a deadline on the whole exchange,
//! answers of 1 MiB at most. `http://` is only for the alert webhooks on a private
//! network; the other callers require `https://`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The largest answer read.
pub const MAX_ANSWER: usize = 1 << 20;

/// The CA bundle used when the caller names none.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why an outbound request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http(s)://host[:port]/path`, or not the scheme required.
    #[error("`{0}`: {1}")]
    Url(String, &'static str),
    /// The CA bundle (or the client certificate or key) could not be read.
    #[error("PEM file: {0}")]
    Ca(#[source] crate::base::pem::PemError),
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(#[source] rustls::Error),
    /// Connecting, TLS, sending or reading failed.
    #[error("{url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within the deadline.
    #[error("{0}: no answer in time")]
    Timeout(String),
}

/// Which schemes a caller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schemes {
    /// `https://` only.
    Https,
    /// `https://`, or `http://` (alert webhooks on a private network).
    HttpOrHttps,
}

/// A URL split for the request line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// `host[:port]` as given, for the `Host` header.
    authority: String,
    path: String,
}

fn target(url: &str, schemes: Schemes) -> Result<Target, HttpError> {
    let bad = |why| HttpError::Url(url.to_owned(), why);
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let (Some(rest), Schemes::HttpOrHttps) = (url.strip_prefix("http://"), schemes) {
        (false, rest)
    } else if schemes == Schemes::Https {
        return Err(bad("must be https://"));
    } else {
        return Err(bad("must be https:// or http://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
        None => (authority, if tls { 443 } else { 80 }),
    };
    Ok(Target {
        tls,
        host: host.to_owned(),
        port,
        authority: authority.to_owned(),
        path: path.to_owned(),
    })
}

/// Checks that `url` is one this client can call under `schemes` (configuration checks).
pub fn check_url(url: &str, schemes: Schemes) -> Result<(), HttpError> {
    target(url, schemes).map(|_| ())
}

/// A TLS client configuration trusting `ca` (default: the system's bundle), presenting
/// `client` (certificate and key files) when given: for the outbound calls here and the
/// syslog audit exporter.
pub fn client_tls_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, HttpError> {
    let ca_path = ca.map_or_else(|| PathBuf::from(SYSTEM_CAS), Path::to_path_buf);
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::base::pem::load_certs(&ca_path).map_err(HttpError::Ca)? {
        // A bundle may hold certificates rustls does not take as roots; the rest serve.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(HttpError::Tls)?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = crate::base::pem::load_certs(cert).map_err(HttpError::Ca)?;
            let key = crate::base::pem::load_key(key).map_err(HttpError::Ca)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(HttpError::Tls)
        }
    }
}

fn tls_connector(ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector, HttpError> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(
        client_tls_config(ca, None)?,
    )))
}

/// One request; `body`, when given, is sent as JSON. Returns the status and the body
/// (at most [`MAX_ANSWER`] bytes). The whole exchange must end within `deadline`.
pub async fn request(
    method: &str,
    url: &str,
    schemes: Schemes,
    ca: Option<&Path>,
    body: Option<&[u8]>,
    deadline: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let body = body.map(|b| ("application/json", b));
    request_typed(method, url, schemes, ca, body, deadline).await
}

/// [`request`] with a body of another media type: `(content type, bytes)`.
pub async fn request_typed(
    method: &str,
    url: &str,
    schemes: Schemes,
    ca: Option<&Path>,
    body: Option<(&str, &[u8])>,
    deadline: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let t = target(url, schemes)?;
    tokio::time::timeout(deadline, exchange(method, url, &t, ca, body))
        .await
        .map_err(|_| HttpError::Timeout(url.to_owned()))?
}

/// [`request`] for callers that are not async (a JWK set read at start-up or on a
/// blocking thread): the request runs on a thread of its own with its own runtime, so it
/// works whatever runtime, if any, the caller is on.
pub fn request_blocking(
    method: &str,
    url: &str,
    schemes: Schemes,
    ca: Option<&Path>,
    body: Option<&[u8]>,
    deadline: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let (method, url) = (method.to_owned(), url.to_owned());
    let (ca, body) = (ca.map(Path::to_path_buf), body.map(<[u8]>::to_vec));
    let io = |e: std::io::Error, url: &str| HttpError::Io {
        url: url.to_owned(),
        source: Box::new(e),
    };
    let worker_url = url.clone();
    std::thread::Builder::new()
        .name("keyhold-http".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| io(e, &worker_url))?;
            runtime.block_on(request(
                &method,
                &worker_url,
                schemes,
                ca.as_deref(),
                body.as_deref(),
                deadline,
            ))
        })
        .map_err(|e| io(e, &url))?
        .join()
        .unwrap_or_else(|_| Err(HttpError::Timeout(url)))
}

async fn exchange(
    method: &str,
    url: &str,
    t: &Target,
    ca: Option<&Path>,
    body: Option<(&str, &[u8])>,
) -> Result<(u16, Vec<u8>), HttpError> {
    let io = |e: Box<dyn std::error::Error + Send + Sync>| HttpError::Io {
        url: url.to_owned(),
        source: e,
    };
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| io(e.into()))?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(&t.path)
        .header(hyper::header::HOST, &t.authority)
        .header(hyper::header::ACCEPT, "application/json");
    if let Some((media, _)) = body {
        req = req.header(hyper::header::CONTENT_TYPE, media);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(
            body.map(|(_, b)| b).unwrap_or_default(),
        )))
        .map_err(|e| io(e.into()))?;
    let resp = if t.tls {
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|_| HttpError::Url(url.to_owned(), "bad host"))?;
        let tls = tls_connector(ca)?
            .connect(name, tcp)
            .await
            .map_err(|e| io(e.into()))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
    .map_err(io)?;
    let status = resp.status().as_u16();
    let answer = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(io)?
        .to_bytes()
        .to_vec();
    Ok((status, answer))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn send<T>(
    io: TokioIo<T>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, BoxError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_and_schemes_enforced() {
        let t = target("https://issuer.example:8443/jwks", Schemes::Https).unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "issuer.example", 8443, "/jwks")
        );
        let t = target("https://issuer.example", Schemes::Https).unwrap();
        assert_eq!((t.port, t.path.as_str()), (443, "/"));
        assert!(target("http://10.0.0.1/hook", Schemes::Https).is_err());
        let t = target("http://10.0.0.1/hook", Schemes::HttpOrHttps).unwrap();
        assert_eq!((t.tls, t.port), (false, 80));
        assert!(target("https:///x", Schemes::Https).is_err());
        assert!(target("https://h:port/x", Schemes::Https).is_err());
        assert!(target("ftp://h/x", Schemes::HttpOrHttps).is_err());
    }

    #[tokio::test]
    async fn a_plain_answer_is_read_and_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for body_len in [5usize, MAX_ANSWER + 1] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b'x'; body_len]).await;
            }
        });
        let url = format!("http://127.0.0.1:{port}/hook");
        let d = Duration::from_secs(5);
        let (status, body) = request("POST", &url, Schemes::HttpOrHttps, None, Some(b"{}"), d)
            .await
            .unwrap();
        assert_eq!((status, body.as_slice()), (200, b"xxxxx".as_slice()));
        assert!(request("GET", &url, Schemes::HttpOrHttps, None, None, d)
            .await
            .is_err());
    }
}
