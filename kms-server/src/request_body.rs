//! The request body every listener hands its handlers: hyper's, drained when a handler
//! answers before reading it all.
//!
//! A handler that refuses a body early (413 on a declared length over the limit, 501 on
//! the XKS listener, a body that fails to parse midway) answers while the client is still
//! sending. Dropping hyper's body then makes HTTP/2 reset the stream, which clients report
//! as a framing error instead of the answer (curl: "Stream error in the HTTP/2 framing
//! layer"), and makes HTTP/1.1 close a connection with unread data, which can reset it
//! before the client reads the answer. So an unread body is read to its end and thrown
//! away, off the request's task, within bounds: [`DRAIN_BYTES`] and [`DRAIN_TIME`]; past
//! either it is dropped (the reset is then the client's due).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Most bytes of an unread body read and thrown away.
pub const DRAIN_BYTES: usize = 8 << 20;
/// Longest an unread body is read for.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// hyper's request body, drained on drop when unread (see the module documentation).
pub struct RequestBody {
    inner: Option<Incoming>,
}

impl RequestBody {
    /// Wraps a request's body.
    pub fn new(inner: Incoming) -> Self {
        Self { inner: Some(inner) }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

/// Reads `body` to its end, within [`DRAIN_BYTES`] and [`DRAIN_TIME`].
async fn drain(mut body: Incoming) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, Bytes::len);
            if n > left {
                return;
            }
            left -= n;
        }
    })
    .await;
}
