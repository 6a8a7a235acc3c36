//! Google Workspace client-side encryption over real TLS (issue 11): two local token
//! issuers (one playing Google's authorization service, one the customer's IdP), each
//! with its JWK set file. Status, wrap, unwrap, digest; each mandatory check failing on
//! its own, with the protocol's error body; the CORS preflight; the audit records; an
//! identity provider's outage (a key set URL that hangs) costing 503s, not the server.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

pub(crate) const GOOGLE: &str = "gsuitecse-tokenissuer-drive@system.gserviceaccount.com";
pub(crate) const IDP: &str = "https://idp.test/";
pub(crate) const IDP_AUD: &str = "kacls-test";
const KACLS: &str = "https://kacls.test/cse";
pub(crate) const CSE_IDENTITY: &str = "spiffe://test/acme/cse";
const ORIGIN: &str = "https://client-side-encryption.google.com";

use keyhold_tests::TokenIssuer as Issuer;

/// An issuer named `name`, its JWK set written to `dir/<name>.json`.
pub(crate) fn issuer(dir: &std::path::Path, name: &str) -> Issuer {
    let issuer = Issuer::new(&format!("{name}-1"));
    issuer.write_jwks(&dir.join(format!("{name}.json")));
    issuer
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub(crate) fn sign(issuer: &Issuer, claims: &Value) -> String {
    issuer.sign(claims)
}

/// Google's authorization claims for `role` on `resource`, changed by `extra`.
pub(crate) fn authz(role: &str, resource: &str, extra: Value) -> Value {
    let mut c = json!({
        "iss": GOOGLE, "aud": "cse-authorization", "email": "alice@example.com",
        "email_type": "google", "resource_name": resource, "role": role,
        "kacls_url": KACLS, "perimeter_id": "", "exp": now() + 600, "iat": now(),
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

pub(crate) fn authn(extra: Value) -> Value {
    let mut c = json!({"iss": IDP, "aud": IDP_AUD, "email": "alice@example.com",
                       "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// A server with `[public]` and `[cse]` for `kacls`: Google's issuer and the IdP (issuer
/// `authn_issuer`) with their key sets in `keys` (`google.json`, `idp.json`), `cse_extra`
/// lines in `[cse]`, and the `cse-kek` key granted to the CSE identity.
pub(crate) async fn cse_server(
    keys: &std::path::Path,
    kacls: &str,
    authn_issuer: &str,
    cse_extra: &str,
) -> TestServer {
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[cse]
kacls_url = "{kacls}"
tenant = "acme"
identity = "{CSE_IDENTITY}"
key = "cse-kek"
{cse_extra}

[[cse.authorization]]
issuer = "{GOOGLE}"
jwks = "{g}"

[[cse.authentication]]
issuer = "{authn_issuer}"
audience = "{IDP_AUD}"
jwks = "{i}"
"#,
        g = keys.join("google.json").display(),
        i = keys.join("idp.json").display(),
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "cse-kek", "grants": [{"identity": CSE_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cse_wraps_and_unwraps_for_google_clients_and_refuses_each_bad_call_on_its_own() {
    let keys = tempfile::tempdir().unwrap();
    let google = issuer(keys.path(), "google");
    let idp = issuer(keys.path(), "idp");
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[cse]
kacls_url = "{KACLS}"
tenant = "acme"
identity = "{CSE_IDENTITY}"
key = "cse-kek"
perimeters = ["allowed-perimeter"]

[[cse.authorization]]
issuer = "{GOOGLE}"
jwks = "{g}"

[[cse.authentication]]
issuer = "{IDP}"
audience = "{IDP_AUD}"
jwks = "{i}"
"#,
        g = keys.path().join("google.json").display(),
        i = keys.path().join("idp.json").display(),
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let admin = s.client(Some("admin-a"));
    let r = post(
        &admin,
        &s.url("/v1/keys"),
        json!({"name": "cse-kek", "grants": [{"identity": CSE_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!("https://localhost:{}/cse", s.public_addr.unwrap().port());
    let call = |op: &'static str, body: Value| {
        let (client, url) = (client.clone(), format!("{base}/{op}"));
        async move {
            let r = client
                .post(url)
                .header("origin", ORIGIN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let cors = r
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body, cors)
        }
    };

    // Status, anonymous.
    let st: Value = client
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["server_type"], "KACLS");
    assert!(st["operations_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("wrap")));

    // CORS preflight from Google's origin; refused from another.
    let pre = client
        .request(reqwest::Method::OPTIONS, format!("{base}/wrap"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.headers()["access-control-allow-origin"], ORIGIN);
    assert!(pre.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let evil = client
        .request(reqwest::Method::OPTIONS, format!("{base}/wrap"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 403);

    // Wrap as a writer, unwrap as a reader, digest.
    let dek = [0x5au8; 32];
    let resource = "//googleapis.com/drive/files/abc";
    let wrap_body = |authz_claims: Value, authn_claims: Value, key: &[u8]| {
        json!({"authentication": sign(&idp, &authn_claims), "authorization": sign(&google, &authz_claims),
               "key": B64.encode(key), "reason": "{\"client\":\"drive\"}"})
    };
    let (st, w, cors) = call(
        "wrap",
        wrap_body(authz("writer", resource, json!({})), authn(json!({})), &dek),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(cors.as_deref(), Some(ORIGIN));
    let wrapped = w["wrapped_key"].as_str().unwrap().to_owned();
    assert!(B64.decode(&wrapped).unwrap().len() <= 1024);
    let unwrap_body = |authz_claims: Value, authn_claims: Value, wrapped: &str| {
        json!({"authentication": sign(&idp, &authn_claims), "authorization": sign(&google, &authz_claims),
               "wrapped_key": wrapped, "reason": "open"})
    };
    let (st, u, _) = call(
        "unwrap",
        unwrap_body(
            authz("reader", resource, json!({})),
            authn(json!({})),
            &wrapped,
        ),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(B64.decode(u["key"].as_str().unwrap()).unwrap(), dek);
    // The IdP's google_email wins over its email.
    let (st, _, _) = call(
        "unwrap",
        unwrap_body(
            authz("reader", resource, json!({})),
            authn(json!({"email": "a.smith@corp.example", "google_email": "Alice@Example.com"})),
            &wrapped,
        ),
    )
    .await;
    assert_eq!(st, 200);
    let (st, d, _) = call(
        "digest",
        json!({"authorization": sign(&google, &authz("reader", resource, json!({}))), "wrapped_key": wrapped, "reason": "r"}),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(
        d["resource_key_hash"],
        kms_server::adapters::cse::resource_key_hash(&dek, resource, "")
    );
    // Issue 24: Google's migration service checks a key with the role `verifier`
    // ("Allowed to call digest only", the reference's authorization tokens).
    let (st, v, _) = call(
        "digest",
        json!({"authorization": sign(&google, &authz("verifier", resource, json!({}))), "wrapped_key": wrapped, "reason": "r"}),
    )
    .await;
    assert_eq!(st, 200, "verifier: {v}");
    assert_eq!(v["resource_key_hash"], d["resource_key_hash"]);

    // Each mandatory check failing on its own: (what, op, body, status).
    let tampered = {
        let t = sign(&google, &authz("writer", resource, json!({})));
        let parts: Vec<&str> = t.split('.').collect();
        let other = B64URL.encode(authz("writer", "//other/resource", json!({})).to_string());
        format!("{}.{other}.{}", parts[0], parts[2])
    };
    let none = {
        let t = sign(&google, &authz("writer", resource, json!({})));
        let parts: Vec<&str> = t.split('.').collect();
        let h = B64URL.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, google.kid));
        format!("{h}.{}.", parts[1])
    };
    let mut cases: Vec<(&str, &'static str, Value, u16)> = vec![
        (
            "bad signature",
            "wrap",
            json!({"authentication": sign(&idp, &authn(json!({}))), "authorization": tampered, "key": B64.encode(dek), "reason": ""}),
            401,
        ),
        (
            "none algorithm",
            "wrap",
            json!({"authentication": sign(&idp, &authn(json!({}))), "authorization": none, "key": B64.encode(dek), "reason": ""}),
            401,
        ),
        (
            "authorization signed by the IdP's key",
            "wrap",
            json!({"authentication": sign(&idp, &authn(json!({}))), "authorization": sign(&idp, &authz("writer", resource, json!({}))), "key": B64.encode(dek), "reason": ""}),
            401,
        ),
        (
            "unknown authorization issuer",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({"iss": "someone@else"})),
                authn(json!({})),
                &dek,
            ),
            401,
        ),
        (
            "wrong authorization audience",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({"aud": "other"})),
                authn(json!({})),
                &dek,
            ),
            401,
        ),
        (
            "expired authorization",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({"exp": now() - 3600})),
                authn(json!({})),
                &dek,
            ),
            401,
        ),
        (
            "wrong authentication audience",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({})),
                authn(json!({"aud": "other"})),
                &dek,
            ),
            401,
        ),
        (
            "expired authentication",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({})),
                authn(json!({"exp": now() - 3600})),
                &dek,
            ),
            401,
        ),
        (
            "a reader wraps",
            "wrap",
            wrap_body(authz("reader", resource, json!({})), authn(json!({})), &dek),
            403,
        ),
        (
            "emails differ",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({})),
                authn(json!({"email": "bob@example.com"})),
                &dek,
            ),
            403,
        ),
        (
            "visitor",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({"email_type": "google-visitor"})),
                authn(json!({})),
                &dek,
            ),
            403,
        ),
        (
            "customer-idp guest",
            "unwrap",
            unwrap_body(
                authz("reader", resource, json!({"email_type": "customer-idp"})),
                authn(json!({})),
                &wrapped,
            ),
            403,
        ),
        (
            "wrong kacls_url",
            "wrap",
            wrap_body(
                authz(
                    "writer",
                    resource,
                    json!({"kacls_url": "https://other.test/cse"}),
                ),
                authn(json!({})),
                &dek,
            ),
            403,
        ),
        (
            "perimeter refused",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({"perimeter_id": "elsewhere"})),
                authn(json!({})),
                &dek,
            ),
            403,
        ),
        (
            "resource name mismatch",
            "unwrap",
            unwrap_body(
                authz("reader", "//googleapis.com/drive/files/other", json!({})),
                authn(json!({})),
                &wrapped,
            ),
            403,
        ),
        (
            "resource name mismatch (digest)",
            "digest",
            json!({"authorization": sign(&google, &authz("reader", "//other", json!({}))), "wrapped_key": wrapped, "reason": ""}),
            403,
        ),
        (
            "key too long",
            "wrap",
            wrap_body(
                authz("writer", resource, json!({})),
                authn(json!({})),
                &[1u8; 129],
            ),
            400,
        ),
        (
            "not a wrapped key",
            "unwrap",
            unwrap_body(
                authz("reader", resource, json!({})),
                authn(json!({})),
                &B64.encode([1u8; 40]),
            ),
            400,
        ),
        // (A field Keyhold does not know is ignored, as Google adds fields: issue 24,
        // `cse_takes_google_id_tokens_and_fields_google_adds`. A missing one is not.)
        (
            "missing field",
            "wrap",
            json!({"authentication": "", "authorization": "", "reason": ""}),
            400,
        ),
    ];
    // A perimeter that is allowed binds into the wrapped key and passes.
    let (st, pw, _) = call(
        "wrap",
        wrap_body(
            authz(
                "writer",
                resource,
                json!({"perimeter_id": "allowed-perimeter"}),
            ),
            authn(json!({})),
            &dek,
        ),
    )
    .await;
    assert_eq!(st, 200, "{pw}");
    let (st, pd, _) = call(
        "digest",
        json!({"authorization": sign(&google, &authz("reader", resource, json!({}))), "wrapped_key": pw["wrapped_key"], "reason": ""}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        pd["resource_key_hash"],
        kms_server::adapters::cse::resource_key_hash(&dek, resource, "allowed-perimeter")
    );
    for (what, op, body, want) in cases.drain(..) {
        let (st, err, cors) = call(op, body).await;
        assert_eq!(st, want, "{what}: {err}");
        assert_eq!(
            err["code"], want,
            "{what}: the protocol's error body: {err}"
        );
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        assert_eq!(cors.as_deref(), Some(ORIGIN), "{what}: CORS on errors too");
    }

    // Disabled in Keyhold: CSE stops.
    let r = post(&admin, &s.url("/v1/keys/cse-kek/disable"), json!({})).await;
    assert_eq!(r.0, 200);
    let (st, _, _) = call(
        "unwrap",
        unwrap_body(
            authz("reader", resource, json!({})),
            authn(json!({})),
            &wrapped,
        ),
    )
    .await;
    assert_ne!(st, 200);

    // Audited with the user, the resource and the reason; never the key.
    let auditor = s.kms_client("auditor-a");
    assert!(auditor.audit_verify(true).await.unwrap().is_ok());
    let page = auditor.audit_page(0, 1000).await.unwrap();
    let wrap = page
        .records
        .iter()
        .find(|r| r.operation == "CSE wrap" && r.outcome == "ok")
        .expect("a CSE wrap record");
    let attrs = wrap.attributes.as_ref().unwrap();
    assert_eq!(attrs["user"], "alice@example.com");
    assert_eq!(attrs["resource"], resource);
    assert!(attrs["reason"].contains("drive"));
    let all = serde_json::to_string(&page.records).unwrap();
    assert!(!all.contains(&B64.encode(dek)));
}

/// The privileged operations and a migration between two key services: A (the original)
/// and B (the new one) trust the same Google and IdP issuers; B's `rewrap` asks A's
/// `privilegedunwrap` with a KACLS-to-KACLS token it signs, which A verifies with B's
/// published key set; the migrated key unwraps on B with its resource key hash. Each
/// refusal on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cse_privileged_operations_and_migration_between_key_services() {
    let keys = tempfile::tempdir().unwrap();
    let google = issuer(keys.path(), "google");
    let idp = issuer(keys.path(), "idp");
    // B's signing key, and the key set A will accept B's migration tokens under.
    let b_signer = issuer(keys.path(), "b-signer");
    let b_key = keys.path().join("b-signing.pem");
    std::fs::write(&b_key, &b_signer.pem).unwrap();
    let b_jwks = kms_server::adapters::cse::signing_jwks(&b_key).unwrap();
    std::fs::write(keys.path().join("b-certs.json"), b_jwks.to_string()).unwrap();
    let b_kid = b_jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let (pa, pb) = keyhold_tests::free_ports();
    let (url_a, url_b) = (
        format!("https://localhost:{pa}/cse"),
        format!("https://localhost:{pb}/cse"),
    );
    let common = |port: u16, url: &str, extra: &str| {
        format!(
            r#"
[public]
listen = "127.0.0.1:{port}"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[cse]
kacls_url = "{url}"
tenant = "acme"
identity = "{CSE_IDENTITY}"
key = "cse-kek"
{extra}
[[cse.authorization]]
issuer = "{GOOGLE}"
jwks = "{g}"

[[cse.authentication]]
issuer = "{IDP}"
audience = "{IDP_AUD}"
jwks = "{i}"
"#,
            g = keys.path().join("google.json").display(),
            i = keys.path().join("idp.json").display(),
        )
    };
    // A: a privileged user, and B as a migration peer (its table after every [cse] key).
    let a_config = format!(
        "{}\n[[cse.migration_peers]]\nissuer = \"{url_b}\"\njwks = \"{}\"\n",
        common(pa, &url_a, "privileged_users = [\"Admin@Example.com\"]"),
        keys.path().join("b-certs.json").display()
    );
    let a = TestServer::start_with(TestSeal::KeyFile, &a_config).await;
    let b_extra = format!(
        "signing_key = \"{}\"\nmigration_sources = [\"{url_a}\"]\nmigration_ca = \"{}\"",
        b_key.display(),
        a.pki.ca().display()
    );
    let b = TestServer::start_with(TestSeal::KeyFile, &common(pb, &url_b, &b_extra)).await;
    for s in [&a, &b] {
        let r = post(
            &s.client(Some("admin-a")),
            &s.url("/v1/keys"),
            json!({"name": "cse-kek", "grants": [{"identity": CSE_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
        )
        .await;
        assert_eq!(r.0, 201, "{r:?}");
    }
    let call = |s: &TestServer, url: &str, op: &str, body: Value| {
        let client = keyhold_tests::client_for(&s.pki, None, false);
        let url = format!("{url}/{op}");
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let dek = [0x33u8; 32];
    let resource = "//googleapis.com/drive/files/migrating";
    let at = |kacls: &str, role: &str, res: &str| authz(role, res, json!({"kacls_url": kacls}));

    // Privileged operations on A: its privileged user (any case), not Alice.
    let admin_authn = sign(&idp, &authn(json!({"email": "admin@example.com"})));
    let (st, pw) = call(
        &a,
        &url_a,
        "privilegedwrap",
        json!({"authentication": admin_authn, "key": B64.encode(dek),
        "perimeter_id": "", "resource_name": resource, "reason": "import"}),
    )
    .await;
    assert_eq!(st, 200, "{pw}");
    let (st, pu) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        json!({"authentication": admin_authn,
        "wrapped_key": pw["wrapped_key"], "resource_name": resource, "reason": "export"}),
    )
    .await;
    assert_eq!(st, 200, "{pu}");
    assert_eq!(B64.decode(pu["key"].as_str().unwrap()).unwrap(), dek);
    let alice_authn = sign(&idp, &authn(json!({})));
    let (st, err) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        json!({"authentication": alice_authn,
        "wrapped_key": pw["wrapped_key"], "resource_name": resource, "reason": ""}),
    )
    .await;
    assert_eq!((st, err["code"].clone()), (403, json!(403)), "{err}");
    let (st, _) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        json!({"authentication": admin_authn,
        "wrapped_key": pw["wrapped_key"], "resource_name": "//other", "reason": ""}),
    )
    .await;
    assert_eq!(st, 403, "another resource");

    // A user's key, wrapped on A.
    let (st, w) = call(
        &a,
        &url_a,
        "wrap",
        json!({"authentication": alice_authn,
        "authorization": sign(&google, &at(&url_a, "writer", resource)),
        "key": B64.encode(dek), "reason": ""}),
    )
    .await;
    assert_eq!(st, 200, "{w}");

    // B publishes its signing key.
    let certs: Value = keyhold_tests::client_for(&b.pki, None, false)
        .get(format!("{url_b}/certs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(certs["keys"][0]["kid"], b_kid.as_str());

    // Migrated to B: rewrap, then unwrap on B.
    let rewrap = |authz_claims: Value, original: &str| {
        json!({"authorization": sign(&google, &authz_claims), "original_kacls_url": original,
               "wrapped_key": w["wrapped_key"], "reason": "migration"})
    };
    let (st, m) = call(
        &b,
        &url_b,
        "rewrap",
        rewrap(at(&url_b, "migrator", resource), &url_a),
    )
    .await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(
        m["resource_key_hash"],
        kms_server::adapters::cse::resource_key_hash(&dek, resource, "")
    );
    let (st, u) = call(
        &b,
        &url_b,
        "unwrap",
        json!({"authentication": alice_authn,
        "authorization": sign(&google, &at(&url_b, "reader", resource)),
        "wrapped_key": m["wrapped_key"], "reason": ""}),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(B64.decode(u["key"].as_str().unwrap()).unwrap(), dek);

    // Refusals: a source not configured; a token for A presented to B; A refusing a
    // migration token for another resource, or one signed by a key it does not trust.
    let (st, _) = call(
        &b,
        &url_b,
        "rewrap",
        rewrap(
            at(&url_b, "migrator", resource),
            "https://elsewhere.test/cse",
        ),
    )
    .await;
    assert_eq!(st, 403, "unconfigured source");
    let (st, _) = call(
        &b,
        &url_b,
        "rewrap",
        rewrap(at(&url_a, "migrator", resource), &url_a),
    )
    .await;
    assert_eq!(st, 403, "authorization for another KACLS");
    // Issue 24: only `migrator` may call rewrap.
    for role in ["writer", "reader", "upgrader"] {
        let (st, _) = call(
            &b,
            &url_b,
            "rewrap",
            rewrap(at(&url_b, role, resource), &url_a),
        )
        .await;
        assert_eq!(st, 403, "rewrap as {role}");
    }
    // The KACLS-to-KACLS token as Google's KACLS reference defines it ("Authentication
    // tokens", "KACLS authentication token for PrivilegedUnwrap"): iss = the requesting
    // KACLS, aud = "kacls-migration", kacls_url = the KACLS the data is decrypted on,
    // resource_name; no email.
    let k2k_claims = |res: &str| {
        json!({"iss": url_b, "aud": "kacls-migration", "kacls_url": url_a,
                "resource_name": res, "iat": now(), "exp": now() + 300})
    };
    let sign_with = |signer: &Issuer, kid: &str, claims: &Value| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_rsa_pem(signer.pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let k2k = |signer: &Issuer, kid: &str, res: &str| sign_with(signer, kid, &k2k_claims(res));
    let direct = |token: String| json!({"authentication": token, "wrapped_key": w["wrapped_key"], "resource_name": resource, "reason": ""});
    let (st, _) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        direct(k2k(&b_signer, &b_kid, resource)),
    )
    .await;
    assert_eq!(st, 200, "B's token for this resource");
    let (st, _) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        direct(k2k(&b_signer, &b_kid, "//other")),
    )
    .await;
    assert_eq!(st, 403, "B's token for another resource");
    let (st, _) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        direct(k2k(&google, &b_kid, resource)),
    )
    .await;
    assert_eq!(st, 401, "a token B did not sign");
    // Issue 24: the claims as the reference has them, and nothing else: the token Keyhold
    // minted before (aud = the original's URL, an email, no kacls_url) is refused, and so
    // is one for another key service.
    let mut old_style = k2k_claims(resource);
    old_style["aud"] = json!(url_a);
    old_style["email"] = json!("alice@example.com");
    old_style.as_object_mut().unwrap().remove("kacls_url");
    let (st, _) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        direct(sign_with(&b_signer, &b_kid, &old_style)),
    )
    .await;
    assert_eq!(st, 401, "aud is kacls-migration");
    let mut elsewhere = k2k_claims(resource);
    elsewhere["kacls_url"] = json!("https://elsewhere.test/cse");
    let (st, _) = call(
        &a,
        &url_a,
        "privilegedunwrap",
        direct(sign_with(&b_signer, &b_kid, &elsewhere)),
    )
    .await;
    assert_eq!(st, 403, "a token for another key service");
    // Minted by PyJWT, a library Keyhold did not write, exactly as the reference
    // describes: accepted.
    let have_pyjwt = std::process::Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_pyjwt || std::env::var_os("CI").is_none(),
        "CI must install PyJWT and cryptography"
    );
    if have_pyjwt {
        let script = "import json, sys, time, jwt\nnow = int(time.time())\nclaims = {'iss': sys.argv[3], 'aud': 'kacls-migration', 'kacls_url': sys.argv[4], 'resource_name': sys.argv[5], 'iat': now, 'exp': now + 300}\nprint(jwt.encode(claims, open(sys.argv[1]).read(), algorithm='RS256', headers={'kid': sys.argv[2]}))";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&b_key)
            .args([&b_kid, &url_b, &url_a, resource])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PyJWT: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let (st, u) = call(&a, &url_a, "privilegedunwrap", direct(token)).await;
        assert_eq!(st, 200, "a PyJWT migration token: {u}");
        assert_eq!(B64.decode(u["key"].as_str().unwrap()).unwrap(), dek);
    }

    // Audited on both sides.
    for s in [&a, &b] {
        let page = s.kms_client("auditor-a").audit_page(0, 1000).await.unwrap();
        assert!(page
            .records
            .iter()
            .any(|r| r.operation == "CSE privilegedunwrap" || r.operation == "CSE rewrap"));
    }
}

/// A TCP listener that accepts connections and never answers: an identity provider's
/// key-set endpoint in an outage that does not refuse connections but hangs them. It
/// counts the connections (one per key-set fetch) and holds them open until dropped.
struct BlackHole {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn start() -> BlackHole {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        held.push(stream);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        BlackHole {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long one mTLS API call (`GET /v1/keys` as admin-a) and one ops health check take,
/// from a thread and runtime of their own, so that the server's async workers (the
/// test's runtime) are the only thing they wait on. An error (e.g. the client's 20 s
/// timeout) is reported, not panicked on.
type Timed = Result<std::time::Duration, String>;
fn time_other_listeners(s: &TestServer) -> (Timed, Timed) {
    let (api, ops) = (s.url("/v1/keys"), s.ops_url("/healthz"));
    let client = s.client(Some("admin-a"));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let timed = |r: Result<reqwest::Response, reqwest::Error>, t: std::time::Instant| match r {
            Ok(r) if r.status() == 200 => Ok(t.elapsed()),
            Ok(r) => Err(format!("HTTP {} after {:?}", r.status(), t.elapsed())),
            Err(e) => Err(format!("{e} after {:?}", t.elapsed())),
        };
        rt.block_on(async {
            let t = std::time::Instant::now();
            let api = timed(client.get(api).send().await, t);
            let ops_client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(20))
                .build()
                .unwrap();
            let t = std::time::Instant::now();
            (api, timed(ops_client.get(ops).send().await, t))
        })
    })
    .join()
    .unwrap()
}

/// An identity provider's outage that hangs instead of refusing: Google's key set URL is
/// a black hole (connections accepted, never answered; the fetch gives up after 10 s).
/// Eight concurrent anonymous CSE calls with Google tokens must not stall the server's
/// other listeners (the key-set fetch runs off the async workers: two here, as on a
/// two-core host), must cause one fetch between them (single flight), and
/// the calls that follow during the back-off must be answered 503 at once without
/// another fetch (negative caching).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cse_an_unreachable_token_key_set_stalls_no_listener_and_is_fetched_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let keys = tempfile::tempdir().unwrap();
    let google = Issuer::new("google-1");
    let idp = issuer(keys.path(), "idp");
    let hole = BlackHole::start();
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[cse]
kacls_url = "{KACLS}"
tenant = "acme"
identity = "{CSE_IDENTITY}"
key = "cse-kek"

[[cse.authorization]]
issuer = "{GOOGLE}"
jwks = "https://127.0.0.1:{port}/jwks"
jwks_ca = "pki/ca.pem"

[[cse.authentication]]
issuer = "{IDP}"
audience = "{IDP_AUD}"
jwks = "{i}"
"#,
        port = hole.port,
        i = keys.path().join("idp.json").display(),
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let (api_before, ops_before) = time_other_listeners(&s);
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let url = format!(
        "https://localhost:{}/cse/wrap",
        s.public_addr.unwrap().port()
    );
    let body = json!({
        "authentication": sign(&idp, &authn(json!({}))),
        "authorization": sign(&google, &authz("writer", "//googleapis.com/drive/files/x", json!({}))),
        "key": B64.encode([7u8; 32]), "reason": "",
    });
    let call = {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        move || {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                let t = Instant::now();
                let r = match client.post(url).json(&body).send().await {
                    Ok(r) => r,
                    // Reported (status 0), not panicked on: the evidence is the point.
                    Err(e) => return (0, json!(e.to_string()), None, t.elapsed()),
                };
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body: Value = r.json().await.unwrap_or(Value::Null);
                (status, body, retry_after, t.elapsed())
            }
        }
    };

    // Eight concurrent calls; the first fetch hangs in the black hole.
    let finished = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (call, finished) = (call.clone(), finished.clone());
            tokio::spawn(async move {
                let out = call().await;
                finished.fetch_add(1, Ordering::SeqCst);
                out
            })
        })
        .collect();
    while hole.accepted() == 0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(hole.accepted() > 0, "the key set fetch did not start");
    std::thread::sleep(Duration::from_millis(200));
    let (api_during, ops_during) = time_other_listeners(&s);
    let finished_before_probe = finished.load(Ordering::SeqCst);
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let all_answered = started.elapsed();
    let fetches_for_eight = hole.accepted();

    // During the back-off: answered at once, no new fetch.
    let mut later = Vec::new();
    for _ in 0..3 {
        later.push(call().await);
    }
    let fetches_total = hole.accepted();
    let evidence = format!(
        "other listeners before the outage: api {api_before:?}, ops {ops_before:?}; \
         while the key set hangs: api {api_during:?}, ops {ops_during:?} \
         ({finished_before_probe} of 8 CSE calls answered by then); \
         8 concurrent calls answered in {all_answered:?} with {fetches_for_eight} fetches: {:?}; \
         3 calls after them: {:?}; fetches in all: {fetches_total}",
        answers
            .iter()
            .map(|(st, _, ra, t)| (*st, ra.clone(), *t))
            .collect::<Vec<_>>(),
        later
            .iter()
            .map(|(st, _, ra, t)| (*st, ra.clone(), *t))
            .collect::<Vec<_>>(),
    );
    eprintln!("{evidence}");

    // The other listeners answered while every CSE call still waited on the key set. The
    // bound is not a performance target: the fetch hangs 10 s, and a listener blocked
    // behind it would take at least that.
    assert_eq!(finished_before_probe, 0, "{evidence}");
    let prompt = |t: &Timed| t.as_ref().is_ok_and(|t| *t < Duration::from_secs(2));
    assert!(prompt(&api_during) && prompt(&ops_during), "{evidence}");
    // One fetch for the eight calls and none during the back-off.
    assert_eq!(fetches_for_eight, 1, "{evidence}");
    assert_eq!(fetches_total, 1, "{evidence}");
    // Each call: 503 in the protocol's error body, with a Retry-After.
    for (st, body, retry_after, _) in answers.iter().chain(&later) {
        assert_eq!(*st, 503, "{body} / {evidence}");
        assert_eq!(body["code"], 503, "{body}");
        assert!(
            retry_after
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|s| (1..=60).contains(&s)),
            "Retry-After: {retry_after:?}"
        );
    }
}

/// Issue 24: what Google sends that Keyhold refused.
/// - An IdP that is Google itself issues ID tokens whose `iss` is `accounts.google.com` or
///   `https://accounts.google.com` (Google Identity, "Verify the Google ID token"); one
///   configured entry accepts both.
/// - Google's KACLS reference changes over time (its token schemas end in "...", and its
///   pages gained `google_email` and `delegated_to`): a request field Keyhold does not
///   know is ignored, not a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cse_takes_google_id_tokens_and_fields_google_adds() {
    let keys = tempfile::tempdir().unwrap();
    let google = issuer(keys.path(), "google");
    let idp = issuer(keys.path(), "idp");
    let s = cse_server(keys.path(), KACLS, "https://accounts.google.com", "").await;
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!("https://localhost:{}/cse", s.public_addr.unwrap().port());
    let call = |op: &'static str, body: Value| {
        let (client, url) = (client.clone(), format!("{base}/{op}"));
        async move {
            let r = client
                .post(url)
                .header("origin", ORIGIN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let resource = "//googleapis.com/drive/files/xyz";
    let dek = [0x11u8; 32];
    let (st, w) = call(
        "wrap",
        json!({
            "authentication": sign(&idp, &authn(json!({"iss": "accounts.google.com"}))),
            "authorization": sign(&google, &authz("writer", resource, json!({}))),
            "key": B64.encode(dek), "reason": "",
            "a_field_added_later": "keyhold does not know it",
        }),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let (st, u) = call(
        "unwrap",
        json!({
            "authentication": sign(&idp, &authn(json!({"iss": "https://accounts.google.com"}))),
            "authorization": sign(&google, &authz("reader", resource, json!({}))),
            "wrapped_key": w["wrapped_key"], "reason": "", "some_future_field": {"nested": true},
        }),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(B64.decode(u["key"].as_str().unwrap()).unwrap(), dek);
    // Another issuer is still refused.
    let (st, _) = call(
        "unwrap",
        json!({
            "authentication": sign(&idp, &authn(json!({"iss": "https://idp.elsewhere"}))),
            "authorization": sign(&google, &authz("reader", resource, json!({}))),
            "wrapped_key": w["wrapped_key"], "reason": "",
        }),
    )
    .await;
    assert_eq!(st, 401);
}
