//! The AWS KMS External Key Store (XKS) proxy adapter (issue 9): AWS KMS calls Keyhold for
//! every encrypt and decrypt under an XKS-backed KMS key, and the key never leaves
//! Keyhold. The wire facts are in `../shared/protocols/aws-xks.md`; operators read
//! `docs/aws-xks.md`.
//!
//! The adapter translates to the core's operations and nothing else: each key store
//! (`[[xks.stores]]`, one URI prefix) acts as one identity of one tenant, its external key
//! ids map to Keyhold AES-256 keys, and Keyhold's grants decide what it may do (`wrap`
//! for Encrypt, `unwrap` for Decrypt), the key state decides whether it may do it now,
//! and every request gets an audit record in the same chain as the native API's.
//!
//! - [`settings`]: the `[xks]` configuration.
//! - [`sigv4`]: request-signature verification; [`credentials`]: the reloadable secrets.
//! - [`tls`]: the listener's TLS, with the optional client-certificate subject check.
//! - [`service`]: routing and the four operations; [`api`]: the wire and the error table.
//! - [`authz`]: secondary authorization over `requestMetadata`.
//! - [`throttle`]: the per-store rate; [`health`]: the cached deep health check.
//! - [`cdiv`]: the encrypt output's integrity value (the specification's Appendix C).

pub mod api;
pub mod authz;
pub mod cdiv;
pub mod credentials;
pub mod health;
pub mod service;
pub mod settings;
pub mod sigv4;
pub mod throttle;
pub mod tls;

pub use service::Xks;
