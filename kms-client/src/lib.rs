//! # kms-client
//!
//! The client side of Keyhold, the customer-held key management service.
//!
//! Today this crate holds [`api`]: the request and response types of the native v1 wire
//! API (JSON over mutual TLS), shared by `kms-server` and every client so they are defined
//! exactly once. The HTTP client and the `kmsctl` operator CLI build on it.
//!
//! What the types guarantee:
//! - Request types reject unknown fields (`deny_unknown_fields`), as the server must.
//! - Plaintext key material travels in [`api::SecretBytes`], which zeroizes on drop,
//!   prints `[REDACTED]` in `Debug`, and compares in constant time.
//! - Wrapped keys ([`api::WrappedKey`]) print only their length and a short prefix.
//!
//! ```
//! use kms_client::api::{UnwrapRequest, WrappedKey};
//!
//! let req: UnwrapRequest =
//!     serde_json::from_str(r#"{"wrapped":"AAEC","context":{"tenant":"acme"}}"#).unwrap();
//! assert_eq!(req.wrapped, WrappedKey::from(vec![0, 1, 2]));
//! assert_eq!(req.context.get("tenant").map(String::as_str), Some("acme"));
//! // Unknown fields are refused.
//! assert!(serde_json::from_str::<UnwrapRequest>(r#"{"wrapped":"AAEC","x":1}"#).is_err());
//! ```

pub mod api;
#[cfg(feature = "client")]
mod client;
#[cfg(feature = "client")]
mod error;
#[cfg(feature = "client")]
mod provider;
#[cfg(feature = "client")]
mod transport;

#[cfg(feature = "client")]
pub use client::{Client, ClientBuilder, RetryPolicy};
#[cfg(feature = "client")]
pub use error::Error;
