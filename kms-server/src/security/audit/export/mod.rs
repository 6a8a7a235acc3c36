//! Streaming the audit chain to a SIEM (`[[audit.export]]`, `docs/operations.md`, "Audit
//! export and retention").
//!
//! Each exporter reads the chain from where it stopped and sends the records in order, to
//! a syslog receiver ([`syslog`]: RFC 5424 messages, the record's JSON or a CEF line, over
//! RELP on TLS, which acknowledges each message, or over plain RFC 5425 TLS) or an OTLP
//! logs receiver ([`otlp`]: OTLP/HTTP, protobuf). Its position, the `seq` of the last
//! record the receiver acknowledged, is kept in the key store (`audit-export/<name>` in the
//! meta table) after each acknowledged batch. So after an outage of the receiver, or a
//! restart of Keyhold, it resends from the first record not acknowledged: nothing is lost,
//! and nothing acknowledged is sent again. One case sends a batch twice: Keyhold stopping
//! between the receiver's acknowledgement and the position's write. Every record carries
//! its `seq` (and its chain hash), so a receiver can drop such a repeat and check that
//! nothing is missing.
//!
//! The exporter is not on the request path: a receiver that is down never delays or
//! refuses a request. It retries with a growing delay (up to `retry_max_ms`) and raises
//! `audit_export_stalled` once it has not delivered for `stall_alert_secs`; the retention
//! sweep never purges records an exporter has not delivered ([`super::retention`]).
//!
//! On a shared (PostgreSQL) store, an exporter runs on one node at a time: the node holds
//! a lease (`audit-export/<name>/lease`, renewed by compare-and-set), and another node
//! takes over when it lapses.

pub mod otlp;
pub mod syslog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::api::AuditRecord;
use serde::Deserialize;

use super::AuditLog;
use crate::base::event::AlertKind;
use crate::security::alert::{AlertEvent, Alerter};
use crate::storage::{KeyStore, Table, WriteBatch};

/// What an exporter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// RFC 5424 syslog messages.
    Syslog,
    /// OTLP logs over HTTP (protobuf).
    Otlp,
}

/// How syslog messages travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyslogTransport {
    /// RELP over TLS: each message acknowledged by the receiver (the default).
    #[default]
    RelpTls,
    /// RFC 5425 (octet-counted frames over TLS): no acknowledgement, so what was in flight
    /// when a receiver went down may be lost.
    Tls,
}

/// What a syslog message's text is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyslogFormat {
    /// The record's JSON line, as in the chain (the default: a receiver can check the
    /// chain's hashes).
    #[default]
    Json,
    /// ArcSight Common Event Format.
    Cef,
}

/// One `[[audit.export]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTarget {
    /// Names the exporter's stored position: a new name starts from the chain's first
    /// record.
    pub name: String,
    /// `syslog` or `otlp`.
    pub kind: Kind,
    /// syslog: `host:port`; otlp: `https://host:port/v1/logs` (`http://` on a private
    /// network only).
    pub address: String,
    /// syslog: `relp-tls` (default) or `tls`.
    #[serde(default)]
    pub transport: SyslogTransport,
    /// syslog: `json` (default) or `cef`.
    #[serde(default)]
    pub format: SyslogFormat,
    /// The CA bundle the receiver's certificate must chain to (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// syslog: a client certificate (PEM) for receivers that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// syslog: its private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// syslog: the name the receiver's certificate must carry (default: the host of
    /// `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// syslog: the facility (default 10, authpriv).
    #[serde(default = "default_facility")]
    pub facility: u8,
    /// Most records per batch (1 to 1000; default 200).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// The longest wait between two attempts after a failure (default 5000 ms).
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// `audit_export_stalled` after this long without delivering (default 60 s).
    #[serde(default = "default_stall")]
    pub stall_alert_secs: u64,
}

fn default_facility() -> u8 {
    10
}
fn default_batch() -> usize {
    200
}
fn default_retry_max() -> u64 {
    5000
}
fn default_stall() -> u64 {
    60
}

impl ExportTarget {
    /// Checks one exporter's settings.
    pub fn check(&self) -> Result<(), String> {
        let at = |m: &str| format!("audit.export `{}`: {m}", self.name);
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "audit.export: name `{}` must be 1 to 64 of A-Z a-z 0-9 - _",
                self.name
            ));
        }
        if !(1..=1000).contains(&self.batch) {
            return Err(at("batch must be 1 to 1000"));
        }
        if !(100..=600_000).contains(&self.retry_max_ms) {
            return Err(at("retry_max_ms must be 100 to 600000"));
        }
        if self.facility > 23 {
            return Err(at("facility must be 0 to 23"));
        }
        match self.kind {
            Kind::Otlp => crate::transport::http_client::check_url(
                &self.address,
                crate::transport::http_client::Schemes::HttpOrHttps,
            )
            .map_err(|e| at(&e.to_string())),
            Kind::Syslog => {
                syslog::split_address(&self.address).map_err(at)?;
                if self.cert_file.is_some() != self.key_file.is_some() {
                    return Err(at("cert_file and key_file go together"));
                }
                Ok(())
            }
        }
    }

    fn cursor_key(&self) -> Vec<u8> {
        format!("audit-export/{}", self.name).into_bytes()
    }

    fn lease_key(&self) -> Vec<u8> {
        format!("audit-export/{}/lease", self.name).into_bytes()
    }
}

/// Checks every exporter, and that their names are distinct.
pub fn check_all(targets: &[ExportTarget]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for t in targets {
        t.check()?;
        if !names.insert(t.name.as_str()) {
            return Err(format!("audit.export: two exporters named `{}`", t.name));
        }
    }
    Ok(())
}

/// Why a send failed: how many records of the batch the receiver acknowledged first, and
/// what went wrong.
#[derive(Debug)]
pub struct SendError {
    /// Records acknowledged before the failure (a prefix of the batch).
    pub acked: usize,
    /// What failed (for the log and the alert: never a record's content).
    pub reason: String,
}

impl SendError {
    fn new(acked: usize, reason: impl Into<String>) -> Self {
        Self {
            acked,
            reason: reason.into(),
        }
    }
}

/// The exporter's connection, by kind.
enum Link {
    Syslog(Box<syslog::Sender>),
    Otlp(otlp::Sender),
}

impl Link {
    fn new(target: &ExportTarget, node: &str) -> Result<Self, String> {
        Ok(match target.kind {
            Kind::Syslog => Self::Syslog(Box::new(syslog::Sender::new(target, node)?)),
            Kind::Otlp => Self::Otlp(otlp::Sender::new(target, node)),
        })
    }

    async fn send(&mut self, records: &[AuditRecord]) -> Result<(), SendError> {
        match self {
            Self::Syslog(s) => s.send(records).await,
            Self::Otlp(s) => s.send(records).await,
        }
    }
}

/// Reads the stored position of an exporter (0: none yet).
pub fn position(store: &dyn KeyStore, target: &ExportTarget) -> Result<u64, String> {
    let raw = store
        .get(Table::Meta, &target.cursor_key())
        .map_err(|e| e.to_string())?;
    match raw {
        None => Ok(0),
        Some(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("audit.export `{}`: stored position unreadable", target.name)),
    }
}

fn save_position(store: &dyn KeyStore, target: &ExportTarget, seq: u64) -> Result<(), String> {
    let mut batch = WriteBatch::new();
    batch.put(
        Table::Meta,
        &target.cursor_key(),
        seq.to_string().as_bytes(),
    );
    store.commit(&batch).map_err(|e| e.to_string())
}

/// How long a node's lease on a shared store's exporter lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);
/// How often an idle exporter looks for new records.
const POLL: Duration = Duration::from_millis(200);
/// The first wait after a failure (doubled up to `retry_max_ms`).
const RETRY_MIN: Duration = Duration::from_millis(100);

/// Takes or renews this node's lease on `target` (shared stores only). `true`: this node
/// may export now.
fn hold_lease(store: &dyn KeyStore, target: &ExportTarget, node: &str, now: u64) -> bool {
    let key = target.lease_key();
    let Ok(current) = store.get(Table::Meta, &key) else {
        return false;
    };
    if let Some(v) = &current {
        let text = String::from_utf8_lossy(v);
        let (holder, until) = text.rsplit_once(' ').unwrap_or(("", "0"));
        let until = until.parse::<u64>().unwrap_or(0);
        if holder != node && until > now {
            return false;
        }
    }
    let value = format!("{node} {}", now + LEASE.as_secs());
    let mut batch = WriteBatch::new();
    batch
        .require(Table::Meta, &key, current.as_deref())
        .put(Table::Meta, &key, value.as_bytes());
    store.commit(&batch).is_ok()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs one exporter until `stop`.
pub async fn run(
    target: ExportTarget,
    audit: AuditLog,
    store: Arc<dyn KeyStore>,
    alerts: Alerter,
    node: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let shared = store.cluster().is_some();
    let mut link = match Link::new(&target, &node) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(exporter = %target.name, error = %e, "audit exporter not started");
            return;
        }
    };
    let mut delay = RETRY_MIN;
    let mut last_ok = Instant::now();
    let mut stalled = false;
    let retry_max = Duration::from_millis(target.retry_max_ms);
    loop {
        let step = export_step(&target, &audit, &store, &mut link, shared, &node).await;
        let wait = match step {
            Step::Sent | Step::Idle => {
                if stalled {
                    tracing::warn!(exporter = %target.name, "audit exporter delivering again");
                }
                stalled = false;
                last_ok = Instant::now();
                delay = RETRY_MIN;
                if matches!(step, Step::Sent) {
                    continue;
                }
                POLL
            }
            Step::NotLeader => LEASE / 3,
            Step::Failed(reason) => {
                tracing::warn!(exporter = %target.name, %reason, retry_in_ms = delay.as_millis() as u64, "audit export failed");
                if !stalled && last_ok.elapsed() >= Duration::from_secs(target.stall_alert_secs) {
                    stalled = true;
                    alerts.raise(AlertEvent::new(
                        AlertKind::AuditExportStalled,
                        None,
                        format!(
                            "audit exporter `{}` has not delivered for {} s: {reason}",
                            target.name,
                            last_ok.elapsed().as_secs()
                        ),
                    ));
                }
                let d = delay;
                delay = (delay * 2).min(retry_max);
                d
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

enum Step {
    /// A batch went out: look again at once.
    Sent,
    /// Nothing new.
    Idle,
    /// Another node holds the lease.
    NotLeader,
    /// The receiver or the store failed.
    Failed(String),
}

async fn export_step(
    target: &ExportTarget,
    audit: &AuditLog,
    store: &Arc<dyn KeyStore>,
    link: &mut Link,
    shared: bool,
    node: &str,
) -> Step {
    let (t, a, s, n) = (
        target.clone(),
        audit.clone(),
        store.clone(),
        node.to_owned(),
    );
    let read = tokio::task::spawn_blocking(move || {
        if shared && !hold_lease(s.as_ref(), &t, &n, unix_now()) {
            return Ok(None);
        }
        let after = position(s.as_ref(), &t)?;
        let records = a.records(after, t.batch).map_err(|e| e.to_string())?;
        Ok::<_, String>(Some((after, records)))
    })
    .await;
    let (after, records) = match read {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return Step::NotLeader,
        Ok(Err(e)) => return Step::Failed(e),
        Err(_) => return Step::Failed("reader task failed".into()),
    };
    let Some(first) = records.first() else {
        return Step::Idle;
    };
    if first.seq != after + 1 {
        // Records before `first` are gone (purged by hand, or a chain restored from an
        // older copy): say so, and go on from what exists.
        tracing::error!(exporter = %target.name, after, next = first.seq, "audit records missing before the exporter's next record");
    }
    let result = link.send(&records).await;
    let (acked, failure) = match result {
        Ok(()) => (records.len(), None),
        Err(e) => (e.acked.min(records.len()), Some(e.reason)),
    };
    if acked > 0 {
        let seq = records[acked - 1].seq;
        let (t, s) = (target.clone(), store.clone());
        let saved = tokio::task::spawn_blocking(move || save_position(s.as_ref(), &t, seq)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Step::Failed(format!("position not saved: {e}")),
            Err(_) => return Step::Failed("position not saved".into()),
        }
    }
    match failure {
        Some(reason) => Step::Failed(reason),
        None => Step::Sent,
    }
}

/// The smallest stored position over `targets` (`None`: no exporter): what the retention
/// sweep may purge up to.
pub fn slowest(store: &dyn KeyStore, targets: &[ExportTarget]) -> Result<Option<u64>, String> {
    let mut min: Option<u64> = None;
    for t in targets {
        let p = position(store, t)?;
        min = Some(min.map_or(p, |m| m.min(p)));
    }
    Ok(min)
}

/// Splits RFC 3339 record time into Unix nanoseconds (0 when unreadable).
pub(crate) fn unix_nanos(time: &str) -> u64 {
    humantime::parse_rfc3339(time)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(kind: Kind, address: &str) -> ExportTarget {
        toml::from_str(&format!(
            "name = \"siem\"\nkind = \"{}\"\naddress = \"{address}\"",
            match kind {
                Kind::Syslog => "syslog",
                Kind::Otlp => "otlp",
            }
        ))
        .unwrap()
    }

    #[test]
    fn settings_are_checked() {
        assert!(target(Kind::Syslog, "siem.example:2514").check().is_ok());
        assert!(target(Kind::Syslog, "siem.example").check().is_err());
        assert!(target(Kind::Otlp, "https://otel.example:4318/v1/logs")
            .check()
            .is_ok());
        assert!(target(Kind::Otlp, "otel.example:4318").check().is_err());
        let mut t = target(Kind::Syslog, "h:1");
        t.name = "bad name".into();
        assert!(t.check().is_err());
        let t = target(Kind::Syslog, "h:1");
        assert!(check_all(&[t.clone(), t]).is_err());
    }

    #[test]
    fn a_lease_is_held_by_one_node_until_it_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::storage::open(crate::storage::Engine::Redb, &dir.path().join("s")).unwrap();
        let t = target(Kind::Syslog, "h:1");
        assert!(hold_lease(store.as_ref(), &t, "a", 100));
        assert!(!hold_lease(store.as_ref(), &t, "b", 101));
        assert!(hold_lease(store.as_ref(), &t, "a", 102));
        assert!(hold_lease(
            store.as_ref(),
            &t,
            "b",
            102 + LEASE.as_secs() + 1
        ));
        assert!(!hold_lease(
            store.as_ref(),
            &t,
            "a",
            102 + LEASE.as_secs() + 2
        ));
    }

    #[test]
    fn positions_are_stored_per_exporter() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::storage::open(crate::storage::Engine::Redb, &dir.path().join("s")).unwrap();
        let a = target(Kind::Syslog, "h:1");
        let mut b = a.clone();
        b.name = "other".into();
        assert_eq!(position(store.as_ref(), &a).unwrap(), 0);
        save_position(store.as_ref(), &a, 42).unwrap();
        assert_eq!(position(store.as_ref(), &a).unwrap(), 42);
        assert_eq!(slowest(store.as_ref(), &[a, b]).unwrap(), Some(0));
    }
}
