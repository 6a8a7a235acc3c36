//! The `[kmip]` table: the KMIP listener (`docs/kmip.md`). Its TLS is the API's
//! (`[tls]`: server certificate, client CA, revocation lists; a client certificate is
//! required).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

fn default_listen() -> String {
    "127.0.0.1:5696".to_owned()
}
fn default_max_message() -> usize {
    1 << 20
}
fn default_max_connections() -> usize {
    1024
}
fn default_idle() -> u64 {
    120
}

/// `[kmip]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileKmip {
    /// Where the listener binds (KMIP's registered port is 5696).
    #[serde(default = "default_listen")]
    listen: String,
    /// The largest request taken, bytes (a larger one closes the connection).
    #[serde(default = "default_max_message")]
    max_message_bytes: usize,
    /// Connections served at once.
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    /// How long a connection may wait between requests, seconds.
    #[serde(default = "default_idle")]
    idle_timeout_secs: u64,
}

/// `[kmip]`, validated.
#[derive(Debug, Clone)]
pub struct KmipSettings {
    /// The listener's address.
    pub listen: SocketAddr,
    /// The largest request, bytes.
    pub max_message_bytes: usize,
    /// Connections at once.
    pub max_connections: usize,
    /// Idle time allowed between requests.
    pub idle_timeout: Duration,
}

impl FileKmip {
    /// Validates; errors are (dotted field, message).
    pub(crate) fn validate(self) -> Result<KmipSettings, (String, String)> {
        let e = |f: &str, m: String| Err((format!("kmip.{f}"), m));
        let Ok(listen) = self.listen.parse() else {
            return e("listen", format!("`{}` is not host:port", self.listen));
        };
        if !(1024..=64 << 20).contains(&self.max_message_bytes) {
            return e(
                "max_message_bytes",
                "must be between 1024 and 67108864".into(),
            );
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return e("max_connections", "must be between 1 and 65536".into());
        }
        if !(1..=86_400).contains(&self.idle_timeout_secs) {
            return e("idle_timeout_secs", "must be between 1 and 86400".into());
        }
        Ok(KmipSettings {
            listen,
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        })
    }
}
