//! # kms-server
//!
//! Keyhold's key service: the customer's KEKs stay here, and SaaS backends call it over
//! mutual TLS to get, wrap, unwrap and rewrap data keys (DEKs).
//!
//! What it guarantees:
//! - The master key is never stored in clear ([`crypto::seal`]: key file, passphrase, Shamir
//!   shares or a PKCS#11 token); the server starts sealed and serves no key operation
//!   until unsealed.
//! - KEK versions (AES-256 or RSA) are stored encrypted under the master key, bound to
//!   their tenant, key id and version, with authenticated key records ([`keyring`]);
//!   writes are acknowledged only once durable ([`storage`]: redb, or PostgreSQL shared
//!   by several nodes).
//! - Wrapped DEKs are bound to the caller's encryption context and safe for well over
//!   2^40 wraps per KEK version ([`crypto::format`]).
//! - Every caller is a verified client certificate (checked against CRLs) mapped to a
//!   tenant and a role, and per-key grants say who may use which key ([`security::tls`],
//!   [`access::policy`]); another tenant's key looks like a missing one.
//! - Bad input gets a 4xx with a stable error code ([`base::error`]), never a panic.
//! - Every request leaves a hash-chained audit record, durable before the response
//!   leaves ([`security::audit`]), written
//!   for every listener by one completion path ([`api::completion`]).
//! - Identities denied repeatedly are locked out for a while ([`access::lockout`]).
//! - Security events raise alerts to a webhook or a command ([`security::alert`], [`base::event`]).
//! - Destroying a KEK crypto-shreds every DEK under it ([`storage::erasure`]).
//! - The cloud protocols — AWS XKS, Microsoft DKE, Google Workspace CSE, Google Cloud EKM,
//!   Salesforce cache-only keys — are adapters over the same keyring ([`adapters`]: `xks`, `dke`, `cse`, `ekm`,
//!   `salesforce`).
//!
//! The source is one folder per layer, each importing only the layers below it
//! (ARCHITECTURE.md's module table; `tests/layers.rs` checks it): [`base`], [`transport`],
//! [`crypto`], [`storage`], [`access`], [`keyring`], [`security`], [`api`], [`adapters`],
//! [`app`], [`tools`].
//!
//! The library is what the binary runs; tests start it on port 0 with
//! [`app::server::run`]. The wrapped-DEK format, in the library's own words:
//!
//! ```
//! use kms_server::crypto::format::{self, Header, KeyId};
//! use kms_server::crypto::secret::SecretKey;
//!
//! let kek = SecretKey::generate().unwrap();
//! let ctx = [("tenant".to_string(), "acme".to_string())].into_iter().collect();
//! let canonical = format::canonical_context(&ctx).unwrap();
//! let header = Header { key_id: KeyId([1; 16]), version: 1 };
//! let wrapped = format::wrap(&kek, &header, &[7u8; 32], &canonical).unwrap();
//! let dek = format::unwrap(&kek, &wrapped, &canonical).unwrap();
//! assert_eq!(dek.expose_secret(), &[7u8; 32]);
//! let other = format::canonical_context(&Default::default()).unwrap();
//! assert!(format::unwrap(&kek, &wrapped, &other).is_err());
//! ```

pub mod access;
pub mod adapters;
pub mod api;
pub mod app;
pub mod base;
pub mod crypto;
pub mod keyring;
pub mod security;
pub mod storage;
pub mod tools;
pub mod transport;

pub use app::config::Settings;
pub use app::server::{run, Listeners};
pub use base::error::Error;
