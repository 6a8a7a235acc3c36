//! KMIP's view of a Keyhold key (`docs/kmip.md`): who may read it, its state and
//! attributes, Locate, Get Attributes and Get Attribute List; Add, Modify and Delete
//! Attribute refused (every attribute is Keyhold's own).

use kms_client::api::{Algorithm, KeyInfo, KeyState};

use super::message::{enum_item, int, text, text_item, unique_identifier, Failure, Version};
use super::ops::{
    attribute_name, attributes_in, authorize, failure, name_of, tag_of, Call, KEY_BITS,
};
use super::tags as t;
use super::ttlv::{Item, Value};
use crate::access::policy::{Operation, Role};

/// Key `name` as `who` may read it (admin and auditor: every key of the tenant; an app:
/// the keys granting it something), with its KMIP lifecycle.
pub(super) fn readable(call: &Call<'_>, name: &str) -> Result<Object, Failure> {
    let kr = &call.state.keyring;
    let info = kr
        .key_info(&call.who.tenant, name)
        .map_err(|e| failure(&e, call.version))?;
    let granted =
        call.who.role == Role::App && info.grants.iter().any(|g| g.identity == call.who.identity);
    if call.who.authorize(Operation::ReadKeys).is_err() && !granted {
        return Err(Failure::denied("reading this object needs a grant on it"));
    }
    let Some(object_type) = object_type(info.algorithm) else {
        return Err(Failure::new(
            t::REASON_ITEM_NOT_FOUND,
            format!("{name} is not a symmetric key or secret data"),
        ));
    };
    let life = kr
        .lifecycle(&call.who.tenant, name)
        .map_err(|e| failure(&e, call.version))?;
    let state = match info.state {
        KeyState::Enabled => t::STATE_ACTIVE,
        KeyState::Disabled if life.pre_active => t::STATE_PRE_ACTIVE,
        KeyState::Disabled | KeyState::PendingDeletion if life.compromised_at.is_some() => {
            t::STATE_COMPROMISED
        }
        KeyState::Disabled | KeyState::PendingDeletion => t::STATE_DEACTIVATED,
        // Destroyed, and any state a later version adds: not usable.
        _ => t::STATE_DESTROYED,
    };
    Ok(Object {
        info,
        life,
        state,
        object_type,
    })
}

/// The KMIP Object Type of a Keyhold record of `algorithm`, if KMIP sees it: AES keys and
/// secret data (RSA keys belong to the protocols that use them).
fn object_type(algorithm: Algorithm) -> Option<u32> {
    match algorithm {
        Algorithm::Aes256Gcm => Some(t::OBJECT_SYMMETRIC_KEY),
        Algorithm::SecretData => Some(t::OBJECT_SECRET_DATA),
        _ => None,
    }
}

/// A key as KMIP sees it.
pub(super) struct Object {
    /// Symmetric Key or Secret Data.
    pub(super) object_type: u32,
    pub(super) info: KeyInfo,
    pub(super) life: crate::keyring::Lifecycle,
    pub(super) state: u32,
}

pub(super) fn seconds(text: &str) -> i64 {
    humantime::parse_rfc3339(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub(super) fn date(at: u64) -> Value {
    Value::DateTime(i64::try_from(at).unwrap_or(i64::MAX))
}

/// The attributes Keyhold keeps for an object, by KMIP 1.x name (the Digest only when
/// asked: it reads the key).
pub(super) fn attributes(
    call: &Call<'_>,
    o: &Object,
    digest: bool,
) -> Result<Vec<(&'static str, Value)>, Failure> {
    let info = &o.info;
    let created = seconds(&info.created_at);
    let key = o.object_type == t::OBJECT_SYMMETRIC_KEY;
    let mut out = vec![
        ("Unique Identifier", Value::TextString(info.name.clone())),
        ("Object Type", Value::Enumeration(o.object_type)),
    ];
    if key {
        out.extend([
            (
                "Cryptographic Algorithm",
                Value::Enumeration(t::ALGORITHM_AES),
            ),
            ("Cryptographic Length", Value::Integer(KEY_BITS)),
            (
                "Cryptographic Usage Mask",
                Value::Integer(t::USAGE_ENCRYPT | t::USAGE_DECRYPT),
            ),
        ]);
    }
    out.extend([
        (
            "Name",
            Value::Structure(vec![
                text_item(t::NAME_VALUE, &info.name),
                enum_item(t::NAME_TYPE, t::NAME_TEXT),
            ]),
        ),
        ("State", Value::Enumeration(o.state)),
        ("Initial Date", Value::DateTime(created)),
    ]);
    // Keys of the native API were active from their creation.
    let activated = match o.life.activated_at {
        Some(at) => Some(date(at)),
        None if !o.life.pre_active => Some(Value::DateTime(created)),
        None => None,
    };
    let newest_version = info.versions.iter().map(|v| seconds(&v.created_at)).max();
    let changed = [
        Some(created),
        newest_version,
        o.life
            .activated_at
            .map(|a| i64::try_from(a).unwrap_or(i64::MAX)),
        o.life
            .deactivated_at
            .map(|a| i64::try_from(a).unwrap_or(i64::MAX)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(created);
    out.push(("Last Change Date", Value::DateTime(changed)));
    if let Some(a) = activated {
        out.push(("Activation Date", a));
    }
    if let Some(at) = o.life.deactivated_at {
        out.push(("Deactivation Date", date(at)));
    }
    if let Some(at) = o.life.compromised_at {
        out.push(("Compromise Date", date(at)));
    }
    if let Some(d) = &info.deletion_date {
        out.push(("Destroy Date", Value::DateTime(seconds(d))));
    }
    // A key's digest; a secret's would be a hash of a password, offered to whoever may
    // read attributes: not kept.
    if digest && key {
        let mut keys = call
            .state
            .keyring
            .lookups()
            .map_err(|e| failure(&e, call.version))?;
        let d = keys
            .digest(&call.who.tenant, &info.name)
            .map_err(|e| failure(&e, call.version))?;
        out.push((
            "Digest",
            Value::Structure(vec![
                enum_item(t::HASHING_ALGORITHM, t::HASH_SHA_256),
                Item::new(t::DIGEST_VALUE, Value::ByteString(d.to_vec().into())),
                enum_item(t::KEY_FORMAT_TYPE, t::KEY_FORMAT_RAW),
            ]),
        ));
    }
    Ok(out)
}

/// An attribute as `version` carries it: a 1.x Attribute structure, or the value under
/// its own tag (2.x).
pub(super) fn attribute_item(version: Version, name: &str, value: Value) -> Item {
    match tag_of(name).filter(|_| version.major >= 2) {
        Some(tag) => Item::new(tag, value),
        None => Item::structure(
            t::ATTRIBUTE,
            vec![
                text_item(t::ATTRIBUTE_NAME, name),
                Item::new(t::ATTRIBUTE_VALUE, value),
            ],
        ),
    }
}

pub(super) fn get_attributes(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let o = readable(&call, &uid)?;
    // 1.x asks by Attribute Name, 2.x by Attribute Reference (the attribute's tag).
    let asked: Vec<&str> = call
        .payload
        .children()
        .iter()
        .filter_map(|i| match (i.tag, &i.value) {
            (t::ATTRIBUTE_NAME, Value::TextString(s)) => Some(s.as_str()),
            (t::ATTRIBUTE_REFERENCE, Value::Enumeration(tag)) => name_of(*tag),
            _ => None,
        })
        .collect();
    let digest = asked.is_empty() || asked.contains(&"Digest");
    let mut all = attributes(&call, &o, digest)?;
    let v = call.version;
    let mut found = Vec::new();
    if asked.is_empty() {
        found.extend(all.into_iter().map(|(n, x)| attribute_item(v, n, x)));
    } else {
        // In the order asked; what the object does not have is left out.
        for name in asked {
            if let Some(at) = all.iter().position(|(n, _)| *n == name) {
                let (n, x) = all.swap_remove(at);
                found.push(attribute_item(v, n, x));
            }
        }
    }
    let mut out = vec![text_item(t::UNIQUE_IDENTIFIER, &uid)];
    if v.major >= 2 {
        out.push(Item::structure(t::ATTRIBUTES, found));
    } else {
        out.extend(found);
    }
    Ok(out)
}

pub(super) fn get_attribute_list(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let o = readable(&call, &uid)?;
    let mut names: Vec<&str> = attributes(&call, &o, false)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    if o.object_type == t::OBJECT_SYMMETRIC_KEY {
        names.push("Digest");
    }
    let mut out = vec![text_item(t::UNIQUE_IDENTIFIER, &uid)];
    for n in names {
        out.push(match tag_of(n).filter(|_| call.version.major >= 2) {
            Some(tag) => Item::new(t::ATTRIBUTE_REFERENCE, Value::Enumeration(tag)),
            None => text_item(t::ATTRIBUTE_NAME, n),
        });
    }
    Ok(out)
}

/// Add, Modify and Delete Attribute: Keyhold keeps no client-set attributes; every one
/// it reports is its own (dates, state, the name). A lifecycle date of an object past
/// Pre-Active is refused for its state (Wrong Key Lifecycle State in 2.x, Permission
/// Denied in 1.x, as the profiles' test cases expect); any other attribute is read-only
/// (Attribute Read Only in 2.x, Permission Denied in 1.x).
pub(super) fn change_attribute(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let o = readable(&call, &uid)?;
    let name = if call.version.major >= 2 {
        [t::NEW_ATTRIBUTE, t::CURRENT_ATTRIBUTE]
            .iter()
            .filter_map(|tag| call.payload.child(*tag))
            .filter_map(|a| a.children().first())
            .find_map(|i| name_of(i.tag))
    } else {
        call.payload
            .child(t::ATTRIBUTE)
            .map(attribute_name)
            .transpose()?
            .or(text(call.payload, t::ATTRIBUTE_NAME)?)
    }
    .unwrap_or("the attribute");
    let lifecycle_date = matches!(
        name,
        "Activation Date" | "Deactivation Date" | "Compromise Date" | "Destroy Date"
    );
    let reason = if call.version.major < 2 {
        t::REASON_PERMISSION_DENIED
    } else if lifecycle_date && o.state != t::STATE_PRE_ACTIVE {
        t::REASON_WRONG_KEY_LIFECYCLE_STATE
    } else {
        t::REASON_ATTRIBUTE_READ_ONLY
    };
    Err(Failure::new(
        reason,
        format!("{name} is kept by Keyhold: it cannot be added, modified or deleted"),
    ))
}

pub(super) fn locate(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let kr = &call.state.keyring;
    let keys = kr
        .list_keys(&call.who.tenant)
        .map_err(|e| failure(&e, call.version))?;
    let mut want_name = None;
    let mut want_state = None;
    let mut want_type = None;
    // Cryptographic Algorithm and Length match symmetric keys only.
    let mut keys_only = false;
    for (name, item) in attributes_in(call.payload, call.version, None)? {
        match (name.as_str(), Some(&item.value)) {
            ("Name", Some(Value::Structure(_))) => {
                want_name = text(item, t::NAME_VALUE)?.map(str::to_owned);
            }
            ("Object Type", Some(Value::Enumeration(o))) => want_type = Some(*o),
            ("State", Some(Value::Enumeration(s))) => want_state = Some(*s),
            ("Cryptographic Algorithm", Some(Value::Enumeration(t::ALGORITHM_AES))) => {
                keys_only = true;
            }
            ("Cryptographic Algorithm", Some(Value::Enumeration(_))) => return Ok(Vec::new()),
            ("Cryptographic Length", Some(Value::Integer(KEY_BITS))) => keys_only = true,
            ("Cryptographic Length", Some(Value::Integer(_))) => return Ok(Vec::new()),
            (other, _) => {
                return Err(Failure::invalid_field(format!(
                    "Locate by {other} is not served"
                )))
            }
        }
    }
    let max = match call.payload.child(t::MAXIMUM_ITEMS) {
        Some(_) => usize::try_from(int(call.payload, t::MAXIMUM_ITEMS)?.max(0)).unwrap_or(0),
        None => usize::MAX,
    };
    let offset = match call.payload.child(t::OFFSET_ITEMS) {
        Some(_) => usize::try_from(int(call.payload, t::OFFSET_ITEMS)?.max(0)).unwrap_or(0),
        None => 0,
    };
    let mut found = Vec::new();
    if keys_only {
        want_type = match want_type {
            None | Some(t::OBJECT_SYMMETRIC_KEY) => Some(t::OBJECT_SYMMETRIC_KEY),
            Some(_) => return Ok(Vec::new()),
        };
    }
    for k in &keys {
        let Some(object_type) = object_type(k.algorithm) else {
            continue;
        };
        if want_name.as_deref().is_some_and(|n| n != k.name)
            || want_type.is_some_and(|w| w != object_type)
        {
            continue;
        }
        // An app locates only what it may read.
        let Ok(o) = readable(&call, &k.name) else {
            continue;
        };
        if want_state.is_some_and(|s| s != o.state) {
            continue;
        }
        found.push(k.name.clone());
    }
    let total = found.len();
    let mut out = Vec::new();
    if call.version >= Version::new(1, 3) {
        out.push(Item::new(
            t::LOCATED_ITEMS,
            Value::Integer(i32::try_from(total).unwrap_or(i32::MAX)),
        ));
    }
    out.extend(
        found
            .iter()
            .skip(offset)
            .take(max)
            .map(|n| text_item(t::UNIQUE_IDENTIFIER, n)),
    );
    call.facts.attributes.push(("located", total.to_string()));
    Ok(out)
}
