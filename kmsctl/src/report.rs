//! `kmsctl report`: one self-contained HTML file of a tenant's key use, for people to look
//! at — per key and per identity, unwraps and wraps over time (plots), versions and their
//! age, keys due for rotation, pending approvals, the exfiltration brake and recent security
//! events. It works offline (no script, no font, no image fetched: the plots are inline
//! SVG) and holds no key material: it is built from key metadata, the brake's and the
//! approvals' state, and audit records, none of which carry any.
//!
//! What it reads, and with which identity: the keys, approvals and brake as an admin (the
//! command's identity); the audit trail as an auditor (`--auditor-cert`/`--auditor-key`,
//! or the `--dev` auditor). A part that cannot be read (a role missing, a server sealed)
//! is named in the report with the reason, and the rest is still written.

mod page;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kms_client::api::{ApprovalInfo, AuditRecord, BrakeStatus, KeyInfo};
use kms_client::Client;

/// Plot points over the window.
const POINTS: u64 = 168;

/// Security events kept for the report, newest.
const EVENTS: usize = 50;

/// Audit records per request.
const PAGE: usize = 1000;

/// What a report covers.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    /// From.
    pub from: SystemTime,
    /// To (when the report was made).
    pub to: SystemTime,
    /// One plot point per this long.
    pub bucket: Duration,
    /// Plot points.
    pub points: usize,
}

impl Window {
    /// The last `span` to now, in about [`POINTS`] buckets (of whole minutes from an hour
    /// on, of seconds below).
    pub(crate) fn last(span: Duration, now: SystemTime) -> Self {
        let span = span.max(Duration::from_secs(10));
        let mut bucket = span.as_secs().div_ceil(POINTS).max(1);
        if bucket >= 60 {
            bucket = bucket.div_ceil(60) * 60;
        }
        let points = span.as_secs().div_ceil(bucket);
        Self {
            from: now - span,
            to: now,
            bucket: Duration::from_secs(bucket),
            points: usize::try_from(points).unwrap_or(1),
        }
    }

    /// The bucket `t` falls in, if in the window.
    fn index(&self, t: SystemTime) -> Option<usize> {
        let since = t.duration_since(self.from).ok()?;
        let i = usize::try_from(since.as_secs() / self.bucket.as_secs()).ok()?;
        (t <= self.to).then_some(i.min(self.points - 1))
    }
}

/// Unwraps and wraps per bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Series {
    /// DEKs handed back (unwrap and every protocol's decrypt).
    pub unwraps: Vec<u64>,
    /// DEKs wrapped (datakey, wrap, rewrap and every protocol's encrypt).
    pub wraps: Vec<u64>,
}

impl Series {
    fn new(points: usize) -> Self {
        Self {
            unwraps: vec![0; points],
            wraps: vec![0; points],
        }
    }

    /// Total unwraps.
    pub(crate) fn total_unwraps(&self) -> u64 {
        self.unwraps.iter().sum()
    }

    /// Total wraps.
    pub(crate) fn total_wraps(&self) -> u64 {
        self.wraps.iter().sum()
    }
}

/// What the audit trail says about the window.
#[derive(Debug, Clone)]
pub(crate) struct Usage {
    /// Every key together.
    pub all: Series,
    /// Per key (`tenant/key`).
    pub keys: BTreeMap<String, Series>,
    /// Per identity.
    pub identities: BTreeMap<String, Series>,
    /// Refusals and security-relevant operations, oldest first (the last [`EVENTS`]).
    pub events: Vec<AuditRecord>,
    /// Records read.
    pub records: u64,
    /// Records of the window left unread (past `--max-records`).
    pub skipped: u64,
}

/// Everything a report shows; each part read or the reason it was not.
#[derive(Debug)]
pub(crate) struct Report {
    /// The server.
    pub endpoint: String,
    /// The period.
    pub window: Window,
    /// A current version older than this is due for rotation (for keys without a rotation
    /// period; those with one are due at its end).
    pub rotate_after: Duration,
    /// The tenant's keys.
    pub keys: Result<Vec<KeyInfo>, String>,
    /// Usage from the audit trail.
    pub usage: Result<Usage, String>,
    /// Requests for approval.
    pub approvals: Result<Vec<ApprovalInfo>, String>,
    /// The exfiltration brake.
    pub brake: Result<BrakeStatus, String>,
}

impl Report {
    /// The report as one HTML document.
    pub(crate) fn html(&self) -> String {
        page::render(self)
    }
}

/// What an audit record is, for the plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Unwrap,
    Wrap,
}

/// The use an operation makes of a key, from its name: every protocol's operations name
/// themselves (`POST /v1/unwrap`, `KMIP Decrypt`, `POST /v1/transit/decrypt/{name}`, XKS's
/// `…/decrypt`). A batch is one record of several items: not counted.
fn classify(operation: &str) -> Option<Use> {
    let op = operation.to_ascii_lowercase();
    if op.contains("batch") {
        None
    } else if op.contains("rewrap") {
        Some(Use::Wrap)
    } else if op.contains("unwrap") || op.contains("decrypt") {
        Some(Use::Unwrap)
    } else if op.contains("wrap")
        || op.contains("encrypt")
        || op.contains("datakey")
        || op.contains("generate")
    {
        Some(Use::Wrap)
    } else {
        None
    }
}

/// Whether a record belongs in "recent security events": a refusal of authentication,
/// authorization or the brake, or an operation on the keys' lifecycle, the service or its
/// controls.
fn is_event(r: &AuditRecord) -> bool {
    if r.outcome != "ok" && matches!(r.status, 401 | 403 | 429) {
        return true;
    }
    let op = r.operation.to_ascii_lowercase();
    let read = op.starts_with("get ");
    !read
        && [
            "/v1/sys/",
            "/disable",
            "/schedule-deletion",
            "/cancel-deletion",
            "/min-decrypt-version",
            "/grants",
            "/v1/approvals",
            "kmip destroy",
            "kmip revoke",
        ]
        .iter()
        .any(|p| op.contains(p))
}

impl Usage {
    fn new(window: &Window) -> Self {
        Self {
            all: Series::new(window.points),
            keys: BTreeMap::new(),
            identities: BTreeMap::new(),
            events: Vec::new(),
            records: 0,
            skipped: 0,
        }
    }

    /// Counts one record.
    fn add(&mut self, window: &Window, r: &AuditRecord) {
        let Ok(t) = humantime::parse_rfc3339(&r.time) else {
            return;
        };
        let Some(i) = window.index(t) else { return };
        self.records += 1;
        if is_event(r) {
            if self.events.len() == EVENTS {
                self.events.remove(0);
            }
            self.events.push(r.clone());
        }
        let Some(u) = classify(&r.operation).filter(|_| r.outcome == "ok") else {
            return;
        };
        let key = r.key.as_ref().map(|k| match &r.tenant {
            Some(t) => format!("{t}/{k}"),
            None => k.clone(),
        });
        let identity = r.identity.clone();
        let points = window.points;
        let series = [
            Some(&mut self.all),
            key.map(|k| self.keys.entry(k).or_insert_with(|| Series::new(points))),
            identity.map(|id| {
                self.identities
                    .entry(id)
                    .or_insert_with(|| Series::new(points))
            }),
        ];
        for s in series.into_iter().flatten() {
            match u {
                Use::Unwrap => s.unwraps[i] += 1,
                Use::Wrap => s.wraps[i] += 1,
            }
        }
    }
}

/// The first record at or after `from`: a binary search over the chain (records are
/// written in time order), one record per probe.
async fn first_after(client: &Client, head: u64, from: SystemTime) -> anyhow::Result<u64> {
    let (mut lo, mut hi) = (1, head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let page = client.audit_page(mid - 1, 1).await?;
        let before = page
            .records
            .first()
            .is_some_and(|r| humantime::parse_rfc3339(&r.time).is_ok_and(|t| t < from));
        if before {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Reads the window's audit records (at most the last `max_records` of them).
pub(crate) async fn usage(
    client: &Client,
    window: &Window,
    max_records: u64,
) -> anyhow::Result<Usage> {
    let head = client.audit_page(0, 1).await?.head.seq;
    let mut usage = Usage::new(window);
    if head == 0 {
        return Ok(usage);
    }
    let first = first_after(client, head, window.from).await?;
    let start = first.max((head + 1).saturating_sub(max_records));
    usage.skipped = start - first;
    let mut after = start - 1;
    while after < head {
        let page = client.audit_page(after, PAGE).await?;
        let Some(last) = page.records.last() else {
            break;
        };
        after = last.seq;
        for r in page.records.iter().filter(|r| r.seq <= head) {
            usage.add(window, r);
        }
    }
    Ok(usage)
}

/// An error as the report shows it.
fn why(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Reads everything: `admin` for keys, approvals and brake; `auditor` (if any) for the
/// audit trail.
pub(crate) async fn gather(
    admin: &Client,
    auditor: Option<&Client>,
    window: Window,
    rotate_after: Duration,
    max_records: u64,
) -> Report {
    let usage = match auditor {
        Some(c) => usage(c, &window, max_records).await.map_err(why),
        None => Err("no auditor identity given (--auditor-cert and --auditor-key)".into()),
    };
    Report {
        endpoint: admin.endpoints().first().cloned().unwrap_or_default(),
        keys: admin.list_keys().await.map_err(why),
        approvals: admin.approvals().await.map(|l| l.approvals).map_err(why),
        brake: admin.brake_status().await.map_err(why),
        usage,
        window,
        rotate_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_of_every_protocol_are_classified() {
        for op in [
            "POST /v1/unwrap",
            "KMIP Decrypt",
            "POST /v1/transit/decrypt/{name}",
            "POST /kms/xks/v1/keys/{keyId}/decrypt",
        ] {
            assert_eq!(classify(op), Some(Use::Unwrap), "{op}");
        }
        for op in [
            "POST /v1/keys/{name}/datakey",
            "POST /v1/keys/{name}/wrap",
            "POST /v1/rewrap",
            "KMIP Encrypt",
        ] {
            assert_eq!(classify(op), Some(Use::Wrap), "{op}");
        }
        for op in [
            "POST /v1/batch",
            "GET /v1/keys",
            "POST /v1/keys/{name}/rotate",
        ] {
            assert_eq!(classify(op), None, "{op}");
        }
    }

    #[test]
    fn a_week_is_hours() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let w = Window::last(Duration::from_secs(7 * 86_400), now);
        assert_eq!((w.bucket.as_secs(), w.points), (3600, 168));
        assert_eq!(w.index(now), Some(167));
        assert_eq!(w.index(w.from), Some(0));
        assert_eq!(w.index(now + Duration::from_secs(1)), None);
        assert_eq!(w.index(w.from - Duration::from_secs(1)), None);
        let w = Window::last(Duration::from_secs(60), now);
        assert_eq!((w.bucket.as_secs(), w.points), (1, 60));
    }
}
