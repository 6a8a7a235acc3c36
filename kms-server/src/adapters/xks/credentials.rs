//! A key store's SigV4 credentials: a TOML file of one or more `[[credential]]` entries,
//! re-read when it changes and on SIGHUP, so a rotation (add the new credential, update
//! the key store in AWS, remove the old one) needs no restart. A file that fails to load
//! leaves the previous credentials in force.
//!
//! ```toml
//! [[credential]]
//! access_key_id = "AKIAI2SFODNN7EXAMPLE"      # 20 to 30 of A-Z 2-7
//! secret_access_key = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"  # 43 to 64 of A-Z a-z 0-9 + / =
//! ```
//!
//! The file holds secrets: it must not be world-readable nor writable by group or others.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use serde::Deserialize;
use zeroize::Zeroizing;

use super::sigv4::Credential;

/// Most credentials one key store holds.
pub const MAX_CREDENTIALS: usize = 8;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    credential: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    access_key_id: String,
    secret_access_key: String,
}

/// Whether `id` has the form AWS requires of an XKS access key id.
pub fn valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// Whether `secret` has the form AWS requires of an XKS secret access key.
pub fn valid_secret(secret: &str) -> bool {
    (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// Reads and checks a credentials file. Errors never quote a secret.
pub fn load(path: &Path) -> Result<Vec<Credential>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o026 != 0 {
            return Err(format!(
                "{}: mode {:o} lets other users read or change the secrets: chmod 600 (or 640)",
                path.display(),
                mode & 0o777
            ));
        }
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let file: File = toml::from_str(&text).map_err(|e| {
        // toml's message may quote the offending line: keep only its first line, which
        // names the problem and position.
        let msg = e
            .message()
            .lines()
            .next()
            .unwrap_or("syntax error")
            .to_owned();
        format!("{}: {msg}", path.display())
    })?;
    if file.credential.is_empty() {
        return Err(format!("{}: no [[credential]] entry", path.display()));
    }
    if file.credential.len() > MAX_CREDENTIALS {
        return Err(format!(
            "{}: at most {MAX_CREDENTIALS} credentials",
            path.display()
        ));
    }
    let mut out: Vec<Credential> = Vec::with_capacity(file.credential.len());
    for (i, e) in file.credential.into_iter().enumerate() {
        let secret = Zeroizing::new(e.secret_access_key);
        if !valid_access_key_id(&e.access_key_id) {
            return Err(format!(
                "{}: credential[{i}].access_key_id must be 20 to 30 of A-Z 2-7",
                path.display()
            ));
        }
        if !valid_secret(&secret) {
            return Err(format!(
                "{}: credential[{i}].secret_access_key must be 43 to 64 of A-Z a-z 0-9 + / =",
                path.display()
            ));
        }
        if out.iter().any(|c| c.access_key_id() == e.access_key_id) {
            return Err(format!(
                "{}: access key id {} appears twice",
                path.display(),
                e.access_key_id
            ));
        }
        out.extend(Credential::new(&e.access_key_id, secret));
    }
    Ok(out)
}

/// A fresh credential in AWS's format: a 24-character access key id of `A-Z2-7` and a
/// 64-character secret (48 random bytes, base64).
pub fn generate() -> Result<(String, Zeroizing<String>), crate::base::error::Error> {
    use base64::Engine as _;
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let rng = ring::rand::SystemRandom::new();
    let mut raw = Zeroizing::new([0u8; 24 + 48]);
    rng.fill(&mut raw[..])
        .map_err(|_| crate::base::error::Error::Internal("system random generator failed"))?;
    // 32 symbols divide 256: every symbol equally likely.
    let id = raw[..24]
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect();
    let secret = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&raw[24..]));
    Ok((id, secret))
}

/// Appends a `[[credential]]` entry to `path` (created with mode 600 if absent; an
/// existing file must already pass [`load`]'s permission check).
pub fn append(path: &Path, id: &str, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let entry = Zeroizing::new(format!(
        "\n[[credential]]\naccess_key_id = \"{id}\"\nsecret_access_key = \"{secret}\"\n"
    ));
    f.write_all(entry.as_bytes())?;
    f.sync_all()
}

/// The XKS proxy configuration file the AWS KMS console accepts (specification, "XKS
/// proxy configuration in AWS KMS console").
pub fn console_json(prefix: &str, id: &str, secret: &str) -> Zeroizing<String> {
    Zeroizing::new(
        serde_json::json!({
            "XksProxyUriPath": format!("{prefix}{}", super::settings::API_ROOT),
            "XksProxyAuthenticationCredential": {
                "AccessKeyId": id,
                "RawSecretAccessKey": secret,
            }
        })
        .to_string(),
    )
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The credentials of one key store, swapped whole on reload.
pub struct CredentialSet {
    path: PathBuf,
    current: RwLock<Arc<Vec<Credential>>>,
    loaded: Mutex<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for CredentialSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSet")
            .field("path", &self.path)
            .field("credentials", &self.current().len())
            .finish()
    }
}

impl CredentialSet {
    /// Loads `path`; fails if it does not load.
    pub fn open(path: &Path) -> Result<Self, String> {
        let stamp = stamp(path);
        let creds = load(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(creds)),
            loaded: Mutex::new(stamp),
        })
    }

    /// The credentials in force.
    pub fn current(&self) -> Arc<Vec<Credential>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file changed since it was last loaded.
    pub fn changed(&self) -> bool {
        stamp(&self.path) != *self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-reads the file; on failure the previous credentials stay. Returns the access
    /// key ids now in force.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let stamp = stamp(&self.path);
        // Remember the attempt either way, so a broken file is reported once per change.
        *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        let creds = load(&self.path)?;
        let ids = creds.iter().map(|c| c.access_key_id().to_owned()).collect();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(creds);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ID: &str = "AKIAI2SFODNN7EXAMPLE";
    const SECRET: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("creds.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn entry(id: &str, secret: &str) -> String {
        format!("[[credential]]\naccess_key_id = \"{id}\"\nsecret_access_key = \"{secret}\"\n")
    }

    #[test]
    fn generated_credentials_have_aws_form_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let (a, sa) = generate().unwrap();
        let (b, sb) = generate().unwrap();
        assert_ne!(a, b);
        for (id, secret) in [(&a, &sa), (&b, &sb)] {
            assert!(valid_access_key_id(id), "{id}");
            assert!(valid_secret(secret));
            append(&p, id, secret).unwrap();
        }
        let creds = load(&p).unwrap();
        assert_eq!(creds.len(), 2);
        let json: serde_json::Value = serde_json::from_str(&console_json("/p", &a, &sa)).unwrap();
        assert_eq!(json["XksProxyUriPath"], "/p/kms/xks/v1");
        assert_eq!(
            json["XksProxyAuthenticationCredential"]["AccessKeyId"],
            a.as_str()
        );
    }

    #[test]
    fn loads_checks_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &entry(ID, SECRET), 0o600);
        let set = CredentialSet::open(&p).unwrap();
        assert_eq!(set.current()[0].access_key_id(), ID);
        assert!(!set.changed());
        // Debug never shows a secret.
        assert!(!format!("{set:?} {:?}", set.current()).contains(SECRET));

        // A rotation: two credentials at once.
        let second = "BKIAI2SFODNN7EXAMPLE2";
        let both = entry(ID, SECRET) + &entry(second, &"x".repeat(43));
        let p = write(dir.path(), &both, 0o600);
        assert!(set.changed());
        assert_eq!(
            set.reload().unwrap(),
            vec![ID.to_owned(), second.to_owned()]
        );

        // A broken file keeps the previous ones, and its error quotes no secret.
        for (text, mode, needle) in [
            (entry("short", SECRET), 0o600, "access_key_id"),
            (entry(ID, "not a valid secret!"), 0o600, "secret_access_key"),
            (entry(ID, SECRET) + &entry(ID, SECRET), 0o600, "twice"),
            (String::new(), 0o600, "no [[credential]]"),
            (entry(ID, SECRET), 0o644, "chmod"),
            (format!("credential = [ {{ access_key_id = \"{ID}\", secret_access_key = \"{SECRET}\", extra = 1 }} ]"), 0o600, "unknown field"),
        ] {
            let p2 = write(dir.path(), &text, mode);
            assert_eq!(p2, p);
            let err = set.reload().unwrap_err();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains(SECRET), "{err}");
            assert_eq!(set.current().len(), 2);
        }
    }
}
