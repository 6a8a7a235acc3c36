//! tokio adapters: [`AsyncEncryptingWriter`] (`AsyncWrite`) and [`AsyncDecryptingReader`]
//! (`AsyncRead`), with the same segment logic and memory bound as the sync ones.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context as TaskContext, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::backend::TAG_LEN;
use crate::segment::SegmentCipher;
use crate::stream::ReadCore;

/// Encrypts everything written into `inner`. `shutdown()` writes the final segment (and
/// shuts `inner` down); without it the output will not open.
pub struct AsyncEncryptingWriter<W> {
    inner: W,
    cipher: SegmentCipher,
    segment_size: usize,
    pending: Vec<u8>,
    /// Ciphertext waiting to be written: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    index: u64,
    finalized: bool,
}

impl<W: AsyncWrite + Unpin> AsyncEncryptingWriter<W> {
    pub(crate) fn new(
        inner: W,
        header: Vec<u8>,
        cipher: SegmentCipher,
        segment_size: usize,
    ) -> Self {
        Self {
            inner,
            cipher,
            segment_size,
            pending: Vec::with_capacity(segment_size + TAG_LEN),
            out: header,
            out_pos: 0,
            index: 0,
            finalized: false,
        }
    }

    /// The inner writer.
    pub fn into_inner(self) -> W {
        self.inner
    }

    fn poll_drain(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Moves the sealed pending segment to the output buffer.
    fn seal_pending(&mut self, last: bool) {
        self.cipher.seal(self.index, last, &mut self.pending);
        std::mem::swap(&mut self.out, &mut self.pending);
        self.pending.clear();
        self.out_pos = 0;
        self.index += 1;
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for AsyncEncryptingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.finalized {
            return Poll::Ready(Err(io::Error::other("write after shutdown")));
        }
        ready!(this.poll_drain(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.pending.len() == this.segment_size {
            this.seal_pending(false);
        }
        let n = (this.segment_size - this.pending.len()).min(data.len());
        this.pending.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.finalized {
            this.seal_pending(true);
            this.finalized = true;
            ready!(this.poll_drain(cx))?;
        }
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Decrypts the segments read from `inner`.
pub struct AsyncDecryptingReader<R> {
    inner: R,
    core: ReadCore,
}

impl<R: AsyncRead + Unpin> AsyncDecryptingReader<R> {
    pub(crate) fn new(inner: R, core: ReadCore) -> Self {
        Self { inner, core }
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for AsyncDecryptingReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            this.core.check()?;
            let n = this.core.serve(buf.initialize_unfilled());
            if n > 0 {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.core.finished() {
                return Poll::Ready(Ok(()));
            }
            this.core.recycle();
            while let Some(spare) = this.core.spare() {
                let mut rb = ReadBuf::new(spare);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                this.core.filled(n);
            }
            this.core.open_next()?;
        }
    }
}
