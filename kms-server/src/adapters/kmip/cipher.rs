//! Key material through KMIP (`docs/kmip.md`): Encrypt and Decrypt run in Keyhold
//! (AES-256-GCM under a single-use key derived from the version; the IV Keyhold makes
//! carries the version); Get hands material out only for an extractable key, audited and
//! alerted, and is refused for every other.

use super::attributes::readable;
use super::message::{bytes, enum_item, text_item, unique_identifier, Failure, Version};
use super::ops::{authorize, failure, Call, KEY_BITS};
use super::tags as t;
use super::ttlv::{Item, Value};
use crate::access::policy::Operation;
use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};

/// The AES-GCM IV Keyhold returns: the key version (4 bytes) and the salt of the
/// single-use key.
const IV_LEN: usize = 4 + DETACHED_SALT_LEN;
const AAD_LABEL: &[u8] = b"keyhold kmip v1\0";

pub(super) fn get(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let o = readable(&call, &uid)?;
    if o.life.extractable {
        // A secret comes back in the format it was registered in.
        let key = o.object_type == t::OBJECT_SYMMETRIC_KEY;
        if let Some(f) = call.payload.child(t::KEY_FORMAT_TYPE).filter(|_| key) {
            if f.value != Value::Enumeration(t::KEY_FORMAT_RAW) {
                return Err(Failure::new(
                    t::REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED,
                    "Keyhold hands out keys in Raw format",
                ));
            }
        }
        let mut keys = call
            .state
            .keyring
            .lookups()
            .map_err(|e| failure(&e, call.version))?;
        let material = keys
            .export_extractable(&call.who.tenant, &uid)
            .map_err(|e| failure(&e, call.version))?;
        drop(keys);
        call.facts.version = Some(o.info.current_version);
        call.facts.attributes.push(("exported", "true".to_owned()));
        call.state
            .alerts
            .raise(crate::security::alert::AlertEvent::new(
                crate::base::event::AlertKind::KeyExported,
                Some(&call.who.identity),
                format!("KMIP Get of {uid} (tenant {})", call.who.tenant),
            ));
        if !key {
            return super::secret::object(&uid, material.expose_secret());
        }
        let block = Item::structure(
            t::KEY_BLOCK,
            vec![
                enum_item(t::KEY_FORMAT_TYPE, t::KEY_FORMAT_RAW),
                Item::structure(
                    t::KEY_VALUE,
                    vec![Item::new(
                        t::KEY_MATERIAL,
                        Value::ByteString(material.expose_secret().to_vec().into()),
                    )],
                ),
                enum_item(t::CRYPTOGRAPHIC_ALGORITHM, t::ALGORITHM_AES),
                Item::new(t::CRYPTOGRAPHIC_LENGTH, Value::Integer(KEY_BITS)),
            ],
        );
        return Ok(vec![
            enum_item(t::OBJECT_TYPE, t::OBJECT_SYMMETRIC_KEY),
            text_item(t::UNIQUE_IDENTIFIER, &uid),
            Item::structure(t::SYMMETRIC_KEY, vec![block]),
        ]);
    }
    // Hold your own key: the material never leaves. KMIP 1.4 names the reason.
    let reason = if call.version >= Version::new(1, 4) {
        t::REASON_NOT_EXTRACTABLE
    } else {
        t::REASON_PERMISSION_DENIED
    };
    call.facts
        .attributes
        .push(("refused", "not extractable".to_owned()));
    Err(Failure {
        // An attempt to take a key out is alerted, not counted toward a lockout.
        denial: Some(false),
        ..Failure::new(
            reason,
            "the key is not extractable: Keyhold keys never leave it (use Encrypt and Decrypt)",
        )
    })
}

/// AES-GCM only (the default when no Cryptographic Parameters are given), with
/// Keyhold's IV and a 16-byte tag.
pub(super) fn check_parameters(payload: &Item) -> Result<Shape, Failure> {
    let mut shape = Shape::Gcm;
    if let Some(p) = payload.child(t::CRYPTOGRAPHIC_PARAMETERS) {
        for item in p.children() {
            match (item.tag, &item.value) {
                (t::BLOCK_CIPHER_MODE, Value::Enumeration(t::MODE_GCM)) => {}
                (t::BLOCK_CIPHER_MODE, Value::Enumeration(t::MODE_CBC)) => shape = Shape::Block,
                (t::BLOCK_CIPHER_MODE, _) => {
                    return Err(Failure::new(
                        t::REASON_FEATURE_NOT_SUPPORTED,
                        "Keyhold serves AES-GCM, and the CBC shape (docs/kmip.md)",
                    ))
                }
                (t::CRYPTOGRAPHIC_ALGORITHM, Value::Enumeration(t::ALGORITHM_AES)) => {}
                (t::PADDING_METHOD, Value::Enumeration(t::PADDING_NONE | t::PADDING_PKCS5)) => {}
                (t::TAG_LENGTH, Value::Integer(16)) => {}
                (t::RANDOM_IV, Value::Boolean(true)) => {}
                (t::RANDOM_IV, Value::Boolean(false)) => {
                    return Err(Failure::invalid_field(
                        "Keyhold generates the IV (Random IV must not be false)",
                    ))
                }
                (tag, _) => {
                    return Err(Failure::invalid_field(format!(
                        "Cryptographic Parameters: 0x{tag:06x} is not served with that value"
                    )))
                }
            }
        }
    }
    Ok(shape)
}

/// How a ciphertext travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// AES-GCM as KMIP carries it: a 20-byte IV (version and salt), the tag after the
    /// data (and, from 1.4, in its own field).
    Gcm,
    /// What clients asking for AES-CBC store: a 16-byte IV (the salt) and opaque data
    /// (version ‖ ciphertext ‖ tag). The encryption is Keyhold's authenticated one, not
    /// CBC: no one but Keyhold ever decrypts it (MongoDB's delegated mode keeps IV ‖ data).
    Block,
}

pub(super) fn asks_gcm(payload: &Item) -> bool {
    payload
        .child(t::CRYPTOGRAPHIC_PARAMETERS)
        .and_then(|p| p.child(t::BLOCK_CIPHER_MODE))
        .is_some_and(|m| m.value == Value::Enumeration(t::MODE_GCM))
}

pub(super) fn aad(version: u32, extra: &[u8]) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(extra);
    aad
}

pub(super) fn encrypt(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::UseKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let shape = check_parameters(call.payload)?;
    if call.payload.child(t::IV_COUNTER_NONCE).is_some() {
        return Err(Failure::invalid_field(
            "Keyhold generates the IV: a caller's IV could repeat a nonce",
        ));
    }
    let data = bytes(call.payload, t::DATA)?.ok_or_else(|| Failure::missing("Data"))?;
    let extra =
        bytes(call.payload, t::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)?.unwrap_or_default();
    let mut keys = call
        .state
        .keyring
        .lookups()
        .map_err(|e| failure(&e, call.version))?;
    let c = keys
        .encrypt_detached(call.who, &uid, |v| aad(v, extra), data)
        .map_err(|e| failure(&e, call.version))?;
    call.facts.version = Some(c.version);
    if shape == Shape::Block {
        call.facts.attributes.push(("shape", "cbc".to_owned()));
        let mut data = Vec::with_capacity(4 + c.ciphertext.len() + TAG_LEN);
        data.extend_from_slice(&c.version.to_be_bytes());
        data.extend_from_slice(&c.ciphertext);
        data.extend_from_slice(&c.tag);
        return Ok(vec![
            text_item(t::UNIQUE_IDENTIFIER, &uid),
            Item::new(t::DATA, Value::ByteString(data.into())),
            Item::new(t::IV_COUNTER_NONCE, Value::ByteString(c.iv.to_vec().into())),
        ]);
    }
    let mut iv = Vec::with_capacity(IV_LEN);
    iv.extend_from_slice(&c.version.to_be_bytes());
    iv.extend_from_slice(&c.iv);
    // The GCM tag goes after the data, always: clients that keep only the data and the IV
    // (PyKMIP's high-level client, any version) give it back there. A client asking for
    // GCM in 1.4 or later also gets it in its own field, as KMIP 1.4 carries it; Decrypt
    // takes either shape.
    let separate_tag = call.version >= Version::new(1, 4) && asks_gcm(call.payload);
    let mut data = c.ciphertext;
    data.extend_from_slice(&c.tag);
    let mut out = vec![
        text_item(t::UNIQUE_IDENTIFIER, &uid),
        Item::new(t::DATA, Value::ByteString(data.into())),
        Item::new(t::IV_COUNTER_NONCE, Value::ByteString(iv.into())),
    ];
    if separate_tag {
        out.push(Item::new(
            t::AUTHENTICATED_ENCRYPTION_TAG,
            Value::ByteString(c.tag.to_vec().into()),
        ));
    }
    Ok(out)
}

pub(super) fn decrypt(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::UseKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let shape = check_parameters(call.payload)?;
    let data = bytes(call.payload, t::DATA)?.ok_or_else(|| Failure::missing("Data"))?;
    let iv = bytes(call.payload, t::IV_COUNTER_NONCE)?
        .ok_or_else(|| Failure::missing("IV/Counter/Nonce (the one Encrypt returned)"))?;
    let bad_iv =
        || Failure::invalid_field("IV/Counter/Nonce is not one Keyhold's Encrypt returned");
    let (version, salt, body, tag) = match shape {
        Shape::Block => {
            let salt: [u8; DETACHED_SALT_LEN] = iv.try_into().map_err(|_| bad_iv())?;
            let bad = || Failure::new(t::REASON_CRYPTOGRAPHIC_FAILURE, "decryption failed");
            if data.len() < 4 + TAG_LEN {
                return Err(bad());
            }
            let (head, rest) = data.split_at(4);
            let version = u32::from_be_bytes(head.try_into().map_err(|_| bad())?);
            let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
            (version, salt, body, tag)
        }
        Shape::Gcm => {
            if iv.len() != IV_LEN {
                return Err(bad_iv());
            }
            let version = u32::from_be_bytes(iv[..4].try_into().map_err(|_| bad_iv())?);
            let salt: [u8; DETACHED_SALT_LEN] = iv[4..].try_into().map_err(|_| bad_iv())?;
            // The tag in its own field (KMIP 1.4), the data then with or without it after;
            // or after the data alone.
            let (body, tag) = match bytes(call.payload, t::AUTHENTICATED_ENCRYPTION_TAG)? {
                Some(tag) => (data.strip_suffix(tag).unwrap_or(data), tag),
                None if data.len() >= TAG_LEN => data.split_at(data.len() - TAG_LEN),
                None => return Err(Failure::missing("Authenticated Encryption Tag")),
            };
            (version, salt, body, tag)
        }
    };
    let tag: [u8; TAG_LEN] = tag
        .try_into()
        .map_err(|_| Failure::invalid_field("the Authenticated Encryption Tag is 16 bytes"))?;
    let extra =
        bytes(call.payload, t::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)?.unwrap_or_default();
    call.facts.version = Some(version);
    let mut keys = call
        .state
        .keyring
        .lookups()
        .map_err(|e| failure(&e, call.version))?;
    let opened = keys
        .decrypt_detached(
            call.who,
            &uid,
            version,
            &salt,
            body,
            &tag,
            &aad(version, extra),
        )
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![
        text_item(t::UNIQUE_IDENTIFIER, &uid),
        Item::new(
            t::DATA,
            Value::ByteString(opened.plaintext.expose_secret().to_vec().into()),
        ),
    ])
}
