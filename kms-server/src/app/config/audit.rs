//! `[audit]`: the trail's file, durability, commit window, exporters and retention.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::security::audit::export::ExportTarget;
use crate::security::audit::retention::RetentionSettings;
use crate::storage::Engine;

impl Default for FileAudit {
    fn default() -> Self {
        Self {
            jsonl: None,
            enabled: true,
            path: None,
            min_free_mib: default_audit_min_free(),
            durability: AuditDurability::Request,
            max_lag_ms: default_max_lag(),
            commit_window_us: default_commit_window(),
            export: Vec::new(),
            retention: None,
        }
    }
}

/// `[audit] durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum AuditDurability {
    /// Every record flushed before its answer (the default).
    Request,
    /// Key uses written before their answers and flushed within `max_lag_ms`.
    BoundedLag,
}

fn default_max_lag() -> u64 {
    10
}

fn default_commit_window() -> u64 {
    crate::security::audit::DEFAULT_COMMIT_WINDOW.as_micros() as u64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAudit {
    /// Also write every record as a JSON line here (`"-"`: stdout). A write failure fails
    /// the request, like a store failure.
    #[serde(default)]
    pub(super) jsonl: Option<String>,
    /// `false` turns the audit trail off: only to measure its cost.
    #[serde(default = "super::yes")]
    pub(super) enabled: bool,
    /// The chain file; default: beside the store, extension `.audit`.
    #[serde(default)]
    pub(super) path: Option<PathBuf>,
    /// Raise an `audit_disk_low` alert when the chain file's filesystem has less than this
    /// many MiB free (0: never). Once the disk is full the trail fails closed.
    #[serde(default = "default_audit_min_free")]
    pub(super) min_free_mib: u64,
    /// When records reach the disk: `request` (before each answer; the default) or
    /// `bounded-lag` (key uses written before their answers, flushed within
    /// `max_lag_ms`; key changes still flushed before theirs).
    #[serde(default = "default_durability")]
    pub(super) durability: AuditDurability,
    /// `bounded-lag`: the longest a written record waits for its flush (1 to 1000 ms).
    #[serde(default = "default_max_lag")]
    pub(super) max_lag_ms: u64,
    /// The longest a batch waits for the callers expected to join it (0 to 10000 µs; 0:
    /// never). A caller who is alone is never delayed.
    #[serde(default = "default_commit_window")]
    pub(super) commit_window_us: u64,
    /// Streams of the trail to SIEMs (`[[audit.export]]`).
    #[serde(default)]
    pub(super) export: Vec<crate::security::audit::export::ExportTarget>,
    /// Segments archived and purged after a period (`[audit.retention]`).
    #[serde(default)]
    pub(super) retention: Option<crate::security::audit::retention::RetentionSettings>,
}

fn default_durability() -> AuditDurability {
    AuditDurability::Request
}

pub(super) fn default_audit_min_free() -> u64 {
    1024
}

/// `[audit]`'s commit window and durability.
pub(super) fn audit_policy(audit: &FileAudit) -> crate::security::audit::CommitPolicy {
    use crate::security::audit::{CommitPolicy, Durability};
    CommitPolicy {
        window: std::time::Duration::from_micros(audit.commit_window_us),
        durability: match audit.durability {
            AuditDurability::Request => Durability::PerRequest,
            AuditDurability::BoundedLag => {
                Durability::BoundedLag(std::time::Duration::from_millis(audit.max_lag_ms))
            }
        },
    }
}

/// The exporters and the retention, as [`streams`] returns them.
pub(super) type Streams = (Vec<ExportTarget>, Option<RetentionSettings>);

/// `[[audit.export]]` and `[audit.retention]`, checked, their paths resolved.
pub(super) fn streams(
    audit: &FileAudit,
    engine: Engine,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Streams, (&'static str, String)> {
    crate::security::audit::export::check_all(&audit.export).map_err(|m| ("audit.export", m))?;
    if let Some(r) = &audit.retention {
        r.check().map_err(|m| ("audit.retention", m))?;
        if engine == Engine::Postgres {
            return Err((
                "audit.retention",
                "is for the chain file of an embedded store; on PostgreSQL the chain is a table: archive and purge it with the database's tools (docs/operations.md)".into(),
            ));
        }
    }
    let exports = audit
        .export
        .iter()
        .cloned()
        .map(|mut t| {
            for p in [&mut t.ca_file, &mut t.cert_file, &mut t.key_file] {
                *p = p.as_deref().map(resolve);
            }
            t
        })
        .collect();
    let retention = audit.retention.clone().map(|mut r| {
        r.archive_dir = resolve(&r.archive_dir);
        r
    });
    Ok((exports, retention))
}

/// The chain file: `[audit] path`, or beside the store with the extension `.audit`.
pub(super) fn chain_path(
    audit: &FileAudit,
    store: &Path,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> PathBuf {
    match &audit.path {
        Some(p) => resolve(p),
        None => resolve(store).with_extension("audit"),
    }
}
