//! Where DEKs come from: the [`KeyProvider`] trait, and [`LocalProvider`], an in-process
//! implementation with local KEKs (for tests and for embedding without a key service).
//! `kms-client` implements the trait over a running `kms-server`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use zeroize::Zeroizing;

use crate::backend::{self, Aes256Gcm, TAG_LEN};
use crate::context::{self, Context};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::format::KeyRef;
use crate::secret::{Dek, DEK_LEN};

/// A fresh DEK, in clear and wrapped, and the KEK version that wrapped it.
pub struct DataKeyPair {
    /// The DEK. Use it, then drop it.
    pub dek: Dek,
    /// The DEK wrapped under `key`, bound to the context it was asked for with.
    pub wrapped: Vec<u8>,
    /// The KEK (name and version) that wrapped it.
    pub key: KeyRef,
}

impl std::fmt::Debug for DataKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeyPair")
            .field("dek", &self.dek)
            .field("wrapped_len", &self.wrapped.len())
            .field("key", &self.key)
            .finish()
    }
}

/// Who a [`KeyProvider`] is, as far as a [`crate::DekCache`] is concerned: a cached DEK
/// serves only a provider whose id equals that of the provider it came from.
///
/// Two providers may share an id only if they are interchangeable: the same keys, and the
/// same caller with the same permissions (for a key service: its endpoint *and* the
/// client identity used to call it). Not secret: it appears in `Debug` output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderId(IdKind);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdKind {
    Unique(u64),
    Named(Box<[u8]>),
}

impl ProviderId {
    /// An id that no other call returns in this process: for a provider whose keys live
    /// in the instance itself (like [`LocalProvider`]). Never equal to a
    /// [`ProviderId::named`] id.
    pub fn unique() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(IdKind::Unique(NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    /// An id from a stable description of the provider, for example a key service's
    /// endpoint and the caller's certificate fingerprint. Equal descriptions must mean
    /// interchangeable providers (see the type docs); put no secret in it.
    pub fn named(description: impl Into<Vec<u8>>) -> Self {
        Self(IdKind::Named(description.into().into_boxed_slice()))
    }
}

/// A source of DEKs: a key service (remote) or local KEKs.
///
/// Both methods bind the wrapped DEK to `context`: `unwrap` must fail (with
/// [`ProviderErrorKind::DecryptFailed`]) for any other context. The futures are `Send` so
/// envelopes can be sealed and opened from any tokio task.
pub trait KeyProvider: Send + Sync {
    /// This provider's identity for a [`crate::DekCache`], which keys every entry by it
    /// so that one cache shared by several providers never hands one provider's DEK to
    /// another. `None` (the default) keeps this provider out of every cache: operations
    /// with a cache configured then always ask the provider.
    fn cache_id(&self) -> Option<ProviderId> {
        None
    }

    /// A fresh DEK under the current version of the KEK `key`.
    fn datakey(
        &self,
        key: &str,
        context: &Context,
    ) -> impl Future<Output = Result<DataKeyPair, ProviderError>> + Send;

    /// The DEK inside `wrapped`, which `key` (name and version, as the envelope header
    /// records them) wrapped with `context`.
    fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &[u8],
        context: &Context,
    ) -> impl Future<Output = Result<Dek, ProviderError>> + Send;
}

/// KEK versions held in process memory. Wrapped DEKs: `salt(32) ‖ AES-256-GCM(k, 0^96,
/// aad, DEK) ‖ tag` with `k = HKDF-SHA256(salt, KEK, "keyhold-envelope/local-wrap/v1")` and
/// `aad = u8 len ‖ key name ‖ u32 version ‖ canonical context`.
///
/// Each instance is its own provider for a [`crate::DekCache`] (a
/// [`ProviderId::unique`] id), since each holds its own KEKs.
pub struct LocalProvider {
    keys: RwLock<HashMap<String, Vec<Zeroizing<[u8; 32]>>>>,
    id: ProviderId,
}

impl Default for LocalProvider {
    fn default() -> Self {
        Self {
            keys: RwLock::default(),
            id: ProviderId::unique(),
        }
    }
}

const LOCAL_LABEL: &[u8] = b"keyhold-envelope/local-wrap/v1";

fn err(kind: ProviderErrorKind) -> ProviderError {
    ProviderError::new(kind, None)
}

fn local_aad(key: &KeyRef, context: &Context) -> Result<Vec<u8>, ProviderError> {
    let canonical = context::canonical(context)
        .map_err(|e| ProviderError::new(ProviderErrorKind::Other, Some(Box::new(e))))?;
    let mut aad = Vec::with_capacity(1 + key.name.len() + 4 + canonical.len());
    aad.push(key.name.len().min(255) as u8);
    aad.extend_from_slice(key.name.as_bytes());
    aad.extend_from_slice(&key.version.to_be_bytes());
    aad.extend_from_slice(&canonical);
    Ok(aad)
}

impl LocalProvider {
    /// An empty provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or rotates) the KEK `name`: a new random version becomes current. Returns
    /// the new version number.
    pub fn rotate(&self, name: &str) -> Result<u32, crate::Error> {
        crate::format::check_key_name(name)?;
        let mut kek = Zeroizing::new([0u8; 32]);
        backend::random(&mut *kek).map_err(|_| crate::Error::Random)?;
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let versions = keys.entry(name.to_owned()).or_default();
        versions.push(kek);
        Ok(versions.len() as u32)
    }

    /// Adds a KEK with known bytes as the next version of `name` (golden tests, imports).
    pub fn insert_version(&self, name: &str, kek: &[u8; 32]) -> u32 {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let versions = keys.entry(name.to_owned()).or_default();
        versions.push(Zeroizing::new(*kek));
        versions.len() as u32
    }

    fn kek(&self, key: &KeyRef) -> Option<Zeroizing<[u8; 32]>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let idx = usize::try_from(key.version).ok()?.checked_sub(1)?;
        keys.get(&key.name)?.get(idx).cloned()
    }

    fn current(&self, name: &str) -> Option<KeyRef> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let n = keys.get(name)?.len();
        Some(KeyRef {
            name: name.to_owned(),
            version: n as u32,
        })
    }

    #[cfg(test)]
    pub(crate) fn wrap_for_golden(&self, key: &KeyRef, dek: &Dek, context: &Context) -> Vec<u8> {
        self.wrap(key, dek, context).unwrap_or_default()
    }

    fn wrap(&self, key: &KeyRef, dek: &Dek, context: &Context) -> Result<Vec<u8>, ProviderError> {
        let kek = self.kek(key).ok_or(err(ProviderErrorKind::NotFound))?;
        let mut salt = [0u8; 32];
        backend::random(&mut salt).map_err(|_| err(ProviderErrorKind::Other))?;
        let [k] = backend::hkdf_sha256(&salt, &*kek, [&[LOCAL_LABEL]]);
        let mut buf = dek.expose_secret().to_vec();
        Aes256Gcm::new(&k).seal_in_place(&[0; 12], &local_aad(key, context)?, &mut buf);
        let mut out = salt.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }
}

impl KeyProvider for LocalProvider {
    fn cache_id(&self) -> Option<ProviderId> {
        Some(self.id.clone())
    }

    async fn datakey(&self, key: &str, context: &Context) -> Result<DataKeyPair, ProviderError> {
        let key = self.current(key).ok_or(err(ProviderErrorKind::NotFound))?;
        let dek = Dek::generate().map_err(|_| err(ProviderErrorKind::Other))?;
        let wrapped = self.wrap(&key, &dek, context)?;
        Ok(DataKeyPair { dek, wrapped, key })
    }

    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Dek, ProviderError> {
        let decrypt_failed = || err(ProviderErrorKind::DecryptFailed);
        if wrapped.len() != 32 + DEK_LEN + TAG_LEN {
            return Err(decrypt_failed());
        }
        let kek = self.kek(key).ok_or_else(decrypt_failed)?;
        let (salt, body) = wrapped.split_at(32);
        let [k] = backend::hkdf_sha256(salt, &*kek, [&[LOCAL_LABEL]]);
        let mut buf = Zeroizing::new(body.to_vec());
        let n = Aes256Gcm::new(&k)
            .open_in_place(&[0; 12], &local_aad(key, context)?, &mut buf)
            .map_err(|_| decrypt_failed())?;
        Dek::from_slice(&buf[..n]).ok_or_else(decrypt_failed)
    }
}
