//! The recorded history (every invocation and completion of the workload, the faults, the
//! final reads) and the checker that judges it. The history is plain JSON, so a failing
//! one can be saved and checked again (`replay`).
//!
//! Times are microseconds since the start of the run, read from one monotonic clock in
//! the test process: an operation took effect (if at all) somewhere between its `start`
//! and its `end` as the client saw them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub type Context = BTreeMap<String, String>;

/// Bytes as standard base64 in the JSON file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct B64(pub String);

impl B64 {
    pub fn of(bytes: &[u8]) -> Self {
        use base64::Engine as _;
        B64(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for B64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short: String = self.0.chars().take(12).collect();
        write!(f, "{short}…")
    }
}

/// What was invoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum OpKind {
    Datakey {
        key: String,
        context: Context,
    },
    Wrap {
        key: String,
        plaintext: B64,
        context: Context,
    },
    /// Of the DEK produced by op `dek`.
    Unwrap {
        dek: u64,
        key: String,
        context: Context,
    },
    /// Of the DEK produced by op `dek`; produces a new DEK (same plaintext).
    Rewrap {
        dek: u64,
        key: String,
        context: Context,
    },
    Create {
        key: String,
        grants: Vec<String>,
    },
    Rotate {
        key: String,
    },
    Disable {
        key: String,
    },
    Enable {
        key: String,
    },
    ScheduleDeletion {
        key: String,
    },
    CancelDeletion {
        key: String,
    },
    SetMinDecrypt {
        key: String,
        version: u32,
    },
    /// `PUT grants`: the whole list; each identity gets every operation.
    SetGrants {
        key: String,
        grants: Vec<String>,
    },
    RotateMaster,
    Backup,
    Seal,
    Unseal,
    ListKeys,
}

impl OpKind {
    /// The key a data or key-admin operation is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            OpKind::Datakey { key, .. }
            | OpKind::Wrap { key, .. }
            | OpKind::Unwrap { key, .. }
            | OpKind::Rewrap { key, .. }
            | OpKind::Create { key, .. }
            | OpKind::Rotate { key }
            | OpKind::Disable { key }
            | OpKind::Enable { key }
            | OpKind::ScheduleDeletion { key }
            | OpKind::CancelDeletion { key }
            | OpKind::SetMinDecrypt { key, .. }
            | OpKind::SetGrants { key, .. } => Some(key),
            _ => None,
        }
    }

    pub fn is_data(&self) -> bool {
        matches!(
            self,
            OpKind::Datakey { .. }
                | OpKind::Wrap { .. }
                | OpKind::Unwrap { .. }
                | OpKind::Rewrap { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Datakey { .. } => "datakey",
            OpKind::Wrap { .. } => "wrap",
            OpKind::Unwrap { .. } => "unwrap",
            OpKind::Rewrap { .. } => "rewrap",
            OpKind::Create { .. } => "create",
            OpKind::Rotate { .. } => "rotate",
            OpKind::Disable { .. } => "disable",
            OpKind::Enable { .. } => "enable",
            OpKind::ScheduleDeletion { .. } => "schedule-deletion",
            OpKind::CancelDeletion { .. } => "cancel-deletion",
            OpKind::SetMinDecrypt { .. } => "min-decrypt-version",
            OpKind::SetGrants { .. } => "set-grants",
            OpKind::RotateMaster => "rotate-master",
            OpKind::Backup => "backup",
            OpKind::Seal => "seal",
            OpKind::Unseal => "unseal",
            OpKind::ListKeys => "list-keys",
        }
    }
}

/// A key's metadata as a node reported it (what check e compares).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    pub name: String,
    pub state: String,
    pub current_version: u32,
    pub min_decrypt_version: u32,
    /// `identity=op,op,...`, sorted.
    pub grants: BTreeSet<String>,
}

/// What came back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OkValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<B64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<B64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_info: Option<KeySummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<KeySummary>>,
    /// The backup document, as answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Outcome {
    Ok(Box<OkValue>),
    /// The server answered an error.
    Fail {
        status: u16,
        code: String,
        message: String,
    },
    /// Never sent (connection refused, handshake refused): certainly no effect.
    Unreachable {
        detail: String,
    },
    /// Sent, no complete answer (timeout, cut connection, unreadable answer).
    Indeterminate {
        detail: String,
    },
}

/// Whether an operation's effect happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    No,
    Maybe,
}

impl Outcome {
    pub fn applied(&self) -> Applied {
        match self {
            Outcome::Ok(_) => Applied::Yes,
            // The audit record of a request that ran could not be made durable: its answer
            // is withheld, its effect may stand (the server says so).
            Outcome::Fail {
                status: 503,
                message,
                ..
            } if message.contains("may have taken effect") => Applied::Maybe,
            // 503 Sealed / StorageUnavailable: documented as "nothing changed".
            Outcome::Fail { status: 503, .. } => Applied::No,
            Outcome::Fail { status, .. } if *status >= 500 => Applied::Maybe,
            Outcome::Fail { .. } | Outcome::Unreachable { .. } => Applied::No,
            Outcome::Indeterminate { .. } => Applied::Maybe,
        }
    }
    pub fn ok(&self) -> Option<&OkValue> {
        match self {
            Outcome::Ok(v) => Some(v),
            _ => None,
        }
    }
    pub fn short(&self) -> String {
        match self {
            Outcome::Ok(_) => "ok".into(),
            Outcome::Fail { status, code, .. } => format!("{status} {code}"),
            Outcome::Unreachable { .. } => "unreachable".into(),
            Outcome::Indeterminate { detail } => {
                format!(
                    "indeterminate ({})",
                    detail.chars().take(60).collect::<String>()
                )
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Setup,
    Workload,
    /// After the faults: the reads of check e, then the normalization for check a.
    Final,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub id: u64,
    pub client: String,
    pub identity: String,
    pub node: usize,
    pub phase: Phase,
    pub start: u64,
    pub end: u64,
    #[serde(flatten)]
    pub kind: OpKind,
    pub outcome: Outcome,
}

impl Op {
    /// Latest instant the effect may take place: `end`, or never bounded when the outcome
    /// is unknown (the request may still be running on the server).
    pub fn effect_end(&self) -> u64 {
        match self.outcome.applied() {
            Applied::Maybe => u64::MAX,
            _ => self.end,
        }
    }
    pub fn describe(&self) -> String {
        let what = match &self.kind {
            OpKind::Unwrap { dek, key, .. } | OpKind::Rewrap { dek, key, .. } => {
                format!("{} of dek #{dek} on {key}", self.kind.name())
            }
            OpKind::SetMinDecrypt { key, version } => {
                format!("min-decrypt-version {version} on {key}")
            }
            OpKind::SetGrants { key, grants } => format!("set-grants {grants:?} on {key}"),
            k => match k.key() {
                Some(key) => format!("{} on {key}", k.name()),
                None => k.name().to_owned(),
            },
        };
        format!(
            "op #{} {what} by {} ({}) on node {} [{:.3}s..{:.3}s] -> {}",
            self.id,
            self.client,
            self.identity,
            self.node,
            secs(self.start),
            secs(self.end),
            self.outcome.short()
        )
    }
}

pub fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of a node; `end` is when the process was gone.
    KillNode,
    /// The node's process started again; `end` is when it answered ready.
    RestartNode,
    /// PostgreSQL stopped (fast) or crashed (immediate) then started again; `end` is
    /// when it was up again.
    PostgresOutage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub node: Option<usize>,
    pub start: u64,
    pub end: u64,
}

/// One unwrap of the final sweep (check a).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinalUnwrap {
    pub dek: u64,
    pub node: usize,
    pub at: u64,
    /// The plaintext and version, or the error.
    pub result: Result<(B64, u32), String>,
}

/// One node's answer to `GET /v1/keys` once the faults stopped (check e).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRead {
    pub node: usize,
    pub at: u64,
    pub result: Result<Vec<KeySummary>, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub setup: String,
    pub seed: u64,
    pub nodes: usize,
    /// The documented propagation bound on this set-up (0 on one node).
    pub bound_us: u64,
    /// The seal secret (a test key file), so a replay can restore the backups (check c).
    pub key_file: B64,
    /// The admin identity's tenant (every key lives there).
    pub tenant: String,
    pub ops: Vec<Op>,
    pub faults: Vec<Fault>,
    /// When the last fault ended (and the final phase began).
    pub faults_over: u64,
    pub final_reads: Vec<NodeRead>,
    pub final_unwraps: Vec<FinalUnwrap>,
}

/// One broken property.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Violation {
    /// `a` .. `f` (see `check`).
    pub check: String,
    pub op: Option<u64>,
    pub node: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.check, self.message)
    }
}

/// An acknowledged DEK: from an `ok` datakey, wrap or rewrap.
#[derive(Clone)]
pub struct Dek {
    pub op: u64,
    pub key: String,
    pub version: u32,
    pub plaintext: Vec<u8>,
    pub wrapped: Vec<u8>,
    pub context: Context,
    /// When it was acknowledged.
    pub acked: u64,
}

/// Ids only: a DEK's bytes never reach a log or a panic message.
impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dek")
            .field("op", &self.op)
            .field("key", &self.key)
            .field("version", &self.version)
            .field("plaintext", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// The DEKs a history acknowledged, by the id of the op that produced them.
pub fn deks(h: &History) -> BTreeMap<u64, Dek> {
    let mut out: BTreeMap<u64, Dek> = BTreeMap::new();
    let mut ops: Vec<&Op> = h.ops.iter().collect();
    ops.sort_by_key(|o| o.id);
    for op in ops {
        let Some(v) = op.outcome.ok() else { continue };
        let (key, context, plaintext) = match &op.kind {
            OpKind::Datakey { key, context } => (
                key.clone(),
                context.clone(),
                v.plaintext.as_ref().map(B64::bytes),
            ),
            OpKind::Wrap {
                key,
                plaintext,
                context,
            } => (key.clone(), context.clone(), Some(plaintext.bytes())),
            OpKind::Rewrap { dek, key, context } => (
                key.clone(),
                context.clone(),
                out.get(dek).map(|d| d.plaintext.clone()),
            ),
            _ => continue,
        };
        let (Some(plaintext), Some(wrapped), Some(version)) =
            (plaintext, v.wrapped.as_ref(), v.version)
        else {
            continue;
        };
        out.insert(
            op.id,
            Dek {
                op: op.id,
                key,
                version,
                plaintext,
                wrapped: wrapped.bytes(),
                context,
                acked: op.end,
            },
        );
    }
    out
}

/// Restores a backup document and reports what is wrong with it (check c); given by the
/// caller so this module stays free of the server crate.
pub trait BackupVerifier {
    /// `Err(reason)` when the backup does not restore, or restores without what it must
    /// hold: `expect` lists, per key, the least current version it must have, and the
    /// DEKs acknowledged before the backup began (each must unwrap to its plaintext).
    fn verify(
        &self,
        h: &History,
        backup: &serde_json::Value,
        expect: &BTreeMap<String, u32>,
        deks: &[&Dek],
    ) -> Result<(), String>;
}

/// The 5xx answers the API may give, and when (check d):
/// - `503 Sealed`: the node is sealed — only between a `seal` of that node (its start) and
///   the end of the next `unseal` of it that succeeded;
/// - `503 StorageUnavailable`: the store cannot be reached or confirmed fresh — only on a
///   shared store, while PostgreSQL is down and for `STORE_GRACE_US` after it is back
///   (nodes reconnect and confirm freshness), on a node between its restart and ready, and
///   (`MasterKeyChanged`: "nothing was written; retry") from the start of a master-key
///   rotation until the propagation bound after its end.
///
/// Any other 5xx (`500 Internal` above all) is a violation, as is any status the API does
/// not document for the code, a `429` (the test's lockout policy is far out of reach), a
/// `401`/`405`/`413`/`415` (the client only sends well-formed requests), and an answer the
/// client could not read.
pub const STORE_GRACE_US: u64 = 5_000_000;

/// Runs every check; the violations, in a stable order.
pub fn check(h: &History, backups: &dyn BackupVerifier) -> Vec<Violation> {
    let mut v = Vec::new();
    let deks = deks(h);
    check_a(h, &deks, &mut v);
    check_b(h, &deks, &mut v);
    check_c(h, &deks, backups, &mut v);
    check_d(h, &mut v);
    check_e(h, &mut v);
    check_f(h, &mut v);
    v
}

fn violation(v: &mut Vec<Violation>, check: &str, op: Option<&Op>, message: String) {
    v.push(Violation {
        check: check.into(),
        op: op.map(|o| o.id),
        node: op.map(|o| o.node),
        message,
    });
}

fn ops_on<'a>(h: &'a History, key: &'a str) -> impl Iterator<Item = &'a Op> + 'a {
    h.ops.iter().filter(move |o| o.kind.key() == Some(key))
}

/// a. Every acknowledged DEK unwraps to its bytes: during the workload (an `ok` unwrap
/// returns the plaintext and version it was wrapped with; a rewrap never moves to an older
/// version; `DecryptFailed` only when a `min-decrypt-version` above its version may be in
/// force, or on a shared store within the propagation bound of its acknowledgement), and
/// in the final sweep on every node, once the keys were enabled and every version brought
/// back.
fn check_a(h: &History, deks: &BTreeMap<u64, Dek>, v: &mut Vec<Violation>) {
    let mut mins: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in &h.ops {
        if let OpKind::SetMinDecrypt { key, .. } = &op.kind {
            mins.entry(key).or_default().push(op);
        }
    }
    for op in &h.ops {
        let (dek_id, is_unwrap) = match &op.kind {
            OpKind::Unwrap { dek, .. } => (*dek, true),
            OpKind::Rewrap { dek, .. } => (*dek, false),
            _ => continue,
        };
        let Some(dek) = deks.get(&dek_id) else {
            violation(
                v,
                "a",
                Some(op),
                format!(
                    "{}: refers to dek #{dek_id}, which was never acknowledged (harness bug)",
                    op.describe()
                ),
            );
            continue;
        };
        match &op.outcome {
            Outcome::Ok(val) => {
                if is_unwrap {
                    let got = val.plaintext.as_ref().map(B64::bytes);
                    if got.as_deref() != Some(dek.plaintext.as_slice()) {
                        violation(
                            v,
                            "a",
                            Some(op),
                            format!(
                                "{}: returned other bytes than dek #{} was acknowledged with (acked {:.3}s)",
                                op.describe(),
                                dek.op,
                                secs(dek.acked)
                            ),
                        );
                    }
                    if val.version != Some(dek.version) {
                        violation(
                            v,
                            "a",
                            Some(op),
                            format!(
                                "{}: says version {:?}, dek #{} was wrapped under version {}",
                                op.describe(),
                                val.version,
                                dek.op,
                                dek.version
                            ),
                        );
                    }
                } else if val.version.is_some_and(|w| w < dek.version) {
                    violation(
                        v,
                        "a",
                        Some(op),
                        format!(
                            "{}: re-wrapped under version {:?}, older than the dek's version {}",
                            op.describe(),
                            val.version,
                            dek.version
                        ),
                    );
                }
            }
            Outcome::Fail { code, .. } if code == "DecryptFailed" => {
                let retired = mins.get(dek.key.as_str()).into_iter().flatten().any(|m| {
                    matches!(m.kind, OpKind::SetMinDecrypt { version, .. } if version > dek.version)
                        && m.outcome.applied() != Applied::No
                        && m.start < op.end
                });
                let fresh = op.start < dek.acked.saturating_add(h.bound_us) && h.bound_us > 0;
                if !retired && !fresh {
                    violation(
                        v,
                        "a",
                        Some(op),
                        format!(
                            "{}: an acknowledged dek (#{}, version {}, acked {:.3}s) did not unwrap, and no min-decrypt-version above {} was ever set before it ended",
                            op.describe(),
                            dek.op,
                            dek.version,
                            secs(dek.acked),
                            dek.version
                        ),
                    );
                }
            }
            _ => {}
        }
    }
    // The final sweep: every DEK on every node.
    let mut seen: HashMap<(u64, usize), &FinalUnwrap> = HashMap::new();
    for u in &h.final_unwraps {
        seen.insert((u.dek, u.node), u);
    }
    for dek in deks.values() {
        for node in 0..h.nodes {
            match seen.get(&(dek.op, node)) {
                None => violation(
                    v,
                    "a",
                    None,
                    format!(
                        "dek #{} (key {}, version {}, acked {:.3}s): never unwrapped on node {node} in the final sweep",
                        dek.op, dek.key, dek.version, secs(dek.acked)
                    ),
                ),
                Some(u) => match &u.result {
                    Ok((p, version)) if p.bytes() == dek.plaintext && *version == dek.version => {}
                    Ok((_, version)) => violation(
                        v,
                        "a",
                        None,
                        format!(
                            "dek #{} (key {}, version {}, acked {:.3}s): the final unwrap on node {node} at {:.3}s returned other bytes (version {version})",
                            dek.op, dek.key, dek.version, secs(dek.acked), secs(u.at)
                        ),
                    ),
                    Err(e) => violation(
                        v,
                        "a",
                        None,
                        format!(
                            "dek #{} (key {}, version {}, acked {:.3}s): lost — the final unwrap on node {node} at {:.3}s failed: {e}",
                            dek.op, dek.key, dek.version, secs(dek.acked), secs(u.at)
                        ),
                    ),
                },
            }
        }
    }
}

fn grant_identities(grants: &[String]) -> BTreeSet<&str> {
    grants.iter().map(String::as_str).collect()
}

/// b. Revocation holds: no data operation succeeds when it started more than the
/// propagation bound after a revocation was acknowledged, unless a later change (one that
/// may have taken effect after the revocation and before the operation ended) allowed it
/// again. Revocations: `disable` and `schedule-deletion` (any use; undone only by an
/// `enable`), a `set-grants` without the caller (undone by one with it), a
/// `min-decrypt-version` above the DEK's version (unwrap and rewrap; undone by one at or
/// below it). Also: no datakey/wrap/rewrap answers a version older than one a rotation
/// acknowledged more than the bound before it started (a node going back in time).
fn check_b(h: &History, deks: &BTreeMap<u64, Dek>, v: &mut Vec<Violation>) {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in &h.ops {
        if let Some(k) = op.kind.key() {
            if !op.kind.is_data() && op.outcome.applied() != Applied::No {
                by_key.entry(k).or_default().push(op);
            }
        }
    }
    let empty = Vec::new();
    for d in &h.ops {
        if !d.kind.is_data() || d.outcome.ok().is_none() {
            continue;
        }
        let Some(key) = d.kind.key() else { continue };
        let admin = by_key.get(key).unwrap_or(&empty);
        let dek_version = match &d.kind {
            OpKind::Unwrap { dek, .. } | OpKind::Rewrap { dek, .. } => {
                deks.get(dek).map(|x| x.version)
            }
            _ => None,
        };
        let answered = d.outcome.ok().and_then(|x| x.version);
        let me = d.identity.as_str();
        // Per kind of revocation, the acknowledged one (ended more than the bound before d
        // began) that began last: whether *some* revocation of a kind was never undone
        // before d is decided by it alone, since an undo must be able to follow the
        // revocation (`e.effect_end() > r.start`), which is hardest for the latest start.
        let mut latest: [Option<&Op>; 4] = [None; 4];
        for r in admin {
            if r.outcome.ok().is_none() || d.start <= r.end.saturating_add(h.bound_us) {
                continue;
            }
            let slot = match &r.kind {
                OpKind::Disable { .. } | OpKind::ScheduleDeletion { .. } => 0,
                OpKind::SetGrants { grants, .. } | OpKind::Create { grants, .. }
                    if !grant_identities(grants).contains(me) =>
                {
                    1
                }
                OpKind::SetMinDecrypt { version, .. }
                    if dek_version.is_some_and(|dv| dv < *version) =>
                {
                    2
                }
                OpKind::Rotate { .. } if !matches!(d.kind, OpKind::Unwrap { .. }) => {
                    let rv = r.outcome.ok().and_then(|x| x.version);
                    match (rv, answered) {
                        (Some(rv), Some(dv)) if dv < rv => 3,
                        _ => continue,
                    }
                }
                _ => continue,
            };
            let better = match (slot, latest[slot]) {
                (_, None) => true,
                // The newest version a rotation acknowledged.
                (3, Some(l)) => {
                    r.outcome.ok().and_then(|x| x.version) > l.outcome.ok().and_then(|x| x.version)
                }
                (_, Some(l)) => r.start > l.start,
            };
            if better {
                latest[slot] = Some(r);
            }
        }
        for (slot, r) in latest.iter().enumerate() {
            let Some(r) = r else { continue };
            // Could `e` have taken effect after `r` and before `d`?
            let undone = |undo: &dyn Fn(&OpKind) -> bool| {
                admin.iter().any(|e| {
                    undo(&e.kind) && e.start < d.end && e.effect_end() > r.start && e.id != r.id
                })
            };
            let what = match slot {
                0 => {
                    if undone(&|k| matches!(k, OpKind::Enable { .. })) {
                        continue;
                    }
                    "the key was disabled (or scheduled for deletion)".to_owned()
                }
                1 => {
                    if undone(
                        &|k| matches!(k, OpKind::SetGrants { grants, .. } if grant_identities(grants).contains(me)),
                    ) {
                        continue;
                    }
                    format!("the grant of {me} was removed")
                }
                2 => {
                    let dv = dek_version.unwrap_or(0);
                    if undone(
                        &|k| matches!(k, OpKind::SetMinDecrypt { version, .. } if *version <= dv),
                    ) {
                        continue;
                    }
                    let m = match r.kind {
                        OpKind::SetMinDecrypt { version, .. } => version,
                        _ => 0,
                    };
                    format!("version {dv} was retired (min-decrypt-version {m})")
                }
                _ => format!(
                    "it wrapped under version {}, but version {} was current",
                    answered.unwrap_or(0),
                    r.outcome.ok().and_then(|x| x.version).unwrap_or(0)
                ),
            };
            violation(
                v,
                "b",
                Some(d),
                format!(
                    "{} succeeded {:.3}s after {} was acknowledged (bound {:.3}s): {what}; revoked by {}",
                    d.describe(),
                    secs(d.start - r.end),
                    r.kind.name(),
                    secs(h.bound_us),
                    r.describe()
                ),
            );
        }
    }
}

/// c. Every backup answered 200 restores into a fresh store (which opens every version),
/// holds every key created and every rotation acknowledged before it began, and unwraps
/// every DEK acknowledged before it began.
fn check_c(
    h: &History,
    deks: &BTreeMap<u64, Dek>,
    verifier: &dyn BackupVerifier,
    v: &mut Vec<Violation>,
) {
    for b in &h.ops {
        let Some(doc) = (match (&b.kind, &b.outcome) {
            (OpKind::Backup, Outcome::Ok(val)) => val.backup.as_ref(),
            _ => None,
        }) else {
            continue;
        };
        let mut expect: BTreeMap<String, u32> = BTreeMap::new();
        for o in &h.ops {
            if o.end >= b.start {
                continue;
            }
            match (&o.kind, o.outcome.ok()) {
                (OpKind::Create { key, .. }, Some(_)) => {
                    let e = expect.entry(key.clone()).or_insert(1);
                    *e = (*e).max(1);
                }
                (OpKind::Rotate { key }, Some(val)) => {
                    let e = expect.entry(key.clone()).or_insert(1);
                    *e = (*e).max(val.version.unwrap_or(1));
                }
                _ => {}
            }
        }
        let before: Vec<&Dek> = deks.values().filter(|d| d.acked < b.start).collect();
        if let Err(e) = verifier.verify(h, doc, &expect, &before) {
            violation(v, "c", Some(b), format!("{}: {e}", b.describe()));
        }
    }
}

/// Intervals `[from, to)` of `h` during which `node` may be sealed.
fn sealed_windows(h: &History, node: usize) -> Vec<(u64, u64)> {
    let mut seals: Vec<&Op> = h
        .ops
        .iter()
        .filter(|o| o.node == node && matches!(o.kind, OpKind::Seal))
        .filter(|o| o.outcome.applied() != Applied::No)
        .collect();
    seals.sort_by_key(|o| o.start);
    seals
        .iter()
        .map(|s| {
            let until = h
                .ops
                .iter()
                .filter(|u| {
                    u.node == node
                        && matches!(u.kind, OpKind::Unseal)
                        && u.outcome.ok().is_some()
                        && u.start >= s.start
                })
                .map(|u| u.end)
                .min()
                .unwrap_or(u64::MAX);
            (s.start, until)
        })
        .collect()
}

fn store_windows(h: &History, node: usize) -> Vec<(u64, u64)> {
    let mut w: Vec<(u64, u64)> = h
        .faults
        .iter()
        .filter_map(|f| match f.kind {
            FaultKind::PostgresOutage => Some((f.start, f.end.saturating_add(STORE_GRACE_US))),
            FaultKind::RestartNode if f.node == Some(node) => Some((f.start, f.end)),
            _ => None,
        })
        .collect();
    if h.bound_us > 0 {
        // `MasterKeyChanged`: a node that has not yet followed a master-key rotation made
        // on another node refuses, "nothing was written; retry", within the bound.
        w.extend(
            h.ops
                .iter()
                .filter(|o| {
                    matches!(o.kind, OpKind::RotateMaster) && o.outcome.applied() != Applied::No
                })
                .map(|o| (o.start, o.effect_end().saturating_add(h.bound_us))),
        );
    }
    w
}

fn overlaps(windows: &[(u64, u64)], start: u64, end: u64) -> bool {
    windows.iter().any(|(a, b)| start < *b && end >= *a)
}

/// d. No answer outside the documented error table (see [`STORE_GRACE_US`]). Runs of
/// misplaced 503s on one node (answers less than 2 s apart) are reported as one violation
/// each, with their first and last operation and what may explain them.
fn check_d(h: &History, v: &mut Vec<Violation>) {
    let documented: &[(&str, u16)] = &[
        ("InvalidRequest", 400),
        ("DecryptFailed", 400),
        ("PermissionDenied", 403),
        ("NotFound", 404),
        ("AlreadyExists", 409),
        ("KeyDisabled", 409),
        ("InvalidState", 409),
        ("Sealed", 503),
        ("StorageUnavailable", 503),
    ];
    let sealed: Vec<Vec<(u64, u64)>> = (0..h.nodes).map(|n| sealed_windows(h, n)).collect();
    let store: Vec<Vec<(u64, u64)>> = (0..h.nodes).map(|n| store_windows(h, n)).collect();
    let none = Vec::new();
    // (node, code) -> misplaced 503s, in time order.
    let mut runs: BTreeMap<(usize, String), Vec<&Op>> = BTreeMap::new();
    let mut ops: Vec<&Op> = h.ops.iter().collect();
    ops.sort_by_key(|o| (o.start, o.id));
    for op in ops {
        match &op.outcome {
            Outcome::Fail {
                status,
                code,
                message,
            } => {
                if !documented.contains(&(code.as_str(), *status)) {
                    violation(
                        v,
                        "d",
                        Some(op),
                        format!(
                            "{}: answered {status} {code} ({message}), which no request of this workload may get",
                            op.describe()
                        ),
                    );
                } else if (code == "Sealed"
                    && !overlaps(sealed.get(op.node).unwrap_or(&none), op.start, op.end))
                    || (code == "StorageUnavailable"
                        && !overlaps(store.get(op.node).unwrap_or(&none), op.start, op.end))
                {
                    runs.entry((op.node, code.clone())).or_default().push(op);
                }
            }
            Outcome::Indeterminate { detail } if detail.starts_with("malformed") => {
                violation(v, "d", Some(op), format!("{}: {detail}", op.describe()));
            }
            _ => {}
        }
    }
    for ((node, code), list) in runs {
        let mut group: Vec<&Op> = Vec::new();
        let flush = |group: &mut Vec<&Op>, v: &mut Vec<Violation>| {
            let (Some(first), Some(last)) = (group.first(), group.last()) else {
                return;
            };
            let why = if code == "Sealed" {
                let suspects: Vec<String> = h
                    .ops
                    .iter()
                    .filter(|s| {
                        s.node == node
                            && matches!(s.kind, OpKind::Seal)
                            && s.outcome.ok().is_none()
                            && s.start < first.end
                    })
                    .map(|s| s.describe())
                    .collect();
                format!(
                    "node {node} was sealed while no seal of it was acknowledged and in force; {}",
                    if suspects.is_empty() {
                        "no seal of it was even attempted: the node sealed itself".to_owned()
                    } else {
                        format!(
                            "either a seal whose answer said it failed took effect ({}), or the node sealed itself",
                            suspects.join("; ")
                        )
                    }
                )
            } else {
                format!(
                    "outside every store outage (and its {:.1}s grace), node restart, and master-key rotation (within the bound)",
                    secs(STORE_GRACE_US)
                )
            };
            let messages: BTreeSet<String> = group
                .iter()
                .filter_map(|o| match &o.outcome {
                    Outcome::Fail { message, .. } => Some(message.clone()),
                    _ => None,
                })
                .collect();
            violation(
                v,
                "d",
                Some(first),
                format!(
                    "{} answers 503 {code} {messages:?} from node {node} between {:.3}s and {:.3}s: {why}; first {}; last {}",
                    group.len(),
                    secs(first.start),
                    secs(last.end),
                    first.describe(),
                    last.describe()
                ),
            );
            group.clear();
        };
        for op in list {
            if group.last().is_some_and(|l| op.start > l.end + 2_000_000) {
                flush(&mut group, v);
            }
            group.push(op);
        }
        flush(&mut group, v);
    }
}

/// e. After the faults, every node reports the same state for every key.
fn check_e(h: &History, v: &mut Vec<Violation>) {
    let mut first: Option<(usize, BTreeMap<String, KeySummary>)> = None;
    for read in &h.final_reads {
        let keys = match &read.result {
            Ok(k) => k,
            Err(e) => {
                violation(
                    v,
                    "e",
                    None,
                    format!(
                        "node {} did not list its keys after the faults ({:.3}s): {e}",
                        read.node,
                        secs(read.at)
                    ),
                );
                continue;
            }
        };
        let map: BTreeMap<String, KeySummary> =
            keys.iter().map(|k| (k.name.clone(), k.clone())).collect();
        match &first {
            None => first = Some((read.node, map)),
            Some((n0, m0)) => {
                let names: BTreeSet<&String> = m0.keys().chain(map.keys()).collect();
                for name in names {
                    let (a, b) = (m0.get(name), map.get(name));
                    if a != b {
                        violation(
                            v,
                            "e",
                            None,
                            format!(
                                "key {name}: node {n0} reports {a:?}, node {} reports {b:?} (read at {:.3}s)",
                                read.node,
                                secs(read.at)
                            ),
                        );
                    }
                }
            }
        }
    }
    if h.final_reads.is_empty() {
        violation(v, "e", None, "no node was read after the faults".into());
    }
}

/// The values a register may hold at the end: the value of every write that may be the
/// last one applied (ok or indeterminate, and no acknowledged write began after it ended).
fn last_candidates<'a, T: Clone>(writes: &[(&'a Op, T)]) -> Vec<(&'a Op, T)> {
    writes
        .iter()
        .filter(|(w, _)| {
            !writes.iter().any(|(w2, _)| {
                w2.id != w.id && w2.outcome.ok().is_some() && w2.start > w.effect_end()
            })
        })
        .cloned()
        .collect()
}

fn grant_strings(identities: &[String]) -> BTreeSet<String> {
    identities
        .iter()
        .map(|i| format!("{i}=datakey,wrap,unwrap,rewrap"))
        .collect()
}

/// f. No acknowledged change is lost: the state every node agrees on after the faults
/// (the first final read) is one the history allows — its state, grants and
/// min-decrypt-version are the value of a write that may have been the last, its current
/// version counts every acknowledged rotation (and at most the indeterminate ones too),
/// and no two rotations were acknowledged with the same version.
fn check_f(h: &History, v: &mut Vec<Violation>) {
    let Some(read) = h.final_reads.iter().find(|r| r.result.is_ok()) else {
        return;
    };
    let Ok(keys) = &read.result else { return };
    let reported: BTreeMap<&str, &KeySummary> = keys.iter().map(|k| (k.name.as_str(), k)).collect();
    let phase_ops = |o: &&Op| o.phase != Phase::Final;
    let created: BTreeSet<&str> = h
        .ops
        .iter()
        .filter(phase_ops)
        .filter(|o| matches!(o.kind, OpKind::Create { .. }) && o.outcome.ok().is_some())
        .filter_map(|o| o.kind.key())
        .collect();
    for key in created {
        let Some(k) = reported.get(key) else {
            violation(
                v,
                "f",
                None,
                format!(
                    "key {key}: created (acknowledged) but node {} does not list it",
                    read.node
                ),
            );
            continue;
        };
        let ops: Vec<&Op> = ops_on(h, key)
            .filter(phase_ops)
            .filter(|o| o.outcome.applied() != Applied::No)
            .collect();
        let describe_all = |f: &dyn Fn(&Op) -> bool| {
            let mut s = String::new();
            for o in ops.iter().filter(|o| f(o)) {
                let _ = write!(s, "\n    {}", o.describe());
            }
            s
        };
        // State.
        let states: Vec<(&Op, &str)> = ops
            .iter()
            .filter_map(|o| {
                let s = match o.kind {
                    OpKind::Create { .. } | OpKind::Enable { .. } => "enabled",
                    OpKind::Disable { .. } | OpKind::CancelDeletion { .. } => "disabled",
                    OpKind::ScheduleDeletion { .. } => "pending-deletion",
                    _ => return None,
                };
                Some((*o, s))
            })
            .collect();
        let allowed: BTreeSet<&str> = last_candidates(&states)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        if !allowed.contains(k.state.as_str()) {
            violation(
                v,
                "f",
                None,
                format!(
                    "key {key}: state {} after the faults, but the last state change may only have left {allowed:?}; the changes:{}",
                    k.state,
                    describe_all(&|o| matches!(o.kind, OpKind::Create { .. } | OpKind::Enable { .. } | OpKind::Disable { .. } | OpKind::CancelDeletion { .. } | OpKind::ScheduleDeletion { .. }))
                ),
            );
        }
        // Grants.
        let grants: Vec<(&Op, BTreeSet<String>)> = ops
            .iter()
            .filter_map(|o| match &o.kind {
                OpKind::Create { grants, .. } | OpKind::SetGrants { grants, .. } => {
                    Some((*o, grant_strings(grants)))
                }
                _ => None,
            })
            .collect();
        let allowed: Vec<BTreeSet<String>> = last_candidates(&grants)
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        if !allowed.contains(&k.grants) {
            violation(
                v,
                "f",
                None,
                format!(
                    "key {key}: grants {:?} after the faults, but the last grants change may only have left one of {allowed:?}; the changes:{}",
                    k.grants,
                    describe_all(&|o| matches!(o.kind, OpKind::Create { .. } | OpKind::SetGrants { .. }))
                ),
            );
        }
        // min-decrypt-version.
        let mins: Vec<(&Op, u32)> = ops
            .iter()
            .filter_map(|o| match &o.kind {
                OpKind::Create { .. } => Some((*o, 1)),
                OpKind::SetMinDecrypt { version, .. } => Some((*o, *version)),
                _ => None,
            })
            .collect();
        let allowed: BTreeSet<u32> = last_candidates(&mins).into_iter().map(|(_, m)| m).collect();
        if !allowed.contains(&k.min_decrypt_version) {
            violation(
                v,
                "f",
                None,
                format!(
                    "key {key}: min-decrypt-version {} after the faults, but the last change may only have left {allowed:?}; the changes:{}",
                    k.min_decrypt_version,
                    describe_all(&|o| matches!(o.kind, OpKind::Create { .. } | OpKind::SetMinDecrypt { .. }))
                ),
            );
        }
        // Rotations.
        let rotations: Vec<&Op> = ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Rotate { .. }))
            .copied()
            .collect();
        let acked = rotations
            .iter()
            .filter(|o| o.outcome.ok().is_some())
            .count() as u32;
        let maybe = rotations.len() as u32 - acked;
        let made = k.current_version.saturating_sub(1);
        if made < acked || made > acked + maybe {
            violation(
                v,
                "f",
                None,
                format!(
                    "key {key}: current version {} after the faults, but {acked} rotations were acknowledged and {maybe} are indeterminate (expected {}..={}); the rotations:{}",
                    k.current_version,
                    acked + 1,
                    acked + maybe + 1,
                    describe_all(&|o| matches!(o.kind, OpKind::Rotate { .. }))
                ),
            );
        }
        let mut versions: BTreeMap<u32, Vec<&Op>> = BTreeMap::new();
        for r in &rotations {
            if let Some(ver) = r.outcome.ok().and_then(|x| x.version) {
                versions.entry(ver).or_default().push(r);
            }
        }
        for (ver, rs) in versions {
            if rs.len() > 1 {
                let list: Vec<String> = rs.iter().map(|r| r.describe()).collect();
                violation(
                    v,
                    "f",
                    Some(rs[1]),
                    format!(
                        "key {key}: {} rotations were acknowledged with the same version {ver}: {}",
                        rs.len(),
                        list.join("; ")
                    ),
                );
            }
        }
    }
}
