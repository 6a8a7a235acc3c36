//! Reports, as JSON, what a PKCS#11 token says about the secret keys with a label: how
//! many there are, their CKA_SENSITIVE / CKA_EXTRACTABLE / CKA_TOKEN flags, and whether
//! CKA_VALUE (the key bytes) can be read. Used by the PKCS#11 e2e test to show that the
//! master-key wrapping key never leaves the token.
//!
//! Usage: pkcs11-probe MODULE TOKEN_LABEL PIN KEY_LABEL

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module, token, pin, label] = args.as_slice() else {
        return Err("usage: pkcs11-probe MODULE TOKEN_LABEL PIN KEY_LABEL".into());
    };
    let ctx = Pkcs11::new(module)?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|t| t.label().trim_end() == token)
        })
        .ok_or("no such token")?;
    let session = ctx.open_ro_session(slot)?;
    session.login(UserType::User, Some(&AuthPin::new(pin.as_str().into())))?;
    let keys = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    let mut flags = serde_json::Map::new();
    if let Some(key) = keys.first() {
        for attr in session.get_attributes(
            *key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Token,
            ],
        )? {
            match attr {
                Attribute::Sensitive(b) => flags.insert("sensitive".into(), b.into()),
                Attribute::Extractable(b) => flags.insert("extractable".into(), b.into()),
                Attribute::Token(b) => flags.insert("token".into(), b.into()),
                _ => None,
            };
        }
        let value = session.get_attributes(*key, &[AttributeType::Value]);
        let readable = matches!(value.as_deref(), Ok([Attribute::Value(v)]) if !v.is_empty());
        flags.insert("value_readable".into(), readable.into());
    }
    flags.insert("count".into(), keys.len().into());
    println!("{}", serde_json::Value::Object(flags));
    Ok(())
}
