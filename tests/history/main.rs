//! A history checker in the manner of Jepsen/Elle: bounded concurrent clients
//! (`kms_client::Client` over real mTLS) run data and admin operations against real
//! servers while faults happen; every invocation and completion is recorded; then the
//! history is checked (`model::check`):
//!
//! - a. every acknowledged DEK unwraps to the same bytes, during the run and on every node
//!   afterwards;
//! - b. nothing succeeds that started more than the propagation bound (1 s on a shared
//!   store, 0 on one node) after a revocation (disable, deletion, grant removal, version
//!   retired) was acknowledged; no node answers a version older than an acknowledged
//!   rotation's beyond the bound;
//! - c. every backup answered 200 restores into a fresh store, with every key, rotation
//!   and DEK acknowledged before it began;
//! - d. no 5xx besides `503 Sealed` (while sealed) and `503 StorageUnavailable` (while the
//!   store is out), and nothing outside the documented error table;
//! - e. after the faults every node reports the same state for every key;
//! - f. that state loses no acknowledged change (state, grants, min-decrypt-version,
//!   every acknowledged rotation).
//!
//! Set-ups: one node on the embedded store (`single_node_embedded`); three node processes
//! on a private PostgreSQL with kill -9/restart and PostgreSQL stops and crashes
//! (`three_nodes_postgres`, when `KEYHOLD_TEST_PG` is set).
//!
//! - `KEYHOLD_HISTORY_SECS` (default 12 on one node, 20 on three): workload seconds per
//!   set-up (long run: 1800).
//! - `KEYHOLD_HISTORY_SEED`: the seed of every client's choices and of the fault schedule
//!   (printed at the start of each run; the timing, hence the interleaving, is not
//!   reproducible, the choices are).
//! - A failing history is written as JSON into the run's directory and copied to
//!   `target/history-failures/`; `KEYHOLD_HISTORY_REPLAY=<file> cargo test -p
//!   keyhold-tests --test history replay` checks it again.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub
)]

mod backups;
mod faults;
mod model;
mod selftest;
mod workload;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_client::api::{BatchItem, BatchResult, KeyState, WrappedKey};

use faults::Cluster;
use model::{FinalUnwrap, History, NodeRead, Phase, B64};
use workload::{Shared, Who, ADMIN, APP, APP2};

fn secs_env(default: u64) -> u64 {
    std::env::var("KEYHOLD_HISTORY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn seed_env() -> u64 {
    std::env::var("KEYHOLD_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// The target directory: `CARGO_TARGET_DIR`, else the `target` this test binary runs from
/// (`target/<profile>/deps/history-*`).
fn target_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .or_else(|| exe.ancestors().nth(3))
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| exe.parent().unwrap().to_path_buf())
}

struct Plan {
    setup: &'static str,
    data_clients: usize,
    admin_clients: usize,
    /// Upper bound of a data client's pause between operations.
    think_ms: u64,
    bound: Duration,
    /// Workload seconds unless `KEYHOLD_HISTORY_SECS` says otherwise.
    default_secs: u64,
}

async fn run(cluster: Cluster, plan: Plan) {
    let seed = seed_env();
    let secs = secs_env(plan.default_secs);
    eprintln!(
        "history: {}: seed {seed} (KEYHOLD_HISTORY_SEED={seed}), {secs} s, {} data + {} admin clients, {} node(s)",
        plan.setup,
        plan.data_clients,
        plan.admin_clients,
        cluster.len()
    );
    let n = cluster.len();
    let who = |client: String, (stem, identity): (&str, &'static str)| Who {
        client,
        identity,
        nodes: (0..n).map(|i| cluster.client(i, stem)).collect(),
        sys: (0..n).map(|i| cluster.client(i, "sys")).collect(),
    };
    let shared = Arc::new(Shared {
        rec: workload::Recorder::new(),
        keys: Mutex::new(Vec::new()),
        deadline: Instant::now() + Duration::from_secs(secs),
        created: AtomicU64::new(0),
    });
    // Setup: three keys, granted to both apps.
    let setup_admin = who("setup".into(), ADMIN);
    for i in 0..3 {
        let name = format!("k{i}");
        let grants = vec![APP.1.to_string(), APP2.1.to_string()];
        let req = kms_client::api::CreateKeyRequest {
            name: name.clone(),
            algorithm: None,
            rotation_period: None,
            grants: workload::grants_of(&grants),
        };
        let kind = model::OpKind::Create {
            key: name.clone(),
            grants,
        };
        let r = shared
            .rec
            .run(
                &setup_admin,
                0,
                Phase::Setup,
                kind,
                setup_admin.nodes[0].create_key(&req),
                |_| model::OkValue::default(),
            )
            .await;
        r.result
            .unwrap_or_else(|e| panic!("setup: create {name}: {e:?}"));
        shared.keys.lock().unwrap().push(name);
    }
    let workload_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..plan.data_clients {
        // Every fourth data client is the second app, whose grant comes and goes.
        let ident = if i % 4 == 3 { APP2 } else { APP };
        let w = who(format!("data{i}"), ident);
        tasks.push(tokio::spawn(workload::data_client(
            w,
            shared.clone(),
            seed.wrapping_add(1 + i as u64),
            plan.think_ms,
        )));
    }
    for i in 0..plan.admin_clients {
        let w = who(format!("admin{i}"), ADMIN);
        tasks.push(tokio::spawn(workload::admin_client(
            w,
            shared.clone(),
            seed.wrapping_add(101 + i as u64),
            true,
        )));
    }
    let faults = if n > 1 {
        faults::run_faults(
            &cluster,
            &shared.rec,
            seed.wrapping_add(1001),
            shared.deadline,
        )
        .await
    } else {
        Vec::new()
    };
    for t in tasks {
        t.await.unwrap();
    }
    let faults_over = shared.rec.now();
    eprintln!(
        "history: {}: workload over after {:.1}s; {} faults; final phase",
        plan.setup,
        workload_start.elapsed().as_secs_f64(),
        faults.len()
    );

    // Final phase. Every node unsealed (a seal whose unseal failed in a fault leaves it
    // sealed) and ready, then the propagation bound passes.
    let admin = who("final".into(), ADMIN);
    for (i, c) in admin.sys.iter().enumerate() {
        shared
            .rec
            .run(
                &admin,
                i,
                Phase::Final,
                model::OpKind::Unseal,
                c.unseal(None),
                |_| model::OkValue::default(),
            )
            .await;
    }
    let not_ready = cluster.wait_ready(Duration::from_secs(30)).await;
    if !not_ready.is_empty() {
        eprintln!(
            "history: {}: nodes {not_ready:?} not ready 30 s after the faults ended",
            plan.setup
        );
    }
    tokio::time::sleep(plan.bound + Duration::from_millis(500)).await;
    // e: what every node reports.
    let mut final_reads = Vec::new();
    for i in 0..n {
        let at = shared.rec.now();
        let result = admin.nodes[i]
            .list_keys()
            .await
            .map(|ks| ks.iter().map(workload::summary).collect::<Vec<_>>())
            .map_err(|e| e.to_string());
        final_reads.push(NodeRead {
            node: i,
            at,
            result,
        });
    }
    // a: every key usable by the app again, every version back; then every DEK on every
    // node.
    let listed = admin.nodes[0].list_keys().await.unwrap_or_default();
    for k in &listed {
        let key = k.name.clone();
        let rec = &shared.rec;
        let c = &admin.nodes[0];
        let info = |k: &kms_client::api::KeyInfo| model::OkValue {
            key_info: Some(workload::summary(k)),
            ..Default::default()
        };
        if k.state == KeyState::PendingDeletion {
            let kind = model::OpKind::CancelDeletion { key: key.clone() };
            rec.run(&admin, 0, Phase::Final, kind, c.cancel_deletion(&key), info)
                .await;
        }
        let kind = model::OpKind::Enable { key: key.clone() };
        rec.run(&admin, 0, Phase::Final, kind, c.enable_key(&key), info)
            .await;
        let kind = model::OpKind::SetMinDecrypt {
            key: key.clone(),
            version: 1,
        };
        rec.run(
            &admin,
            0,
            Phase::Final,
            kind,
            c.set_min_decrypt_version(&key, 1),
            info,
        )
        .await;
        let grants = vec![APP.1.to_string(), APP2.1.to_string()];
        let kind = model::OpKind::SetGrants {
            key: key.clone(),
            grants: grants.clone(),
        };
        rec.run(
            &admin,
            0,
            Phase::Final,
            kind,
            c.set_grants(&key, workload::grants_of(&grants)),
            info,
        )
        .await;
    }
    tokio::time::sleep(plan.bound + Duration::from_millis(200)).await;
    let ops = shared.rec.ops();
    let partial = History {
        setup: plan.setup.into(),
        seed,
        nodes: n,
        bound_us: plan.bound.as_micros() as u64,
        key_file: B64::of(&std::fs::read(cluster.key_file()).unwrap()),
        tenant: keyhold_tests::TENANT_A.into(),
        ops,
        faults,
        faults_over,
        final_reads,
        final_unwraps: Vec::new(),
    };
    let deks = model::deks(&partial);
    let app = who("final-app".into(), APP);
    let mut final_unwraps = Vec::new();
    let list: Vec<&model::Dek> = deks.values().collect();
    for node in 0..n {
        for chunk in list.chunks(100) {
            let items = chunk
                .iter()
                .map(|d| BatchItem::Unwrap {
                    wrapped: WrappedKey::from(d.wrapped.clone()),
                    context: d.context.clone(),
                })
                .collect();
            let at = shared.rec.now();
            match app.nodes[node].batch(items).await {
                Ok(results) => {
                    for (d, r) in chunk.iter().zip(results) {
                        let result = match r {
                            BatchResult::Unwrap(u) => {
                                Ok((B64::of(u.plaintext.expose_secret()), u.version))
                            }
                            BatchResult::Error(e) => Err(format!("{:?}: {}", e.code, e.message)),
                            other => Err(format!("not an unwrap result: {other:?}")),
                        };
                        final_unwraps.push(FinalUnwrap {
                            dek: d.op,
                            node,
                            at,
                            result,
                        });
                    }
                }
                Err(e) => {
                    for d in chunk {
                        final_unwraps.push(FinalUnwrap {
                            dek: d.op,
                            node,
                            at,
                            result: Err(format!("the batch failed: {e}")),
                        });
                    }
                }
            }
        }
    }
    let history = History {
        final_unwraps,
        ..partial
    };
    let ops = &history.ops;
    let count = |f: &dyn Fn(&model::Op) -> bool| ops.iter().filter(|o| f(o)).count();
    eprintln!(
        "history: {}: {} ops ({} ok, {} indeterminate), {} DEKs acknowledged, {} backups, {} final unwraps",
        plan.setup,
        ops.len(),
        count(&|o| o.outcome.ok().is_some()),
        count(&|o| o.outcome.applied() == model::Applied::Maybe),
        deks.len(),
        count(&|o| matches!(o.kind, model::OpKind::Backup) && o.outcome.ok().is_some()),
        history.final_unwraps.len()
    );
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    for o in ops {
        *outcomes
            .entry(format!("{} {}", o.kind.name(), o.outcome.short()))
            .or_default() += 1;
    }
    eprintln!("history: {}: outcomes {outcomes:?}", plan.setup);
    let violations = model::check(&history, &backups::Restorer);
    if violations.is_empty() {
        eprintln!("history: {}: no violation", plan.setup);
        return;
    }
    let path = save(&cluster, &history, &violations);
    let mut by_check: std::collections::BTreeMap<&str, usize> = Default::default();
    for v in &violations {
        *by_check.entry(v.check.as_str()).or_default() += 1;
    }
    let shown: Vec<String> = violations.iter().take(40).map(|v| v.to_string()).collect();
    panic!(
        "history {} (seed {seed}): {} violations {by_check:?}; history saved to {}\n(replay: KEYHOLD_HISTORY_REPLAY={} cargo test -p keyhold-tests --test history replay)\n{}",
        plan.setup,
        violations.len(),
        path.display(),
        path.display(),
        shown.join("\n")
    );
}

/// Writes the history (with its violations beside it) into the run's directory, kept, and
/// copies it to `target/history-failures/`; returns the copy's path.
fn save(cluster: &Cluster, h: &History, violations: &[model::Violation]) -> std::path::PathBuf {
    let text = serde_json::to_vec(h).unwrap();
    let name = format!(
        "{}-seed{}-{}.json",
        h.setup,
        h.seed,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let local = cluster.origin.dir.path().join(&name);
    std::fs::write(&local, &text).unwrap();
    let dir = target_dir().join("history-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(&name);
    std::fs::write(&copy, &text).unwrap();
    // The node processes' logs beside it (why a node sealed itself, what it logged).
    for (i, n) in cluster.nodes.iter().enumerate() {
        if let Ok(p) = n.try_lock() {
            let _ = std::fs::copy(
                p.dir.path().join("server.log"),
                copy.with_extension(format!("node{i}.log")),
            );
        }
    }
    let report: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
    std::fs::write(copy.with_extension("violations.txt"), report.join("\n")).unwrap();
    eprintln!(
        "history: saved to {} (and {}, the run's directory, which is removed at the end of the test)",
        copy.display(),
        local.display()
    );
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_embedded() {
    let cluster = Cluster::embedded().await;
    run(
        cluster,
        Plan {
            setup: "embedded-1",
            data_clients: 4,
            admin_clients: 2,
            think_ms: 5,
            bound: Duration::ZERO,
            default_secs: 12,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_postgres() {
    if !keyhold_tests::pg::available("three_nodes_postgres") {
        return;
    }
    let cluster = Cluster::postgres(3).await;
    run(
        cluster,
        Plan {
            setup: "postgres-3",
            data_clients: 4,
            admin_clients: 2,
            think_ms: 5,
            bound: Duration::from_secs(1),
            default_secs: 20,
        },
    )
    .await;
}

/// `KEYHOLD_HISTORY_REPLAY=<file>`: checks a saved history again (without it: nothing).
#[test]
fn replay() {
    let Some(path) = std::env::var_os("KEYHOLD_HISTORY_REPLAY") else {
        eprintln!("replay: set KEYHOLD_HISTORY_REPLAY to a saved history");
        return;
    };
    let text = std::fs::read(&path).unwrap();
    let h: History = serde_json::from_slice(&text).unwrap();
    let violations = model::check(&h, &backups::Restorer);
    for v in &violations {
        eprintln!("{v}");
    }
    assert!(
        violations.is_empty(),
        "{} violations in {} (setup {}, seed {})",
        violations.len(),
        std::path::Path::new(&path).display(),
        h.setup,
        h.seed
    );
}
