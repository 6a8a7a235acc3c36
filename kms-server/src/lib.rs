//! # kms-server
//!
//! Keyhold's key service: the customer's KEKs stay here, and SaaS backends call it over
//! mutual TLS to get, wrap, unwrap and rewrap data keys (DEKs).
//!
//! What it guarantees:
//! - The master key is never stored in clear ([`seal`]: key file, passphrase, Shamir
//!   shares or a PKCS#11 token); the server starts sealed and serves no key operation
//!   until unsealed.
//! - KEK versions (AES-256 or RSA) are stored encrypted under the master key, bound to
//!   their tenant, key id and version, with authenticated key records ([`keyring`]);
//!   writes are acknowledged only once durable ([`keystore`]: redb, or PostgreSQL shared
//!   by several nodes).
//! - Wrapped DEKs are bound to the caller's encryption context and safe for well over
//!   2^40 wraps per KEK version ([`format`]).
//! - Every caller is a verified client certificate (checked against CRLs) mapped to a
//!   tenant and a role, and per-key grants say who may use which key ([`tls`],
//!   [`policy`]); another tenant's key looks like a missing one.
//! - Bad input gets a 4xx with a stable error code ([`error`]), never a panic.
//! - Every request leaves a hash-chained audit record, durable before the response
//!   leaves ([`audit`]).
//! - Identities denied repeatedly are locked out for a while ([`lockout`]).
//! - Security events raise alerts to a webhook or a command ([`alert`], [`event`]).
//! - Destroying a KEK crypto-shreds every DEK under it ([`erasure`]).
//! - The cloud protocols — AWS XKS, Microsoft DKE, Google Workspace CSE, Google Cloud EKM,
//!   Salesforce cache-only keys — are adapters over the same keyring ([`xks`], [`dke`],
//!   [`cse`], [`ekm`], [`salesforce`]).
//!
//! The modules form layers that import one way (ARCHITECTURE.md's module table;
//! `tests/layers.rs` checks it).
//!
//! The library is what the binary runs; tests start it on port 0 with [`run`]:
//!
//! ```
//! use kms_server::format::{self, Header, KeyId};
//! use kms_server::secret::SecretKey;
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

pub mod adapter;
pub mod alert;
pub mod audit;
pub mod authstate;
pub mod backup;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod cse;
pub mod dev;
pub mod dke;
pub mod ekm;
pub mod erasure;
pub mod error;
pub mod event;
pub mod format;
pub mod fuzzing;
pub mod https;
pub mod jwt;
pub mod kek;
pub mod keyring;
pub mod keystore;
pub mod listen;
pub mod lockout;
pub mod metrics;
pub mod ops;
pub mod pem;
pub mod pki;
pub mod policy;
pub mod process;
pub mod public;
pub mod request_body;
pub mod routes;
pub mod salesforce;
pub mod seal;
pub mod secret;
pub mod server;
pub mod tls;
pub mod usage;
pub mod xks;

pub use config::Settings;
pub use error::Error;
pub use server::{run, Listeners};
