//! The remote [`envelope::KeyProvider`]: envelopes sealed and opened with DEKs from a
//! running `kms-server`.

use envelope::{Context, DataKeyPair, Dek, KeyRef, ProviderError, ProviderErrorKind};

use crate::api::ErrorCode;
use crate::{Client, Error};

fn provider_error(e: Error) -> ProviderError {
    let kind = match &e {
        Error::Api { code, .. } => match code {
            ErrorCode::DecryptFailed => ProviderErrorKind::DecryptFailed,
            ErrorCode::NotFound => ProviderErrorKind::NotFound,
            ErrorCode::KeyDisabled => ProviderErrorKind::KeyDisabled,
            ErrorCode::PermissionDenied | ErrorCode::Unauthenticated | ErrorCode::LockedOut => {
                ProviderErrorKind::PermissionDenied
            }
            ErrorCode::Sealed | ErrorCode::StorageUnavailable => ProviderErrorKind::Unavailable,
            _ => ProviderErrorKind::Other,
        },
        Error::Unreachable { .. } | Error::Timeout { .. } | Error::Transport { .. } => {
            ProviderErrorKind::Unavailable
        }
        _ => ProviderErrorKind::Other,
    };
    ProviderError::new(kind, Some(Box::new(e)))
}

impl envelope::KeyProvider for Client {
    /// The endpoints, the trusted CAs and the client certificate: clients that agree on
    /// all three reach the same keys as the same identity, and may share cached DEKs.
    fn cache_id(&self) -> Option<envelope::ProviderId> {
        Some(self.provider_id().clone())
    }

    async fn datakey(&self, key: &str, context: &Context) -> Result<DataKeyPair, ProviderError> {
        let resp = Client::datakey(self, key, context)
            .await
            .map_err(provider_error)?;
        let dek = Dek::from_slice(resp.plaintext.expose_secret())
            .ok_or_else(|| ProviderError::new(ProviderErrorKind::Other, None))?;
        Ok(DataKeyPair {
            dek,
            wrapped: resp.wrapped.into_bytes(),
            key: KeyRef {
                name: resp.key,
                version: resp.version,
            },
        })
    }

    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Dek, ProviderError> {
        let resp = Client::unwrap(self, wrapped, context)
            .await
            .map_err(provider_error)?;
        // The server says which key and version it used; they must be the ones the
        // envelope names.
        if resp.key != key.name || resp.version != key.version {
            return Err(ProviderError::new(ProviderErrorKind::DecryptFailed, None));
        }
        Dek::from_slice(resp.plaintext.expose_secret())
            .ok_or_else(|| ProviderError::new(ProviderErrorKind::DecryptFailed, None))
    }
}
