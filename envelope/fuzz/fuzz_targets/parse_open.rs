//! Fuzz the envelope parser and opener: arbitrary bytes through `Header::parse`, the
//! one-shot `open`, the streaming reader and the seekable reader. Nothing may panic, and
//! nothing but a well-formed envelope made with the fuzzer's key may open.
#![no_main]

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::sync::OnceLock;

use envelope::{Context, Decryptor, Header, LocalProvider};
use libfuzzer_sys::fuzz_target;

fn provider() -> &'static LocalProvider {
    static P: OnceLock<LocalProvider> = OnceLock::new();
    P.get_or_init(|| {
        let p = LocalProvider::new();
        p.insert_version("fuzz", &[9u8; 32]);
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let ctx = Context::new();
    let _ = Header::parse(data);
    let _ = rt.block_on(envelope::open(provider(), data, &ctx));
    let mut r = Cursor::new(data);
    if let Ok(dec) = rt.block_on(Decryptor::from_reader(provider(), &mut r, &ctx)) {
        let mut out = Vec::new();
        let _ = dec.into_reader(r).read_to_end(&mut out);
    }
    let mut r = Cursor::new(data);
    if let Ok(dec) = rt.block_on(Decryptor::from_reader(provider(), &mut r, &ctx)) {
        if let Ok(mut s) = dec.into_seekable(Cursor::new(data)) {
            let mut buf = [0u8; 100];
            let _ = s.seek(SeekFrom::Start(u64::from(data.len() as u32 / 3)));
            let _ = s.read(&mut buf);
        }
    }
});
