//! The application layer: configuration, the server's run loop and state, and the public
//! listener that composes the adapters.

pub mod config;
mod follower;
mod listeners;
pub mod public;
pub mod server;
mod tasks;
