//! Alerts: security events (denials, lockouts, seal and unseal, key disable) sent to a
//! configured HTTP webhook and/or command, from a background task, with retries, never
//! blocking a request. A full queue drops events (counted in the log) rather than slowing
//! the service.
//!
//! Webhook: `POST <url>` with the event as JSON (`http://` URLs; put a TLS-terminating
//! relay in front for a remote receiver). Command: run with the event JSON on stdin.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Where alerts go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertSettings {
    /// `http://host:port/path`.
    pub webhook: Option<String>,
    /// A program and its arguments; gets the event JSON on stdin.
    pub command: Option<Vec<String>>,
}

/// One alert.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AlertEvent {
    /// `denied`, `locked_out`, `sealed`, `unsealed`, `key_disabled`.
    pub kind: &'static str,
    /// RFC 3339.
    pub time: String,
    /// The identity concerned.
    pub identity: Option<String>,
    /// Short detail (route, key name); never key material.
    pub detail: String,
}

impl AlertEvent {
    /// An event of `kind` now.
    pub fn new(kind: &'static str, identity: Option<&str>, detail: impl Into<String>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            kind,
            time: humantime::format_rfc3339_millis(UNIX_EPOCH + now).to_string(),
            identity: identity.map(str::to_owned),
            detail: detail.into(),
        }
    }
}

/// Handle for raising alerts.
#[derive(Clone)]
pub struct Alerter {
    tx: Option<mpsc::Sender<AlertEvent>>,
}

const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 3;

fn parse_http(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_owned()))
}

/// Checks a webhook URL (for configuration validation).
pub fn check_webhook(url: &str) -> Result<(), String> {
    parse_http(url)
        .map(|_| ())
        .ok_or_else(|| format!("`{url}`: webhooks are http://host[:port]/path"))
}

async fn post_once(authority: &str, path: &str, body: &[u8]) -> Result<(), String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(2), sender.send_request(req))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

async fn run_command(argv: &[String], body: &[u8]) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body).await;
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("exited with {s}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

impl Alerter {
    /// No alert destination: `raise` does nothing.
    pub fn off() -> Self {
        Self { tx: None }
    }

    /// Starts the delivery task (inside a tokio runtime).
    pub fn start(settings: &AlertSettings) -> Self {
        if settings.webhook.is_none() && settings.command.is_none() {
            return Self::off();
        }
        let (tx, mut rx) = mpsc::channel::<AlertEvent>(QUEUE);
        let settings = settings.clone();
        tokio::spawn(async move {
            let webhook = settings.webhook.as_deref().and_then(parse_http);
            while let Some(ev) = rx.recv().await {
                let body = match serde_json::to_vec(&ev) {
                    Ok(b) => b,
                    Err(_) => continue,
                };
                if let Some((authority, path)) = &webhook {
                    let mut delay = Duration::from_millis(100);
                    for attempt in 1..=ATTEMPTS {
                        match post_once(authority, path, &body).await {
                            Ok(()) => break,
                            Err(e) if attempt == ATTEMPTS => {
                                tracing::error!(kind = ev.kind, error = %e, "alert webhook failed")
                            }
                            Err(_) => {
                                tokio::time::sleep(delay).await;
                                delay *= 4;
                            }
                        }
                    }
                }
                if let Some(argv) = &settings.command {
                    let argv = argv.clone();
                    let body = body.clone();
                    let kind = ev.kind;
                    tokio::spawn(async move {
                        if let Err(e) = run_command(&argv, &body).await {
                            tracing::error!(kind, error = %e, "alert command failed");
                        }
                    });
                }
            }
        });
        Self { tx: Some(tx) }
    }

    /// Queues an alert; never waits.
    pub fn raise(&self, ev: AlertEvent) {
        if let Some(tx) = &self.tx {
            if tx.try_send(ev).is_err() {
                tracing::error!("alert queue full or closed: an alert was dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        assert_eq!(
            parse_http("http://127.0.0.1:9000/hook"),
            Some(("127.0.0.1:9000".into(), "/hook".into()))
        );
        assert_eq!(
            parse_http("http://siem"),
            Some(("siem:80".into(), "/".into()))
        );
        assert!(parse_http("https://siem/x").is_none());
        assert!(check_webhook("ftp://x").is_err());
    }
}
