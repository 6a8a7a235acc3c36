//! The data plane: [`Lookups`], one request's scope for datakey, wrap, unwrap, rewrap,
//! the detached encryption of the protocol adapters, RSA decryption without a label, and
//! what a principal may do with a key. It is the only way in: `Keyring` has no
//! data-plane methods of its own.

use std::sync::Arc;

use kms_client::api::{Algorithm, Context, GrantOperation, KeyState};

use super::cache::KeyEntry;
use super::records::validate_name;
use super::vault::Unsealed;
use super::Keyring;
use crate::access::policy::Principal;
use crate::base::error::Error;
use crate::crypto::format::{self, Header, KeyId};
use crate::crypto::secret::{SecretKey, SecretVec};

/// Length of a generated DEK.
pub const DATAKEY_LEN: usize = 32;

/// The result of `datakey`.
pub struct DataKey {
    /// The DEK.
    pub plaintext: SecretVec,
    /// It, wrapped.
    pub wrapped: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Version that wrapped it.
    pub version: u32,
}

/// The result of `wrap` and `rewrap`.
pub struct Wrapped {
    /// Wrapped DEK.
    pub wrapped: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Version that wrapped it.
    pub version: u32,
}

/// The result of `unwrap`.
pub struct Unwrapped {
    /// The DEK.
    pub plaintext: SecretVec,
    /// Key name.
    pub key: String,
    /// Version that had wrapped it.
    pub version: u32,
}

/// The HKDF label of detached encryption ([`Lookups::encrypt_detached`]): keys derived
/// for it are never the keys of a wrapped DEK (whose label is the wrapped-DEK format's).
const DETACHED_LABEL: &[u8] = b"keyhold/detached-aes-256-gcm/v1";

/// The result of [`Lookups::encrypt_detached`]: AES-256-GCM with the IV, the ciphertext
/// (as long as the plaintext) and the tag apart, for protocols that carry them as separate
/// fields (AWS XKS). The version is not in the ciphertext: the caller keeps it.
pub struct DetachedCiphertext {
    /// Key name.
    pub key: String,
    /// The version that encrypted.
    pub version: u32,
    /// The 16-byte IV (the single-use key's HKDF salt, see [`crate::crypto::aead::seal_detached`]).
    pub iv: [u8; crate::crypto::aead::DETACHED_SALT_LEN],
    /// Ciphertext, as long as the plaintext.
    pub ciphertext: Vec<u8>,
    /// The 16-byte tag.
    pub tag: [u8; crate::crypto::aead::TAG_LEN],
}

/// What a principal may do with a key (for protocols that report it: XKS GetKeyMetadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUse {
    /// Algorithm.
    pub algorithm: Algorithm,
    /// State.
    pub state: KeyState,
    /// A grant allows it `wrap` (detached encryption) without a context.
    pub can_encrypt: bool,
    /// A grant allows it `unwrap` (detached decryption) without a context.
    pub can_decrypt: bool,
}

impl Keyring {
    fn wrap_with(&self, entry: &KeyEntry, dek: &[u8], canonical: &[u8]) -> Result<Wrapped, Error> {
        entry.check_usable()?;
        let version = entry.record.current_version;
        let kek = entry
            .versions
            .get(&version)
            .ok_or_else(|| entry.current_unreadable())?;
        let header = Header {
            key_id: entry.key_id,
            version,
        };
        let wrapped = kek.material.wrap(&header, dek, canonical)?;
        kek.usage.wrap(self.clock.now());
        Ok(Wrapped {
            wrapped,
            key: entry.record.name.clone(),
            version,
        })
    }

    /// Charges one unwrap by `who` under key `name` and the canonical `context` (if any)
    /// to the exfiltration brake, if enabled, within the request's `session`.
    fn charge_brake(
        &self,
        session: &mut crate::access::brake::Session,
        who: &Principal,
        name: &str,
        context: Option<&[u8]>,
    ) -> Result<(), Error> {
        match self.brake.get() {
            Some(brake) => {
                let now = session.now(brake);
                brake.charge_in(session, &who.tenant, &who.identity, name, context, now)
            }
            None => Ok(()),
        }
    }

    /// A scope for the key operations of one request ([`Lookups`]). Fails when sealed.
    pub fn lookups(&self) -> Result<Lookups<'_>, Error> {
        self.check_fresh()?;
        Ok(Lookups {
            keyring: self,
            un: self.unsealed()?,
            entries: Vec::new(),
            unwraps: Vec::new(),
            brake: crate::access::brake::Session::default(),
        })
    }
}

impl Drop for Lookups<'_> {
    fn drop(&mut self) {
        if self.unwraps.iter().any(|&(_, n)| n > 0) {
            let now = self.keyring.clock.now();
            for i in 0..self.entries.len() {
                self.count_unwraps(i, now);
            }
        }
    }
}

/// Most distinct keys a [`Lookups`] remembers; beyond that, items go to the shared cache.
const LOOKUPS_KEPT: usize = 16;

/// The key operations of one request (a batch's items, or a single call): the unsealed
/// state and each key's cache entry are fetched from the shared cache once and reused by
/// the following items. The shared cache's lock and the entries' reference counts are
/// written by every worker; touched once per item they cost a batch a tenth of its CPU
/// (`BENCHMARKS.md`, batch section). A key disabled or destroyed while a batch runs is
/// seen by the next request, as for any request already past its lookup.
///
/// Unwraps are counted in the usage counters once per key version when the scope ends
/// (or its entry is let go), not once per item, for the same reason.
pub struct Lookups<'k> {
    keyring: &'k Keyring,
    un: Arc<Unsealed>,
    entries: Vec<Arc<KeyEntry>>,
    /// Beside each of `entries`: unwraps not yet counted, (version, count).
    unwraps: Vec<(u32, u32)>,
    /// The exfiltration brake's subjects this request charged.
    brake: crate::access::brake::Session,
}

impl Lookups<'_> {
    fn remember(&mut self, entry: Arc<KeyEntry>) -> usize {
        if self.entries.len() == LOOKUPS_KEPT {
            let now = self.keyring.clock.now();
            self.count_unwraps(self.entries.len() - 1, now);
            self.entries.pop();
            self.unwraps.pop();
        }
        self.entries.push(entry);
        self.unwraps.push((0, 0));
        self.entries.len() - 1
    }

    /// Counts the unwraps held for `entries[i]` at `now`.
    fn count_unwraps(&mut self, i: usize, now: u64) {
        if let (Some(entry), Some(pending)) = (self.entries.get(i), self.unwraps.get_mut(i)) {
            let (version, n) = std::mem::take(pending);
            if let Some(kek) = entry.versions.get(&version) {
                kek.usage.unwraps_at(now, n);
            }
        }
    }

    /// Holds one unwrap under `version` of `entries[i]`, to be counted when the scope ends
    /// (at once for the unwraps held under another version of the same key).
    fn held_unwrap(&mut self, i: usize, version: u32) {
        let Some(&(v, n)) = self.unwraps.get(i) else {
            return;
        };
        if v != version && n > 0 {
            let now = self.keyring.clock.now();
            self.count_unwraps(i, now);
        }
        let n = if v == version { n } else { 0 };
        self.unwraps[i] = (version, n.saturating_add(1));
    }

    /// The index in `entries` of key `id` of `tenant`; `None`: no such key there.
    fn by_id(&mut self, tenant: &str, id: KeyId) -> Result<Option<usize>, Error> {
        let found = self.entries.iter().position(|e| e.key_id == id);
        let i = match found {
            Some(i) => i,
            None => match self.keyring.load_entry(&self.un, id)? {
                Some(e) => self.remember(e),
                None => return Ok(None),
            },
        };
        Ok((self.entries[i].record.tenant == tenant).then_some(i))
    }

    fn by_name(&mut self, tenant: &str, name: &str) -> Result<usize, Error> {
        validate_name(name)?;
        let found = self
            .entries
            .iter()
            .position(|e| e.record.tenant == tenant && e.record.name == name);
        match found {
            Some(i) => Ok(i),
            None => {
                let e = self.keyring.entry_by_name(&self.un, tenant, name)?;
                Ok(self.remember(e))
            }
        }
    }

    /// Generates a 32-byte DEK and returns it in clear and wrapped.
    pub fn datakey(
        &mut self,
        who: &Principal,
        name: &str,
        context: &Context,
    ) -> Result<DataKey, Error> {
        let canonical = format::canonical_context(context)?;
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Datakey, context)?;
        entry.check_usable()?;
        let dek = SecretVec::random(DATAKEY_LEN)?;
        let w = self
            .keyring
            .wrap_with(entry, dek.expose_secret(), &canonical)?;
        Ok(DataKey {
            plaintext: dek,
            wrapped: w.wrapped,
            key: w.key,
            version: w.version,
        })
    }

    /// Wraps a caller-supplied DEK (16–64 bytes).
    pub fn wrap(
        &mut self,
        who: &Principal,
        name: &str,
        dek: &[u8],
        context: &Context,
    ) -> Result<Wrapped, Error> {
        format::check_dek_len(dek.len())?;
        let canonical = format::canonical_context(context)?;
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Wrap, context)?;
        self.keyring.wrap_with(entry, dek, &canonical)
    }

    /// Finds the key a wrapped DEK names (of the caller's tenant, else `DecryptFailed`:
    /// a foreign key looks like garbage), checks the grant for `op`, the key state and
    /// the version, and opens it. Returns the entry's index, the version, the DEK and the
    /// canonical context (a rewrap binds the new wrapped DEK to it).
    fn open_wrapped(
        &mut self,
        who: &Principal,
        op: GrantOperation,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<(usize, u32, SecretVec, Vec<u8>), Error> {
        let canonical = format::canonical_context(context)?;
        let header = format::parse_header(wrapped).map_err(|_| Error::DecryptFailed)?;
        let i = self
            .by_id(&who.tenant, header.key_id)?
            .ok_or(Error::DecryptFailed)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, op, context)?;
        entry.check_usable()?;
        if header.version < entry.record.min_decrypt_version {
            return Err(Error::DecryptFailed);
        }
        // A rewrap keeps the DEK inside: only what hands a DEK out is charged.
        if op == GrantOperation::Unwrap {
            let ctx = (!context.is_empty()).then_some(canonical.as_slice());
            let name = &entry.record.name;
            self.keyring.charge_brake(&mut self.brake, who, name, ctx)?;
        }
        let kek = entry
            .versions
            .get(&header.version)
            .ok_or(Error::DecryptFailed)?;
        let dek = kek
            .material
            .unwrap(wrapped, &canonical)
            .map_err(|_| Error::DecryptFailed)?;
        self.held_unwrap(i, header.version);
        Ok((i, header.version, dek, canonical))
    }

    /// What `who` may do with key `name` of its tenant.
    pub fn key_use(&mut self, who: &Principal, name: &str) -> Result<KeyUse, Error> {
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        let none = Context::new();
        Ok(KeyUse {
            algorithm: entry.record.algorithm,
            state: entry.record.state,
            can_encrypt: entry
                .check_grant(&who.identity, GrantOperation::Wrap, &none)
                .is_ok(),
            can_decrypt: entry
                .check_grant(&who.identity, GrantOperation::Unwrap, &none)
                .is_ok(),
        })
    }

    /// The AES-256 material of `version` of entry `i`, or `missing`.
    fn aes_version(
        &self,
        i: usize,
        version: u32,
        missing: Error,
    ) -> Result<(&SecretKey, &crate::base::usage::Usage), Error> {
        let kek = self.entries[i].versions.get(&version).ok_or(missing)?;
        match &kek.material {
            crate::crypto::kek::Kek::Aes(key) => Ok((key, &kek.usage)),
            crate::crypto::kek::Kek::Rsa(_) | crate::crypto::kek::Kek::Secret(_) => Err(
                Error::InvalidRequest("detached encryption needs an AES-256 key".into()),
            ),
        }
    }

    /// Encrypts `plaintext` bound to `aad` under key `name`'s current version, detached
    /// ([`DetachedCiphertext`]). Needs a `wrap` grant (no context) and an enabled
    /// AES-256 key.
    /// The AAD may name the version (`aad_for(version)`): protocols that keep the version
    /// beside the ciphertext authenticate it that way.
    pub fn encrypt_detached(
        &mut self,
        who: &Principal,
        name: &str,
        aad_for: impl FnOnce(u32) -> Vec<u8>,
        plaintext: &[u8],
    ) -> Result<DetachedCiphertext, Error> {
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Wrap, &Context::new())?;
        entry.check_usable()?;
        let version = entry.record.current_version;
        let key_name = entry.record.name.clone();
        let (key, usage) = self.aes_version(i, version, entry.current_unreadable())?;
        let mut iv = [0u8; crate::crypto::aead::DETACHED_SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut iv)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        let mut ciphertext = plaintext.to_vec();
        let aad = aad_for(version);
        let tag =
            crate::crypto::aead::seal_detached(key, &iv, DETACHED_LABEL, &aad, &mut ciphertext)?;
        usage.wrap(self.keyring.clock.now());
        Ok(DetachedCiphertext {
            key: key_name,
            version,
            iv,
            ciphertext,
            tag,
        })
    }

    /// Checks that `c`, just made by [`Lookups::encrypt_detached`] for `who`, opens under
    /// `aad` to `plaintext` (compared in constant time): the test decryption protocols ask
    /// for before the ciphertext is trusted (XKS CDIV). Returns nothing to the caller, so
    /// it needs no `unwrap` grant and counts no use.
    pub fn verify_detached(
        &mut self,
        who: &Principal,
        c: &DetachedCiphertext,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(), Error> {
        let i = self.by_name(&who.tenant, &c.key)?;
        let (key, _) = self.aes_version(
            i,
            c.version,
            Error::Internal("test decryption: version missing"),
        )?;
        let mut buf = zeroize::Zeroizing::new(c.ciphertext.clone());
        let opened =
            crate::crypto::aead::open_detached(key, &c.iv, DETACHED_LABEL, aad, &mut buf, &c.tag);
        let same: bool = subtle::ConstantTimeEq::ct_eq(&buf[..], plaintext).into();
        if opened.is_err() || !same {
            return Err(Error::Internal(
                "test decryption of a fresh ciphertext failed",
            ));
        }
        Ok(())
    }

    /// The entry of key `name` if `who` may decrypt under its `version` with the protocol
    /// adapters' detached operations: an `unwrap` grant (no context), an enabled key, a
    /// version not retired (else the opaque `DecryptFailed`).
    fn decryptable(&mut self, who: &Principal, name: &str, version: u32) -> Result<usize, Error> {
        let i = self.by_name(&who.tenant, name)?;
        let entry = &self.entries[i];
        entry.check_grant(&who.identity, GrantOperation::Unwrap, &Context::new())?;
        entry.check_usable()?;
        if version < entry.record.min_decrypt_version {
            return Err(Error::DecryptFailed);
        }
        let name = &entry.record.name;
        self.keyring
            .charge_brake(&mut self.brake, who, name, None)?;
        Ok(i)
    }

    /// Reverses [`Lookups::encrypt_detached`] with the version the caller kept. Needs an
    /// `unwrap` grant (no context) and an enabled key; a version below the key's minimum
    /// decrypt version, an unknown one, or any altered byte is the opaque `DecryptFailed`.
    #[allow(clippy::too_many_arguments)]
    pub fn decrypt_detached(
        &mut self,
        who: &Principal,
        name: &str,
        version: u32,
        iv: &[u8; crate::crypto::aead::DETACHED_SALT_LEN],
        ciphertext: &[u8],
        tag: &[u8; crate::crypto::aead::TAG_LEN],
        aad: &[u8],
    ) -> Result<Unwrapped, Error> {
        let i = self.decryptable(who, name, version)?;
        let key_name = self.entries[i].record.name.clone();
        let (key, _) = self.aes_version(i, version, Error::DecryptFailed)?;
        let mut buf = zeroize::Zeroizing::new(ciphertext.to_vec());
        crate::crypto::aead::open_detached(key, iv, DETACHED_LABEL, aad, &mut buf, tag)
            .map_err(|_| Error::DecryptFailed)?;
        self.held_unwrap(i, version);
        Ok(Unwrapped {
            plaintext: SecretVec::new(std::mem::take(&mut *buf)),
            key: key_name,
            version,
        })
    }

    /// RSA-OAEP-SHA-256 decryption with no label under `version` of RSA key `name`
    /// (Microsoft DKE). Needs an `unwrap` grant (no context) and an enabled key; a retired
    /// or unknown version, or a ciphertext that does not open, is `DecryptFailed`.
    pub fn decrypt_unlabelled(
        &mut self,
        who: &Principal,
        name: &str,
        version: u32,
        ciphertext: &[u8],
    ) -> Result<Unwrapped, Error> {
        let i = self.decryptable(who, name, version)?;
        let entry = &self.entries[i];
        let key_name = entry.record.name.clone();
        let kek = entry.versions.get(&version).ok_or(Error::DecryptFailed)?;
        let plaintext = kek
            .material
            .decrypt_unlabelled(ciphertext)
            .ok_or_else(|| Error::InvalidRequest(format!("key {key_name} is not an RSA key")))?
            .map_err(|_| Error::DecryptFailed)?;
        self.held_unwrap(i, version);
        Ok(Unwrapped {
            plaintext,
            key: key_name,
            version,
        })
    }

    /// KMIP's Digest of key `name` of `tenant`: SHA-256 of its current version's raw
    /// AES key (a fingerprint; the material stays here). The caller checks who may read
    /// the key's attributes.
    pub fn digest(&mut self, tenant: &str, name: &str) -> Result<[u8; 32], Error> {
        let i = self.by_name(tenant, name)?;
        let version = self.entries[i].record.current_version;
        let (key, _) = self.aes_version(i, version, Error::Internal("current version missing"))?;
        let d = ring::digest::digest(&ring::digest::SHA256, key.expose_secret());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Ok(out)
    }

    /// The raw material of key `name`'s current version, if the key was registered or
    /// created extractable ([`crate::keyring::Lifecycle::extractable`]) and is enabled or
    /// disabled (not pending deletion). The caller checks who may read the key, audits
    /// and alerts: the only way Keyhold hands key material out.
    pub fn export_extractable(&mut self, tenant: &str, name: &str) -> Result<SecretVec, Error> {
        let i = self.by_name(tenant, name)?;
        let record = &self.entries[i].record;
        if !record.lifecycle.extractable {
            return Err(Error::PermissionDenied("the key is not extractable"));
        }
        if !matches!(record.state, KeyState::Enabled | KeyState::Disabled) {
            return Err(Error::KeyDisabled(record.state));
        }
        let version = record.current_version;
        let kek = self.entries[i]
            .versions
            .get(&version)
            .ok_or(Error::Internal("current version missing"))?;
        match &kek.material {
            crate::crypto::kek::Kek::Aes(key) => Ok(SecretVec::new(key.expose_secret().to_vec())),
            crate::crypto::kek::Kek::Secret(data) => {
                Ok(SecretVec::new(data.expose_secret().to_vec()))
            }
            crate::crypto::kek::Kek::Rsa(_) => Err(Error::InvalidRequest(
                "only AES-256 keys and secret data are extractable".into(),
            )),
        }
    }

    /// The id (hex) of key `name` of `who`'s tenant.
    pub fn key_id(&mut self, who: &Principal, name: &str) -> Result<String, Error> {
        let i = self.by_name(&who.tenant, name)?;
        Ok(self.entries[i].record.id.clone())
    }

    /// Unwraps a wrapped DEK of the caller's tenant, bound to `context`.
    pub fn unwrap(
        &mut self,
        who: &Principal,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Unwrapped, Error> {
        let (i, version, plaintext, _) =
            self.open_wrapped(who, GrantOperation::Unwrap, wrapped, context)?;
        Ok(Unwrapped {
            plaintext,
            key: self.entries[i].record.name.clone(),
            version,
        })
    }

    /// Re-wraps under the key's current version with the same context. The DEK never
    /// leaves the server.
    pub fn rewrap(
        &mut self,
        who: &Principal,
        wrapped: &[u8],
        context: &Context,
    ) -> Result<Wrapped, Error> {
        let (i, _, dek, canonical) =
            self.open_wrapped(who, GrantOperation::Rewrap, wrapped, context)?;
        self.keyring
            .wrap_with(&self.entries[i], dek.expose_secret(), &canonical)
    }
}
#[cfg(test)]
mod tests {
    use kms_client::api::Grant;

    use super::*;
    use crate::keyring::testing::{ctx, setup, who};

    #[test]
    fn grants_default_deny_and_constraints() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, vec![])
            .unwrap();
        let app = who("t");
        let other = Principal {
            identity: "other".into(),
            ..who("t")
        };
        // No grant: denied.
        assert!(matches!(
            ring.lookups().unwrap().datakey(&app, "k", &Context::new()),
            Err(Error::PermissionDenied(_))
        ));
        let mut unwrap_acme = Grant::new("other", &[GrantOperation::Unwrap]);
        unwrap_acme.constraints.context_subset = Some(ctx("tenant", "acme"));
        ring.set_grants(
            "t",
            "k",
            vec![Grant::new("app", &[GrantOperation::Datakey]), unwrap_acme],
            crate::keyring::Clearance::Cleared,
        )
        .unwrap();
        let acme = ctx("tenant", "acme");
        let dk = ring.lookups().unwrap().datakey(&app, "k", &acme).unwrap();
        let globex = ring
            .lookups()
            .unwrap()
            .datakey(&app, "k", &ctx("tenant", "globex"))
            .unwrap();
        // app may not unwrap (datakey only); other may, for acme only.
        assert!(matches!(
            ring.lookups().unwrap().unwrap(&app, &dk.wrapped, &acme),
            Err(Error::PermissionDenied(_))
        ));
        assert_eq!(
            ring.lookups()
                .unwrap()
                .unwrap(&other, &dk.wrapped, &acme)
                .unwrap()
                .plaintext,
            dk.plaintext
        );
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&other, &globex.wrapped, &ctx("tenant", "globex")),
            Err(Error::PermissionDenied(_))
        ));
        // Lying about the context to pass the constraint fails the decryption.
        assert!(matches!(
            ring.lookups()
                .unwrap()
                .unwrap(&other, &globex.wrapped, &acme),
            Err(Error::DecryptFailed)
        ));
        assert!(matches!(
            ring.lookups().unwrap().rewrap(&other, &dk.wrapped, &acme),
            Err(Error::PermissionDenied(_))
        ));
        // Bad grant sets are refused and change nothing.
        for bad in [
            vec![Grant::new("", &[GrantOperation::Wrap])],
            vec![Grant::new("x", &[])],
            vec![Grant::new(
                "x",
                &[GrantOperation::Wrap, GrantOperation::Wrap],
            )],
        ] {
            assert!(matches!(
                ring.set_grants("t", "k", bad, crate::keyring::Clearance::Cleared),
                Err(Error::InvalidRequest(_))
            ));
        }
        assert_eq!(ring.key_info("t", "k").unwrap().grants.len(), 2);
    }
}
