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

use super::{blocking, ApiJson, AppState, AuditNote, Caller, KeyName, Used};
use crate::access::policy::Operation;
use crate::base::error::Error;

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

/// `POST /v1/keys` → 201 KeyInfo.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    note: AuditNote,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, Json<KeyInfo>), Error> {
    note.key(&req.name);
    caller.authorize(Operation::ManageKeys)?;
    crate::keyring::validate_name(&req.name)?;
    let period = rotation_period(req.rotation_period.as_deref())?;
    let algorithm = req.algorithm.unwrap_or_default();
    let info = blocking(move || {
        state
            .keyring
            .create_key(&caller.tenant, &req.name, algorithm, period, req.grants)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
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

/// `POST /v1/keys/{name}/schedule-deletion`.
pub async fn schedule_deletion(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<ScheduleDeletionRequest>,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let info = blocking(move || {
        st.keyring
            .schedule_deletion(&tenant, &name, req.pending_days, st.keyring.clock().now())
    })
    .await?;
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
    Ok(Json(info))
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

/// `PUT /v1/keys/{name}/min-decrypt-version`.
pub async fn min_decrypt_version(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<MinDecryptVersionRequest>,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let info = blocking(move || {
        state
            .keyring
            .set_min_decrypt_version(&caller.tenant, &name, req.version)
    })
    .await?;
    Ok(Json(info))
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

/// `PUT /v1/keys/{name}/grants`: replaces the grants.
pub async fn set_grants(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<SetGrantsRequest>,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let info =
        blocking(move || state.keyring.set_grants(&caller.tenant, &name, req.grants)).await?;
    Ok(Json(info))
}

/// `PATCH /v1/keys/{name}/grants`: removes and adds grants in one atomic change (see
/// [`EditGrantsRequest`]), so concurrent edits by two operators both hold.
pub async fn edit_grants(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    KeyName(name): KeyName,
    ApiJson(req): ApiJson<EditGrantsRequest>,
) -> Result<Json<KeyInfo>, Error> {
    caller.authorize(Operation::ManageKeys)?;
    let info = blocking(move || {
        state
            .keyring
            .edit_grants(&caller.tenant, &name, req.add, &req.remove)
    })
    .await?;
    Ok(Json(info))
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
