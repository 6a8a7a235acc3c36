//! Key-file sealing: the master key encrypted under a 32-byte key read from a file.
//! For simple deployments (the file on a separate mount, or a systemd credential) and
//! dev mode.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{
    check_method, seal_under, unseal_under, SealError, SealMethod, SealedMasterKey, Sealer,
};
use crate::crypto::secret::{SecretKey, KEY_LEN};

/// Seals under the key in a file (exactly 32 raw bytes, or 64 hex digits).
pub struct KeyFileSealer {
    path: PathBuf,
}

impl KeyFileSealer {
    /// A sealer reading `path` whenever it seals or unseals.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Writes a fresh random key file (mode 0600). Refuses to overwrite an existing file:
    /// losing it would make the store unreadable.
    pub fn generate(path: &Path) -> Result<(), SealError> {
        let err = |reason: String| SealError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let key = SecretKey::generate().map_err(|_| SealError::Random)?;
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
        f.write_all(key.expose_secret())
            .map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    fn read_key(&self) -> Result<SecretKey, SealError> {
        let err = |reason: String| SealError::KeyFile {
            path: self.path.display().to_string(),
            reason,
        };
        let bytes = Zeroizing::new(fs::read(&self.path).map_err(|e| err(e.to_string()))?);
        if bytes.len() == KEY_LEN {
            return SecretKey::from_slice(&bytes).ok_or_else(|| err("unreadable".into()));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            err(format!(
                "must hold {KEY_LEN} raw bytes or {} hex digits",
                2 * KEY_LEN
            ))
        })?;
        let decoded = Zeroizing::new(super::unhex(text.trim()).unwrap_or_default());
        SecretKey::from_slice(&decoded).ok_or_else(|| {
            err(format!(
                "must hold {KEY_LEN} raw bytes or {} hex digits",
                2 * KEY_LEN
            ))
        })
    }
}

impl Sealer for KeyFileSealer {
    fn method(&self) -> SealMethod {
        SealMethod::KeyFile
    }

    fn seal(&self, master: &SecretKey) -> Result<SealedMasterKey, SealError> {
        let kek = self.read_key()?;
        Ok(SealedMasterKey {
            method: SealMethod::KeyFile,
            argon2: None,
            shamir: None,
            pkcs11: None,
            sealed: seal_under(&kek, SealMethod::KeyFile, master)?,
        })
    }

    fn unseal(&self, sealed: &SealedMasterKey) -> Result<SecretKey, SealError> {
        check_method(sealed, SealMethod::KeyFile)?;
        let kek = self.read_key()?;
        unseal_under(&kek, sealed, "key file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_wrong_file_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.key");
        let b = dir.path().join("b.key");
        KeyFileSealer::generate(&a).unwrap();
        KeyFileSealer::generate(&b).unwrap();
        assert!(KeyFileSealer::generate(&a).is_err(), "must not overwrite");
        let master = SecretKey::generate().unwrap();
        let sealed = KeyFileSealer::new(&a).seal(&master).unwrap();
        assert!(!sealed
            .sealed
            .contains(&super::super::hex(master.expose_secret())));
        assert_eq!(KeyFileSealer::new(&a).unseal(&sealed).unwrap(), master);
        assert!(matches!(
            KeyFileSealer::new(&b).unseal(&sealed),
            Err(SealError::WrongSecret(_))
        ));
        fs::write(&b, b"short").unwrap();
        assert!(matches!(
            KeyFileSealer::new(&b).unseal(&sealed),
            Err(SealError::KeyFile { .. })
        ));
        let hexfile = dir.path().join("hex.key");
        fs::write(
            &hexfile,
            format!("{}\n", super::super::hex(&fs::read(&a).unwrap())),
        )
        .unwrap();
        assert_eq!(
            KeyFileSealer::new(&hexfile).unseal(&sealed).unwrap(),
            master
        );
    }
}
