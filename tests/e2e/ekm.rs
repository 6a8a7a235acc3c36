//! Google Cloud EKM over real TLS (issue 12): a local OIDC issuer standing in for Google,
//! protojson bodies from the public STET messages. Round trip with AAD, AAD mismatch,
//! unknown key path, the justification policy (each reason allowed or refused, a missing
//! one), health checks, bad tokens, a caller not on the list, a disabled key (never
//! PERMISSION_DENIED), the audit records.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

const ISS: &str = "https://accounts.google.com";
const URL: &str = "https://ekm.test";
const AGENT: &str = "service-123456@gcp-sa-ekms.iam.gserviceaccount.com";
const EKM_IDENTITY: &str = "spiffe://test/acme/ekm";

/// Google's stand-in: its JWK set written to `dir/google.json`.
fn issuer(dir: &std::path::Path) -> keyhold_tests::TokenIssuer {
    let issuer = keyhold_tests::TokenIssuer::new("g1");
    issuer.write_jwks(&dir.join("google.json"));
    issuer
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(issuer: &keyhold_tests::TokenIssuer, extra: Value) -> String {
    let mut c = json!({"iss": ISS, "aud": URL, "email": AGENT, "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    issuer.sign(&c)
}

fn context(reason: Option<&str>, health: bool) -> Value {
    let mut c = json!({"fullResourceName": "//cloudkms.googleapis.com/projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
                       "isKeyHealthCheck": health});
    if let Some(r) = reason {
        c["accessReasonContext"] = json!({"reason": r});
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ekm_wraps_and_unwraps_for_cloud_kms_under_the_justification_policy() {
    let keys = tempfile::tempdir().unwrap();
    let pem = &issuer(keys.path());
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[ekm]
url = "{URL}"
jwks = "{j}"
tenant = "acme"
identity = "{EKM_IDENTITY}"

[[ekm.keys]]
path = "v0/strict"
key = "ekm-kek"
callers = ["{AGENT}"]
allowed_reasons = ["CUSTOMER_INITIATED_ACCESS", "GOOGLE_INITIATED_SYSTEM_OPERATION"]
cache_secs = 120

[[ekm.keys]]
path = "v0/lenient"
key = "ekm-kek"
callers = ["{AGENT}"]
allow_missing_reason = true
"#,
        j = keys.path().join("google.json").display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let admin = s.client(Some("admin-a"));
    let r = post(&admin, &s.url("/v1/keys"),
        json!({"name": "ekm-kek", "grants": [{"identity": EKM_IDENTITY, "operations": ["wrap", "unwrap"]}]})).await;
    assert_eq!(r.0, 201, "{r:?}");
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!("https://localhost:{}/ekm", s.public_addr.unwrap().port());
    let call = |path: &str, tok: Option<String>, body: Value| {
        let (client, url) = (client.clone(), format!("{base}/{path}"));
        async move {
            let mut req = client.post(url).json(&body);
            if let Some(t) = tok {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let good = || Some(token(pem, json!({})));
    let dek = B64.encode([0x42u8; 32]);
    let aad = B64.encode(b"projects/p/bucket/object-7");
    let wrap_body = |reason: Option<&str>, health: bool| {
        json!({"plaintext": dek, "additionalAuthenticatedData": aad, "additionalContext": context(reason, health),
               "keyUriPrefix": "", "keyPath": "v0/strict"})
    };

    // Round trip with AAD, with an allowed justification.
    let (st, w) = call(
        "v0/strict:wrap",
        good(),
        wrap_body(Some("CUSTOMER_INITIATED_ACCESS"), false),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let blob = w["wrappedBlob"].as_str().unwrap().to_owned();
    let unwrap_body = |aad: &str, reason: Option<&str>, health: bool| json!({"wrappedBlob": blob, "additionalAuthenticatedData": aad, "additionalContext": context(reason, health)});
    let (st, u) = call(
        "v0/strict:unwrap",
        good(),
        unwrap_body(&aad, Some("GOOGLE_INITIATED_SYSTEM_OPERATION"), false),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(u["plaintext"], dek);
    assert_eq!(u["allowedCacheDuration"], "120s");

    // Each failure on its own: (what, path, token, body, status, status name).
    let expired = token(pem, json!({"exp": now() - 3600}));
    let wrong_aud = token(pem, json!({"aud": "https://other.test"}));
    let other_caller = token(
        pem,
        json!({"email": "service-999@gcp-sa-ekms.iam.gserviceaccount.com"}),
    );
    let parts: Vec<String> = good().unwrap().split('.').map(str::to_owned).collect();
    let none = format!(
        "{}.{}.",
        B64URL.encode(r#"{"alg":"none","kid":"g1"}"#),
        parts[1]
    );
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64URL.encode(
            json!({"iss": ISS, "aud": URL, "email": AGENT, "exp": now() + 9999}).to_string()
        ),
        parts[2]
    );
    // (what, path, token, body, status, status name)
    type Case<'a> = (&'a str, &'a str, Option<String>, Value, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "AAD mismatch",
            "v0/strict:unwrap",
            good(),
            unwrap_body(
                &B64.encode(b"other"),
                Some("CUSTOMER_INITIATED_ACCESS"),
                false,
            ),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "unknown key path",
            "v0/nope:unwrap",
            good(),
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            404,
            "NOT_FOUND",
        ),
        (
            "refused justification",
            "v0/strict:unwrap",
            good(),
            unwrap_body(&aad, Some("GOOGLE_INITIATED_REVIEW"), false),
            400,
            "FAILED_PRECONDITION",
        ),
        (
            "refused justification (third party)",
            "v0/strict:unwrap",
            good(),
            unwrap_body(&aad, Some("THIRD_PARTY_DATA_REQUEST"), false),
            400,
            "FAILED_PRECONDITION",
        ),
        (
            "missing justification",
            "v0/strict:unwrap",
            good(),
            unwrap_body(&aad, None, false),
            400,
            "FAILED_PRECONDITION",
        ),
        (
            "unspecified justification",
            "v0/strict:unwrap",
            good(),
            unwrap_body(&aad, Some("REASON_UNSPECIFIED"), false),
            400,
            "FAILED_PRECONDITION",
        ),
        (
            "no token",
            "v0/strict:unwrap",
            None,
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "expired",
            "v0/strict:unwrap",
            Some(expired),
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "wrong audience",
            "v0/strict:unwrap",
            Some(wrong_aud),
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "alg none",
            "v0/strict:unwrap",
            Some(none),
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "bad signature",
            "v0/strict:unwrap",
            Some(tampered),
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "caller not on the list",
            "v0/strict:unwrap",
            Some(other_caller),
            unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
            403,
            "PERMISSION_DENIED",
        ),
        (
            "not base64",
            "v0/strict:wrap",
            good(),
            json!({"plaintext": "***", "additionalContext": context(Some("CUSTOMER_INITIATED_ACCESS"), false)}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "not ours",
            "v0/strict:unwrap",
            good(),
            json!({"wrappedBlob": B64.encode([1u8; 40]), "additionalContext": context(Some("CUSTOMER_INITIATED_ACCESS"), false)}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "another key path's blob",
            "v0/lenient:unwrap",
            good(),
            unwrap_body(&aad, None, false),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "not an operation",
            "v0/strict:destroy",
            good(),
            json!({}),
            404,
            "NOT_FOUND",
        ),
    ];
    for (what, path, tok, body, status, name) in cases {
        let (st, err) = call(path, tok, body).await;
        assert_eq!(st, status, "{what}: {err}");
        assert_eq!(err["error"]["status"], name, "{what}: {err}");
        assert_eq!(err["error"]["code"], status, "{what}");
    }
    // Every allowed reason passes; a health check passes without one (still authenticated).
    for reason in [
        "CUSTOMER_INITIATED_ACCESS",
        "GOOGLE_INITIATED_SYSTEM_OPERATION",
    ] {
        assert_eq!(
            call(
                "v0/strict:unwrap",
                good(),
                unwrap_body(&aad, Some(reason), false)
            )
            .await
            .0,
            200,
            "{reason}"
        );
    }
    let (st, h) = call("v0/strict:wrap", good(), wrap_body(None, true)).await;
    assert_eq!(st, 200, "health check: {h}");
    assert_eq!(
        call("v0/strict:wrap", None, wrap_body(None, true)).await.0,
        401
    );
    // A health check's blob unwraps as a health check, with no justification ...
    let health_blob = h["wrappedBlob"].as_str().unwrap().to_owned();
    let health_unwrap = |blob: &str, health: bool| json!({"wrappedBlob": blob, "additionalAuthenticatedData": aad, "additionalContext": context(None, health)});
    let (st, hu) = call(
        "v0/strict:unwrap",
        good(),
        health_unwrap(&health_blob, true),
    )
    .await;
    assert_eq!(st, 200, "health check unwrap: {hu}");
    assert_eq!(hu["plaintext"], dek);
    // ... but the caller's health-check flag is no way around the justification policy
    // (issue 22, point 7): customer data (a blob wrapped outside a health check) does not
    // unwrap as a health check, and a health check's blob does not unwrap as data.
    let (st, err) = call("v0/strict:unwrap", good(), health_unwrap(&blob, true)).await;
    assert_eq!(st, 400, "customer data unwrapped as a health check: {err}");
    assert_eq!(err["error"]["status"], "INVALID_ARGUMENT", "{err}");
    let (st, err) = call(
        "v0/strict:unwrap",
        good(),
        json!({"wrappedBlob": health_blob, "additionalAuthenticatedData": aad,
               "additionalContext": context(Some("CUSTOMER_INITIATED_ACCESS"), false)}),
    )
    .await;
    assert_eq!(st, 400, "a health check's blob unwrapped as data: {err}");
    // A key path that allows a missing justification.
    let (st, lw) = call(
        "v0/lenient:wrap",
        good(),
        json!({"plaintext": dek, "additionalContext": {}}),
    )
    .await;
    assert_eq!(st, 200, "{lw}");

    // Disabled in Keyhold: refused, and never as PERMISSION_DENIED.
    let r = post(&admin, &s.url("/v1/keys/ekm-kek/disable"), json!({})).await;
    assert_eq!(r.0, 200);
    let (st, err) = call(
        "v0/strict:unwrap",
        good(),
        unwrap_body(&aad, Some("CUSTOMER_INITIATED_ACCESS"), false),
    )
    .await;
    assert_eq!(
        (st, err["error"]["status"].as_str()),
        (400, Some("FAILED_PRECONDITION")),
        "{err}"
    );

    // Audited: the caller, the justification, the resource, health checks marked.
    let page = s.kms_client("auditor-a").audit_page(0, 1000).await.unwrap();
    let unwrap = page
        .records
        .iter()
        .find(|r| r.operation == "EKM unwrap" && r.outcome == "ok")
        .unwrap();
    let a = unwrap.attributes.as_ref().unwrap();
    assert_eq!(a["caller"], AGENT);
    assert_eq!(a["justification"], "GOOGLE_INITIATED_SYSTEM_OPERATION");
    assert!(a["resource"].contains("cryptoKeys/k"));
    assert!(page.records.iter().any(|r| r
        .attributes
        .as_ref()
        .is_some_and(|a| a.get("healthCheck").is_some())));
    assert!(page.records.iter().any(|r| r.operation == "EKM unwrap"
        && r.status == 400
        && r.attributes
            .as_ref()
            .and_then(|a| a.get("justification"))
            .map(String::as_str)
            == Some("GOOGLE_INITIATED_REVIEW")));
    let all = serde_json::to_string(&page.records).unwrap();
    assert!(!all.contains(&dek));
}

/// Issue 24: what Cloud EKM really sends, taken from public references.
/// - The token's audience is the service's origin, `https://<host>` without path or port
///   (GoogleCloudPlatform/stet, `client/jwt/jwt.go`: `fmt.Sprintf("%v://%v", u.Scheme,
///   u.Hostname())`), while `[ekm] url` carries a path and a port as the docs show; its
///   issuer may be `accounts.google.com` without the scheme (Google Identity, "Verify the
///   Google ID token").
/// - Bodies in protojson as other clients send them: STET's conformance `WrapRequest`
///   (`cmd/conformance/main.go`: only `relativeResourceName`, empty fields left out),
///   Thales's load-test body (ThalesGroup/k6client-ciphertrust, `ekm_wrap.js`: mixed
///   casing and a `null`), a reason by number, and the two `MODIFIED_*` reasons of the
///   `AccessReasonContext.Reason` enum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ekm_takes_what_cloud_kms_sends() {
    let keys = tempfile::tempdir().unwrap();
    let pem = &issuer(keys.path());
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[ekm]
url = "https://ekm.test:8443/ekm"
jwks = "{j}"
tenant = "acme"
identity = "{EKM_IDENTITY}"

[[ekm.keys]]
path = "v0/kaj"
key = "ekm-kek"
callers = ["{AGENT}"]
allowed_reasons = ["MODIFIED_CUSTOMER_INITIATED_ACCESS", "CUSTOMER_INITIATED_ACCESS", "CUSTOMER_INITIATED_SUPPORT"]
"#,
        j = keys.path().join("google.json").display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let r = post(&s.client(Some("admin-a")), &s.url("/v1/keys"),
        json!({"name": "ekm-kek", "grants": [{"identity": EKM_IDENTITY, "operations": ["wrap", "unwrap"]}]})).await;
    assert_eq!(r.0, 201, "{r:?}");
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!("https://localhost:{}/ekm", s.public_addr.unwrap().port());
    let call = |path: &str, tok: String, body: Value| {
        let (client, url) = (client.clone(), format!("{base}/{path}"));
        async move {
            let r = client
                .post(url)
                .bearer_auth(tok)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let origin = || {
        token(
            pem,
            json!({"aud": "https://ekm.test", "iss": "accounts.google.com"}),
        )
    };

    // STET's conformance request, with the origin audience.
    let (st, w) = call(
        "v0/kaj:wrap",
        origin(),
        json!({"keyPath": "v0/kaj", "plaintext": "AQ==", "additionalContext": {
            "relativeResourceName": "myresource",
            "accessReasonContext": {"reason": "CUSTOMER_INITIATED_ACCESS"}}}),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let blob = w["wrappedBlob"].as_str().unwrap().to_owned();
    // Unwrapped under a deprecated-but-valid reason, given by name and by number (8).
    for reason in [json!("MODIFIED_CUSTOMER_INITIATED_ACCESS"), json!(8)] {
        let (st, u) = call(
            "v0/kaj:unwrap",
            origin(),
            json!({"wrappedBlob": blob, "additionalContext": {
                "relativeResourceName": "myresource", "accessReasonContext": {"reason": reason}}}),
        )
        .await;
        assert_eq!(st, 200, "{reason}: {u}");
        assert_eq!(u["plaintext"], "AQ==");
    }
    // A reason number no policy knows is refused like a name it does not allow.
    let (st, _) = call(
        "v0/kaj:unwrap",
        origin(),
        json!({"wrappedBlob": blob, "additionalContext": {"accessReasonContext": {"reason": 99}}}),
    )
    .await;
    assert_eq!(st, 400);
    // Thales's body: snake_case beside camelCase, a null, a reason that is allowed.
    let (st, w) = call(
        "v0/kaj:wrap",
        origin(),
        json!({"plaintext": "dGVzdA==", "additionalContext": {
            "accessReasonContext": {"reason": "CUSTOMER_INITIATED_SUPPORT"},
            "relative_resource_name": "projects/test-ekm/locations/us/keyRings/n1/cryptoKeys/k/cryptoKeyVersions/16",
            "is_key_health_check": null}}),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    // An empty plaintext is left out by proto3 JSON: wrapped, and unwraps to nothing.
    let (st, w) = call(
        "v0/kaj:wrap",
        origin(),
        json!({"additionalContext": {"accessReasonContext": {"reason": "CUSTOMER_INITIATED_ACCESS"}}}),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let (st, u) = call(
        "v0/kaj:unwrap",
        origin(),
        json!({"wrappedBlob": w["wrappedBlob"], "additionalContext": {"accessReasonContext": {"reason": 5}}}),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert!(u["plaintext"].as_str().is_none_or(str::is_empty), "{u}");
    // The configured URL stays an accepted audience; another origin does not.
    let (st, _) = call(
        "v0/kaj:unwrap",
        token(pem, json!({"aud": "https://ekm.test:8443/ekm"})),
        json!({"wrappedBlob": blob, "additionalContext": {"accessReasonContext": {"reason": 5}}}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = call(
        "v0/kaj:unwrap",
        token(pem, json!({"aud": "https://other.test"})),
        json!({"wrappedBlob": blob, "additionalContext": {"accessReasonContext": {"reason": 5}}}),
    )
    .await;
    assert_eq!(st, 401);
}

/// Issue 24: Cloud EKM over a VPC calls `https://<EkmConnection hostname>/<key path>:wrap`
/// from the root of the host (GoogleCloudPlatform/stet, `client/vpc/vpc.go`), with key
/// paths such as `v0/...` and the token audience `https://<hostname>`. `[ekm] mount = "/"`
/// serves it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ekm_over_a_vpc_is_served_at_the_root() {
    let keys = tempfile::tempdir().unwrap();
    let pem = &issuer(keys.path());
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[ekm]
url = "{URL}"
mount = "/"
jwks = "{j}"
tenant = "acme"
identity = "{EKM_IDENTITY}"

[[ekm.keys]]
path = "v0/cryptospaces/payments/keys/k1"
key = "ekm-kek"
callers = ["{AGENT}"]
allow_missing_reason = true
"#,
        j = keys.path().join("google.json").display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let r = post(&s.client(Some("admin-a")), &s.url("/v1/keys"),
        json!({"name": "ekm-kek", "grants": [{"identity": EKM_IDENTITY, "operations": ["wrap", "unwrap"]}]})).await;
    assert_eq!(r.0, 201, "{r:?}");
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let root = format!("https://localhost:{}", s.public_addr.unwrap().port());
    let call = |path: &str, body: Value| {
        let (client, url) = (client.clone(), format!("{root}/{path}"));
        let tok = token(pem, json!({"aud": URL}));
        async move {
            let r = client
                .post(url)
                .bearer_auth(tok)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, w) = call(
        "v0/cryptospaces/payments/keys/k1:wrap",
        json!({"plaintext": B64.encode([7u8; 32])}),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let (st, u) = call(
        "v0/cryptospaces/payments/keys/k1:unwrap",
        json!({"wrappedBlob": w["wrappedBlob"]}),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(u["plaintext"], B64.encode([7u8; 32]));
    // Not under /ekm any more, and an unknown path at the root is EKM's 404.
    let (st, _) = call(
        "ekm/v0/cryptospaces/payments/keys/k1:wrap",
        json!({"plaintext": B64.encode([7u8; 32])}),
    )
    .await;
    assert_eq!(st, 404);
}
