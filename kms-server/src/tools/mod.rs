//! The tools layer: the subcommands of the binary other than `serve` (init, restore,
//! migrate-store, health, xks-credential, dev mode), the throwaway PKI, and the fuzz
//! targets' entry points.

pub mod dev;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod health;
pub mod init;
pub mod migrate;
pub mod pki;
pub mod restore;
pub mod xks_credential;
