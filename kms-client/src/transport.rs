//! The connection pool under [`crate::Client`]: per endpoint, idle HTTP/1.1 keep-alive
//! connections reused one request at a time, or one shared HTTP/2 connection (streams
//! multiplexed) when the server picks `h2` through ALPN.
//!
//! It reports precisely whether a failed request left the process ([`SendError::NotSent`]:
//! connect or TLS failure, or a pooled connection that had closed before the request was
//! written) so the client retries only what is safe.
//!
//! Answers are read up to a limit given per request ([`SendError::TooLarge`] past it): a
//! size declared above it is refused before any of the body is read, and a body that
//! keeps coming is cut off there.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::api::ZeroizingBuf;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed attempt.
pub(crate) enum SendError {
    /// The request never left: safe to send elsewhere.
    NotSent(BoxError),
    /// It may have reached the server.
    MaybeSent(BoxError),
    /// The answer declared, or reached, more than the limit: reading stopped there and the
    /// connection is dropped.
    TooLarge,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

struct Pool {
    /// `host:port` to connect to.
    authority: String,
    server_name: ServerName<'static>,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
    /// The shared HTTP/2 connection, when the server chose `h2`.
    h2: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

pub(crate) struct Transport {
    tls: TlsConnector,
    connect_timeout: Duration,
    pools: Vec<Pool>,
}

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 64;

/// Splits `https://host[:port]` into (`host:port`, host).
pub(crate) fn parse_endpoint(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("https://")?;
    let rest = rest.split('/').next()?;
    if rest.is_empty() {
        return None;
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        (h.to_owned(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse::<u16>().ok()?),
            None => (rest.to_owned(), 443),
        }
    };
    if host.is_empty() {
        return None;
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Some((authority, host))
}

impl Transport {
    pub(crate) fn new(
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        endpoints: &[(String, String)],
    ) -> Result<Self, String> {
        let mut pools = Vec::new();
        for (authority, host) in endpoints {
            let server_name = ServerName::try_from(host.clone())
                .map_err(|_| format!("`{host}` is not a valid server name"))?;
            pools.push(Pool {
                authority: authority.clone(),
                server_name,
                idle: Mutex::new(Vec::new()),
                h2: Mutex::new(None),
            });
        }
        Ok(Self {
            tls: TlsConnector::from(tls),
            connect_timeout,
            pools,
        })
    }

    async fn connect(&self, pool: &Pool) -> Result<Sender, BoxError> {
        let fut = async {
            let tcp = tokio::net::TcpStream::connect(&pool.authority).await?;
            tcp.set_nodelay(true)?;
            let tls = self.tls.connect(pool.server_name.clone(), tcp).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(tls);
            if h2 {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *pool.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
                Ok::<Sender, BoxError>(Sender::H2(sender))
            } else {
                let (sender, conn) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Sender::H1(sender))
            }
        };
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("connecting to {} timed out", pool.authority).into()),
        }
    }

    /// A usable sender: the shared HTTP/2 one, an idle HTTP/1.1 one, or `None`.
    fn checkout(&self, pool: &Pool) -> Option<Sender> {
        if let Some(h2) = pool
            .h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
        }
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(Sender::H1(s));
            }
        }
        None
    }

    fn request(
        pool: &Pool,
        h2: bool,
        method: &Method,
        path: &str,
        body: &Bytes,
        approval: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, BoxError> {
        let builder = if h2 {
            // HTTP/2 carries the authority in the URI (`:authority`), not in `host`.
            Request::builder().uri(format!("https://{}{path}", pool.authority))
        } else {
            Request::builder()
                .uri(path)
                .header("host", pool.authority.as_str())
        };
        let mut builder = builder
            .method(method.clone())
            .header("content-type", "application/json");
        if let Some(id) = approval {
            builder = builder.header(crate::api::APPROVAL_HEADER, id);
        }
        Ok(builder.body(Full::new(body.clone()))?)
    }

    /// Sends one request to endpoint `idx` (with the id of the approved request it runs,
    /// if any) and reads the whole answer, at most `limit` bytes of body.
    pub(crate) async fn send(
        &self,
        idx: usize,
        method: &Method,
        path: &str,
        body: &Bytes,
        limit: usize,
        approval: Option<&str>,
    ) -> Result<(StatusCode, ZeroizingBuf), SendError> {
        let pool = &self.pools[idx];
        // A pooled connection may turn out closed; then one fresh connection is tried.
        let mut sender = match self.checkout(pool) {
            Some(s) => (s, false),
            None => (self.connect(pool).await.map_err(SendError::NotSent)?, true),
        };
        loop {
            let (s, fresh) = &mut sender;
            let result = match s {
                Sender::H1(h1) => {
                    let req = Self::request(pool, false, method, path, body, approval)
                        .map_err(SendError::NotSent)?;
                    if h1.ready().await.is_err() {
                        Err(None)
                    } else {
                        h1.try_send_request(req)
                            .await
                            .map_err(|mut e| match e.take_message() {
                                Some(_) => None,
                                None => Some(Box::new(e.into_error()) as BoxError),
                            })
                    }
                }
                Sender::H2(h2) => {
                    let req = Self::request(pool, true, method, path, body, approval)
                        .map_err(SendError::NotSent)?;
                    if h2.is_closed() {
                        Err(None)
                    } else {
                        h2.try_send_request(req)
                            .await
                            .map_err(|mut e| match e.take_message() {
                                Some(_) => None,
                                None => Some(Box::new(e.into_error()) as BoxError),
                            })
                    }
                }
            };
            match result {
                Ok(resp) => {
                    let status = resp.status();
                    let declared = resp
                        .headers()
                        .get(hyper::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let declared = match declared.map(usize::try_from) {
                        Some(Ok(n)) if n <= limit => Some(n),
                        Some(_) => return Err(SendError::TooLarge),
                        None => None,
                    };
                    // Read into a buffer that is wiped when the caller is done with it
                    // (answers carry DEKs); the frames go as they are copied. A declared
                    // size (within the limit) is allocated at once: no copies while growing.
                    let mut body = resp.into_body();
                    let mut bytes = ZeroizingBuf::with_capacity(declared.unwrap_or(256));
                    while let Some(frame) = body.frame().await {
                        let frame = frame.map_err(|e| SendError::MaybeSent(Box::new(e)))?;
                        if let Some(data) = frame.data_ref() {
                            if data.len() > limit.saturating_sub(bytes.as_slice().len()) {
                                return Err(SendError::TooLarge);
                            }
                            bytes.extend(data);
                        }
                    }
                    match sender {
                        (Sender::H1(h1), _) if !h1.is_closed() => {
                            let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
                            if idle.len() < MAX_IDLE {
                                idle.push(h1);
                            }
                        }
                        _ => {}
                    }
                    return Ok((status, bytes));
                }
                // Not written: the pooled connection had closed. Try one fresh connection.
                Err(None) if !*fresh => {
                    if let Sender::H2(_) = s {
                        *pool.h2.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    }
                    sender = (self.connect(pool).await.map_err(SendError::NotSent)?, true);
                }
                Err(None) => {
                    return Err(SendError::NotSent(
                        format!(
                            "{}: the new connection closed before the request was sent",
                            pool.authority
                        )
                        .into(),
                    ))
                }
                Err(Some(e)) => return Err(SendError::MaybeSent(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("https://kms:8443"),
            Some(("kms:8443".into(), "kms".into()))
        );
        assert_eq!(
            parse_endpoint("https://kms"),
            Some(("kms:443".into(), "kms".into()))
        );
        assert_eq!(
            parse_endpoint("https://127.0.0.1:1/"),
            Some(("127.0.0.1:1".into(), "127.0.0.1".into()))
        );
        assert_eq!(
            parse_endpoint("https://[::1]:8443"),
            Some(("[::1]:8443".into(), "::1".into()))
        );
        assert_eq!(parse_endpoint("http://kms:80"), None);
        assert_eq!(parse_endpoint("https://:80"), None);
        assert_eq!(parse_endpoint("https://kms:notaport"), None);
    }
}
