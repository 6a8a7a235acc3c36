//! The KMIP operations on Keyhold's keys (`docs/kmip.md`), one function per operation:
//! a payload in, the Response Payload's items or a [`Failure`] out.
//!
//! - **Objects** are the tenant's AES-256 keys; the Unique Identifier is the key's name
//!   (never reused: a destroyed key keeps its name). Create makes the key *pre-active*
//!   (disabled, no grants); Activate enables it, Revoke disables it, Destroy schedules its
//!   destruction (the shortest deletion window), after which it is crypto-shredded.
//! - **The key never leaves**: Encrypt and Decrypt run here, AES-256-GCM under a
//!   single-use key derived from the current version (the adapters' detached
//!   construction). The IV Keyhold returns carries the version; a caller's own IV is
//!   refused (a reused one would repeat a nonce). Get of key material is refused.
//! - **Roles** as the native API's: Create, Activate, Revoke, Destroy need `admin`;
//!   Locate, Get Attributes and Get Attribute List `admin` or `auditor` (an `app`: the
//!   keys granting it something); Encrypt and Decrypt an `app` with the key's `wrap` or
//!   `unwrap` grant.

use kms_client::api::{Algorithm, KeyInfo, KeyState};

use super::message::{
    self, bytes, enum_item, enumeration, int, text, text_item, unique_identifier, Failure, Version,
};
use super::tags as t;
use super::ttlv::{Item, Value};
use crate::access::policy::{Operation, Principal, Role};
use crate::api::AppState;
use crate::base::error::Error;
use crate::crypto::aead::{DETACHED_SALT_LEN, TAG_LEN};

/// Keyhold's only symmetric key: AES, 256 bits.
const KEY_BITS: i32 = 256;
/// The AES-GCM IV Keyhold returns: the key version (4 bytes) and the salt of the
/// single-use key.
const IV_LEN: usize = 4 + DETACHED_SALT_LEN;
const AAD_LABEL: &[u8] = b"keyhold kmip v1\0";

/// What a batch item did, for its audit record.
#[derive(Debug, Default)]
pub struct Facts {
    /// The Keyhold key reached.
    pub key: Option<String>,
    /// The version used.
    pub version: Option<u32>,
    /// The protocol's facts (the revocation reason, the query functions).
    pub attributes: Vec<(&'static str, String)>,
}

/// One operation's context.
pub struct Call<'a> {
    /// The server.
    pub state: &'a AppState,
    /// The caller.
    pub who: &'a Principal,
    /// The request's protocol version.
    pub version: Version,
    /// The Request Payload.
    pub payload: &'a Item,
    /// What the audit record says.
    pub facts: &'a mut Facts,
}

/// The operation names of the audit trail and the metrics (`KMIP Create`).
pub fn name(operation: u32) -> &'static str {
    match operation {
        t::OP_CREATE => "Create",
        t::OP_REGISTER => "Register",
        t::OP_LOCATE => "Locate",
        t::OP_GET => "Get",
        t::OP_GET_ATTRIBUTES => "GetAttributes",
        t::OP_GET_ATTRIBUTE_LIST => "GetAttributeList",
        t::OP_ADD_ATTRIBUTE => "AddAttribute",
        t::OP_MODIFY_ATTRIBUTE => "ModifyAttribute",
        t::OP_DELETE_ATTRIBUTE => "DeleteAttribute",
        t::OP_ACTIVATE => "Activate",
        t::OP_REVOKE => "Revoke",
        t::OP_DESTROY => "Destroy",
        t::OP_QUERY => "Query",
        t::OP_DISCOVER_VERSIONS => "DiscoverVersions",
        t::OP_ENCRYPT => "Encrypt",
        t::OP_DECRYPT => "Decrypt",
        _ => "Unsupported",
    }
}

/// Whether the operation uses a key and changes nothing (its audit record may go in
/// the bounded-lag window).
pub fn is_key_use(operation: u32) -> bool {
    matches!(operation, t::OP_ENCRYPT | t::OP_DECRYPT)
}

/// The operations served, as Query lists them.
const SERVED: [u32; 15] = [
    t::OP_CREATE,
    t::OP_LOCATE,
    t::OP_GET,
    t::OP_GET_ATTRIBUTES,
    t::OP_GET_ATTRIBUTE_LIST,
    t::OP_ADD_ATTRIBUTE,
    t::OP_MODIFY_ATTRIBUTE,
    t::OP_DELETE_ATTRIBUTE,
    t::OP_ACTIVATE,
    t::OP_REVOKE,
    t::OP_DESTROY,
    t::OP_QUERY,
    t::OP_DISCOVER_VERSIONS,
    t::OP_ENCRYPT,
    t::OP_DECRYPT,
];

/// Runs one batch item.
pub fn run(operation: u32, call: Call<'_>) -> Result<Vec<Item>, Failure> {
    match operation {
        t::OP_DISCOVER_VERSIONS => discover_versions(call.payload),
        t::OP_QUERY => query(call),
        t::OP_CREATE => create(call),
        t::OP_LOCATE => locate(call),
        t::OP_GET_ATTRIBUTES => get_attributes(call),
        t::OP_GET_ATTRIBUTE_LIST => get_attribute_list(call),
        t::OP_ADD_ATTRIBUTE | t::OP_MODIFY_ATTRIBUTE | t::OP_DELETE_ATTRIBUTE => {
            change_attribute(call)
        }
        t::OP_ACTIVATE => activate(call),
        t::OP_REVOKE => revoke(call),
        t::OP_DESTROY => destroy(call),
        t::OP_GET => get(call),
        t::OP_ENCRYPT => encrypt(call),
        t::OP_DECRYPT => decrypt(call),
        other => Err(Failure::new(
            t::REASON_OPERATION_NOT_SUPPORTED,
            format!("operation 0x{other:02x} is not served"),
        )),
    }
}

/// A keyring error as KMIP says it.
pub fn failure(e: &Error, version: Version) -> Failure {
    if matches!(
        e,
        Error::PermissionDenied(_) | Error::Unauthenticated | Error::LockedOut
    ) {
        return Failure::denied(e.to_string());
    }
    let reason = match e {
        Error::NotFound => t::REASON_ITEM_NOT_FOUND,
        Error::PermissionDenied(_) | Error::Unauthenticated | Error::LockedOut => {
            t::REASON_PERMISSION_DENIED
        }
        // KMIP 1.x has no reason for a wrong lifecycle state: Permission Denied, as the
        // profiles' servers answer.
        Error::KeyDisabled(_) | Error::InvalidState(_) => t::REASON_PERMISSION_DENIED,
        Error::InvalidRequest(_) | Error::PayloadTooLarge(_) => t::REASON_INVALID_FIELD,
        Error::DecryptFailed => t::REASON_CRYPTOGRAPHIC_FAILURE,
        Error::AlreadyExists if version >= Version::new(1, 4) => t::REASON_OBJECT_ALREADY_EXISTS,
        Error::AlreadyExists => t::REASON_INVALID_FIELD,
        _ => t::REASON_GENERAL_FAILURE,
    };
    Failure::new(reason, e.to_string())
}

fn authorize(who: &Principal, op: Operation, version: Version) -> Result<(), Failure> {
    who.authorize(op).map_err(|e| failure(&e, version))
}

fn discover_versions(payload: &Item) -> Result<Vec<Item>, Failure> {
    let asked: Vec<Version> = payload
        .all(t::PROTOCOL_VERSION)
        .map(Version::of)
        .collect::<Result<_, _>>()?;
    Ok(Version::SUPPORTED
        .iter()
        .filter(|v| asked.is_empty() || asked.contains(v))
        .map(|v| v.item())
        .collect())
}

fn query(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let mut out = Vec::new();
    for f in call.payload.all(t::QUERY_FUNCTION) {
        match f.value {
            Value::Enumeration(t::QUERY_OPERATIONS) => {
                out.extend(SERVED.iter().map(|op| enum_item(t::OPERATION, *op)))
            }
            Value::Enumeration(t::QUERY_OBJECTS) => {
                out.push(enum_item(t::OBJECT_TYPE, t::OBJECT_SYMMETRIC_KEY))
            }
            Value::Enumeration(t::QUERY_SERVER_INFORMATION) => {
                out.push(text_item(t::VENDOR_IDENTIFICATION, "Keyhold"));
                out.push(Item::structure(
                    t::SERVER_INFORMATION,
                    vec![text_item(
                        t::VENDOR_IDENTIFICATION,
                        concat!("Keyhold ", env!("CARGO_PKG_VERSION")),
                    )],
                ));
            }
            // Functions with nothing to list (namespaces, extensions, ...) add nothing.
            Value::Enumeration(_) => {}
            _ => {
                return Err(Failure::invalid_field(
                    "Query Function must be an Enumeration",
                ))
            }
        }
    }
    call.facts.attributes.push((
        "functions",
        call.payload.all(t::QUERY_FUNCTION).count().to_string(),
    ));
    Ok(out)
}

/// The attributes of a KMIP 1.x Template-Attribute (or a bare list of Attributes).
fn template_attributes(payload: &Item) -> Vec<&Item> {
    let template = payload.child(t::TEMPLATE_ATTRIBUTE);
    template
        .map(|tpl| tpl.all(t::ATTRIBUTE).collect())
        .unwrap_or_default()
}

fn attribute_name(a: &Item) -> Result<&str, Failure> {
    text(a, t::ATTRIBUTE_NAME)?.ok_or_else(|| Failure::missing("Attribute Name"))
}

fn create(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let object = enumeration(call.payload, t::OBJECT_TYPE)?;
    if object != t::OBJECT_SYMMETRIC_KEY {
        return Err(Failure::invalid_field(format!(
            "Object Type 0x{object:02x}: Create makes symmetric keys only"
        )));
    }
    let mut name = None;
    for a in template_attributes(call.payload) {
        let value = a.child(t::ATTRIBUTE_VALUE).map(|v| &v.value);
        match (attribute_name(a)?, value) {
            ("Cryptographic Algorithm", Some(Value::Enumeration(t::ALGORITHM_AES))) => {}
            ("Cryptographic Algorithm", _) => {
                return Err(Failure::invalid_field("Keyhold's symmetric keys are AES"))
            }
            ("Cryptographic Length", Some(Value::Integer(KEY_BITS))) => {}
            ("Cryptographic Length", _) => {
                return Err(Failure::invalid_field("Keyhold's AES keys are 256 bits"))
            }
            ("Cryptographic Usage Mask", Some(Value::Integer(_))) => {}
            ("Name", Some(Value::Structure(_))) => {
                let n = a
                    .child(t::ATTRIBUTE_VALUE)
                    .and_then(|v| text(v, t::NAME_VALUE).transpose());
                name = Some(n.ok_or_else(|| Failure::missing("Name Value"))??.to_owned());
            }
            // Names of policies and groups, contact information: no meaning here.
            ("Operation Policy Name" | "Object Group" | "Contact Information", _) => {}
            (other, _) => {
                return Err(Failure::invalid_field(format!(
                    "attribute {other} is not served on Create"
                )))
            }
        }
    }
    let name = match name {
        Some(n) => n,
        None => format!("kmip-{}", random_hex()?),
    };
    if crate::keyring::validate_name(&name).is_err() {
        return Err(Failure::invalid_field(format!(
            "Name `{}`: Keyhold key names are 1 to 128 of A-Z a-z 0-9 . _ -",
            crate::adapters::xks::api::clean_message(&name)
        )));
    }
    call.facts.key = Some(name.clone());
    call.state
        .keyring
        .create_key_pre_active(&call.who.tenant, &name, Algorithm::Aes256Gcm)
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![
        enum_item(t::OBJECT_TYPE, t::OBJECT_SYMMETRIC_KEY),
        text_item(t::UNIQUE_IDENTIFIER, &name),
    ])
}

fn random_hex() -> Result<String, Failure> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| Failure::new(t::REASON_GENERAL_FAILURE, "random generator failed"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Key `name` as `who` may read it (admin and auditor: every key of the tenant; an app:
/// the keys granting it something), with its KMIP lifecycle.
fn readable(call: &Call<'_>, name: &str) -> Result<Object, Failure> {
    let kr = &call.state.keyring;
    let info = kr
        .key_info(&call.who.tenant, name)
        .map_err(|e| failure(&e, call.version))?;
    let granted =
        call.who.role == Role::App && info.grants.iter().any(|g| g.identity == call.who.identity);
    if call.who.authorize(Operation::ReadKeys).is_err() && !granted {
        return Err(Failure::denied("reading this object needs a grant on it"));
    }
    if info.algorithm != Algorithm::Aes256Gcm {
        return Err(Failure::new(
            t::REASON_ITEM_NOT_FOUND,
            format!("{name} is not a symmetric key"),
        ));
    }
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
    Ok(Object { info, life, state })
}

/// A key as KMIP sees it.
struct Object {
    info: KeyInfo,
    life: crate::keyring::Lifecycle,
    state: u32,
}

fn seconds(text: &str) -> i64 {
    humantime::parse_rfc3339(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn date(at: u64) -> Value {
    Value::DateTime(i64::try_from(at).unwrap_or(i64::MAX))
}

/// The attributes Keyhold keeps for an object, by KMIP 1.x name (the Digest only when
/// asked: it reads the key).
fn attributes(
    call: &Call<'_>,
    o: &Object,
    digest: bool,
) -> Result<Vec<(&'static str, Value)>, Failure> {
    let info = &o.info;
    let created = seconds(&info.created_at);
    let mut out = vec![
        ("Unique Identifier", Value::TextString(info.name.clone())),
        ("Object Type", Value::Enumeration(t::OBJECT_SYMMETRIC_KEY)),
        (
            "Cryptographic Algorithm",
            Value::Enumeration(t::ALGORITHM_AES),
        ),
        ("Cryptographic Length", Value::Integer(KEY_BITS)),
        (
            "Cryptographic Usage Mask",
            Value::Integer(t::USAGE_ENCRYPT | t::USAGE_DECRYPT),
        ),
        (
            "Name",
            Value::Structure(vec![
                text_item(t::NAME_VALUE, &info.name),
                enum_item(t::NAME_TYPE, t::NAME_TEXT),
            ]),
        ),
        ("State", Value::Enumeration(o.state)),
        ("Initial Date", Value::DateTime(created)),
    ];
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
    if digest {
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

fn attribute_item(name: &str, value: Value) -> Item {
    Item::structure(
        t::ATTRIBUTE,
        vec![
            text_item(t::ATTRIBUTE_NAME, name),
            Item::new(t::ATTRIBUTE_VALUE, value),
        ],
    )
}

fn get_attributes(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let o = readable(&call, &uid)?;
    let asked: Vec<&str> = call
        .payload
        .all(t::ATTRIBUTE_NAME)
        .filter_map(|i| match &i.value {
            Value::TextString(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    let digest = asked.is_empty() || asked.contains(&"Digest");
    let mut all = attributes(&call, &o, digest)?;
    let mut out = vec![text_item(t::UNIQUE_IDENTIFIER, &uid)];
    if asked.is_empty() {
        out.extend(all.into_iter().map(|(n, v)| attribute_item(n, v)));
    } else {
        // In the order asked; what the object does not have is left out.
        for name in asked {
            if let Some(at) = all.iter().position(|(n, _)| *n == name) {
                let (n, v) = all.swap_remove(at);
                out.push(attribute_item(n, v));
            }
        }
    }
    Ok(out)
}

fn get_attribute_list(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let o = readable(&call, &uid)?;
    let mut out = vec![text_item(t::UNIQUE_IDENTIFIER, &uid)];
    out.extend(
        attributes(&call, &o, false)?
            .into_iter()
            .map(|(n, _)| text_item(t::ATTRIBUTE_NAME, n)),
    );
    out.push(text_item(t::ATTRIBUTE_NAME, "Digest"));
    Ok(out)
}

/// Add, Modify and Delete Attribute: Keyhold keeps no client-set attributes; every one
/// it reports is its own (dates, state, the name).
fn change_attribute(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    readable(&call, &uid)?;
    let name = call
        .payload
        .child(t::ATTRIBUTE)
        .map(attribute_name)
        .transpose()?
        .or(text(call.payload, t::ATTRIBUTE_NAME)?)
        .unwrap_or("the attribute");
    Err(Failure::new(
        t::REASON_PERMISSION_DENIED,
        format!("{name} is kept by Keyhold: it cannot be added, modified or deleted"),
    ))
}

fn locate(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let kr = &call.state.keyring;
    let keys = kr
        .list_keys(&call.who.tenant)
        .map_err(|e| failure(&e, call.version))?;
    let mut want_name = None;
    let mut want_state = None;
    for a in call.payload.all(t::ATTRIBUTE) {
        let value = a.child(t::ATTRIBUTE_VALUE).map(|v| &v.value);
        match (attribute_name(a)?, value) {
            ("Name", Some(Value::Structure(_))) => {
                let v = a.child(t::ATTRIBUTE_VALUE).map(|v| text(v, t::NAME_VALUE));
                want_name = v.transpose()?.flatten().map(str::to_owned);
            }
            ("Object Type", Some(Value::Enumeration(t::OBJECT_SYMMETRIC_KEY))) => {}
            // Only symmetric keys here: another type matches nothing.
            ("Object Type", Some(Value::Enumeration(_))) => return Ok(Vec::new()),
            ("State", Some(Value::Enumeration(s))) => want_state = Some(*s),
            ("Cryptographic Algorithm", Some(Value::Enumeration(t::ALGORITHM_AES))) => {}
            ("Cryptographic Algorithm", Some(Value::Enumeration(_))) => return Ok(Vec::new()),
            ("Cryptographic Length", Some(Value::Integer(KEY_BITS))) => {}
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
    for k in keys.iter().filter(|k| k.algorithm == Algorithm::Aes256Gcm) {
        if want_name.as_deref().is_some_and(|n| n != k.name) {
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

fn activate(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let state = readable(&call, &uid)?.state;
    if state != t::STATE_PRE_ACTIVE && state != t::STATE_ACTIVE {
        // Keyhold could enable a revoked key; KMIP's Deactivated is final. The native
        // API (`kmsctl keys enable`) is where a revocation is undone.
        return Err(Failure::new(
            t::REASON_PERMISSION_DENIED,
            "only a Pre-Active object can be activated (a revoked key is enabled again with kmsctl keys enable)",
        ));
    }
    call.state
        .keyring
        .set_enabled(&call.who.tenant, &uid, true)
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![text_item(t::UNIQUE_IDENTIFIER, &uid)])
}

fn revoke(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let reason = call
        .payload
        .child(t::REVOCATION_REASON)
        .ok_or_else(|| Failure::missing("Revocation Reason"))?;
    let code = enumeration(reason, t::REVOCATION_REASON_CODE)?;
    call.facts
        .attributes
        .push(("revocation_reason", code.to_string()));
    if code == t::REVOKE_KEY_COMPROMISE {
        call.facts
            .attributes
            .push(("compromised", "true".to_owned()));
    }
    call.state
        .keyring
        .revoke(&call.who.tenant, &uid, code == t::REVOKE_KEY_COMPROMISE)
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![text_item(t::UNIQUE_IDENTIFIER, &uid)])
}

fn destroy(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let state = readable(&call, &uid)?.state;
    if state == t::STATE_ACTIVE {
        return Err(Failure::new(
            t::REASON_PERMISSION_DENIED,
            "an Active object cannot be destroyed: revoke it first",
        ));
    }
    let kr = &call.state.keyring;
    let days = *crate::keyring::DELETION_WINDOW_DAYS.start();
    kr.schedule_deletion(&call.who.tenant, &uid, days, kr.clock().now())
        .map_err(|e| failure(&e, call.version))?;
    call.facts
        .attributes
        .push(("deletion_window_days", days.to_string()));
    Ok(vec![text_item(t::UNIQUE_IDENTIFIER, &uid)])
}

fn get(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    readable(&call, &uid)?;
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
fn check_parameters(payload: &Item) -> Result<(), Failure> {
    if let Some(p) = payload.child(t::CRYPTOGRAPHIC_PARAMETERS) {
        for item in p.children() {
            match (item.tag, &item.value) {
                (t::BLOCK_CIPHER_MODE, Value::Enumeration(t::MODE_GCM)) => {}
                (t::BLOCK_CIPHER_MODE, _) => {
                    return Err(Failure::new(
                        t::REASON_FEATURE_NOT_SUPPORTED,
                        "Keyhold encrypts with AES-GCM only",
                    ))
                }
                (t::CRYPTOGRAPHIC_ALGORITHM, Value::Enumeration(t::ALGORITHM_AES)) => {}
                (t::PADDING_METHOD, Value::Enumeration(t::PADDING_NONE)) => {}
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
    Ok(())
}

fn asks_gcm(payload: &Item) -> bool {
    payload
        .child(t::CRYPTOGRAPHIC_PARAMETERS)
        .and_then(|p| p.child(t::BLOCK_CIPHER_MODE))
        .is_some_and(|m| m.value == Value::Enumeration(t::MODE_GCM))
}

fn aad(version: u32, extra: &[u8]) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(extra);
    aad
}

fn encrypt(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::UseKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    check_parameters(call.payload)?;
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

fn decrypt(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::UseKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    check_parameters(call.payload)?;
    let data = bytes(call.payload, t::DATA)?.ok_or_else(|| Failure::missing("Data"))?;
    let iv = bytes(call.payload, t::IV_COUNTER_NONCE)?
        .ok_or_else(|| Failure::missing("IV/Counter/Nonce (the one Encrypt returned)"))?;
    let bad_iv =
        || Failure::invalid_field("IV/Counter/Nonce is not one Keyhold's Encrypt returned");
    if iv.len() != IV_LEN {
        return Err(bad_iv());
    }
    let version = u32::from_be_bytes(iv[..4].try_into().map_err(|_| bad_iv())?);
    let salt: [u8; DETACHED_SALT_LEN] = iv[4..].try_into().map_err(|_| bad_iv())?;
    // The tag in its own field (KMIP 1.4), the data then with or without it after; or
    // after the data alone.
    let (body, tag) = match bytes(call.payload, t::AUTHENTICATED_ENCRYPTION_TAG)? {
        Some(tag) => (data.strip_suffix(tag).unwrap_or(data), tag),
        None if data.len() >= TAG_LEN => data.split_at(data.len() - TAG_LEN),
        None => return Err(Failure::missing("Authenticated Encryption Tag")),
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

/// The payload of an answered batch item, for [`message::Answer`].
pub fn answer(
    operation: u32,
    id: Option<zeroize::Zeroizing<Vec<u8>>>,
    result: Result<Vec<Item>, Failure>,
) -> message::Answer {
    message::Answer {
        operation: Some(operation),
        id,
        result,
    }
}
