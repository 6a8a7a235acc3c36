//! RSA-OAEP unwrap: the server's implementation (aws-lc-rs, constant time, through
//! `kms_server::crypto::kek::Kek`, exactly what `POST /v1/unwrap` runs for an RSA-wrapped DEK)
//! beside the `rsa` crate's decryption of the same ciphertext with the same key (which
//! the server must not use: RUSTSEC-2023-0071). Also the offline wrap (`rsa` crate,
//! public key) against the server-side wrap (aws-lc-rs).
//!
//! Run: `cargo bench -p keyhold-benches --bench rsa`

#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kms_client::api::{Algorithm, Context, PublicKeyResponse};
use kms_server::crypto::format::{self, Header, KeyId};
use kms_server::crypto::kek::Kek;
use rsa::pkcs8::DecodePrivateKey;

fn bench(c: &mut Criterion) {
    let header = Header {
        key_id: KeyId([3; 16]),
        version: 1,
    };
    let ctx: Context = [("object".to_string(), "scans/2026/11/22/42".to_string())].into();
    let canonical = format::canonical_context(&ctx).unwrap();
    let dek = [9u8; 32];
    for (alg, bits) in [
        (Algorithm::RsaOaep3072Sha256, 3072),
        (Algorithm::RsaOaep4096Sha256, 4096),
    ] {
        let (kek, pkcs8) = Kek::generate(alg).unwrap();
        let wrapped = kek.wrap(&header, &dek, &canonical).unwrap();
        let mut g = c.benchmark_group(format!("rsa-oaep-{bits}-sha256"));
        g.bench_function("unwrap: server (aws-lc-rs)", |b| {
            b.iter(|| kek.unwrap(black_box(&wrapped), &canonical).unwrap())
        });
        // The same operation with the rsa crate: same key, same ciphertext, same label.
        let private = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8.expose_secret()).unwrap();
        let (head, ct) = wrapped.split_at(kms_client::rsa_oaep::HEADER_LEN);
        let label = kms_client::rsa_oaep::label(head, &canonical);
        let check = private
            .decrypt(
                rsa::Oaep::new_with_label::<sha2::Sha256, _>(label.clone()),
                ct,
            )
            .unwrap();
        assert_eq!(check, dek);
        g.bench_function("unwrap: rsa crate (not used by the server)", |b| {
            b.iter(|| {
                private
                    .decrypt(
                        rsa::Oaep::new_with_label::<sha2::Sha256, _>(label.clone()),
                        black_box(ct),
                    )
                    .unwrap()
            })
        });
        g.bench_function("wrap: server (aws-lc-rs, public key)", |b| {
            b.iter(|| kek.wrap(&header, black_box(&dek), &canonical).unwrap())
        });
        let exported = public_key_response(&kek, alg);
        let offline = kms_client::rsa_oaep::OfflineWrapper::from_response(&exported).unwrap();
        g.bench_function("wrap: offline client (rsa crate, public key)", |b| {
            b.iter(|| offline.wrap(black_box(&dek), &ctx).unwrap())
        });
        g.finish();
    }
}

/// What `GET /v1/keys/{name}/public-key` would return for `kek`.
fn public_key_response(kek: &Kek, alg: Algorithm) -> PublicKeyResponse {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let public = rsa::RsaPublicKey::from_public_key_der(kek.public_key_der().unwrap()).unwrap();
    PublicKeyResponse {
        key: "bench".into(),
        id: "03".repeat(16),
        version: 1,
        algorithm: alg,
        pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
        jwk: kms_client::api::Jwk {
            kty: "RSA".into(),
            n: URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            e: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            alg: "RSA-OAEP-256".into(),
            use_: "enc".into(),
            kid: format!("{}:1", "03".repeat(16)),
        },
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
