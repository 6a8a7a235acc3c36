//! An independent reader of a stopped server's files, for tests that look for key material
//! where it must not be: decrypts every KEK version as the records are documented in
//! `kms-server/src/keyring/` (material sealed under the master key bound to the key's
//! erasure key, AAD tenant ‖ id ‖ version) and `kms-server/src/storage/erasure/file.rs` (slots of 32
//! bytes after a 64-byte header).

use std::path::Path;

use kms_server::crypto::seal::{KeyFileSealer, Sealer};
use kms_server::storage::{self, Engine, Table};

/// One KEK, as found on disk.
pub struct KekOnDisk {
    pub tenant: String,
    pub name: String,
    /// Its erasure key, while not erased.
    pub erasure_key: Option<Vec<u8>>,
    /// Its versions' material, decrypted.
    pub versions: Vec<Vec<u8>>,
}

fn unhex(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// Every KEK of the redb store at `store_path` (the erasure file beside it), decrypted with
/// the key file; and the master key.
pub fn keks(store_path: &Path, key_file: &Path) -> (Vec<KekOnDisk>, Vec<u8>) {
    let store = storage::open(Engine::Redb, store_path).unwrap();
    let keyring = kms_server::keyring::Keyring::new(store.clone());
    let sealed = keyring.sealed_master_key().unwrap().unwrap();
    let master = KeyFileSealer::new(key_file).unseal(&sealed).unwrap();
    let erasure = std::fs::read(store_path.with_extension("erasure")).unwrap_or_default();
    let mut out = Vec::new();
    for (id, record) in store.scan_prefix(Table::Keys, b"").unwrap() {
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        let tenant = record["tenant"].as_str().unwrap().to_owned();
        let erasure_key = record["erasure_slot"].as_u64().map(|slot| {
            let at = 64 + 32 * slot as usize;
            erasure[at..at + 32].to_vec()
        });
        let erased = erasure_key
            .as_ref()
            .is_some_and(|k| k.iter().all(|b| *b == 0));
        let sealing = match &erasure_key {
            Some(ek) if !erased => {
                let ek: [u8; 32] = ek.as_slice().try_into().unwrap();
                Some(
                    kms_server::crypto::aead::bind_key(&master, &ek, b"keyhold/kek-erasure/v1")
                        .unwrap(),
                )
            }
            _ => None,
        };
        let mut versions = Vec::new();
        for (_, v) in store.scan_prefix(Table::Versions, &id).unwrap() {
            let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
            let version = v["version"].as_u64().unwrap() as u32;
            let mut aad = (tenant.len() as u32).to_be_bytes().to_vec();
            aad.extend_from_slice(tenant.as_bytes());
            aad.extend_from_slice(&id);
            aad.extend_from_slice(&version.to_be_bytes());
            let kek = kms_server::crypto::aead::open_box(
                sealing.as_ref().unwrap_or(&master),
                b"keyhold/kek-version/v1",
                &aad,
                &unhex(v["material"].as_str().unwrap()),
            )
            .expect("a stored KEK version opens");
            versions.push(kek.expose_secret().to_vec());
        }
        out.push(KekOnDisk {
            tenant,
            name: record["name"].as_str().unwrap().to_owned(),
            erasure_key: erasure_key.filter(|_| !erased),
            versions,
        });
    }
    (out, master.expose_secret().to_vec())
}

/// `raw`, and its standard base64 and lowercase hex forms: how a secret could appear.
pub fn encodings(raw: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        raw.to_vec(),
        base64::engine::general_purpose::STANDARD
            .encode(raw)
            .into_bytes(),
        hex.into_bytes(),
    ]
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that the key `name` is shredded in the stopped server's files: an independent
/// reader with the master key finds none of its versions and no erasure key, and no file
/// in `dir` holds any of `secrets` (raw, base64 or hex).
pub fn assert_shredded(
    dir: &Path,
    store_path: &Path,
    key_file: &Path,
    name: &str,
    secrets: &[Vec<u8>],
) {
    let (after, _) = keks(store_path, key_file);
    let gone = after.iter().find(|k| k.name == name).unwrap();
    assert!(
        gone.versions.is_empty() && gone.erasure_key.is_none(),
        "{name}: a version or its erasure key is still readable"
    );
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for secret in secrets {
            for form in encodings(secret) {
                assert!(
                    !contains(&bytes, &form),
                    "material of the destroyed key {name} is in {}",
                    path.display()
                );
            }
        }
    }
}
