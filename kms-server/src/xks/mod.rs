//! The AWS KMS External Key Store (XKS) proxy adapter (issue 9): AWS KMS calls Keyhold for
//! every encrypt and decrypt under an XKS-backed KMS key, and the key never leaves
//! Keyhold. The wire facts are in `../shared/protocols/aws-xks.md`.
//!
//! Built so far: [`sigv4`], the request-signature verification every XKS request needs,
//! and [`cdiv`], the encrypt output's integrity value (the specification's Appendix C).
//! The routes, key mapping, secondary authorization, health and throttling come next and
//! live in this folder.

pub mod cdiv;
pub mod sigv4;
