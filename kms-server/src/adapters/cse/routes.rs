//! The CSE routes: one handler per operation (body parsed, the operation run, the call
//! finished through [`Cse::finish`]), `/status`, `/certs` and the CORS preflight.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::wire::*;
use super::{Cse, CseError, Facts, GOOGLE_ORIGIN, MAX_BODY};

macro_rules! operation {
    ($name:ident, $req:ty, $op:literal) => {
        pub(super) async fn $name(
            State(cse): State<Arc<Cse>>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> Response {
            let started = Instant::now();
            let mut facts = Facts::default();
            let resp = match parse_body::<$req>(&body) {
                Ok(req) => match cse.$name(req, &mut facts).await {
                    Ok(r) => r,
                    Err(e) => e.into_response(),
                },
                Err(e) => e.into_response(),
            };
            cse.finish($op, headers.get(header::ORIGIN), started, facts, resp)
                .await
        }
    };
}

mod handlers {
    use super::*;
    operation!(wrap, WrapRequest, "wrap");
    operation!(unwrap, UnwrapRequest, "unwrap");
    operation!(digest, DigestRequest, "digest");
    operation!(privilegedwrap, PrivilegedWrapRequest, "privilegedwrap");
    operation!(
        privilegedunwrap,
        PrivilegedUnwrapRequest,
        "privilegedunwrap"
    );
    operation!(rewrap, RewrapRequest, "rewrap");
    operation!(delegate, DelegateRequest, "delegate");
}

/// `GET /cse/certs`: this key service's signing key as a JWK set (404 without one).
async fn certs(State(cse): State<Arc<Cse>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let resp = match &cse.signer {
        Some(s) => Json(json!({"keys": [s.jwk.clone()]})).into_response(),
        None => CseError::new(StatusCode::NOT_FOUND, "this key service has no signing key")
            .into_response(),
    };
    cse.finish(
        "certs",
        headers.get(header::ORIGIN),
        started,
        Facts::default(),
        resp,
    )
    .await
}

async fn status(State(cse): State<Arc<Cse>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let resp = Json(json!({
        "server_type": "KACLS",
        "vendor_id": "Keyhold",
        "version": env!("CARGO_PKG_VERSION"),
        "name": "Keyhold KACLS",
        "operations_supported": ["wrap", "unwrap", "digest", "privilegedwrap", "privilegedunwrap", "rewrap", "delegate"],
    }))
    .into_response();
    cse.finish(
        "status",
        headers.get(header::ORIGIN),
        started,
        Facts::default(),
        resp,
    )
    .await
}

/// CORS preflight: Google's origin may POST JSON with an authorization header.
async fn preflight(headers: HeaderMap) -> Response {
    let allowed = headers
        .get(header::ORIGIN)
        .is_some_and(|o| o == GOOGLE_ORIGIN);
    if !allowed {
        return CseError::new(StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static(GOOGLE_ORIGIN),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("3600"),
    );
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    resp
}

/// The routes of the public listener for CSE.
pub fn router(cse: Arc<Cse>) -> Router {
    Router::new()
        .route("/cse/status", get(status).options(preflight))
        .route("/cse/wrap", post(handlers::wrap).options(preflight))
        .route("/cse/unwrap", post(handlers::unwrap).options(preflight))
        .route("/cse/digest", post(handlers::digest).options(preflight))
        .route(
            "/cse/privilegedwrap",
            post(handlers::privilegedwrap).options(preflight),
        )
        .route(
            "/cse/privilegedunwrap",
            post(handlers::privilegedunwrap).options(preflight),
        )
        .route("/cse/rewrap", post(handlers::rewrap).options(preflight))
        .route("/cse/delegate", post(handlers::delegate).options(preflight))
        .route("/cse/certs", get(certs).options(preflight))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(cse)
}
