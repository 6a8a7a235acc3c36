//! Audit retention by the clock (issue 29): hourly segments, kept one day. Records are
//! written at three moments of the server's clock; once the first two segments are more
//! than a day old they are archived (each file's records chain, the checkpoint MAC'd) and
//! purged, the third is kept, and the kept chain verifies from the checkpoint through the
//! API and `kmsctl audit verify`, also after a restart. The retention and the purge are
//! audit events.

use std::path::Path;
use std::time::{Duration, Instant};

use keyhold_tests::{TestSeal, TestServer};
use kms_client::api::{AuditPage, AuditRecord, AUDIT_GENESIS};

use crate::kmsctl::{conn, kmsctl};

const HOUR: Duration = Duration::from_secs(3600);

async fn uses(s: &TestServer, n: usize) -> u64 {
    let app = s.kms_client("app-a");
    let ctx = kms_client::api::Context::default();
    for i in 0..n {
        app.wrap("kept", &[i as u8; 32], &ctx).await.unwrap();
    }
    page(s, 0).await.head.seq
}

async fn page(s: &TestServer, after: u64) -> AuditPage {
    s.kms_client("auditor-a")
        .audit_page(after, 1000)
        .await
        .unwrap()
}

/// The archived segments, oldest first: (first, last, records, checkpoint JSON).
fn segments(dir: &Path) -> Vec<(Vec<AuditRecord>, serde_json::Value)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".jsonl"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|n| {
            let records = std::fs::read_to_string(dir.join(n))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let cp = dir.join(n.replace(".jsonl", ".checkpoint.json"));
            let cp = serde_json::from_slice(&std::fs::read(cp).unwrap()).unwrap();
            (records, cp)
        })
        .collect()
}

async fn wait_for_purge(s: &TestServer) -> AuditPage {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = page(s, 0).await;
        if p.checkpoint.is_some() {
            return p;
        }
        assert!(Instant::now() < deadline, "no purge");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn verify(s: &TestServer) -> String {
    let mut args = conn(s, "auditor-a");
    args.extend(["audit".into(), "verify".into()]);
    let out = kmsctl(args, vec![]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segments_past_retention_are_archived_and_purged_and_the_chain_verifies_after() {
    let extra = r#"
[audit.retention]
keep_days = 1
segment_hours = 1
archive_dir = "archive"
check_secs = 1
"#;
    let mut s = TestServer::start_with(TestSeal::KeyFile, extra).await;
    let archive = s.dir.path().join("archive");
    crate::create_key(&s, "admin-a", "kept").await;
    // Three moments, three hours apart: three segments.
    let first = uses(&s, 20).await;
    s.advance_clock(3 * HOUR);
    let second = uses(&s, 20).await;
    s.advance_clock(3 * HOUR);
    let third = uses(&s, 20).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(segments(&archive).is_empty(), "nothing is a day old yet");
    let before = page(&s, 0).await;
    assert!(before.checkpoint.is_none());
    assert_eq!(before.records[0].seq, 1);
    assert!(before
        .records
        .iter()
        .any(|r| r.operation == "SYSTEM audit-retention"));

    // A day later, the first two segments are past retention; the third is not.
    s.advance_clock(23 * HOUR);
    let purged = wait_for_purge(&s).await;
    let cp = purged.checkpoint.clone().unwrap();
    assert_eq!(cp.mac_valid, Some(true));
    assert!(
        cp.seq >= second && cp.seq < third,
        "{cp:?} {first} {second} {third}"
    );

    // The archive: every purged record once, chaining from the first record, each file's
    // checkpoint its last record.
    let archived = segments(&archive);
    assert!(archived.len() >= 2, "{} segments", archived.len());
    let mut prev = AUDIT_GENESIS.to_owned();
    let mut next = 1;
    for (records, checkpoint) in &archived {
        for r in records {
            assert_eq!((r.seq, &r.prev), (next, &prev), "archive chain");
            assert_eq!(r.compute_hash(), r.hash);
            prev = r.hash.clone();
            next += 1;
        }
        assert_eq!(checkpoint["seq"], records.last().unwrap().seq);
        assert_eq!(checkpoint["hash"], records.last().unwrap().hash.as_str());
        assert!(checkpoint["mac"].as_str().is_some_and(|m| m.len() == 64));
    }
    assert_eq!(next - 1, cp.seq, "archived up to the checkpoint");
    assert_eq!(prev, cp.hash);

    // The kept chain starts after the checkpoint, links to it, and verifies.
    let kept = page(&s, 0).await;
    assert_eq!(kept.records[0].seq, cp.seq + 1);
    assert_eq!(kept.records[0].prev, cp.hash);
    assert!(kept.records.iter().any(|r| r.seq == third));
    let purge_event = kept
        .records
        .iter()
        .find(|r| r.operation == "SYSTEM audit-purge")
        .expect("the purge is an audit event");
    let attributes = purge_event.attributes.clone().unwrap();
    assert_eq!(attributes["through"], cp.seq.to_string());
    assert_eq!(attributes["records"], cp.seq.to_string());
    assert!(attributes["bytes_released"].parse::<u64>().unwrap() > 0);
    let said = verify(&s).await;
    assert!(said.contains("from the retention checkpoint"), "{said}");
    let verified = s.kms_client("auditor-a").audit_verify(true).await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");

    // After a restart the chain file opens from the checkpoint and goes on.
    s.restart().await;
    let after_restart = uses(&s, 5).await;
    let reopened = page(&s, 0).await;
    assert_eq!(reopened.checkpoint.as_ref().map(|c| c.seq), Some(cp.seq));
    assert_eq!(reopened.records[0].seq, cp.seq + 1);
    assert!(reopened.head.seq >= after_restart);
    verify(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_an_exporter_has_not_delivered_are_not_purged() {
    // The exporter's receiver never answers: its position stays at 0.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let extra = format!(
        r#"
[audit.retention]
keep_days = 1
segment_hours = 1
archive_dir = "archive"
check_secs = 1

[[audit.export]]
name = "down"
kind = "otlp"
address = "http://127.0.0.1:{port}/v1/logs"
retry_max_ms = 200
"#
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    crate::create_key(&s, "admin-a", "kept").await;
    uses(&s, 10).await;
    s.advance_clock(49 * HOUR);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let p = page(&s, 0).await;
    assert!(p.checkpoint.is_none(), "purged past the exporter: {p:?}");
    assert_eq!(p.records[0].seq, 1);
    assert!(segments(&s.dir.path().join("archive")).is_empty());
}
