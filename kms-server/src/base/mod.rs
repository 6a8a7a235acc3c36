//! The base layer: what every other layer may use and which imports none of them —
//! error types, security-event kinds, PEM files, the clock, process hardening, metrics and
//! usage counters.

pub mod clock;
pub mod error;
pub mod event;
pub mod metrics;
pub mod pem;
pub mod process;
pub mod usage;
