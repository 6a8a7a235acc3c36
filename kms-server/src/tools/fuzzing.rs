//! Entry points for the fuzz targets (`kms-server/fuzz/`, cargo-fuzz) and for the test
//! that replays their corpus on every CI run (`kms-server/tests/fuzz_corpus.rs`): every
//! parser that input from the network or from an operator's files reaches. Each takes
//! arbitrary bytes and must never panic; what it parses, it also runs through the checks
//! the server applies next, so a crash anywhere on that path shows up.

use std::sync::OnceLock;

use kms_client::api;

use crate::crypto::format::{self, Header, KeyId};
use crate::crypto::kek::Kek;

/// A fuzz entry point: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by name (the fuzz crate's binaries and the corpus directories).
pub const TARGETS: [(&str, Target); 7] = [
    ("wrapped_dek", wrapped_dek),
    ("request_json", request_json),
    ("config", config),
    ("pem_crl", pem_crl),
    ("client_cert", client_cert),
    ("unseal_share", unseal_share),
    ("kmip", kmip),
];

fn keks() -> &'static (Kek, Kek) {
    static KEKS: OnceLock<(Kek, Kek)> = OnceLock::new();
    KEKS.get_or_init(|| {
        let aes = Kek::generate(api::Algorithm::Aes256Gcm).map(|(k, _)| k);
        let rsa = Kek::generate(api::Algorithm::RsaOaep3072Sha256).map(|(k, _)| k);
        match (aes, rsa) {
            (Ok(a), Ok(r)) => (a, r),
            _ => panic!("key generation failed"),
        }
    })
}

/// A wrapped DEK as `/v1/unwrap` receives it: byte 0 chooses how much of the rest is the
/// canonical context (as a raw encoding); the remainder is the wrapped DEK, parsed and
/// opened under an AES and an RSA KEK. Also wraps, under both, when the input is DEK-sized.
pub fn wrapped_dek(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (ctx, wrapped) = rest.split_at(at);
    let _ = format::parse_header(wrapped);
    let _ = format::is_rsa(wrapped);
    let (aes, rsa) = keks();
    for kek in [aes, rsa] {
        if kek.unwrap(wrapped, ctx).is_ok() {
            panic!("an arbitrary input opened under a fresh key");
        }
    }
    if (format::MIN_DEK_LEN..=format::MAX_DEK_LEN).contains(&wrapped.len()) {
        let header = Header {
            key_id: KeyId([7; 16]),
            version: 1,
        };
        for kek in [aes, rsa] {
            let w = kek.wrap(&header, wrapped, ctx).unwrap_or_default();
            let back = kek.unwrap(&w, ctx).map(|d| d.expose_secret().to_vec());
            assert_eq!(back.ok().as_deref(), Some(wrapped), "round trip");
        }
    }
}

/// JSON request bodies of every route, then the checks the server runs on them.
pub fn request_json(data: &[u8]) {
    use serde_json::from_slice as parse;
    let context = |c: &api::Context| {
        let _ = format::canonical_context(c);
    };
    if let Ok(r) = parse::<api::CreateKeyRequest>(data) {
        let _ = crate::keyring::validate_name(&r.name);
        let _ = crate::keyring::validate_grants(&r.grants);
        let _ = crate::api::keys::rotation_period(r.rotation_period.as_deref());
    }
    if let Ok(r) = parse::<api::SetGrantsRequest>(data) {
        let _ = crate::keyring::validate_grants(&r.grants);
    }
    if let Ok(r) = parse::<api::DatakeyRequest>(data) {
        context(&r.context);
    }
    if let Ok(r) = parse::<api::WrapRequest>(data) {
        context(&r.context);
        let _ = format::check_dek_len(r.plaintext.expose_secret().len());
    }
    if let Ok(r) = parse::<api::UnwrapRequest>(data) {
        context(&r.context);
        let _ = format::parse_header(r.wrapped.as_bytes());
    }
    if let Ok(r) = parse::<api::BatchRequest>(data) {
        for item in &r.items {
            match item {
                api::BatchItem::Datakey { key, context: c } => {
                    let _ = crate::keyring::validate_name(key);
                    context(c);
                }
                api::BatchItem::Wrap {
                    key,
                    plaintext,
                    context: c,
                } => {
                    let _ = crate::keyring::validate_name(key);
                    let _ = format::check_dek_len(plaintext.expose_secret().len());
                    context(c);
                }
                api::BatchItem::Unwrap {
                    wrapped,
                    context: c,
                }
                | api::BatchItem::Rewrap {
                    wrapped,
                    context: c,
                } => {
                    let _ = format::parse_header(wrapped.as_bytes());
                    context(c);
                }
            }
        }
    }
    let _ = parse::<api::ScheduleDeletionRequest>(data);
    let _ = parse::<api::MinDecryptVersionRequest>(data);
    let _ = parse::<api::MinVersionDryRunRequest>(data);
    let _ = parse::<api::UnsealRequest>(data);
    let _ = parse::<api::SetIdentityRequest>(data);
    let _ = parse::<api::RemoveIdentityRequest>(data);
    let _ = parse::<api::LiftLockoutRequest>(data);
    let _ = parse::<api::PublicKeyQuery>(data);
}

/// The server's configuration file (TOML), parsed and validated.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            crate::app::config::Settings::parse(text, std::path::Path::new("/nonexistent"), "fuzz");
    }
}

/// A CRL file (PEM or DER) as the TLS reloader reads it.
pub fn pem_crl(data: &[u8]) {
    if let Ok(crls) = crate::security::tls::parse_crls(data.to_vec()) {
        let _ = crate::security::tls::revoked_set(&crls);
    }
}

/// A client certificate's DER, as the handshake hands it over: identity and revocation key.
pub fn client_cert(data: &[u8]) {
    use crate::access::policy::IdentitySource;
    let _ = crate::security::tls::identity_of(
        data,
        &[
            IdentitySource::UriSan,
            IdentitySource::DnsSan,
            IdentitySource::SubjectCn,
        ],
    );
    let _ = crate::security::tls::leaf_revocation_key(data);
}

/// An unseal share as `POST /v1/sys/unseal {"share"}` receives it.
pub fn unseal_share(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::crypto::seal::ShareInput::parse(text);
    }
}

/// A KMIP message as the KMIP listener reads one after its framing: TTLV decoded under the
/// listener's limits, read as a Request Message; whatever decodes must encode back to
/// bytes that decode to the same item.
pub fn kmip(data: &[u8]) {
    use crate::adapters::kmip::{message::Request, ttlv};
    let Ok(item) = ttlv::Item::decode(data, ttlv::Limits::default()) else {
        return;
    };
    let again = ttlv::Item::decode(&item.encode(), ttlv::Limits::default());
    assert!(
        again.as_ref() == Ok(&item),
        "TTLV round trip changed the item"
    );
    let _ = Request::of(&item);
}
