//! In-process cost of the wrapped-DEK format (criterion): what one unwrap adds on the
//! server beyond TLS and HTTP.
//!
//! Run: `cargo bench -p keyhold-benches --bench wrap`

#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kms_server::crypto::format::{self, Header, KeyId};
use kms_server::crypto::secret::SecretKey;

fn bench(c: &mut Criterion) {
    let kek = SecretKey::generate().unwrap();
    let header = Header {
        key_id: KeyId([3; 16]),
        version: 1,
    };
    let ctx = [
        ("tenant".to_string(), "acme".to_string()),
        ("object".to_string(), "invoices/2026/11/22/42".to_string()),
    ]
    .into_iter()
    .collect();
    let canonical = format::canonical_context(&ctx).unwrap();
    let dek = [9u8; 32];
    let wrapped = format::wrap(&kek, &header, &dek, &canonical).unwrap();
    c.bench_function("wrap 32-byte DEK", |b| {
        b.iter(|| format::wrap(&kek, &header, black_box(&dek), &canonical).unwrap())
    });
    c.bench_function("unwrap 32-byte DEK", |b| {
        b.iter(|| format::unwrap(&kek, black_box(&wrapped), &canonical).unwrap())
    });
    c.bench_function("canonical context (2 entries)", |b| {
        b.iter(|| format::canonical_context(black_box(&ctx)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
