//! Salesforce cache-only keys over real TLS (issue 12): the callout with its credential
//! gets `{"kid","jwe"}`; the JWE's header is exactly alg/enc/kid (+ jti echoing the nonce);
//! a JOSE library we did not write (Python's jwcrypto) opens it with the test
//! certificate's private key and finds the 32 bytes Keyhold holds; wrong credential,
//! unknown key identifier, a data key made for another identifier, rotation to a new
//! identifier, a disabled key; and the optional client certificate on the route.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};

use crate::post;

const SF_IDENTITY: &str = "spiffe://test/acme/salesforce";
const SECRET: &str = "named-credential-secret-0123456789";
/// The nonce of Salesforce's replay detection, as its Security Implementation Guide shows
/// it ("Replay Detection for Cache-Only Keys": 32 hex characters, echoed as the JWE's
/// `jti`); sent as the `requestId` query parameter (p15r/distributey,
/// `distributey/input_validation.py`, built against real orgs).
const REQUEST_ID: &str = "e5ab58fd2ced013f2a46d5c8144dd439";

/// A self-signed RSA certificate standing in for Salesforce's BYOK certificate (made by
/// `openssl req`, 4096 bits as Salesforce's), its private key, and the Named Credential's
/// secret in a file: (certificate, key, secret file) under `dir`.
fn byok_files(
    dir: &std::path::Path,
    bits: u32,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("sf.crt"), dir.join("sf.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            &format!("rsa:{bits}"),
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=salesforce-byok-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = dir.join("credential");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    (cert, key, secret)
}

/// The Keyhold key `sf-kek`: the Salesforce identity may unwrap under it, the app make
/// data keys (the keys served to Salesforce).
async fn create_sf_kek(s: &TestServer) {
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys"),
        json!({"name": "sf-kek", "grants": [
        {"identity": SF_IDENTITY, "operations": ["unwrap"]},
        {"identity": keyhold_tests::APP_A, "operations": ["datakey"]}]}),
    )
    .await;
    assert_eq!(r.0, 201, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_callouts_get_a_jwe_only_salesforce_can_open() {
    let files = tempfile::tempdir().unwrap();
    let (cert, key, secret) = byok_files(files.path(), 4096);
    let table = |keys: &str| {
        format!(
            "\n[public]\nlisten = \"127.0.0.1:0\"\ncert = \"pki/server.pem\"\nkey = \"pki/server-key.pem\"\n\n[salesforce]\ntenant = \"acme\"\nidentity = \"{SF_IDENTITY}\"\ncredential_file = \"{}\"\ncertificate = \"{}\"\n{keys}",
            secret.display(),
            cert.display()
        )
    };
    let mut s = TestServer::start_with(TestSeal::KeyFile, &table("")).await;
    // The Keyhold key, and data keys made for two key identifiers (as an app would).
    create_sf_kek(&s).await;
    let app = s.client(Some("app-a"));
    let mut made = Vec::new();
    for kid in ["sf-2026-11", "sf-2027-02"] {
        let dk = post(
            &app,
            &s.url("/v1/keys/sf-kek/datakey"),
            json!({"context": {"salesforce": kid}}),
        )
        .await;
        assert_eq!(dk.0, 200, "{dk:?}");
        made.push((
            kid,
            dk.1["wrapped"].as_str().unwrap().to_owned(),
            B64.decode(dk.1["plaintext"].as_str().unwrap()).unwrap(),
        ));
    }
    // A third entry whose data key was made for another identifier: never served.
    let keys = format!(
        "[[salesforce.keys]]\nkid = \"{}\"\nkey = \"sf-kek\"\nwrapped = \"{}\"\n\n[[salesforce.keys]]\nkid = \"{}\"\nkey = \"sf-kek\"\nwrapped = \"{}\"\n\n[[salesforce.keys]]\nkid = \"sf-mismatch\"\nkey = \"sf-kek\"\nwrapped = \"{}\"\n",
        made[0].0, made[0].1, made[1].0, made[1].1, made[0].1
    );
    let text = std::fs::read_to_string(&s.config).unwrap();
    let start = text.find("\n[public]").unwrap();
    std::fs::write(&s.config, format!("{}{}", &text[..start], table(&keys))).unwrap();
    s.restart().await;
    s.wait_ready().await;

    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!(
        "https://localhost:{}/salesforce",
        s.public_addr.unwrap().port()
    );
    let get = |path: String, secret: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = client.get(path);
            if let Some(sec) = secret {
                req = req.bearer_auth(sec);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let header_of = |jwe: &str| -> Value {
        serde_json::from_slice(&B64URL.decode(jwe.split('.').next().unwrap()).unwrap()).unwrap()
    };
    let open = |jwe: &str| -> Vec<u8> {
        let script = "import sys\nfrom jwcrypto import jwk, jwe\nk = jwk.JWK.from_pem(open(sys.argv[1], 'rb').read())\nt = jwe.JWE()\nt.allowed_algs = ['RSA-OAEP', 'A256GCM']\nt.deserialize(sys.argv[2], key=k)\nprint(t.payload.hex())";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&key)
            .arg(jwe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "jwcrypto: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hex = String::from_utf8(out.stdout).unwrap();
        (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex.trim()[i..i + 2], 16).unwrap())
            .collect()
    };
    let have_jwcrypto = std::process::Command::new("python3")
        .args(["-c", "import jwcrypto"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_jwcrypto || std::env::var_os("CI").is_none(),
        "CI must install jwcrypto"
    );

    // With replay detection's nonce (`requestId`, 32 hex): header exactly alg, enc, kid,
    // jti; the payload is the data key.
    let (st, body) = get(
        format!("{base}/{}?requestId={REQUEST_ID}", made[0].0),
        Some(SECRET),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["kid"], made[0].0);
    let jwe = body["jwe"].as_str().unwrap();
    assert_eq!(jwe.split('.').count(), 5);
    assert_eq!(
        header_of(jwe),
        json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": made[0].0, "jti": REQUEST_ID})
    );
    assert_eq!(
        B64URL.decode(jwe.split('.').nth(2).unwrap()).unwrap().len(),
        12,
        "96-bit IV"
    );
    assert_eq!(
        B64URL.decode(jwe.split('.').nth(4).unwrap()).unwrap().len(),
        16,
        "128-bit tag"
    );
    assert_eq!(
        B64URL.decode(jwe.split('.').nth(1).unwrap()).unwrap().len(),
        512,
        "RSA-4096 wrapped content key"
    );
    if have_jwcrypto {
        assert_eq!(
            open(jwe),
            made[0].2,
            "jwcrypto opens the JWE to the data key"
        );
    }
    // Without a nonce: exactly alg, enc, kid.
    let (st, body) = get(format!("{base}/{}", made[0].0), Some(SECRET)).await;
    assert_eq!(st, 200);
    assert_eq!(
        header_of(body["jwe"].as_str().unwrap()),
        json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": made[0].0})
    );
    // Rotation: the new identifier serves its own, different key.
    let (st, body) = get(format!("{base}/{}", made[1].0), Some(SECRET)).await;
    assert_eq!(st, 200);
    if have_jwcrypto {
        let second = open(body["jwe"].as_str().unwrap());
        assert_eq!(second, made[1].2);
        assert_ne!(second, made[0].2);
    }
    // Refusals.
    assert_eq!(get(format!("{base}/{}", made[0].0), None).await.0, 401);
    assert_eq!(
        get(
            format!("{base}/{}", made[0].0),
            Some("named-credential-secret-0123456788")
        )
        .await
        .0,
        401
    );
    assert_eq!(get(format!("{base}/nope"), Some(SECRET)).await.0, 404);
    assert_eq!(
        get(format!("{base}/sf-mismatch"), Some(SECRET)).await.0,
        403,
        "a data key made for another identifier"
    );
    // Disabled in Keyhold: every callout refused.
    let r = post(
        &s.client(Some("admin-a")),
        &s.url("/v1/keys/sf-kek/disable"),
        json!({}),
    )
    .await;
    assert_eq!(r.0, 200);
    assert_eq!(
        get(format!("{base}/{}", made[0].0), Some(SECRET)).await.0,
        403
    );
    // Audited, without key bytes.
    let page = s.kms_client("auditor-a").audit_page(0, 1000).await.unwrap();
    assert!(page
        .records
        .iter()
        .any(|r| r.operation == "SALESFORCE callout" && r.outcome == "ok"));
    let all = serde_json::to_string(&page.records).unwrap();
    assert!(!all.contains(&B64.encode(&made[0].2)));
}

/// Issue 24: the callout as a stock Named Credential makes it. Salesforce's own sample
/// (forcedotcom/CacheOnlyKeyWrapper, README) authenticates with Basic auth
/// (`Authorization: Basic base64(user:password)`), and with replay detection on the nonce
/// comes as `?requestId=<32 hex>` and must come back as the JWE header's `jti`, else
/// Salesforce aborts the callout. The request carries what a captured callout carried
/// (distributey, docs/key_consumer_setup.md): `User-Agent: SFDC-Callout/49.0`,
/// `Connection: close`, a non-JSON `Accept`. jwcrypto opens the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_basic_auth_and_request_id_as_salesforce_sends_them() {
    const USER: &str = "keyhold-callout";
    let files = tempfile::tempdir().unwrap();
    let (cert, key, secret) = byok_files(files.path(), 2048);
    let table = |keys: &str| {
        format!(
            "\n[public]\nlisten = \"127.0.0.1:0\"\ncert = \"pki/server.pem\"\nkey = \"pki/server-key.pem\"\n\n[salesforce]\ntenant = \"acme\"\nidentity = \"{SF_IDENTITY}\"\nusername = \"{USER}\"\ncredential_file = \"{}\"\ncertificate = \"{}\"\n{keys}",
            secret.display(),
            cert.display()
        )
    };
    let mut s = TestServer::start_with(TestSeal::KeyFile, &table("")).await;
    create_sf_kek(&s).await;
    let kid = "982c375b-f46b-4423-8c2d-4d1a69152a0b";
    let dk = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/sf-kek/datakey"),
        json!({"context": {"salesforce": kid}}),
    )
    .await;
    assert_eq!(dk.0, 200, "{dk:?}");
    let plaintext = B64.decode(dk.1["plaintext"].as_str().unwrap()).unwrap();
    let keys = format!(
        "[[salesforce.keys]]\nkid = \"{kid}\"\nkey = \"sf-kek\"\nwrapped = \"{}\"\n",
        dk.1["wrapped"].as_str().unwrap()
    );
    let text = std::fs::read_to_string(&s.config).unwrap();
    let start = text.find("\n[public]").unwrap();
    std::fs::write(&s.config, format!("{}{}", &text[..start], table(&keys))).unwrap();
    s.restart().await;
    s.wait_ready().await;

    let client = keyhold_tests::client_for(&s.pki, None, false);
    let base = format!(
        "https://localhost:{}/salesforce",
        s.public_addr.unwrap().port()
    );
    let callout = |query: &str, authorization: Option<String>| {
        let (client, url) = (client.clone(), format!("{base}/{kid}{query}"));
        async move {
            let mut req = client
                .get(url)
                .header("user-agent", "SFDC-Callout/49.0")
                .header(
                    "accept",
                    "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2",
                )
                .header("connection", "close")
                .header("cache-control", "no-cache");
            if let Some(a) = authorization {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let basic = |user: &str, password: &str| {
        Some(format!(
            "Basic {}",
            B64.encode(format!("{user}:{password}"))
        ))
    };

    let (st, body) = callout(&format!("?requestId={REQUEST_ID}"), basic(USER, SECRET)).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["kid"], kid);
    let jwe = body["jwe"].as_str().unwrap();
    let header: Value =
        serde_json::from_slice(&B64URL.decode(jwe.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(
        header,
        json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid, "jti": REQUEST_ID}),
        "the nonce comes back as jti"
    );
    let have_jwcrypto = std::process::Command::new("python3")
        .args(["-c", "import jwcrypto"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_jwcrypto || std::env::var_os("CI").is_none(),
        "CI must install jwcrypto"
    );
    if have_jwcrypto {
        // jwcrypto checks the header it is given against what it decrypts; it reads the
        // nonce back as Salesforce does.
        let script = "import sys\nfrom jwcrypto import jwk, jwe\nk = jwk.JWK.from_pem(open(sys.argv[1], 'rb').read())\nt = jwe.JWE()\nt.allowed_algs = ['RSA-OAEP', 'A256GCM']\nt.deserialize(sys.argv[2], key=k)\nprint(t.jose_header['jti'], t.payload.hex())";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&key)
            .arg(jwe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "jwcrypto: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (jti, hex) = text.trim().split_once(' ').unwrap();
        assert_eq!(jti, REQUEST_ID);
        let opened: Vec<u8> = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(opened, plaintext, "jwcrypto opens the JWE to the data key");
    }

    // Refused: another password, another user, the secret as a bearer token (with a
    // username configured, the Named Credential sends Basic), no credential.
    for auth in [
        basic(USER, "named-credential-secret-0123456788"),
        basic("someone-else", SECRET),
        Some(format!("Bearer {SECRET}")),
        Some(format!("Basic {}", B64.encode(SECRET))),
        None,
    ] {
        let (st, _) = callout(&format!("?requestId={REQUEST_ID}"), auth.clone()).await;
        assert_eq!(st, 401, "{auth:?}");
    }
    // A requestId that is not Salesforce's 32 hex characters is refused, not echoed.
    for bad in [
        "n-42",
        "E5AB58FD2CED013F2A46D5C8144DD43",
        "e5ab58fd2ced013f2a46d5c8144dd439aa",
    ] {
        let (st, _) = callout(&format!("?requestId={bad}"), basic(USER, SECRET)).await;
        assert_eq!(st, 400, "{bad}");
    }
}

/// The optional client certificate on the Salesforce route (`[salesforce] client_ca`,
/// optionally pinned): without a certificate a callout is refused even with the right
/// secret (the handshake itself accepts clients without one, as the other protocols'
/// callers are); one from another CA fails the handshake; with pins, only the pinned one
/// passes; and both credentials are needed when both are configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_callouts_can_require_a_client_certificate() {
    let files = tempfile::tempdir().unwrap();
    let (cert, _, secret) = byok_files(files.path(), 2048);
    // Salesforce's mutual-authentication certificate is played by app-a's, from the
    // test CA; first without any HTTP credential: the certificate is the credential.
    let table = |auth: &str, keys: &str| {
        format!(
            "\n[public]\nlisten = \"127.0.0.1:0\"\ncert = \"pki/server.pem\"\nkey = \"pki/server-key.pem\"\n\n[salesforce]\ntenant = \"acme\"\nidentity = \"{SF_IDENTITY}\"\nclient_ca = \"pki/ca.pem\"\n{auth}certificate = \"{}\"\n{keys}",
            cert.display()
        )
    };
    let mut s = TestServer::start_with(TestSeal::KeyFile, &table("", "")).await;
    create_sf_kek(&s).await;
    let dk = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/sf-kek/datakey"),
        json!({"context": {"salesforce": "sf-mtls"}}),
    )
    .await;
    assert_eq!(dk.0, 200, "{dk:?}");
    let keys = format!(
        "[[salesforce.keys]]\nkid = \"sf-mtls\"\nkey = \"sf-kek\"\nwrapped = \"{}\"\n",
        dk.1["wrapped"].as_str().unwrap()
    );
    let reconfigure = |s: &TestServer, auth: &str| {
        let text = std::fs::read_to_string(&s.config).unwrap();
        let start = text.find("\n[public]").unwrap();
        std::fs::write(
            &s.config,
            format!("{}{}", &text[..start], table(auth, &keys)),
        )
        .unwrap();
    };
    reconfigure(&s, "");
    s.restart().await;
    s.wait_ready().await;

    let callout = |who: Option<&'static str>,
                   secret: Option<&'static str>,
                   port: u16,
                   pki: keyhold_tests::TestPki| async move {
        let client = keyhold_tests::client_for(&pki, who, false);
        let mut req = client.get(format!("https://localhost:{port}/salesforce/sf-mtls"));
        if let Some(sec) = secret {
            req = req.bearer_auth(sec);
        }
        match req.send().await {
            Ok(r) => Some(r.status().as_u16()),
            Err(_) => None, // the handshake failed
        }
    };
    let pki_dir = s.pki.dir.clone();
    let pki = || keyhold_tests::TestPki {
        dir: pki_dir.clone(),
        ca: None,
    };
    let port = s.public_addr.unwrap().port();
    assert_eq!(
        callout(None, None, port, pki()).await,
        Some(401),
        "no certificate"
    );
    assert_eq!(callout(Some("app-a"), None, port, pki()).await, Some(200));
    assert_eq!(
        callout(Some("foreign"), None, port, pki()).await,
        None,
        "another CA"
    );

    // Revocation (`client_crls`, here the test CA's CRL; issue 22): a revoked certificate
    // fails the handshake, and its open connection is closed at the CRL reload. Before,
    // Salesforce client certificates were never checked for revocation.
    reconfigure(&s, "client_crls = [\"pki/crl.pem\"]\n");
    s.restart().await;
    s.wait_ready().await;
    let port = s.public_addr.unwrap().port();
    let url = format!("https://localhost:{port}/salesforce/sf-mtls");
    let kept = keyhold_tests::client_for(&pki(), Some("app-a"), false);
    assert_eq!(kept.get(&url).send().await.unwrap().status(), 200);
    s.pki.revoke(&["app-a"], 2);
    let started = std::time::Instant::now();
    while kept.get(&url).send().await.is_ok() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "a revoked certificate still served 15 s after the CRL changed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        callout(Some("app-a"), None, port, pki()).await,
        None,
        "revoked"
    );
    assert_eq!(callout(Some("admin-a"), None, port, pki()).await, Some(200));
    s.pki.revoke(&[], 3);

    // Both credentials, and a pin on admin-a's certificate.
    let der = kms_server::base::pem::load_certs(&s.pki.cert("admin-a")).unwrap();
    let pin: String = ring_sha256(der[0].as_ref());
    reconfigure(
        &s,
        &format!(
            "credential_file = \"{}\"\nclient_certificate_sha256 = [\"{pin}\"]\n",
            secret.display()
        ),
    );
    s.restart().await;
    s.wait_ready().await;
    let port = s.public_addr.unwrap().port();
    assert_eq!(
        callout(Some("app-a"), Some(SECRET), port, pki()).await,
        Some(401),
        "not pinned"
    );
    assert_eq!(
        callout(Some("admin-a"), None, port, pki()).await,
        Some(401),
        "no secret"
    );
    assert_eq!(
        callout(None, Some(SECRET), port, pki()).await,
        Some(401),
        "no certificate"
    );
    assert_eq!(
        callout(Some("admin-a"), Some(SECRET), port, pki()).await,
        Some(200)
    );
}

fn ring_sha256(der: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Issue 24: a Named Credential with JWT authentication: Salesforce signs a fresh JWT per
/// callout with a certificate of its Certificate and Key Management (header
/// `{"kid": <its unique name>, "typ": "JWT", "alg": "RS256"}`, claims `iss`, `sub`, `aud`,
/// `nbf`, `iat`, `exp`, as a callout captured by p15r/distributey shows them, and RS512
/// for newer credentials) and sends it as `Authorization: Bearer`. Minted here by PyJWT,
/// a library Keyhold did not write; the answer's JWE is opened by jwcrypto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_jwt_named_credential() {
    let files = tempfile::tempdir().unwrap();
    let (cert, key, _) = byok_files(files.path(), 2048);
    // Salesforce's JWT signing certificate (and, for the test, its private key).
    let (jwt_cert, jwt_key) = (files.path().join("jwt.crt"), files.path().join("jwt.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=jwtcert", "-keyout"])
        .arg(&jwt_key)
        .arg("-out")
        .arg(&jwt_cert)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let table = |keys: &str| {
        format!(
            "\n[public]\nlisten = \"127.0.0.1:0\"\ncert = \"pki/server.pem\"\nkey = \"pki/server-key.pem\"\n\n[salesforce]\ntenant = \"acme\"\nidentity = \"{SF_IDENTITY}\"\ncertificate = \"{}\"\n{keys}\n[salesforce.jwt]\ncertificate = \"{}\"\nkey_name = \"jwtcert\"\nissuer = \"issuer-myCA\"\naudience = \"urn:keyhold\"\nsubject = \"subject-salesforce\"\n",
            cert.display(),
            jwt_cert.display()
        )
    };
    let mut s = TestServer::start_with(TestSeal::KeyFile, &table("")).await;
    create_sf_kek(&s).await;
    let kid = "sf-jwt-1";
    let dk = post(
        &s.client(Some("app-a")),
        &s.url("/v1/keys/sf-kek/datakey"),
        json!({"context": {"salesforce": kid}}),
    )
    .await;
    assert_eq!(dk.0, 200, "{dk:?}");
    let plaintext = B64.decode(dk.1["plaintext"].as_str().unwrap()).unwrap();
    let keys = format!(
        "[[salesforce.keys]]\nkid = \"{kid}\"\nkey = \"sf-kek\"\nwrapped = \"{}\"\n",
        dk.1["wrapped"].as_str().unwrap()
    );
    let text = std::fs::read_to_string(&s.config).unwrap();
    let start = text.find("\n[public]").unwrap();
    std::fs::write(&s.config, format!("{}{}", &text[..start], table(&keys))).unwrap();
    s.restart().await;
    s.wait_ready().await;

    let have_python = std::process::Command::new("python3")
        .args(["-c", "import jwt, jwcrypto, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_python || std::env::var_os("CI").is_none(),
        "CI must install PyJWT, jwcrypto and cryptography"
    );
    if !have_python {
        return;
    }
    // PyJWT: claims changed by `extra` (a JSON object), signed with `signing_key` by `alg`.
    let mint = |signing_key: &std::path::Path, alg: &str, extra: Value| -> String {
        let script = "import json, sys, time, jwt\nnow = int(time.time())\nclaims = {'iss': 'issuer-myCA', 'sub': 'subject-salesforce', 'aud': 'urn:keyhold', 'nbf': now, 'iat': now, 'exp': now + 300}\nclaims.update(json.loads(sys.argv[3]))\nprint(jwt.encode(claims, open(sys.argv[1]).read(), algorithm=sys.argv[2], headers={'kid': 'jwtcert', 'typ': 'JWT'}))";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(signing_key)
            .args([alg, &extra.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PyJWT: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let client = keyhold_tests::client_for(&s.pki, None, false);
    let url = format!(
        "https://localhost:{}/salesforce/{kid}?requestId={REQUEST_ID}",
        s.public_addr.unwrap().port()
    );
    let callout = |token: Option<String>| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut req = client.get(url).header("user-agent", "SFDC-Callout/64.0");
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for alg in ["RS256", "RS512"] {
        let (st, body) = callout(Some(mint(&jwt_key, alg, json!({})))).await;
        assert_eq!(st, 200, "{alg}: {body}");
        let jwe = body["jwe"].as_str().unwrap();
        let script = "import sys\nfrom jwcrypto import jwk, jwe\nk = jwk.JWK.from_pem(open(sys.argv[1], 'rb').read())\nt = jwe.JWE()\nt.allowed_algs = ['RSA-OAEP', 'A256GCM']\nt.deserialize(sys.argv[2], key=k)\nprint(t.jose_header['jti'], t.payload.hex())";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&key)
            .arg(jwe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "jwcrypto: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (jti, hex) = text.trim().split_once(' ').unwrap();
        assert_eq!(jti, REQUEST_ID);
        let opened: Vec<u8> = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(opened, plaintext);
    }
    // Refused, each on its own: expired, another audience, issuer or subject, signed by
    // another key (Salesforce's BYOK key here), no token.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (what, token) in [
        (
            "expired",
            Some(mint(
                &jwt_key,
                "RS256",
                json!({"exp": now - 120, "iat": now - 420, "nbf": now - 420}),
            )),
        ),
        (
            "audience",
            Some(mint(&jwt_key, "RS256", json!({"aud": "urn:elsewhere"}))),
        ),
        (
            "issuer",
            Some(mint(&jwt_key, "RS256", json!({"iss": "someone-else"}))),
        ),
        (
            "subject",
            Some(mint(&jwt_key, "RS256", json!({"sub": "another-user"}))),
        ),
        ("another key", Some(mint(&key, "RS256", json!({})))),
        ("no token", None),
    ] {
        let (st, _) = callout(token).await;
        assert_eq!(st, 401, "{what}");
    }
}
