//! The crypto layer: secret types, the AEAD construction, the wrapped-DEK format, KEK
//! material per algorithm, the master key's sealers, and the MAC interface for state kept
//! outside the keyring.

pub mod aead;
pub mod authstate;
pub mod format;
pub mod kek;
pub mod seal;
pub mod secret;
