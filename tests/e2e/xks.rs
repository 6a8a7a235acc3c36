//! The AWS XKS endpoint, conformance over real TLS: every operation, every error row that
//! applies, the size limits, SigV4 (signed by AWS's own signer, and by `curl
//! --aws-sigv4`), credential rotation without restart, key state and grants, secondary
//! authorization, throttling, mTLS with the required subject, and the audit records.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::xks::{self, XksClient};
use keyhold_tests::{TestSeal, TestServer};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::post;

const HEALTH: &str = "/aws/kms/xks/v1/health";
const ALICE: &str = "arn:aws:iam::111122223333:user/Alice";
const KEY_ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

fn keys_path(id: &str, op: &str) -> String {
    format!("/aws/kms/xks/v1/keys/{id}/{op}")
}

fn meta(op: &str) -> Value {
    json!({
        "awsPrincipalArn": ALICE,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": op,
        "kmsRequestId": format!("req-{op}-{}", rand::random::<u32>()),
        "kmsViaService": "s3",
    })
}

fn encrypt_body(plaintext: &[u8], aad: &[u8]) -> Value {
    json!({
        "requestMetadata": meta("Encrypt"),
        "plaintext": B64.encode(plaintext),
        "additionalAuthenticatedData": B64.encode(aad),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    })
}

fn decrypt_body(enc: &Value, aad: &[u8]) -> Value {
    json!({
        "requestMetadata": meta("Decrypt"),
        "ciphertext": enc["ciphertext"],
        "ciphertextMetadata": enc["ciphertextMetadata"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
        "additionalAuthenticatedData": B64.encode(aad),
        "encryptionAlgorithm": "AES_GCM",
    })
}

fn b64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().unwrap()).unwrap()
}

/// The CDIV computed here, independently of the server: SHA-256 over AAD ‖ metadata ‖
/// IV ‖ ciphertext ‖ tag.
fn cdiv(parts: &[&[u8]]) -> String {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    B64.encode(h.finalize())
}

const MAPPINGS: &str = r#"
[[xks.stores.keys]]
external_id = "ext-1"
key = "xk"

[[xks.stores.keys]]
external_id = "enc-only"
key = "xe"

[[xks.stores.keys]]
external_id = "ruled"
key = "xk"
[[xks.stores.keys.rules]]
name = "acct-111122223333-s3"
principals = ["arn:aws:iam::111122223333:*"]
operations = ["Encrypt", "Decrypt", "DescribeKey"]
via_services = ["s3"]

[[xks.stores.keys]]
external_id = "gone"
key = "never-created"

[[xks.stores.keys]]
external_id = "rsa"
key = "xrsa"
"#;

async fn make_key(s: &TestServer, name: &str, algorithm: Option<&str>, ops: &[&str]) {
    let mut body =
        json!({ "name": name, "grants": [{ "identity": xks::IDENTITY, "operations": ops }] });
    if let Some(a) = algorithm {
        body["algorithm"] = json!(a);
    }
    let r = post(&s.client(Some("admin-a")), &s.url("/v1/keys"), body).await;
    assert_eq!(r.0, 201, "{r:?}");
}

async fn xks_server(rate: u32, mappings: &str, xks_extra: &str) -> (TestServer, tempfile::TempDir) {
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = xks::credentials_path(creds_dir.path());
    xks::write_credentials(&creds, &[(xks::ACCESS_KEY, xks::SECRET)]);
    let s = TestServer::start_with(
        TestSeal::KeyFile,
        &xks::config(&creds, rate, mappings, xks_extra),
    )
    .await;
    (s, creds_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_conformance() {
    let (s, creds_dir) = xks_server(100_000, MAPPINGS, "").await;
    make_key(&s, "xk", None, &["wrap", "unwrap"]).await;
    make_key(&s, "xe", None, &["wrap"]).await;
    make_key(
        &s,
        "xrsa",
        Some("rsa-oaep-3072-sha256"),
        &["wrap", "unwrap"],
    )
    .await;
    let c = XksClient::new(&s.pki, s.xks_addr.unwrap(), None);

    // GetHealthStatus: a deep check, fleet details of this node.
    let h = c.post(HEALTH, &json!({"requestMetadata": {"kmsRequestId": "h1", "kmsOperation": "CreateCustomKeyStore"}})).await;
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.body["xksProxyFleetSize"], 1);
    assert_eq!(h.body["xksProxyVendor"], "Keyhold");
    assert_eq!(h.body["ekmVendor"], "Keyhold");
    assert!(h.body["xksProxyModel"]
        .as_str()
        .unwrap()
        .starts_with("Keyhold XKS "));
    let fleet = h.body["ekmFleetDetails"].as_array().unwrap();
    assert_eq!(fleet.len(), 1);
    assert_eq!(fleet[0]["id"], "node-1");
    assert_eq!(fleet[0]["healthStatus"], "ACTIVE");

    // GetKeyMetadata: AES_256, usage from the grants, status from the key state.
    let m = c
        .post(
            &keys_path("ext-1", "metadata"),
            &json!({"requestMetadata": meta("CreateKey")}),
        )
        .await;
    assert_eq!(m.status, 200, "{m:?}");
    assert_eq!(
        m.body,
        json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"})
    );
    let m = c
        .post(
            &keys_path("enc-only", "metadata"),
            &json!({"requestMetadata": meta("DescribeKey")}),
        )
        .await;
    assert_eq!(m.body["keyUsage"], json!(["ENCRYPT"]), "{m:?}");

    // Encrypt with AAD and CDIV, then decrypt.
    let aad = b"project=nile,department=marketing";
    let e = c
        .post(
            &keys_path("ext-1", "encrypt"),
            &encrypt_body(b"Hello World!", aad),
        )
        .await;
    assert_eq!(e.status, 200, "{e:?}");
    let (ct, md, iv, tag) = (
        b64(&e.body["ciphertext"]),
        b64(&e.body["ciphertextMetadata"]),
        b64(&e.body["initializationVector"]),
        b64(&e.body["authenticationTag"]),
    );
    assert_eq!(ct.len(), 12, "ciphertext as long as the plaintext");
    assert_ne!(&ct[..], b"Hello World!");
    assert!(iv.len() == 12 || iv.len() == 16);
    assert_eq!(tag.len(), 16);
    assert!(!md.is_empty() && md.len() <= 20);
    assert_eq!(
        e.body["ciphertextDataIntegrityValue"],
        cdiv(&[aad, &md, &iv, &ct, &tag])
    );
    let d = c
        .post(&keys_path("ext-1", "decrypt"), &decrypt_body(&e.body, aad))
        .await;
    assert_eq!(d.status, 200, "{d:?}");
    assert_eq!(b64(&d.body["plaintext"]), b"Hello World!");

    // The specification's Appendix C vector, through the same CDIV computation.
    let hexd = |s: &str| kms_client::hex::decode(&s.replace(' ', "")).unwrap();
    assert_eq!(
        cdiv(&[
            aad,
            b"key_version=1",
            &hexd("1c ca e5 47 0f 39 70 02 54 77 90 31"),
            &hexd("82 1c 64 2b 5b 71 78 33 67 de af 18"),
            &hexd("bc 1c 4d da 77 07 d6 81 24 47 c5 95 5e 99 b2 61"),
        ]),
        "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
    );

    // Without CDIV asked: no CDIV in the answer; without AAD: fine.
    let mut body = encrypt_body(b"x", b"");
    body.as_object_mut()
        .unwrap()
        .remove("ciphertextDataIntegrityValueAlgorithm");
    body.as_object_mut()
        .unwrap()
        .remove("additionalAuthenticatedData");
    let e2 = c.post(&keys_path("ext-1", "encrypt"), &body).await;
    assert_eq!(e2.status, 200, "{e2:?}");
    assert!(e2.body.get("ciphertextDataIntegrityValue").is_none());

    // Sizes: 4300 bytes of plaintext with 8192 of AAD work; one more byte of either is 501.
    let big = vec![0x5au8; 4300];
    let big_aad = vec![0xa5u8; 8192];
    let e3 = c
        .post(
            &keys_path("ext-1", "encrypt"),
            &encrypt_body(&big, &big_aad),
        )
        .await;
    assert_eq!(e3.status, 200, "{e3:?}");
    let d3 = c
        .post(
            &keys_path("ext-1", "decrypt"),
            &decrypt_body(&e3.body, &big_aad),
        )
        .await;
    assert_eq!(b64(&d3.body["plaintext"]), big);
    for (pt, a) in [(vec![0u8; 4301], vec![]), (vec![0u8; 16], vec![0u8; 8193])] {
        let r = c
            .post(&keys_path("ext-1", "encrypt"), &encrypt_body(&pt, &a))
            .await;
        assert_eq!(
            (r.status, r.error_name()),
            (501, "UnsupportedOperationException"),
            "{r:?}"
        );
    }
    let mut d = decrypt_body(&e.body, aad);
    d["ciphertext"] = json!(B64.encode(vec![0u8; 4301]));
    let r = c.post(&keys_path("ext-1", "decrypt"), &d).await;
    assert_eq!(
        (r.status, r.error_name()),
        (501, "UnsupportedOperationException"),
        "{r:?}"
    );

    // Decrypt refusals: InvalidCiphertextException for anything altered.
    let mut variants: Vec<Value> = Vec::new();
    variants.push(decrypt_body(&e.body, b"project=nile,department=sales"));
    let mut v = decrypt_body(&e.body, aad);
    let mut bad_tag = tag.clone();
    bad_tag[0] ^= 1;
    v["authenticationTag"] = json!(B64.encode(&bad_tag));
    variants.push(v);
    let mut v = decrypt_body(&e.body, aad);
    v["ciphertextMetadata"] = json!(B64.encode(b"kh\x01\0\0\0\x02"));
    variants.push(v);
    let mut v = decrypt_body(&e.body, aad);
    v.as_object_mut().unwrap().remove("ciphertextMetadata");
    variants.push(v);
    // The specification's warning: metadata moved into the AAD must not decrypt.
    let mut moved_aad = aad.to_vec();
    moved_aad.extend_from_slice(&md);
    let mut v = decrypt_body(&e.body, &moved_aad);
    v.as_object_mut().unwrap().remove("ciphertextMetadata");
    variants.push(v);
    let mut v = decrypt_body(&e.body, aad);
    v["initializationVector"] = json!(B64.encode([0u8; 12]));
    variants.push(v);
    for v in variants {
        let r = c.post(&keys_path("ext-1", "decrypt"), &v).await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "InvalidCiphertextException"),
            "{r:?} for {v}"
        );
        assert!(r.body.get("plaintext").is_none());
    }

    // ValidationException: a wrong algorithm, a missing required field, bad base64, a
    // 17-byte tag, a 21-byte metadata. Unknown fields and unknown kmsOperations are fine.
    let mut bads: Vec<(String, Value)> = Vec::new();
    let mut b = encrypt_body(b"x", b"");
    b["encryptionAlgorithm"] = json!("AES_CBC");
    bads.push((keys_path("ext-1", "encrypt"), b));
    let mut b = encrypt_body(b"x", b"");
    b["ciphertextDataIntegrityValueAlgorithm"] = json!("MD5");
    bads.push((keys_path("ext-1", "encrypt"), b));
    let mut b = encrypt_body(b"x", b"");
    b["requestMetadata"]
        .as_object_mut()
        .unwrap()
        .remove("kmsKeyArn");
    bads.push((keys_path("ext-1", "encrypt"), b));
    let mut b = encrypt_body(b"x", b"");
    b["plaintext"] = json!("***not base64***");
    bads.push((keys_path("ext-1", "encrypt"), b));
    let mut b = encrypt_body(b"x", b"");
    b.as_object_mut().unwrap().remove("plaintext");
    bads.push((keys_path("ext-1", "encrypt"), b));
    let mut b = decrypt_body(&e.body, aad);
    b["authenticationTag"] = json!(B64.encode([0u8; 17]));
    bads.push((keys_path("ext-1", "decrypt"), b));
    let mut b = decrypt_body(&e.body, aad);
    b["ciphertextMetadata"] = json!(B64.encode([0u8; 21]));
    bads.push((keys_path("ext-1", "decrypt"), b));
    bads.push((
        keys_path("ext-1", "metadata"),
        json!({"requestMetadata": {"kmsOperation": "CreateKey", "kmsRequestId": "r"}}),
    ));
    bads.push((keys_path("ext-1", "metadata"), json!([1, 2])));
    for (path, b) in bads {
        let r = c.post(&path, &b).await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "ValidationException"),
            "{r:?} for {b}"
        );
        let msg = r.body["errorMessage"].as_str().unwrap();
        assert!(
            msg.len() < 512 && msg.bytes().all(|b| (0x20..=0x7e).contains(&b)),
            "{msg}"
        );
    }
    let mut b = encrypt_body(b"x", b"");
    b["someFutureField"] = json!({"nested": [1, 2, 3]});
    b["requestMetadata"]["kmsOperation"] = json!("BulkEncryptFromTheFuture");
    b["requestMetadata"]["anotherFutureField"] = json!("x");
    b["requestMetadata"]["awsPrincipalArn"] = json!(format!(
        "arn:aws:iam::111122223333:role/{}",
        "r".repeat(2000)
    ));
    let r = c.post(&keys_path("ext-1", "encrypt"), &b).await;
    assert_eq!(r.status, 200, "{r:?}");

    // Routing comes before authentication: unknown prefixes and paths are 404
    // InvalidUriPathException signed or not; GET on a real path is 405.
    for path in [
        "/other/kms/xks/v1/health",
        "/aws/kms/xks/v1/keys/ext-1/sign",
        "/aws/kms/xks/v2/health",
        "/kms/xks/v1/health",
        "/aws/kms/xks/v1/keys/bad id/encrypt",
    ] {
        let r = c.raw(reqwest::Method::POST, path, b"{}".to_vec()).await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "InvalidUriPathException"),
            "{path}: {r:?}"
        );
    }
    let r = c
        .post(
            "/other/kms/xks/v1/health",
            &json!({"requestMetadata": {"kmsRequestId": "req-misrouted", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!((r.status, r.error_name()), (404, "InvalidUriPathException"));
    for path in [
        HEALTH.to_owned(),
        keys_path("ext-1", "encrypt"),
        keys_path("ext-1", "metadata"),
    ] {
        let r = c.raw(reqwest::Method::GET, &path, Vec::new()).await;
        assert_eq!(r.status, 405, "GET {path}: {r:?}");
    }

    // KeyNotFoundException: an unmapped external id, a mapping to a key that does not
    // exist, a mapping to an RSA key (XKS is AES-256 only).
    for id in ["unmapped", "gone", "rsa"] {
        let r = c
            .post(&keys_path(id, "encrypt"), &encrypt_body(b"x", b""))
            .await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "KeyNotFoundException"),
            "{id}: {r:?}"
        );
        let r = c
            .post(
                &keys_path(id, "metadata"),
                &json!({"requestMetadata": meta("DescribeKey")}),
            )
            .await;
        assert_eq!(
            (r.status, r.error_name()),
            (404, "KeyNotFoundException"),
            "{id}: {r:?}"
        );
    }

    // Grants decide key usage: the encrypt-only mapping cannot decrypt. Nor can it give a
    // ciphertext integrity value, which KMS reads as the proxy's assurance that a later
    // Decrypt succeeds (specification, Encrypt, `ciphertextDataIntegrityValue`; issue 24).
    let r = c
        .post(
            &keys_path("enc-only", "encrypt"),
            &encrypt_body(b"secret", b""),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidKeyUsageException"),
        "{r:?}"
    );
    let mut without_cdiv = encrypt_body(b"secret", b"");
    without_cdiv
        .as_object_mut()
        .unwrap()
        .remove("ciphertextDataIntegrityValueAlgorithm");
    let eo = c
        .post(&keys_path("enc-only", "encrypt"), &without_cdiv)
        .await;
    assert_eq!(eo.status, 200, "{eo:?}");
    let r = c
        .post(
            &keys_path("enc-only", "decrypt"),
            &decrypt_body(&eo.body, b""),
        )
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (400, "InvalidKeyUsageException"),
        "{r:?}"
    );
    // And a ciphertext of one key does not decrypt under another.
    let r = c
        .post(&keys_path("ext-1", "decrypt"), &decrypt_body(&eo.body, b""))
        .await;
    assert_eq!(r.error_name(), "InvalidCiphertextException", "{r:?}");

    // SigV4: a wrong signature, an expired or future timestamp, the wrong service or
    // region, an unknown access key, a body changed after signing: 401.
    let path = keys_path("ext-1", "encrypt");
    let body = encrypt_body(b"x", b"");
    let r = c
        .post_with(&path, &body, |h| {
            for (k, v) in h.iter_mut() {
                if k == "authorization" {
                    let last = v.pop().unwrap();
                    v.push(if last == '0' { '1' } else { '0' });
                }
            }
        })
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (401, "AuthenticationFailedException"),
        "{r:?}"
    );
    let r = c
        .post_with(&path, &body, |h| h.retain(|(k, _)| k != "authorization"))
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let variants: [fn(&mut XksClient); 6] = [
        |c| c.time = Some(SystemTime::now() - Duration::from_secs(6 * 60)),
        |c| c.time = Some(SystemTime::now() + Duration::from_secs(6 * 60)),
        |c| c.service = "kms".into(),
        |c| c.region = "us-east-1".into(),
        |c| c.access_key = "AKIAUNKNOWNUNKNOWN22".into(),
        |c| c.secret = "A".repeat(43),
    ];
    for change in variants {
        let mut bad = XksClient::new(&s.pki, s.xks_addr.unwrap(), None);
        change(&mut bad);
        let r = bad.post(&path, &body).await;
        assert_eq!(
            (r.status, r.error_name()),
            (401, "AuthenticationFailedException"),
            "{r:?}"
        );
    }
    // Four minutes off is inside the skew.
    let mut skewed = XksClient::new(&s.pki, s.xks_addr.unwrap(), None);
    skewed.time = Some(SystemTime::now() - Duration::from_secs(4 * 60));
    assert_eq!(skewed.post(&path, &body).await.status, 200);

    // Secondary authorization: the rule names the account, the operations and S3.
    let r = c
        .post(&keys_path("ruled", "encrypt"), &encrypt_body(b"x", b""))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut other = encrypt_body(b"x", b"");
    other["requestMetadata"]["awsPrincipalArn"] = json!("arn:aws:iam::999999999999:user/Mallory");
    let r = c.post(&keys_path("ruled", "encrypt"), &other).await;
    assert_eq!(
        (r.status, r.error_name()),
        (403, "AccessDeniedException"),
        "{r:?}"
    );
    let mut via_ebs = encrypt_body(b"x", b"");
    via_ebs["requestMetadata"]["kmsViaService"] = json!("ebs");
    let r = c.post(&keys_path("ruled", "encrypt"), &via_ebs).await;
    assert_eq!(r.error_name(), "AccessDeniedException", "{r:?}");

    // A disabled key: DISABLED in metadata, InvalidStateException on use; enabled again, it
    // works (and the old ciphertext still decrypts).
    let admin = s.client(Some("admin-a"));
    assert_eq!(
        post(&admin, &s.url("/v1/keys/xk/disable"), json!({}))
            .await
            .0,
        200
    );
    let m = c
        .post(
            &keys_path("ext-1", "metadata"),
            &json!({"requestMetadata": meta("DescribeKey")}),
        )
        .await;
    assert_eq!(m.body["keyStatus"], "DISABLED", "{m:?}");
    for (op, b) in [
        ("encrypt", encrypt_body(b"x", b"")),
        ("decrypt", decrypt_body(&e.body, aad)),
    ] {
        let r = c.post(&keys_path("ext-1", op), &b).await;
        assert_eq!(
            (r.status, r.error_name()),
            (400, "InvalidStateException"),
            "{op}: {r:?}"
        );
    }
    assert_eq!(
        post(&admin, &s.url("/v1/keys/xk/enable"), json!({}))
            .await
            .0,
        200
    );
    // A rotation: new encrypts use version 2, version-1 ciphertexts still decrypt.
    assert_eq!(
        post(&admin, &s.url("/v1/keys/xk/rotate"), json!({}))
            .await
            .0,
        200
    );
    let e4 = c
        .post(
            &keys_path("ext-1", "encrypt"),
            &encrypt_body(b"after rotation", b""),
        )
        .await;
    assert_ne!(e4.body["ciphertextMetadata"], e.body["ciphertextMetadata"]);
    let d = c
        .post(&keys_path("ext-1", "decrypt"), &decrypt_body(&e.body, aad))
        .await;
    assert_eq!(b64(&d.body["plaintext"]), b"Hello World!", "{d:?}");

    // Credential rotation without restart: both credentials work, then only the new one.
    let creds = xks::credentials_path(creds_dir.path());
    xks::write_credentials(
        &creds,
        &[
            (xks::ACCESS_KEY, xks::SECRET),
            (xks::ACCESS_KEY_2, xks::SECRET_2),
        ],
    );
    let mut new_client = XksClient::new(&s.pki, s.xks_addr.unwrap(), None);
    new_client.access_key = xks::ACCESS_KEY_2.into();
    new_client.secret = xks::SECRET_2.into();
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}});
    wait_for(|| async { new_client.post(HEALTH, &health).await.status == 200 }).await;
    assert_eq!(
        c.post(HEALTH, &health).await.status,
        200,
        "the old credential still works"
    );
    xks::write_credentials(&creds, &[(xks::ACCESS_KEY_2, xks::SECRET_2)]);
    wait_for(|| async { c.post(HEALTH, &health).await.status == 401 }).await;
    assert_eq!(new_client.post(HEALTH, &health).await.status, 200);
    // A broken file keeps the credentials in force.
    std::fs::write(&creds, "not toml [[[").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(new_client.post(HEALTH, &health).await.status, 200);

    // The audit trail: every XKS request, with kmsRequestId, the rule, and the chain
    // still verifies.
    let auditor = s.kms_client("auditor-a");
    let verified = auditor.audit_verify(true).await.unwrap();
    let Ok(verified) = verified else {
        panic!("the audit chain does not verify: {verified:?}")
    };
    let mut all = Vec::new();
    let mut after = 0;
    while after < verified {
        let page = auditor.audit_page(after, 1000).await.unwrap();
        after = page.records.last().map_or(verified, |r| r.seq);
        all.extend(page.records);
    }
    let xks_records: Vec<_> = all
        .iter()
        .filter(|r| r.operation.starts_with("XKS "))
        .collect();
    assert!(xks_records.len() > 40, "{}", xks_records.len());
    let ruled = xks_records
        .iter()
        .find(|r| {
            r.attributes
                .as_ref()
                .and_then(|a| a.get("rule"))
                .map(String::as_str)
                == Some("acct-111122223333-s3")
        })
        .expect("the allowing rule is in the audit record");
    assert_eq!(ruled.outcome, "ok");
    assert_eq!(ruled.identity.as_deref(), Some(xks::IDENTITY));
    assert_eq!(ruled.tenant.as_deref(), Some("acme"));
    assert_eq!(ruled.key.as_deref(), Some("xk"));
    let denied = xks_records
        .iter()
        .find(|r| r.outcome == "AccessDeniedException")
        .unwrap();
    let attrs = denied.attributes.as_ref().unwrap();
    assert_eq!(
        attrs["awsPrincipalArn"],
        "arn:aws:iam::999999999999:user/Mallory"
    );
    assert!(attrs["kmsRequestId"].starts_with("req-Encrypt-"));
    assert_eq!(attrs["rule"], "(none matched)");
    // A request refused at SigV4 still names its kmsRequestId (for CloudTrail), and the
    // record says it was not authenticated.
    let refused = xks_records
        .iter()
        .find(|r| r.outcome == "AuthenticationFailedException" && r.status == 401)
        .unwrap();
    assert!(refused.identity.is_none());
    assert!(refused.attributes.as_ref().unwrap()["kmsRequestId"].starts_with("req-"));
    // So does one sent to a prefix no store has (a misconfigured key store in AWS).
    let misrouted = xks_records
        .iter()
        .find(|r| {
            r.operation == "XKS unrouted"
                && r.attributes.as_ref().unwrap().get("kmsRequestId").is_some()
        })
        .unwrap();
    assert_eq!(
        misrouted.attributes.as_ref().unwrap()["kmsRequestId"],
        "req-misrouted"
    );
    assert_eq!(
        misrouted.attributes.as_ref().unwrap()["path"],
        "/other/kms/xks/v1/health"
    );
    for r in &xks_records {
        if r.operation == "XKS unrouted" {
            assert!(r
                .attributes
                .as_ref()
                .is_some_and(|a| a.contains_key("path")));
        }
        if r.outcome == "ok" && r.operation != "XKS GetHealthStatus" {
            assert!(
                r.attributes.as_ref().unwrap().contains_key("kmsRequestId"),
                "{r:?}"
            );
        }
        let line = serde_json::to_string(r).unwrap();
        assert!(
            !line.contains(&B64.encode(b"Hello World!")),
            "no plaintext in the audit trail"
        );
        assert!(!line.contains(xks::SECRET) && !line.contains(xks::SECRET_2));
    }

    // Sealed: the deep check says UNAVAILABLE (after the cache), key operations 503.
    assert_eq!(
        post(&s.client(Some("sys")), &s.url("/v1/sys/seal"), json!({}))
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let h = new_client.post(HEALTH, &health).await;
    assert_eq!(
        h.body["ekmFleetDetails"][0]["healthStatus"], "UNAVAILABLE",
        "{h:?}"
    );
    let r = new_client
        .post(&keys_path("ext-1", "encrypt"), &encrypt_body(b"x", b""))
        .await;
    assert_eq!(
        (r.status, r.error_name()),
        (503, "DependencyTimeoutException"),
        "{r:?}"
    );
}

async fn wait_for<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_overload_is_429_throttling() {
    let (s, _creds) = xks_server(5, MAPPINGS, "").await;
    let c = std::sync::Arc::new(XksClient::new(&s.pki, s.xks_addr.unwrap(), None));
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}});
    // 20 at once against a bucket of 5 refilled at 5 per second.
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (c, h) = (c.clone(), health.clone());
        tasks.spawn(async move { c.post(HEALTH, &h).await });
    }
    let mut statuses = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        if r.status == 429 {
            assert_eq!(r.error_name(), "ThrottlingException", "{r:?}");
        }
        statuses.push(r.status);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + throttled, 20, "{statuses:?}");
    // The burst, plus what refilled while the requests were in flight.
    let most = 5 + (5.0 * elapsed).ceil() as usize;
    assert!(
        (5..=most).contains(&ok),
        "{ok} answered in {elapsed:.2} s: {statuses:?}"
    );
    if most < 20 {
        assert!(throttled > 0, "{statuses:?}");
    }
    // The rate refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(c.post(HEALTH, &health).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_mtls_requires_the_configured_subject() {
    const KMS_SUBJECT: &str = "cks.kms.eu-west-1.amazonaws.com";
    let (s, _creds) = xks_server(
        1000,
        MAPPINGS,
        &format!("client_ca = \"pki/ca.pem\"\nclient_subject = \"{KMS_SUBJECT}\""),
    )
    .await;
    s.pki.issue(KMS_SUBJECT, "spiffe://aws/kms");
    s.pki
        .issue("cks.kms.us-east-1.amazonaws.com", "spiffe://aws/kms-other");
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}});
    let kms = XksClient::new(&s.pki, s.xks_addr.unwrap(), Some(KMS_SUBJECT));
    assert_eq!(kms.post(HEALTH, &health).await.status, 200);
    // Another subject from the same CA, a certificate of another CA, or none: the
    // handshake ends; no HTTP answer at all.
    for who in [
        Some("cks.kms.us-east-1.amazonaws.com"),
        Some("app-a"),
        Some("foreign"),
        None,
    ] {
        let c = keyhold_tests::client_for(&s.pki, who, false);
        let r = c
            .post(format!(
                "https://127.0.0.1:{}{HEALTH}",
                s.xks_addr.unwrap().port()
            ))
            .body("{}")
            .send()
            .await;
        assert!(r.is_err(), "{who:?} got an answer: {r:?}");
    }
}

/// A client we did not write: curl's own SigV4 (`--aws-sigv4`), which also signs
/// `content-type`, through health, encrypt and decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_with_curl_aws_sigv4() {
    let (s, _creds) = xks_server(1000, MAPPINGS, "").await;
    make_key(&s, "xk", None, &["wrap", "unwrap"]).await;
    let port = s.xks_addr.unwrap().port();
    let ca = s.pki.ca();
    let curl = move |path: &str, body: &Value| -> (u16, Value) {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(&ca)
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:kms-xks-proxy", xks::REGION))
            .arg("--user")
            .arg(format!("{}:{}", xks::ACCESS_KEY, xks::SECRET))
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(body.to_string())
            .arg(format!("https://localhost:{port}{path}"))
            .env_remove("CURL_CA_BUNDLE")
            .output()
            .expect("the curl binary must be installed (apt-get install curl)");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::String(body.into())),
        )
    };
    let (h, e, d) = tokio::task::spawn_blocking(move || {
        let h = curl(
            HEALTH,
            &json!({"requestMetadata": {"kmsRequestId": "c1", "kmsOperation": "KmsHealthCheck"}}),
        );
        let e = curl(
            &keys_path("ext-1", "encrypt"),
            &encrypt_body(b"curl plaintext", b"ctx"),
        );
        let d = curl(&keys_path("ext-1", "decrypt"), &decrypt_body(&e.1, b"ctx"));
        (h, e, d)
    })
    .await
    .unwrap();
    assert_eq!(h.0, 200, "{h:?}");
    assert_eq!(h.1["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    assert_eq!(e.0, 200, "{e:?}");
    assert_eq!(d.0, 200, "{d:?}");
    assert_eq!(b64(&d.1["plaintext"]), b"curl plaintext");
}

/// `kms-server xks-credential` makes a credential a running server accepts without a
/// restart, and the AWS console file for it; `check-config` checks the credentials files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_credential_generator_feeds_a_running_server() {
    use std::os::unix::fs::PermissionsExt;
    let (s, creds_dir) = xks_server(1000, MAPPINGS, "").await;
    let creds = xks::credentials_path(creds_dir.path());
    let console = creds_dir.path().join("console.json");
    let server = keyhold_tests::workspace_bin("kms-server");
    let stdout = keyhold_tests::stdout_of(
        std::process::Command::new(&server)
            .arg("xks-credential")
            .arg("--credentials")
            .arg(&creds)
            .arg("--console-json")
            .arg(&console)
            .args(["--prefix", "/aws"]),
    );
    let file: Value = serde_json::from_slice(&std::fs::read(&console).unwrap()).unwrap();
    assert_eq!(file["XksProxyUriPath"], "/aws/kms/xks/v1");
    let id = file["XksProxyAuthenticationCredential"]["AccessKeyId"]
        .as_str()
        .unwrap();
    let secret = file["XksProxyAuthenticationCredential"]["RawSecretAccessKey"]
        .as_str()
        .unwrap();
    assert!(stdout.contains(id) && !stdout.contains(secret), "{stdout}");
    for p in [&creds, &console] {
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let mut c = XksClient::new(&s.pki, s.xks_addr.unwrap(), None);
    c.access_key = id.into();
    c.secret = secret.into();
    let health =
        json!({"requestMetadata": {"kmsRequestId": "g", "kmsOperation": "CreateCustomKeyStore"}});
    wait_for(|| async { c.post(HEALTH, &health).await.status == 200 }).await;

    let check = || {
        std::process::Command::new(&server)
            .args(["check-config", "--config"])
            .arg(&s.config)
            .output()
            .unwrap()
    };
    assert!(check().status.success());
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod"),
        "{out:?}"
    );
}

/// Issue 22: what an unauthenticated caller costs is bounded. Ten thousand requests with
/// no valid signature, each claiming 30 KiB of `requestMetadata`, with an alert command
/// configured: the first hundred refusals of each 10 s get their own audit record, with
/// every claimed value cut to 256 characters; the rest are counted into one summary record
/// per interval, so every refusal is accounted for and the chain still verifies; the
/// `xks_auth_failed` alerts are coalesced (10 per interval one by one, then a summary
/// with a count) and the command runs one at a time. Before: one record per request
/// carrying the claimed metadata whole (about 30 KiB each), and one child process per
/// alert, all at once. The figures go to RELIABILITY.md ("Hostile network"):
/// `cargo test -p keyhold-tests --test e2e unauthenticated_requests_cost -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_cost_the_audit_disk_a_bounded_amount() {
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = xks::credentials_path(creds_dir.path());
    xks::write_credentials(&creds, &[(xks::ACCESS_KEY, xks::SECRET)]);
    // The command logs each event, and its start (+) and end (-).
    let (events, starts) = (
        creds_dir.path().join("alerts.log"),
        creds_dir.path().join("alert-runs.log"),
    );
    let script = format!(
        "echo + >> {p}; cat >> {l}; echo >> {l}; sleep 0.02; echo - >> {p}",
        p = starts.display(),
        l = events.display()
    );
    let s = TestServer::start_with(
        TestSeal::KeyFile,
        &format!(
            "{}\n[alerts]\ncommand = [\"sh\", \"-c\", \"{script}\"]\n",
            xks::config(&creds, 100_000, MAPPINGS, "")
        ),
    )
    .await;
    let mut body = encrypt_body(b"secret", b"aad");
    body["requestMetadata"]["kmsViaService"] = json!("x".repeat(30_000));
    let body = serde_json::to_vec(&body).unwrap();
    const N: usize = 10_000;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = xks::XksClient::new(&s.pki, s.xks_addr.unwrap(), None);
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..N / 8 {
                let r = client
                    .raw(
                        reqwest::Method::POST,
                        &keys_path("xk", "encrypt"),
                        body.clone(),
                    )
                    .await;
                assert_eq!(r.status, 401, "{r:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flood = started.elapsed();
    // The summary closes the interval (10 s): wait for it in the chain.
    let auditor = s.kms_client("auditor-a");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (one_by_one, counted, bytes) = loop {
        let verified = auditor.audit_verify(true).await.unwrap().unwrap();
        let mut refusals = Vec::new();
        let mut after = 0;
        while after < verified {
            let page = auditor.audit_page(after, 1000).await.unwrap();
            after = page.records.last().map(|r| r.seq).unwrap_or(verified);
            refusals.extend(page.records.into_iter().filter(|r| {
                r.identity.is_none() && r.status == 401 || r.operation.starts_with("summary")
            }));
        }
        let one_by_one: Vec<_> = refusals.iter().filter(|r| r.status == 401).collect();
        let counted: u64 = refusals
            .iter()
            .filter(|r| r.operation.starts_with("summary"))
            .map(|r| {
                r.attributes.as_ref().unwrap()["count"]
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        if one_by_one.len() as u64 + counted >= N as u64 {
            for r in &one_by_one {
                for v in r.attributes.iter().flat_map(|a| a.values()) {
                    assert!(
                        v.len() < 300,
                        "a claimed value of {} bytes was recorded",
                        v.len()
                    );
                }
            }
            // What these records take in the chain (the file is allocated ahead in
            // steps, so its length says less).
            let bytes: usize = refusals
                .iter()
                .map(|r| serde_json::to_vec(r).unwrap().len() + 1)
                .sum();
            break (one_by_one.len() as u64, counted, bytes);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 30 s: {} refusals recorded, {counted} counted, of {N}",
            one_by_one.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        one_by_one + counted,
        N as u64,
        "every refusal accounted for once"
    );
    assert!(
        one_by_one <= 200,
        "{one_by_one} refusals recorded one by one"
    );
    assert!(
        bytes < 1 << 20,
        "the refusals took {bytes} bytes of audit records"
    );
    // The alerts: wait for the last interval's summary, then count.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (alerts, alerted, peak) = loop {
        let log = std::fs::read_to_string(&events).unwrap_or_default();
        let evs: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|e: &serde_json::Value| e["kind"] == "xks_auth_failed")
            .collect();
        let alerted: u64 = evs.iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum();
        let runs = std::fs::read_to_string(&starts).unwrap_or_default();
        let (mut now, mut peak) = (0i64, 0i64);
        for l in runs.lines() {
            now += if l == "+" { 1 } else { -1 };
            peak = peak.max(now);
        }
        if alerted >= N as u64 && now == 0 {
            break (evs.len(), alerted, peak);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 30 s: {alerted} of {N} refusals alerted in {} events",
            evs.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(alerted, N as u64, "every refusal alerted once");
    assert_eq!(peak, 1, "alert commands ran {peak} at once");
    let intervals = flood.as_secs() / 10 + 2;
    assert!(
        alerts as u64 <= 11 * intervals,
        "{alerts} alert events for {N} refusals over {flood:?}"
    );
    eprintln!(
        "{N} unauthenticated requests in {flood:.1?}: {one_by_one} audit records one by one + summaries counting {counted}, {bytes} bytes of audit records; {alerts} xks_auth_failed alert events (counting {alerted}), at most {peak} alert command at a time"
    );
}

/// Issue 24: AWS KMS connects to an XKS proxy on port 443 only and refuses an endpoint
/// that names a port ("KMS communicates on port 443. Do not specify the port in the
/// XksProxyUriEndpoint value": the `CreateCustomKeyStore` API reference). The guide's
/// `create-custom-key-store` must give AWS an endpoint it accepts.
#[test]
fn the_xks_guide_gives_aws_an_endpoint_without_a_port() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/aws-xks.md"))
        .unwrap();
    let endpoints: Vec<&str> = guide
        .lines()
        .filter_map(|l| l.split("--xks-proxy-uri-endpoint ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(!endpoints.is_empty(), "the guide creates a key store");
    for endpoint in endpoints {
        let host = endpoint
            .strip_prefix("https://")
            .unwrap_or_else(|| panic!("{endpoint}: AWS requires https://"));
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'),
            "{endpoint}: letters, digits, dots and hyphens only (no port, no path)"
        );
    }
}

/// Issue 24: a refused client certificate ends the handshake with a TLS alert the client
/// reads (AWS KMS reports a handshake failure, with its reason). curl (OpenSSL) over TLS
/// 1.3 sends its request right after its certificate, before it can read the verdict;
/// Keyhold closed the socket with that request unread, the kernel answered with a reset,
/// and curl reported "not connected" instead of the alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_gets_an_alert_not_a_reset() {
    const KMS_SUBJECT: &str = "cks.kms.eu-west-1.amazonaws.com";
    let (s, _creds) = xks_server(
        1000,
        MAPPINGS,
        &format!("client_ca = \"pki/ca.pem\"\nclient_subject = \"{KMS_SUBJECT}\""),
    )
    .await;
    s.pki
        .issue("cks.kms.us-east-1.amazonaws.com", "spiffe://aws/kms-other");
    let url = format!("https://localhost:{}{HEALTH}", s.xks_addr.unwrap().port());
    for (who, alert) in [
        ("cks.kms.us-east-1.amazonaws.com", "alert access denied"),
        ("foreign", "alert unknown ca"),
    ] {
        for round in 0..5 {
            let out = std::process::Command::new("curl")
                .args(["-sS", "--tlsv1.3", "-X", "POST", "-d", "{}", "--cacert"])
                .arg(s.pki.ca())
                .arg("--cert")
                .arg(s.pki.cert(who))
                .arg("--key")
                .arg(s.pki.key(who))
                .arg(&url)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains(alert),
                "{who}, round {round}: {} {err}",
                out.status
            );
        }
    }
}
