//! Google Workspace CSE delegation (issue 24), from Google's KACLS reference: "Method:
//! delegate" (request `{authentication, authorization, reason}`, answer
//! `{delegated_authentication}`, the required processing steps) and "KACLS authentication
//! token for delegate" (the delegated token carries `delegated_to` and `resource_name`;
//! it is valid only with a delegated authorization token whose `delegated_to` and
//! `resource_name` match). The delegated token is verified by PyJWT against this KACLS's
//! `/certs`, a verifier Keyhold did not write.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::cse::{authn, authz, cse_server, issuer, now, sign, IDP};

const KACLS: &str = "https://kacls.test/cse";
const DEVICE: &str = "meet-room-device-42";

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64URL.decode(payload).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cse_delegates_one_resource_to_another_entity() {
    let keys = tempfile::tempdir().unwrap();
    let google = issuer(keys.path(), "google");
    let idp = issuer(keys.path(), "idp");
    let signer = issuer(keys.path(), "kacls-signer");
    let signing_key = keys.path().join("signing.pem");
    std::fs::write(&signing_key, &signer.pem).unwrap();
    let extra = format!(
        "signing_key = \"{}\"\nowner_domain = \"Example.com\"",
        signing_key.display()
    );
    let s = cse_server(keys.path(), KACLS, IDP, &extra).await;
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!("https://localhost:{}/cse", s.public_addr.unwrap().port());
    let call = |op: &'static str, body: Value| {
        let (client, url) = (client.clone(), format!("{base}/{op}"));
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let resource = "//googleapis.com/meet/meetings/abc";
    let other = "//googleapis.com/meet/meetings/other";
    let dek = [0x5au8; 32];
    let alice = || sign(&idp, &authn(json!({})));
    let (st, w) = call(
        "wrap",
        json!({"authentication": alice(), "key": B64.encode(dek), "reason": "",
               "authorization": sign(&google, &authz("writer", resource, json!({})))}),
    )
    .await;
    assert_eq!(st, 200, "{w}");
    let wrapped = w["wrapped_key"].clone();
    // Google's delegated authorization token: who may act, for which resource.
    let delegated_authz = |role: &str, res: &str, to: &str| {
        sign(
            &google,
            &authz(
                role,
                res,
                json!({"delegated_to": to, "kacls_owner_domain": "example.com"}),
            ),
        )
    };

    // /status lists delegate.
    let status: Value = client
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status["operations_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("delegate")));

    // Delegate: Alice lets the device act on this resource.
    let alice_exp = now() + 600;
    let (st, d) = call(
        "delegate",
        json!({"authentication": sign(&idp, &authn(json!({"exp": alice_exp}))),
               "authorization": delegated_authz("reader", resource, DEVICE),
               "reason": "{\"client\": \"meet room\"}"}),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    let token = d["delegated_authentication"].as_str().unwrap().to_owned();
    let c = claims(&token);
    assert_eq!(c["delegated_to"], DEVICE);
    assert_eq!(c["resource_name"], resource);
    assert_eq!(c["email"], "alice@example.com");
    assert_eq!(c["iss"], KACLS);
    assert!(
        c["exp"].as_i64().unwrap() <= alice_exp,
        "never beyond the original"
    );

    // A verifier Keyhold did not write: PyJWT checks the delegated token with /certs.
    let certs: Value = client
        .get(format!("{base}/certs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let script = "import json, sys, jwt\nkeys = json.loads(sys.argv[1])['keys']\nkey = jwt.PyJWK(keys[0]).key\nprint(json.dumps(jwt.decode(sys.argv[2], key, algorithms=['RS256'], audience=sys.argv[3], issuer=sys.argv[3])))";
    let out = std::process::Command::new("python3")
        .args(["-c", script, &certs.to_string(), &token, KACLS])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PyJWT (CI installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified["delegated_to"], DEVICE);

    // The device unwraps and wraps that resource with the delegated pair.
    let (st, u) = call(
        "unwrap",
        json!({"authentication": token, "wrapped_key": wrapped, "reason": "",
               "authorization": delegated_authz("reader", resource, DEVICE)}),
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(B64.decode(u["key"].as_str().unwrap()).unwrap(), dek);
    let (st, w2) = call(
        "wrap",
        json!({"authentication": token, "key": B64.encode(dek), "reason": "",
               "authorization": delegated_authz("writer", resource, DEVICE)}),
    )
    .await;
    assert_eq!(st, 200, "{w2}");

    // Each refusal on its own.
    let refused = [
        (
            "a delegated authentication token with an ordinary authorization token",
            "unwrap",
            json!({"authentication": token, "wrapped_key": wrapped, "reason": "",
                   "authorization": sign(&google, &authz("reader", resource, json!({})))}),
            403,
        ),
        (
            "an ordinary authentication token with a delegated authorization token",
            "unwrap",
            json!({"authentication": alice(), "wrapped_key": wrapped, "reason": "",
                   "authorization": delegated_authz("reader", resource, DEVICE)}),
            403,
        ),
        (
            "delegated to another entity",
            "unwrap",
            json!({"authentication": token, "wrapped_key": wrapped, "reason": "",
                   "authorization": delegated_authz("reader", resource, "another-device")}),
            403,
        ),
        (
            "the delegated token for another resource",
            "wrap",
            json!({"authentication": token, "key": B64.encode(dek), "reason": "",
                   "authorization": delegated_authz("writer", other, DEVICE)}),
            403,
        ),
        (
            "a delegated token delegated again",
            "delegate",
            json!({"authentication": token, "reason": "",
                   "authorization": delegated_authz("reader", resource, "third")}),
            403,
        ),
        (
            "delegate without delegated_to",
            "delegate",
            json!({"authentication": alice(), "reason": "",
                   "authorization": sign(&google, &authz("reader", resource, json!({})))}),
            403,
        ),
        (
            "delegate for another user",
            "delegate",
            json!({"authentication": sign(&idp, &authn(json!({"email": "mallory@example.com"}))),
                   "reason": "", "authorization": delegated_authz("reader", resource, DEVICE)}),
            403,
        ),
        (
            "another domain's KACLS (kacls_owner_domain)",
            "delegate",
            json!({"authentication": alice(), "reason": "",
                   "authorization": sign(&google, &authz("reader", resource,
                        json!({"delegated_to": DEVICE, "kacls_owner_domain": "elsewhere.example"})))}),
            403,
        ),
        (
            "a reason over 1 KB",
            "delegate",
            json!({"authentication": alice(), "reason": "x".repeat(1025),
                   "authorization": delegated_authz("reader", resource, DEVICE)}),
            400,
        ),
        (
            "a delegated token is not a privileged user's",
            "privilegedunwrap",
            json!({"authentication": token, "wrapped_key": wrapped,
                   "resource_name": resource, "reason": ""}),
            401,
        ),
        (
            "a token claiming this KACLS as issuer, signed by another key",
            "unwrap",
            json!({"authentication": sign(&idp, &json!({"iss": KACLS, "aud": KACLS,
                       "email": "alice@example.com", "delegated_to": DEVICE,
                       "resource_name": resource, "iat": now(), "exp": now() + 60})),
                   "wrapped_key": wrapped, "reason": "",
                   "authorization": delegated_authz("reader", resource, DEVICE)}),
            401,
        ),
    ];
    for (what, op, body, want) in refused {
        let (st, e) = call(op, body).await;
        assert_eq!(st, want, "{what}: {e}");
        assert_eq!(
            e["code"],
            json!(want),
            "{what}: the protocol's error body: {e}"
        );
    }

    // Audited: the user, the delegate, the resource and the reason.
    let page = s.kms_client("auditor-a").audit_page(0, 1000).await.unwrap();
    let rec = page
        .records
        .iter()
        .find(|r| r.operation == "CSE delegate" && r.outcome == "ok")
        .expect("a CSE delegate record");
    let attrs = rec.attributes.as_ref().unwrap();
    assert_eq!(attrs["user"], "alice@example.com");
    assert_eq!(attrs["delegated_to"], DEVICE);
    assert_eq!(attrs["resource"], resource);
    assert!(attrs["reason"].contains("meet room"));
    let all = serde_json::to_string(&page.records).unwrap();
    assert!(
        !all.contains(&token),
        "no delegated token in the audit trail"
    );
}
