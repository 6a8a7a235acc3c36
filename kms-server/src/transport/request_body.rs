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
//!
//! A body also has a deadline, on every listener: it must have arrived in full within the
//! body timeout of the request's headers, or reading it fails with [`TimedOut`] (a client
//! that announces a body and stalls holds a connection no longer than that). The timer is
//! only armed when a read has to wait: a body that came with its headers costs none.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Most bytes of an unread body read and thrown away.
pub const DRAIN_BYTES: usize = 8 << 20;
/// Longest an unread body is read for.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// hyper's request body, with a deadline, drained on drop when unread (see the module
/// documentation).
pub struct RequestBody {
    inner: Option<Incoming>,
    /// When the whole body must have arrived.
    deadline: tokio::time::Instant,
    /// Armed at the first read that has to wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The connection's account of bodies waiting for data, and whether this one is
    /// counted in it now.
    progress: Option<(Arc<BodyProgress>, bool)>,
}

/// A connection's request bodies: how many are waiting for data that has not come, and
/// when data last came. A connection whose every request in flight waits on a stalled
/// body holds its slot for nothing ([`crate::transport::listen`] may evict it when slots run out).
pub struct BodyProgress {
    epoch: std::time::Instant,
    waiting: AtomicUsize,
    /// Milliseconds from `epoch` to the last start or end of a wait.
    last_ms: AtomicU64,
}

impl Default for BodyProgress {
    fn default() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            waiting: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl BodyProgress {
    /// Bodies waiting for data now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// How long since a body of the connection last began to wait or received data.
    pub fn stalled_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn mark(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(now, Ordering::AcqRel);
    }
}

/// A request body that did not arrive within its deadline.
#[derive(Debug, Clone, Copy)]
pub struct TimedOut;

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for TimedOut {}

/// Whether `e`, or an error in its chain of sources, is [`TimedOut`].
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<TimedOut>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl RequestBody {
    /// Wraps a request's body, which must arrive within `timeout` from now.
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner: Some(inner),
            deadline: tokio::time::Instant::now() + timeout,
            timer: None,
            progress: None,
        }
    }

    /// Accounts this body's waits in `progress`.
    pub fn watched(mut self, progress: Arc<BodyProgress>) -> Self {
        self.progress = Some((progress, false));
        self
    }

    /// Counts this body as waiting for data, or no longer.
    fn set_waiting(&mut self, waiting: bool) {
        if let Some((progress, counted)) = self.progress.as_mut() {
            if *counted != waiting {
                *counted = waiting;
                // A wait starts the stall clock; its end (data, the end, an error) is
                // progress.
                progress.mark();
                if waiting {
                    progress.waiting.fetch_add(1, Ordering::AcqRel);
                } else {
                    progress.waiting.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.set_waiting(false);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                this.set_waiting(true);
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(TimedOut)))),
                    Poll::Pending => Poll::Pending,
                }
            }
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
        self.set_waiting(false);
        let Some(body) = self.inner.take() else {
            return;
        };
        // A body past its deadline is not waited for any longer.
        if body.is_end_stream() || tokio::time::Instant::now() >= self.deadline {
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
