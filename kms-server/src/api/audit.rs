//! `GET /v1/audit?after=&limit=` (auditor): the audit chain, page by page, with the head.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use kms_client::api::AuditPage;
use serde::Deserialize;

use super::{blocking, AppState, Caller};
use crate::access::policy::Operation;
use crate::base::error::Error;
use crate::security::audit::MAX_PAGE;

/// Query parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Return records with `seq > after` (default 0: from the start).
    #[serde(default)]
    pub after: u64,
    /// At most this many (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `GET /v1/audit`. The chain is global (one per server), so it is readable by auditors of
/// any tenant; verifying it needs every record.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, Error> {
    caller.authorize(Operation::ReadAudit)?;
    let Query(p) = query.map_err(|e| Error::InvalidRequest(e.body_text()))?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Error::InvalidRequest(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let page = blocking(move || state.audit.read(&state.keyring, p.after, limit)).await?;
    Ok(Json(page))
}
