//! The security layer: TLS configuration and identities, the audit trail, and alert
//! delivery.

pub mod alert;
pub mod audit;
pub mod tls;
