//! Alerts: security events (denials, lockouts, seal and unseal, key disable and
//! destruction, audit and integrity findings) sent to a configured webhook and/or
//! command, from background workers, never blocking a request.
//!
//! What a flood of events can cost is bounded, whoever causes it:
//! - **Coalesced per kind.** Each kind sends its first [`BURST`] events of an interval
//!   ([`AlertSettings::coalesce`], 10 s by default) one by one; the rest of that interval
//!   are counted, and one summary event per kind follows at its end, with `count` and a
//!   few of the identities concerned. Every event is in the audit trail regardless.
//! - **Room kept for the kinds that matter.** The kinds a caller can cause at will by
//!   sending requests ([`routine`]: `denied`, `xks_auth_failed`) queue apart from all
//!   others (sealed, locked_out, key_destroyed, audit_write_failed, integrity findings…),
//!   and the workers serve the others first: a denial flood cannot push out a `sealed`.
//! - **One worker per destination.** Commands run one at a time (10 s each at most), so a
//!   flood never forks more than one child. An event that finds its queue full is dropped
//!   and counted; the count goes out as an `alerts_dropped` event.
//!
//! Webhook: `POST <url>` with the event as JSON; `https://` (checked against
//! [`AlertSettings::webhook_ca`], else the system's CAs) or `http://` (a receiver on
//! loopback or a private network). Command: run with the event JSON on stdin.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::transport::http_client::{self, Schemes};
use serde::Serialize;

pub use crate::base::event::AlertKind;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Where alerts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// `https://host[:port]/path` or `http://host[:port]/path`.
    pub webhook: Option<String>,
    /// The CA bundle (PEM) an `https://` webhook must chain to; default: the system's.
    pub webhook_ca: Option<PathBuf>,
    /// A program and its arguments; gets the event JSON on stdin.
    pub command: Option<Vec<String>>,
    /// The interval over which each kind's events past [`BURST`] are counted into one
    /// summary.
    pub coalesce: Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            webhook: None,
            webhook_ca: None,
            command: None,
            coalesce: DEFAULT_COALESCE,
        }
    }
}

/// The default of [`AlertSettings::coalesce`].
pub const DEFAULT_COALESCE: Duration = Duration::from_secs(10);

/// Events of one kind sent one by one per interval; the rest are counted.
pub const BURST: u32 = 10;

/// Events waiting per destination, for each of the two queues.
const QUEUE: usize = 256;

/// Identities named in a summary, at most.
const SAMPLE: usize = 5;

const ATTEMPTS: u32 = 3;

/// Whether events of `kind` are ones a caller can cause at will by sending requests:
/// they queue apart, behind every other kind.
pub fn routine(kind: AlertKind) -> bool {
    kind.routine()
}

/// One alert.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AlertEvent {
    /// What it is about.
    pub kind: AlertKind,
    /// RFC 3339.
    pub time: String,
    /// The identity concerned.
    pub identity: Option<String>,
    /// Short detail (route, key name); never key material.
    pub detail: String,
    /// On a summary: how many events of `kind` it stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    humantime::format_rfc3339_millis(UNIX_EPOCH + now).to_string()
}

impl AlertEvent {
    /// An event of `kind` now.
    pub fn new(kind: AlertKind, identity: Option<&str>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            time: now_rfc3339(),
            identity: identity.map(str::to_owned),
            detail: detail.into(),
            count: None,
        }
    }
}

/// Handle for raising alerts.
#[derive(Clone)]
pub struct Alerter {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    windows: Mutex<HashMap<AlertKind, Window>>,
    destinations: Vec<Destination>,
    dropped: AtomicU64,
}

/// One kind's events in the current interval.
#[derive(Default)]
struct Window {
    sent: u32,
    counted: u64,
    identities: Vec<String>,
}

/// One destination's two queues.
struct Destination {
    routine: mpsc::Sender<Arc<AlertEvent>>,
    others: mpsc::Sender<Arc<AlertEvent>>,
}

/// Where one worker sends.
enum Target {
    Webhook { url: String, ca: Option<PathBuf> },
    Command(Vec<String>),
}

/// Checks a webhook URL (for configuration validation).
pub fn check_webhook(url: &str) -> Result<(), String> {
    http_client::check_url(url, Schemes::HttpOrHttps).map_err(|_| {
        format!("`{url}`: webhooks are https://host[:port]/path (or http:// on a private network)")
    })
}

/// Why an alert did not reach its destination (logged; the alert is retried, then
/// dropped and counted).
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("webhook: {0}")]
    Http(#[from] http_client::HttpError),
    #[error("the webhook answered HTTP {0}")]
    Status(u16),
    #[error("the alert command is empty")]
    EmptyCommand,
    #[error("the alert command could not start: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the alert command could not be waited for: {0}")]
    Wait(#[source] std::io::Error),
    #[error("the alert command exited with {0}")]
    Exit(std::process::ExitStatus),
    #[error("the alert command did not finish within {} s", COMMAND_TIMEOUT.as_secs())]
    Timeout,
}

/// How long an alert command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Posts one event to a webhook: `http://` within 3 s (a private receiver), `https://`
/// within 10 s; any 2xx is delivery.
async fn post_webhook(url: &str, ca: Option<&PathBuf>, body: &[u8]) -> Result<(), DeliveryError> {
    let deadline = if url.starts_with("http://") {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let (status, _) = http_client::request(
        "POST",
        url,
        Schemes::HttpOrHttps,
        ca.map(PathBuf::as_path),
        Some(body),
        deadline,
    )
    .await?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(DeliveryError::Status(status))
    }
}

/// Runs the alert command with the event on its standard input; exit status 0 is
/// delivery.
async fn run_command(argv: &[String], body: &[u8]) -> Result<(), DeliveryError> {
    let (program, args) = argv.split_first().ok_or(DeliveryError::EmptyCommand)?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(DeliveryError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body).await;
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(DeliveryError::Exit(s)),
        Ok(Err(e)) => Err(DeliveryError::Wait(e)),
        Err(_) => Err(DeliveryError::Timeout),
    }
}

impl Target {
    async fn deliver(&self, ev: &AlertEvent) {
        let Ok(body) = serde_json::to_vec(ev) else {
            return;
        };
        match self {
            Target::Webhook { url, ca } => {
                let mut delay = Duration::from_millis(100);
                for attempt in 1..=ATTEMPTS {
                    match post_webhook(url, ca.as_ref(), &body).await {
                        Ok(()) => return,
                        Err(e) if attempt == ATTEMPTS => {
                            tracing::error!(kind = %ev.kind, error = %e, "alert webhook failed")
                        }
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay *= 4;
                        }
                    }
                }
            }
            Target::Command(argv) => {
                if let Err(e) = run_command(argv, &body).await {
                    tracing::error!(kind = %ev.kind, error = %e, "alert command failed");
                }
            }
        }
    }

    /// Delivers, one event at a time, the others' queue first, until both close.
    async fn work(
        self,
        mut routine: mpsc::Receiver<Arc<AlertEvent>>,
        mut others: mpsc::Receiver<Arc<AlertEvent>>,
    ) {
        loop {
            let ev = tokio::select! {
                biased;
                Some(ev) = others.recv() => ev,
                Some(ev) = routine.recv() => ev,
                else => return,
            };
            self.deliver(&ev).await;
        }
    }
}

impl Inner {
    /// Queues `ev` for every destination; a full queue drops it (counted).
    fn enqueue(&self, ev: AlertEvent) {
        let ev = Arc::new(ev);
        for d in &self.destinations {
            let queue = if routine(ev.kind) {
                &d.routine
            } else {
                &d.others
            };
            if queue.try_send(ev.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ends an interval: one summary per kind that had events counted, and the count of
    /// dropped events.
    fn close_interval(&self, interval: Duration) {
        let windows =
            std::mem::take(&mut *self.windows.lock().unwrap_or_else(PoisonError::into_inner));
        let mut kinds: Vec<_> = windows.into_iter().filter(|(_, w)| w.counted > 0).collect();
        kinds.sort_by_key(|(kind, _)| *kind);
        for (kind, w) in kinds {
            let who = if w.identities.is_empty() {
                String::new()
            } else {
                format!(" (identities: {})", w.identities.join(", "))
            };
            self.enqueue(AlertEvent {
                count: Some(w.counted),
                ..AlertEvent::new(
                    kind,
                    None,
                    format!(
                        "{} more `{kind}` events in the last {} s, counted rather than sent one by one{who}; each is in the audit trail",
                        w.counted,
                        interval.as_secs()
                    ),
                )
            });
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::error!(dropped, "alert queues full: alerts were dropped");
            self.enqueue(AlertEvent {
                count: Some(dropped),
                ..AlertEvent::new(
                    crate::base::event::AlertKind::AlertsDropped,
                    None,
                    format!("{dropped} alerts found their queue full and were dropped"),
                )
            });
        }
    }
}

impl Alerter {
    /// No alert destination: `raise` does nothing.
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Starts the workers and the interval timer (inside a tokio runtime); they stop when
    /// the last handle is dropped.
    pub fn start(settings: &AlertSettings) -> Self {
        let mut targets = Vec::new();
        if let Some(url) = &settings.webhook {
            targets.push(Target::Webhook {
                url: url.clone(),
                ca: settings.webhook_ca.clone(),
            });
        }
        if let Some(argv) = &settings.command {
            targets.push(Target::Command(argv.clone()));
        }
        if targets.is_empty() {
            return Self::off();
        }
        let mut destinations = Vec::new();
        for target in targets {
            let (routine, routine_rx) = mpsc::channel(QUEUE);
            let (others, others_rx) = mpsc::channel(QUEUE);
            tokio::spawn(target.work(routine_rx, others_rx));
            destinations.push(Destination { routine, others });
        }
        let inner = Arc::new(Inner {
            windows: Mutex::new(HashMap::new()),
            destinations,
            dropped: AtomicU64::new(0),
        });
        let interval = settings.coalesce.max(Duration::from_millis(100));
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.close_interval(interval);
            }
        });
        Self { inner: Some(inner) }
    }

    /// Sends an alert, or counts it into its kind's summary (see the module
    /// documentation); never waits.
    pub fn raise(&self, ev: AlertEvent) {
        let Some(inner) = &self.inner else { return };
        {
            let mut windows = inner.windows.lock().unwrap_or_else(PoisonError::into_inner);
            let w = windows.entry(ev.kind).or_default();
            if w.sent >= BURST {
                w.counted += 1;
                if let Some(id) = ev.identity {
                    if w.identities.len() < SAMPLE && !w.identities.contains(&id) {
                        w.identities.push(id);
                    }
                }
                return;
            }
            w.sent += 1;
        }
        inner.enqueue(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        assert!(check_webhook("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_webhook("http://siem").is_ok());
        assert!(check_webhook("https://siem/x").is_ok());
        assert!(check_webhook("https://").is_err());
        assert!(check_webhook("ftp://x").is_err());
    }
}
