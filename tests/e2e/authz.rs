//! The authorization matrix: three tenants × every role (two apps per tenant) × several
//! keys × every operation, each cell checked over real mTLS against an independent model
//! of the policy (roles, default-deny grants with a context constraint, key state,
//! tenancy). A denied cross-tenant request must also be indistinguishable from one naming
//! a key that does not exist.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer, IDENTITIES};
use serde_json::{json, Value};

use crate::{get, post, put};

const TENANTS: [char; 3] = ['a', 'b', 'c'];
/// Names an operation can target: in every tenant, in one tenant only, nowhere.
const NAMES: [&str; 7] = [
    "shared",
    "narrow",
    "off",
    "private-a",
    "private-b",
    "private-c",
    "missing",
];
const CONTEXTS: [&str; 2] = ["finance", "hr"];

#[derive(Clone, Copy, Debug)]
struct Who {
    stem: &'static str,
    /// `None` for the stranger (valid certificate, no mapping).
    tenant: Option<char>,
    role: &'static str,
}

fn everyone() -> Vec<Who> {
    let mut v: Vec<Who> = IDENTITIES
        .iter()
        .map(|(stem, _, _, role)| Who {
            stem,
            tenant: stem.chars().last(),
            role,
        })
        .collect();
    v.push(Who {
        stem: "stranger",
        tenant: None,
        role: "none",
    });
    v
}

fn ctx(name: &str) -> Value {
    json!({ "dept": name })
}

/// What the policy says: (status, error code or "ok").
type Expect = (u16, &'static str);

const DENIED: Expect = (403, "PermissionDenied");
const NOT_FOUND: Expect = (404, "NotFound");
const DECRYPT_FAILED: Expect = (400, "DecryptFailed");
const DISABLED: Expect = (409, "KeyDisabled");
const OK: Expect = (200, "ok");

fn exists(tenant: char, name: &str) -> bool {
    match name {
        "shared" | "narrow" | "off" => true,
        "missing" => false,
        private => private.ends_with(tenant),
    }
}

/// The grants each tenant's admin sets (see `setup`), as a predicate.
fn granted(who: &Who, key: &str, op: &str, context: &str) -> bool {
    let Some(t) = who.tenant else { return false };
    let app = who.stem == format!("app-{t}");
    let app2 = who.stem == format!("app2-{t}");
    match key {
        "narrow" => (app && op == "unwrap") || (app2 && op != "unwrap" && context == "finance"),
        _ => app,
    }
}

fn role_is(who: &Who, roles: &[&str]) -> bool {
    who.tenant.is_some() && roles.contains(&who.role)
}

/// datakey / wrap by name.
fn expect_named_use(who: &Who, op: &str, name: &str, context: &str) -> Expect {
    if !role_is(who, &["app"]) {
        return DENIED;
    }
    let t = who.tenant.unwrap_or('?');
    if !exists(t, name) {
        return NOT_FOUND;
    }
    if !granted(who, name, op, context) {
        return DENIED;
    }
    if name == "off" {
        return DISABLED;
    }
    OK
}

/// unwrap / rewrap of a DEK wrapped under `owner`'s `key` with the finance context.
fn expect_wrapped_use(
    who: &Who,
    op: &str,
    owner: Option<char>,
    key: &str,
    context: &str,
) -> Expect {
    if !role_is(who, &["app"]) {
        return DENIED;
    }
    if owner.is_none() || owner != who.tenant {
        return DECRYPT_FAILED;
    }
    if !granted(who, key, op, context) {
        return DENIED;
    }
    if key == "off" {
        return DISABLED;
    }
    if context != "finance" {
        return DECRYPT_FAILED;
    }
    OK
}

fn expect_manage(who: &Who, name: Option<&str>, roles: &[&str]) -> Expect {
    if !role_is(who, roles) {
        return DENIED;
    }
    match name {
        Some(n) if !exists(who.tenant.unwrap_or('?'), n) => NOT_FOUND,
        _ => OK,
    }
}

fn outcome(status: u16, body: &Value) -> (u16, String) {
    let code = body["error"]["code"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| "ok".into());
    // 201 Created counts as ok.
    (if status == 201 { 200 } else { status }, code)
}

struct Wrapped {
    owner: Option<char>,
    key: &'static str,
    b64: String,
}

/// Keys per tenant t (by admin-t): `shared` (app-t: everything), `narrow` (app-t: unwrap;
/// app2-t: datakey, wrap, rewrap when context dept=finance), `off` (app-t: everything,
/// then disabled), `private-t`. One DEK wrapped under each with dept=finance.
async fn setup(s: &TestServer) -> Vec<Wrapped> {
    let all_ops = json!(["datakey", "wrap", "unwrap", "rewrap"]);
    let mut wrapped = Vec::new();
    for t in TENANTS {
        let admin = s.client(Some(&format!("admin-{t}")));
        let app_id = IDENTITIES
            .iter()
            .find(|i| i.0 == format!("app-{t}"))
            .unwrap()
            .1;
        let app2_id = IDENTITIES
            .iter()
            .find(|i| i.0 == format!("app2-{t}"))
            .unwrap()
            .1;
        let private: &'static str = match t {
            'a' => "private-a",
            'b' => "private-b",
            _ => "private-c",
        };
        for key in ["shared", "off", private] {
            let r = post(
                &admin,
                &s.url("/v1/keys"),
                json!({"name": key, "grants": [{"identity": app_id, "operations": all_ops}]}),
            )
            .await;
            assert_eq!(r.0, 201, "{r:?}");
        }
        let r = post(&admin, &s.url("/v1/keys"), json!({"name": "narrow"})).await;
        assert_eq!(r.0, 201, "{r:?}");
        let r = put(
            &admin,
            &s.url("/v1/keys/narrow/grants"),
            json!({"grants": [
                {"identity": app_id, "operations": ["unwrap"]},
                {"identity": app2_id, "operations": ["datakey", "wrap", "rewrap"],
                 "constraints": {"context_subset": {"dept": "finance"}}},
            ]}),
        )
        .await;
        assert_eq!(r.0, 200, "{r:?}");
        let app = s.client(Some(&format!("app-{t}")));
        let app2 = s.client(Some(&format!("app2-{t}")));
        for key in ["shared", "narrow", "off", private] {
            let who = if key == "narrow" { &app2 } else { &app };
            let r = post(
                who,
                &s.url(&format!("/v1/keys/{key}/datakey")),
                json!({"context": ctx("finance")}),
            )
            .await;
            assert_eq!(r.0, 200, "{key}: {r:?}");
            wrapped.push(Wrapped {
                owner: Some(t),
                key,
                b64: r.1["wrapped"].as_str().unwrap().to_owned(),
            });
        }
        let r = post(&admin, &s.url("/v1/keys/off/disable"), json!({})).await;
        assert_eq!(r.0, 200, "{r:?}");
    }
    // A well-formed wrapped DEK naming a key id that exists nowhere.
    let mut raw = B64.decode(&wrapped[0].b64).unwrap();
    for b in &mut raw[4..20] {
        *b ^= 0x5a;
    }
    wrapped.push(Wrapped {
        owner: None,
        key: "missing",
        b64: B64.encode(raw),
    });
    wrapped
}

/// One checked cell.
struct Cell {
    who: &'static str,
    what: String,
    expected: Expect,
    actual: (u16, String),
    body: Value,
}

async fn run_caller(s: &TestServer, who: Who, wrapped: &[Wrapped]) -> Vec<Cell> {
    let c = s.client(Some(who.stem));
    let mut cells = Vec::new();
    let mut check = |what: String, expected: Expect, (status, body): (u16, Value)| {
        cells.push(Cell {
            who: who.stem,
            what,
            expected,
            actual: outcome(status, &body),
            body,
        });
    };
    // Management and reads.
    check(
        "list keys".into(),
        expect_manage(&who, None, &["admin", "auditor"]),
        get(&c, &s.url("/v1/keys")).await,
    );
    check(
        "create".into(),
        expect_manage(&who, None, &["admin"]),
        post(
            &c,
            &s.url("/v1/keys"),
            json!({"name": format!("new-{}", who.stem)}),
        )
        .await,
    );
    for name in NAMES {
        check(
            format!("get {name}"),
            expect_manage(&who, Some(name), &["admin", "auditor"]),
            get(&c, &s.url(&format!("/v1/keys/{name}"))).await,
        );
        check(
            format!("rotate {name}"),
            expect_manage(&who, Some(name), &["admin"]),
            post(&c, &s.url(&format!("/v1/keys/{name}/rotate")), json!({})).await,
        );
        check(
            format!("min-decrypt-version {name}"),
            expect_manage(&who, Some(name), &["admin"]),
            put(
                &c,
                &s.url(&format!("/v1/keys/{name}/min-decrypt-version")),
                json!({"version": 1}),
            )
            .await,
        );
    }
    check(
        "audit".into(),
        expect_manage(&who, None, &["auditor"]),
        get(&c, &s.url("/v1/audit?limit=1")).await,
    );
    // The service (issue 22): the sys role, and only it, seals, unseals, exports backups
    // and rotates the master key; tenant admins and sys read the status and lockouts (an
    // admin its tenant's); no one gives the sys role at run time; an admin lifts only
    // its own tenant's lockouts.
    check(
        "sys status".into(),
        expect_manage(&who, None, &["admin", "sys"]),
        get(&c, &s.url("/v1/sys/status")).await,
    );
    check(
        "lockouts".into(),
        expect_manage(&who, None, &["admin", "sys"]),
        get(&c, &s.url("/v1/sys/lockouts")).await,
    );
    check(
        "unseal (already unsealed)".into(),
        expect_manage(&who, None, &["sys"]),
        post(&c, &s.url("/v1/sys/unseal"), json!({})).await,
    );
    check(
        "backup".into(),
        expect_manage(&who, None, &["sys"]),
        get(&c, &s.url("/v1/sys/backup")).await,
    );
    check(
        "rotate-master".into(),
        expect_manage(&who, None, &["sys"]),
        post(&c, &s.url("/v1/sys/rotate-master"), json!({})).await,
    );
    check(
        "give the sys role".into(),
        DENIED,
        put(
            &c,
            &s.url("/v1/sys/identities"),
            json!({"identity": format!("spiffe://test/new-sys-{}", who.stem), "role": "sys"}),
        )
        .await,
    );
    for t in TENANTS {
        let expected =
            if role_is(&who, &["sys"]) || (role_is(&who, &["admin"]) && who.tenant == Some(t)) {
                OK
            } else {
                DENIED
            };
        check(
            format!("lift the lockout of app-{t}"),
            expected,
            post(
                &c,
                &s.url("/v1/sys/lockouts/lift"),
                json!({"identity": IDENTITIES.iter().find(|i| i.0 == format!("app-{t}")).map(|i| i.1)}),
            )
            .await,
        );
    }
    // Key use.
    let dek = B64.encode([7u8; 32]);
    for context in CONTEXTS {
        for name in NAMES {
            check(
                format!("datakey {name} {context}"),
                expect_named_use(&who, "datakey", name, context),
                post(
                    &c,
                    &s.url(&format!("/v1/keys/{name}/datakey")),
                    json!({"context": ctx(context)}),
                )
                .await,
            );
            check(
                format!("wrap {name} {context}"),
                expect_named_use(&who, "wrap", name, context),
                post(
                    &c,
                    &s.url(&format!("/v1/keys/{name}/wrap")),
                    json!({"plaintext": dek, "context": ctx(context)}),
                )
                .await,
            );
        }
        for w in wrapped {
            let owner = w.owner.map_or("nowhere".to_string(), |o| o.to_string());
            for op in ["unwrap", "rewrap"] {
                check(
                    format!("{op} {}@{owner} {context}", w.key),
                    expect_wrapped_use(&who, op, w.owner, w.key, context),
                    post(
                        &c,
                        &s.url(&format!("/v1/{op}")),
                        json!({"wrapped": w.b64, "context": ctx(context)}),
                    )
                    .await,
                );
            }
            // The same unwrap as a batch item: the per-item result follows the same policy;
            // only a caller without the app role is refused for the whole batch.
            let expected = expect_wrapped_use(&who, "unwrap", w.owner, w.key, context);
            let (status, body) = post(
                &c,
                &s.url("/v1/batch"),
                json!({"items": [{"op": "unwrap", "wrapped": w.b64, "context": ctx(context)}]}),
            )
            .await;
            let (status, item) = if status == 200 {
                let item = body["results"][0].clone();
                let st = if item.get("error").is_some() {
                    expected.0
                } else {
                    200
                };
                (st, item)
            } else {
                (status, body)
            };
            check(
                format!("batch unwrap {}@{owner} {context}", w.key),
                expected,
                (status, item),
            );
        }
    }
    cells
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_of_the_authorization_matrix_matches_the_policy() {
    // Most cells are denials on purpose: keep the lockout out of the way (tested on its own).
    let s = TestServer::start_with(TestSeal::KeyFile, "[lockout]\nthreshold = 1000\n").await;
    let wrapped = setup(&s).await;
    let mut cells = Vec::new();
    for who in everyone() {
        cells.extend(run_caller(&s, who, &wrapped).await);
    }
    let wrong: Vec<String> = cells
        .iter()
        .filter(|c| (c.expected.0, c.expected.1.to_string()) != c.actual)
        .map(|c| {
            format!(
                "{} {}: expected {:?}, got {:?} {}",
                c.who, c.what, c.expected, c.actual, c.body
            )
        })
        .collect();
    let allows = cells.iter().filter(|c| c.expected == OK).count();
    assert!(
        wrong.is_empty(),
        "{} of {} cells disagree with the policy:\n{}",
        wrong.len(),
        cells.len(),
        wrong.join("\n")
    );
    assert!(cells.len() > 1500, "only {} cells", cells.len());
    assert!(allows > 100 && allows < cells.len() / 2, "{allows} allows");
    eprintln!(
        "authorization matrix: {} cells, {allows} allowed, all as the policy says",
        cells.len()
    );

    // Cross-tenant is indistinguishable from missing: the same status, code and message.
    for who in everyone() {
        let mine = |what: &str| {
            cells
                .iter()
                .find(|c| c.who == who.stem && c.what == what)
                .unwrap()
        };
        for context in CONTEXTS {
            for op in ["get", "rotate", "datakey", "wrap"] {
                let suffix = if matches!(op, "datakey" | "wrap") {
                    format!(" {context}")
                } else {
                    String::new()
                };
                let missing = mine(&format!("{op} missing{suffix}"));
                for t in TENANTS {
                    if Some(t) == who.tenant {
                        continue;
                    }
                    let foreign = mine(&format!("{op} private-{t}{suffix}"));
                    assert_eq!(
                        foreign.body, missing.body,
                        "{} {op} private-{t}: a foreign key differs from a missing one",
                        who.stem
                    );
                }
            }
            for op in ["unwrap", "rewrap", "batch unwrap"] {
                let missing = mine(&format!("{op} missing@nowhere {context}"));
                for w in wrapped
                    .iter()
                    .filter(|w| w.owner.is_some() && w.owner != who.tenant)
                {
                    let owner = w.owner.unwrap_or('?');
                    let foreign = mine(&format!("{op} {}@{owner} {context}", w.key));
                    assert_eq!(
                        foreign.body, missing.body,
                        "{} {op} {}@{owner}: a foreign wrapped DEK differs from a missing key's",
                        who.stem, w.key
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_map_identities_at_run_time_within_their_tenant() {
    use keyhold_tests::{ADMIN_A, APP_A};
    use kms_client::api::{ErrorCode, Role};

    let mut s = TestServer::start().await;
    let newcomer = "spiffe://test/acme/newcomer";
    s.pki.issue("newcomer", newcomer);
    let admin_a = s.kms_client("admin-a");
    let admin_b = s.kms_client("admin-b");
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "k", "grants": [{"identity": newcomer, "operations": ["datakey"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    let datakey = s.url("/v1/keys/k/datakey");
    // Unknown identity: nothing.
    let r = post(&s.client(Some("newcomer")), &datakey, json!({})).await;
    assert_eq!(r.0, 403, "{r:?}");
    // admin-a maps it as an app of acme; it works at once, with no restart.
    let list = admin_a.set_identity(newcomer, Role::App).await.unwrap();
    let entry = list
        .identities
        .iter()
        .find(|i| i.identity == newcomer)
        .unwrap();
    assert_eq!((entry.role, entry.source.as_str()), (Role::App, "runtime"));
    assert!(list
        .identities
        .iter()
        .any(|i| i.identity == APP_A && i.source == "config"));
    assert_eq!(
        post(&s.client(Some("newcomer")), &datakey, json!({}))
            .await
            .0,
        200
    );
    // globex's admin neither sees it nor can take it over or remove it.
    let b_list = admin_b.identities().await.unwrap();
    assert!(b_list.identities.iter().all(|i| i.identity != newcomer));
    let e = admin_b
        .set_identity(newcomer, Role::Admin)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidState), "{e}");
    let e = admin_b.remove_identity(newcomer).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    // Configuration-file identities are changed in the file only; nobody removes itself.
    let e = admin_a.set_identity(APP_A, Role::Admin).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidState), "{e}");
    let e = admin_a.remove_identity(APP_A).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidState), "{e}");
    let e = admin_a.remove_identity(ADMIN_A).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidState), "{e}");
    // Apps cannot change the policy.
    let e = s
        .kms_client("app-a")
        .set_identity("spiffe://x", Role::Admin)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    // The mapping is in the store: it survives a restart.
    s.restart().await;
    let datakey = s.url("/v1/keys/k/datakey");
    assert_eq!(
        post(&s.client(Some("newcomer")), &datakey, json!({}))
            .await
            .0,
        200
    );
    // Removed: denied again, and after a restart too.
    let admin_a = s.kms_client("admin-a");
    let list = admin_a.remove_identity(newcomer).await.unwrap();
    assert!(list.identities.iter().all(|i| i.identity != newcomer));
    assert_eq!(
        post(&s.client(Some("newcomer")), &datakey, json!({}))
            .await
            .0,
        403
    );
    s.restart().await;
    let datakey = s.url("/v1/keys/k/datakey");
    assert_eq!(
        post(&s.client(Some("newcomer")), &datakey, json!({}))
            .await
            .0,
        403
    );
}
