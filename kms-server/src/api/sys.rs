//! System: the service (sys role: seal, unseal, backup, master-key rotation, every
//! tenant's lockouts), and a tenant's own (admin role: its runtime identity policy, its
//! identities' lockouts). The seal status is for both.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kms_client::api::{
    Gate, IdentityList, LiftLockoutRequest, LiftLockoutResponse, LockoutInfo, LockoutList,
    RemoveIdentityRequest, SetIdentityRequest, SysStatus, UnsealProgress, UnsealRequest,
};

use super::approvals::{self, ApprovalId, Gated};
use super::{blocking, ApiJson, AppState, AuditNote, Caller};
use crate::access::policy::Operation;
use crate::base::error::Error;
use crate::crypto::seal::{SealError, SealMethod, ShamirSealer, ShareInput};

fn status_of(state: &AppState) -> SysStatus {
    let sealed = state.keyring.is_sealed();
    let unseal_progress = match (sealed, state.settings.seal_method) {
        (true, SealMethod::Shamir) => state
            .keyring
            .sealed_master_key()
            .ok()
            .flatten()
            .and_then(|s| s.shamir)
            .map(|p| UnsealProgress {
                received: u8::try_from(
                    state
                        .pending_shares
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .len(),
                )
                .unwrap_or(u8::MAX),
                threshold: p.threshold,
            }),
        _ => None,
    };
    SysStatus {
        sealed,
        seal_method: state.settings.seal_method.as_str().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        unseal_progress,
        process: Some(crate::base::process::current()),
        cluster: state
            .cluster
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
    }
}

/// Takes one Shamir share: refused when malformed, of another set or a duplicate; once
/// the threshold is reached, unseals with the shares received (all discarded either way).
fn accept_share(state: &AppState, text: &str) -> Result<(), Error> {
    if state.settings.seal_method != SealMethod::Shamir {
        return Err(Error::InvalidRequest(
            "this server is not sealed with shares".into(),
        ));
    }
    if !state.keyring.is_sealed() {
        return Ok(());
    }
    let params = state
        .keyring
        .sealed_master_key()?
        .and_then(|s| s.shamir)
        .ok_or(Error::Corrupt("sealed master key without share parameters"))?;
    let share = ShareInput::parse(text)?;
    if share.set() != params.set {
        return Err(SealError::BadShare("a share of another set").into());
    }
    let ready = {
        let mut pending = state
            .pending_shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.iter().any(|s| s.x() == share.x()) {
            return Err(SealError::BadShare("this share was already given").into());
        }
        pending.push(share);
        if pending.len() < usize::from(params.threshold) {
            return Ok(());
        }
        std::mem::take(&mut *pending)
    };
    let sealer = ShamirSealer::from_shares(ready);
    state.keyring.unseal(&sealer)
}

/// A wrong passphrase or unseal share counts toward the caller's lockout, as a denial
/// does: guessing is not free.
fn count_bad_secret(state: &Arc<AppState>, identity: &str, e: &Error) {
    if matches!(
        e,
        Error::Seal(
            crate::crypto::seal::SealError::WrongSecret(_)
                | crate::crypto::seal::SealError::BadShare(_)
        )
    ) {
        crate::api::count_failure(state, identity);
    }
}

/// Whether `identity` belongs to `tenant` (an identity that maps to no tenant belongs to
/// none: only the sys role sees it).
fn in_tenant(state: &AppState, identity: &str, tenant: &str) -> bool {
    state
        .policy
        .resolve(identity)
        .is_ok_and(|p| p.tenant == tenant)
}

/// `GET /v1/sys/status`.
pub async fn status(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<SysStatus>, Error> {
    caller.authorize(Operation::Status)?;
    Ok(Json(status_of(&state)))
}

/// `POST /v1/sys/unseal`: with a passphrase for the passphrase method, or with an empty
/// object to retry the configured source (key file, passphrase file).
pub async fn unseal(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<UnsealRequest>,
) -> Result<Json<SysStatus>, Error> {
    caller.authorize(Operation::Service)?;
    let was_sealed = state.keyring.is_sealed();
    let st = state.clone();
    if let Some(share) = req.share {
        blocking(move || accept_share(&st, share.expose_secret()))
            .await
            .inspect_err(|e| count_bad_secret(&state, &caller.identity, e))?;
        if state.keyring.is_sealed() || !was_sealed {
            return Ok(Json(status_of(&state)));
        }
    } else {
        let passphrase = req
            .passphrase
            .map(|p| zeroize::Zeroizing::new(p.expose_secret().to_owned()));
        blocking(move || {
            let sealer = (st.sealer)(passphrase);
            st.keyring.unseal(sealer.as_ref())
        })
        .await
        .inspect_err(|e| count_bad_secret(&state, &caller.identity, e))?;
    }
    tracing::warn!(identity = %caller.identity, "server unsealed");
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::Unsealed,
        Some(&caller.identity),
        "POST /v1/sys/unseal",
    ));
    Ok(Json(status_of(&state)))
}

/// `POST /v1/sys/seal`: wipes the master key and every KEK from memory, and any unseal
/// shares received so far (so, while sealed, it resets a Shamir unseal in progress).
pub async fn seal(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<SysStatus>, Error> {
    caller.authorize(Operation::Service)?;
    state.keyring.seal();
    state
        .pending_shares
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    tracing::warn!(identity = %caller.identity, "server sealed");
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::Sealed,
        Some(&caller.identity),
        "POST /v1/sys/seal",
    ));
    Ok(Json(status_of(&state)))
}

/// `GET /v1/sys/lockouts`: identities locked out now.
pub async fn lockouts(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<LockoutList>, Error> {
    let every_tenant = caller.authorize(Operation::Service).is_ok();
    if !every_tenant {
        caller.authorize(Operation::System)?;
    }
    let lockouts = state
        .lockouts
        .list()
        .into_iter()
        .filter(|(identity, _)| every_tenant || in_tenant(&state, identity, &caller.tenant))
        .map(|(identity, seconds_left)| LockoutInfo {
            identity,
            seconds_left,
        })
        .collect();
    Ok(Json(LockoutList { lockouts }))
}

/// `POST /v1/sys/lockouts/lift`: lets a locked-out identity in again.
pub async fn lift_lockout(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<LiftLockoutRequest>,
) -> Result<Json<LiftLockoutResponse>, Error> {
    if caller.authorize(Operation::Service).is_err() {
        caller.authorize(Operation::System)?;
        if !in_tenant(&state, &req.identity, &caller.tenant) {
            return Err(Error::PermissionDenied(
                "an admin lifts the lockouts of its own tenant's identities (the sys role lifts any)",
            ));
        }
    }
    let identity = req.identity.clone();
    let s = state.clone();
    let lifted = crate::api::blocking(move || s.lockouts.lift(&identity)).await?;
    tracing::warn!(identity = %caller.identity, lifted_for = %req.identity, lifted, "lockout lifted");
    Ok(Json(LiftLockoutResponse { lifted }))
}

/// `GET /v1/sys/identities`: the caller's tenant's identities and roles.
pub async fn identities(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<IdentityList>, Error> {
    caller.authorize(Operation::System)?;
    Ok(Json(IdentityList {
        identities: state.policy.list(&caller.tenant),
    }))
}

/// `PUT /v1/sys/identities`: maps an identity to a role in the caller's tenant.
pub async fn set_identity(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<SetIdentityRequest>,
) -> Result<Gated<Json<IdentityList>>, Error> {
    caller.authorize(Operation::System)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let identity = req.identity.clone();
    let role = req.role;
    let set = move || st.policy.set(&tenant, &identity, role);
    // A new admin is a new approver: held when the tenant's policy holds `identity`.
    if role == kms_client::api::Role::Admin {
        let action = approvals::action("PUT", "/v1/sys/identities".into(), &req)?;
        let gate = Gate::Identity;
        if let Gated::Pending(p) =
            approvals::run(&state, &caller, gate, action, approval, &note, set).await?
        {
            return Ok(Gated::Pending(p));
        }
    } else {
        blocking(set).await?;
    }
    tracing::warn!(by = %caller.identity, identity = %req.identity, role = ?req.role, "identity mapped");
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::IdentityChanged,
        Some(&caller.identity),
        format!(
            "{} is now {:?} in tenant {}",
            req.identity, req.role, caller.tenant
        ),
    ));
    Ok(Gated::Ran(Json(IdentityList {
        identities: state.policy.list(&caller.tenant),
    })))
}

/// `POST /v1/sys/identities/remove`: removes a runtime identity of the caller's tenant.
pub async fn remove_identity(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<RemoveIdentityRequest>,
) -> Result<Json<IdentityList>, Error> {
    caller.authorize(Operation::System)?;
    let st = state.clone();
    let tenant = caller.tenant.clone();
    let by = caller.identity.clone();
    let identity = req.identity.clone();
    blocking(move || st.policy.remove(&tenant, &identity, &by)).await?;
    tracing::warn!(by = %caller.identity, identity = %req.identity, "identity removed");
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::IdentityChanged,
        Some(&caller.identity),
        format!("{} removed from tenant {}", req.identity, caller.tenant),
    ));
    Ok(Json(IdentityList {
        identities: state.policy.list(&caller.tenant),
    }))
}

/// `GET /v1/sys/backup`: an encrypted, integrity-checked export of the keys (see
/// [`crate::keyring::backup`]).
pub async fn backup(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    approval: ApprovalId,
    note: AuditNote,
) -> Result<Gated<Json<crate::keyring::backup::Backup>>, Error> {
    caller.authorize(Operation::Service)?;
    let action = approvals::action("GET", "/v1/sys/backup".into(), &serde_json::Value::Null)?;
    let st = state.clone();
    let export = move || crate::keyring::backup::export(&st.keyring);
    let gate = Gate::BackupExport;
    let answer = approvals::run(&state, &caller, gate, action, approval, &note, export).await?;
    if let Gated::Ran(_) = answer {
        tracing::warn!(identity = %caller.identity, "backup exported");
    }
    Ok(answer.map(Json))
}

/// `POST /v1/sys/rotate-master`: a new master key; every KEK version re-sealed under it in
/// one transaction (see [`crate::keyring::Keyring::rotate_master`]).
pub async fn rotate_master(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<kms_client::api::RotateMasterRequest>,
) -> Result<Gated<Json<kms_client::api::RotateMasterResponse>>, Error> {
    caller.authorize(Operation::Service)?;
    let passphrase = req
        .passphrase
        .map(|p| zeroize::Zeroizing::new(p.expose_secret().to_owned()));
    // The passphrase is never kept with a request: it is sent again when it runs.
    let action = approvals::action(
        "POST",
        "/v1/sys/rotate-master".into(),
        &serde_json::json!({}),
    )?;
    let st = state.clone();
    let rotate = move || {
        let sealer = (st.sealer)(passphrase);
        st.keyring.rotate_master(sealer.as_ref())
    };
    let gate = Gate::RotateMaster;
    let n = match approvals::run(&state, &caller, gate, action, approval, &note, rotate)
        .await
        .inspect_err(|e| count_bad_secret(&state, &caller.identity, e))?
    {
        Gated::Ran(n) => n,
        Gated::Pending(p) => return Ok(Gated::Pending(p)),
    };
    tracing::warn!(identity = %caller.identity, versions = n, "master key rotated");
    state.alerts.raise(crate::security::alert::AlertEvent::new(
        crate::base::event::AlertKind::MasterKeyRotated,
        Some(&caller.identity),
        format!("{n} KEK versions re-sealed"),
    ));
    Ok(Gated::Ran(Json(kms_client::api::RotateMasterResponse {
        versions_resealed: n as u64,
    })))
}

/// `GET /v1/sys/brake`: the exfiltration brake's mode and the holds in force on this node
/// (the caller's tenant's for an admin; every tenant's for `sys`).
pub async fn brake(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<kms_client::api::BrakeStatus>, Error> {
    use crate::access::brake::{Action, Mode, Subject};
    use kms_client::api::{BrakeHold, BrakeStatus, BrakeSubject};
    let every_tenant = caller.authorize(Operation::Service).is_ok();
    if !every_tenant {
        caller.authorize(Operation::System)?;
    }
    let Some(brake) = state.keyring.brake() else {
        return Ok(Json(BrakeStatus {
            mode: "off".into(),
            action: "hold".into(),
            holds: Vec::new(),
        }));
    };
    let tenant = (!every_tenant).then_some(caller.tenant.as_str());
    let holds = brake
        .holds(tenant)
        .into_iter()
        .map(|h| {
            let (kind, tenant, name) = match h.subject {
                Subject::Identity { tenant, identity } => {
                    (BrakeSubject::Identity, tenant, identity)
                }
                Subject::Key { tenant, key } => (BrakeSubject::Key, tenant, key),
            };
            BrakeHold {
                kind,
                tenant,
                name,
                held_secs: h.held_for.as_secs(),
            }
        })
        .collect();
    let settings = brake.settings();
    Ok(Json(BrakeStatus {
        mode: match settings.mode {
            Mode::Off => "off",
            Mode::DryRun => "dry-run",
            Mode::Enforce => "enforce",
        }
        .into(),
        action: match settings.action {
            Action::Hold => "hold",
            Action::Throttle => "throttle",
        }
        .into(),
        holds,
    }))
}

/// `POST /v1/sys/brake/release`: lifts the brake's hold on an identity or a key of the
/// caller's tenant (admin), its budgets full again.
pub async fn release_brake(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<kms_client::api::ReleaseBrakeRequest>,
) -> Result<Json<kms_client::api::ReleaseBrakeResponse>, Error> {
    use crate::access::brake::Subject;
    caller.authorize(Operation::System)?;
    let tenant = caller.tenant.clone();
    let subject = match (req.identity, req.key) {
        (Some(identity), None) => Subject::Identity { tenant, identity },
        (None, Some(key)) => Subject::Key { tenant, key },
        _ => return Err(Error::InvalidRequest("give one of identity or key".into())),
    };
    let released = state.keyring.brake().is_some_and(|b| b.release(&subject));
    if released {
        tracing::warn!(by = %caller.identity, %subject, "exfiltration brake hold released");
    }
    Ok(Json(kms_client::api::ReleaseBrakeResponse { released }))
}
