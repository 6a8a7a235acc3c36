//! The crate's tests: round trips (proptest), every kind of tampering, golden files for
//! format version 1 (byte-identical under both backends), streaming adapters, seeking,
//! and the DEK cache.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::*;

const SEG: u32 = 64;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn provider() -> LocalProvider {
    let p = LocalProvider::new();
    p.rotate("k").unwrap();
    p
}

fn small() -> Options {
    Options {
        segment_size: SEG,
        cache: None,
    }
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// A provider that counts its calls.
#[derive(Default)]
struct Counting {
    inner: LocalProvider,
    datakeys: AtomicUsize,
    unwraps: AtomicUsize,
}

impl KeyProvider for Counting {
    fn cache_id(&self) -> Option<ProviderId> {
        self.inner.cache_id()
    }
    async fn datakey(&self, key: &str, context: &Context) -> Result<DataKeyPair, ProviderError> {
        self.datakeys.fetch_add(1, Ordering::SeqCst);
        self.inner.datakey(key, context).await
    }
    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Dek, ProviderError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap(key, wrapped, context).await
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sizes from 0 to three segments and one byte, random contexts; one-shot, sync
    /// streaming and async streaming all agree.
    #[test]
    fn round_trips(len in 0usize..=(3 * SEG as usize + 1),
                   pairs in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,16}", 0..4),
                   chunk in 1usize..100) {
        let rt = rt();
        let p = provider();
        let plaintext = data(len);
        let sealed = rt.block_on(seal_with(&p, "k", &plaintext, &pairs, &small())).unwrap();
        prop_assert_eq!(rt.block_on(open(&p, &sealed, &pairs)).unwrap(), plaintext.clone());

        // Sync writer, fed in `chunk`-sized writes, reads back through the sync reader.
        let enc = rt.block_on(Encryptor::with_options(&p, "k", &pairs, &small())).unwrap();
        let mut w = enc.into_writer(Vec::new());
        for c in plaintext.chunks(chunk) {
            w.write_all(c).unwrap();
        }
        let streamed = w.finish().unwrap();
        prop_assert_eq!(streamed.len(), sealed.len());
        let mut r = Cursor::new(&streamed);
        let dec = rt.block_on(Decryptor::from_reader(&p, &mut r, &pairs)).unwrap();
        let mut out = Vec::new();
        dec.into_reader(r).read_to_end(&mut out).unwrap();
        prop_assert_eq!(&out, &plaintext);

        // Async writer and reader.
        let async_out = rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let enc = Encryptor::with_options(&p, "k", &pairs, &small()).await.unwrap();
            let mut w = enc.into_async_writer(Vec::new());
            for c in plaintext.chunks(chunk) {
                w.write_all(c).await.unwrap();
            }
            w.shutdown().await.unwrap();
            let bytes = w.into_inner();
            let mut r = &bytes[..];
            let dec = Decryptor::from_async_reader(&p, &mut r, &pairs).await.unwrap();
            let mut out = Vec::new();
            dec.into_async_reader(r).read_to_end(&mut out).await.unwrap();
            out
        });
        prop_assert_eq!(&async_out, &plaintext);
    }
}

fn assert_rejected(
    rt: &tokio::runtime::Runtime,
    p: &LocalProvider,
    bytes: &[u8],
    c: &Context,
    what: &str,
) {
    match rt.block_on(open(p, bytes, c)) {
        Err(Error::DecryptFailed) => {}
        other => panic!(
            "{what}: expected DecryptFailed, got {:?}",
            other.map(|v| v.len())
        ),
    }
    // The streaming reader refuses too, and never hands out plaintext first.
    let mut r = Cursor::new(bytes);
    if let Ok(dec) = rt.block_on(Decryptor::from_reader(p, &mut r, c)) {
        let mut out = Vec::new();
        let res = dec.into_reader(r).read_to_end(&mut out);
        assert!(res.is_err(), "{what}: streaming reader accepted it");
        assert_eq!(
            res.unwrap_err().kind(),
            std::io::ErrorKind::InvalidData,
            "{what}"
        );
    }
}

#[test]
fn flip_each_byte_of_a_small_envelope() {
    let rt = rt();
    let p = provider();
    let c = ctx(&[("a", "1")]);
    let sealed = rt
        .block_on(seal_with(&p, "k", &data(150), &c, &small()))
        .unwrap();
    for i in 0..sealed.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = sealed.clone();
            bad[i] ^= bit;
            assert_rejected(&rt, &p, &bad, &c, &format!("byte {i} bit {bit:#x}"));
        }
    }
}

#[test]
fn truncation_at_and_inside_every_segment() {
    let rt = rt();
    let p = provider();
    let c = Context::new();
    let sealed = rt
        .block_on(seal_with(
            &p,
            "k",
            &data(3 * SEG as usize + 1),
            &c,
            &small(),
        ))
        .unwrap();
    let (_, h) = Header::parse(&sealed).unwrap();
    for cut in 0..sealed.len() {
        assert_rejected(
            &rt,
            &p,
            &sealed[..cut],
            &c,
            &format!("cut at {cut} (header {h})"),
        );
    }
    let mut longer = sealed.clone();
    longer.push(0);
    assert_rejected(&rt, &p, &longer, &c, "one byte appended");
}

#[test]
fn swapped_duplicated_and_spliced_segments() {
    let rt = rt();
    let p = provider();
    let c = Context::new();
    let pt = data(3 * SEG as usize + 10);
    let sealed = rt.block_on(seal_with(&p, "k", &pt, &c, &small())).unwrap();
    let (_, h) = Header::parse(&sealed).unwrap();
    let full = SEG as usize + 16;
    let seg = |i: usize| sealed[h + i * full..(h + (i + 1) * full).min(sealed.len())].to_vec();
    let header = sealed[..h].to_vec();
    let build = |parts: &[Vec<u8>]| [vec![header.clone()], parts.to_vec()].concat().concat();
    assert_eq!(build(&[seg(0), seg(1), seg(2), seg(3)]), sealed);
    assert_rejected(
        &rt,
        &p,
        &build(&[seg(1), seg(0), seg(2), seg(3)]),
        &c,
        "swap 0,1",
    );
    assert_rejected(
        &rt,
        &p,
        &build(&[seg(0), seg(0), seg(2), seg(3)]),
        &c,
        "duplicate 0",
    );
    assert_rejected(&rt, &p, &build(&[seg(0), seg(1), seg(2)]), &c, "drop last");
    assert_rejected(
        &rt,
        &p,
        &build(&[seg(0), seg(2), seg(3)]),
        &c,
        "drop middle",
    );
    // Splice: the same plaintext sealed again (same key, same context) gives other segments.
    let other = rt.block_on(seal_with(&p, "k", &pt, &c, &small())).unwrap();
    let oseg = other[h + full..h + 2 * full].to_vec();
    assert_rejected(
        &rt,
        &p,
        &build(&[seg(0), oseg, seg(2), seg(3)]),
        &c,
        "splice",
    );
    // Another envelope's header on these segments.
    let mut foreign = other[..h].to_vec();
    foreign.extend_from_slice(&sealed[h..]);
    assert_rejected(&rt, &p, &foreign, &c, "foreign header");
}

#[test]
fn wrong_context_key_version_and_commitment() {
    let rt = rt();
    let p = provider();
    let c = ctx(&[("tenant", "acme")]);
    let sealed = rt.block_on(seal(&p, "k", b"hello", &c)).unwrap();
    assert_rejected(
        &rt,
        &p,
        &sealed,
        &ctx(&[("tenant", "globex")]),
        "wrong context",
    );
    assert_rejected(&rt, &p, &sealed, &Context::new(), "no context");
    // Wrong key version: rewrite the header to name version 2 of the same key.
    p.rotate("k").unwrap();
    let (mut header, h) = Header::parse(&sealed).unwrap();
    header.key.version = 2;
    let mut bad = header.encode();
    bad.extend_from_slice(&sealed[h..]);
    assert_rejected(&rt, &p, &bad, &c, "wrong key version");
    // Another provider (another KEK of the same name).
    assert_rejected(&rt, &provider(), &sealed, &c, "foreign provider");
    // Commitment mismatch, with everything else valid: a header whose commitment was
    // made for another DEK.
    let (header, h) = Header::parse(&sealed).unwrap();
    let mut forged = header.clone();
    forged.commitment[0] ^= 1;
    let mut bad = forged.encode();
    bad.extend_from_slice(&sealed[h..]);
    assert_rejected(&rt, &p, &bad, &c, "commitment");
}

/// Key commitment in action: a DEK that is not the one committed to is refused before
/// any segment is tried, even if the attacker controls the provider's answer.
#[test]
fn commitment_refuses_another_dek() {
    struct Liar(Dek);
    impl KeyProvider for Liar {
        async fn datakey(&self, _: &str, _: &Context) -> Result<DataKeyPair, ProviderError> {
            Err(ProviderError::new(ProviderErrorKind::Other, None))
        }
        async fn unwrap(&self, _: &KeyRef, _: &[u8], _: &Context) -> Result<Dek, ProviderError> {
            Ok(Dek::from_slice(self.0.expose_secret()).unwrap())
        }
    }
    let rt = rt();
    let p = provider();
    let sealed = rt
        .block_on(seal(&p, "k", b"hello", &Context::new()))
        .unwrap();
    let liar = Liar(Dek::generate().unwrap());
    assert!(matches!(
        rt.block_on(open(&liar, &sealed, &Context::new())),
        Err(Error::DecryptFailed)
    ));
}

#[test]
fn provider_errors_other_than_decrypt_are_not_hidden() {
    let rt = rt();
    let p = LocalProvider::new();
    let e = rt
        .block_on(seal(&p, "missing", b"x", &Context::new()))
        .unwrap_err();
    assert!(
        matches!(e, Error::Provider(ref pe) if pe.kind() == ProviderErrorKind::NotFound),
        "{e:?}"
    );
    assert!(matches!(
        rt.block_on(seal(&p, "", b"x", &Context::new())),
        Err(Error::InvalidInput(_))
    ));
    let opts = Options {
        segment_size: 1,
        cache: None,
    };
    assert!(matches!(
        rt.block_on(seal_with(&provider(), "k", b"x", &Context::new(), &opts)),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn garbage_never_panics() {
    let rt = rt();
    let p = provider();
    let c = Context::new();
    let mut rng = 0x1234_5678_u64;
    for len in 0..400 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        assert!(rt.block_on(open(&p, &bytes, &c)).is_err());
        let mut with_magic = b"KHEV\x01\x01\x00\x00\x00\x40".to_vec();
        with_magic.extend_from_slice(&bytes);
        assert!(rt.block_on(open(&p, &with_magic, &c)).is_err());
    }
}

#[test]
fn seekable_reads_ranges_and_touches_only_needed_segments() {
    struct CountingCursor {
        inner: Cursor<Vec<u8>>,
        read: Arc<Mutex<u64>>,
    }
    impl Read for CountingCursor {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            *self.read.lock().unwrap() += n as u64;
            Ok(n)
        }
    }
    impl Seek for CountingCursor {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(pos)
        }
    }
    let rt = rt();
    let p = provider();
    let c = Context::new();
    let pt = data(10 * SEG as usize + 5);
    let sealed = rt.block_on(seal_with(&p, "k", &pt, &c, &small())).unwrap();
    let read = Arc::new(Mutex::new(0));
    let mut src = CountingCursor {
        inner: Cursor::new(sealed.clone()),
        read: read.clone(),
    };
    let dec = rt
        .block_on(Decryptor::from_reader(&p, &mut src, &c))
        .unwrap();
    let mut r = dec.into_seekable(src).unwrap();
    assert_eq!(r.plaintext_len(), pt.len() as u64);
    *read.lock().unwrap() = 0;
    r.seek(SeekFrom::Start(5 * SEG as u64 + 10)).unwrap();
    let mut out = vec![0; 20];
    r.read_exact(&mut out).unwrap();
    assert_eq!(out, pt[5 * SEG as usize + 10..5 * SEG as usize + 30]);
    assert_eq!(*read.lock().unwrap(), SEG as u64 + 16, "one segment read");
    // Across a boundary, at the end, past the end.
    r.seek(SeekFrom::Start(2 * SEG as u64 - 3)).unwrap();
    let mut out = vec![0; 6];
    r.read_exact(&mut out).unwrap();
    assert_eq!(out, pt[2 * SEG as usize - 3..2 * SEG as usize + 3]);
    r.seek(SeekFrom::End(-5)).unwrap();
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, pt[pt.len() - 5..]);
    assert_eq!(r.read(&mut [0; 4]).unwrap(), 0);
    // A tampered segment fails only when read, and opaquely.
    let mut bad = sealed.clone();
    let (_, h) = Header::parse(&sealed).unwrap();
    bad[h + 3 * (SEG as usize + 16) + 1] ^= 1;
    let mut src = Cursor::new(bad);
    let dec = rt
        .block_on(Decryptor::from_reader(&p, &mut src, &c))
        .unwrap();
    let mut r = dec.into_seekable(src).unwrap();
    let mut one = [0u8; 1];
    r.read_exact(&mut one).unwrap();
    r.seek(SeekFrom::Start(3 * SEG as u64)).unwrap();
    assert_eq!(
        r.read(&mut one).unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );
    // Truncated at a segment boundary: the new last segment is not a last segment.
    let cut = sealed[..h + 4 * (SEG as usize + 16)].to_vec();
    let mut src = Cursor::new(cut);
    let dec = rt
        .block_on(Decryptor::from_reader(&p, &mut src, &c))
        .unwrap();
    let mut r = dec.into_seekable(src).unwrap();
    r.seek(SeekFrom::End(-1)).unwrap();
    assert!(r.read(&mut one).is_err());
}

#[test]
fn cache_serves_within_limits_only() {
    let rt = rt();
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock_now = now.clone();
    let limits = CacheLimits {
        max_age: Duration::from_secs(10),
        max_messages: 3,
        max_bytes: 100,
        capacity: 2,
    };
    let cache = Arc::new(
        DekCache::with_clock(limits, Box::new(move || *clock_now.lock().unwrap())).unwrap(),
    );
    let p = Counting::default();
    p.inner.rotate("k").unwrap();
    let opts = Options {
        segment_size: SEG,
        cache: Some(cache.clone()),
    };
    let c = ctx(&[("x", "1")]);
    let seal_n = |n: usize| {
        rt.block_on(seal_with(&p, "k", &data(n), &c, &opts))
            .unwrap()
    };
    let a = seal_n(10);
    let b = seal_n(10);
    let _ = seal_n(10);
    assert_eq!(
        p.datakeys.load(Ordering::SeqCst),
        1,
        "three messages, one DEK"
    );
    assert_ne!(a, b, "each message still has its own salt and keys");
    let (ha, _) = Header::parse(&a).unwrap();
    let (hb, _) = Header::parse(&b).unwrap();
    assert_eq!(ha.wrapped_dek, hb.wrapped_dek);
    assert_ne!(ha.salt, hb.salt);
    let _ = seal_n(10);
    assert_eq!(
        p.datakeys.load(Ordering::SeqCst),
        2,
        "max_messages reached: fresh DEK"
    );
    let _ = seal_n(95);
    assert_eq!(
        p.datakeys.load(Ordering::SeqCst),
        3,
        "max_bytes would be exceeded: fresh DEK"
    );
    *now.lock().unwrap() += Duration::from_secs(10);
    let _ = seal_n(1);
    assert_eq!(
        p.datakeys.load(Ordering::SeqCst),
        4,
        "max_age reached: fresh DEK"
    );
    // A different context never shares a DEK.
    let _ = rt
        .block_on(seal_with(&p, "k", b"z", &ctx(&[("x", "2")]), &opts))
        .unwrap();
    assert_eq!(p.datakeys.load(Ordering::SeqCst), 5);
    // Open side.
    for _ in 0..3 {
        assert_eq!(rt.block_on(open_with(&p, &a, &c, &opts)).unwrap(), data(10));
    }
    assert_eq!(p.unwraps.load(Ordering::SeqCst), 1);
    assert_eq!(rt.block_on(open_with(&p, &a, &c, &opts)).unwrap(), data(10));
    assert_eq!(p.unwraps.load(Ordering::SeqCst), 2);
    // Wrong context on a cached DEK still fails.
    assert!(matches!(
        rt.block_on(open_with(&p, &a, &ctx(&[("x", "2")]), &opts)),
        Err(Error::DecryptFailed)
    ));
    assert!(cache.len() <= 2, "capacity bound");
    assert!(DekCache::new(CacheLimits {
        max_messages: 0,
        ..CacheLimits::default()
    })
    .is_err());
}

/// A file cut at a segment boundary must not read as a clean, shorter plaintext: a read
/// at or past the (forged) end has to authenticate the last segment, with its last flag,
/// before it may report end of file.
#[test]
fn seekable_reader_refuses_end_of_file_when_cut_at_a_segment_boundary() {
    let rt = rt();
    let p = provider();
    let c = Context::new();
    let pt = data(4 * SEG as usize + 5);
    let sealed = rt.block_on(seal_with(&p, "k", &pt, &c, &small())).unwrap();
    let (_, h) = Header::parse(&sealed).unwrap();
    let seekable = |bytes: Vec<u8>| {
        let mut src = Cursor::new(bytes);
        let dec = rt
            .block_on(Decryptor::from_reader(&p, &mut src, &c))
            .unwrap();
        dec.into_seekable(src).unwrap()
    };
    for segments in 1..=4 {
        let cut = sealed[..h + segments * (SEG as usize + 16)].to_vec();
        for at in [SeekFrom::End(0), SeekFrom::End(3)] {
            let mut r = seekable(cut.clone());
            r.seek(at).unwrap();
            let res = r.read(&mut [0u8; 8]);
            assert!(
                matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::InvalidData),
                "cut after {segments} segments, read at {at:?}: got {res:?}, not an error"
            );
        }
        // An empty read buffer at the end is no way around it either.
        let mut r = seekable(cut.clone());
        r.seek(SeekFrom::End(0)).unwrap();
        assert!(
            r.read(&mut []).is_err(),
            "cut after {segments} segments: empty read at the end"
        );
    }
    // The whole envelope still ends cleanly, at and past its end.
    for at in [SeekFrom::End(0), SeekFrom::End(7)] {
        let mut r = seekable(sealed.clone());
        r.seek(at).unwrap();
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0, "{at:?}");
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0, "{at:?}, again");
    }
    let mut r = seekable(sealed.clone());
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert_eq!(out, pt);
}

/// Two key services sharing one cache: a DEK (or wrapped DEK) from one is never used
/// for the other, on the seal side or the open side.
#[test]
fn cache_shared_by_two_providers_never_crosses_them() {
    let rt = rt();
    let cache = Arc::new(DekCache::new(CacheLimits::default()).unwrap());
    let opts = Options {
        segment_size: SEG,
        cache: Some(cache.clone()),
    };
    // Same key name, same context, different KEKs: two independent key services.
    let (p1, p2) = (Counting::default(), Counting::default());
    p1.inner.rotate("k").unwrap();
    p2.inner.rotate("k").unwrap();
    let c = ctx(&[("tenant", "acme")]);
    let for_p1 = rt.block_on(seal_with(&p1, "k", b"one", &c, &opts)).unwrap();
    let for_p2 = rt.block_on(seal_with(&p2, "k", b"two", &c, &opts)).unwrap();
    assert_eq!(
        p2.datakeys.load(Ordering::SeqCst),
        1,
        "seal for provider 2 was served provider 1's cached DEK"
    );
    assert_eq!(
        rt.block_on(open(&p2.inner, &for_p2, &c)).unwrap(),
        b"two",
        "sealed for provider 2, must open there"
    );
    assert!(
        rt.block_on(open(&p1.inner, &for_p2, &c)).is_err(),
        "sealed for provider 2, must not open at provider 1"
    );
    // Open side: provider 1's entry must not answer for provider 2, which cannot unwrap.
    assert_eq!(
        rt.block_on(open_with(&p1, &for_p1, &c, &opts)).unwrap(),
        b"one"
    );
    assert!(
        matches!(
            rt.block_on(open_with(&p2, &for_p1, &c, &opts)),
            Err(Error::DecryptFailed)
        ),
        "provider 2 opened provider 1's envelope through the shared cache"
    );
    assert_eq!(p2.unwraps.load(Ordering::SeqCst), 1, "provider 2 was asked");
    // The cache does work for each provider on its own.
    let _ = rt.block_on(seal_with(&p1, "k", b"1", &c, &opts)).unwrap();
    let _ = rt.block_on(seal_with(&p2, "k", b"2", &c, &opts)).unwrap();
    assert_eq!(p1.datakeys.load(Ordering::SeqCst), 1);
    assert_eq!(p2.datakeys.load(Ordering::SeqCst), 1);
    let _ = rt.block_on(open_with(&p1, &for_p1, &c, &opts)).unwrap();
    assert_eq!(p1.unwraps.load(Ordering::SeqCst), 1);
    // Ids: unique per instance, never equal to a named one.
    assert_ne!(p1.cache_id(), p2.cache_id());
    assert_ne!(ProviderId::unique(), ProviderId::unique());
    assert_eq!(ProviderId::named("kms-a"), ProviderId::named("kms-a"));
    assert_ne!(ProviderId::named("kms-a"), ProviderId::named("kms-b"));
}

/// A provider without a cache id (the trait's default) never uses the cache.
#[test]
fn cache_is_bypassed_for_a_provider_without_an_id() {
    struct NoId(Counting);
    impl KeyProvider for NoId {
        async fn datakey(&self, key: &str, c: &Context) -> Result<DataKeyPair, ProviderError> {
            self.0.datakey(key, c).await
        }
        async fn unwrap(&self, k: &KeyRef, w: &[u8], c: &Context) -> Result<Dek, ProviderError> {
            self.0.unwrap(k, w, c).await
        }
    }
    let rt = rt();
    let cache = Arc::new(DekCache::new(CacheLimits::default()).unwrap());
    let opts = Options {
        segment_size: SEG,
        cache: Some(cache.clone()),
    };
    let p = NoId(Counting::default());
    p.0.inner.rotate("k").unwrap();
    let c = Context::new();
    for _ in 0..2 {
        let sealed = rt.block_on(seal_with(&p, "k", b"x", &c, &opts)).unwrap();
        assert_eq!(
            rt.block_on(open_with(&p, &sealed, &c, &opts)).unwrap(),
            b"x"
        );
    }
    assert_eq!(p.0.datakeys.load(Ordering::SeqCst), 2);
    assert_eq!(p.0.unwraps.load(Ordering::SeqCst), 2);
    assert!(cache.is_empty());
}

/// A provider that answers its first unwrap with a wrong DEK, then honestly.
#[derive(Default)]
struct LiesOnce {
    inner: LocalProvider,
    lied: std::sync::atomic::AtomicBool,
    unwraps: AtomicUsize,
}

impl KeyProvider for LiesOnce {
    fn cache_id(&self) -> Option<ProviderId> {
        self.inner.cache_id()
    }
    async fn datakey(&self, key: &str, context: &Context) -> Result<DataKeyPair, ProviderError> {
        self.inner.datakey(key, context).await
    }
    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Dek, ProviderError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        if !self.lied.swap(true, Ordering::SeqCst) {
            return Ok(Dek::generate().unwrap());
        }
        self.inner.unwrap(key, wrapped, context).await
    }
}

/// The open side caches a DEK only after the key commitment verified it.
#[test]
fn cache_keeps_no_dek_that_failed_the_commitment() {
    let rt = rt();
    let cache = Arc::new(DekCache::new(CacheLimits::default()).unwrap());
    let opts = Options {
        segment_size: SEG,
        cache: Some(cache.clone()),
    };
    let p = LiesOnce::default();
    p.inner.rotate("k").unwrap();
    let c = ctx(&[("tenant", "acme")]);
    let sealed = rt.block_on(seal(&p, "k", b"hello", &c)).unwrap();
    assert!(matches!(
        rt.block_on(open_with(&p, &sealed, &c, &opts)),
        Err(Error::DecryptFailed)
    ));
    assert_eq!(
        cache.len(),
        0,
        "a DEK that failed the commitment was cached"
    );
    assert_eq!(
        rt.block_on(open_with(&p, &sealed, &c, &opts)).ok(),
        Some(b"hello".to_vec()),
        "a later open was served the bad cached DEK"
    );
    assert_eq!(p.unwraps.load(Ordering::SeqCst), 2);
    // The verified DEK is cached and serves the next open.
    assert_eq!(cache.len(), 1);
    assert_eq!(
        rt.block_on(open_with(&p, &sealed, &c, &opts)).unwrap(),
        b"hello"
    );
    assert_eq!(p.unwraps.load(Ordering::SeqCst), 2, "served from the cache");
}

/// Expired entries leave memory at the next cache operation, not only when their own
/// slot is used again.
#[test]
fn cache_purges_expired_entries() {
    let rt = rt();
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock_now = now.clone();
    let limits = CacheLimits {
        max_age: Duration::from_secs(10),
        capacity: 100,
        ..CacheLimits::default()
    };
    let cache = Arc::new(
        DekCache::with_clock(limits, Box::new(move || *clock_now.lock().unwrap())).unwrap(),
    );
    let opts = Options {
        segment_size: SEG,
        cache: Some(cache.clone()),
    };
    let p = provider();
    let seal_for = |tenant: &str| {
        rt.block_on(seal_with(&p, "k", b"x", &ctx(&[("tenant", tenant)]), &opts))
            .unwrap()
    };
    let a = seal_for("a");
    let _ = seal_for("b");
    assert_eq!(cache.len(), 2);
    *now.lock().unwrap() += Duration::from_secs(9);
    let _ = seal_for("c");
    assert_eq!(cache.len(), 3, "nothing has expired yet");
    // "a" and "b" reach max_age; an insert for another slot sweeps them.
    *now.lock().unwrap() += Duration::from_secs(1);
    let _ = seal_for("d");
    assert_eq!(
        cache.len(),
        2,
        "entries past max_age are still in memory after an insert"
    );
    // A lookup (here a miss on the open side, then its insert) sweeps too.
    *now.lock().unwrap() += Duration::from_secs(10);
    let _ = rt
        .block_on(open_with(&p, &a, &ctx(&[("tenant", "a")]), &opts))
        .unwrap();
    assert_eq!(cache.len(), 1, "only the new open entry is left");
    // An idle cache: `purge_expired` (from a timer) empties it once max_age has passed.
    *now.lock().unwrap() += Duration::from_secs(9);
    cache.purge_expired();
    assert_eq!(cache.len(), 1, "not expired yet");
    *now.lock().unwrap() += Duration::from_secs(1);
    cache.purge_expired();
    assert!(cache.is_empty(), "purge_expired left an expired entry");
}

/// A writer whose `fail_at`-th call to `write` (0-based) fails; the others succeed.
struct FailsOnce {
    out: Vec<u8>,
    calls: usize,
    fail_at: usize,
}

impl Write for FailsOnce {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let call = self.calls;
        self.calls += 1;
        if call == self.fail_at {
            return Err(std::io::Error::other("disk full"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// After the inner writer failed, the encrypting writer refuses everything: a retry
/// would skip the header, rewrite a sealed segment, or underflow.
#[test]
fn encrypting_writer_is_poisoned_by_an_inner_write_error() {
    let rt = rt();
    let p = provider();
    let c = Context::new();
    // Inner write 0 is the header, 1 the first segment, 2 the second.
    for fail_at in 0..3 {
        let enc = rt
            .block_on(Encryptor::with_options(&p, "k", &c, &small()))
            .unwrap();
        let mut w = enc.into_writer(FailsOnce {
            out: Vec::new(),
            calls: 0,
            fail_at,
        });
        let mut failed = false;
        for _ in 0..3 * SEG {
            if w.write(&[7]).is_err() {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "fail_at {fail_at}: the inner error was not reported"
        );
        assert!(
            w.write(&[7]).is_err(),
            "fail_at {fail_at}: a write after the inner error succeeded"
        );
        assert!(
            w.flush().is_err(),
            "fail_at {fail_at}: a flush after the inner error succeeded"
        );
        assert!(
            w.finish().is_err(),
            "fail_at {fail_at}: finish after the inner error succeeded"
        );
    }
    // The final segment's write failing makes finish fail (and nothing is retried).
    let enc = rt
        .block_on(Encryptor::with_options(&p, "k", &c, &small()))
        .unwrap();
    let mut w = enc.into_writer(FailsOnce {
        out: Vec::new(),
        calls: 0,
        fail_at: 1,
    });
    w.write_all(b"short").unwrap();
    assert!(w.finish().is_err());
}

// ---- golden files ----

const GOLDEN_KEK: [u8; 32] = [0x11; 32];
const GOLDEN_DEK: [u8; 32] = [0x22; 32];
const GOLDEN_SALT: [u8; 32] = [0x33; 32];

fn golden_cases() -> Vec<(&'static str, usize, u32)> {
    vec![
        ("v1-empty", 0, 64),
        ("v1-small", 100, 64),
        ("v1-3seg-plus-1", 3 * 64 + 1, 64),
        ("v1-default-seg", 70_000, 65536),
    ]
}

fn golden_context() -> Context {
    ctx(&[("tenant", "acme"), ("object", "golden")])
}

fn golden_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A deterministic envelope: fixed DEK, salt and wrapped DEK. Only for golden files.
fn golden_envelope(len: usize, seg: u32, wrapped: &[u8]) -> Vec<u8> {
    let enc = Encryptor::from_parts(
        &Dek::from_slice(&GOLDEN_DEK).unwrap(),
        wrapped.to_vec(),
        KeyRef {
            name: "golden".into(),
            version: 1,
        },
        context::digest(&golden_context()).unwrap(),
        GOLDEN_SALT,
        seg,
    );
    enc.seal_all(&data(len))
}

fn golden_provider() -> LocalProvider {
    let p = LocalProvider::new();
    p.insert_version("golden", &GOLDEN_KEK);
    p
}

/// Writes the golden files (run once per format version, by hand):
/// `cargo test -p envelope -- --ignored write_golden_files`
#[test]
#[ignore]
fn write_golden_files() {
    let rt = rt();
    let p = golden_provider();
    std::fs::create_dir_all(golden_dir()).unwrap();
    // The wrapped DEK, made once by the local provider and kept in a file.
    // The fixed golden DEK wrapped under the golden KEK (random salt, kept in a file).
    let dek = Dek::from_slice(&GOLDEN_DEK).unwrap();
    let wrapped = p.wrap_for_golden(
        &KeyRef {
            name: "golden".into(),
            version: 1,
        },
        &dek,
        &golden_context(),
    );
    let _ = &rt;
    std::fs::write(golden_dir().join("v1-wrapped-dek.bin"), &wrapped).unwrap();
    for (name, len, seg) in golden_cases() {
        std::fs::write(
            golden_dir().join(format!("{name}.bin")),
            golden_envelope(len, seg, &wrapped),
        )
        .unwrap();
    }
}

#[test]
fn golden_files_open_and_are_reproduced_byte_for_byte() {
    let rt = rt();
    let p = golden_provider();
    let wrapped = std::fs::read(golden_dir().join("v1-wrapped-dek.bin")).unwrap();
    for (name, len, seg) in golden_cases() {
        let bytes = std::fs::read(golden_dir().join(format!("{name}.bin"))).unwrap();
        let opened = rt
            .block_on(open(&p, &bytes, &golden_context()))
            .unwrap_or_else(|e| {
                panic!("{name} must open under backend {}: {e:?}", backend::name())
            });
        assert_eq!(opened, data(len), "{name}");
        assert_eq!(
            golden_envelope(len, seg, &wrapped),
            bytes,
            "{name}: output differs under backend {}",
            backend::name()
        );
    }
}

/// Seeds for the fuzzer (envelopes it can open: key `fuzz` = 09×32, empty context):
/// `cargo test -p envelope -- --ignored write_fuzz_seeds`
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let rt = rt();
    let p = LocalProvider::new();
    p.insert_version("fuzz", &[9u8; 32]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_open");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, len) in [0usize, 1, 63, 64, 65, 130, 200].into_iter().enumerate() {
        let sealed = rt
            .block_on(seal_with(&p, "fuzz", &data(len), &Context::new(), &small()))
            .unwrap();
        std::fs::write(dir.join(format!("seed-{i}")), sealed).unwrap();
    }
}
