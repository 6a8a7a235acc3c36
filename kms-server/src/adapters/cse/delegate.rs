//! Delegation (Google's KACLS reference: "Method: delegate" and "KACLS authentication
//! token for delegate"): a user who cannot authenticate on a client lets that client
//! (`delegated_to`) wrap or unwrap one resource on their behalf.
//!
//! `POST /delegate` takes the user's authentication token and an authorization token
//! carrying `delegated_to` and `resource_name`, checks them as every call does (valid,
//! same user, our `kacls_url`, the owner domain), and answers a delegated authentication
//! token signed with this KACLS's signing key: the user's `email`, `delegated_to`,
//! `resource_name`, issuer and audience this KACLS's URL, valid for at most an hour and
//! never beyond the original token. `wrap` and `unwrap` then accept it as the
//! authentication token, verified against this KACLS's own key, only together with a
//! delegated authorization token whose `delegated_to` and `resource_name` equal its own
//! ([`delegation_matches`]).

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::wire::{Authn, Authz, DelegateRequest};
use super::{bad, denied, Cse, CseError, Facts};

/// The longest a delegated token lives.
const LIFETIME_SECS: u64 = 3600;
/// The largest `reason` the reference allows.
const MAX_REASON: usize = 1024;

/// The key set that verifies the delegated tokens this KACLS signs: its own signing key.
pub(super) fn own_key_set(jwk: &serde_json::Value) -> crate::adapters::jwt::JwksSource {
    crate::adapters::jwt::JwksSource::Static(json!({ "keys": [jwk] }))
}

/// A delegated authentication token goes only with a delegated authorization token for
/// the same entity and the same resource, and the other way round (the reference: "the
/// values of the `delegated_to` and `resource_name` claims in both tokens must match").
pub(super) fn delegation_matches(authn: &Authn, authz: &Authz) -> Result<(), CseError> {
    match (&authn.delegated_to, &authz.delegated_to) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(denied(
            "a delegated authentication token needs a delegated authorization token",
        )),
        (None, Some(_)) => Err(denied(
            "a delegated authorization token needs a delegated authentication token",
        )),
        (Some(a), Some(z)) if a != z => Err(denied("the tokens delegate to different entities")),
        (Some(_), Some(_)) if authn.resource_name.as_deref() != Some(&authz.resource_name) => {
            Err(denied("the delegated token is for another resource"))
        }
        (Some(_), Some(_)) => Ok(()),
    }
}

impl Cse {
    pub(super) async fn delegate(
        self: &Arc<Self>,
        req: DelegateRequest,
        facts: &mut Facts,
    ) -> Result<Response, CseError> {
        facts.reason = Some(req.reason.clone());
        if req.reason.len() > MAX_REASON {
            return Err(bad("reason is longer than 1 KB"));
        }
        // The reference names no role for delegation: the claims decide.
        let authz = self.authorize(&req.authorization, &[], facts).await?;
        let delegated_to = authz
            .delegated_to
            .clone()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| denied("the authorization token names no delegated_to"))?;
        facts.delegated_to = Some(delegated_to.clone());
        if authz.resource_name.is_empty() {
            return Err(denied("the authorization token names no resource"));
        }
        let authn = self.identify(&req.authentication, &authz).await?;
        if authn.delegated_to.is_some() {
            return Err(denied("a delegated token cannot be delegated again"));
        }
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| denied("this key service has no signing key for delegation"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let exp = authn
            .exp
            .map_or(now + LIFETIME_SECS, |e| e.min(now + LIFETIME_SECS));
        let token = signer.sign(&json!({
            "iss": self.settings.kacls_url, "aud": self.settings.kacls_url,
            "email": authz.email, "delegated_to": delegated_to,
            "resource_name": authz.resource_name, "iat": now, "exp": exp,
        }))?;
        Ok(Json(json!({ "delegated_authentication": token })).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authn(to: Option<&str>, resource: Option<&str>) -> Authn {
        Authn {
            email: Some("a@example.com".into()),
            google_email: None,
            exp: None,
            delegated_to: to.map(Into::into),
            resource_name: resource.map(Into::into),
        }
    }

    fn authz(to: Option<&str>, resource: &str) -> Authz {
        Authz {
            email: "a@example.com".into(),
            email_type: None,
            resource_name: resource.into(),
            role: "reader".into(),
            kacls_url: "https://k".into(),
            perimeter_id: None,
            delegated_to: to.map(Into::into),
            kacls_owner_domain: None,
        }
    }

    #[test]
    fn delegated_tokens_go_in_matching_pairs() {
        assert!(delegation_matches(&authn(None, None), &authz(None, "r")).is_ok());
        assert!(delegation_matches(&authn(Some("d"), Some("r")), &authz(Some("d"), "r")).is_ok());
        for (n, z) in [
            (authn(Some("d"), Some("r")), authz(None, "r")),
            (authn(None, None), authz(Some("d"), "r")),
            (authn(Some("d"), Some("r")), authz(Some("e"), "r")),
            (authn(Some("d"), Some("r")), authz(Some("d"), "s")),
            (authn(Some("d"), None), authz(Some("d"), "r")),
        ] {
            assert!(delegation_matches(&n, &z).is_err());
        }
    }
}
