//! Secret Data (a password, a seed): what a client registers to read it back later.
//!
//! Keyhold holds keys it uses, and a secret is of no use but to be read back: it is
//! registered only with Extractable true (else refused: it could never be read), sealed
//! under the master key as key material is (the keyring's `secret-data` records, which
//! wrap, encrypt and rotate nothing), and handed back only by Get (audited, alerted:
//! [`super::cipher::get`]). Its Secret Data Type and Key Format Type are kept with it, in
//! the sealed bytes: a 4-byte head (`KS`, the type, the format) then the secret.

use zeroize::Zeroizing;

use super::message::{enum_item, enumeration, text_item, Failure};
use super::ops::{failure, Call};
use super::tags as t;
use super::ttlv::{Item, Value};

const MAGIC: &[u8; 2] = b"KS";

/// The Secret Data Types of KMIP 1.0 to 2.1: Password, Seed, and 2.1's Function-Based (3).
const TYPES: [u32; 3] = [1, 2, 3];

/// The sealed form of a secret: the head, then `data`.
fn encode(kind: u32, format: u32, data: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(4 + data.len()));
    out.extend_from_slice(MAGIC);
    // Both fit: checked against `TYPES` and the two formats on the way in.
    out.push(u8::try_from(kind).unwrap_or(0));
    out.push(u8::try_from(format).unwrap_or(0));
    out.extend_from_slice(data);
    out
}

/// The type, format and secret of a sealed form; `None` when it is not one.
fn decode(stored: &[u8]) -> Option<(u32, u32, &[u8])> {
    match stored {
        [b'K', b'S', kind, format, data @ ..] => Some((u32::from(*kind), u32::from(*format), data)),
        _ => None,
    }
}

/// Register of Secret Data (the caller checked the role and the object type): the name
/// from the template, Extractable true required.
pub(super) fn register(call: &mut Call<'_>) -> Result<Vec<Item>, Failure> {
    let secret = call
        .payload
        .child(t::SECRET_DATA)
        .ok_or_else(|| Failure::missing("Secret Data"))?;
    let kind = enumeration(secret, t::SECRET_DATA_TYPE)?;
    if !TYPES.contains(&kind) {
        return Err(Failure::invalid_field(format!(
            "Secret Data Type 0x{kind:02x} is not one KMIP defines"
        )));
    }
    let block = secret
        .child(t::KEY_BLOCK)
        .ok_or_else(|| Failure::missing("Secret Data / Key Block"))?;
    let format = enumeration(block, t::KEY_FORMAT_TYPE)?;
    if format != t::KEY_FORMAT_RAW && format != t::KEY_FORMAT_OPAQUE {
        return Err(Failure::new(
            t::REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED,
            "secret data is kept in Raw or Opaque format",
        ));
    }
    if block.child(t::KEY_WRAPPING_DATA).is_some() {
        return Err(Failure::new(
            t::REASON_FEATURE_NOT_SUPPORTED,
            "wrapped key blocks are not served",
        ));
    }
    let data = block
        .child(t::KEY_VALUE)
        .map(|v| super::message::bytes(v, t::KEY_MATERIAL))
        .transpose()?
        .flatten()
        .ok_or_else(|| Failure::missing("Key Material"))?;
    let (template, name) = super::ops::new_object(call)?;
    if !template.extractable {
        return Err(Failure::invalid_field(
            "secret data is of no use but to be read back: register it with Extractable \
             true (each Get is then audited and alerted)",
        ));
    }
    call.state
        .keyring
        .register_secret(&call.who.tenant, &name, &encode(kind, format, data))
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![text_item(t::UNIQUE_IDENTIFIER, &name)])
}

/// Get's answer for secret data `uid`, from its sealed form.
pub(super) fn object(uid: &str, stored: &[u8]) -> Result<Vec<Item>, Failure> {
    let (kind, format, data) = decode(stored).ok_or_else(|| {
        Failure::new(
            t::REASON_GENERAL_FAILURE,
            "the stored secret is not one KMIP registered",
        )
    })?;
    let block = Item::structure(
        t::KEY_BLOCK,
        vec![
            enum_item(t::KEY_FORMAT_TYPE, format),
            Item::structure(
                t::KEY_VALUE,
                vec![Item::new(
                    t::KEY_MATERIAL,
                    Value::ByteString(data.to_vec().into()),
                )],
            ),
        ],
    );
    Ok(vec![
        enum_item(t::OBJECT_TYPE, t::OBJECT_SECRET_DATA),
        text_item(t::UNIQUE_IDENTIFIER, uid),
        Item::structure(
            t::SECRET_DATA,
            vec![enum_item(t::SECRET_DATA_TYPE, kind), block],
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sealed_form_keeps_type_format_and_secret() {
        let stored = encode(2, t::KEY_FORMAT_OPAQUE, b"seed");
        assert_eq!(
            decode(&stored),
            Some((2, t::KEY_FORMAT_OPAQUE, &b"seed"[..]))
        );
        assert_eq!(decode(b"K"), None);
        assert_eq!(decode(b"XX\x01\x01data"), None);
    }
}
