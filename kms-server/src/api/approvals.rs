//! Dual control on the native API (`docs/approvals.md`): the routes that list, show,
//! approve and deny requests and set the approval policies, and [`run`], through which
//! every operation a policy can hold passes before it runs.
//!
//! A held operation sent without the `Keyhold-Approval` header is not run: it is recorded
//! as a request and answered 202 with the request ([`Gated::Pending`]). Once enough other
//! operators approved it, its requester sends the same operation again with the request's
//! id in the header; [`run`] marks the request run (once: a compare-and-set), runs it,
//! then records the outcome.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kms_client::api::{
    ApprovalAction, ApprovalInfo, ApprovalList, ApprovalPending, ApprovalPolicies, ApprovalPolicy,
    ApprovalScope, DecideRequest, Gate, SetApprovalPolicyRequest, APPROVAL_HEADER,
};
use serde::Serialize;

use super::{blocking, ApiJson, AppState, AuditNote, Caller};
use crate::access::approvals::{scope_of, Approvals};
use crate::access::policy::{Operation, Principal};
use crate::base::error::Error;
use crate::base::event::AlertKind;
use crate::keyring::Clearance;
use crate::security::alert::AlertEvent;

/// The approval records of the server's store, as of now.
fn ledger(state: &AppState) -> Approvals<'_> {
    Approvals {
        store: state.keyring.store().as_ref(),
        signer: &*state.keyring,
        now: state.keyring.clock().now(),
    }
}

/// The `Keyhold-Approval` header of a request: the id of the approved request it runs.
pub struct ApprovalId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ApprovalId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(APPROVAL_HEADER) else {
            return Ok(Self(None));
        };
        let id = value
            .to_str()
            .ok()
            .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "{APPROVAL_HEADER} must be an approval request's id (32 hex digits)"
                ))
            })?;
        Ok(Self(Some(id.to_ascii_lowercase())))
    }
}

/// The answer of an operation a policy may hold: its own, or 202 with the request.
pub enum Gated<T> {
    /// It ran.
    Ran(T),
    /// It waits for approvals.
    Pending(Box<ApprovalPending>),
}

impl<T> Gated<T> {
    /// The answer of a run, changed by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Gated<U> {
        match self {
            Gated::Ran(t) => Gated::Ran(f(t)),
            Gated::Pending(p) => Gated::Pending(p),
        }
    }
}

impl<T: IntoResponse> IntoResponse for Gated<T> {
    fn into_response(self) -> Response {
        match self {
            Gated::Ran(t) => t.into_response(),
            Gated::Pending(p) => (StatusCode::ACCEPTED, Json(*p)).into_response(),
        }
    }
}

/// What [`gate_in`] decided.
enum Decision {
    /// Run it; finish the ticket with the outcome.
    Go(Ticket),
    /// It now waits for approvals: the request.
    Wait(Box<ApprovalPending>),
}

impl Decision {
    /// The ticket to run, or the handler's 202 answer.
    fn ticket<T>(self) -> Result<Ticket, Gated<T>> {
        match self {
            Decision::Go(t) => Ok(t),
            Decision::Wait(p) => Err(Gated::Pending(p)),
        }
    }
}

/// A run the approvals allowed: the request it redeemed, if the policy held it.
#[must_use = "finish the ticket with the operation's outcome"]
struct Ticket(Option<String>);

impl Ticket {
    /// Records how the run went on its request (and alerts `approval_executed`).
    async fn finish<T>(self, state: &Arc<AppState>, who: &Principal, result: &Result<T, Error>) {
        let Some(id) = self.0 else { return };
        let outcome = match result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        state.alerts.raise(AlertEvent::new(
            AlertKind::ApprovalExecuted,
            Some(&who.identity),
            format!("approval request {id} ran: {outcome}"),
        ));
        let st = state.clone();
        let recorded = blocking(move || ledger(&st).finish(&id, outcome).map(|_| ())).await;
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "the outcome of an approved request was not recorded");
        }
    }
}

/// The action a request describes: method, path and the request's body as parsed (so
/// that the same operation sent again, however its JSON is spaced, is the same action).
pub fn action(method: &str, path: String, body: &impl Serialize) -> Result<ApprovalAction, Error> {
    Ok(ApprovalAction {
        method: method.to_owned(),
        path,
        body: serde_json::to_value(body)
            .map_err(|_| Error::Internal("request serialization failed"))?,
    })
}

/// Runs `f` (on a blocking thread) through the approval policy: at once if the policy does not hold
/// `operation`, once approved if it does (recording the outcome), or not yet (202).
pub async fn run<T: Send + 'static>(
    state: &Arc<AppState>,
    who: &Principal,
    operation: Gate,
    action: ApprovalAction,
    approval: ApprovalId,
    note: &AuditNote,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<Gated<T>, Error> {
    run_in(
        state,
        who,
        scope_of(operation),
        operation,
        action,
        approval,
        note,
        f,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run_in<T: Send + 'static>(
    state: &Arc<AppState>,
    who: &Principal,
    scope: ApprovalScope,
    operation: Gate,
    action: ApprovalAction,
    approval: ApprovalId,
    note: &AuditNote,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<Gated<T>, Error> {
    let decision = gate_in(state, who, scope, operation, action, approval, note).await?;
    let ticket = match decision.ticket() {
        Ok(t) => t,
        Err(pending) => return Ok(pending),
    };
    let result = blocking(f).await;
    ticket.finish(state, who, &result).await;
    result.map(Gated::Ran)
}

/// How a tenant's change that does not seem to need approval runs: checked at the stored
/// record when the tenant's policy holds `operation` (so that a change of the key in
/// between cannot slip past it), as asked otherwise.
pub async fn clearance(
    state: &Arc<AppState>,
    who: &Principal,
    operation: Gate,
) -> Result<Clearance, Error> {
    let held = held(state, who, ApprovalScope::Tenant, operation).await?;
    Ok(if held.is_some() {
        Clearance::Uncleared
    } else {
        Clearance::Cleared
    })
}

/// Whether `operation` of `scope` waits for approvals for `who`: the policy that holds it
/// (a blocking store read: [`held`] off the runtime's threads).
pub fn holding(
    state: &AppState,
    who: &Principal,
    scope: ApprovalScope,
    operation: Gate,
) -> Result<Option<ApprovalPolicy>, Error> {
    let policy = ledger(state).policy(scope, &who.tenant)?;
    Ok(policy.filter(|p| p.operations.contains(&operation)))
}

/// [`holding`], on a blocking thread.
pub async fn held(
    state: &Arc<AppState>,
    who: &Principal,
    scope: ApprovalScope,
    operation: Gate,
) -> Result<Option<ApprovalPolicy>, Error> {
    let st = state.clone();
    let who = who.clone();
    blocking(move || holding(&st, &who, scope, operation)).await
}

/// Passes `operation` (`action`, by `who`) through its scope's approval policy: runs
/// freely if the policy does not hold it; else records a request (no approval id) or
/// redeems an approved one (`approval`).
async fn gate_in(
    state: &Arc<AppState>,
    who: &Principal,
    scope: ApprovalScope,
    operation: Gate,
    action: ApprovalAction,
    approval: ApprovalId,
    note: &AuditNote,
) -> Result<Decision, Error> {
    let Some(policy) = held(state, who, scope, operation).await? else {
        return Ok(Decision::Go(Ticket(None)));
    };
    let st = state.clone();
    let caller = who.clone();
    match approval.0 {
        None => {
            let info =
                blocking(move || ledger(&st).request(&caller, scope, operation, action, &policy))
                    .await?;
            note.attribute("approval", info.id.clone());
            note.attribute("approval_status", "requested".into());
            state.alerts.raise(AlertEvent::new(
                AlertKind::ApprovalRequested,
                Some(&who.identity),
                format!(
                    "{} {} waits for {} approvals (request {})",
                    info.action.method, info.action.path, info.required, info.id
                ),
            ));
            Ok(Decision::Wait(Box::new(ApprovalPending {
                message: format!(
                    "{} needs {} approvals by other operators: they run `kmsctl approvals approve {}`; then send it again with --approval {}",
                    operation.as_str(),
                    info.required,
                    info.id,
                    info.id
                ),
                approval: info,
            })))
        }
        Some(id) => {
            note.attribute("approval", id.clone());
            let info =
                blocking(move || ledger(&st).claim(&caller, &id, operation, &action)).await?;
            note.attribute("approval_status", "executed".into());
            Ok(Decision::Go(Ticket(Some(info.id))))
        }
    }
}

/// `GET /v1/approvals`: the requests the caller may read (its tenant's for admins and
/// auditors, the service's for `sys`), newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<ApprovalList>, Error> {
    let approvals = blocking(move || ledger(&state).list(&caller)).await?;
    Ok(Json(ApprovalList { approvals }))
}

/// `GET /v1/approvals/{id}`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Json<ApprovalInfo>, Error> {
    let info = blocking(move || ledger(&state).show(&caller, &id)).await?;
    Ok(Json(info))
}

async fn decide(
    state: Arc<AppState>,
    caller: Principal,
    id: String,
    approve: bool,
    req: DecideRequest,
    note: AuditNote,
) -> Result<Json<ApprovalInfo>, Error> {
    note.attribute("approval", id.clone());
    let st = state.clone();
    let who = caller.clone();
    let info = blocking(move || ledger(&st).decide(&who, &id, approve, req.reason)).await?;
    let verdict = if approve { "approved" } else { "denied" };
    note.attribute("approval_status", verdict.into());
    state.alerts.raise(AlertEvent::new(
        AlertKind::ApprovalDecided,
        Some(&caller.identity),
        format!(
            "{verdict} request {} ({} {} by {}): {} of {} approvals",
            info.id,
            info.action.method,
            info.action.path,
            info.requested_by,
            info.approvals.len(),
            info.required
        ),
    ));
    Ok(Json(info))
}

/// `POST /v1/approvals/{id}/approve`.
pub async fn approve(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    note: AuditNote,
    ApiJson(req): ApiJson<DecideRequest>,
) -> Result<Json<ApprovalInfo>, Error> {
    decide(state, caller, id, true, req, note).await
}

/// `POST /v1/approvals/{id}/deny`.
pub async fn deny(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    note: AuditNote,
    ApiJson(req): ApiJson<DecideRequest>,
) -> Result<Json<ApprovalInfo>, Error> {
    decide(state, caller, id, false, req, note).await
}

/// `GET /v1/approvals/policy`: the caller's tenant's policy and the service's.
pub async fn policies(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<ApprovalPolicies>, Error> {
    caller
        .authorize(Operation::ReadKeys)
        .or_else(|_| caller.authorize(Operation::Service))?;
    let policies = blocking(move || {
        let ledger = ledger(&state);
        Ok(ApprovalPolicies {
            tenant: ledger.policy(ApprovalScope::Tenant, &caller.tenant)?,
            service: ledger.policy(ApprovalScope::Service, &caller.tenant)?,
        })
    })
    .await?;
    Ok(Json(policies))
}

/// `PUT /v1/approvals/policy`: sets a tenant's policy (its admins) or the service's
/// (`sys`); held for approval when the policy in force holds `policy`.
pub async fn set_policy(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    approval: ApprovalId,
    note: AuditNote,
    ApiJson(req): ApiJson<SetApprovalPolicyRequest>,
) -> Result<Gated<Json<ApprovalPolicies>>, Error> {
    caller.authorize(match req.scope {
        ApprovalScope::Tenant => Operation::System,
        ApprovalScope::Service => Operation::Service,
    })?;
    if let Some(p) = &req.policy {
        crate::access::approvals::validate(req.scope, p)?;
    }
    let action = action("PUT", "/v1/approvals/policy".into(), &req)?;
    let scope = req.scope;
    let st = state.clone();
    let who = caller.clone();
    let answer = run_in(
        &state,
        &caller,
        scope,
        Gate::Policy,
        action,
        approval,
        &note,
        move || {
            let ledger = ledger(&st);
            ledger.set_policy(scope, &who.tenant, req.policy)?;
            Ok(ApprovalPolicies {
                tenant: ledger.policy(ApprovalScope::Tenant, &who.tenant)?,
                service: ledger.policy(ApprovalScope::Service, &who.tenant)?,
            })
        },
    )
    .await?;
    if let Gated::Ran(_) = answer {
        tracing::warn!(identity = %caller.identity, ?scope, "approval policy changed");
    }
    Ok(answer.map(Json))
}
