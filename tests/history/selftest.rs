//! The checker on hand-made histories: a clean one passes, and each check fails on a
//! history that breaks its property (a check that cannot fail is worthless).

use crate::model::*;

const APP: &str = "spiffe://test/acme/app";
const APP2: &str = "spiffe://test/acme/app2";

struct H {
    h: History,
}

fn ok(v: OkValue) -> Outcome {
    Outcome::Ok(Box::new(v))
}

fn fail(status: u16, code: &str) -> Outcome {
    Outcome::Fail {
        status,
        code: code.into(),
        message: "m".into(),
    }
}

fn summary(name: &str, state: &str, cur: u32, min: u32, grants: &[&str]) -> KeySummary {
    KeySummary {
        name: name.into(),
        state: state.into(),
        current_version: cur,
        min_decrypt_version: min,
        grants: grants
            .iter()
            .map(|g| format!("{g}=datakey,wrap,unwrap,rewrap"))
            .collect(),
    }
}

/// Verifies nothing: for the checks other than c.
struct NoBackups;
impl BackupVerifier for NoBackups {
    fn verify(
        &self,
        _: &History,
        _: &serde_json::Value,
        _: &std::collections::BTreeMap<String, u32>,
        _: &[&Dek],
    ) -> Result<(), String> {
        Ok(())
    }
}

impl H {
    /// Key `k` created (both apps granted) on `nodes` nodes with this bound, at [0, 10] ms.
    fn new(nodes: usize, bound_ms: u64) -> H {
        let mut h = H {
            h: History {
                setup: "selftest".into(),
                seed: 0,
                nodes,
                bound_us: bound_ms * 1000,
                key_file: B64::of(&[0; 32]),
                tenant: "acme".into(),
                ops: Vec::new(),
                faults: Vec::new(),
                faults_over: 0,
                final_reads: Vec::new(),
                final_unwraps: Vec::new(),
            },
        };
        h.op(
            0,
            0,
            10,
            OpKind::Create {
                key: "k".into(),
                grants: vec![APP.into(), APP2.into()],
            },
            ok(OkValue::default()),
        );
        h
    }

    /// Adds an op by APP (data) or the admin; times in ms. Returns its id.
    fn op(
        &mut self,
        node: usize,
        start_ms: u64,
        end_ms: u64,
        kind: OpKind,
        outcome: Outcome,
    ) -> u64 {
        self.op_as(APP, node, start_ms, end_ms, kind, outcome)
    }

    fn op_as(
        &mut self,
        identity: &str,
        node: usize,
        start_ms: u64,
        end_ms: u64,
        kind: OpKind,
        outcome: Outcome,
    ) -> u64 {
        let id = self.h.ops.len() as u64 + 1;
        self.h.ops.push(Op {
            id,
            client: "c".into(),
            identity: identity.into(),
            node,
            phase: Phase::Workload,
            start: start_ms * 1000,
            end: end_ms * 1000,
            kind,
            outcome,
        });
        id
    }

    /// A datakey of `plaintext` under version `v` on node 0.
    fn datakey(&mut self, start_ms: u64, end_ms: u64, v: u32, plaintext: &[u8]) -> u64 {
        self.op(
            0,
            start_ms,
            end_ms,
            OpKind::Datakey {
                key: "k".into(),
                context: Context::new(),
            },
            ok(OkValue {
                version: Some(v),
                plaintext: Some(B64::of(plaintext)),
                wrapped: Some(B64::of(&[v as u8; 40])),
                ..OkValue::default()
            }),
        )
    }

    /// The final phase: every node reads `keys`, every DEK unwraps right.
    fn finish(&mut self, keys: Vec<KeySummary>) {
        for node in 0..self.h.nodes {
            self.h.final_reads.push(NodeRead {
                node,
                at: 1_000_000_000,
                result: Ok(keys.clone()),
            });
        }
        for d in deks(&self.h).values() {
            for node in 0..self.h.nodes {
                self.h.final_unwraps.push(FinalUnwrap {
                    dek: d.op,
                    node,
                    at: 1_000_000_000,
                    result: Ok((B64::of(&d.plaintext), d.version)),
                });
            }
        }
    }

    fn check(&self) -> Vec<Violation> {
        // Through JSON, as a replay reads it.
        let text = serde_json::to_vec(&self.h).unwrap();
        let h: History = serde_json::from_slice(&text).unwrap();
        check(&h, &NoBackups)
    }
}

fn only(v: &[Violation], check: &str) {
    assert!(!v.is_empty(), "check {check} did not fire");
    assert!(
        v.iter().all(|x| x.check == check),
        "expected only check {check}: {v:#?}"
    );
}

fn clean() -> H {
    let mut h = H::new(1, 0);
    let d = h.datakey(20, 30, 1, b"dek-one-0123456789abcdef");
    h.op(
        0,
        40,
        50,
        OpKind::Unwrap {
            dek: d,
            key: "k".into(),
            context: Context::new(),
        },
        ok(OkValue {
            version: Some(1),
            plaintext: Some(B64::of(b"dek-one-0123456789abcdef")),
            ..OkValue::default()
        }),
    );
    h.op(
        0,
        60,
        70,
        OpKind::Rotate { key: "k".into() },
        ok(OkValue {
            version: Some(2),
            ..OkValue::default()
        }),
    );
    h.op(
        0,
        80,
        90,
        OpKind::Disable { key: "k".into() },
        ok(OkValue::default()),
    );
    // Refused after the disable: fine.
    h.op(
        0,
        100,
        110,
        OpKind::Datakey {
            key: "k".into(),
            context: Context::new(),
        },
        fail(409, "KeyDisabled"),
    );
    h
}

/// `clean`, enabled again at 110..115 ms.
fn clean_enabled() -> H {
    let mut h = clean();
    h.op(
        0,
        110,
        115,
        OpKind::Enable { key: "k".into() },
        ok(OkValue::default()),
    );
    h
}

#[test]
fn a_clean_history_passes() {
    let mut h = clean();
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn check_a_fires_on_an_unwrap_of_other_bytes() {
    let mut h = clean_enabled();
    let d = h.datakey(200, 210, 2, b"dek-two-0123456789abcdef");
    h.op(
        0,
        220,
        230,
        OpKind::Unwrap {
            dek: d,
            key: "k".into(),
            context: Context::new(),
        },
        ok(OkValue {
            version: Some(2),
            plaintext: Some(B64::of(b"something-else-entirely!")),
            ..OkValue::default()
        }),
    );
    h.finish(vec![summary("k", "enabled", 2, 1, &[APP, APP2])]);
    only(&h.check(), "a");
}

#[test]
fn check_a_fires_on_a_dek_lost_in_the_final_sweep() {
    let mut h = clean();
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    h.h.final_unwraps[0].result = Err("DecryptFailed".into());
    let v = h.check();
    only(&v, "a");
    assert!(v[0].message.contains("lost"), "{v:#?}");
}

#[test]
fn check_a_fires_on_decrypt_failed_without_a_retirement() {
    let mut h = clean_enabled();
    let d = h.datakey(200, 210, 2, b"dek-two-0123456789abcdef");
    h.op(
        0,
        220,
        230,
        OpKind::Unwrap {
            dek: d,
            key: "k".into(),
            context: Context::new(),
        },
        fail(400, "DecryptFailed"),
    );
    h.finish(vec![summary("k", "enabled", 2, 1, &[APP, APP2])]);
    only(&h.check(), "a");
    // ... and not when a min-decrypt-version above it may be in force.
    let mut h = clean_enabled();
    let d = 2; // the datakey of `clean`, version 1
    h.op(
        0,
        212,
        215,
        OpKind::SetMinDecrypt {
            key: "k".into(),
            version: 2,
        },
        ok(OkValue::default()),
    );
    h.op(
        0,
        220,
        230,
        OpKind::Unwrap {
            dek: d,
            key: "k".into(),
            context: Context::new(),
        },
        fail(400, "DecryptFailed"),
    );
    h.finish(vec![summary("k", "enabled", 2, 2, &[APP, APP2])]);
    let v = h.check();
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn check_b_fires_on_use_after_an_acknowledged_disable() {
    let mut h = clean();
    // Started 5 ms after the disable (acked at 90 ms) completed, single node: bound 0.
    h.datakey(95, 99, 2, b"dek-late-0123456789abcde");
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    only(&v, "b");
    assert!(v[0].message.contains("disabled"), "{v:#?}");

    // Within the bound of a shared store: allowed.
    let mut h = clean();
    h.h.nodes = 1;
    h.h.bound_us = 1_000_000;
    h.datakey(95, 99, 2, b"dek-late-0123456789abcde");
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    assert!(v.is_empty(), "{v:#?}");

    // An enable that may have come after the disable: allowed.
    let mut h = clean();
    h.op(
        0,
        85,
        200,
        OpKind::Enable { key: "k".into() },
        Outcome::Indeterminate {
            detail: "timeout".into(),
        },
    );
    h.datakey(150, 160, 2, b"dek-late-0123456789abcde");
    h.finish(vec![summary("k", "enabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn check_b_fires_on_use_after_a_grant_removal() {
    let mut h = H::new(1, 0);
    h.op(
        0,
        20,
        30,
        OpKind::SetGrants {
            key: "k".into(),
            grants: vec![APP.into()],
        },
        ok(OkValue::default()),
    );
    h.op_as(
        APP2,
        0,
        40,
        50,
        OpKind::Datakey {
            key: "k".into(),
            context: Context::new(),
        },
        ok(OkValue {
            version: Some(1),
            plaintext: Some(B64::of(b"0123456789abcdef0123456789abcdef")),
            wrapped: Some(B64::of(&[1; 40])),
            ..OkValue::default()
        }),
    );
    h.finish(vec![summary("k", "enabled", 1, 1, &[APP])]);
    let v = h.check();
    only(&v, "b");
    assert!(v[0].message.contains("grant"), "{v:#?}");
}

#[test]
fn check_b_fires_on_an_unwrap_of_a_retired_version() {
    let mut h = H::new(1, 0);
    let d = h.datakey(20, 30, 1, b"0123456789abcdef0123456789abcdef");
    h.op(
        0,
        40,
        50,
        OpKind::Rotate { key: "k".into() },
        ok(OkValue {
            version: Some(2),
            ..OkValue::default()
        }),
    );
    h.op(
        0,
        60,
        70,
        OpKind::SetMinDecrypt {
            key: "k".into(),
            version: 2,
        },
        ok(OkValue::default()),
    );
    h.op(
        0,
        80,
        90,
        OpKind::Unwrap {
            dek: d,
            key: "k".into(),
            context: Context::new(),
        },
        ok(OkValue {
            version: Some(1),
            plaintext: Some(B64::of(b"0123456789abcdef0123456789abcdef")),
            ..OkValue::default()
        }),
    );
    h.finish(vec![summary("k", "enabled", 2, 2, &[APP, APP2])]);
    let v = h.check();
    only(&v, "b");
    assert!(v[0].message.contains("retired"), "{v:#?}");
}

#[test]
fn check_b_fires_on_a_version_going_back_in_time() {
    let mut h = H::new(2, 1000);
    h.op(
        0,
        20,
        30,
        OpKind::Rotate { key: "k".into() },
        ok(OkValue {
            version: Some(2),
            ..OkValue::default()
        }),
    );
    // 2 s later node 1 still wraps under version 1.
    h.op(
        1,
        2030,
        2040,
        OpKind::Datakey {
            key: "k".into(),
            context: Context::new(),
        },
        ok(OkValue {
            version: Some(1),
            plaintext: Some(B64::of(b"0123456789abcdef0123456789abcdef")),
            wrapped: Some(B64::of(&[1; 40])),
            ..OkValue::default()
        }),
    );
    h.finish(vec![summary("k", "enabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    only(&v, "b");
    assert!(v[0].message.contains("version 2 was current"), "{v:#?}");
}

#[test]
fn check_c_fires_on_a_backup_that_does_not_restore() {
    let mut h = clean();
    let bad = serde_json::json!({
        "format": "keyhold-backup/1",
        "created_at": "2025-01-01T00:00:00Z",
        "sealed_master": {},
        "payload": "00",
    });
    h.op(
        0,
        120,
        130,
        OpKind::Backup,
        ok(OkValue {
            backup: Some(bad),
            ..OkValue::default()
        }),
    );
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    let v = check(&h.h, &crate::backups::Restorer);
    only(&v, "c");
    assert_eq!(v[0].op, Some(h.h.ops.len() as u64), "{v:#?}");
}

#[test]
fn check_d_fires_on_a_500_and_on_misplaced_503s() {
    let mut h = clean();
    h.op(
        0,
        120,
        130,
        OpKind::Rotate { key: "k".into() },
        fail(500, "Internal"),
    );
    h.op(0, 140, 150, OpKind::ListKeys, fail(503, "Sealed"));
    h.op(
        0,
        160,
        170,
        OpKind::ListKeys,
        fail(503, "StorageUnavailable"),
    );
    h.op(0, 180, 190, OpKind::ListKeys, fail(502, "Unknown"));
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    assert_eq!(v.iter().filter(|x| x.check == "d").count(), 4, "{v:#?}");
    // The 500 rotation is indeterminate: version 2 or 3 both fine for check f.
    assert!(v.iter().all(|x| x.check == "d"), "{v:#?}");

    // 503 Sealed between a seal and its unseal, StorageUnavailable during an outage: fine.
    let mut h = clean();
    h.op(0, 120, 130, OpKind::Seal, ok(OkValue::default()));
    h.op(0, 140, 150, OpKind::ListKeys, fail(503, "Sealed"));
    h.op(0, 160, 170, OpKind::Unseal, ok(OkValue::default()));
    h.h.faults.push(Fault {
        kind: FaultKind::PostgresOutage,
        node: None,
        start: 175_000,
        end: 180_000,
    });
    h.op(
        0,
        185,
        190,
        OpKind::ListKeys,
        fail(503, "StorageUnavailable"),
    );
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    let v = h.check();
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn check_e_fires_when_nodes_disagree() {
    let mut h = clean();
    h.h.nodes = 2;
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    if let Ok(keys) = &mut h.h.final_reads[1].result {
        keys[0].state = "enabled".into();
    }
    let v = h.check();
    only(&v, "e");
    assert!(v[0].message.contains("node 1"), "{v:#?}");
}

#[test]
fn check_f_fires_on_lost_updates() {
    // A disable acknowledged after the last enable, yet the key is enabled.
    let mut h = clean();
    h.finish(vec![summary("k", "enabled", 2, 1, &[APP, APP2])]);
    only(&h.check(), "f");
    // A lost rotation.
    let mut h = clean();
    h.finish(vec![summary("k", "disabled", 1, 1, &[APP, APP2])]);
    only(&h.check(), "f");
    // A lost grants change.
    let mut h = clean();
    h.op(
        0,
        120,
        130,
        OpKind::SetGrants {
            key: "k".into(),
            grants: vec![APP.into()],
        },
        ok(OkValue::default()),
    );
    h.finish(vec![summary("k", "disabled", 2, 1, &[APP, APP2])]);
    only(&h.check(), "f");
    // Two rotations acknowledged with one version.
    let mut h = clean();
    h.op(
        0,
        120,
        130,
        OpKind::Rotate { key: "k".into() },
        ok(OkValue {
            version: Some(2),
            ..OkValue::default()
        }),
    );
    h.finish(vec![summary("k", "disabled", 3, 1, &[APP, APP2])]);
    let v = h.check();
    only(&v, "f");
    assert!(v[0].message.contains("same version"), "{v:#?}");
    // Concurrent disable and enable: either state is fine.
    let mut h = clean();
    h.op(
        0,
        120,
        140,
        OpKind::Enable { key: "k".into() },
        ok(OkValue::default()),
    );
    h.op(
        0,
        125,
        135,
        OpKind::Disable { key: "k".into() },
        ok(OkValue::default()),
    );
    for state in ["enabled", "disabled"] {
        let mut h2 = H { h: h.h.clone() };
        h2.finish(vec![summary("k", state, 2, 1, &[APP, APP2])]);
        let v = h2.check();
        assert!(v.is_empty(), "{state}: {v:#?}");
    }
}
