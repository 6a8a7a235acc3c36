//! Google Workspace client-side encryption over real TLS (issue 11): two local token
//! issuers (one playing Google's authorization service, one the customer's IdP), each
//! with its JWK set file. Status, wrap, unwrap, digest; each mandatory check failing on
//! its own, with the protocol's error body; the CORS preflight; the audit records.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

const GOOGLE: &str = "gsuitecse-tokenissuer-drive@system.gserviceaccount.com";
const IDP: &str = "https://idp.test/";
const IDP_AUD: &str = "kacls-test";
const KACLS: &str = "https://kacls.test/cse";
const CSE_IDENTITY: &str = "spiffe://test/acme/cse";
const ORIGIN: &str = "https://client-side-encryption.google.com";

struct Issuer {
    pem: String,
    kid: String,
}

fn issuer(dir: &std::path::Path, name: &str) -> Issuer {
    use aws_lc_rs::encoding::AsDer as _;
    use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
    use rsa::traits::PublicKeyParts as _;
    let generated =
        aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let key = rsa::RsaPrivateKey::from_pkcs8_der(generated.as_der().unwrap().as_ref()).unwrap();
    let kid = format!("{name}-1");
    let jwks = json!({"keys": [{
        "kty": "RSA", "kid": kid, "use": "sig",
        "n": B64URL.encode(key.n().to_bytes_be()),
        "e": B64URL.encode(key.e().to_bytes_be()),
    }]});
    std::fs::write(dir.join(format!("{name}.json")), jwks.to_string()).unwrap();
    Issuer {
        pem: key.to_pkcs8_pem(Default::default()).unwrap().to_string(),
        kid,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(issuer: &Issuer, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(issuer.kid.clone());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(issuer.pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Google's authorization claims for `role` on `resource`, changed by `extra`.
fn authz(role: &str, resource: &str, extra: Value) -> Value {
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

fn authn(extra: Value) -> Value {
    let mut c = json!({"iss": IDP, "aud": IDP_AUD, "email": "alice@example.com",
                       "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
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
        kms_server::cse::resource_key_hash(&dek, resource, "")
    );

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
        (
            "unknown field",
            "wrap",
            json!({"authentication": "", "authorization": "", "key": "", "reason": "", "extra": 1}),
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
        kms_server::cse::resource_key_hash(&dek, resource, "allowed-perimeter")
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
