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
//!   refused (a reused one would repeat a nonce). Get of key material is refused, except
//!   for a key created or registered with Extractable set: then each Get is audited and
//!   raises `key_exported`.
//! - **Roles** as the native API's: Create, Activate, Revoke, Destroy need `admin`;
//!   Locate, Get Attributes and Get Attribute List `admin` or `auditor` (an `app`: the
//!   keys granting it something); Encrypt and Decrypt an `app` with the key's `wrap` or
//!   `unwrap` grant.

use kms_client::api::Algorithm;

use super::message::{
    self, bytes, enum_item, enumeration, int, text, text_item, unique_identifier, Failure, Version,
};
use super::tags as t;
use super::ttlv::{Item, Value};
use super::{attributes, cipher};
use crate::access::policy::{Operation, Principal};
use crate::api::AppState;
use crate::base::error::Error;

/// Keyhold's only symmetric key: AES, 256 bits.
pub(super) const KEY_BITS: i32 = 256;

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
const SERVED: [u32; 16] = [
    t::OP_CREATE,
    t::OP_REGISTER,
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
        t::OP_REGISTER => register(call),
        t::OP_LOCATE => attributes::locate(call),
        t::OP_GET_ATTRIBUTES => attributes::get_attributes(call),
        t::OP_GET_ATTRIBUTE_LIST => attributes::get_attribute_list(call),
        t::OP_ADD_ATTRIBUTE | t::OP_MODIFY_ATTRIBUTE | t::OP_DELETE_ATTRIBUTE => {
            attributes::change_attribute(call)
        }
        t::OP_ACTIVATE => activate(call),
        t::OP_REVOKE => revoke(call),
        t::OP_DESTROY => destroy(call),
        t::OP_GET => cipher::get(call),
        t::OP_ENCRYPT => cipher::encrypt(call),
        t::OP_DECRYPT => cipher::decrypt(call),
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
        Error::PermissionDenied(_) | Error::Unauthenticated | Error::LockedOut | Error::Braked(_)
    ) {
        return Failure::denied(e.to_string());
    }
    let reason = match e {
        Error::NotFound => t::REASON_ITEM_NOT_FOUND,
        Error::PermissionDenied(_)
        | Error::Unauthenticated
        | Error::LockedOut
        | Error::Braked(_) => t::REASON_PERMISSION_DENIED,
        Error::KeyDisabled(_) | Error::InvalidState(_) => wrong_state_reason(version),
        Error::InvalidRequest(_) | Error::PayloadTooLarge(_) => t::REASON_INVALID_FIELD,
        Error::DecryptFailed => t::REASON_CRYPTOGRAPHIC_FAILURE,
        Error::AlreadyExists if version >= Version::new(1, 4) => t::REASON_OBJECT_ALREADY_EXISTS,
        Error::AlreadyExists => t::REASON_INVALID_FIELD,
        _ => t::REASON_GENERAL_FAILURE,
    };
    Failure::new(reason, e.to_string())
}

/// The reason for an operation the object's state does not allow: KMIP 2.x has Wrong Key
/// Lifecycle State; 1.x none, so Permission Denied, as the 1.4 profiles' test cases expect.
pub(super) fn wrong_state_reason(version: Version) -> u32 {
    if version.major >= 2 {
        t::REASON_WRONG_KEY_LIFECYCLE_STATE
    } else {
        t::REASON_PERMISSION_DENIED
    }
}

pub(super) fn authorize(who: &Principal, op: Operation, version: Version) -> Result<(), Failure> {
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
/// The attributes KMIP 2.x carries under their own tags, by their 1.x names.
const ATTRIBUTE_TAGS: [(&str, u32); 19] = [
    ("Unique Identifier", t::UNIQUE_IDENTIFIER),
    ("Object Type", t::OBJECT_TYPE),
    ("Cryptographic Algorithm", t::CRYPTOGRAPHIC_ALGORITHM),
    ("Cryptographic Length", t::CRYPTOGRAPHIC_LENGTH),
    ("Cryptographic Usage Mask", t::CRYPTOGRAPHIC_USAGE_MASK),
    ("Name", t::NAME),
    ("State", t::STATE),
    ("Initial Date", t::INITIAL_DATE),
    ("Last Change Date", t::LAST_CHANGE_DATE),
    ("Activation Date", t::ACTIVATION_DATE),
    ("Deactivation Date", t::DEACTIVATION_DATE),
    ("Compromise Date", t::COMPROMISE_DATE),
    ("Destroy Date", t::DESTROY_DATE),
    ("Digest", t::DIGEST),
    ("Extractable", t::EXTRACTABLE),
    ("Sensitive", t::SENSITIVE),
    ("Operation Policy Name", t::OPERATION_POLICY_NAME),
    ("Object Group", t::OBJECT_GROUP),
    ("Contact Information", t::CONTACT_INFORMATION),
];

/// An attribute's 1.x name from its 2.x tag.
pub(super) fn name_of(tag: u32) -> Option<&'static str> {
    ATTRIBUTE_TAGS
        .iter()
        .find(|(_, t)| *t == tag)
        .map(|(n, _)| *n)
}

/// An attribute's 2.x tag from its 1.x name.
pub(super) fn tag_of(name: &str) -> Option<u32> {
    ATTRIBUTE_TAGS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}

/// A request's attributes as (1.x name, the item holding the value): in KMIP 1.x the
/// Attribute structures (inside `container`, or the payload's own), in 2.x the children
/// of the payload's Attributes structure, each under its own tag.
pub(super) fn attributes_in(
    payload: &Item,
    version: Version,
    container: Option<u32>,
) -> Result<Vec<(String, &Item)>, Failure> {
    if version.major >= 2 {
        return Ok(payload
            .child(t::ATTRIBUTES)
            .map(|a| a.children())
            .unwrap_or_default()
            .iter()
            .map(|i| {
                let name = name_of(i.tag).map_or_else(|| format!("0x{:06x}", i.tag), str::to_owned);
                (name, i)
            })
            .collect());
    }
    let holder = match container {
        Some(c) => match payload.child(c) {
            Some(h) => h,
            None => return Ok(Vec::new()),
        },
        None => payload,
    };
    holder
        .all(t::ATTRIBUTE)
        .map(|a| {
            let value = a
                .child(t::ATTRIBUTE_VALUE)
                .ok_or_else(|| Failure::missing("Attribute Value"))?;
            Ok((attribute_name(a)?.to_owned(), value))
        })
        .collect()
}

pub(super) fn attribute_name(a: &Item) -> Result<&str, Failure> {
    text(a, t::ATTRIBUTE_NAME)?.ok_or_else(|| Failure::missing("Attribute Name"))
}

/// What a Create or Register template asks of the new object.
#[derive(Default)]
pub(super) struct Template {
    name: Option<String>,
    pub(super) extractable: bool,
}

/// Reads a Template-Attribute: AES-256 only; Extractable is Keyhold's export flag; names
/// of policies and groups are accepted and mean nothing here; anything else is refused.
fn template(payload: &Item, version: Version) -> Result<Template, Failure> {
    let mut out = Template::default();
    for (name, item) in attributes_in(payload, version, Some(t::TEMPLATE_ATTRIBUTE))? {
        let value = Some(&item.value);
        match (name.as_str(), value) {
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
                let n = text(item, t::NAME_VALUE)?;
                out.name = Some(n.ok_or_else(|| Failure::missing("Name Value"))?.to_owned());
            }
            ("Extractable", Some(Value::Boolean(b))) => out.extractable = *b,
            ("Sensitive", Some(Value::Boolean(false))) => {}
            // Names of policies and groups, contact information: no meaning here.
            ("Operation Policy Name" | "Object Group" | "Contact Information", _) => {}
            (other, _) => {
                return Err(Failure::invalid_field(format!(
                    "attribute {other} is not served on Create or Register"
                )))
            }
        }
    }
    Ok(out)
}

/// The new object's name: the template's, checked, or a fresh one.
fn new_name(template: &Template) -> Result<String, Failure> {
    let name = match &template.name {
        Some(n) => n.clone(),
        None => format!("kmip-{}", random_hex()?),
    };
    if crate::keyring::validate_name(&name).is_err() {
        return Err(Failure::invalid_field(format!(
            "Name `{}`: Keyhold key names are 1 to 128 of A-Z a-z 0-9 . _ -",
            crate::adapters::xks::api::clean_message(&name)
        )));
    }
    Ok(name)
}

/// The template and name of a new object, noted for its audit record.
pub(super) fn new_object(call: &mut Call<'_>) -> Result<(Template, String), Failure> {
    let template = template(call.payload, call.version)?;
    let name = new_name(&template)?;
    call.facts.key = Some(name.clone());
    if template.extractable {
        call.facts
            .attributes
            .push(("extractable", "true".to_owned()));
    }
    Ok((template, name))
}

fn create(mut call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let object = enumeration(call.payload, t::OBJECT_TYPE)?;
    if object != t::OBJECT_SYMMETRIC_KEY {
        return Err(Failure::invalid_field(format!(
            "Object Type 0x{object:02x}: Create makes symmetric keys only"
        )));
    }
    let (template, name) = new_object(&mut call)?;
    call.state
        .keyring
        .create_key_pre_active(
            &call.who.tenant,
            &name,
            Algorithm::Aes256Gcm,
            template.extractable,
        )
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![
        enum_item(t::OBJECT_TYPE, t::OBJECT_SYMMETRIC_KEY),
        text_item(t::UNIQUE_IDENTIFIER, &name),
    ])
}

/// Register: a client's AES-256 key (Raw format) becomes a pre-active Keyhold key, its
/// material sealed as every key's; extractable only if the template says so. Secret Data
/// is kept only to be read back ([`super::secret`]). Other objects (certificates, key
/// pairs, opaque objects) are refused: Keyhold holds the keys it uses.
fn register(mut call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    match enumeration(call.payload, t::OBJECT_TYPE)? {
        t::OBJECT_SYMMETRIC_KEY => {}
        t::OBJECT_SECRET_DATA => return super::secret::register(&mut call),
        object => {
            return Err(Failure::new(
                t::REASON_FEATURE_NOT_SUPPORTED,
                format!(
                    "Object Type 0x{object:02x}: Keyhold registers AES-256 symmetric keys and secret data only"
                ),
            ))
        }
    }
    let block = call
        .payload
        .child(t::SYMMETRIC_KEY)
        .and_then(|k| k.child(t::KEY_BLOCK))
        .ok_or_else(|| Failure::missing("Symmetric Key / Key Block"))?;
    if enumeration(block, t::KEY_FORMAT_TYPE)? != t::KEY_FORMAT_RAW {
        return Err(Failure::new(
            t::REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED,
            "Keyhold registers keys in Raw format",
        ));
    }
    if block.child(t::KEY_WRAPPING_DATA).is_some() {
        return Err(Failure::new(
            t::REASON_FEATURE_NOT_SUPPORTED,
            "wrapped key blocks are not served",
        ));
    }
    let algorithm = enumeration(block, t::CRYPTOGRAPHIC_ALGORITHM)?;
    let length = int(block, t::CRYPTOGRAPHIC_LENGTH)?;
    if algorithm != t::ALGORITHM_AES || length != KEY_BITS {
        return Err(Failure::invalid_field(
            "Keyhold's symmetric keys are AES-256",
        ));
    }
    let material = block
        .child(t::KEY_VALUE)
        .map(|v| bytes(v, t::KEY_MATERIAL))
        .transpose()?
        .flatten()
        .ok_or_else(|| Failure::missing("Key Material"))?;
    let (template, name) = new_object(&mut call)?;
    call.state
        .keyring
        .register_key(&call.who.tenant, &name, material, template.extractable)
        .map_err(|e| failure(&e, call.version))?;
    Ok(vec![text_item(t::UNIQUE_IDENTIFIER, &name)])
}

fn random_hex() -> Result<String, Failure> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| Failure::new(t::REASON_GENERAL_FAILURE, "random generator failed"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn activate(call: Call<'_>) -> Result<Vec<Item>, Failure> {
    authorize(call.who, Operation::ManageKeys, call.version)?;
    let uid = unique_identifier(call.payload)?.to_owned();
    call.facts.key = Some(uid.clone());
    let state = attributes::readable(&call, &uid)?.state;
    if state != t::STATE_PRE_ACTIVE && state != t::STATE_ACTIVE {
        // Keyhold could enable a revoked key; KMIP's Deactivated is final. The native
        // API (`kmsctl keys enable`) is where a revocation is undone.
        return Err(Failure::new(
            wrong_state_reason(call.version),
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
    let state = attributes::readable(&call, &uid)?.state;
    if state == t::STATE_ACTIVE {
        return Err(Failure::new(
            wrong_state_reason(call.version),
            "an Active object cannot be destroyed: revoke it first",
        ));
    }
    let held = crate::api::approvals::holding(
        call.state,
        call.who,
        kms_client::api::ApprovalScope::Tenant,
        kms_client::api::Gate::Destroy,
    )
    .map_err(|e| failure(&e, call.version))?;
    if held.is_some() {
        let refused = Error::PermissionDenied(
            "the tenant's dual-control policy holds destroy for approval: request it with kmsctl keys schedule-deletion",
        );
        return Err(failure(&refused, call.version));
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
