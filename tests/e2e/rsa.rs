//! RSA KEKs over mTLS: public-key export (PEM and JWK), offline wrap with the `rsa` crate
//! (kms-client) unwrapped by the server (aws-lc-rs), server-side wrap, rotation and
//! rewrap keeping the context, batch, authorization of the export, restart, and
//! destruction that leaves none of the private key in the store files.

use std::time::Duration;

use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer, APP_A};
use kms_client::api::{
    Algorithm, BatchItem, BatchResult, Context, CreateKeyRequest, Grant, GrantOperation,
};
use kms_client::rsa_oaep::{OfflineProvider, OfflineWrapper};
use serde_json::json;

use crate::{assert_error, get, post};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const DAY: Duration = Duration::from_secs(86_400);

fn ctx(pairs: &[(&str, &str)]) -> Context {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `wrapped` unwraps (through the server, with `ctx`) to exactly `dek`.
async fn unwraps_to(app: &kms_client::Client, wrapped: &[u8], ctx: &Context, dek: &[u8]) {
    let u = app.unwrap(wrapped, ctx).await.unwrap();
    assert_eq!(u.plaintext.expose_secret(), dek);
}

/// A GET by `who` that must be refused with `status` and `code`.
async fn refused(s: &TestServer, who: &str, path: &str, status: u16, code: &str) {
    assert_error(&get(&s.client(Some(who)), &s.url(path)).await, status, code);
}

fn rsa_key(name: &str, algorithm: Algorithm, ops: &[GrantOperation]) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        algorithm: Some(algorithm),
        rotation_period: None,
        grants: vec![Grant::new(APP_A, ops)],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keks_export_wrap_offline_unwrap_in_the_server() {
    let mut s =
        TestServer::start_with(TestSeal::KeyFile, "[keys]\nsweep_interval_secs = 1\n").await;
    let admin = s.kms_client("admin-a");
    let app = s.kms_client("app-a");
    let info = admin
        .create_key(&rsa_key(
            "r3",
            Algorithm::RsaOaep3072Sha256,
            &GrantOperation::ALL,
        ))
        .await
        .unwrap();
    assert_eq!(info.algorithm, Algorithm::RsaOaep3072Sha256);
    admin
        .create_key(&rsa_key(
            "r4",
            Algorithm::RsaOaep4096Sha256,
            &GrantOperation::ALL,
        ))
        .await
        .unwrap();
    // An app that may only unwrap cannot fetch the public key; admin and auditor can.
    admin
        .create_key(&rsa_key(
            "r-unwrap-only",
            Algorithm::RsaOaep3072Sha256,
            &[GrantOperation::Unwrap],
        ))
        .await
        .unwrap();

    // Export: PEM and JWK describe the same 3072-bit key (OfflineWrapper checks that).
    let exported = app.public_key("r3", None).await.unwrap();
    assert_eq!(
        (exported.version, exported.id.as_str()),
        (1, info.id.as_str())
    );
    assert!(
        exported.pem.starts_with("-----BEGIN PUBLIC KEY-----\n"),
        "{}",
        exported.pem
    );
    assert_eq!(
        (
            exported.jwk.kty.as_str(),
            exported.jwk.alg.as_str(),
            exported.jwk.use_.as_str(),
            exported.jwk.e.as_str()
        ),
        ("RSA", "RSA-OAEP-256", "enc", "AQAB")
    );
    assert_eq!(exported.jwk.kid, format!("{}:1", info.id));
    assert_eq!(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&exported.jwk.n)
            .unwrap()
            .len(),
        384
    );
    let raw = get(
        &s.client(Some("auditor-a")),
        &s.url("/v1/keys/r3/public-key"),
    )
    .await;
    assert_eq!(raw.0, 200, "{raw:?}");
    assert_eq!(raw.1["pem"], exported.pem.as_str());

    // Offline wrap (rsa crate, no server call) → server unwrap (aws-lc-rs).
    let wrapper = OfflineWrapper::from_response(&exported).unwrap();
    let c = ctx(&[("bucket", "scans"), ("object", "x-ray-17")]);
    let dek = [0x5Au8; 32];
    let offline = wrapper.wrap(&dek, &c).unwrap();
    assert_eq!(offline.len(), 24 + 384);
    let un = app.unwrap(&offline, &c).await.unwrap();
    assert_eq!(
        (un.plaintext.expose_secret(), un.key.as_str(), un.version),
        (&dek[..], "r3", 1)
    );
    // The context is bound: another one, or none, is DecryptFailed.
    for other in [
        ctx(&[]),
        ctx(&[("bucket", "scans"), ("object", "x-ray-18")]),
    ] {
        let raw = post(
            &s.client(Some("app-a")),
            &s.url("/v1/unwrap"),
            json!({"wrapped": B64.encode(&offline), "context": other}),
        )
        .await;
        assert_error(&raw, 400, "DecryptFailed");
    }
    // Every flipped byte of header or ciphertext (sampled) is refused the same way.
    for i in [0, 3, 4, 19, 20, 23, 24, 100, 407] {
        let mut bad = offline.clone();
        bad[i] ^= 0x01;
        let raw = post(
            &s.client(Some("app-a")),
            &s.url("/v1/unwrap"),
            json!({"wrapped": B64.encode(&bad), "context": c}),
        )
        .await;
        assert_error(&raw, 400, "DecryptFailed");
    }

    // Server-side datakey and wrap under RSA keys, both sizes.
    let d = app.datakey("r3", &c).await.unwrap();
    assert_eq!(d.wrapped.as_bytes().len(), 24 + 384);
    unwraps_to(&app, d.wrapped.as_bytes(), &c, d.plaintext.expose_secret()).await;
    let d4 = app.datakey("r4", &c).await.unwrap();
    assert_eq!(d4.wrapped.as_bytes().len(), 24 + 512);
    unwraps_to(
        &app,
        d4.wrapped.as_bytes(),
        &c,
        d4.plaintext.expose_secret(),
    )
    .await;
    let w = app.wrap("r4", &[7u8; 16], &c).await.unwrap();
    assert_eq!(
        app.unwrap(w.wrapped.as_bytes(), &c)
            .await
            .unwrap()
            .plaintext
            .expose_secret(),
        &[7u8; 16]
    );

    // Envelope: sealed offline (no datakey call), opened through the server.
    let provider = OfflineProvider::new(
        OfflineWrapper::from_response(&exported).unwrap(),
        s.kms_client("app-a"),
    );
    let sealed = envelope::seal(&provider, "r3", b"patient record 9", &c)
        .await
        .unwrap();
    assert_eq!(
        envelope::open(&provider, &sealed, &c).await.unwrap(),
        b"patient record 9"
    );
    assert!(envelope::open(&provider, &sealed, &ctx(&[])).await.is_err());

    // Rotation: a new key pair; the old offline wrap still unwraps; rewrap keeps the
    // context and moves it to version 2; a batch unwraps both.
    let rotated = admin.rotate_key("r3").await.unwrap();
    assert_eq!(rotated.current_version, 2);
    let v2 = app.public_key("r3", None).await.unwrap();
    assert_eq!(v2.version, 2);
    assert_ne!(v2.pem, exported.pem);
    assert_eq!(
        app.public_key("r3", Some(1)).await.unwrap().pem,
        exported.pem
    );
    let re = app.rewrap(&offline, &c).await.unwrap();
    assert_eq!(re.version, 2);
    assert!(app.unwrap(re.wrapped.as_bytes(), &ctx(&[])).await.is_err());
    let results = app
        .batch(vec![
            BatchItem::Unwrap {
                wrapped: offline.clone().into(),
                context: c.clone(),
            },
            BatchItem::Unwrap {
                wrapped: re.wrapped.clone(),
                context: c.clone(),
            },
            BatchItem::Unwrap {
                wrapped: re.wrapped.clone(),
                context: ctx(&[]),
            },
        ])
        .await
        .unwrap();
    match (&results[0], &results[1], &results[2]) {
        (BatchResult::Unwrap(a), BatchResult::Unwrap(b), BatchResult::Error(e)) => {
            assert_eq!((a.version, b.version), (1, 2));
            assert_eq!(a.plaintext.expose_secret(), &dek[..]);
            assert_eq!(b.plaintext.expose_secret(), &dek[..]);
            assert_eq!(e.code, kms_client::api::ErrorCode::DecryptFailed);
        }
        other => panic!("unexpected batch results: {other:?}"),
    }
    // Retiring version 1: its public key is no longer served, its DEKs no longer unwrap.
    admin.set_min_decrypt_version("r3", 2).await.unwrap();
    refused(
        &s,
        "app-a",
        "/v1/keys/r3/public-key?version=1",
        400,
        "InvalidRequest",
    )
    .await;
    assert!(app.unwrap(&offline, &c).await.is_err());

    // Authorization and refusals of the export.
    refused(
        &s,
        "app-a",
        "/v1/keys/r-unwrap-only/public-key",
        403,
        "PermissionDenied",
    )
    .await;
    refused(&s, "app-b", "/v1/keys/r3/public-key", 404, "NotFound").await;
    refused(&s, "admin-a", "/v1/keys/nope/public-key", 404, "NotFound").await;
    let aes = crate::create_key(&s, "admin-a", "sym").await;
    assert_eq!(aes["algorithm"], "aes-256-gcm");
    refused(
        &s,
        "app-a",
        "/v1/keys/sym/public-key",
        400,
        "InvalidRequest",
    )
    .await;
    refused(
        &s,
        "app-a",
        "/v1/keys/r3/public-key?version=9",
        404,
        "NotFound",
    )
    .await;
    refused(
        &s,
        "app-a",
        "/v1/keys/r3/public-key?version=x",
        400,
        "InvalidRequest",
    )
    .await;
    // Disabled: no export, no unwrap.
    admin.disable_key("r4").await.unwrap();
    refused(&s, "app-a", "/v1/keys/r4/public-key", 409, "KeyDisabled").await;
    assert!(app.unwrap(d4.wrapped.as_bytes(), &c).await.is_err());
    admin.enable_key("r4").await.unwrap();

    // A restart reloads the key pairs from the store (sealed under the master key).
    s.restart().await;
    let app = s.kms_client("app-a");
    unwraps_to(
        &app,
        d4.wrapped.as_bytes(),
        &c,
        d4.plaintext.expose_secret(),
    )
    .await;
    assert_eq!(app.public_key("r3", None).await.unwrap().pem, v2.pem);

    // Destruction: the private keys of r4 are gone from every file in the data directory.
    s.stop().await;
    let store_path = s.dir.path().join("store.redb");
    let key_file = s.dir.path().join("master.key");
    let (before, _) = keyhold_tests::forensics::keks(&store_path, &key_file);
    let r4 = before.iter().find(|k| k.name == "r4").unwrap();
    assert_eq!(r4.versions.len(), 1);
    let pkcs8 = r4.versions[0].clone();
    assert!(
        pkcs8.len() > 2000,
        "a 4096-bit PKCS#8 key: {} bytes",
        pkcs8.len()
    );
    // The d (private exponent) region of the key, alone, must not be found either.
    let tail = pkcs8[pkcs8.len() - 600..pkcs8.len() - 400].to_vec();
    s.start_again().await;
    let admin = s.kms_client("admin-a");
    admin.schedule_deletion("r4", 7).await.unwrap();
    s.advance_clock(8 * DAY);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let k = admin.get_key("r4").await.unwrap();
        if k.state == kms_client::api::KeyState::Destroyed {
            assert!(k.versions.is_empty());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not destroyed: {k:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s
        .kms_client("app-a")
        .unwrap(d4.wrapped.as_bytes(), &c)
        .await
        .is_err());
    s.stop().await;
    // An independent reader with the master key finds no version and no erasure key left,
    // and no file holds the private key (or its private-exponent region alone).
    keyhold_tests::forensics::assert_shredded(
        s.dir.path(),
        &store_path,
        &key_file,
        "r4",
        &[pkcs8, tail],
    );
}
