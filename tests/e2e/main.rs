//! End-to-end tests: the real kms-server over real mTLS on port 0, with a generated PKI.
//! One integration binary; modules by theme.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub
)]

mod alert;
mod approvals;
mod audit;
mod audit_export;
mod audit_retention;
mod authz;
mod backup;
mod bad_input;
mod brake;
mod client;
mod connections;
mod crash;
mod crypto;
mod cse;
mod cse_delegate;
mod curl;
mod dke;
mod ekm;
mod ekm_proto;
mod faults;
mod hardening;
mod hostile;
mod keys;
mod kmip;
mod kmsctl;
mod kubernetes;
mod leak;
mod lifecycle;
mod ops;
mod pkcs11;
mod postgres;
mod public_hosts;
mod quickstart;
mod report;
mod rsa;
mod salesforce;
mod seal;
mod tls;
mod transit;
mod xks;

use keyhold_tests::TestServer;
use serde_json::{json, Value};

/// POSTs JSON and returns (status, body).
pub async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// PUTs JSON and returns (status, body).
pub async fn put(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.put(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// GETs and returns (status, body).
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts an error response with the given status and code.
#[track_caller]
pub fn assert_error(resp: &(u16, Value), status: u16, code: &str) {
    assert_eq!(resp.0, status, "{resp:?}");
    assert_eq!(resp.1["error"]["code"], code, "{resp:?}");
    assert!(resp.1["error"]["message"].is_string(), "{resp:?}");
}

/// Creates `name` in the admin's tenant, granted to that tenant's app for every
/// operation, and returns its KeyInfo.
pub async fn create_key(s: &TestServer, admin: &str, name: &str) -> Value {
    let r = post(
        &s.client(Some(admin)),
        &s.url("/v1/keys"),
        json!({ "name": name, "grants": [{
            "identity": keyhold_tests::app_of(admin),
            "operations": ["datakey", "wrap", "unwrap", "rewrap"],
        }] }),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    r.1
}
