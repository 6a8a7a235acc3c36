//! Key use: datakey, wrap, unwrap, rewrap, batch (app role). These run on the async
//! workers: they touch only memory (cached KEK versions) except on a cache miss. The
//! exception is RSA unwrap (a private-key operation of about a millisecond, more for a
//! batch): requests carrying RSA-wrapped DEKs run on the blocking pool.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kms_client::api::{
    BatchItem, BatchRequest, BatchResponse, BatchResult, DatakeyRequest, DatakeyResponse,
    RewrapRequest, UnwrapRequest, UnwrapResponse, WrapRequest, WrapResponse,
};

use super::{blocking, ApiJson, AppState, AuditNote, Caller, KeyName, Used};
use crate::access::policy::{Operation, Principal};
use crate::base::error::Error;
use crate::crypto::secret::SecretJson;
use crate::keyring::{DataKey, Keyring, Lookups, Unwrapped, Wrapped};

fn datakey_response(d: DataKey) -> DatakeyResponse {
    DatakeyResponse {
        plaintext: d.plaintext.into_wire(),
        wrapped: d.wrapped.into(),
        key: d.key,
        version: d.version,
    }
}

fn wrap_response(w: Wrapped) -> WrapResponse {
    WrapResponse {
        wrapped: w.wrapped.into(),
        key: w.key,
        version: w.version,
    }
}

fn unwrap_response(u: Unwrapped) -> UnwrapResponse {
    UnwrapResponse {
        plaintext: u.plaintext.into_wire(),
        key: u.key,
        version: u.version,
    }
}

/// Bytes to set aside for an unwrap answer (a 32-byte DEK, the key name, the version);
/// a longer one grows its buffer ([`SecretJson`]).
const UNWRAP_ANSWER: usize = 128;
/// The same for a datakey answer (the DEK and the wrapped DEK).
const DATAKEY_ANSWER: usize = 320;

/// `POST /v1/keys/{name}/datakey`.
pub async fn datakey(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    note: AuditNote,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<DatakeyRequest>,
) -> Result<Used<SecretJson<DatakeyResponse>>, Error> {
    caller.authorize(Operation::UseKeys)?;
    note.context(&state.keyring, &req.context);
    let d = state
        .keyring
        .lookups()?
        .datakey(&caller, &name, &req.context)?;
    let (key, version) = (d.key.clone(), d.version);
    let answer = SecretJson {
        value: datakey_response(d),
        capacity: DATAKEY_ANSWER,
    };
    Ok(Used::new(answer, &key, version))
}

/// `POST /v1/keys/{name}/wrap`.
pub async fn wrap(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    note: AuditNote,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<WrapRequest>,
) -> Result<Used<Json<WrapResponse>>, Error> {
    caller.authorize(Operation::UseKeys)?;
    note.context(&state.keyring, &req.context);
    let w = state.keyring.lookups()?.wrap(
        &caller,
        &name,
        req.plaintext.expose_secret(),
        &req.context,
    )?;
    let (key, version) = (w.key.clone(), w.version);
    Ok(Used::new(Json(wrap_response(w)), &key, version))
}

/// `POST /v1/unwrap`.
pub async fn unwrap(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    note: AuditNote,
    ApiJson(req): ApiJson<UnwrapRequest>,
) -> Result<Used<SecretJson<UnwrapResponse>>, Error> {
    caller.authorize(Operation::UseKeys)?;
    note.context(&state.keyring, &req.context);
    let u = if crate::crypto::format::is_rsa(req.wrapped.as_bytes()) {
        let st = state.clone();
        blocking(move || {
            st.keyring
                .lookups()?
                .unwrap(&caller, req.wrapped.as_bytes(), &req.context)
        })
        .await?
    } else {
        state
            .keyring
            .lookups()?
            .unwrap(&caller, req.wrapped.as_bytes(), &req.context)?
    };
    let (key, version) = (u.key.clone(), u.version);
    let answer = SecretJson {
        value: unwrap_response(u),
        capacity: UNWRAP_ANSWER,
    };
    Ok(Used::new(answer, &key, version))
}

/// `POST /v1/rewrap`: the DEK stays in the server.
pub async fn rewrap(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    note: AuditNote,
    ApiJson(req): ApiJson<RewrapRequest>,
) -> Result<Used<Json<WrapResponse>>, Error> {
    caller.authorize(Operation::UseKeys)?;
    note.context(&state.keyring, &req.context);
    let w = if crate::crypto::format::is_rsa(req.wrapped.as_bytes()) {
        let st = state.clone();
        blocking(move || {
            st.keyring
                .lookups()?
                .rewrap(&caller, req.wrapped.as_bytes(), &req.context)
        })
        .await?
    } else {
        state
            .keyring
            .lookups()?
            .rewrap(&caller, req.wrapped.as_bytes(), &req.context)?
    };
    let (key, version) = (w.key.clone(), w.version);
    Ok(Used::new(Json(wrap_response(w)), &key, version))
}

fn run_item(
    keys: &mut Lookups<'_>,
    who: &Principal,
    item: &BatchItem,
) -> Result<BatchResult, Error> {
    Ok(match item {
        BatchItem::Datakey { key, context } => {
            BatchResult::Datakey(datakey_response(keys.datakey(who, key, context)?))
        }
        BatchItem::Wrap {
            key,
            plaintext,
            context,
        } => BatchResult::Wrap(wrap_response(keys.wrap(
            who,
            key,
            plaintext.expose_secret(),
            context,
        )?)),
        BatchItem::Unwrap { wrapped, context } => BatchResult::Unwrap(unwrap_response(
            keys.unwrap(who, wrapped.as_bytes(), context)?,
        )),
        BatchItem::Rewrap { wrapped, context } => BatchResult::Rewrap(wrap_response(keys.rewrap(
            who,
            wrapped.as_bytes(),
            context,
        )?)),
    })
}

/// `POST /v1/batch`: items run in order, each succeeding or failing on its own. A sealed
/// server fails the whole batch (503), not item by item.
pub async fn batch(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    note: AuditNote,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<SecretJson<BatchResponse>, Error> {
    caller.authorize(Operation::UseKeys)?;
    let max = state.settings.max_batch_items;
    if req.items.is_empty() || req.items.len() > max {
        return Err(Error::InvalidRequest(format!(
            "a batch holds 1 to {max} items, got {}",
            req.items.len()
        )));
    }
    let any_rsa = req.items.iter().any(|item| match item {
        BatchItem::Unwrap { wrapped, .. } | BatchItem::Rewrap { wrapped, .. } => {
            crate::crypto::format::is_rsa(wrapped.as_bytes())
        }
        _ => false,
    });
    let capacity = req
        .items
        .iter()
        .map(|item| match item {
            BatchItem::Unwrap { .. } => UNWRAP_ANSWER,
            _ => DATAKEY_ANSWER,
        })
        .sum::<usize>()
        + 16;
    let identity = caller.identity.clone();
    let results = if any_rsa {
        let st = state.clone();
        blocking(move || run_batch(&st.keyring, &caller, &req.items)).await?
    } else {
        run_batch(&state.keyring, &caller, &req.items)?
    };
    note_batch(&state, &note, &identity, &results);
    Ok(SecretJson {
        value: BatchResponse { results },
        capacity,
    })
}

/// What a batch's record says: the key and version when every item used one; each item's
/// key, version and outcome (`items`, in order; the audit trail bounds its length). A
/// denied item is a denial like any other: alerted and counted toward the lockout.
fn note_batch(state: &Arc<AppState>, note: &AuditNote, identity: &str, results: &[BatchResult]) {
    let mut used: Option<(&str, u32)> = None;
    let mut mixed = false;
    let mut items = Vec::with_capacity(results.len());
    for r in results {
        let (key, version) = match r {
            BatchResult::Datakey(d) => (d.key.as_str(), d.version),
            BatchResult::Wrap(w) | BatchResult::Rewrap(w) => (w.key.as_str(), w.version),
            BatchResult::Unwrap(u) => (u.key.as_str(), u.version),
            BatchResult::Error(e) => {
                let code = format!("{:?}", e.code);
                if e.code == kms_client::api::ErrorCode::PermissionDenied {
                    state.alerts.raise(crate::security::alert::AlertEvent::new(
                        crate::base::event::AlertKind::Denied,
                        Some(identity),
                        "POST /v1/batch (an item)",
                    ));
                    crate::api::count_failure(state, identity);
                }
                items.push(code);
                continue;
            }
        };
        items.push(format!("{key}@{version}"));
        match used {
            None => used = Some((key, version)),
            Some(u) if u != (key, version) => mixed = true,
            Some(_) => {}
        }
    }
    if let (Some((key, version)), false) = (used, mixed) {
        note.key_version(key, version);
    }
    note.attribute("items", items.join(" "));
}

/// The items in order, sharing one [`Lookups`]. Sealed: the whole batch fails (503).
fn run_batch(
    keyring: &Keyring,
    who: &Principal,
    items: &[BatchItem],
) -> Result<Vec<BatchResult>, Error> {
    let mut keys = keyring.lookups()?;
    Ok(items
        .iter()
        .map(|item| {
            run_item(&mut keys, who, item).unwrap_or_else(|e| match e {
                e @ (Error::Storage(_) | Error::Corrupt(_) | Error::Internal(_)) => {
                    tracing::error!(error = %e, "batch item failed");
                    BatchResult::Error(e.body())
                }
                e => BatchResult::Error(e.body()),
            })
        })
        .collect())
}
