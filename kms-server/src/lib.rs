//! # kms-server
//!
//! Keyhold's key service: the customer's KEKs stay here, and SaaS backends call it over
//! mutual TLS to get, wrap, unwrap and rewrap data keys (DEKs).
//!
//! What it guarantees:
//! - The master key is never stored in clear ([`seal`](crypto::seal): key file, passphrase, Shamir
//!   shares or a PKCS#11 token); the server starts sealed and serves no key operation
//!   until unsealed.
//! - KEK versions (AES-256 or RSA) are stored encrypted under the master key, bound to
//!   their tenant, key id and version, with authenticated key records ([`keyring`]);
//!   writes are acknowledged only once durable ([`keystore`](storage): redb, or PostgreSQL shared
//!   by several nodes).
//! - Wrapped DEKs are bound to the caller's encryption context and safe for well over
//!   2^40 wraps per KEK version ([`format`](crypto::format)).
//! - Every caller is a verified client certificate (checked against CRLs) mapped to a
//!   tenant and a role, and per-key grants say who may use which key ([`tls`](security::tls),
//!   [`policy`](access::policy)); another tenant's key looks like a missing one.
//! - Bad input gets a 4xx with a stable error code ([`error`](base::error)), never a panic.
//! - Every request leaves a hash-chained audit record, durable before the response
//!   leaves ([`audit`](security::audit)).
//! - Identities denied repeatedly are locked out for a while ([`lockout`](access::lockout)).
//! - Security events raise alerts to a webhook or a command ([`alert`](security::alert), [`event`](base::event)).
//! - Destroying a KEK crypto-shreds every DEK under it ([`erasure`](storage::erasure)).
//! - The cloud protocols — AWS XKS, Microsoft DKE, Google Workspace CSE, Google Cloud EKM,
//!   Salesforce cache-only keys — are adapters over the same keyring ([`xks`](adapters::xks), [`dke`](adapters::dke),
//!   [`cse`](adapters::cse), [`ekm`](adapters::ekm), [`salesforce`](adapters::salesforce)).
//!
//! The modules form layers that import one way (ARCHITECTURE.md's module table;
//! `tests/layers.rs` checks it).
//!
//! The library is what the binary runs; tests start it on port 0 with [`run`]:
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
