//! Key management and roles.

use keyhold_tests::{TestSeal, TestServer, APP_A};
use serde_json::json;

use crate::{assert_error, create_key, get, post, put};

#[tokio::test]
async fn admin_manages_keys_and_roles_are_enforced() {
    // This test collects many denials on purpose; lockout is tested on its own below.
    let s = TestServer::start_with(TestSeal::KeyFile, "[lockout]\nthreshold = 100\n").await;
    let admin = s.client(Some("admin-a"));
    let app = s.client(Some("app-a"));
    let auditor = s.client(Some("auditor-a"));
    let stranger = s.client(Some("stranger"));

    let (st, info) = post(
        &admin,
        &s.url("/v1/keys"),
        json!({"name": "k", "rotation_period": "90d"}),
    )
    .await;
    assert_eq!(st, 201, "{info}");
    assert_eq!(info["state"], "enabled");
    assert_eq!(info["algorithm"], "aes-256-gcm");
    assert_eq!(info["current_version"], 1);
    assert_eq!(info["rotation_period"], "90d", "{info}");
    assert_eq!(info["id"].as_str().unwrap().len(), 32);
    assert!(info.to_string().find("material").is_none());

    let r = post(&admin, &s.url("/v1/keys"), json!({"name": "k"})).await;
    assert_error(&r, 409, "AlreadyExists");

    // App cannot create, rotate, disable, list.
    assert_error(
        &post(&app, &s.url("/v1/keys"), json!({"name": "x"})).await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &post(&app, &s.url("/v1/keys/k/rotate"), json!({})).await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &post(&app, &s.url("/v1/keys/k/disable"), json!({})).await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &get(&app, &s.url("/v1/keys")).await,
        403,
        "PermissionDenied",
    );
    // Admin cannot use keys.
    assert_error(
        &post(&admin, &s.url("/v1/keys/k/datakey"), json!({})).await,
        403,
        "PermissionDenied",
    );
    // Grants are default deny: k has none yet, so the app cannot use it either.
    assert_error(
        &post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await,
        403,
        "PermissionDenied",
    );
    let (st, info) = put(
        &admin,
        &s.url("/v1/keys/k/grants"),
        json!({"grants": [{"identity": APP_A, "operations": ["datakey", "unwrap"]}]}),
    )
    .await;
    assert_eq!(st, 200, "{info}");
    assert_eq!(info["grants"][0]["identity"], APP_A);
    let (st, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_eq!(st, 200, "{dk}");
    assert_error(
        &post(
            &admin,
            &s.url("/v1/unwrap"),
            json!({"wrapped": dk["wrapped"]}),
        )
        .await,
        403,
        "PermissionDenied",
    );
    // Auditor reads, cannot manage or use.
    let (st, list) = get(&auditor, &s.url("/v1/keys")).await;
    assert_eq!(st, 200);
    assert_eq!(list["keys"][0]["name"], "k");
    assert_error(
        &post(&auditor, &s.url("/v1/keys"), json!({"name": "y"})).await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &post(
            &auditor,
            &s.url("/v1/unwrap"),
            json!({"wrapped": dk["wrapped"]}),
        )
        .await,
        403,
        "PermissionDenied",
    );
    // A certificate from the right CA with no mapping can do nothing.
    assert_error(
        &get(&stranger, &s.url("/v1/keys")).await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &post(
            &stranger,
            &s.url("/v1/unwrap"),
            json!({"wrapped": dk["wrapped"]}),
        )
        .await,
        403,
        "PermissionDenied",
    );
    // Nothing changed by the refused calls.
    let (_, after) = get(&admin, &s.url("/v1/keys")).await;
    assert_eq!(after["keys"].as_array().unwrap().len(), 1);
    assert_eq!(after["keys"][0]["current_version"], 1);
}

#[tokio::test]
async fn get_list_and_idempotent_state_changes() {
    let s = TestServer::start().await;
    for n in ["b-key", "a-key"] {
        create_key(&s, "admin-a", n).await;
    }
    let admin = s.client(Some("admin-a"));
    let (_, list) = get(&admin, &s.url("/v1/keys")).await;
    let names: Vec<_> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a-key", "b-key"]);
    let (st, k) = get(&admin, &s.url("/v1/keys/a-key")).await;
    assert_eq!(st, 200);
    assert_eq!(k["name"], "a-key");
    for _ in 0..2 {
        let (st, k) = post(&admin, &s.url("/v1/keys/a-key/disable"), json!({})).await;
        assert_eq!((st, k["state"].clone()), (200, json!("disabled")));
    }
    assert_error(&get(&admin, &s.url("/v1/keys/nope")).await, 404, "NotFound");
    assert_error(
        &post(&admin, &s.url("/v1/keys/nope/rotate"), json!({})).await,
        404,
        "NotFound",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_denials_lock_an_identity_out_until_an_admin_lifts_it() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let (st, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_eq!(st, 200);
    // Four denials: still in.
    for _ in 0..4 {
        assert_error(
            &get(&app, &s.url("/v1/keys")).await,
            403,
            "PermissionDenied",
        );
    }
    let (st, _) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_eq!(st, 200);
    // The fifth locks it out: now even allowed requests get 429.
    assert_error(
        &get(&app, &s.url("/v1/keys")).await,
        403,
        "PermissionDenied",
    );
    let r = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_error(&r, 429, "LockedOut");
    // Others are unaffected.
    let (st, _) = post(
        &s.client(Some("app-b")),
        &s.url("/v1/keys/k/datakey"),
        json!({}),
    )
    .await;
    assert_eq!(st, 404);
    // The admin sees and lifts it.
    let admin = s.client(Some("admin-a"));
    let (st, list) = get(&admin, &s.url("/v1/sys/lockouts")).await;
    assert_eq!(st, 200);
    assert_eq!(list["lockouts"][0]["identity"], keyhold_tests::APP_A);
    let (st, lifted) = post(
        &admin,
        &s.url("/v1/sys/lockouts/lift"),
        json!({"identity": keyhold_tests::APP_A}),
    )
    .await;
    assert_eq!((st, lifted["lifted"].clone()), (200, json!(true)));
    let (st, _) = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": dk["wrapped"]}),
    )
    .await;
    assert_eq!(st, 200);
    // Only admins manage lockouts.
    assert_error(
        &get(&app, &s.url("/v1/sys/lockouts")).await,
        403,
        "PermissionDenied",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lockout_ends_by_itself() {
    let s = TestServer::start_with(
        keyhold_tests::TestSeal::KeyFile,
        "[lockout]\nthreshold = 2\nwindow_secs = 60\nduration_secs = 1\n",
    )
    .await;
    let stranger = s.client(Some("stranger"));
    assert_error(
        &get(&stranger, &s.url("/v1/keys")).await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &get(&stranger, &s.url("/v1/keys")).await,
        403,
        "PermissionDenied",
    );
    assert_error(&get(&stranger, &s.url("/v1/keys")).await, 429, "LockedOut");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_error(
        &get(&stranger, &s.url("/v1/keys")).await,
        403,
        "PermissionDenied",
    );
}
