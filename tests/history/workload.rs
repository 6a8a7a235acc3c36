//! The clients: data clients (datakey, wrap, unwrap, rewrap of the DEKs they got) and
//! admin clients (create, rotate, disable/enable, grants, min-decrypt-version, deletion,
//! master-key rotation, backups, seal/unseal), each with its own seeded RNG, each request
//! sent once (no retry, no failover: every answer is seen and attributed to its node),
//! every invocation and completion recorded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_client::api::{Grant, GrantOperation, KeyInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{Context, KeySummary, OkValue, Op, OpKind, Outcome, Phase, B64};

pub const APP: (&str, &str) = ("app-a", keyhold_tests::APP_A);
pub const APP2: (&str, &str) = ("app2-a", "spiffe://test/acme/app2");
pub const ADMIN: (&str, &str) = ("admin-a", keyhold_tests::ADMIN_A);

/// Every invocation and completion, against one monotonic clock.
pub struct Recorder {
    t0: Instant,
    next: AtomicU64,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            t0: Instant::now(),
            next: AtomicU64::new(1),
            ops: Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().unwrap().clone();
        ops.sort_by_key(|o| o.id);
        ops
    }

    /// Runs `fut` as one recorded operation; returns its outcome and the op id.
    pub async fn run<T, F>(
        &self,
        who: &Who,
        node: usize,
        phase: Phase,
        kind: OpKind,
        fut: F,
        value: impl FnOnce(&T) -> OkValue,
    ) -> Done<T>
    where
        F: std::future::Future<Output = Result<T, kms_client::Error>>,
    {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let start = self.now();
        let result = fut.await;
        let end = self.now();
        let (outcome, result) = match result {
            Ok(t) => (Outcome::Ok(Box::new(value(&t))), Ok(t)),
            Err(e) => {
                let o = outcome_of(&e);
                (o.clone(), Err(o))
            }
        };
        self.ops.lock().unwrap().push(Op {
            id,
            client: who.client.clone(),
            identity: who.identity.to_owned(),
            node,
            phase,
            start,
            end,
            kind,
            outcome,
        });
        Done { id, result }
    }
}

/// A recorded operation's id and result.
pub struct Done<T> {
    pub id: u64,
    pub result: Result<T, Outcome>,
}

pub fn outcome_of(e: &kms_client::Error) -> Outcome {
    use kms_client::Error as E;
    match e {
        E::Api {
            status,
            code,
            message,
        } => Outcome::Fail {
            status: *status,
            code: format!("{code:?}"),
            message: message.clone(),
        },
        E::Unreachable { .. } => Outcome::Unreachable {
            detail: format!("{e}: {:?}", std::error::Error::source(e)),
        },
        E::InvalidResponse { .. } => Outcome::Indeterminate {
            detail: format!("malformed answer: {e}"),
        },
        _ => Outcome::Indeterminate {
            detail: format!("{e}: {:?}", std::error::Error::source(e)),
        },
    }
}

pub fn summary(k: &KeyInfo) -> KeySummary {
    KeySummary {
        name: k.name.clone(),
        state: serde_json::to_value(k.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        current_version: k.current_version,
        min_decrypt_version: k.min_decrypt_version,
        grants: k
            .grants
            .iter()
            .map(|g| {
                let mut ops: Vec<GrantOperation> = g.operations.clone();
                ops.sort();
                let ops: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
                let mut s = format!("{}={}", g.identity, ops.join(","));
                if !g.constraints.is_empty() {
                    s.push_str(" (constrained)");
                }
                s
            })
            .collect(),
    }
}

fn info_value(k: &KeyInfo) -> OkValue {
    OkValue {
        version: Some(k.current_version),
        key_info: Some(summary(k)),
        ..OkValue::default()
    }
}

/// Grants of every operation to each identity (the only grants this workload writes; the
/// checker's model reads them back as `identity=datakey,wrap,unwrap,rewrap`).
pub fn grants_of(identities: &[String]) -> Vec<Grant> {
    identities
        .iter()
        .map(|i| Grant::new(i.clone(), &GrantOperation::ALL))
        .collect()
}

/// A client: its name in the history, its identity, one `kms_client::Client` per node.
pub struct Who {
    pub client: String,
    pub identity: &'static str,
    pub nodes: Vec<kms_client::Client>,
    /// The same client's service operations (seal, unseal, backup, master-key rotation)
    /// go out with the sys identity, one client per node.
    pub sys: Vec<kms_client::Client>,
}

/// What the clients share.
pub struct Shared {
    pub rec: Recorder,
    /// Keys that exist (or may: an indeterminate create).
    pub keys: Mutex<Vec<String>>,
    pub deadline: Instant,
    /// Keys created in the workload so far (bounded).
    pub created: AtomicU64,
}

pub const MAX_CREATED: u64 = 5;

struct MyDek {
    op: u64,
    key: String,
    wrapped: Vec<u8>,
    context: Context,
}

/// A data client: datakey 30 %, wrap 20 %, unwrap 30 %, rewrap 20 % of its own DEKs.
pub async fn data_client(who: Who, shared: Arc<Shared>, seed: u64, think_ms: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mine: Vec<MyDek> = Vec::new();
    let mut n = 0u64;
    while Instant::now() < shared.deadline {
        n += 1;
        let node = rng.gen_range(0..who.nodes.len());
        let c = &who.nodes[node];
        let keys = shared.keys.lock().unwrap().clone();
        let key = keys[rng.gen_range(0..keys.len())].clone();
        let context: Context = [
            ("client".to_string(), who.client.clone()),
            ("n".to_string(), (n % 7).to_string()),
        ]
        .into_iter()
        .take(rng.gen_range(0..=2))
        .collect();
        let roll: u32 = rng.gen_range(0..100);
        let pick = if mine.is_empty() {
            None
        } else {
            Some(rng.gen_range(0..mine.len()))
        };
        let produced = match (roll, pick) {
            (0..30, _) | (50.., None) => {
                let kind = OpKind::Datakey {
                    key: key.clone(),
                    context: context.clone(),
                };
                let Done { id, result: r } = shared
                    .rec
                    .run(
                        &who,
                        node,
                        Phase::Workload,
                        kind,
                        c.datakey(&key, &context),
                        |d| OkValue {
                            version: Some(d.version),
                            plaintext: Some(B64::of(d.plaintext.expose_secret())),
                            wrapped: Some(B64::of(d.wrapped.as_bytes())),
                            ..OkValue::default()
                        },
                    )
                    .await;
                r.ok()
                    .map(|d| (id, key, d.wrapped.as_bytes().to_vec(), context))
            }
            (30..50, _) => {
                let len = rng.gen_range(16..=64);
                let plaintext: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let kind = OpKind::Wrap {
                    key: key.clone(),
                    plaintext: B64::of(&plaintext),
                    context: context.clone(),
                };
                let Done { id, result: r } = shared
                    .rec
                    .run(
                        &who,
                        node,
                        Phase::Workload,
                        kind,
                        c.wrap(&key, &plaintext, &context),
                        |w| OkValue {
                            version: Some(w.version),
                            wrapped: Some(B64::of(w.wrapped.as_bytes())),
                            ..OkValue::default()
                        },
                    )
                    .await;
                r.ok()
                    .map(|w| (id, key, w.wrapped.as_bytes().to_vec(), context))
            }
            (50..80, Some(i)) => {
                let d = &mine[i];
                let kind = OpKind::Unwrap {
                    dek: d.op,
                    key: d.key.clone(),
                    context: d.context.clone(),
                };
                shared
                    .rec
                    .run(
                        &who,
                        node,
                        Phase::Workload,
                        kind,
                        c.unwrap(&d.wrapped, &d.context),
                        |u| OkValue {
                            version: Some(u.version),
                            plaintext: Some(B64::of(u.plaintext.expose_secret())),
                            ..OkValue::default()
                        },
                    )
                    .await;
                None
            }
            (_, Some(i)) => {
                let d = &mine[i];
                let kind = OpKind::Rewrap {
                    dek: d.op,
                    key: d.key.clone(),
                    context: d.context.clone(),
                };
                let Done { id, result: r } = shared
                    .rec
                    .run(
                        &who,
                        node,
                        Phase::Workload,
                        kind,
                        c.rewrap(&d.wrapped, &d.context),
                        |w| OkValue {
                            version: Some(w.version),
                            wrapped: Some(B64::of(w.wrapped.as_bytes())),
                            ..OkValue::default()
                        },
                    )
                    .await;
                let (key, context) = (d.key.clone(), d.context.clone());
                r.ok()
                    .map(|w| (id, key, w.wrapped.as_bytes().to_vec(), context))
            }
        };
        if let Some((op, key, wrapped, context)) = produced {
            let d = MyDek {
                op,
                key,
                wrapped,
                context,
            };
            // A bounded pool to draw unwraps from; every DEK stays in the history.
            if mine.len() < 128 {
                mine.push(d);
            } else {
                let i = rng.gen_range(0..mine.len());
                mine[i] = d;
            }
        }
        if think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=think_ms))).await;
        }
    }
}

/// An admin client. With `seal` it also seals and unseals nodes now and then.
pub async fn admin_client(who: Who, shared: Arc<Shared>, seed: u64, seal: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    // The newest version this client saw per key (for min-decrypt-version choices).
    let mut versions: HashMap<String, u32> = HashMap::new();
    let both = vec![APP.1.to_string(), APP2.1.to_string()];
    let only_app = vec![APP.1.to_string()];
    while Instant::now() < shared.deadline {
        let node = rng.gen_range(0..who.nodes.len());
        let c = &who.nodes[node];
        let sys = &who.sys[node];
        let keys = shared.keys.lock().unwrap().clone();
        let key = keys[rng.gen_range(0..keys.len())].clone();
        let rec = &shared.rec;
        let w = Phase::Workload;
        let roll: u32 = rng.gen_range(0..100);
        let info = match roll {
            0..14 => rec
                .run(
                    &who,
                    node,
                    w,
                    OpKind::Rotate { key: key.clone() },
                    c.rotate_key(&key),
                    info_value,
                )
                .await
                .result
                .ok(),
            14..22 => rec
                .run(
                    &who,
                    node,
                    w,
                    OpKind::Disable { key: key.clone() },
                    c.disable_key(&key),
                    info_value,
                )
                .await
                .result
                .ok(),
            22..38 => rec
                .run(
                    &who,
                    node,
                    w,
                    OpKind::Enable { key: key.clone() },
                    c.enable_key(&key),
                    info_value,
                )
                .await
                .result
                .ok(),
            38..52 => {
                let grants = if rng.gen_bool(0.5) {
                    both.clone()
                } else {
                    only_app.clone()
                };
                let kind = OpKind::SetGrants {
                    key: key.clone(),
                    grants: grants.clone(),
                };
                rec.run(
                    &who,
                    node,
                    w,
                    kind,
                    c.set_grants(&key, grants_of(&grants)),
                    info_value,
                )
                .await
                .result
                .ok()
            }
            52..60 => {
                let top = versions.get(&key).copied().unwrap_or(1);
                let version = if rng.gen_bool(0.5) {
                    1
                } else {
                    rng.gen_range(1..=top)
                };
                let kind = OpKind::SetMinDecrypt {
                    key: key.clone(),
                    version,
                };
                rec.run(
                    &who,
                    node,
                    w,
                    kind,
                    c.set_min_decrypt_version(&key, version),
                    info_value,
                )
                .await
                .result
                .ok()
            }
            60..63 => {
                let kind = OpKind::ScheduleDeletion { key: key.clone() };
                rec.run(
                    &who,
                    node,
                    w,
                    kind,
                    c.schedule_deletion(&key, 7),
                    info_value,
                )
                .await
                .result
                .ok()
            }
            63..70 => {
                let kind = OpKind::CancelDeletion { key: key.clone() };
                rec.run(&who, node, w, kind, c.cancel_deletion(&key), info_value)
                    .await
                    .result
                    .ok()
            }
            70..74 if shared.created.load(Ordering::SeqCst) < MAX_CREATED => {
                let n = shared.created.fetch_add(1, Ordering::SeqCst);
                let name = format!("w{n}-{}", who.client);
                let grants = if rng.gen_bool(0.5) {
                    both.clone()
                } else {
                    only_app.clone()
                };
                let kind = OpKind::Create {
                    key: name.clone(),
                    grants: grants.clone(),
                };
                let req = kms_client::api::CreateKeyRequest {
                    name: name.clone(),
                    algorithm: None,
                    rotation_period: None,
                    grants: grants_of(&grants),
                };
                let r = rec
                    .run(&who, node, w, kind, c.create_key(&req), info_value)
                    .await
                    .result;
                if !matches!(&r, Err(o) if o.applied() == crate::model::Applied::No) {
                    shared.keys.lock().unwrap().push(name);
                }
                r.ok()
            }
            74..80 => {
                rec.run(
                    &who,
                    node,
                    w,
                    OpKind::RotateMaster,
                    sys.rotate_master(None),
                    |_| OkValue::default(),
                )
                .await;
                None
            }
            80..86 => {
                rec.run(&who, node, w, OpKind::Backup, sys.backup(), |b| OkValue {
                    backup: Some(b.clone()),
                    ..OkValue::default()
                })
                .await;
                None
            }
            86..89 if seal => {
                rec.run(&who, node, w, OpKind::Seal, sys.seal(), |_| {
                    OkValue::default()
                })
                .await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(50..300))).await;
                rec.run(&who, node, w, OpKind::Unseal, sys.unseal(None), |_| {
                    OkValue::default()
                })
                .await;
                None
            }
            _ => {
                let r = rec
                    .run(&who, node, w, OpKind::ListKeys, c.list_keys(), |ks| {
                        OkValue {
                            keys: Some(ks.iter().map(summary).collect()),
                            ..OkValue::default()
                        }
                    })
                    .await
                    .result;
                if let Ok(ks) = r {
                    for k in ks {
                        versions.insert(k.name.clone(), k.current_version);
                    }
                }
                None
            }
        };
        if let Some(k) = info {
            versions.insert(k.name.clone(), k.current_version);
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..120))).await;
    }
}
