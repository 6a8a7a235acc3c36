//! The audit trail over real mTLS: one record per request under concurrency, tamper
//! detection for each kind of edit, and fail-closed when the record cannot be written.

use keyhold_tests::{TestSeal, TestServer};
use kms_client::api::{AuditRecord, Context, CreateKeyRequest, ErrorCode, AUDIT_GENESIS};
use kms_client::Client;

fn client(s: &TestServer, who: &str) -> Client {
    s.kms_client(who)
}

fn create(name: &str) -> CreateKeyRequest {
    keyhold_tests::create_granted(name, keyhold_tests::APP_A)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_request_under_concurrency_and_the_chain_verifies() {
    // The workload's denials must not trip the lockout (tested on its own in keys.rs).
    let s = TestServer::start_with(
        TestSeal::KeyFile,
        "[lockout]\nthreshold = 1000\nwindow_secs = 1\n",
    )
    .await;
    let admin = client(&s, "admin-a");
    let app = client(&s, "app-a");
    let auditor = client(&s, "auditor-a");
    admin.create_key(&create("k")).await.unwrap();
    let ctx: Context = [("doc".to_string(), "1".to_string())].into_iter().collect();
    let dk = app.datakey("k", &ctx).await.unwrap();
    let mut requests: u64 = 2;
    // 10 000 requests from 32 concurrent callers, a tenth of them denied.
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let app = app.clone();
        let admin = admin.clone();
        let wrapped = dk.wrapped.clone();
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let n = if t < 16 { 313 } else { 312 };
            for i in 0..n {
                if i % 10 == 0 {
                    let e = admin.unwrap(wrapped.as_bytes(), &ctx).await.unwrap_err();
                    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
                } else {
                    app.unwrap(wrapped.as_bytes(), &ctx).await.unwrap();
                }
            }
            n
        }));
    }
    for t in tasks {
        requests += t.await.unwrap();
    }
    assert_eq!(requests, 10_002);
    // Every request left one record; the chain verifies end to end.
    let verified = auditor.audit_verify(true).await.unwrap().unwrap();
    let mut all = Vec::new();
    let mut after = 0;
    while after < verified {
        let page = auditor.audit_page(after, 1000).await.unwrap();
        after = page.records.last().map(|r| r.seq).unwrap_or(verified);
        all.extend(page.records);
    }
    // The verification's own page reads are audited too; everything else is the workload.
    let workload = all
        .iter()
        .filter(|r| r.operation != "GET /v1/audit")
        .count() as u64;
    assert_eq!(workload, requests);
    // (The verification's own reads are audited after they are answered.)
    let page = auditor.audit_page(0, 3).await.unwrap();
    assert_eq!(page.records[0].prev, AUDIT_GENESIS);
    assert_eq!(page.records[0].operation, "POST /v1/keys");
    assert_eq!(page.records[0].key.as_deref(), Some("k"));
    let datakey = &page.records[1];
    assert_eq!(datakey.operation, "POST /v1/keys/{name}/datakey");
    assert_eq!(
        (datakey.key.as_deref(), datakey.version),
        (Some("k"), Some(1))
    );
    assert_eq!(datakey.identity.as_deref(), Some(keyhold_tests::APP_A));
    assert_eq!(datakey.tenant.as_deref(), Some("acme"));
    assert_eq!(datakey.context_hash.as_ref().map(String::len), Some(32));
    let denied = all
        .iter()
        .filter(|r| r.outcome == "PermissionDenied" && r.status == 403)
        .count();
    assert_eq!(
        denied,
        32 * 32,
        "one denial every tenth request of each caller"
    );
    // No DEK, whole wrapped DEK or context value in any record.
    let text = serde_json::to_string(&all).unwrap();
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    assert!(!text.contains(&b64(dk.plaintext.expose_secret())));
    assert!(!text.contains(&b64(dk.wrapped.as_bytes())));
    assert!(!text.contains("\"doc\""));
    // Roles: only auditors read the trail.
    assert_eq!(
        admin.audit_page(0, 1).await.unwrap_err().code(),
        Some(ErrorCode::PermissionDenied)
    );
    assert_eq!(
        app.audit_page(0, 1).await.unwrap_err().code(),
        Some(ErrorCode::PermissionDenied)
    );
}

/// The stopped server's audit chain file, as header (head) and records.
struct ChainFile {
    path: std::path::PathBuf,
}

impl ChainFile {
    fn head(&self) -> serde_json::Value {
        let bytes = std::fs::read(&self.path).unwrap();
        let header = std::str::from_utf8(&bytes[9..512]).unwrap().trim();
        serde_json::from_str(header).unwrap()
    }

    fn records(&self) -> Vec<AuditRecord> {
        let bytes = std::fs::read(&self.path).unwrap();
        // Records, then the zeros allocated ahead.
        let used = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        bytes[512..used]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// Rewrites the file: this head (JSON) in the header, these records after it.
    fn write(&self, head: &serde_json::Value, recs: &[AuditRecord]) {
        let mut out = b"KHAUDIT1\n".to_vec();
        out.extend_from_slice(head.to_string().as_bytes());
        out.resize(511, b' ');
        out.push(b'\n');
        for r in recs {
            out.extend_from_slice(&serde_json::to_vec(r).unwrap());
            out.push(b'\n');
        }
        std::fs::write(&self.path, out).unwrap();
    }
}

/// Applies `edit` to the stopped server's audit chain file, restarts it, and returns what
/// verification says.
async fn verify_after(edit: impl FnOnce(&ChainFile)) -> Result<u64, String> {
    let mut s = TestServer::start().await;
    let admin = client(&s, "admin-a");
    for i in 0..5 {
        admin.create_key(&create(&format!("k{i}"))).await.unwrap();
    }
    drop(admin);
    s.stop().await;
    edit(&ChainFile {
        path: s.dir.path().join("store.audit"),
    });
    s.start_again().await;
    client(&s, "auditor-a").audit_verify(true).await.unwrap()
}

/// Edits the records and keeps the header as it was.
fn edit(chain: &ChainFile, f: impl FnOnce(&mut Vec<AuditRecord>)) {
    let mut recs = chain.records();
    assert_eq!(recs.len(), 5);
    f(&mut recs);
    chain.write(&chain.head(), &recs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_of_each_kind_is_detected() {
    assert_eq!(
        verify_after(|_| {}).await,
        Ok(5),
        "untouched chain verifies"
    );
    let edited = verify_after(|st| edit(st, |r| r[2].outcome = "PermissionDenied".into())).await;
    assert!(edited.unwrap_err().contains("altered"));
    let edited_and_rehashed = verify_after(|st| {
        edit(st, |r| {
            r[2].identity = Some("someone-else".into());
            r[2].hash = r[2].compute_hash();
        })
    })
    .await;
    assert!(
        edited_and_rehashed.is_err(),
        "a re-hashed edit breaks the next link"
    );
    let deleted = verify_after(|st| {
        edit(st, |r| {
            r.remove(2);
        })
    })
    .await;
    assert!(deleted.is_err());
    let reordered = verify_after(|st| edit(st, |r| r.swap(1, 2))).await;
    assert!(reordered.is_err());
    let inserted = verify_after(|st| {
        edit(st, |r| {
            // A forged record that links correctly to its predecessor, renumbered tail.
            let mut forged = r[2].clone();
            forged.operation = "POST /v1/sys/seal".into();
            forged.hash = forged.compute_hash();
            r.insert(2, forged);
            for (i, rec) in r.iter_mut().enumerate().skip(3) {
                rec.seq = i as u64 + 1;
            }
        })
    })
    .await;
    assert!(inserted.is_err());
    let truncated = verify_after(|st| {
        edit(st, |r| {
            r.pop();
        })
    })
    .await;
    assert!(truncated.is_err());
    let truncated_with_forged_head = verify_after(|st| {
        let mut recs = st.records();
        recs.pop();
        let head = serde_json::json!({"seq": 4, "hash": recs[3].hash, "mac": "00".repeat(32)});
        st.write(&head, &recs);
    })
    .await;
    assert!(truncated_with_forged_head.unwrap_err().contains("altered"));
    let truncated_with_unmacked_head = verify_after(|st| {
        let mut recs = st.records();
        recs.pop();
        let head = serde_json::json!({"seq": 4, "hash": recs[3].hash});
        st.write(&head, &recs);
    })
    .await;
    assert!(
        truncated_with_unmacked_head.as_ref().unwrap_err().contains("verif"),
        "strict verification reports a head the server could not vouch for: {truncated_with_unmacked_head:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_when_the_audit_sink_cannot_be_written() {
    // Every write to /dev/full fails (ENOSPC).
    let s = TestServer::start_with(TestSeal::KeyFile, "[audit]\njsonl = \"/dev/full\"\n").await;
    let admin = client(&s, "admin-a");
    let e = admin.create_key(&create("k")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StorageUnavailable));
    let app = client(&s, "app-a");
    let e = app.datakey("k", &Context::new()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(ErrorCode::StorageUnavailable),
        "no DEK leaves unaudited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_sink_gets_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("audit.jsonl");
    let s = TestServer::start_with(
        TestSeal::KeyFile,
        &format!("[audit]\njsonl = \"{}\"\n", sink.display()),
    )
    .await;
    let admin = client(&s, "admin-a");
    admin.create_key(&create("k")).await.unwrap();
    admin.list_keys().await.unwrap();
    let text = std::fs::read_to_string(&sink).unwrap();
    let lines: Vec<AuditRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1].prev, lines[0].hash);
}

/// Issue 22 (point 7): the `wrap` and `batch` records name the key and version used (and
/// `wrap` the context hash), as DESIGN.md asks of every key use; a batch's record lists its
/// items' keys, versions and outcomes. A denied batch item is a denial: it counts toward
/// the lockout (threshold 3 here). Before: both records carried no key, and denials inside
/// a batch never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_and_batch_records_name_their_keys_and_denied_items_count() {
    use serde_json::json;
    let s = TestServer::start_with(TestSeal::KeyFile, "[lockout]\nthreshold = 3\n").await;
    client(&s, "admin-a")
        .create_key(&create("k"))
        .await
        .unwrap();
    client(&s, "admin-a")
        .create_key(&CreateKeyRequest {
            name: "closed".into(),
            algorithm: None,
            rotation_period: None,
            grants: vec![],
        })
        .await
        .unwrap();
    let app = s.client(Some("app-a"));
    let dek = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let (st, _) = crate::post(
        &app,
        &s.url("/v1/keys/k/wrap"),
        json!({"plaintext": dek, "context": {"doc": "1"}}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, body) = crate::post(
        &app,
        &s.url("/v1/batch"),
        json!({"items": [
            {"op": "datakey", "key": "k", "context": {"doc": "2"}},
            {"op": "wrap", "key": "k", "plaintext": dek, "context": {"doc": "3"}},
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let records = client(&s, "auditor-a")
        .audit_page(0, 1000)
        .await
        .unwrap()
        .records;
    let wrap = records
        .iter()
        .find(|r| r.operation == "POST /v1/keys/{name}/wrap")
        .expect("a wrap record");
    assert_eq!(
        (
            wrap.key.as_deref(),
            wrap.version,
            wrap.context_hash.is_some()
        ),
        (Some("k"), Some(1), true),
        "{wrap:?}"
    );
    let batch = records
        .iter()
        .find(|r| r.operation == "POST /v1/batch")
        .expect("a batch record");
    assert_eq!(
        (batch.key.as_deref(), batch.version),
        (Some("k"), Some(1)),
        "{batch:?}"
    );
    assert_eq!(batch.attributes.as_ref().unwrap()["items"], "k@1 k@1");

    // Three denied items (no grant on `closed`) lock app-a out.
    let (st, body) = crate::post(
        &app,
        &s.url("/v1/batch"),
        json!({"items": [
            {"op": "datakey", "key": "closed", "context": {}},
            {"op": "datakey", "key": "closed", "context": {}},
            {"op": "datakey", "key": "closed", "context": {}},
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["results"][0]["error"]["code"], "PermissionDenied",
        "{body}"
    );
    let (st, body) = crate::post(&app, &s.url("/v1/keys/k/datakey"), json!({"context": {}})).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (429, Some("LockedOut")),
        "{body}"
    );
}

/// Issue 25: the two durability modes, counted in flushes of the chain file. Per request
/// (the default): every acknowledged record was flushed first, so twenty sequential key
/// uses cost twenty flushes. Bounded lag: key uses are acknowledged once written (a
/// killed process cannot lose them: `crash::crash_redb_bounded_lag_audit`) and flushed
/// within the lag, so twenty cost at most one or two; a key change is flushed before its
/// answer in both modes; closing flushes what is left; the chain verifies after.
#[test]
fn durability_modes_flush_as_configured() {
    use kms_server::security::audit::{AuditDraft, AuditLog, CommitPolicy, Durability, Sink};
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let draft = |i: u64, key_use: bool| AuditDraft {
        request_id: i,
        operation: if key_use {
            "POST /v1/unwrap".into()
        } else {
            "POST /v1/keys/{name}/rotate".into()
        },
        outcome: "ok".into(),
        status: 200,
        key_use,
        ..Default::default()
    };
    for (durability, most_for_uses) in [
        (Durability::PerRequest, None),
        (Durability::BoundedLag(Duration::from_millis(1000)), Some(2)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("store.redb");
        let ring = std::sync::Arc::new(keyhold_tests::keyring_with_erasure(
            kms_server::storage::Engine::Redb,
            &store_path,
        ));
        let key_file = dir.path().join("master.key");
        kms_server::crypto::seal::KeyFileSealer::generate(&key_file).unwrap();
        let sealer = kms_server::crypto::seal::KeyFileSealer::new(&key_file);
        ring.initialize(&sealer).unwrap();
        ring.unseal(&sealer).unwrap();
        let _rt = rt.enter();
        let log = AuditLog::start_with(
            ring.store().clone(),
            ring.clone(),
            &store_path.with_extension("audit"),
            &Sink::None,
            kms_server::security::alert::Alerter::start(&Default::default()),
            None,
            kms_server::security::audit::AuditOptions {
                policy: CommitPolicy {
                    durability,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        let f0 = log.flushes().unwrap();
        let started = std::time::Instant::now();
        for i in 0..20 {
            rt.block_on(log.append(draft(i, true))).unwrap();
        }
        let uses = log.flushes().unwrap() - f0;
        match most_for_uses {
            None => assert!(uses >= 20, "{durability:?}: {uses} flushes for 20 key uses"),
            // At most one lag flush per second the appends took (the lag is 1 s).
            Some(most) => assert!(
                uses <= most.max(1 + started.elapsed().as_secs()),
                "{durability:?}: {uses} flushes for 20 key uses"
            ),
        }
        let f1 = log.flushes().unwrap();
        rt.block_on(log.append(draft(100, false))).unwrap();
        assert!(
            log.flushes().unwrap() > f1,
            "{durability:?}: a key change is flushed before its answer"
        );
        // A key use, then the lag passes: flushed without another request.
        if let Durability::BoundedLag(lag) = durability {
            rt.block_on(log.append(draft(101, true))).unwrap();
            let f2 = log.flushes().unwrap();
            std::thread::sleep(lag);
            // The writer runs at nice +10: give it up to 10 s on a loaded machine.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while log.flushes().unwrap() == f2 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                log.flushes().unwrap() > f2,
                "the lag's flush came without a request"
            );
        }
        log.close();
        let page = log.read(&ring, 0, 1000).unwrap();
        let mut chain = kms_client::api::AuditChain::new();
        for r in &page.records {
            chain.push(r).unwrap();
        }
        assert_eq!(
            page.records.len(),
            if most_for_uses.is_some() { 22 } else { 21 }
        );
        assert_eq!(page.head.mac_valid, Some(true));
    }
}

/// Issue 25, power loss in bounded-lag mode: the header on disk names only records that
/// were flushed. Were it rewritten to a head whose records are written but not yet
/// flushed, a power cut during the next flush could keep the header and drop the records
/// (a disk orders a flush's blocks as it likes), and the chain would read as cut or
/// edited after an ordinary power loss.
#[test]
fn bounded_lag_never_puts_an_unflushed_head_in_the_header() {
    use kms_server::security::audit::{AuditDraft, AuditLog, CommitPolicy, Durability, Sink};
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.redb");
    let ring = std::sync::Arc::new(keyhold_tests::keyring_with_erasure(
        kms_server::storage::Engine::Redb,
        &store_path,
    ));
    let key_file = dir.path().join("master.key");
    kms_server::crypto::seal::KeyFileSealer::generate(&key_file).unwrap();
    let sealer = kms_server::crypto::seal::KeyFileSealer::new(&key_file);
    ring.initialize(&sealer).unwrap();
    ring.unseal(&sealer).unwrap();
    let _rt = rt.enter();
    let audit_path = store_path.with_extension("audit");
    let log = AuditLog::start_with(
        ring.store().clone(),
        ring.clone(),
        &audit_path,
        &Sink::None,
        kms_server::security::alert::Alerter::start(&Default::default()),
        None,
        kms_server::security::audit::AuditOptions {
            policy: CommitPolicy {
                durability: Durability::BoundedLag(Duration::from_secs(30)),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let draft = |i: u64, key_use: bool| AuditDraft {
        request_id: i,
        operation: "POST /v1/unwrap".into(),
        outcome: "ok".into(),
        status: 200,
        key_use,
        ..Default::default()
    };
    // A flushed record, then key uses further apart than the header's rewrite interval.
    rt.block_on(log.append(draft(0, false))).unwrap();
    let flushed = log.read(&ring, 0, 1000).unwrap().head.seq;
    for i in 1..=4 {
        std::thread::sleep(
            kms_server::security::audit::file::HEADER_EVERY + Duration::from_millis(20),
        );
        rt.block_on(log.append(draft(i, true))).unwrap();
    }
    let on_disk = |path: &std::path::Path| -> u64 {
        let bytes = std::fs::read(path).unwrap();
        let header = std::str::from_utf8(&bytes[9..512]).unwrap().trim();
        let head: serde_json::Value = serde_json::from_str(header).unwrap();
        head["seq"].as_u64().unwrap()
    };
    let header_seq = on_disk(&audit_path);
    assert!(
        header_seq <= flushed,
        "the header names record {header_seq}; only {flushed} were flushed"
    );
    log.close();
    // Closed: everything flushed, and the header names the last record.
    assert_eq!(on_disk(&audit_path), flushed + 4);
}

/// Issue 25, through the real server: `[audit] durability` as the ops listener counts it
/// (`keyhold_audit_flushes_total`, `_records_total`, `_batches_total`). Per request:
/// twenty sequential unwraps, twenty flushes at least. Bounded lag (`max_lag_ms = 1000`):
/// twenty unwraps, at most one flush per second they took (the lag's), all twenty records
/// written; a rotation (a key change) is flushed before its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_flushes_as_its_durability_mode_says() {
    async fn counter(s: &TestServer, name: &str) -> u64 {
        let text = reqwest::get(s.ops_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("keyhold_audit_{name}_total ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("keyhold_audit_{name}_total in {text}"))
    }
    let ctx: Context = [("doc".to_string(), "1".to_string())].into_iter().collect();
    for (config, bounded) in [
        ("", false),
        (
            "[audit]\ndurability = \"bounded-lag\"\nmax_lag_ms = 1000\n",
            true,
        ),
    ] {
        let s = TestServer::start_with(TestSeal::KeyFile, config).await;
        let (admin, app) = (client(&s, "admin-a"), client(&s, "app-a"));
        admin.create_key(&create("k")).await.unwrap();
        let dk = app.datakey("k", &ctx).await.unwrap();
        let (f0, r0) = (counter(&s, "flushes").await, counter(&s, "records").await);
        let started = std::time::Instant::now();
        for _ in 0..20 {
            app.unwrap(dk.wrapped.as_bytes(), &ctx).await.unwrap();
        }
        let (f1, r1) = (counter(&s, "flushes").await, counter(&s, "records").await);
        assert!(r1 - r0 >= 20, "{config}: {} records", r1 - r0);
        if bounded {
            // At most one lag flush per second of the run (the lag is 1 s), whatever the
            // machine's speed.
            let most = 1 + started.elapsed().as_secs();
            assert!(
                f1 - f0 <= most,
                "bounded lag: {} flushes for 20 unwraps",
                f1 - f0
            );
        } else {
            assert!(
                f1 - f0 >= 20,
                "per request: {} flushes for 20 unwraps",
                f1 - f0
            );
        }
        admin.rotate_key("k").await.unwrap();
        assert!(
            counter(&s, "flushes").await > f1,
            "{config}: a rotation is flushed before its answer"
        );
        assert!(counter(&s, "batches").await > 0);
    }
}
