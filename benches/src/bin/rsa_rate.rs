//! The raw RSA-OAEP-SHA-256 decryption rate of the server's RSA implementation
//! (`kms_server::crypto::kek::Kek`, aws-lc-rs) on one thread: what a DKE decrypt costs at the
//! least, for `benches/dke.sh` to compare the endpoint's throughput with.
//!
//! Usage: rsa_rate [bits (2048)] [seconds (5)]; prints one JSON line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kms_client::api::Algorithm;
use kms_server::crypto::kek::Kek;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bits: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2048);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let alg = match bits {
        2048 => Algorithm::RsaOaep2048Sha256,
        3072 => Algorithm::RsaOaep3072Sha256,
        4096 => Algorithm::RsaOaep4096Sha256,
        _ => panic!("bits: 2048, 3072 or 4096"),
    };
    let (kek, _) = Kek::generate(alg).unwrap();
    // A ciphertext as a DKE client makes it: OAEP (SHA-256, MGF1-SHA-256), no label.
    use rsa::pkcs8::DecodePublicKey as _;
    let public = rsa::RsaPublicKey::from_public_key_der(kek.public_key_der().unwrap()).unwrap();
    let ct = public
        .encrypt(
            &mut rsa::rand_core::OsRng,
            rsa::Oaep::new::<sha2::Sha256>(),
            &[7u8; 32],
        )
        .unwrap();
    assert_eq!(
        kek.decrypt_unlabelled(&ct)
            .unwrap()
            .unwrap()
            .expose_secret(),
        &[7u8; 32]
    );
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < until {
        for _ in 0..16 {
            std::hint::black_box(kek.decrypt_unlabelled(std::hint::black_box(&ct)));
        }
        n += 16;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bits": bits, "decrypts": n, "per_second_one_core": rate.round()})
    );
}
