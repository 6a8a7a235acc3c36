//! The client's error type.

use crate::api::ErrorCode;

/// Errors from [`crate::Client`]. Server refusals carry the server's stable code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error (`{"error":{"code","message"}}`).
    #[error("the server refused the request: {code:?} (HTTP {status}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code (`KeyDisabled`, `PermissionDenied`, ...).
        code: ErrorCode,
        /// The server's short message.
        message: String,
    },
    /// No endpoint could be reached (connection refused, DNS, TLS handshake refused).
    #[error("no endpoint could be reached (tried {tried})")]
    Unreachable {
        /// The endpoints tried, comma-separated.
        tried: String,
        /// The last failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request was sent but no complete answer came back in time, and it is not safe
    /// to repeat automatically.
    #[error("request to {endpoint} timed out")]
    Timeout {
        /// The endpoint.
        endpoint: String,
    },
    /// The connection failed after the request was sent, and it is not safe to repeat
    /// automatically.
    #[error("connection to {endpoint} failed during the request")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server's answer could not be understood.
    #[error("malformed answer from the server (HTTP {status}): {detail}")]
    InvalidResponse {
        /// HTTP status.
        status: u16,
        /// What was wrong.
        detail: String,
    },
    /// The answer was larger than this client reads (see
    /// [`crate::ClientBuilder::max_response_bytes`]): reading stopped at the limit, and the
    /// request is not repeated.
    #[error("the answer from {endpoint} is larger than {}, the limit for this request", size_text(*.limit))]
    ResponseTooLarge {
        /// The endpoint.
        endpoint: String,
        /// The limit, bytes.
        limit: usize,
    },
    /// The operation waits for approvals (dual control, `docs/approvals.md`): nothing ran.
    /// Other operators approve the request; then its requester sends the operation again
    /// through [`crate::Client::with_approval`].
    #[error("{}", .0.message)]
    ApprovalPending(Box<crate::api::ApprovalPending>),
    /// The client configuration is invalid (files, URLs, names).
    #[error("client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A size for people: whole MiB when it is some, else bytes.
fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}
