//! HTTP (1.1 and 2, by ALPN or preface) on an established connection: the settings every
//! HTTP listener shares, each request's body deadline and in-flight mark, and the graceful
//! close the listener asks for.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Limits, Protocol, Served};
use crate::transport::request_body::RequestBody;

/// The HTTP settings every listener shares, with `limits`' header timeout.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    http.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    http
}

/// HTTP, each connection served by the service `make` builds from its finished handshake.
pub struct Http<M> {
    http: Arc<auto::Builder<TokioExecutor>>,
    body_timeout: Duration,
    make: M,
}

impl<M> Http<M> {
    /// HTTP within `limits` (header and body deadlines).
    pub fn new(limits: &Limits, make: M) -> Self {
        Self {
            http: Arc::new(builder(limits)),
            body_timeout: limits.body_timeout,
            make,
        }
    }
}

impl<Io, M, S, B> Protocol<Io> for Http<M>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    M: Fn(&Io) -> S + Send + Sync + 'static,
    S: hyper::service::Service<hyper::Request<RequestBody>, Response = hyper::Response<B>>
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn serve(
        &self,
        io: Io,
        served: Served,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let svc = Arc::new((self.make)(&io));
        let body_timeout = self.body_timeout;
        let tracked = served.activity.clone();
        let bodies = served.bodies.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = tracked.begin();
            let watched = bodies.clone();
            let answer = hyper::service::Service::call(
                &*svc,
                req.map(|body| RequestBody::new(body, body_timeout).watched(watched)),
            );
            async move {
                let answer = answer.await;
                drop(in_flight);
                answer
            }
        });
        let conn = self
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        // A task is polled whole on every wake-up: this one polls the connection and, to
        // hear a request to close gracefully, one atomic load.
        Box::pin(async move {
            let peer = served.peer;
            let heard = served.signal;
            let mut conn = std::pin::pin!(conn);
            let mut registered: Option<std::task::Waker> = None;
            let mut shutting = false;
            let r = std::future::poll_fn(|cx| {
                if !shutting {
                    if registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                        heard.register(cx.waker());
                        registered = Some(cx.waker().clone());
                    }
                    if heard.asked.load(Ordering::Acquire) {
                        shutting = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                conn.as_mut().poll(cx)
            })
            .await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        })
    }
}
