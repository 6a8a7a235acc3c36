//! A KMIP server (`docs/kmip.md`): TTLV over mutual TLS on its own listener (`[kmip]`,
//! port 5696 by default), the API's certificates, client CA and revocation lists.
//!
//! - **Connections** are accepted and bounded as on every listener
//!   ([`crate::transport::listen`]): per-source share, handshake budget and deadline,
//!   connection slots (`[kmip] max_connections`, else the server's) with eviction of the
//!   connection holding its slot for nothing the longest, the idle deadline
//!   (`[kmip] idle_timeout_secs`, else the server's), closing on revocation, draining.
//! - **Framing**: a message is an 8-byte TTLV head and the length it names, at most
//!   `[kmip] max_message_bytes`, whole within the body deadline (`body_timeout_secs`); a
//!   connection carries any number of requests, one at a time. A head that is not a Request Message's, or a length over the bound, closes the
//!   connection; a body that does not decode ([`ttlv`]: strict, bounded depth and item
//!   count) is answered `Invalid Message` and the connection closed.
//! - **Identity** is the client certificate (as on the native API): its role and tenant,
//!   its lockout, its revocation. The header's Authentication is not read.
//! - **Versions** 1.0 to 1.4, 2.0 and 2.1 ([`message::Version::SUPPORTED`]; 2.x's
//!   attributes under their own tags); a request in another is answered `Invalid Message` under the
//!   version it names.
//! - **Batch items** run in order; a failure stops the rest (`Operation Failed`, as the
//!   Batch Error Continuation Option's default `Stop` says) unless the request said
//!   `Continue`. Each item is one audit record (`KMIP Create`, ...), through the one
//!   completion path; a refusal for want of a grant or role raises the `denied` alert.
//! - **Operations** and the HYOK policy: [`ops`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{AppState, Completion, Denial};
use crate::base::event::AlertKind;
use crate::transport::listen::{Protocol, Served};

mod attributes;
mod cipher;
pub mod message;
pub mod ops;
mod secret;
pub mod settings;
pub mod tags;
pub mod ttlv;

pub use settings::KmipSettings;

use message::{Answer, Failure, Request, Version};
use tags as t;

/// KMIP on an established connection of the KMIP listener, which
/// [`crate::transport::listen`] accepts and bounds as it does every listener's (per-source
/// share, handshake budget, connection slots with eviction, idle deadline, revocation).
pub struct Kmip {
    state: Arc<AppState>,
    sources: Arc<[crate::access::policy::IdentitySource]>,
    max_message_bytes: usize,
    message_timeout: Duration,
}

impl Kmip {
    /// KMIP for `state`, identities from `sources`; a started message must arrive within
    /// `message_timeout`.
    pub fn new(
        state: Arc<AppState>,
        settings: &KmipSettings,
        sources: Arc<[crate::access::policy::IdentitySource]>,
        message_timeout: Duration,
    ) -> Self {
        Self {
            state,
            sources,
            max_message_bytes: settings.max_message_bytes,
            message_timeout,
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

impl Protocol<TlsStream> for Kmip {
    fn serve(
        &self,
        tls: TlsStream,
        served: Served,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let peer = Peer {
            identity: leaf
                .as_deref()
                .and_then(|l| crate::security::tls::identity_of(l, &self.sources)),
            revocation: leaf
                .as_deref()
                .and_then(crate::security::tls::leaf_revocation_key),
        };
        let (state, max, timeout) = (
            self.state.clone(),
            self.max_message_bytes,
            self.message_timeout,
        );
        Box::pin(connection(tls, served, peer, state, max, timeout))
    }
}

/// The client of a connection, from its certificate.
struct Peer {
    identity: Option<String>,
    revocation: Option<Vec<u8>>,
}

/// One connection: requests answered one after another until the client closes it, the
/// listener asks it to close (idle, stopping, revoked) or it sends what is not a request.
async fn connection(
    mut tls: TlsStream,
    served: Served,
    peer: Peer,
    state: Arc<AppState>,
    max_message_bytes: usize,
    message_timeout: Duration,
) {
    loop {
        let mut head = [0u8; 8];
        tokio::select! {
            r = tls.read_exact(&mut head) => if r.is_err() { return },
            () = served.closing() => return,
        }
        // A Request Message is a structure: anything else is not KMIP.
        if head[..4] != [0x42, 0x00, 0x78, 0x01] {
            tracing::debug!(peer = %served.peer(), "kmip: not a Request Message; connection closed");
            return;
        }
        let len = ttlv::message_length(&head) as usize;
        if len > max_message_bytes || len % 8 != 0 {
            tracing::debug!(peer = %served.peer(), len, "kmip: message over the bound; connection closed");
            return;
        }
        let mut body = zeroize::Zeroizing::new(vec![0u8; 8 + len]);
        body[..8].copy_from_slice(&head);
        match tokio::time::timeout(message_timeout, tls.read_exact(&mut body[8..])).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        // In flight from a whole message to its answer written: a connection waiting for
        // a message holds its slot for nothing, and gives way first when slots run out.
        let in_flight = served.begin();
        let revoked = peer
            .revocation
            .as_deref()
            .is_some_and(|k| state.tls.is_revoked(k));
        let caller = Caller {
            identity: peer.identity.clone(),
            revoked,
        };
        let (answer, close) = handle(state.clone(), caller, body).await;
        if tls.write_all(&answer).await.is_err() || tls.flush().await.is_err() || close {
            return;
        }
        drop(in_flight);
    }
}

/// Who sent a message.
struct Caller {
    identity: Option<String>,
    revoked: bool,
}

/// Answers one message: the encoded Response Message, and whether to close after it.
async fn handle(
    state: Arc<AppState>,
    caller: Caller,
    body: zeroize::Zeroizing<Vec<u8>>,
) -> (Vec<u8>, bool) {
    let now = i64::try_from(state.keyring.clock().now()).unwrap_or(i64::MAX);
    let limits = ttlv::Limits::default();
    let request = match ttlv::Item::decode(&body, limits) {
        Ok(item) => Request::of(&item),
        Err(e) => Err((None, Failure::invalid_message(format!("not TTLV: {e}")))),
    };
    drop(body);
    let request = match request {
        Ok(r) if r.version.supported() => r,
        Ok(r) => {
            let f = Failure::invalid_message(format!(
                "protocol version {}.{} is not served (1.0 to 1.4, 2.0, 2.1)",
                r.version.major, r.version.minor
            ));
            let answers = vec![Answer {
                operation: None,
                id: None,
                result: Err(f),
            }];
            return (message::response(r.version, now, answers).encode(), false);
        }
        Err((version, f)) => {
            let v = version.unwrap_or(Version::new(1, 0));
            let answers = vec![Answer {
                operation: None,
                id: None,
                result: Err(f),
            }];
            return (message::response(v, now, answers).encode(), true);
        }
    };
    let version = request.version;
    let max_response = request.max_response;
    let answers = run_batch(&state, &caller, request).await;
    let response = message::response(version, now, answers).encode();
    if max_response.is_some_and(|m| response.len() > m) {
        let f = Failure::new(
            t::REASON_RESPONSE_TOO_LARGE,
            format!("the response is {} bytes", response.len()),
        );
        let answers = vec![Answer {
            operation: None,
            id: None,
            result: Err(f),
        }];
        return (message::response(version, now, answers).encode(), false);
    }
    (response, false)
}

/// Runs the batch items in order, each recorded.
async fn run_batch(state: &Arc<AppState>, caller: &Caller, request: Request) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(request.items.len());
    let mut stopped = false;
    for item in request.items {
        let op = item.operation;
        if stopped {
            answers.push(ops::answer(
                op,
                item.id,
                Err(Failure::new(
                    t::REASON_GENERAL_FAILURE,
                    "not run: an earlier batch item failed",
                )),
            ));
            continue;
        }
        let started = Instant::now();
        let who = principal(state, caller);
        let st = state.clone();
        let version = request.version;
        let payload = item.payload;
        let ran = tokio::task::spawn_blocking(move || {
            let mut facts = ops::Facts::default();
            let result = match &who {
                Ok(p) => ops::run(
                    op,
                    ops::Call {
                        state: &st,
                        who: p,
                        version,
                        payload: &payload,
                        facts: &mut facts,
                    },
                ),
                Err(f) => Err(f.clone()),
            };
            (who.ok(), facts, result)
        })
        .await;
        let (who, facts, result) = ran.unwrap_or_else(|_| {
            (
                None,
                ops::Facts::default(),
                Err(Failure::new(
                    t::REASON_GENERAL_FAILURE,
                    "the operation failed",
                )),
            )
        });
        let result = record(state, caller, who, op, started, facts, result).await;
        stopped = result.is_err() && !request.continue_on_error;
        answers.push(ops::answer(op, item.id, result));
    }
    answers
}

/// The caller's principal, or why it has none.
fn principal(
    state: &AppState,
    caller: &Caller,
) -> Result<crate::access::policy::Principal, Failure> {
    let denied = |m: &str| Failure {
        // Refused before any principal: alerted, counted against no identity.
        denial: Some(false),
        ..Failure::new(t::REASON_PERMISSION_DENIED, m)
    };
    if caller.revoked {
        return Err(denied("this client certificate has been revoked"));
    }
    let identity = caller.identity.as_deref().ok_or_else(|| {
        Failure::new(
            t::REASON_AUTHENTICATION_NOT_SUCCESSFUL,
            "the client certificate names no identity",
        )
    })?;
    if state.lockouts.locked(identity).is_some() {
        return Err(denied("this identity is locked out after repeated denials"));
    }
    state
        .policy
        .resolve(identity)
        .map_err(|_| denied("this identity has no role here"))
}

/// The batch item's audit record, alert and metrics; the result, or `General Failure`
/// when the record could not be written (nothing unaudited leaves).
async fn record(
    state: &Arc<AppState>,
    caller: &Caller,
    who: Option<crate::access::policy::Principal>,
    op: u32,
    started: Instant,
    facts: ops::Facts,
    result: Result<Vec<ttlv::Item>, Failure>,
) -> Result<Vec<ttlv::Item>, Failure> {
    let name = ops::name(op);
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(f) => format!("reason 0x{:02x}", f.reason),
    };
    let denial = match &result {
        Err(Failure {
            denial: Some(counts),
            message,
            ..
        }) => Some(Denial {
            kind: AlertKind::Denied,
            who: caller.identity.clone(),
            detail: format!("KMIP {name}: {message}"),
            counts_toward_lockout: *counts && who.is_some(),
        }),
        _ => None,
    };
    let mut attributes: BTreeMap<String, String> = facts
        .attributes
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    attributes.insert("protocol".into(), "kmip".into());
    if let Err(f) = &result {
        attributes.insert(
            "result_message".into(),
            crate::adapters::xks::api::clean_message(&f.message),
        );
    }
    let done = Completion {
        id: state.next_request_id(),
        started,
        method: "KMIP".to_owned(),
        route: format!("kmip {}", name.to_ascii_lowercase()),
        operation: format!("KMIP {name}"),
        identity: caller.identity.clone(),
        tenant: who.as_ref().map(|p| p.tenant.clone()),
        key: facts.key,
        version: facts.version,
        context_hash: None,
        attributes: Some(attributes),
        outcome,
        denial,
        key_use: ops::is_key_use(op),
    };
    let status = if result.is_ok() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::BAD_REQUEST
    };
    if !state.complete_call(done, status).await {
        return Err(Failure::new(
            t::REASON_GENERAL_FAILURE,
            "the audit trail is unavailable",
        ));
    }
    result
}
