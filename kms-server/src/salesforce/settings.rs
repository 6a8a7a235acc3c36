//! The `[salesforce]` table: the callout credential, Salesforce's BYOK certificate, and the
//! served keys (key identifier → a Keyhold data key, wrapped).

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    /// The unique key identifier configured in Salesforce.
    kid: String,
    /// The AES-256 Keyhold key the data key was made under.
    key: String,
    /// The data key, wrapped (base64): `POST /v1/keys/{key}/datakey` with the context
    /// `{"salesforce": <kid>}`, as the Salesforce identity.
    wrapped: String,
}

/// `[salesforce]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSalesforce {
    tenant: String,
    identity: String,
    /// The secret the Named Credential sends (`Authorization: Bearer`), mode 600.
    credential_file: PathBuf,
    /// The BYOK-compatible certificate downloaded from Salesforce (PEM).
    certificate: PathBuf,
    #[serde(default)]
    keys: Vec<FileKey>,
}

/// One served key.
#[derive(Debug, Clone)]
pub struct ServedKey {
    /// Key identifier.
    pub kid: String,
    /// Keyhold key.
    pub key: String,
    /// The wrapped data key.
    pub wrapped: Vec<u8>,
}

/// `[salesforce]`, validated.
#[derive(Debug, Clone)]
pub struct SalesforceSettings {
    /// Tenant.
    pub tenant: String,
    /// Identity of the callouts (grant: `unwrap` under the context above).
    pub identity: String,
    /// The credential file.
    pub credential_file: PathBuf,
    /// Salesforce's certificate.
    pub certificate: PathBuf,
    /// Served keys.
    pub keys: Vec<ServedKey>,
}

impl FileSalesforce {
    /// Validates; errors are (dotted field under `salesforce`, message).
    pub(crate) fn validate(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<SalesforceSettings, (String, String)> {
        let e = |f: &str, m: &str| Err((format!("salesforce.{f}"), m.to_owned()));
        let (credential_file, certificate) =
            (resolve(&self.credential_file), resolve(&self.certificate));
        for (f, p) in [
            ("credential_file", &credential_file),
            ("certificate", &certificate),
        ] {
            if !p.is_file() {
                return e(f, &format!("{} is not a readable file", p.display()));
            }
        }
        if self.tenant.is_empty() || self.identity.is_empty() {
            return e("tenant", "tenant and identity are required");
        }
        let mut keys: Vec<ServedKey> = Vec::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            let valid = !k.kid.is_empty()
                && k.kid.len() <= 128
                && k.kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid {
                return e(
                    &format!("keys[{i}].kid"),
                    "1 to 128 letters, digits, '-', '_', '.'",
                );
            }
            if keys.iter().any(|s| s.kid == k.kid) {
                return e(&format!("keys[{i}].kid"), "used twice");
            }
            let Some(wrapped) = super::decode_wrapped(&k.wrapped) else {
                return e(&format!("keys[{i}].wrapped"), "not base64");
            };
            keys.push(ServedKey {
                kid: k.kid,
                key: k.key,
                wrapped,
            });
        }
        Ok(SalesforceSettings {
            tenant: self.tenant,
            identity: self.identity,
            credential_file,
            certificate,
            keys,
        })
    }
}
