//! Erasure keys: what makes destroying a KEK real (crypto-shredding).
//!
//! No store forgets on demand: redb leaves a deleted record's pages readable until they
//! are reused, and PostgreSQL keeps old row versions until vacuum and copies in its WAL,
//! archives and backups. So each KEK gets a random 256-bit **erasure key**, and its
//! versions are sealed under `HKDF(salt = erasure key, ikm = master key)`
//! ([`crate::crypto::aead::bind_key`]): reading a version needs both. Destroying the KEK
//! destroys its erasure key in a place that *can* forget, so every copy of the sealed
//! versions left behind becomes unreadable, even with the master key.
//!
//! - [`file`]: the embedded store's side file; destruction overwrites the key in place.
//! - [`shared`]: a store shared by several nodes (PostgreSQL). The erasure keys live in
//!   the database, sealed under an *epoch key* whose root is a non-extractable key in the
//!   sealing HSM; destruction deletes the row and moves the cluster to a new epoch, and
//!   the old epoch's HSM key is destroyed, so every copy of the old rows (WAL, backups)
//!   becomes unreadable.

pub mod file;
pub mod shared;

pub use file::ErasureFile;
pub use shared::SharedErasure;
