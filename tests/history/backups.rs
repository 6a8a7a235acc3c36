//! Check c's restore: a backup document into a fresh embedded store, through the server's
//! own `kms_server::keyring::backup::restore` (which opens every KEK version before it writes),
//! then the restored keys and DEKs read back through a `Keyring` on that store.

use std::collections::BTreeMap;

use kms_client::api::KeyState;
use kms_server::access::policy::{Principal, Role};
use kms_server::crypto::seal::KeyFileSealer;
use kms_server::storage::Engine;

use crate::model::{BackupVerifier, Dek, History};

/// At most this many DEKs are unwrapped per backup (spread evenly over those acknowledged
/// before it): the long runs acknowledge hundreds of thousands.
const DEKS_PER_BACKUP: usize = 2000;

pub struct Restorer;

impl BackupVerifier for Restorer {
    fn verify(
        &self,
        h: &History,
        doc: &serde_json::Value,
        expect: &BTreeMap<String, u32>,
        deks: &[&Dek],
    ) -> Result<(), String> {
        let backup: kms_server::keyring::backup::Backup = serde_json::from_value(doc.clone())
            .map_err(|e| format!("not a backup document: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let key_file = dir.path().join("master.key");
        std::fs::write(&key_file, h.key_file.bytes()).map_err(|e| e.to_string())?;
        let store = dir.path().join("restored.redb");
        let sealer = KeyFileSealer::new(&key_file);
        {
            let ring = keyhold_tests::keyring_with_erasure(Engine::Redb, &store);
            kms_server::keyring::backup::restore(
                &ring,
                &sealer,
                &backup,
                &store.with_extension("erasure"),
            )
            .map_err(|e| format!("does not restore into a fresh store: {e}"))?;
        }
        let ring = keyhold_tests::keyring_with_erasure(Engine::Redb, &store);
        ring.unseal(&sealer)
            .map_err(|e| format!("restored, but the restored store does not unseal: {e}"))?;
        let tenant = h.tenant.as_str();
        let mut problems = Vec::new();
        for (name, version) in expect {
            match ring.key_info(tenant, name) {
                Err(e) => problems.push(format!(
                    "key {name}, created before the backup began, is not in it ({e})"
                )),
                Ok(info) if info.current_version < *version => problems.push(format!(
                    "key {name} is at version {} in it, but version {version} was acknowledged before the backup began",
                    info.current_version
                )),
                Ok(_) => {}
            }
        }
        // Make every key usable by the app (the backup may hold it disabled, pending
        // deletion, with versions retired or the app's grant removed), then unwrap.
        let who = Principal {
            identity: crate::workload::APP.1.into(),
            tenant: tenant.into(),
            role: Role::App,
        };
        let step = deks.len().div_ceil(DEKS_PER_BACKUP).max(1);
        let mut fixed = std::collections::BTreeSet::new();
        for dek in deks.iter().step_by(step) {
            if !expect.contains_key(&dek.key) {
                continue;
            }
            if fixed.insert(dek.key.clone()) {
                let Ok(info) = ring.key_info(tenant, &dek.key) else {
                    continue;
                };
                if info.state == KeyState::PendingDeletion {
                    let _ = ring.cancel_deletion(tenant, &dek.key);
                }
                let _ = ring.set_enabled(tenant, &dek.key, true);
                let _ = ring.set_min_decrypt_version(
                    tenant,
                    &dek.key,
                    1,
                    kms_server::keyring::Clearance::Cleared,
                );
                let _ = ring.set_grants(
                    tenant,
                    &dek.key,
                    crate::workload::grants_of(&[crate::workload::APP.1.to_string()]),
                    kms_server::keyring::Clearance::Cleared,
                );
            }
            match ring
                .lookups()
                .and_then(|mut keys| keys.unwrap(&who, &dek.wrapped, &dek.context))
            {
                Ok(u) if u.plaintext.expose_secret() == dek.plaintext.as_slice() => {}
                Ok(_) => problems.push(format!(
                    "dek #{} (key {}, version {}, acked {:.3}s) unwraps to other bytes from it",
                    dek.op,
                    dek.key,
                    dek.version,
                    crate::model::secs(dek.acked)
                )),
                Err(e) => problems.push(format!(
                    "dek #{} (key {}, version {}, acked {:.3}s) does not unwrap from it: {e}",
                    dek.op,
                    dek.key,
                    dek.version,
                    crate::model::secs(dek.acked)
                )),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let n = problems.len();
            problems.truncate(10);
            Err(format!(
                "restored, but {n} problems: {}",
                problems.join("; ")
            ))
        }
    }
}
