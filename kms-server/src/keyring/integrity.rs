//! Authenticated authorization state: every key record (its state, grants,
//! `min_decrypt_version`, current version, rotation and deletion dates) carries an
//! HMAC-SHA256 under a key of the master-key hierarchy, so a row changed behind Keyhold's
//! back (by whoever can write the database table) is refused and reported, not obeyed. The
//! material was already authenticated (sealed with AAD); this covers the rest.
//!
//! - The MAC key is derived (HKDF) from the audit keys, which are derived from the master
//!   key or stored sealed under it and keep their value across master-key rotations: a
//!   rotation does not re-sign every record.
//! - The MAC covers the whole record but its erasure slots (which say where the material's
//!   erasure key is, and are rewritten by `migrate-store` without the master key; altering
//!   them can only make a key unreadable).
//! - A record that fails is refused with a 409 naming it, reported through the integrity
//!   hook (`record_tampered`: an alert and a metric in the server), and the request is
//!   audited with that outcome like any other.
//! - A record saying `destroyed` is obeyed unauthenticated: it only takes rights away (and
//!   anyone who can write the table can delete rows anyway).
//! - Stores from before MACs are signed once, at the first unseal, in one transaction with
//!   the marker `integrity/records/v1` (an HMAC itself). From then on a record without a
//!   valid MAC is refused. A marker that is absent while records are signed (deleted) or
//!   does not verify is reported, and signing does not run: unsigned records stay refused.
//!
//! Limit: while sealed, nothing can be checked; the destruction sweep waits for an unseal
//! (a forged `pending-deletion` record must not erase a key's erasure key).

use kms_client::api::KeyState;

use super::records::{to_json, KeyRecord};
use super::vault::Unsealed;
use super::Keyring;
use crate::base::error::Error;
use crate::crypto::authstate::StateSigner;
use crate::storage::{Table, WriteBatch};

/// The `meta` key of the marker saying every key record carries its MAC.
pub(crate) const META_RECORDS_MARKER: &[u8] = b"integrity/records/v1";
const RECORD_MAC_LABEL: &[u8] = b"keyhold/record-mac/v1";
const MARKER_MESSAGE: &[u8] = b"keyhold/record-mac/v1: every key record is signed";

/// A record-MAC key, derived from the audit keys: `info` `key-records` for key records,
/// `authorization-state` for [`StateSigner`].
pub(super) fn record_mac_key(audit_keys: &[u8; 64], info: &[u8]) -> Result<ring::hmac::Key, Error> {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, RECORD_MAC_LABEL).extract(audit_keys);
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    prk.expand(&[info], Len32)
        .and_then(|okm| okm.fill(&mut key[..]))
        .map_err(|_| Error::Internal("key derivation failed"))?;
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key[..]))
}

/// What the MAC covers: the record without its MAC and erasure slots.
fn mac_input(record: &KeyRecord) -> Result<Vec<u8>, Error> {
    let mut covered = record.clone();
    covered.mac = None;
    covered.erasure_slot = None;
    covered.shared_erasure_slot = None;
    let mut input = RECORD_MAC_LABEL.to_vec();
    input.extend_from_slice(&to_json(&covered)?);
    Ok(input)
}

impl Unsealed {
    /// Sets `record`'s MAC (after every other change to it).
    pub(super) fn sign_record(&self, record: &mut KeyRecord) -> Result<(), Error> {
        let tag = ring::hmac::sign(&self.record_mac, &mac_input(record)?);
        record.mac = Some(crate::crypto::seal::hex(tag.as_ref()));
        Ok(())
    }

    /// Whether `record` carries a valid MAC.
    fn record_authentic(&self, record: &KeyRecord) -> Result<bool, Error> {
        let Some(tag) = record.mac.as_deref().and_then(crate::crypto::seal::unhex) else {
            return Ok(false);
        };
        Ok(ring::hmac::verify(&self.record_mac, &mac_input(record)?, &tag).is_ok())
    }

    pub(super) fn marker(&self) -> Vec<u8> {
        crate::crypto::seal::hex(ring::hmac::sign(&self.record_mac, MARKER_MESSAGE).as_ref())
            .into_bytes()
    }
}

impl Keyring {
    /// Refuses a key record that is not to be obeyed (see the module docs), reporting it.
    pub(super) fn check_record(&self, un: &Unsealed, record: &KeyRecord) -> Result<(), Error> {
        if record.state == KeyState::Destroyed
            || !un.records_signed()
            || un.record_authentic(record)?
        {
            return Ok(());
        }
        tracing::error!(
            tenant = %record.tenant,
            key = %record.name,
            id = %record.id,
            "a key record fails authentication (changed outside Keyhold?): refused"
        );
        self.integrity_event(
            crate::base::event::AlertKind::RecordTampered,
            format!(
                "key {}/{} ({}): its record fails authentication",
                record.tenant, record.name, record.id
            ),
        );
        Err(Error::Unreadable(format!(
            "key {}'s stored record fails authentication (changed outside Keyhold): refused; the operators are alerted",
            record.name
        )))
    }

    /// At unseal: checks the marker; a store from before record MACs gets them, with the
    /// marker, in one transaction. Returns whether records are enforced from now on.
    pub(super) fn sign_legacy_records(&self, un: &Unsealed) -> Result<bool, Error> {
        let marker = self.store.get(Table::Meta, META_RECORDS_MARKER)?;
        if let Some(m) = &marker {
            if *m == un.marker() {
                return Ok(true);
            }
            self.integrity_event(
                crate::base::event::AlertKind::RecordTampered,
                "the key-record integrity marker does not verify: every unsigned record is refused"
                    .into(),
            );
            return Ok(true);
        }
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::new();
        batch.require(Table::Meta, META_RECORDS_MARKER, None).put(
            Table::Meta,
            META_RECORDS_MARKER,
            &un.marker(),
        );
        for (id, bytes) in self.store.scan_prefix(Table::Keys, b"")? {
            let Ok(mut record) = serde_json::from_slice::<KeyRecord>(&bytes) else {
                continue; // refused when loaded, like any unreadable record
            };
            if record.mac.is_some() {
                // Signed records without the marker: it was removed. Sign nothing.
                self.integrity_event(
                    crate::base::event::AlertKind::RecordTampered,
                    "the key-record integrity marker is missing from a store whose records are signed: every unsigned record is refused".into(),
                );
                return Ok(true);
            }
            un.sign_record(&mut record)?;
            batch
                .require(Table::Keys, &id, Some(&bytes))
                .put(Table::Keys, &id, &to_json(&record)?);
        }
        match self.store.commit(&batch) {
            Ok(()) => Ok(true),
            // Another node signed them first (or a record changed): the next unseal, or
            // the other node's marker, settles it; records stay enforced only then.
            Err(crate::storage::StoreError::Conflict(_)) => Ok(self
                .store
                .get(Table::Meta, META_RECORDS_MARKER)?
                .is_some_and(|m| m == un.marker())),
            Err(e) => Err(e.into()),
        }
    }
}

/// What a [`StateSigner`] MAC covers: its domain, then the message.
fn state_input(domain: &str, message: &[u8]) -> Vec<u8> {
    [domain.as_bytes(), b"\0", message].concat()
}

/// Runtime identities and lockouts ([`crate::crypto::authstate`]): MACs under a key derived, like
/// the key records', from the audit keys (`Error::Sealed` while sealed).
impl StateSigner for Keyring {
    fn sign(&self, domain: &'static str, message: &[u8]) -> Result<String, Error> {
        let un = self.unsealed()?;
        let tag = ring::hmac::sign(&un.state_mac, &state_input(domain, message));
        Ok(crate::crypto::seal::hex(tag.as_ref()))
    }

    fn verify(&self, domain: &'static str, message: &[u8], tag: &str) -> Result<bool, Error> {
        let un = self.unsealed()?;
        let Some(tag) = crate::crypto::seal::unhex(tag) else {
            return Ok(false);
        };
        Ok(ring::hmac::verify(&un.state_mac, &state_input(domain, message), &tag).is_ok())
    }

    fn report(&self, kind: crate::base::event::AlertKind, detail: String) {
        self.integrity_event(kind, detail);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kms_client::api::{Algorithm, Context, Grant, GrantOperation};

    use super::*;
    use crate::access::policy::{Principal, Role};
    use crate::crypto::format::KeyId;
    use crate::keyring::testing::{all_grant, setup, who};

    /// Rewrites key `name`'s stored record as someone with write access to the table
    /// would: parse, edit, write back (the MAC is left as it was).
    fn edit_row(ring: &Keyring, name: &str, edit: impl FnOnce(&mut KeyRecord)) -> KeyId {
        let id = ring
            .store()
            .get(Table::KeyNames, &super::super::records::name_key("t", name))
            .unwrap()
            .unwrap();
        let bytes = ring.store().get(Table::Keys, &id).unwrap().unwrap();
        let mut record: KeyRecord = serde_json::from_slice(&bytes).unwrap();
        edit(&mut record);
        let mut batch = WriteBatch::new();
        batch.put(Table::Keys, &id, &to_json(&record).unwrap());
        ring.store().commit(&batch).unwrap();
        KeyId(id.try_into().unwrap())
    }

    fn events(ring: &Keyring) -> Arc<Mutex<Vec<(crate::base::event::AlertKind, String)>>> {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        ring.on_integrity_event(Box::new(move |kind, detail| {
            seen.lock().unwrap().push((kind, detail));
        }));
        events
    }

    #[test]
    fn a_grant_added_outside_keyhold_is_refused_and_reported() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let events = events(&ring);
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        ring.create_key("t", "other", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let intruder = Principal {
            identity: "intruder".into(),
            tenant: "t".into(),
            role: Role::App,
        };
        edit_row(&ring, "k", |r| {
            r.grants.push(Grant::new("intruder", &GrantOperation::ALL))
        });
        // The node reads it again (a restart; on a shared store, another node).
        ring.seal();
        ring.unseal(&sealer).unwrap();
        let refused = ring
            .lookups()
            .and_then(|mut l| l.datakey(&intruder, "k", &Context::new()));
        assert!(
            matches!(&refused, Err(Error::Unreadable(m)) if m.contains("fails authentication")),
            "{:?}",
            refused.map(|d| d.version)
        );
        // Refused for everyone (the record is not obeyed at all), reported once per load.
        assert!(ring.key_info("t", "k").is_err());
        let seen = events.lock().unwrap().clone();
        assert!(seen.iter().any(|(kind, d)| *kind
            == crate::base::event::AlertKind::RecordTampered
            && d.contains("t/k")));
        // One bad record takes down only itself.
        assert_eq!(ring.list_keys("t").unwrap().len(), 1);
        assert!(ring
            .lookups()
            .and_then(|mut l| l.datakey(&who("t"), "other", &Context::new()))
            .is_ok());
    }

    #[test]
    fn a_forged_deletion_does_not_erase_a_key() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        let _events = events(&ring);
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let id = edit_row(&ring, "k", |r| {
            r.state = KeyState::PendingDeletion;
            r.deletion_date = Some(0);
        });
        let mut batch = WriteBatch::new();
        batch.put(
            Table::Deletions,
            &super::super::records::deletion_key(0, &id),
            b"",
        );
        ring.store().commit(&batch).unwrap();
        assert!(ring.destroy_due(u64::MAX).unwrap().is_empty());
        assert!(!ring
            .store()
            .scan_prefix(Table::Versions, &id.0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn records_from_before_macs_are_signed_once_then_enforced() {
        let (_d, ring, sealer) = setup();
        ring.unseal(&sealer).unwrap();
        ring.create_key("t", "k", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        // As a store written by an earlier version: no MACs, no marker.
        edit_row(&ring, "k", |r| r.mac = None);
        let mut batch = WriteBatch::new();
        batch.delete(Table::Meta, META_RECORDS_MARKER);
        ring.store().commit(&batch).unwrap();
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert!(ring.key_info("t", "k").is_ok(), "signed at unseal");
        assert!(ring
            .store()
            .get(Table::Meta, META_RECORDS_MARKER)
            .unwrap()
            .is_some());
        // From now on a stripped MAC is refused, and removing the marker again does not
        // make the next unseal sign a forged record.
        edit_row(&ring, "k", |r| {
            r.mac = None;
            r.grants.push(Grant::new("intruder", &GrantOperation::ALL));
        });
        ring.create_key("t", "k2", Algorithm::Aes256Gcm, None, all_grant())
            .unwrap();
        let mut batch = WriteBatch::new();
        batch.delete(Table::Meta, META_RECORDS_MARKER);
        ring.store().commit(&batch).unwrap();
        ring.seal();
        ring.unseal(&sealer).unwrap();
        assert!(ring.key_info("t", "k").is_err());
        assert!(ring.key_info("t", "k2").is_ok());
    }
}
