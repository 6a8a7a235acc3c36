//! Envelope seal/open and streaming against raw ring AES-256-GCM on the same sizes, in
//! the same run (criterion). The raw baseline copies the input into a buffer and seals it
//! in one call with one key and nonce: the least work any AEAD envelope must do.
//!
//! Run: `cargo bench -p keyhold-benches --bench envelope`

#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{Read, Write};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use envelope::{Context, Decryptor, Encryptor, LocalProvider};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn raw_key() -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap())
}

fn raw_seal_to(key: &LessSafeKey, pt: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(pt);
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), buf)
        .unwrap();
}

fn raw_open_to(key: &LessSafeKey, ct: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(ct);
    let n = key
        .open_in_place(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), buf)
        .unwrap()
        .len();
    buf.truncate(n);
}

/// One-shot seal and open. Every variant writes into a reused buffer, so the allocator
/// does not decide the result. `envelope` is the whole operation (provider datakey or
/// unwrap, key schedule, commitment, segments); `envelope-data-path` is the part that
/// scales with size (the DEK already obtained, timed from a prepared `Encryptor`).
fn one_shot(c: &mut Criterion) {
    let rt = rt();
    let provider = LocalProvider::new();
    provider.rotate("bench").unwrap();
    let ctx: Context = [("tenant".to_string(), "acme".to_string())]
        .into_iter()
        .collect();
    let key = raw_key();
    for (label, size) in [("1KiB", 1024usize), ("64KiB", 64 << 10), ("1MiB", 1 << 20)] {
        let pt = vec![0xA5u8; size];
        let mut buf = Vec::with_capacity(size + 4096);
        let mut g = c.benchmark_group(format!("seal/{label}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("raw-ring", |b| b.iter(|| raw_seal_to(&key, &pt, &mut buf)));
        g.bench_function("envelope", |b| {
            b.iter(|| {
                buf.clear();
                let enc = rt
                    .block_on(Encryptor::new(&provider, "bench", &ctx))
                    .unwrap();
                enc.seal_to(&pt, &mut buf);
            })
        });
        g.bench_function("envelope-data-path", |b| {
            b.iter_batched(
                || {
                    rt.block_on(Encryptor::new(&provider, "bench", &ctx))
                        .unwrap()
                },
                |enc| {
                    buf.clear();
                    enc.seal_to(&pt, &mut buf);
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
        let mut raw_ct = Vec::new();
        raw_seal_to(&key, &pt, &mut raw_ct);
        let env_ct = rt
            .block_on(envelope::seal(&provider, "bench", &pt, &ctx))
            .unwrap();
        let (header, hlen) = envelope::Header::parse(&env_ct).unwrap();
        let mut g = c.benchmark_group(format!("open/{label}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("raw-ring", |b| {
            b.iter(|| raw_open_to(&key, &raw_ct, &mut buf))
        });
        g.bench_function("envelope", |b| {
            b.iter(|| {
                buf.clear();
                let mut src = &env_ct[..];
                let dec = rt
                    .block_on(Decryptor::from_reader(&provider, &mut src, &ctx))
                    .unwrap();
                dec.open_to(src, &mut buf).unwrap();
            })
        });
        let _ = header;
        let dec = {
            let mut src = &env_ct[..];
            rt.block_on(Decryptor::from_reader(&provider, &mut src, &ctx))
                .unwrap()
        };
        g.bench_function("envelope-data-path", |b| {
            b.iter(|| {
                buf.clear();
                dec.open_to(&env_ct[hlen..], &mut buf).unwrap();
            })
        });
        g.finish();
    }
}

/// 256 MiB through the streaming adapters (64 KiB segments) against raw ring sealing the
/// same 256 MiB in 64 KiB chunks through one reused buffer (what any streaming AEAD must
/// at least do), and against raw ring in one 256 MiB call.
fn streaming(c: &mut Criterion) {
    const SIZE: usize = 256 << 20;
    const CHUNK: usize = 64 << 10;
    let rt = rt();
    let provider = LocalProvider::new();
    provider.rotate("bench").unwrap();
    let ctx = Context::new();
    let key = raw_key();
    let pt = vec![0x5Au8; SIZE];
    let mut g = c.benchmark_group("stream/256MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    let mut chunk_buf = Vec::with_capacity(CHUNK + 16);
    g.bench_function("raw-ring-chunked", |b| {
        b.iter(|| {
            for c in pt.chunks(CHUNK) {
                raw_seal_to(&key, c, &mut chunk_buf);
                std::io::sink().write_all(&chunk_buf).unwrap();
            }
        })
    });
    let mut big = Vec::with_capacity(SIZE + 16);
    g.bench_function("raw-ring-one-call", |b| {
        b.iter(|| raw_seal_to(&key, &pt, &mut big))
    });
    g.bench_function("envelope-write", |b| {
        b.iter(|| {
            let enc = rt
                .block_on(Encryptor::new(&provider, "bench", &ctx))
                .unwrap();
            let mut w = enc.into_writer(std::io::sink());
            w.write_all(&pt).unwrap();
            w.finish().unwrap();
        })
    });
    let enc = rt
        .block_on(Encryptor::new(&provider, "bench", &ctx))
        .unwrap();
    let mut w = enc.into_writer(Vec::with_capacity(SIZE + (SIZE >> 10)));
    w.write_all(&pt).unwrap();
    let sealed = w.finish().unwrap();
    let raw_chunks: Vec<Vec<u8>> = pt
        .chunks(CHUNK)
        .map(|c| {
            let mut v = Vec::new();
            raw_seal_to(&key, c, &mut v);
            v
        })
        .collect();
    let mut out = vec![0u8; CHUNK];
    g.bench_function("raw-ring-chunked-open", |b| {
        b.iter(|| {
            for c in &raw_chunks {
                raw_open_to(&key, c, &mut chunk_buf);
                out[..chunk_buf.len()].copy_from_slice(&chunk_buf);
            }
        })
    });
    g.bench_function("envelope-read", |b| {
        b.iter(|| {
            let mut src = &sealed[..];
            let dec = rt
                .block_on(Decryptor::from_reader(&provider, &mut src, &ctx))
                .unwrap();
            let mut r = dec.into_reader(src);
            let mut total = 0;
            loop {
                let n = r.read(&mut out).unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            assert_eq!(total, SIZE);
        })
    });
    g.finish();
}

criterion_group!(benches, one_shot, streaming);
criterion_main!(benches);
