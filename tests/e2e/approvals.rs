//! Dual control (issue 28, `docs/approvals.md`) through the real server: operations a
//! tenant's approval policy holds wait for other admins' approvals, run once, as they
//! were described, by their requester; a self-approval is refused; an expired or denied
//! request does nothing; requests survive a restart and work across the nodes of a
//! shared store.

use std::sync::Arc;
use std::time::Duration;

use keyhold_tests::{TestServer, ADMIN_A};
use kms_client::api::{
    ApprovalPending, ApprovalPolicy, ApprovalScope, ApprovalStatus, ErrorCode, Gate,
    GrantOperation, KeyState, Role,
};
use kms_client::{Client, Error};

const ADMIN2: &str = "spiffe://test/acme/admin2";
const ADMIN3: &str = "spiffe://test/acme/admin3";

/// Two more admins of tenant acme (certificates issued by the test CA, mapped as runtime
/// identities by admin-a).
async fn more_admins(s: &TestServer) -> (Client, Client, Client) {
    s.pki.issue("admin2-a", ADMIN2);
    s.pki.issue("admin3-a", ADMIN3);
    let a = s.kms_client("admin-a");
    a.set_identity(ADMIN2, Role::Admin).await.unwrap();
    a.set_identity(ADMIN3, Role::Admin).await.unwrap();
    (a, s.kms_client("admin2-a"), s.kms_client("admin3-a"))
}

fn destroy_policy(approvers: u32, window_secs: u64) -> ApprovalPolicy {
    ApprovalPolicy {
        operations: vec![Gate::Destroy],
        approvers,
        window_secs,
    }
}

fn pending(e: Error) -> Box<ApprovalPending> {
    match e {
        Error::ApprovalPending(p) => p,
        other => panic!("expected a request for approval, got {other:?}"),
    }
}

fn refused(r: Result<impl std::fmt::Debug, Error>, code: ErrorCode, status: u16) {
    match r {
        Err(Error::Api {
            code: c, status: s, ..
        }) if c == code && s == status => {}
        other => panic!("expected {code:?} ({status}), got {other:?}"),
    }
}

async fn make_key(a: &Client, name: &str) {
    a.create_key(&keyhold_tests::create_granted(name, keyhold_tests::APP_A))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_needs_two_approvers_and_runs_once() {
    let s = TestServer::start().await;
    let (a, b, c) = more_admins(&s).await;
    make_key(&a, "ledger").await;
    a.set_approval_policy(ApprovalScope::Tenant, Some(destroy_policy(2, 3600)))
        .await
        .unwrap();

    // Asked: nothing happens but a request.
    let req = pending(a.schedule_deletion("ledger", 7).await.unwrap_err()).approval;
    assert_eq!(req.status, ApprovalStatus::Pending);
    assert_eq!(req.requested_by, ADMIN_A);
    assert_eq!(req.action.path, "/v1/keys/ledger/schedule-deletion");
    assert_eq!(a.get_key("ledger").await.unwrap().state, KeyState::Enabled);

    // The requester cannot approve it; an admin of another tenant does not see it.
    refused(
        a.decide_approval(&req.id, true, None).await,
        ErrorCode::PermissionDenied,
        403,
    );
    refused(
        s.kms_client("admin-b").approval(&req.id).await,
        ErrorCode::NotFound,
        404,
    );
    assert!(s
        .kms_client("admin-b")
        .approvals()
        .await
        .unwrap()
        .approvals
        .is_empty());
    // One approval is not enough; the same approver twice counts once.
    let one = b.decide_approval(&req.id, true, None).await.unwrap();
    assert_eq!(
        (one.approvals.len(), one.status),
        (1, ApprovalStatus::Pending)
    );
    refused(
        b.decide_approval(&req.id, true, None).await,
        ErrorCode::InvalidState,
        409,
    );
    let early = a.with_approval(&req.id);
    refused(
        early.schedule_deletion("ledger", 7).await,
        ErrorCode::InvalidState,
        409,
    );
    assert_eq!(a.get_key("ledger").await.unwrap().state, KeyState::Enabled);
    let two = c
        .decide_approval(&req.id, true, Some("checked with the data owner"))
        .await
        .unwrap();
    assert_eq!(two.status, ApprovalStatus::Approved);

    // Only as described, only by the requester.
    refused(
        b.with_approval(&req.id)
            .schedule_deletion("ledger", 7)
            .await,
        ErrorCode::PermissionDenied,
        403,
    );
    refused(
        a.with_approval(&req.id)
            .schedule_deletion("ledger", 30)
            .await,
        ErrorCode::InvalidRequest,
        400,
    );
    make_key(&a, "other").await;
    refused(
        a.with_approval(&req.id).schedule_deletion("other", 7).await,
        ErrorCode::InvalidRequest,
        400,
    );
    assert_eq!(a.get_key("other").await.unwrap().state, KeyState::Enabled);

    // Two runs at once: exactly one runs it.
    let run = a.with_approval(&req.id);
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let run = run.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                run.schedule_deletion("ledger", 7).await
            })
        })
        .collect();
    let mut ran = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(info) => {
                assert_eq!(info.state, KeyState::PendingDeletion);
                ran += 1;
            }
            Err(Error::Api {
                code: ErrorCode::InvalidState,
                ..
            }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ran, 1, "an approved request runs exactly once");
    let done = a.approval(&req.id).await.unwrap();
    assert_eq!(done.status, ApprovalStatus::Executed);
    assert_eq!(done.outcome.as_deref(), Some("ok"));
    // Later: still once.
    a.cancel_deletion("ledger").await.unwrap();
    refused(
        a.with_approval(&req.id)
            .schedule_deletion("ledger", 7)
            .await,
        ErrorCode::InvalidState,
        409,
    );
    assert_eq!(a.get_key("ledger").await.unwrap().state, KeyState::Disabled);

    // The trail: the request, both approvals, the run, each naming the request.
    let page = s.kms_client("auditor-a").audit_page(0, 1000).await.unwrap();
    let with_id: Vec<_> = page
        .records
        .iter()
        .filter(|r| {
            r.attributes
                .as_ref()
                .and_then(|a| a.get("approval"))
                .is_some_and(|id| id == &req.id)
        })
        .map(|r| {
            let status = r
                .attributes
                .as_ref()
                .unwrap()
                .get("approval_status")
                .cloned();
            (
                r.identity.clone().unwrap_or_default(),
                r.outcome.clone(),
                status,
            )
        })
        .collect();
    let ok = |who: &str, status: &str| {
        with_id.contains(&(who.to_owned(), "ok".to_owned(), Some(status.to_owned())))
    };
    assert!(ok(ADMIN_A, "requested"), "{with_id:?}");
    assert!(ok(ADMIN2, "approved"), "{with_id:?}");
    assert!(ok(ADMIN3, "approved"), "{with_id:?}");
    assert!(ok(ADMIN_A, "executed"), "{with_id:?}");
    assert_eq!(
        with_id
            .iter()
            .filter(|r| r.2.as_deref() == Some("executed"))
            .count(),
        1,
        "{with_id:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_denied_request_does_nothing() {
    let s = TestServer::start().await;
    let (a, b, c) = more_admins(&s).await;
    make_key(&a, "k").await;
    a.set_approval_policy(ApprovalScope::Tenant, Some(destroy_policy(1, 60)))
        .await
        .unwrap();
    let req = pending(a.schedule_deletion("k", 7).await.unwrap_err()).approval;
    b.decide_approval(&req.id, true, None).await.unwrap();
    s.advance_clock(Duration::from_secs(61));
    assert_eq!(
        a.approval(&req.id).await.unwrap().status,
        ApprovalStatus::Expired
    );
    refused(
        a.with_approval(&req.id).schedule_deletion("k", 7).await,
        ErrorCode::InvalidState,
        409,
    );
    refused(
        c.decide_approval(&req.id, true, None).await,
        ErrorCode::InvalidState,
        409,
    );
    assert_eq!(a.get_key("k").await.unwrap().state, KeyState::Enabled);

    // Denied: by any other admin, even once approved; never runs.
    let req = pending(a.schedule_deletion("k", 7).await.unwrap_err()).approval;
    b.decide_approval(&req.id, true, None).await.unwrap();
    let denied = c
        .decide_approval(&req.id, false, Some("not this key"))
        .await
        .unwrap();
    assert_eq!(denied.status, ApprovalStatus::Denied);
    assert_eq!(
        denied.denial.as_ref().and_then(|d| d.reason.as_deref()),
        Some("not this key")
    );
    refused(
        a.with_approval(&req.id).schedule_deletion("k", 7).await,
        ErrorCode::InvalidState,
        409,
    );
    assert_eq!(a.get_key("k").await.unwrap().state, KeyState::Enabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_held_operations_wait_too() {
    let s = TestServer::start().await;
    let (a, b, _) = more_admins(&s).await;
    make_key(&a, "k").await;
    a.rotate_key("k").await.unwrap();
    a.set_approval_policy(
        ApprovalScope::Tenant,
        Some(ApprovalPolicy {
            operations: vec![
                Gate::MinDecryptVersion,
                Gate::Grant,
                Gate::Identity,
                Gate::Policy,
            ],
            approvers: 1,
            window_secs: 3600,
        }),
    )
    .await
    .unwrap();

    // Raising min-decrypt-version waits; lowering it (or keeping it) does not.
    let req = pending(a.set_min_decrypt_version("k", 2).await.unwrap_err()).approval;
    assert_eq!(a.get_key("k").await.unwrap().min_decrypt_version, 1);
    a.set_min_decrypt_version("k", 1).await.unwrap();
    b.decide_approval(&req.id, true, None).await.unwrap();
    let info = a
        .with_approval(&req.id)
        .set_min_decrypt_version("k", 2)
        .await
        .unwrap();
    assert_eq!(info.min_decrypt_version, 2);
    // The Transit API cannot wait for approvals: raising it there is refused.
    a.rotate_key("k").await.unwrap();
    let (status, body) = crate::post(
        &s.client(Some("admin-a")),
        &s.url("/v1/transit/keys/k/config"),
        serde_json::json!({"min_decryption_version": 3}),
    )
    .await;
    // Vault answers 400 for an invalid request; the message says why.
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("dual-control"), "{body}");
    assert_eq!(a.get_key("k").await.unwrap().min_decrypt_version, 2);

    // A grant to a new identity waits (also at creation); changing the grant of an
    // identity the key already names does not.
    let new =
        kms_client::api::Grant::new(keyhold_tests::app_of("admin-a"), &[GrantOperation::Unwrap]);
    let app2 = kms_client::api::Grant::new("spiffe://test/acme/app2", &[GrantOperation::Unwrap]);
    let req = pending(
        a.edit_grants("k", vec![app2.clone()], Vec::new())
            .await
            .unwrap_err(),
    )
    .approval;
    assert!(!a
        .get_key("k")
        .await
        .unwrap()
        .grants
        .iter()
        .any(|g| g.identity == app2.identity));
    a.edit_grants("k", vec![new], Vec::new()).await.unwrap();
    b.decide_approval(&req.id, true, None).await.unwrap();
    let info = a
        .with_approval(&req.id)
        .edit_grants("k", vec![app2.clone()], Vec::new())
        .await
        .unwrap();
    assert!(info.grants.iter().any(|g| g.identity == app2.identity));
    pending(
        a.create_key(&keyhold_tests::create_granted(
            "granted",
            keyhold_tests::APP_A,
        ))
        .await
        .unwrap_err(),
    );
    refused(a.get_key("granted").await, ErrorCode::NotFound, 404);

    // A new admin would be a new approver: waits. Another role does not.
    let req = pending(
        a.set_identity("spiffe://test/acme/admin4", Role::Admin)
            .await
            .unwrap_err(),
    )
    .approval;
    let listed = a.identities().await.unwrap();
    assert!(!format!("{listed:?}").contains("admin4"), "{listed:?}");
    a.set_identity("spiffe://test/acme/app9", Role::App)
        .await
        .unwrap();
    b.decide_approval(&req.id, true, None).await.unwrap();
    let listed = a
        .with_approval(&req.id)
        .set_identity("spiffe://test/acme/admin4", Role::Admin)
        .await
        .unwrap();
    assert!(format!("{listed:?}").contains("admin4"), "{listed:?}");

    // The policy holds itself: removing it waits as well.
    let req = pending(
        a.set_approval_policy(ApprovalScope::Tenant, None)
            .await
            .unwrap_err(),
    )
    .approval;
    assert!(a.approval_policies().await.unwrap().tenant.is_some());
    b.decide_approval(&req.id, true, None).await.unwrap();
    let after = a
        .with_approval(&req.id)
        .set_approval_policy(ApprovalScope::Tenant, None)
        .await
        .unwrap();
    assert!(after.tenant.is_none());
    // Nothing waits any more.
    assert_eq!(
        a.set_min_decrypt_version("k", 3)
            .await
            .unwrap()
            .min_decrypt_version,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_operations_wait_for_another_sys_operator() {
    const SYS2: &str = "spiffe://test/ops/sys2";
    let extra =
        format!("[[identities]]\nidentity = \"{SYS2}\"\ntenant = \"ops\"\nrole = \"sys\"\n");
    let s = TestServer::start_with(keyhold_tests::TestSeal::KeyFile, &extra).await;
    s.pki.issue("sys2", SYS2);
    let (sys, sys2) = (s.kms_client("sys"), s.kms_client("sys2"));
    // A tenant admin cannot set the service's policy.
    refused(
        s.kms_client("admin-a")
            .set_approval_policy(ApprovalScope::Service, Some(destroy_policy(1, 600)))
            .await,
        ErrorCode::PermissionDenied,
        403,
    );
    sys.set_approval_policy(
        ApprovalScope::Service,
        Some(ApprovalPolicy {
            operations: vec![Gate::BackupExport, Gate::RotateMaster],
            approvers: 1,
            window_secs: 600,
        }),
    )
    .await
    .unwrap();
    let req = pending(sys.backup().await.unwrap_err()).approval;
    // Tenant admins neither see nor decide the service's requests.
    refused(
        s.kms_client("admin-a")
            .decide_approval(&req.id, true, None)
            .await,
        ErrorCode::NotFound,
        404,
    );
    sys2.decide_approval(&req.id, true, None).await.unwrap();
    let backup = sys.with_approval(&req.id).backup().await.unwrap();
    assert!(backup.is_object(), "{backup:?}");
    let req = pending(sys.rotate_master(None).await.unwrap_err()).approval;
    sys2.decide_approval(&req.id, true, None).await.unwrap();
    sys.with_approval(&req.id)
        .rotate_master(None)
        .await
        .unwrap();
    assert_eq!(
        sys.approval(&req.id).await.unwrap().status,
        ApprovalStatus::Executed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_survive_a_restart() {
    let mut s = TestServer::start().await;
    let (a, b, _) = more_admins(&s).await;
    make_key(&a, "k").await;
    a.set_approval_policy(ApprovalScope::Tenant, Some(destroy_policy(2, 3600)))
        .await
        .unwrap();
    let req = pending(a.schedule_deletion("k", 7).await.unwrap_err()).approval;
    b.decide_approval(&req.id, true, None).await.unwrap();
    s.restart().await;
    s.wait_ready().await;
    let (a, b, c) = (
        s.kms_client("admin-a"),
        s.kms_client("admin2-a"),
        s.kms_client("admin3-a"),
    );
    let kept = a.approval(&req.id).await.unwrap();
    assert_eq!(kept.approvals.len(), 1);
    assert_eq!(kept.approvals[0].identity, ADMIN2);
    refused(
        b.decide_approval(&req.id, true, None).await,
        ErrorCode::InvalidState,
        409,
    );
    assert!(a.approval_policies().await.unwrap().tenant.is_some());
    c.decide_approval(&req.id, true, None).await.unwrap();
    let info = a
        .with_approval(&req.id)
        .schedule_deletion("k", 7)
        .await
        .unwrap();
    assert_eq!(info.state, KeyState::PendingDeletion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_work_across_the_nodes_of_a_shared_store() {
    if !keyhold_tests::pg::available("approvals_work_across_the_nodes_of_a_shared_store") {
        return;
    }
    let one = TestServer::start_on_postgres().await;
    one.wait_ready().await;
    let (a, b, _) = more_admins(&one).await;
    let two = one.another_node().await;
    make_key(&a, "k").await;
    a.set_approval_policy(ApprovalScope::Tenant, Some(destroy_policy(2, 3600)))
        .await
        .unwrap();
    // Asked on one node, approved on both, run on the other.
    let req = pending(a.schedule_deletion("k", 7).await.unwrap_err()).approval;
    b.decide_approval(&req.id, true, None).await.unwrap();
    let c2 = two.kms_client("admin3-a");
    c2.decide_approval(&req.id, true, None).await.unwrap();
    // Run on both nodes at once: exactly one runs it.
    let runs = [
        one.kms_client("admin-a").with_approval(&req.id),
        two.kms_client("admin-a").with_approval(&req.id),
    ];
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let tasks: Vec<_> = runs
        .into_iter()
        .map(|run| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                run.schedule_deletion("k", 7).await
            })
        })
        .collect();
    let mut ran = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ran += 1,
            Err(Error::Api {
                code: ErrorCode::InvalidState,
                ..
            }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ran, 1);
    assert_eq!(
        two.kms_client("admin-a").get_key("k").await.unwrap().state,
        KeyState::PendingDeletion
    );
}
