//! The application layer: configuration, the server's run loop and state, and the public
//! listener that composes the adapters.

pub mod config;
pub mod public;
pub mod server;
