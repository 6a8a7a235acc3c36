//! # envelope
//!
//! Envelope encryption for Keyhold: get a data key (DEK) from a key provider, encrypt,
//! store the ciphertext with the *wrapped* DEK, and forget the DEK; to read, send the
//! wrapped DEK back to the provider, decrypt, forget it again. The provider (`kms-server`
//! through `kms-client`, or the in-process [`LocalProvider`]) keeps the key-encryption
//! keys; this crate never holds a DEK longer than one operation unless you turn on the
//! bounded [`DekCache`].
//!
//! What an envelope guarantees (format in `FORMAT.md`, version 1):
//! - **Confidentiality and integrity** of the data with AES-256-GCM, in segments (64 KiB
//!   by default) whose nonces encode the segment index and a last-segment flag:
//!   truncation, reordering, duplication and splicing between envelopes are all detected.
//! - **Key commitment**: the header carries a commitment derived with the data key from
//!   the DEK (HKDF-SHA256), checked in constant time before any segment is decrypted, so
//!   one ciphertext cannot open to two plaintexts under two keys.
//! - **Context binding**: the encryption context is bound to the wrapped DEK (by the
//!   provider) and to every segment (through the header); open with another context and it
//!   fails.
//! - **One opaque error** ([`Error::DecryptFailed`]) for every malformed, tampered,
//!   truncated or foreign envelope, wrong context or wrong key. No panics on bad input.
//! - **Bounded memory** when streaming (sync [`std::io`] and tokio), and **seekable**
//!   decryption of a byte range that reads only the segments it needs.
//! - No API takes a nonce. DEKs and derived key bytes are zeroized on drop; so is the
//!   AES key schedule with the `rustcrypto` backend, not with ring (a ring limitation).
//!
//! What it does not do: hide the plaintext length (an envelope reveals it exactly), or
//! protect a DEK while it is in use in this process.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use envelope::{open, seal, Context, LocalProvider};
//!
//! let provider = LocalProvider::new();
//! provider.rotate("invoices")?; // a local KEK; in production, kms-client's provider
//! let context: Context = [("tenant".into(), "acme".into())].into_iter().collect();
//!
//! let sealed = seal(&provider, "invoices", b"total: 42 EUR", &context).await?;
//! let opened = open(&provider, &sealed, &context).await?;
//! assert_eq!(opened, b"total: 42 EUR");
//!
//! // Another context, or any changed byte, fails with one opaque error.
//! let other: Context = [("tenant".into(), "globex".into())].into_iter().collect();
//! assert!(matches!(open(&provider, &sealed, &other).await, Err(envelope::Error::DecryptFailed)));
//! # Ok::<(), envelope::Error>(())
//! # }).unwrap();
//! ```
//!
//! Streaming: [`Encryptor`] / [`Decryptor`] fetch the DEK (async), then adapt to
//! `Write`/`Read`/`Read + Seek` ([`EncryptingWriter`], [`DecryptingReader`],
//! [`SeekableReader`]) or tokio `AsyncWrite`/`AsyncRead`.
//!
//! Backends: ring (default) or, with feature `rustcrypto`, the pure-Rust `aes-gcm`,
//! `hkdf` and `sha2` crates; both produce byte-identical envelopes.

mod async_io;
mod backend;
pub mod cache;
pub mod context;
mod error;
pub mod format;
mod provider;
mod secret;
mod segment;
mod stream;

#[cfg(test)]
mod tests;

pub use async_io::{AsyncDecryptingReader, AsyncEncryptingWriter};
pub use backend::name as backend_name;
pub use cache::{CacheLimits, DekCache};
pub use context::Context;
pub use error::{Error, ProviderError, ProviderErrorKind};
pub use format::{Header, KeyRef};
pub use provider::{DataKeyPair, KeyProvider, LocalProvider, ProviderId};
pub use secret::{Dek, DEK_LEN};
pub use stream::{
    DecryptingReader, Decryptor, EncryptingWriter, Encryptor, Options, SeekableReader,
};

/// Seals `plaintext` under a fresh DEK from `provider` for KEK `key`, bound to `context`.
pub async fn seal<P: KeyProvider>(
    provider: &P,
    key: &str,
    plaintext: &[u8],
    context: &Context,
) -> Result<Vec<u8>, Error> {
    seal_with(provider, key, plaintext, context, &Options::default()).await
}

/// [`seal`] with options (segment size, DEK cache).
pub async fn seal_with<P: KeyProvider>(
    provider: &P,
    key: &str,
    plaintext: &[u8],
    context: &Context,
    options: &Options,
) -> Result<Vec<u8>, Error> {
    let cached = options
        .cache
        .as_deref()
        .map(|c| (c, plaintext.len() as u64));
    let enc = Encryptor::prepare(provider, key, context, options.segment_size, cached).await?;
    Ok(enc.seal_all(plaintext))
}

/// Opens an envelope made by [`seal`] (or any adapter) with the same `context`.
pub async fn open<P: KeyProvider>(
    provider: &P,
    envelope: &[u8],
    context: &Context,
) -> Result<Vec<u8>, Error> {
    open_with(provider, envelope, context, &Options::default()).await
}

/// [`open`] with options (DEK cache; the segment size comes from the header).
pub async fn open_with<P: KeyProvider>(
    provider: &P,
    envelope: &[u8],
    context: &Context,
    options: &Options,
) -> Result<Vec<u8>, Error> {
    let (header, header_len) = Header::parse(envelope)?;
    let body = &envelope[header_len..];
    // Check the structure before asking the provider for anything.
    segment::layout(body.len() as u64, u64::from(header.segment_size))?;
    let cached = options.cache.as_deref().map(|c| (c, body.len() as u64));
    let dec = Decryptor::new(provider, &header, &envelope[..header_len], context, cached).await?;
    dec.open_all(body)
}
