//! Key management: create, list, get, rotate, disable, enable, deletion, retirement of
//! versions, grants (admin; reads also auditor).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use kms_client::api::{
    CreateKeyRequest, EditGrantsRequest, Jwk, KeyInfo, KeyList, MinDecryptVersionRequest,
    MinVersionDryRun, MinVersionDryRunRequest, PublicKeyQuery, PublicKeyResponse,
    ScheduleDeletionRequest, SetGrantsRequest,
};
use kms_client::api::{Gate, Grant};

use super::approvals::{self, ApprovalId, Gated};
use super::{blocking, ApiJson, AppState, AuditNote, Caller, KeyName, Used};
use crate::access::policy::Operation;
use crate::base::error::Error;
use crate::keyring::Clearance;

/// Shortest automatic rotation period accepted.
const MIN_ROTATION: Duration = Duration::from_secs(24 * 3600);
/// Longest automatic rotation period accepted.
const MAX_ROTATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses and bounds a key's automatic rotation period (`"90d"`): 1 day to 10 years.
pub fn rotation_period(text: Option<&str>) -> Result<Option<Duration>, Error> {
    let Some(text) = text else { return Ok(None) };
    let d = humantime::parse_duration(text).map_err(|_| {
        Error::InvalidRequest("rotation_period must be a duration such as \"90d\"".into())
    })?;
    if !(MIN_ROTATION..=MAX_ROTATION).contains(&d) {
        return Err(Error::InvalidRequest(
            "rotation_period must be between 1 day and 10 years".into(),
        ));
    }
    Ok(Some(d))
}

/// `POST /v1/keys` → 201 KeyInfo. A key created with grants gives itself to identities:
/// held for approval when the tenant's policy holds `grant`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<Gated<(StatusCode, Json<KeyInfo>)>, Error> {
    note.key(&req.name);
    caller.authorize(Operation::ManageKeys)?;
    crate::keyring::validate_name(&req.name)?;
    let period = rotation_period(req.rotation_period.as_deref())?;
    let algorithm = req.algorithm.unwrap_or_default();
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let gated = !req.grants.is_empty();
    let action = approvals::action("POST", "/v1/keys".into(), &req)?;
    let create = move || {
        st.keyring
            .create_key(&tenant, &req.name, algorithm, period, req.grants)
    };
    let answer = if gated {
        approvals::run(
            &state,
            &caller,
            Gate::Grant,
            action,
            approval,
            &note,
            create,
        )
        .await?
    } else {
        Gated::Ran(blocking(create).await?)
    };
    Ok(answer.map(|info| (StatusCode::CREATED, Json(info))))
}

/// `GET /v1/keys`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<KeyList>, Error> {
    caller.authorize(Operation::ReadKeys)?;
    let keys = blocking(move || state.keyring.list_keys(&caller.tenant)).await?;
    Ok(Json(KeyList { keys }))
}

/// `GET /v1/keys/{name}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ReadKeys)?;
    Ok(Json(state.keyring.key_info(&caller.tenant, &name)?))
}

/// `GET /v1/keys/{name}/public-key[?version=N]`: an RSA KEK version's public key (PEM and
/// JWK) for offline wrapping. Apps need a wrap or datakey grant; admins and auditors may
/// read it as metadata.
pub async fn public_key(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    query: Result<Query<PublicKeyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Used<Json<PublicKeyResponse>>, Error> {
    caller
        .authorize(Operation::UseKeys)
        .or_else(|_| caller.authorize(Operation::ReadKeys))?;
    let Query(q) = query.map_err(|e| Error::InvalidRequest(e.body_text()))?;
    let (info, version, der) = state.keyring.public_key(&caller, &name, q.version)?;
    let key = info.name.clone();
    Ok(Used::new(
        Json(public_key_response(info, version, &der)?),
        &key,
        version,
    ))
}

fn public_key_response(
    info: KeyInfo,
    version: u32,
    spki_der: &[u8],
) -> Result<PublicKeyResponse, Error> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    // Public-key encoding only: `rsa` never sees a private key in the server.
    let public = rsa::RsaPublicKey::from_public_key_der(spki_der)
        .map_err(|_| Error::Internal("RSA public key does not parse"))?;
    let pem = public
        .to_public_key_pem(LineEnding::LF)
        .map_err(|_| Error::Internal("RSA public key PEM encoding failed"))?;
    let kid = format!("{}:{version}", info.id);
    Ok(PublicKeyResponse {
        key: info.name,
        id: info.id,
        version,
        algorithm: info.algorithm,
        pem,
        jwk: Jwk {
            kty: "RSA".into(),
            n: URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            e: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            alg: "RSA-OAEP-256".into(),
            use_: "enc".into(),
            kid,
        },
    })
}

/// `POST /v1/keys/{name}/rotate`.
pub async fn rotate(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let info = blocking(move || state.keyring.rotate(&caller.tenant, &name)).await?;
    Ok(Json(info))
}

/// `POST /v1/keys/{name}/disable`.
pub async fn disable(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let st = state.clone();
    let identity = caller.identity.clone();
    let info = blocking(move || st.keyring.set_enabled(&caller.tenant, &name, false)).await?;
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::KeyDisabled,
        Some(&identity),
        info.name.clone(),
    ));
    Ok(Json(info))
}

/// `POST /v1/keys/{name}/enable`.
pub async fn enable(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let info = blocking(move || state.keyring.set_enabled(&caller.tenant, &name, true)).await?;
    Ok(Json(info))
}

/// `POST /v1/keys/{name}/schedule-deletion` (held for approval when the tenant's policy
/// holds `destroy`).
pub async fn schedule_deletion(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<ScheduleDeletionRequest>,
) -> Result<Gated<Json<KeyInfo>>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let action = approvals::action("POST", format!("/v1/keys/{name}/schedule-deletion"), &req)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let run = move || {
        st.keyring
            .schedule_deletion(&tenant, &name, req.pending_days, st.keyring.clock().now())
    };
    let info =
        match approvals::run(&state, &caller, Gate::Destroy, action, approval, &note, run).await? {
            Gated::Ran(info) => info,
            Gated::Pending(p) => return Ok(Gated::Pending(p)),
        };
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::KeyDeletionScheduled,
        Some(&caller.identity),
        format!(
            "{} (tenant {}) destroyed at {}",
            info.name,
            caller.tenant,
            info.deletion_date.as_deref().unwrap_or("?")
        ),
    ));
    Ok(Gated::Ran(Json(info)))
}

/// `POST /v1/keys/{name}/cancel-deletion`.
pub async fn cancel_deletion(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let info = blocking(move || state.keyring.cancel_deletion(&caller.tenant, &name)).await?;
    Ok(Json(info))
}

/// `PUT /v1/keys/{name}/min-decrypt-version` (raising it is held for approval when the
/// tenant's policy holds `min-decrypt-version`).
pub async fn min_decrypt_version(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<MinDecryptVersionRequest>,
) -> Result<Gated<Json<KeyInfo>>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let current = state.keyring.key_info(&caller.tenant, &name)?;
    let action = approvals::action("PUT", format!("/v1/keys/{name}/min-decrypt-version"), &req)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let version = req.version;
    let run = move |clearance| {
        move || {
            st.keyring
                .set_min_decrypt_version(&tenant, &name, version, clearance)
        }
    };
    let answer = if req.version > current.min_decrypt_version {
        let gate = Gate::MinDecryptVersion;
        let run = run(Clearance::Cleared);
        approvals::run(&state, &caller, gate, action, approval, &note, run).await?
    } else {
        Gated::Ran(
            blocking(run(
                approvals::clearance(&state, &caller, Gate::Grant).await?
            ))
            .await?,
        )
    };
    Ok(answer.map(Json))
}

/// `POST /v1/keys/{name}/min-decrypt-version/dry-run`: what a proposed
/// `min_decrypt_version` would have refused recently (read-only: admin or auditor).
pub async fn min_version_dry_run(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<MinVersionDryRunRequest>,
) -> Result<Json<MinVersionDryRun>, Error> {
    caller.authorize(Operation::ReadKeys)?;
    let days = req.window_days.unwrap_or(7);
    let report = state
        .keyring
        .min_version_dry_run(&caller.tenant, &name, req.version, days)?;
    Ok(Json(report))
}

/// Whether `grants` give the key to an identity its grants (`info`'s) do not name yet
/// (checked again at the stored record: [`Clearance`]).
fn adds_identity(info: &KeyInfo, grants: &[Grant]) -> bool {
    grants
        .iter()
        .any(|g| !info.grants.iter().any(|old| old.identity == g.identity))
}

/// `PUT /v1/keys/{name}/grants`: replaces the grants (held for approval when they name a
/// new identity and the tenant's policy holds `grant`).
pub async fn set_grants(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<SetGrantsRequest>,
) -> Result<Gated<Json<KeyInfo>>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let current = state.keyring.key_info(&caller.tenant, &name)?;
    let new_identity = adds_identity(&current, &req.grants);
    let action = approvals::action("PUT", format!("/v1/keys/{name}/grants"), &req)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let run = move |clearance| move || st.keyring.set_grants(&tenant, &name, req.grants, clearance);
    let answer = if new_identity {
        let run = run(Clearance::Cleared);
        approvals::run(&state, &caller, Gate::Grant, action, approval, &note, run).await?
    } else {
        Gated::Ran(
            blocking(run(
                approvals::clearance(&state, &caller, Gate::Grant).await?
            ))
            .await?,
        )
    };
    Ok(answer.map(Json))
}

/// `PATCH /v1/keys/{name}/grants`: removes and adds grants in one atomic change (see
/// [`EditGrantsRequest`]), so concurrent edits by two operators both hold (held for
/// approval when it adds a new identity and the tenant's policy holds `grant`).
pub async fn edit_grants(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<EditGrantsRequest>,
) -> Result<Gated<Json<KeyInfo>>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let current = state.keyring.key_info(&caller.tenant, &name)?;
    let new_identity = adds_identity(&current, &req.add);
    let action = approvals::action("PATCH", format!("/v1/keys/{name}/grants"), &req)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let run = move |clearance| {
        move || {
            st.keyring
                .edit_grants(&tenant, &name, req.add, &req.remove, clearance)
        }
    };
    let answer = if new_identity {
        let run = run(Clearance::Cleared);
        approvals::run(&state, &caller, Gate::Grant, action, approval, &note, run).await?
    } else {
        Gated::Ran(
            blocking(run(approvals::clearance(
                &state,
                &caller,
                Gate::MinDecryptVersion,
            )
            .await?))
            .await?,
        )
    };
    Ok(answer.map(Json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_period_bounds() {
        assert_eq!(rotation_period(None).unwrap(), None);
        assert_eq!(
            rotation_period(Some("90d")).unwrap(),
            Some(Duration::from_secs(90 * 86400))
        );
        assert!(rotation_period(Some("1h")).is_err());
        assert!(rotation_period(Some("soon")).is_err());
        assert!(rotation_period(Some("20y")).is_err());
    }
}
