//! The servers under test and the faults done to them: one in-process node on the embedded
//! store, or three `kms-server serve` processes on a private PostgreSQL, killed with
//! SIGKILL and restarted, with PostgreSQL itself stopped or crashed and started again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold_tests::pg::PrivateServer;
use keyhold_tests::{NodeProcess, TestPki, TestServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::model::{Fault, FaultKind};
use crate::workload::Recorder;

/// The lockout policy out of reach: the workload's denials (grants removed) must not lock
/// the app out, which would hide what the checks look at.
pub const NO_LOCKOUT: &str = "[lockout]\nthreshold = 1000\nwindow_secs = 1\nduration_secs = 1\n";

pub struct Cluster {
    /// The first server: its data dir holds the PKI, the config and the key file.
    pub origin: TestServer,
    pub urls: Vec<String>,
    /// The node processes (none on the embedded set-up: `origin` is the node).
    pub nodes: Vec<Arc<Mutex<NodeProcess>>>,
    pub pg: Option<Arc<PrivateServer>>,
}

impl Cluster {
    /// One node, embedded store (redb), in this process.
    pub async fn embedded() -> Cluster {
        let s = TestServer::start_with(keyhold_tests::TestSeal::KeyFile, NO_LOCKOUT).await;
        s.wait_ready().await;
        let urls = vec![s.url("")];
        Cluster {
            origin: s,
            urls,
            nodes: Vec::new(),
            pg: None,
        }
    }

    /// Three `kms-server serve` processes over one private PostgreSQL.
    pub async fn postgres(n: usize) -> Cluster {
        let db = Arc::new(
            tokio::task::spawn_blocking(PrivateServer::start)
                .await
                .unwrap(),
        );
        let mut origin = TestServer::start_on_postgres_at(&db.url()).await;
        origin.wait_ready().await;
        origin.stop().await;
        let text = std::fs::read_to_string(&origin.config).unwrap();
        std::fs::write(&origin.config, format!("{text}\n{NO_LOCKOUT}")).unwrap();
        let mut nodes = Vec::new();
        let mut urls = Vec::new();
        for _ in 0..n {
            let p = origin.node_process().await;
            urls.push(p.url(""));
            nodes.push(Arc::new(Mutex::new(p)));
        }
        Cluster {
            origin,
            urls,
            nodes,
            pg: Some(db),
        }
    }

    pub fn pki(&self) -> &TestPki {
        &self.origin.pki
    }

    pub fn key_file(&self) -> PathBuf {
        self.origin.dir.path().join("master.key")
    }

    /// A client of `who` on node `i` only: one attempt per call (no retry, no failover),
    /// so every answer is seen and belongs to that node.
    pub fn client(&self, i: usize, who: &str) -> kms_client::Client {
        let pki = self.pki();
        kms_client::Client::builder()
            .endpoint(self.urls[i].clone())
            .ca_pem_file(pki.ca())
            .unwrap()
            .identity_pem_files(pki.cert(who), pki.key(who))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .request_timeout(Duration::from_secs(10))
            .retry(kms_client::RetryPolicy {
                max_rounds: 1,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
            })
            .build()
            .unwrap()
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// The ops listener's `/readyz` of every node.
    async fn readyz_urls(&self) -> Vec<String> {
        if self.nodes.is_empty() {
            return vec![self.origin.ops_url("/readyz")];
        }
        let mut urls = Vec::new();
        for n in &self.nodes {
            urls.push(format!("http://127.0.0.1:{}/readyz", n.lock().await.ops));
        }
        urls
    }

    /// Waits (at most `limit`) until every node answers ready; returns those that never
    /// did.
    pub async fn wait_ready(&self, limit: Duration) -> Vec<usize> {
        let deadline = Instant::now() + limit;
        let client = reqwest::Client::new();
        let mut pending: Vec<(usize, String)> =
            self.readyz_urls().await.into_iter().enumerate().collect();
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for (i, url) in pending {
                let ok = matches!(client.get(&url).send().await, Ok(r) if r.status() == 200);
                if !ok {
                    still.push((i, url));
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        pending.into_iter().map(|(i, _)| i).collect()
    }
}

/// Starts a killed node process again on the same config and ports.
fn respawn(p: &mut NodeProcess) {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(p.dir.path().join("server.log"))
        .unwrap();
    p.child = std::process::Command::new(keyhold_tests::workspace_bin("kms-server"))
        .arg("serve")
        .arg("--config")
        .arg(p.dir.path().join("kms-server.toml"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
}

/// Faults until `until`, every 1.5–4 s: kill -9 of a node and its restart 0.3–1.5 s
/// later, or PostgreSQL stopped (fast) or crashed (immediate) for 0.5–2 s. Returns them.
pub async fn run_faults(
    cluster: &Cluster,
    rec: &Recorder,
    seed: u64,
    until: Instant,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    loop {
        let wait = Duration::from_millis(rng.gen_range(1500..4000));
        if Instant::now() + wait + Duration::from_secs(3) > until {
            break;
        }
        tokio::time::sleep(wait).await;
        if rng.gen_bool(0.6) || cluster.pg.is_none() {
            let i = rng.gen_range(0..cluster.nodes.len());
            let down = Duration::from_millis(rng.gen_range(300..1500));
            let mut node = cluster.nodes[i].lock().await;
            let p = &mut *node;
            let start = rec.now();
            p.kill();
            faults.push(Fault {
                kind: FaultKind::KillNode,
                node: Some(i),
                start,
                end: rec.now(),
            });
            eprintln!(
                "history: fault: node {i} killed at {:.3}s",
                start as f64 / 1e6
            );
            tokio::time::sleep(down).await;
            let start = rec.now();
            respawn(p);
            p.wait_ready().await;
            faults.push(Fault {
                kind: FaultKind::RestartNode,
                node: Some(i),
                start,
                end: rec.now(),
            });
        } else if let Some(db) = &cluster.pg {
            let crash = rng.gen_bool(0.5);
            let down = Duration::from_millis(rng.gen_range(500..2000));
            let start = rec.now();
            let d = db.clone();
            tokio::task::spawn_blocking(move || if crash { d.crash() } else { d.stop() })
                .await
                .unwrap();
            eprintln!(
                "history: fault: PostgreSQL {} at {:.3}s",
                if crash { "crashed" } else { "stopped" },
                start as f64 / 1e6
            );
            tokio::time::sleep(down).await;
            let d = db.clone();
            tokio::task::spawn_blocking(move || d.start_again())
                .await
                .unwrap();
            faults.push(Fault {
                kind: FaultKind::PostgresOutage,
                node: None,
                start,
                end: rec.now(),
            });
        }
    }
    faults
}
