//! Process hardening, applied first thing by every command that handles key material
//! (`serve`, `dev`, `init`, `restore`), before any secret is read:
//!
//! - **no core dumps**: `RLIMIT_CORE` 0 (soft and hard), so a crash cannot write the
//!   master key or KEKs to disk;
//! - **not dumpable**: `prctl(PR_SET_DUMPABLE, 0)`, which also stops other processes of
//!   the same user from attaching with ptrace or reading `/proc/<pid>/mem`;
//! - **memory locked**: `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`, so key pages
//!   are never written to swap (`ONFAULT`: pages are locked as they are touched, not the
//!   allocator's whole address-space reservations). `[process] mlock`: `required` (the
//!   default: refuse to start if it fails — raise `LimitMEMLOCK` or grant
//!   `CAP_IPC_LOCK`), `best-effort` (warn), or `off`;
//! - **not root**: refuses to run with effective uid 0 unless `[process] allow_root =
//!   true`; run it under its own service account (`deploy/`).
//!
//! What is in force is reported by [`current`] (in `GET /v1/sys/status`) and
//! checked on the running process by the e2e tests.

pub use kms_client::api::ProcessStatus;
use serde::{Deserialize, Serialize};

/// `[process] mlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mlock {
    /// Refuse to start unless memory is locked.
    #[default]
    Required,
    /// Lock if possible; warn otherwise.
    BestEffort,
    /// Do not lock.
    Off,
}

/// `[process]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessSettings {
    /// Memory locking.
    pub mlock: Mlock,
    /// Allow effective uid 0.
    pub allow_root: bool,
}

/// Why the process refused to start.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// Running as root without `allow_root`.
    #[error(
        "refusing to run as root (effective uid 0): run Keyhold under its own service \
         account (see deploy/), or set `[process] allow_root = true` to force it"
    )]
    Root,
    /// A step that cannot be skipped failed.
    #[error("{step} failed: {source}{hint}")]
    Step {
        /// Which.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

static LOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This host's name (`/proc/sys/kernel/hostname`: printable, at most 64 characters), or
/// `keyhold`. Names the node in cluster status and in XKS health.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.len() <= 64 && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "keyhold".to_owned())
}

/// What is in force for this process now, read back from the kernel.
pub fn current() -> ProcessStatus {
    use rustix::process::{dumpable_behavior, getrlimit, DumpableBehavior, Resource};
    ProcessStatus {
        dumpable: !matches!(dumpable_behavior(), Ok(DumpableBehavior::NotDumpable)),
        core_limit: getrlimit(Resource::Core).current.unwrap_or(u64::MAX),
        memory_locked: LOCKED.load(std::sync::atomic::Ordering::Relaxed),
        uid: rustix::process::geteuid().as_raw(),
    }
}

/// Applies the hardening; on success, returns what is in force.
pub fn harden(settings: &ProcessSettings) -> Result<ProcessStatus, HardeningError> {
    use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};
    if rustix::process::geteuid().is_root() && !settings.allow_root {
        return Err(HardeningError::Root);
    }
    let step = |step: &'static str, hint: &'static str| {
        move |e: rustix::io::Errno| HardeningError::Step {
            step,
            source: e.into(),
            hint,
        }
    };
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(step("setting RLIMIT_CORE to 0", ""))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(step("prctl(PR_SET_DUMPABLE, 0)", ""))?;
    if settings.mlock != Mlock::Off {
        use rustix::mm::{mlockall, MlockAllFlags};
        let flags = MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT;
        match mlockall(flags) {
            Ok(()) => LOCKED.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) if settings.mlock == Mlock::BestEffort => {
                tracing::warn!(
                    error = %e,
                    "could not lock memory (mlockall): key material may reach swap; raise \
                     LimitMEMLOCK or grant CAP_IPC_LOCK, or set [process] mlock = \"off\" \
                     to silence this"
                );
            }
            Err(e) => {
                return Err(step(
                    "locking memory (mlockall)",
                    ": raise the memory-lock limit (systemd LimitMEMLOCK=, `ulimit -l`) or grant \
                     CAP_IPC_LOCK; `[process] mlock = \"best-effort\"` starts anyway",
                )(e))
            }
        }
    }
    let h = current();
    tracing::info!(
        core_limit = h.core_limit,
        dumpable = h.dumpable,
        memory_locked = h.memory_locked,
        uid = h.uid,
        "process hardening applied"
    );
    if h.uid == 0 {
        tracing::warn!("running as root ([process] allow_root = true)");
    }
    Ok(h)
}
