//! Replays the fuzz targets' seeds and corpus (`kms-server/fuzz/seeds/<target>/`,
//! `kms-server/fuzz/corpus/<target>/`) through the same entry points the fuzzers drive
//! (`kms_server::tools::fuzzing`), on stable Rust, on every CI run: an input that once crashed a
//! parser stays fixed. `cargo test -p kms-server --test fuzz_corpus -- --ignored` rewrites
//! the seeds from real artifacts (run it after a format change).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target)
}

#[test]
fn every_seed_and_corpus_input_runs_without_panic() {
    for (target, run) in kms_server::tools::fuzzing::TARGETS {
        let mut n = 0;
        for kind in ["seeds", "corpus"] {
            let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| run(&bytes));
                assert!(result.is_ok(), "{target}: {} panics", path.display());
                n += 1;
            }
        }
        assert!(n > 0, "{target}: no seeds");
        eprintln!("fuzz corpus: {target}: {n} inputs");
    }
}

#[test]
#[ignore = "writes the seed files; run by hand"]
fn write_seeds() {
    use kms_client::api::{Algorithm, Context};
    use kms_server::crypto::format::{Header, KeyId};
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir("seeds", target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    // Wrapped DEKs of both suites (byte 0: context length, then the context, then the DEK).
    let ctx: Context = [("tenant".to_string(), "acme".to_string())].into();
    let canonical = kms_server::crypto::format::canonical_context(&ctx).unwrap();
    for (alg, name) in [
        (Algorithm::Aes256Gcm, "aes"),
        (Algorithm::RsaOaep3072Sha256, "rsa"),
    ] {
        let (kek, _) = kms_server::crypto::kek::Kek::generate(alg).unwrap();
        let header = Header {
            key_id: KeyId([1; 16]),
            version: 1,
        };
        let w = kek.wrap(&header, &[9; 32], &canonical).unwrap();
        let mut seed = vec![canonical.len() as u8];
        seed.extend_from_slice(&canonical);
        seed.extend_from_slice(&w);
        write("wrapped_dek", name, &seed);
    }
    write("wrapped_dek", "dek-sized", &[0; 33]);
    // One valid body per route.
    let bodies = [
        (
            "create",
            r#"{"name":"k","algorithm":"rsa-oaep-3072-sha256","rotation_period":"90d","grants":[{"identity":"spiffe://x/app","operations":["wrap","unwrap"],"constraints":{"context_subset":{"a":"b"}}}]}"#,
        ),
        (
            "grants",
            r#"{"grants":[{"identity":"i","operations":["datakey"],"constraints":{"context_equals":{"a":"b"}}}]}"#,
        ),
        ("datakey", r#"{"context":{"tenant":"acme","object":"x"}}"#),
        (
            "wrap",
            r#"{"plaintext":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","context":{}}"#,
        ),
        (
            "unwrap",
            r#"{"wrapped":"S1cBAQEBAQEBAQEBAQEBAQEBAQEAAAAB","context":{"a":"1"}}"#,
        ),
        (
            "batch",
            r#"{"items":[{"op":"unwrap","wrapped":"S1cBAQ==","context":{}},{"op":"datakey","key":"k"},{"op":"wrap","key":"k","plaintext":"AAAAAAAAAAAAAAAAAAAAAA=="},{"op":"rewrap","wrapped":"AA=="}]}"#,
        ),
        ("schedule", r#"{"pending_days":7}"#),
        ("min", r#"{"version":2}"#),
        ("dry-run", r#"{"version":2,"window_days":7}"#),
        ("unseal", r#"{"share":"khs1-0011223344556677-1-AAAA"}"#),
        ("identity", r#"{"identity":"spiffe://x/y","role":"app"}"#),
    ];
    for (name, body) in bodies {
        write("request_json", name, body.as_bytes());
    }
    // Configurations: the documented example and a minimal one.
    let example =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kms-server.toml"))
            .unwrap();
    write("config", "deploy-example", &example);
    write(
        "config",
        "minimal",
        b"listen = \"127.0.0.1:8443\"\n[store]\npath = \"s.redb\"\n[seal]\nmethod = \"pkcs11\"\n[seal.pkcs11]\nmodule = \"/m.so\"\ntoken_label = \"t\"\n[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n[[identities]]\nidentity = \"i\"\ntenant = \"t\"\nrole = \"app\"\n",
    );
    // A CRL (PEM and DER) and client certificates.
    let ca = kms_server::tools::pki::Pki::generate("fuzz CA").unwrap();
    let client = ca
        .issue_client("fuzz-client", Some("spiffe://fuzz/app"))
        .unwrap();
    let crl = ca.revocation_list(&[client.cert_pem.as_str()], 1).unwrap();
    write("pem_crl", "crl.pem", crl.as_bytes());
    use rustls::pki_types::pem::PemObject;
    let der =
        rustls::pki_types::CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap();
    write("pem_crl", "crl.der", der.as_ref());
    let cert =
        rustls::pki_types::CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
    write("client_cert", "spiffe", cert.as_ref());
    let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let cert =
        rustls::pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap();
    write("client_cert", "dns", cert.as_ref());
    // Shamir shares.
    let (_, shares) = kms_server::crypto::seal::ShamirSealer::deal(3, 2).unwrap();
    write("unseal_share", "share", shares[0].as_bytes());
}

/// The KMIP seeds are PyKMIP 0.11's own encodings (captured from its client, source named
/// in `kms-server/fuzz/seeds/kmip/README`): every request reads as a Request Message of
/// the operation its name says, in the version it was made for.
#[test]
fn pykmip_requests_read_as_requests() {
    use kms_server::adapters::kmip::{message::Request, ttlv};
    let mut n = 0;
    for entry in std::fs::read_dir(dir("seeds", "kmip")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.contains("-req-") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let item = ttlv::Item::decode(&bytes, ttlv::Limits::default()).unwrap();
        assert_eq!(item.encode(), bytes, "{name}: re-encoded differently");
        let request = Request::of(&item).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let major = if name.starts_with("pykmip-20") { 2 } else { 1 };
        assert_eq!(request.version.major, major, "{name}");
        assert_eq!(request.items.len(), 1, "{name}");
        let op = request.items[0].operation;
        let expected = [
            ("create", 0x01),
            ("register", 0x03),
            ("locate", 0x08),
            ("get-attribute-list", 0x0C),
            ("get-attributes", 0x0B),
            ("get-", 0x0A),
            ("activate", 0x12),
            ("revoke", 0x13),
            ("destroy", 0x14),
            ("encrypt", 0x1F),
            ("decrypt", 0x20),
        ]
        .iter()
        .find(|(k, _)| name.contains(&format!("-{k}")))
        .map(|(_, op)| *op);
        assert_eq!(Some(op), expected, "{name}");
        n += 1;
    }
    assert_eq!(n, 19, "PyKMIP request seeds");
}
