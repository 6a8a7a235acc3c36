//! Microsoft Double Key Encryption over real TLS (issue 11): a local token issuer in
//! place of Entra ID (its own RSA key, a JWK set file), tokens minted by `jsonwebtoken`
//! and by Python's PyJWT, ciphertexts made by `openssl pkeyutl` from the public key the
//! GET returns. Every check fails on its own: no token, expired, wrong audience or
//! issuer, `none`, a tampered payload, a user not allowed, a wrong `alg`, bad base64, an
//! unknown key name or key id, a disabled key; a rolled key keeps decrypting by its id;
//! every call is audited with the user and never the plaintext.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

const ISS: &str = "https://sts.windows.net/test-tenant/";
const URL: &str = "https://localhost/dke";
const DKE_IDENTITY: &str = "spiffe://test/acme/dke";
const CHALLENGE: &str = "Bearer resource=\"https://localhost/dke\", authorization=\"https://login.windows.net/common/oauth2/authorize\", realm=\"https://localhost/dke\"";

use keyhold_tests::TokenIssuer as Issuer;

fn issuer() -> Issuer {
    Issuer::new("issuer-1")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "aud": URL, "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn token(issuer: &Issuer, claims: &Value) -> String {
    issuer.sign(claims)
}

/// Encrypts `plain` with the public key of a DKE GET answer, with OpenSSL.
fn openssl_encrypt(dir: &std::path::Path, key: &Value, plain: &[u8]) -> String {
    use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
    let n = rsa::BigUint::from_bytes_be(&B64.decode(key["n"].as_str().unwrap()).unwrap());
    let e = rsa::BigUint::from(key["e"].as_u64().unwrap());
    let public = rsa::RsaPublicKey::new(n, e).unwrap();
    let pem = dir.join("dke-public.pem");
    std::fs::write(&pem, public.to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
    let input = dir.join("plain.bin");
    std::fs::write(&input, plain).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
        .arg(&pem)
        .args([
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
            "-in",
        ])
        .arg(&input)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    B64.encode(out.stdout)
}

struct Dke {
    s: TestServer,
    issuer: Issuer,
    client: reqwest::Client,
    base: String,
    _keys: tempfile::TempDir,
}

impl Dke {
    async fn start() -> Dke {
        let keys = tempfile::tempdir().unwrap();
        let issuer = issuer();
        let jwks = keys.path().join("jwks.json");
        issuer.write_jwks(&jwks);
        let extra = format!(
            r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[dke]
url = "{URL}"
issuers = ["{ISS}"]
jwks = "{jwks}"
tenant = "acme"
identity = "{DKE_IDENTITY}"

[[dke.keys]]
name = "finance"
key = "finance-dke"
emails = ["Alice@Example.com"]

[[dke.keys]]
name = "hr"
key = "hr-dke"
groups = ["hr-group-id"]
"#,
            jwks = jwks.display()
        );
        let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
        let admin = s.client(Some("admin-a"));
        for key in ["finance-dke", "hr-dke"] {
            let r = post(
                &admin,
                &s.url("/v1/keys"),
                json!({"name": key, "algorithm": "rsa-oaep-2048-sha256",
                       "grants": [{"identity": DKE_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
            )
            .await;
            assert_eq!(r.0, 201, "{r:?}");
        }
        let client = keyhold_tests::client_for(&s.pki, None, false);
        let base = format!("https://localhost:{}", s.public_addr.unwrap().port());
        Dke {
            s,
            issuer,
            client,
            base,
            _keys: keys,
        }
    }

    async fn get_key(&self, name: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}/dke/{name}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST `{kid path}/decrypt`: (status, WWW-Authenticate, body).
    async fn decrypt(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Option<String>, Value) {
        let mut req = self
            .client
            .post(format!("{}{path}/decrypt", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, challenge, r.json().await.unwrap_or(Value::Null))
    }
}

/// The kid's path (`/dke/{name}/{keyId}`).
fn kid_path(key: &Value) -> String {
    let kid = key["kid"].as_str().unwrap();
    kid.strip_prefix("https://localhost").unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dke_serves_office_clients_and_refuses_each_bad_call_on_its_own() {
    let d = Dke::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The public key, anonymous, in the sample service's shape.
    let (st, got) = d.get_key("finance").await;
    assert_eq!(st, 200, "{got:?}");
    let key = &got["key"];
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["alg"], "RS256");
    assert_eq!(key["e"], 65537);
    assert_eq!(B64.decode(key["n"].as_str().unwrap()).unwrap().len(), 256);
    assert!(key["kid"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{URL}/finance/")));
    assert!(key["kid"].as_str().unwrap().ends_with("-1"));
    let exp = got["cache"]["exp"].as_str().unwrap();
    assert_eq!((exp.len(), &exp[10..11]), (19, "T"), "{exp}");
    assert_eq!(d.get_key("nope").await.0, 400);
    // Nothing else is served on the public listener.
    let r = d
        .client
        .get(format!("{}/v1/keys", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A blob encrypted by OpenSSL with that key decrypts for Alice (any case of her email).
    let secret = [42u8; 32];
    let value = openssl_encrypt(dir.path(), key, &secret);
    let path = kid_path(key);
    let alice = token(&d.issuer, &claims(json!({"email": "alice@example.COM"})));
    let body = json!({"alg": "RSA-OAEP-256", "value": value});
    let (st, _, ok) = d.decrypt(&path, Some(&alice), body.clone()).await;
    assert_eq!(st, 200, "{ok:?}");
    assert_eq!(B64.decode(ok["value"].as_str().unwrap()).unwrap(), secret);
    // ... and through `upn` when there is no `email`.
    let by_upn = token(&d.issuer, &claims(json!({"upn": "alice@example.com"})));
    assert_eq!(d.decrypt(&path, Some(&by_upn), body.clone()).await.0, 200);

    // No token, or a bad one: 401 with the exact challenge, each on its own.
    let mut bad: Vec<(&str, String)> = vec![("no token", String::new())];
    let mut expired = claims(json!({"email": "alice@example.com"}));
    expired["exp"] = json!(now() - 3600);
    bad.push(("expired", token(&d.issuer, &expired)));
    let mut aud = claims(json!({"email": "alice@example.com"}));
    aud["aud"] = json!("https://elsewhere.example");
    bad.push(("wrong audience", token(&d.issuer, &aud)));
    let mut iss = claims(json!({"email": "alice@example.com"}));
    iss["iss"] = json!("https://sts.windows.net/other-tenant/");
    bad.push(("wrong issuer", token(&d.issuer, &iss)));
    let parts: Vec<&str> = alice.split('.').collect();
    let none_header = B64URL.encode(r#"{"alg":"none","kid":"issuer-1","typ":"JWT"}"#);
    bad.push(("alg none", format!("{none_header}.{}.", parts[1])));
    let mallory = B64URL.encode(claims(json!({"email": "mallory@example.com"})).to_string());
    bad.push(("tampered", format!("{}.{mallory}.{}", parts[0], parts[2])));
    bad.push((
        "another issuer's key",
        token(&issuer(), &claims(json!({"email": "alice@example.com"}))),
    ));
    for (what, t) in &bad {
        let token = (!t.is_empty()).then_some(t.as_str());
        let (st, challenge, _) = d.decrypt(&path, token, body.clone()).await;
        assert_eq!(st, 401, "{what}");
        assert_eq!(challenge.as_deref(), Some(CHALLENGE), "{what}");
    }

    // Issue 24: the sample service's 401 also names the resource and the authorization
    // server in headers of their own (Azure-Samples/DoubleKeyEncryptionService,
    // src/customer-key-store/Startup.cs, JwtBearerEvents.OnChallenge).
    let r = d
        .client
        .post(format!("{}{path}/decrypt", d.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("resource").as_deref(), Some(URL));
    assert_eq!(
        header("authorization").as_deref(),
        Some("https://login.windows.net/common/oauth2/authorize")
    );
    // A field the sample's EncryptedData model does not know is ignored, as ASP.NET's
    // model binding ignores it.
    let mut extra = body.clone();
    extra["cty"] = json!("application/octet-stream");
    let (st, _, ok) = d.decrypt(&path, Some(&alice), extra).await;
    assert_eq!(st, 200, "{ok:?}");
    assert_eq!(B64.decode(ok["value"].as_str().unwrap()).unwrap(), secret);

    // Authenticated, but not allowed: 403. Bad requests: 400.
    let bob = token(&d.issuer, &claims(json!({"email": "bob@example.com"})));
    assert_eq!(d.decrypt(&path, Some(&bob), body.clone()).await.0, 403);
    let wrong_alg = json!({"alg": "RSA1_5", "value": body["value"]});
    assert_eq!(d.decrypt(&path, Some(&alice), wrong_alg).await.0, 400);
    let not_b64 = json!({"alg": "RSA-OAEP-256", "value": "***"});
    assert_eq!(d.decrypt(&path, Some(&alice), not_b64).await.0, 400);
    let garbage = json!({"alg": "RSA-OAEP-256", "value": B64.encode([7u8; 256])});
    assert_eq!(d.decrypt(&path, Some(&alice), garbage).await.0, 400);
    let (id_and_version, _) = (path.rsplit('/').next().unwrap(), ());
    let unknown_id = path.replace(id_and_version, "00000000000000000000000000000000-1");
    assert_eq!(
        d.decrypt(&unknown_id, Some(&alice), body.clone()).await.0,
        400
    );
    assert_eq!(
        d.decrypt("/dke/nope/x-1", Some(&alice), body.clone())
            .await
            .0,
        400
    );

    // A group member uses the key mapped to the group.
    let (_, hr) = d.get_key("hr").await;
    let hr_value = openssl_encrypt(dir.path(), &hr["key"], &secret);
    let hr_body = json!({"alg": "RSA-OAEP-256", "value": hr_value});
    let member = token(
        &d.issuer,
        &claims(json!({"email": "bob@example.com", "groups": ["hr-group-id"]})),
    );
    assert_eq!(
        d.decrypt(&kid_path(&hr["key"]), Some(&member), hr_body.clone())
            .await
            .0,
        200
    );
    // Alice is not in it.
    assert_eq!(
        d.decrypt(&kid_path(&hr["key"]), Some(&alice), hr_body)
            .await
            .0,
        403
    );

    // Rolled: the GET gives version 2; the version-1 blob still decrypts by its key id.
    let admin = d.s.client(Some("admin-a"));
    let r = post(&admin, &d.s.url("/v1/keys/finance-dke/rotate"), json!({})).await;
    assert_eq!(r.0, 200, "{r:?}");
    let (_, rolled) = d.get_key("finance").await;
    assert!(rolled["key"]["kid"].as_str().unwrap().ends_with("-2"));
    assert_ne!(rolled["key"]["n"], key["n"]);
    assert_eq!(d.decrypt(&path, Some(&alice), body.clone()).await.0, 200);
    let v2 = json!({"alg": "RSA-OAEP-256", "value": openssl_encrypt(dir.path(), &rolled["key"], &secret)});
    assert_eq!(
        d.decrypt(&kid_path(&rolled["key"]), Some(&alice), v2.clone())
            .await
            .0,
        200
    );
    // A version-2 blob under the version-1 id does not open.
    assert_eq!(d.decrypt(&path, Some(&alice), v2).await.0, 400);

    // Disabled in Keyhold: DKE stops at once, both endpoints.
    let r = post(&admin, &d.s.url("/v1/keys/finance-dke/disable"), json!({})).await;
    assert_eq!(r.0, 200, "{r:?}");
    assert_ne!(d.get_key("finance").await.0, 200);
    assert_ne!(d.decrypt(&path, Some(&alice), body.clone()).await.0, 200);

    // Every call is in the audit trail, with the user, and never the plaintext.
    let auditor = d.s.kms_client("auditor-a");
    let verified = auditor.audit_verify(true).await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");
    let page = auditor.audit_page(0, 1000).await.unwrap();
    let dke: Vec<_> = page
        .records
        .iter()
        .filter(|r| r.operation.starts_with("DKE "))
        .collect();
    assert!(dke.iter().any(|r| r.operation == "DKE decrypt"
        && r.outcome == "ok"
        && r.attributes
            .as_ref()
            .and_then(|a| a.get("user"))
            .map(String::as_str)
            == Some("alice@example.com")));
    assert!(dke
        .iter()
        .any(|r| r.operation == "DKE decrypt" && r.status == 403));
    let all = serde_json::to_string(&page.records).unwrap();
    assert!(!all.contains(&B64.encode(secret)));
}

/// Tokens minted by a JWT library we did not write (Python's PyJWT) are accepted; the
/// same token with one payload byte changed is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dke_accepts_tokens_minted_by_pyjwt() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import jwt"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(std::env::var_os("CI").is_none(), "CI must install PyJWT");
        eprintln!("skipped: PyJWT is not installed (python3 -m pip install PyJWT)");
        return;
    }
    let d = Dke::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, got) = d.get_key("finance").await;
    let value = openssl_encrypt(dir.path(), &got["key"], &[9u8; 32]);
    let pem = dir.path().join("issuer.pem");
    std::fs::write(&pem, &d.issuer.pem).unwrap();
    let script = format!(
        "import jwt, time\nprint(jwt.encode({{'iss': '{ISS}', 'aud': '{URL}', 'email': 'alice@example.com', 'exp': int(time.time()) + 600}}, open('{}').read(), algorithm='RS256', headers={{'kid': 'issuer-1'}}))",
        pem.display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let body = json!({"alg": "RSA-OAEP-256", "value": value});
    let path = kid_path(&got["key"]);
    let (st, _, ok) = d.decrypt(&path, Some(&token), body.clone()).await;
    assert_eq!(st, 200, "{ok:?}");
    assert_eq!(
        B64.decode(ok["value"].as_str().unwrap()).unwrap(),
        [9u8; 32]
    );
    // One character of the payload changed.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut payload = parts[1].clone().into_bytes();
    payload[5] = if payload[5] == b'A' { b'B' } else { b'A' };
    parts[1] = String::from_utf8(payload).unwrap();
    let (st, challenge, _) = d.decrypt(&path, Some(&parts.join(".")), body).await;
    assert_eq!(st, 401);
    assert_eq!(challenge.as_deref(), Some(CHALLENGE));
}

/// Issue 22: browsers call the public listener. Every answer there says HTTPS only (HSTS)
/// and no content sniffing; an answer carrying key material (here a DKE decrypt) says it
/// must not be stored. The `/v1` answers with DEKs say the same (`datakey`, `unwrap`,
/// `batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_answers_carry_browser_headers_and_key_material_is_never_stored() {
    let d = Dke::start().await;
    let dir = tempfile::tempdir().unwrap();
    for path in ["/dke/finance", "/nowhere"] {
        let r = d
            .client
            .get(format!("{}{path}", d.base))
            .send()
            .await
            .unwrap();
        let h = r.headers();
        assert_eq!(h["strict-transport-security"], "max-age=31536000", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
    }
    let (_, got) = d.get_key("finance").await;
    let key = &got["key"];
    let value = openssl_encrypt(dir.path(), key, &[42u8; 32]);
    let alice = token(&d.issuer, &claims(json!({"email": "alice@example.com"})));
    let r = d
        .client
        .post(format!("{}{}/decrypt", d.base, kid_path(key)))
        .bearer_auth(alice)
        .json(&json!({"alg": "RSA-OAEP-256", "value": value}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");

    // The mTLS API's answers with DEKs.
    let s = &d.s;
    let app = s.client(Some("app-a"));
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "k", "grants": [{"identity": keyhold_tests::APP_A, "operations": ["datakey", "unwrap"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    let dk = app
        .post(s.url("/v1/keys/k/datakey"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(dk.headers()["cache-control"], "no-store");
    let wrapped = dk.json::<Value>().await.unwrap()["wrapped"].clone();
    for (path, body) in [
        ("/v1/unwrap", json!({"wrapped": wrapped})),
        (
            "/v1/batch",
            json!({"items": [{"op": "unwrap", "wrapped": wrapped}]}),
        ),
    ] {
        let r = app.post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
    }
}

/// Issue 24: Microsoft's deployment checklist puts the key URL at the root of its host
/// (`https://<host>/<key name>`, as the sample service routes `{keyName}` and
/// `{keyName}/{keyId}/Decrypt`). `[dke] mount = "/"` serves DKE there; the token audience
/// and the key ids follow `[dke] url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dke_is_served_at_the_root_of_its_host() {
    const ROOT_URL: &str = "https://localhost";
    let keys = tempfile::tempdir().unwrap();
    let issuer = issuer();
    let jwks = keys.path().join("jwks.json");
    issuer.write_jwks(&jwks);
    let extra = format!(
        r#"
[public]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[dke]
url = "{ROOT_URL}"
mount = "/"
issuers = ["{ISS}"]
jwks = "{jwks}"
tenant = "acme"
identity = "{DKE_IDENTITY}"

[[dke.keys]]
name = "finance"
key = "finance-dke"
emails = ["alice@example.com"]
"#,
        jwks = jwks.display()
    );
    let s = TestServer::start_with(TestSeal::KeyFile, &extra).await;
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "finance-dke", "algorithm": "rsa-oaep-2048-sha256",
               "grants": [{"identity": DKE_IDENTITY, "operations": ["wrap", "unwrap"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!("https://localhost:{}", s.public_addr.unwrap().port());
    let got: Value = client
        .get(format!("{base}/finance"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = &got["key"];
    let kid = key["kid"].as_str().unwrap();
    assert!(kid.starts_with(&format!("{ROOT_URL}/finance/")), "{kid}");
    let dir = tempfile::tempdir().unwrap();
    let secret = [9u8; 32];
    let value = openssl_encrypt(dir.path(), key, &secret);
    let mut c = claims(json!({"email": "alice@example.com"}));
    c["aud"] = json!(ROOT_URL);
    let alice = token(&issuer, &c);
    let path = kid.strip_prefix(ROOT_URL).unwrap();
    let r = client
        .post(format!("{base}{path}/decrypt"))
        .bearer_auth(alice)
        .json(&json!({"alg": "RSA-OAEP-256", "value": value}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ok: Value = r.json().await.unwrap();
    assert_eq!(B64.decode(ok["value"].as_str().unwrap()).unwrap(), secret);
    // Not under /dke any more.
    let r = client
        .get(format!("{base}/dke/finance"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
