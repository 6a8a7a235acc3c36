//! A Vault/OpenBao Transit-compatible API on the mTLS listener (`/v1/transit/`,
//! `docs/vault-transit.md`): the common language of open-source encryption tooling (sops,
//! OpenTofu's state encryption, Kafka encryption proxies) mapped onto Keyhold's keys,
//! grants and audit trail.
//!
//! - **Identity** is the client certificate, as on every native route; `X-Vault-Token` is
//!   ignored (a bearer token would add a second, weaker credential beside the mTLS one).
//!   Creating, rotating and configuring keys needs the `admin` role; encrypt, decrypt,
//!   rewrap and datakey the `app` role and the key's `wrap` (encrypt, datakey) or
//!   `unwrap` (decrypt) grant, rewrap both; reading a key, `admin`, `auditor`, or an `app`
//!   the key grants something to.
//! - **Keys** are the tenant's AES-256 keys (`aes256-gcm96`). A key made here has no
//!   grants until an admin gives them (`kmsctl keys grant`): Keyhold's default deny.
//!   Export, plaintext backup, convergent encryption and Vault's key deletion are refused:
//!   keys never leave, and destruction goes through Keyhold's deletion window.
//! - **Ciphertexts** are `vault:v<version>:` + base64(IV ‖ ciphertext ‖ tag): AES-256-GCM
//!   under a single-use key derived from the version's KEK (the detached construction
//!   of the cloud adapters), with the version, `context` and `associated_data`
//!   authenticated. A `context` is bound to any key (Vault's derived keys require one;
//!   here it is optional, and a ciphertext made with one opens only with the same).
//!   They open only through Keyhold: Vault's own ciphertexts are not readable here, nor
//!   the reverse.
//! - **Answers** come in Vault's envelope; failures as `{"errors": [...]}` with Vault's
//!   status codes; each request gets one audit record, as on the native API.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use kms_client::api::{Algorithm, Context, KeyInfo};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::access::policy::{Operation, Principal, Role};
use crate::api::{blocking, AppState, AuditNote, Caller, RequestId};
use crate::base::error::Error;

pub mod wire;

use wire::{BatchResults, Item, ItemResult, ItemsRequest, SecretB64};

/// The Transit routes, merged into the native API's router (under its completion
/// middleware: request id, lockout, audit, metrics). Vault's CLI writes with `PUT`, its
/// libraries with `POST`: both are served.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/transit/keys", get(list))
        .route(
            "/v1/transit/keys/{name}",
            post(create).put(create).get(read).delete(delete),
        )
        .route("/v1/transit/keys/{name}/rotate", post(rotate).put(rotate))
        .route("/v1/transit/keys/{name}/config", post(config).put(config))
        .route("/v1/transit/encrypt/{name}", post(encrypt).put(encrypt))
        .route("/v1/transit/decrypt/{name}", post(decrypt).put(decrypt))
        .route("/v1/transit/rewrap/{name}", post(rewrap).put(rewrap))
        .route(
            "/v1/transit/datakey/{kind}/{name}",
            post(datakey).put(datakey),
        )
}

/// A body as Vault reads one: JSON whatever the content type, an empty body or `null`
/// (what the CLI's `write -f` sends) as `{}`.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(bytes)
        .map(Option::unwrap_or_default)
        .map_err(|e| Error::InvalidRequest(format!("failed to parse JSON input: {e}")))
}

/// The handlers' common end: the answer, or the error in Vault's shape.
fn finish(result: Result<Response, Error>) -> Response {
    result.unwrap_or_else(wire::error)
}

fn caller_for(caller: Result<Caller, Error>, op: Operation) -> Result<Principal, Error> {
    let Caller(p) = caller?;
    p.authorize(op)?;
    Ok(p)
}

/// `LIST transit/keys` (Vault's CLI: `GET ?list=true`).
async fn list(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    Extension(RequestId(id)): Extension<RequestId>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    finish(
        async {
            if q.get("list").map(String::as_str) != Some("true") {
                return Err(Error::MethodNotAllowed);
            }
            let who = caller_for(caller, Operation::ReadKeys)?;
            let keys = blocking(move || state.keyring.list_keys(&who.tenant)).await?;
            let keys = keys
                .into_iter()
                .filter(|k| k.algorithm == Algorithm::Aes256Gcm)
                .map(|k| k.name)
                .collect();
            Ok(wire::answer(id, StatusCode::OK, wire::KeyNames { keys }))
        }
        .await,
    )
}

/// `POST transit/keys/:name`: creates an AES-256 key (no grants yet); a key that exists
/// is read back unchanged, as Vault does.
async fn create(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    note.key(&name);
    finish(async {
        let who = caller_for(caller, Operation::ManageKeys)?;
        let req: wire::CreateRequest = body(&bytes)?;
        if let Some(t) = req.key_type.as_deref().filter(|t| *t != wire::KEY_TYPE) {
            return Err(Error::InvalidRequest(format!(
                "key type {t} is not served: only {}",
                wire::KEY_TYPE
            )));
        }
        refuse_flag(req.exportable, "exportable keys are not served: keys never leave Keyhold")?;
        refuse_flag(
            req.allow_plaintext_backup,
            "plaintext backup is not served: keys never leave Keyhold",
        )?;
        refuse_flag(
            req.convergent_encryption,
            "convergent encryption is not served",
        )?;
        refuse_flag(
            req.derived,
            "derived keys are not served: send `context` with any key, and Keyhold binds it to the ciphertext",
        )?;
        let st = state.clone();
        let tenant = who.tenant.clone();
        let key = name.clone();
        let made = blocking(move || {
            st.keyring
                .create_key(&tenant, &key, Algorithm::Aes256Gcm, None, Vec::new())
        })
        .await;
        let info = match made {
            Ok(info) => info,
            Err(Error::AlreadyExists) => {
                blocking(move || state.keyring.key_info(&who.tenant, &name)).await?
            }
            Err(e) => return Err(e),
        };
        key_answer(id, info)
    }
    .await)
}

fn refuse_flag(flag: Option<bool>, why: &str) -> Result<(), Error> {
    match flag {
        Some(true) => Err(Error::InvalidRequest(why.to_owned())),
        _ => Ok(()),
    }
}

/// `GET transit/keys/:name`.
async fn read(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
) -> Response {
    note.key(&name);
    finish(
        async {
            let Caller(who) = caller?;
            let tenant = who.tenant.clone();
            let info = blocking(move || state.keyring.key_info(&tenant, &name)).await?;
            // Admins and auditors read every key; an app, the keys that grant it something.
            if who.authorize(Operation::ReadKeys).is_err()
                && !(who.role == Role::App
                    && info.grants.iter().any(|g| g.identity == who.identity))
            {
                return Err(Error::PermissionDenied(
                    "reading this key needs a grant on it",
                ));
            }
            key_answer(id, info)
        }
        .await,
    )
}

/// `DELETE transit/keys/:name`: refused; Keyhold destroys keys through its deletion
/// window (`kmsctl keys schedule-deletion`), which this route cannot express.
async fn delete(
    caller: Result<Caller, Error>,
    note: AuditNote,
    Path(name): Path<String>,
) -> Response {
    note.key(&name);
    finish(
        async {
            caller_for(caller, Operation::ManageKeys)?;
            Err(Error::InvalidRequest(
            "deletion is not allowed for this key: schedule it with kmsctl keys schedule-deletion"
                .into(),
        ))
        }
        .await,
    )
}

/// `POST transit/keys/:name/rotate`.
async fn rotate(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
) -> Response {
    note.key(&name);
    finish(
        async {
            let who = caller_for(caller, Operation::ManageKeys)?;
            let info = blocking(move || state.keyring.rotate(&who.tenant, &name)).await?;
            key_answer(id, info)
        }
        .await,
    )
}

/// `POST transit/keys/:name/config`: `min_decryption_version`; the settings Keyhold does
/// not serve are refused when asked for.
async fn config(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    note.key(&name);
    finish(async {
        let who = caller_for(caller, Operation::ManageKeys)?;
        let req: wire::ConfigRequest = body(&bytes)?;
        if req.min_encryption_version.is_some_and(|v| v != 0) {
            return Err(Error::InvalidRequest(
                "min_encryption_version is not served: Keyhold encrypts with the latest version"
                    .into(),
            ));
        }
        refuse_flag(
            req.deletion_allowed,
            "deletion_allowed is not served: schedule a deletion with kmsctl keys schedule-deletion",
        )?;
        refuse_flag(req.exportable, "exportable keys are not served: keys never leave Keyhold")?;
        refuse_flag(
            req.allow_plaintext_backup,
            "plaintext backup is not served: keys never leave Keyhold",
        )?;
        // Under a dual-control policy that holds it, raising is refused here (the native
        // API asks for the approvals); lowering or keeping it runs.
        let clearance = crate::api::approvals::clearance(
            &state,
            &who,
            kms_client::api::Gate::MinDecryptVersion,
        )
        .await?;
        let info = blocking(move || match req.min_decryption_version {
            Some(v) => state
                .keyring
                .set_min_decrypt_version(&who.tenant, &name, v, clearance),
            None => state.keyring.key_info(&who.tenant, &name),
        })
        .await?;
        key_answer(id, info)
    }
    .await)
}

fn key_answer(id: u64, info: KeyInfo) -> Result<Response, Error> {
    if info.algorithm != Algorithm::Aes256Gcm {
        return Err(Error::InvalidRequest(format!(
            "key {} is not an {} key",
            info.name,
            wire::KEY_TYPE
        )));
    }
    let keys = info
        .versions
        .iter()
        .map(|v| {
            let at = humantime::parse_rfc3339(&v.created_at)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            (v.version.to_string(), at)
        })
        .collect();
    let data = wire::KeyData {
        name: info.name,
        key_type: wire::KEY_TYPE,
        keys,
        latest_version: info.current_version,
        min_available_version: 0,
        min_decryption_version: info.min_decrypt_version.max(1),
        min_encryption_version: 0,
        deletion_allowed: false,
        derived: false,
        exportable: false,
        allow_plaintext_backup: false,
        supports_encryption: true,
        supports_decryption: true,
        supports_derivation: false,
        supports_signing: false,
        imported_key: false,
        auto_rotate_period: 0,
    };
    Ok(wire::answer(id, StatusCode::OK, data))
}

/// What one item asks, decoded.
struct Inputs {
    context: Zeroizing<Vec<u8>>,
    associated: Zeroizing<Vec<u8>>,
}

fn inputs(item: &Item) -> Result<Inputs, Error> {
    if item.nonce.is_some() {
        return Err(Error::InvalidRequest(
            "nonce is not served: convergent encryption is not supported".into(),
        ));
    }
    let decode = |field: &str, v: &Option<String>| match v {
        Some(v) => wire::decode_b64(field, v),
        None => Ok(Zeroizing::new(Vec::new())),
    };
    Ok(Inputs {
        context: decode("context", &item.context)?,
        associated: decode("associated_data", &item.associated_data)?,
    })
}

/// The audit record's context hash for a Transit context (bytes, not Keyhold's map).
fn note_context(state: &AppState, note: &AuditNote, item: &Item) {
    if let Some(c) = item.context.as_ref().filter(|c| !c.is_empty()) {
        let ctx: Context = [("transit_context".to_owned(), c.clone())]
            .into_iter()
            .collect();
        note.context(&state.keyring, &ctx);
    }
}

/// Runs `one` on the request's item, or on each of `batch_input` (answered in order,
/// each failure in its own result: 400 when any failed, or `partial_failure_response_code`
/// when some did and some did not).
fn run_items(
    id: u64,
    note: &AuditNote,
    name: &str,
    req: ItemsRequest,
    mut one: impl FnMut(&Item) -> Result<ItemResult, Error>,
) -> Result<Response, Error> {
    let Some(batch) = req.batch_input else {
        let result = one(&req.item)?;
        if let Some(v) = result.key_version {
            note.key_version(name, v);
        }
        return Ok(wire::answer(id, StatusCode::OK, result));
    };
    if batch.is_empty() {
        return Err(Error::InvalidRequest(
            "missing batch input to process".into(),
        ));
    }
    let mut failed = 0;
    let mut results = Vec::with_capacity(batch.len());
    for item in &batch {
        let mut r = one(item).unwrap_or_else(|e| {
            failed += 1;
            ItemResult {
                error: Some(wire::item_error(&e)),
                ..ItemResult::default()
            }
        });
        r.reference = item.reference.clone();
        results.push(r);
    }
    note.key(name);
    note.attribute("items", batch.len().to_string());
    note.attribute("items_failed", failed.to_string());
    let status = if failed == 0 {
        StatusCode::OK
    } else if failed == batch.len() {
        StatusCode::BAD_REQUEST
    } else {
        req.partial_failure_response_code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST)
    };
    Ok(wire::answer(
        id,
        status,
        BatchResults {
            batch_results: results,
        },
    ))
}

fn too_many(state: &AppState, req: &ItemsRequest) -> Result<(), Error> {
    match &req.batch_input {
        Some(b) if b.len() > state.settings.max_batch_items => Err(Error::InvalidRequest(format!(
            "batch_input has {} items; at most {}",
            b.len(),
            state.settings.max_batch_items
        ))),
        _ => Ok(()),
    }
}

/// Encrypts `plaintext` under `name`'s current version.
fn seal(
    keys: &mut crate::keyring::Lookups<'_>,
    who: &Principal,
    name: &str,
    plaintext: &[u8],
    inputs: &Inputs,
) -> Result<ItemResult, Error> {
    let c = keys.encrypt_detached(
        who,
        name,
        |v| wire::aad(v, &inputs.context, &inputs.associated),
        plaintext,
    )?;
    Ok(ItemResult {
        ciphertext: Some(wire::encode_ciphertext(
            c.version,
            &c.iv,
            &c.ciphertext,
            &c.tag,
        )),
        key_version: Some(c.version),
        ..ItemResult::default()
    })
}

/// Opens a `vault:vN:` ciphertext of `name`.
fn open(
    keys: &mut crate::keyring::Lookups<'_>,
    who: &Principal,
    name: &str,
    ciphertext: Option<&str>,
    inputs: &Inputs,
) -> Result<(crate::crypto::secret::SecretVec, u32), Error> {
    let c = wire::decode_ciphertext(
        ciphertext.ok_or_else(|| Error::InvalidRequest("missing ciphertext to decrypt".into()))?,
    )?;
    let aad = wire::aad(c.version, &inputs.context, &inputs.associated);
    let u = keys.decrypt_detached(who, name, c.version, &c.iv, &c.body, &c.tag, &aad)?;
    Ok((u.plaintext, c.version))
}

fn check_version(item: &Item) -> Result<(), Error> {
    match item.key_version {
        None | Some(0) => Ok(()),
        Some(_) => Err(Error::InvalidRequest(
            "key_version is not served: Keyhold encrypts with the latest version".into(),
        )),
    }
}

/// `POST transit/encrypt/:name`.
async fn encrypt(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    note.key(&name);
    finish((|| {
        let who = caller_for(caller, Operation::UseKeys)?;
        let req: ItemsRequest = body(&bytes)?;
        too_many(&state, &req)?;
        note_context(&state, &note, &req.item);
        let mut keys = state.keyring.lookups()?;
        run_items(id, &note, &name, req, |item| {
            check_version(item)?;
            let inputs = inputs(item)?;
            let plaintext = wire::decode_b64(
                "plaintext",
                item.plaintext
                    .as_ref()
                    .map(|p| p.0.as_str())
                    .ok_or_else(|| Error::InvalidRequest("missing plaintext to encrypt".into()))?,
            )?;
            seal(&mut keys, &who, &name, &plaintext, &inputs)
        })
    })())
}

/// `POST transit/decrypt/:name`.
async fn decrypt(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    note.key(&name);
    finish((|| {
        let who = caller_for(caller, Operation::UseKeys)?;
        let req: ItemsRequest = body(&bytes)?;
        too_many(&state, &req)?;
        note_context(&state, &note, &req.item);
        let mut keys = state.keyring.lookups()?;
        run_items(id, &note, &name, req, |item| {
            let inputs = inputs(item)?;
            let (plaintext, version) =
                open(&mut keys, &who, &name, item.ciphertext.as_deref(), &inputs)?;
            Ok(ItemResult {
                plaintext: Some(SecretB64::encode(plaintext.expose_secret())),
                key_version: Some(version),
                ..ItemResult::default()
            })
        })
    })())
}

/// `POST transit/rewrap/:name`: opened and sealed again under the latest version; the
/// plaintext never leaves the server.
async fn rewrap(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    note.key(&name);
    finish((|| {
        let who = caller_for(caller, Operation::UseKeys)?;
        let req: ItemsRequest = body(&bytes)?;
        too_many(&state, &req)?;
        note_context(&state, &note, &req.item);
        let mut keys = state.keyring.lookups()?;
        run_items(id, &note, &name, req, |item| {
            check_version(item)?;
            let inputs = inputs(item)?;
            let (plaintext, _) = open(&mut keys, &who, &name, item.ciphertext.as_deref(), &inputs)?;
            seal(&mut keys, &who, &name, plaintext.expose_secret(), &inputs)
        })
    })())
}

/// `POST transit/datakey/(plaintext|wrapped)/:name`: a fresh random key of `bits`,
/// sealed under `name`; `plaintext` also hands it over.
async fn datakey(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, Error>,
    note: AuditNote,
    Extension(RequestId(id)): Extension<RequestId>,
    Path((kind, name)): Path<(String, String)>,
    bytes: Bytes,
) -> Response {
    note.key(&name);
    finish((|| {
        let who = caller_for(caller, Operation::UseKeys)?;
        let give_plaintext = match kind.as_str() {
            "plaintext" => true,
            "wrapped" => false,
            other => {
                return Err(Error::InvalidRequest(format!(
                    "invalid type {other}: plaintext or wrapped"
                )))
            }
        };
        let req: wire::DatakeyRequest = body(&bytes)?;
        let bits = req.bits.unwrap_or(256);
        if !matches!(bits, 128 | 256 | 512) {
            return Err(Error::InvalidRequest(
                "invalid bits: 128, 256 or 512".into(),
            ));
        }
        let item = Item {
            context: req.context,
            associated_data: req.associated_data,
            nonce: req.nonce,
            ..Item::default()
        };
        note_context(&state, &note, &item);
        let inputs = inputs(&item)?;
        let mut key = Zeroizing::new(vec![0u8; bits as usize / 8]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        let mut keys = state.keyring.lookups()?;
        let mut result = seal(&mut keys, &who, &name, &key, &inputs)?;
        if give_plaintext {
            result.plaintext = Some(SecretB64::encode(&key));
        }
        if let Some(v) = result.key_version {
            note.key_version(&name, v);
        }
        Ok(wire::answer(id, StatusCode::OK, result))
    })())
}
