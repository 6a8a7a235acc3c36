//! # kms-client
//!
//! The client side of Keyhold, the customer-held key management service.
//!
//! - [`api`]: the request and response types of the native v1 wire API (JSON over mutual
//!   TLS), shared by `kms-server` and every client so they are defined exactly once.
//!   This module is all there is with `default-features = false` (what the server uses).
//! - [`Client`] (feature `client`): mutual TLS, a connection pool per endpoint (HTTP/1.1
//!   keep-alive, or one multiplexed HTTP/2 connection when the server offers it), retries
//!   with exponential backoff and full jitter only for calls that are safe to repeat,
//!   failover across endpoints, and typed [`Error`]s carrying the server's code.
//! - The remote `envelope::KeyProvider`: `impl envelope::KeyProvider for Client`, so
//!   `envelope::seal`/`open` run against a live `kms-server`.
//! - [`rsa_oaep`]: wrapped DEKs under RSA KEKs; with feature `client`, wrapping offline
//!   from an exported public key ([`rsa_oaep::OfflineWrapper`]) and an
//!   `envelope::KeyProvider` that seals offline and opens through the server.
//! - `kmsctl`, the operator CLI, is its own package (`kmsctl/`), built on this library:
//!   a library user gets no CLI parser.
//!
//! What the types guarantee:
//! - Request types reject unknown fields (`deny_unknown_fields`), as the server must.
//! - Plaintext key material travels in [`api::SecretBytes`], which zeroizes on drop,
//!   prints `[REDACTED]` in `Debug`, and compares in constant time. (The HTTP buffers that
//!   carried it on the wire are not zeroized: a limit of the HTTP stack.)
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
//!
//! With a server (for example `kms-server dev`, whose certificates are under
//! `keyhold-dev/pki/`):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kms_client::{api::Context, Client};
//!
//! let client = Client::builder()
//!     .endpoint("https://127.0.0.1:8443")
//!     .ca_pem_file("keyhold-dev/pki/ca.pem")?
//!     .identity_pem_files("keyhold-dev/pki/app.pem", "keyhold-dev/pki/app-key.pem")?
//!     .build()?;
//! let context: Context = [("tenant".into(), "acme".into())].into_iter().collect();
//! let sealed = envelope::seal(&client, "demo", b"invoice 42", &context).await?;
//! let opened = envelope::open(&client, &sealed, &context).await?;
//! assert_eq!(opened, b"invoice 42");
//! # Ok(())
//! # }
//! ```

pub mod api;
#[cfg(feature = "client")]
mod client;
#[cfg(feature = "client")]
mod error;
pub mod hex;
#[cfg(feature = "client")]
mod provider;
pub mod rsa_oaep;
#[cfg(feature = "client")]
mod transport;

#[cfg(feature = "client")]
pub use client::{Client, ClientBuilder, RetryPolicy, DEFAULT_MAX_BACKUP, DEFAULT_MAX_RESPONSE};
#[cfg(feature = "client")]
pub use error::Error;
