//! The crate's error type.

use std::fmt;

/// Envelope errors.
///
/// Every problem with an envelope's bytes or with the context or key used to open it is
/// the single opaque [`Error::DecryptFailed`]: malformed, truncated, reordered, tampered,
/// foreign, wrong context, wrong key, commitment mismatch. Callers learn nothing about
/// which part was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The envelope cannot be opened (opaque on purpose; see the type docs).
    #[error("decryption failed")]
    DecryptFailed,
    /// A caller-supplied argument is invalid (key name, context, segment size, limits).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The key provider failed for a reason other than "cannot decrypt" (unreachable,
    /// permission denied, key disabled, ...).
    #[error("key provider error")]
    Provider(#[source] ProviderError),
    /// Reading or writing the underlying stream failed.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
    /// The operating system's random generator failed.
    #[error("random generator failed")]
    Random,
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(io) => io,
            Error::DecryptFailed => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            other => std::io::Error::other(other),
        }
    }
}

/// The kind of a [`ProviderError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The wrapped DEK does not unwrap (tampered, wrong context, wrong key). Becomes the
    /// opaque [`Error::DecryptFailed`].
    DecryptFailed,
    /// The key is unknown to the provider.
    NotFound,
    /// The key exists but may not be used now (disabled, pending deletion).
    KeyDisabled,
    /// The caller is not allowed.
    PermissionDenied,
    /// The provider cannot be reached or is sealed; retrying later may work.
    Unavailable,
    /// Anything else.
    Other,
}

/// An error from a [`crate::KeyProvider`].
pub struct ProviderError {
    kind: ProviderErrorKind,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    /// A provider error of `kind`, with an optional cause.
    pub fn new(
        kind: ProviderErrorKind,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self { kind, source }
    }

    /// The kind.
    pub fn kind(&self) -> ProviderErrorKind {
        self.kind
    }
}

impl fmt::Debug for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key provider: {:?}", self.kind)
    }
}

impl std::error::Error for ProviderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ProviderError> for Error {
    fn from(e: ProviderError) -> Self {
        match e.kind {
            ProviderErrorKind::DecryptFailed => Error::DecryptFailed,
            _ => Error::Provider(e),
        }
    }
}
