//! Prepared envelopes ([`Encryptor`], [`Decryptor`]) and the synchronous streaming
//! adapters: [`EncryptingWriter`] (`Write`), [`DecryptingReader`] (`Read`) and
//! [`SeekableReader`] (`Read + Seek`, decrypting only the segments a range touches).
//!
//! The DEK is fetched (async, from the provider) when the `Encryptor`/`Decryptor` is made,
//! turned into the message's data key, and dropped at once; the streaming itself is plain
//! synchronous or tokio I/O. Memory is bounded by one segment (plus one byte of
//! look-ahead), whatever the object's size.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::backend::{self, TAG_LEN};
use crate::cache::DekCache;
use crate::context::{self, Context};
use crate::format::{self, Header};
use crate::provider::KeyProvider;
use crate::secret::Dek;
use crate::segment::{self, SegmentCipher};
use crate::Error;

/// Options for sealing and opening.
#[derive(Debug, Clone)]
pub struct Options {
    /// Plaintext bytes per segment (sealing only; opening reads it from the header).
    /// Default 64 KiB.
    pub segment_size: u32,
    /// A DEK cache (off by default). Used by one-shot [`crate::seal_with`] and
    /// [`crate::open_with`], whose sizes are known up front; streams always use a fresh
    /// DEK.
    pub cache: Option<Arc<DekCache>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_size: format::DEFAULT_SEGMENT_SIZE,
            cache: None,
        }
    }
}

/// A message ready to be encrypted: header written, data key derived, DEK gone.
pub struct Encryptor {
    header: Vec<u8>,
    cipher: SegmentCipher,
    segment_size: usize,
}

impl std::fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryptor")
            .field("header_len", &self.header.len())
            .field("segment_size", &self.segment_size)
            .finish_non_exhaustive()
    }
}

impl Encryptor {
    /// Gets a fresh DEK for `key` from `provider` and prepares a message bound to
    /// `context`, with default options.
    pub async fn new<P: KeyProvider>(
        provider: &P,
        key: &str,
        context: &Context,
    ) -> Result<Self, Error> {
        Self::with_options(provider, key, context, &Options::default()).await
    }

    /// As [`Encryptor::new`] with `options`.
    pub async fn with_options<P: KeyProvider>(
        provider: &P,
        key: &str,
        context: &Context,
        options: &Options,
    ) -> Result<Self, Error> {
        Self::prepare(provider, key, context, options.segment_size, None).await
    }

    /// `cached`: the cache and the message length to account, for one-shot sealing.
    pub(crate) async fn prepare<P: KeyProvider>(
        provider: &P,
        key: &str,
        context: &Context,
        segment_size: u32,
        cached: Option<(&DekCache, u64)>,
    ) -> Result<Self, Error> {
        format::check_key_name(key)?;
        format::check_segment_size(segment_size)?;
        let digest = context::digest(context)?;
        // A provider without a cache id stays out of the cache.
        let cached = cached.and_then(|(c, len)| Some((c, provider.cache_id()?, len)));
        let hit = cached
            .as_ref()
            .and_then(|(c, id, len)| c.seal_take(id, key, &digest, *len));
        let from_cache = hit.is_some();
        let (dek, wrapped, key_ref) = match hit {
            Some(hit) => hit,
            None => {
                let pair = provider.datakey(key, context).await?;
                (Arc::new(pair.dek), pair.wrapped, pair.key)
            }
        };
        if wrapped.is_empty() || wrapped.len() > format::MAX_WRAPPED_LEN {
            return Err(Error::InvalidInput(
                "the provider returned an unusable wrapped DEK".into(),
            ));
        }
        format::check_key_name(&key_ref.name)?;
        if let (false, Some((c, id, len))) = (from_cache, &cached) {
            c.seal_put(
                id,
                key,
                &digest,
                (dek.clone(), wrapped.clone(), key_ref.clone()),
                *len,
            );
        }
        let mut salt = [0u8; 32];
        backend::random(&mut salt).map_err(|_| Error::Random)?;
        Ok(Self::from_parts(
            &dek,
            wrapped,
            key_ref,
            digest,
            salt,
            segment_size,
        ))
    }

    /// Builds the message from its parts. `salt` must be fresh for every message sealed
    /// under one DEK: callers outside tests use [`Encryptor::prepare`].
    pub(crate) fn from_parts(
        dek: &Dek,
        wrapped: Vec<u8>,
        key: format::KeyRef,
        context_digest: [u8; 32],
        salt: [u8; 32],
        segment_size: u32,
    ) -> Self {
        let mut header = Header {
            segment_size,
            key,
            wrapped_dek: wrapped,
            context_digest,
            salt,
            commitment: [0; 32],
        };
        let keys = format::derive(dek, &salt, &header.encode_prefix());
        header.commitment = *keys.commitment;
        let header = header.encode();
        let cipher = SegmentCipher::new(&keys.data_key, &header);
        Self {
            header,
            cipher,
            segment_size: segment_size as usize,
        }
    }

    /// The encoded header (written first by every adapter).
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Encrypts all of `plaintext` at once. Consumes the encryptor: one message per
    /// data key, so nonces can never repeat.
    pub fn seal_all(self, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_to(plaintext, &mut out);
        out
    }

    /// As [`Encryptor::seal_all`], appending to `out` (lets callers reuse a buffer).
    pub fn seal_to(self, plaintext: &[u8], out: &mut Vec<u8>) {
        let seg = self.segment_size;
        let n = plaintext.len().div_ceil(seg).max(1);
        out.reserve(self.header.len() + plaintext.len() + n * TAG_LEN);
        out.extend_from_slice(&self.header);
        for i in 0..n {
            let start = i * seg;
            let end = (start + seg).min(plaintext.len());
            let at = out.len();
            out.extend_from_slice(&plaintext[start..end]);
            let tag = self
                .cipher
                .seal_detached(i as u64, i + 1 == n, &mut out[at..]);
            out.extend_from_slice(&tag);
        }
    }

    /// A `Write` adapter. Call [`EncryptingWriter::finish`] at the end: without it the
    /// output has no final segment and will not open.
    pub fn into_writer<W: Write>(self, inner: W) -> EncryptingWriter<W> {
        EncryptingWriter {
            inner,
            pending: Vec::with_capacity(self.segment_size + TAG_LEN),
            header: Some(self.header),
            cipher: self.cipher,
            segment_size: self.segment_size,
            index: 0,
            poisoned: false,
        }
    }

    /// A tokio `AsyncWrite` adapter; `shutdown()` writes the final segment.
    pub fn into_async_writer<W: tokio::io::AsyncWrite + Unpin>(
        self,
        inner: W,
    ) -> crate::async_io::AsyncEncryptingWriter<W> {
        crate::async_io::AsyncEncryptingWriter::new(
            inner,
            self.header,
            self.cipher,
            self.segment_size,
        )
    }
}

/// Encrypts everything written to it into `inner`, one segment at a time.
///
/// An error from `inner` poisons the writer: how much of the header or segment reached
/// `inner` is unknown, so every later `write`, `flush` and `finish` fails
/// (`io::ErrorKind::Other`) rather than produce an envelope with a gap, a repeated
/// segment or no header. Start the object again with a new [`Encryptor`].
pub struct EncryptingWriter<W: Write> {
    inner: W,
    pending: Vec<u8>,
    header: Option<Vec<u8>>,
    cipher: SegmentCipher,
    segment_size: usize,
    index: u64,
    poisoned: bool,
}

fn poisoned() -> io::Error {
    io::Error::other("envelope writer failed earlier: its output is incomplete")
}

impl<W: Write> EncryptingWriter<W> {
    /// Runs `op` on the inner writer unless poisoned; poisons on error.
    fn inner_io(&mut self, op: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if self.poisoned {
            return Err(poisoned());
        }
        let res = op(self);
        self.poisoned = res.is_err();
        res
    }

    fn write_header(&mut self) -> io::Result<()> {
        self.inner_io(|w| match w.header.take() {
            Some(h) => w.inner.write_all(&h),
            None => Ok(()),
        })
    }

    /// Writes the final segment and returns the inner writer (flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.write_header()?;
        self.inner_io(|w| {
            let mut seg = std::mem::take(&mut w.pending);
            w.cipher.seal(w.index, true, &mut seg);
            w.inner.write_all(&seg)?;
            w.inner.flush()
        })?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for EncryptingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_header()?;
        if data.is_empty() {
            return Ok(0);
        }
        if self.pending.len() == self.segment_size {
            // More data follows, so the buffered segment is not the last one.
            self.inner_io(|w| {
                w.cipher.seal(w.index, false, &mut w.pending);
                w.inner.write_all(&w.pending)?;
                w.pending.clear();
                w.index += 1;
                Ok(())
            })?;
        }
        let n = (self.segment_size - self.pending.len()).min(data.len());
        self.pending.extend_from_slice(&data[..n]);
        Ok(n)
    }

    /// Flushes whole segments already written to the inner writer; the buffered partial
    /// segment stays until more data or `finish`.
    fn flush(&mut self) -> io::Result<()> {
        self.write_header()?;
        self.inner_io(|w| w.inner.flush())
    }
}

/// A message ready to be decrypted: context checked, DEK unwrapped, commitment verified,
/// DEK gone.
pub struct Decryptor {
    header_len: usize,
    segment_size: usize,
    cipher: SegmentCipher,
}

impl std::fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decryptor")
            .field("header_len", &self.header_len)
            .field("segment_size", &self.segment_size)
            .finish_non_exhaustive()
    }
}

impl Decryptor {
    /// Reads the header from `reader` and prepares to decrypt what follows.
    pub async fn from_reader<P: KeyProvider, R: Read>(
        provider: &P,
        reader: &mut R,
        context: &Context,
    ) -> Result<Self, Error> {
        let (header, raw) = Header::read(reader)?;
        Self::new(provider, &header, &raw, context, None).await
    }

    /// Async [`Decryptor::from_reader`].
    pub async fn from_async_reader<P: KeyProvider, R: tokio::io::AsyncRead + Unpin>(
        provider: &P,
        reader: &mut R,
        context: &Context,
    ) -> Result<Self, Error> {
        let (header, raw) = Header::read_async(reader).await?;
        Self::new(provider, &header, &raw, context, None).await
    }

    /// Prepares from a parsed header and its encoded bytes. `cached`: a cache and the
    /// plaintext length to account (one-shot opening).
    pub(crate) async fn new<P: KeyProvider>(
        provider: &P,
        header: &Header,
        raw: &[u8],
        context: &Context,
        cached: Option<(&DekCache, u64)>,
    ) -> Result<Self, Error> {
        let digest = context::digest(context)?;
        if !bool::from(digest.ct_eq(&header.context_digest)) {
            return Err(Error::DecryptFailed);
        }
        // A provider without a cache id stays out of the cache.
        let cached = cached.and_then(|(c, len)| Some((c, provider.cache_id()?, len)));
        if let Some((c, id, len)) = &cached {
            if let Some(dek) = c.open_take(id, &header.key, &header.wrapped_dek, &digest, *len) {
                return Self::from_dek(&dek, header, raw);
            }
        }
        let dek = provider
            .unwrap(&header.key, &header.wrapped_dek, context)
            .await?;
        // Checks the key commitment: only a DEK that passed it may enter the cache.
        let dec = Self::from_dek(&dek, header, raw)?;
        if let Some((c, id, len)) = cached {
            c.open_put(
                &id,
                &header.key,
                &header.wrapped_dek,
                &digest,
                Arc::new(dek),
                len,
            );
        }
        Ok(dec)
    }

    pub(crate) fn from_dek(dek: &Dek, header: &Header, raw: &[u8]) -> Result<Self, Error> {
        let prefix_len = raw.len() - 32;
        let keys = format::derive(dek, &header.salt, &raw[..prefix_len]);
        if !bool::from(keys.commitment.ct_eq(&header.commitment)) {
            return Err(Error::DecryptFailed);
        }
        Ok(Self {
            header_len: raw.len(),
            segment_size: header.segment_size as usize,
            cipher: SegmentCipher::new(&keys.data_key, raw),
        })
    }

    /// The header's length: where the segments start.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Decrypts a whole body (everything after the header) at once.
    pub fn open_all(&self, body: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.open_to(body, &mut out)?;
        Ok(out)
    }

    /// As [`Decryptor::open_all`], appending to `out`. On failure `out` is restored to
    /// its length on entry: no unauthenticated plaintext is left in it.
    pub fn open_to(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        let seg = self.segment_size as u64;
        let (n, _) = segment::layout(body.len() as u64, seg)?;
        let full = self.segment_size + TAG_LEN;
        let start = out.len();
        out.reserve(body.len());
        for (i, chunk) in body.chunks(full).enumerate() {
            let at = out.len();
            out.extend_from_slice(chunk);
            match self
                .cipher
                .open(i as u64, i as u64 + 1 == n, &mut out[at..])
            {
                Ok(len) => out.truncate(at + len),
                Err(e) => {
                    out[start..].fill(0);
                    out.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A `Read` adapter over the segments that follow the header in `inner`.
    pub fn into_reader<R: Read>(self, inner: R) -> DecryptingReader<R> {
        DecryptingReader {
            inner,
            core: ReadCore::new(self.cipher, self.segment_size),
        }
    }

    /// A `Read + Seek` adapter over plaintext positions. `inner` is the whole envelope
    /// (header included); only the segments that reads touch are fetched and decrypted.
    pub fn into_seekable<R: Read + Seek>(self, mut inner: R) -> Result<SeekableReader<R>, Error> {
        let total = inner.seek(SeekFrom::End(0)).map_err(Error::Io)?;
        let body = total
            .checked_sub(self.header_len as u64)
            .ok_or(Error::DecryptFailed)?;
        let seg = self.segment_size as u64;
        let (n, last) = segment::layout(body, seg)?;
        Ok(SeekableReader {
            inner,
            cipher: self.cipher,
            header_len: self.header_len as u64,
            segment_size: seg,
            segments: n,
            plaintext_len: (n - 1) * seg + last - TAG_LEN as u64,
            pos: 0,
            current: None,
            end_verified: false,
            buf: Vec::with_capacity(self.segment_size + TAG_LEN),
        })
    }

    /// A tokio `AsyncRead` adapter.
    pub fn into_async_reader<R: tokio::io::AsyncRead + Unpin>(
        self,
        inner: R,
    ) -> crate::async_io::AsyncDecryptingReader<R> {
        crate::async_io::AsyncDecryptingReader::new(
            inner,
            ReadCore::new(self.cipher, self.segment_size),
        )
    }
}

/// The I/O-free state of a decrypting reader, shared by the sync and async adapters.
/// It holds at most one segment plus one byte of look-ahead (to tell the last segment by
/// the end of input), and hands out plaintext only after its segment authenticated.
pub(crate) struct ReadCore {
    cipher: SegmentCipher,
    /// Ciphertext length of a full segment.
    full: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` holding input.
    have: usize,
    /// Plaintext ready to hand out: `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// Input bytes of the segment being handed out (to drop once it is consumed).
    consumed: usize,
    index: u64,
    eof: bool,
    done: bool,
    failed: bool,
}

impl ReadCore {
    pub(crate) fn new(cipher: SegmentCipher, segment_size: usize) -> Self {
        let full = segment_size + TAG_LEN;
        Self {
            cipher,
            full,
            buf: vec![0; full + 1],
            have: 0,
            pos: 0,
            end: 0,
            consumed: 0,
            index: 0,
            eof: false,
            done: false,
            failed: false,
        }
    }

    /// Copies out authenticated plaintext; 0 when none is ready.
    pub(crate) fn serve(&mut self, out: &mut [u8]) -> usize {
        let n = (self.end - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        n
    }

    /// Whether the stream ended cleanly (after the last segment was handed out).
    pub(crate) fn finished(&self) -> bool {
        self.done && self.pos == self.end
    }

    pub(crate) fn check(&self) -> io::Result<()> {
        if self.failed {
            Err(Error::DecryptFailed.into())
        } else {
            Ok(())
        }
    }

    /// Drops the handed-out segment, keeping the look-ahead byte.
    pub(crate) fn recycle(&mut self) {
        if self.consumed > 0 && self.pos == self.end {
            self.buf.copy_within(self.consumed..self.have, 0);
            self.have -= self.consumed;
            self.consumed = 0;
            self.pos = 0;
            self.end = 0;
        }
    }

    /// Where input should go next, if more is needed before the next segment can open.
    pub(crate) fn spare(&mut self) -> Option<&mut [u8]> {
        if self.eof || self.have == self.full + 1 {
            None
        } else {
            Some(&mut self.buf[self.have..])
        }
    }

    /// Records `n` bytes of input written into [`ReadCore::spare`]; 0 means end of input.
    pub(crate) fn filled(&mut self, n: usize) {
        if n == 0 {
            self.eof = true;
        }
        self.have += n;
    }

    /// Authenticates and decrypts the next segment.
    pub(crate) fn open_next(&mut self) -> io::Result<()> {
        let (len, last) = if self.have == self.full + 1 {
            (self.full, false)
        } else {
            (self.have, true)
        };
        let empty_tail = last && self.index > 0 && len == TAG_LEN;
        let opened = if empty_tail {
            Err(Error::DecryptFailed)
        } else {
            self.cipher.open(self.index, last, &mut self.buf[..len])
        };
        match opened {
            Ok(pt) => {
                self.pos = 0;
                self.end = pt;
                self.consumed = len;
                self.index += 1;
                self.done = last;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e.into())
            }
        }
    }
}

/// Decrypts the segments read from `inner`.
pub struct DecryptingReader<R: Read> {
    inner: R,
    core: ReadCore,
}

impl<R: Read> DecryptingReader<R> {
    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            self.core.check()?;
            let n = self.core.serve(out);
            if n > 0 {
                return Ok(n);
            }
            if self.core.finished() {
                return Ok(0);
            }
            self.core.recycle();
            while let Some(spare) = self.core.spare() {
                let n = match self.inner.read(spare) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                self.core.filled(n);
            }
            self.core.open_next()?;
        }
    }
}

/// Random access to an envelope's plaintext: `Read + Seek` in plaintext positions.
///
/// The number of segments comes from the envelope's length, which an attacker can cut at
/// a segment boundary. So a read reports end of file (`Ok(0)`) only once the last
/// segment has authenticated *as the last one* (its nonce's last flag): a read at or past
/// the end opens it if no earlier read did, and a truncated envelope fails there with
/// [`io::ErrorKind::InvalidData`] instead of reading as a shorter plaintext.
pub struct SeekableReader<R: Read + Seek> {
    inner: R,
    cipher: SegmentCipher,
    header_len: u64,
    segment_size: u64,
    segments: u64,
    plaintext_len: u64,
    pos: u64,
    current: Option<(u64, usize)>,
    /// Whether the last segment opened with the last flag set: the length is genuine.
    end_verified: bool,
    buf: Vec<u8>,
}

impl<R: Read + Seek> SeekableReader<R> {
    /// Length of the whole plaintext, computed from the envelope's length. Not
    /// authenticated until the last segment is read (any read that reaches the end does
    /// it): until then, a truncated envelope shows a shorter length here.
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Authenticates the last segment, with its last flag, unless already done.
    fn verify_end(&mut self) -> io::Result<()> {
        if !self.end_verified {
            // `segments` is at least 1 (`segment::layout`).
            self.load(self.segments.saturating_sub(1))?;
        }
        Ok(())
    }

    fn load(&mut self, index: u64) -> io::Result<usize> {
        if let Some((i, len)) = self.current {
            if i == index {
                return Ok(len);
            }
        }
        self.current = None;
        let full = self.segment_size + TAG_LEN as u64;
        let last = index + 1 == self.segments;
        let start = self.header_len + index * full;
        let len = if last {
            (self.plaintext_len - index * self.segment_size) as usize + TAG_LEN
        } else {
            full as usize
        };
        self.inner.seek(SeekFrom::Start(start))?;
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::DecryptFailed.into()
            } else {
                e
            }
        })?;
        let pt = self.cipher.open(index, last, &mut self.buf)?;
        self.current = Some((index, pt));
        self.end_verified |= last;
        Ok(pt)
    }
}

impl<R: Read + Seek> Read for SeekableReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.plaintext_len {
            // End of file only if the end is genuine (see the type docs); this also
            // authenticates the one segment of an empty plaintext.
            self.verify_end()?;
            return Ok(0);
        }
        if out.is_empty() {
            return Ok(0);
        }
        let index = self.pos / self.segment_size;
        let len = self.load(index)?;
        let off = (self.pos % self.segment_size) as usize;
        let n = (len - off).min(out.len());
        out[..n].copy_from_slice(&self.buf[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for SeekableReader<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.plaintext_len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the plaintext",
            )),
        }
    }
}
