//! The server's error types — the core's [`Error`], the store's [`StoreError`] and the
//! master-key sealing's [`SealError`] — and the one mapping of [`Error`] to HTTP status
//! and wire code. The bottom layer: it imports no other module of the crate
//! (`storage` and `seal` re-export their error types from here).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kms_client::api::{ErrorBody, ErrorCode, ErrorResponse, KeyState};

/// Everything a key operation or a request can fail with.
///
/// The variant decides the status and code; the message shown to the caller never holds
/// key material, and causes (`#[source]`) go to the log only.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed; the text says how (it never echoes secret input).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Opaque unwrap failure: tampered, wrong context, wrong or unknown key.
    #[error("decryption failed")]
    DecryptFailed,
    /// No client identity could be read from the connection.
    #[error("no client identity")]
    Unauthenticated,
    /// The caller is not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    /// No such key for the caller's tenant.
    #[error("key not found")]
    NotFound,
    /// No such route.
    #[error("no such route")]
    NoRoute,
    /// The route exists with other methods.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A key with that name exists.
    #[error("a key with this name already exists")]
    AlreadyExists,
    /// The key cannot be used in its state.
    #[error("key is {0:?}")]
    KeyDisabled(KeyState),
    /// The state change does not apply.
    #[error("invalid state: {0}")]
    InvalidState(&'static str),
    /// The body is over the limit.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Not JSON.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// The body did not arrive in time (a stalled or very slow client).
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    /// Locked out after repeated denials.
    #[error("locked out after repeated denials; an admin can lift it (kmsctl sys unlock)")]
    LockedOut,
    /// Refused by the exfiltration brake (a held identity or key, a spent budget).
    #[error("{0}")]
    Braked(&'static str),
    /// The server is sealed.
    #[error("server is sealed")]
    Sealed,
    /// The store failed; nothing was changed.
    #[error("key store unavailable")]
    Storage(#[source] StoreError),
    /// Sealing or unsealing the master key failed.
    #[error("unseal failed")]
    Seal(#[source] SealError),
    /// A stored record is unreadable: corruption or tampering at rest.
    #[error("stored record is corrupt: {0}")]
    Corrupt(&'static str),
    /// The master key was rotated by another node and this node has not followed yet:
    /// nothing was written; retry (the node follows within the change feed's bound).
    #[error("the master key was rotated on another node; this node is following it: retry")]
    MasterKeyChanged,
    /// The request's audit record could not be made durable, so its answer is withheld;
    /// the handler ran first, so what it changed may have taken effect (a seal always
    /// does: an operator must be able to seal during an outage).
    #[error("the audit record could not be made durable: the answer is withheld, and the request may have taken effect; check before retrying")]
    AuditUnavailable,
    /// A stored record that blocks an operation does not open or parse; the message names
    /// it (key, version) and what to do.
    #[error("{0}")]
    Unreadable(String),
    /// An invariant failed; details in the log.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Storage(e)
    }
}

impl From<SealError> for Error {
    fn from(e: SealError) -> Self {
        Error::Seal(e)
    }
}

impl Error {
    /// The HTTP status and wire code. One exhaustive match: adding a variant forces a
    /// decision here.
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            Error::InvalidRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest),
            Error::DecryptFailed => (StatusCode::BAD_REQUEST, ErrorCode::DecryptFailed),
            Error::Unauthenticated => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthenticated),
            Error::PermissionDenied(_) => (StatusCode::FORBIDDEN, ErrorCode::PermissionDenied),
            Error::NotFound | Error::NoRoute => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            Error::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed)
            }
            Error::AlreadyExists => (StatusCode::CONFLICT, ErrorCode::AlreadyExists),
            Error::KeyDisabled(_) => (StatusCode::CONFLICT, ErrorCode::KeyDisabled),
            Error::InvalidState(_) => (StatusCode::CONFLICT, ErrorCode::InvalidState),
            Error::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge)
            }
            Error::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
            ),
            Error::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, ErrorCode::InvalidRequest),
            Error::LockedOut | Error::Braked(_) => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::LockedOut)
            }
            Error::Sealed => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Sealed),
            Error::MasterKeyChanged => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
            ),
            Error::Unreadable(_) => (StatusCode::CONFLICT, ErrorCode::InvalidState),
            Error::AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
            ),
            Error::Storage(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
            ),
            Error::Seal(e) if e.is_bad_secret() => {
                (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest)
            }
            // The HSM is unreachable or refuses: the server stays sealed; retry later.
            Error::Seal(SealError::Pkcs11(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Sealed)
            }
            Error::Seal(_) | Error::Corrupt(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal)
            }
        }
    }

    /// The wire body.
    pub fn body(&self) -> ErrorBody {
        let (_, code) = self.status_and_code();
        let message = match self {
            Error::Seal(e) if e.is_bad_secret() => e.to_string(),
            Error::Seal(e @ SealError::Pkcs11(_)) => e.to_string(),
            Error::Storage(_) => "the key store is unavailable; nothing was changed".into(),
            Error::Seal(_) | Error::Corrupt(_) | Error::Internal(_) => {
                "internal error; see the server log".into()
            }
            other => other.to_string(),
        };
        ErrorBody { code, message }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            // The cause chain goes to the log, not to the client.
            let mut chain = String::new();
            let mut src = std::error::Error::source(&self);
            while let Some(s) = src {
                chain.push_str(": ");
                chain.push_str(&s.to_string());
                src = s.source();
            }
            tracing::error!(code = ?code, "{self}{chain}");
        }
        let mut resp = (status, Json(ErrorResponse { error: self.body() })).into_response();
        resp.extensions_mut().insert(code);
        resp
    }
}

/// Store failures. Never carries record contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A precondition of the batch did not hold; nothing was written.
    #[error("write conflict on table {0}")]
    Conflict(&'static str),
    /// The database is locked by another process.
    #[error("the store at {0} is in use by another process")]
    Locked(String),
    /// The engine failed (I/O, corruption, full disk); nothing was written.
    #[error("{engine} error")]
    Engine {
        /// Engine name.
        engine: &'static str,
        /// The engine's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Sealing failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The secret (key file, passphrase) does not open the sealed master key.
    #[error("the {0} does not unseal this store")]
    WrongSecret(&'static str),
    /// The sealed record was made by another method.
    #[error("the store was sealed with {stored}, but the configuration says {configured}")]
    MethodMismatch {
        /// In the store.
        stored: &'static str,
        /// In the configuration.
        configured: &'static str,
    },
    /// No secret is available (for example no passphrase given yet).
    #[error("no {0} available")]
    NoSecret(&'static str),
    /// The key file is unusable.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The sealed record is malformed.
    #[error("sealed master key record is malformed")]
    Malformed,
    /// The KDF failed (bad parameters).
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// Randomness failed.
    #[error("system random generator failed")]
    Random,
    /// An unseal share is malformed, of another set, or a duplicate.
    #[error("unseal share refused: {0}")]
    BadShare(&'static str),
    /// The PKCS#11 token or module failed (not found, not logged in, ...).
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
    /// A new secret does not meet the rule for sealing (a passphrase too short).
    #[error("{0}")]
    WeakSecret(&'static str),
}

impl SealError {
    /// Whether the caller supplied a wrong or missing secret (a 4xx, not a 5xx).
    pub fn is_bad_secret(&self) -> bool {
        matches!(
            self,
            SealError::WrongSecret(_)
                | SealError::NoSecret(_)
                | SealError::BadShare(_)
                | SealError::WeakSecret(_)
        )
    }
}

/// One error of each variant, split into the server's faults (an adapter must answer
/// them 5xx) and the rest, for the adapters' tests of their error maps.
#[cfg(test)]
pub(crate) fn every_variant() -> (Vec<Error>, Vec<Error>) {
    use kms_client::api::KeyState;
    let server = vec![
        Error::Sealed,
        Error::Storage(StoreError::Conflict("keys")),
        Error::Seal(SealError::Malformed),
        Error::Corrupt("a record"),
        Error::MasterKeyChanged,
        Error::AuditUnavailable,
        Error::Unreadable("k v1".into()),
        Error::Internal("x"),
    ];
    let client = vec![
        Error::InvalidRequest("x".into()),
        Error::DecryptFailed,
        Error::Unauthenticated,
        Error::PermissionDenied("x"),
        Error::NotFound,
        Error::NoRoute,
        Error::MethodNotAllowed,
        Error::AlreadyExists,
        Error::KeyDisabled(KeyState::Disabled),
        Error::InvalidState("x"),
        Error::PayloadTooLarge(1),
        Error::UnsupportedMediaType,
        Error::BodyTimeout(1),
        Error::LockedOut,
        Error::Braked("x"),
    ];
    (server, client)
}
