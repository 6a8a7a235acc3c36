//! A throwaway SoftHSM2 token for PKCS#11 tests: its own configuration file and token
//! directory, initialized with `softhsm2-util` (Debian package `softhsm2`, installed by
//! `.ci/run`). Processes that should see it get `SOFTHSM2_CONF` (see [`SoftHsm::env`]).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian puts the module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub struct SoftHsm {
    pub conf: PathBuf,
    pub token_label: String,
    pub pin: String,
}

impl SoftHsm {
    /// A fresh token labelled `label` under `dir`, user PIN `pin`.
    pub fn new(dir: &Path, label: &str, pin: &str) -> SoftHsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install SoftHSM2 (apt-get install softhsm2; .ci/run does)"
        );
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                "so-pin-5678",
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SoftHsm {
            conf,
            token_label: label.into(),
            pin: pin.into(),
        }
    }

    /// The environment a process needs to see this token.
    pub fn env(&self) -> (&'static str, &Path) {
        ("SOFTHSM2_CONF", &self.conf)
    }

    /// What `pkcs11-probe` reports about the key labelled `key_label` (JSON).
    pub fn probe(&self, key_label: &str) -> serde_json::Value {
        let out = Command::new(crate::workspace_bin("pkcs11-probe"))
            .args([MODULE, &self.token_label, &self.pin, key_label])
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pkcs11-probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}
