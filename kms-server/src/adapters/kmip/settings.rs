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
    /// Connections served at once (absent: the server's `max_connections`).
    #[serde(default)]
    max_connections: Option<usize>,
    /// How long a connection may wait between requests, seconds (absent: the server's
    /// `idle_timeout_secs`).
    #[serde(default)]
    idle_timeout_secs: Option<u64>,
}

/// `[kmip]`, validated.
#[derive(Debug, Clone)]
pub struct KmipSettings {
    /// The listener's address.
    pub listen: SocketAddr,
    /// The largest request, bytes.
    pub max_message_bytes: usize,
    /// Connections at once (None: the server's).
    pub max_connections: Option<usize>,
    /// Idle time allowed between requests (None: the server's).
    pub idle_timeout: Option<Duration>,
}

impl KmipSettings {
    /// The listener's limits: the server's, with this table's connection count and idle
    /// deadline where it sets them.
    pub fn limits(
        &self,
        server: crate::transport::listen::Limits,
    ) -> crate::transport::listen::Limits {
        crate::transport::listen::Limits {
            max_connections: self.max_connections.unwrap_or(server.max_connections),
            idle_timeout: self.idle_timeout.unwrap_or(server.idle_timeout),
            ..server
        }
    }
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
        if self
            .max_connections
            .is_some_and(|n| !(1..=65_536).contains(&n))
        {
            return e("max_connections", "must be between 1 and 65536".into());
        }
        if self
            .idle_timeout_secs
            .is_some_and(|n| !(1..=86_400).contains(&n))
        {
            return e("idle_timeout_secs", "must be between 1 and 86400".into());
        }
        Ok(KmipSettings {
            listen,
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout_secs.map(Duration::from_secs),
        })
    }
}
