//! The transport layer: how every listener accepts and bounds connections and reads request
//! bodies, and the one outbound HTTPS client.

pub mod http_client;
pub mod listen;
pub mod request_body;
