//! How a request ends, on every listener: the one completion path.
//!
//! The native API ([`track`], a middleware on its router), the adapters of the public
//! listener ([`AppState::finish_call`]), the XKS listener, and the listeners that do not
//! speak HTTP (KMIP, the Kubernetes plugin: [`AppState::complete_call`]) each describe what
//! a request did as a [`Completion`] and hand it to [`AppState::complete`], which, in this
//! order:
//! raises the denial's alert and feeds the lockout counter, writes the audit record and
//! waits until it is durable (when it cannot be written the answer is withheld and the
//! listener's "unavailable" answer leaves instead), counts and times the request by
//! route and outcome, sets `x-request-id`, and logs one line (ids and codes, never
//! bodies). No listener writes an audit record, a metric or a request log line any other
//! way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kms_client::api::ErrorCode;

use super::{AppState, AuditNote, PeerIdentity, RequestId};
use crate::access::policy::Principal;
use crate::base::error::Error;
use crate::base::event::AlertKind;
use crate::security::alert::AlertEvent;
use crate::security::audit::AuditDraft;

/// What a request did, as its listener reports it.
#[derive(Debug)]
pub struct Completion {
    /// The request id (from [`AppState::next_request_id`]).
    pub id: u64,
    /// When the request began.
    pub started: Instant,
    /// The HTTP method.
    pub method: String,
    /// The metrics route (`/v1/unwrap`, `dke decrypt`, `xks encrypt`).
    pub route: String,
    /// The audit operation (`POST /v1/unwrap`, `DKE decrypt`, `XKS Encrypt`).
    pub operation: String,
    /// Who asked.
    pub identity: Option<String>,
    /// The tenant it acted in.
    pub tenant: Option<String>,
    /// The key reached, its version, and the keyed hash of the context.
    pub key: Option<String>,
    /// The key version used.
    pub version: Option<u32>,
    /// The keyed context hash.
    pub context_hash: Option<String>,
    /// What else the record says (the protocol's facts, a batch's items).
    pub attributes: Option<BTreeMap<String, String>>,
    /// `ok` or the error's name.
    pub outcome: String,
    /// A refusal to alert on (and maybe count toward a lockout).
    pub denial: Option<Denial>,
    /// A use of a key that changes nothing ([`AuditDraft::key_use`]): wrap, unwrap, a
    /// protocol's encrypt or decrypt. Key changes and administration are `false`.
    pub key_use: bool,
}

/// The native routes that use a key and change nothing: in bounded-lag mode their audit
/// records may be answered before they are flushed ([`AuditDraft::key_use`]).
/// (The Transit-compatible routes of `adapters::transit` are merged into this router.)
const KEY_USE_ROUTES: [&str; 10] = [
    "/v1/keys/{name}/datakey",
    "/v1/keys/{name}/wrap",
    "/v1/keys/{name}/public-key",
    "/v1/unwrap",
    "/v1/rewrap",
    "/v1/batch",
    "/v1/transit/encrypt/{name}",
    "/v1/transit/decrypt/{name}",
    "/v1/transit/rewrap/{name}",
    "/v1/transit/datakey/{kind}/{name}",
];

/// A refusal the completion reports as a security event.
#[derive(Debug)]
pub struct Denial {
    /// The event's kind.
    pub kind: AlertKind,
    /// Whom it concerns (an identity, a revoked certificate), when known.
    pub who: Option<String>,
    /// What was refused.
    pub detail: String,
    /// Whether it counts toward `who`'s lockout.
    pub counts_toward_lockout: bool,
}

impl AppState {
    /// Finishes a request: alert and lockout feed, the durable audit record (else
    /// `unavailable(error)` is answered instead of `resp`), metrics, `x-request-id`, the
    /// log line.
    pub async fn complete(
        self: &Arc<Self>,
        done: Completion,
        mut resp: Response,
        unavailable: impl FnOnce(Error) -> Response,
    ) -> Response {
        if let Some(denial) = &done.denial {
            self.alerts.raise(AlertEvent::new(
                denial.kind,
                denial.who.as_deref(),
                denial.detail.clone(),
            ));
            if let (true, Some(who)) = (denial.counts_toward_lockout, &denial.who) {
                count_failure(self, who);
            }
        }
        let elapsed = done.started.elapsed();
        let draft = AuditDraft {
            request_id: done.id,
            identity: done.identity.clone(),
            tenant: done.tenant,
            operation: done.operation,
            key: done.key,
            version: done.version,
            context_hash: done.context_hash,
            outcome: done.outcome.clone(),
            status: resp.status().as_u16(),
            latency_us: elapsed.as_micros() as u64,
            attributes: done.attributes,
            key_use: done.key_use,
        };
        if let Err(e) = self.audit.append(draft).await {
            // Fail closed: nothing unaudited leaves, whatever the handler produced.
            tracing::error!(error = %e, route = %done.route, "the audit record could not be written; response withheld");
            resp = unavailable(e);
        }
        self.metrics
            .observe(&done.route, &done.method, &done.outcome, elapsed);
        if let Ok(v) = HeaderValue::from_str(&done.id.to_string()) {
            resp.headers_mut().insert("x-request-id", v);
        }
        tracing::info!(
            request_id = done.id,
            method = %done.method,
            route = %done.route,
            status = resp.status().as_u16(),
            outcome = %done.outcome,
            identity = done.identity.as_deref().unwrap_or("-"),
            micros = elapsed.as_micros() as u64,
            "request"
        );
        resp
    }

    /// Finishes a call of a listener that answers in its own protocol, not HTTP (KMIP, the
    /// Kubernetes KMS plugin), through [`AppState::complete`]; `status` stands for its
    /// outcome in the metrics. Whether the audit record was written: when it was not, the
    /// caller answers its protocol's "unavailable" and nothing else.
    pub async fn complete_call(self: &Arc<Self>, done: Completion, status: StatusCode) -> bool {
        let mut marker = Response::default();
        *marker.status_mut() = status;
        let answered = self
            .complete(done, marker, |_| {
                let mut r = Response::default();
                r.extensions_mut().insert(Unrecorded);
                r
            })
            .await;
        answered.extensions().get::<Unrecorded>().is_none()
    }

    /// Finishes a protocol adapter's call through [`AppState::complete`]: the adapter acts
    /// as its configured principal; `unavailable()` is its protocol's answer when the
    /// audit trail cannot take the record.
    pub async fn finish_call(
        self: &Arc<Self>,
        call: AdapterCall<'_>,
        resp: Response,
        unavailable: impl FnOnce() -> Response,
    ) -> Response {
        let outcome = if resp.status().is_success() {
            "ok".to_owned()
        } else {
            resp.status().as_u16().to_string()
        };
        let done = Completion {
            id: self.next_request_id(),
            started: call.started,
            method: call.method.to_owned(),
            route: call.route,
            operation: call.operation,
            identity: Some(call.principal.identity.clone()),
            tenant: Some(call.principal.tenant.clone()),
            key: call.key,
            version: call.version,
            context_hash: None,
            attributes: Some(call.attributes),
            outcome,
            denial: None,
            // The protocols' calls use keys; none changes one.
            key_use: true,
        };
        self.complete(done, resp, |_| unavailable()).await
    }
}

/// [`AppState::complete_call`]'s mark on an answer whose audit record was not written.
#[derive(Clone, Copy)]
struct Unrecorded;

/// A protocol adapter's call, as [`AppState::finish_call`] records it.
pub struct AdapterCall<'a> {
    /// The audit operation (`DKE decrypt`, `CSE wrap`, ...).
    pub operation: String,
    /// The metrics route (`dke decrypt`).
    pub route: String,
    /// The HTTP method, for the metrics.
    pub method: &'static str,
    /// Whom the adapter acts as.
    pub principal: &'a Principal,
    /// The Keyhold key, when one was reached.
    pub key: Option<String>,
    /// Its version, when one was used.
    pub version: Option<u32>,
    /// The protocol's facts (`protocol`, the user, the resource, ...).
    pub attributes: BTreeMap<String, String>,
    /// When the call began.
    pub started: Instant,
}

/// Counts a failure of `identity` (a denial, a wrong passphrase or unseal share) toward
/// its lockout; at the threshold it is locked out (on every node of a shared store) and
/// `locked_out` is raised.
pub(crate) fn count_failure(state: &Arc<AppState>, identity: &str) {
    if !state.lockouts.record_denial(identity) {
        return;
    }
    tracing::warn!(identity, "identity locked out after repeated denials");
    if state.lockouts.is_shared() {
        // To the other nodes of the shared store, off the request path.
        let (s, who) = (state.clone(), identity.to_owned());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = s.lockouts.publish(&who) {
                tracing::error!(error = %e, identity = %who, "lockout not shared with the other nodes");
            }
        });
    }
    state.alerts.raise(AlertEvent::new(
        AlertKind::LockedOut,
        Some(identity),
        "repeated denials",
    ));
}

/// The native API's completion middleware: gives the request its id and its
/// [`AuditNote`], refuses a revoked certificate or a locked-out identity, runs the
/// handler, and finishes through [`AppState::complete`]. A route with a `{name}` key
/// records that key even when its handler failed before noting it.
pub(super) async fn track(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = state.next_request_id();
    let note = AuditNote::default();
    req.extensions_mut().insert(RequestId(id));
    req.extensions_mut().insert(note.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let peer = req
        .extensions()
        .get::<PeerIdentity>()
        .cloned()
        .unwrap_or_default();
    let identity = peer.identity;
    // A certificate revoked after its connection opened is refused from the reload on.
    // Its denials count against the certificate, not the identity: a stolen, revoked
    // certificate must not lock out the one re-issued to its owner.
    let revoked = peer
        .revocation_key
        .filter(|k| state.tls.is_revoked(k))
        .map(|k| crate::security::tls::revoked_certificate_name(&k));
    // A locked-out identity gets nothing but its 429 (and an audit record).
    let locked = identity.as_deref().and_then(|i| state.lockouts.locked(i));
    let mut resp = if revoked.is_some() {
        Error::PermissionDenied("this client certificate has been revoked").into_response()
    } else if locked.is_some() {
        Error::LockedOut.into_response()
    } else {
        next.run(req).await
    };
    let code = resp.extensions().get::<ErrorCode>().copied();
    let outcome = match code {
        Some(code) => format!("{code:?}"),
        None if resp.status().is_success() => "ok".to_owned(),
        None => resp.status().as_str().to_owned(),
    };
    let denial = (code == Some(ErrorCode::PermissionDenied))
        .then(|| {
            revoked
                .clone()
                .or_else(|| identity.as_deref().map(str::to_owned))
        })
        .flatten()
        .map(|who| Denial {
            kind: AlertKind::Denied,
            who: Some(who),
            detail: format!("{method} {route}"),
            counts_toward_lockout: true,
        });
    let mut info = note.take();
    if let Some(used) = resp.extensions_mut().remove::<KeyUsed>() {
        info.key = Some(used.key);
        info.version = Some(used.version);
    }
    let key_use = KEY_USE_ROUTES.contains(&route.as_str());
    let done = Completion {
        id,
        started,
        method: method.to_string(),
        operation: format!("{method} {route}"),
        route,
        key_use,
        // Resolved by the `Caller` extractor when the handler got that far.
        tenant: info.tenant.or_else(|| {
            identity
                .as_deref()
                .and_then(|i| state.policy.resolve(i).ok())
                .map(|p| p.tenant)
        }),
        identity: identity.as_deref().map(str::to_owned),
        key: info.key,
        version: info.version,
        context_hash: info.context_hash,
        attributes: info.attributes,
        outcome,
        denial,
    };
    state
        .complete(done, resp, IntoResponse::into_response)
        .await
}

/// The key and version a request used, carried by its response to [`track`]: the data
/// plane's handlers answer [`Used`], so a successful key use cannot leave without them.
#[derive(Debug, Clone)]
pub struct KeyUsed {
    /// The key's name.
    pub key: String,
    /// The version used.
    pub version: u32,
}

/// A handler's answer together with the key version it used.
pub struct Used<T> {
    /// What the caller gets.
    pub answer: T,
    /// What the audit record says was used.
    pub used: KeyUsed,
}

impl<T> Used<T> {
    /// `answer`, made with `version` of `key`.
    pub fn new(answer: T, key: &str, version: u32) -> Self {
        Self {
            answer,
            used: KeyUsed {
                key: key.to_owned(),
                version,
            },
        }
    }
}

impl<T: IntoResponse> IntoResponse for Used<T> {
    fn into_response(self) -> Response {
        let mut resp = self.answer.into_response();
        resp.extensions_mut().insert(self.used);
        resp
    }
}
