//! The `[[kubernetes]]` tables: one Kubernetes KMS v2 plugin socket each, serving one
//! Keyhold key as one identity (`docs/kubernetes-kms.md`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One `[[kubernetes]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileKubernetes {
    /// The unix socket the API server dials (`unix:///run/keyhold/kms.sock` in its
    /// `EncryptionConfiguration` names `/run/keyhold/kms.sock` here).
    socket: PathBuf,
    /// The Keyhold key (an AES-256 key of the identity's tenant).
    key: String,
    /// The mapped identity (`[[identities]]`, role `app`) whose grants the calls use:
    /// `wrap` for Encrypt, `unwrap` for Decrypt.
    identity: String,
    /// The socket file's owner: a user name or a numeric uid (default: the server's).
    #[serde(default)]
    owner: Option<String>,
    /// The socket file's group: a group name or a numeric gid (default: the server's).
    #[serde(default)]
    group: Option<String>,
}

/// One plugin socket, validated.
#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    /// The socket's path (absolute).
    pub socket: PathBuf,
    /// The Keyhold key.
    pub key: String,
    /// The identity the calls act as.
    pub identity: String,
    /// The socket's owner (None: the server's user).
    pub owner: Option<u32>,
    /// The socket's group (None: the server's group).
    pub group: Option<u32>,
}

impl FileKubernetes {
    /// Validates the table at index `i`; errors are (dotted field, message).
    pub(crate) fn validate(
        self,
        i: usize,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<KubernetesSettings, (String, String)> {
        let e = |f: &str, m: String| Err((format!("kubernetes[{i}].{f}"), m));
        let socket = resolve(&self.socket);
        // sockaddr_un holds 108 bytes with the terminating NUL.
        if socket.as_os_str().len() > 107 {
            return e(
                "socket",
                format!(
                    "{} is longer than a unix socket path can be (107 bytes)",
                    socket.display()
                ),
            );
        }
        if crate::keyring::validate_name(&self.key).is_err() {
            return e("key", format!("`{}` is not a key name", self.key));
        }
        if self.identity.is_empty() {
            return e(
                "identity",
                "names the mapped identity the calls act as".into(),
            );
        }
        let owner = match self.owner.as_deref() {
            None => None,
            Some(o) => Some(account_id(o, Path::new("/etc/passwd")).ok_or_else(|| {
                (
                    format!("kubernetes[{i}].owner"),
                    format!("`{o}` is neither a uid nor a user of /etc/passwd"),
                )
            })?),
        };
        let group = match self.group.as_deref() {
            None => None,
            Some(g) => Some(account_id(g, Path::new("/etc/group")).ok_or_else(|| {
                (
                    format!("kubernetes[{i}].group"),
                    format!("`{g}` is neither a gid nor a group of /etc/group"),
                )
            })?),
        };
        Ok(KubernetesSettings {
            socket,
            key: self.key,
            identity: self.identity,
            owner,
            group,
        })
    }
}

/// Validates every table: each socket path once.
pub(crate) fn validate_all(
    raw: Vec<FileKubernetes>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<KubernetesSettings>, (String, String)> {
    let mut out: Vec<KubernetesSettings> = Vec::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let k = k.validate(i, resolve)?;
        if out.iter().any(|o| o.socket == k.socket) {
            return Err((
                format!("kubernetes[{i}].socket"),
                format!("{} is configured twice", k.socket.display()),
            ));
        }
        out.push(k);
    }
    Ok(out)
}

/// A numeric id, or the id of `name` in a `name:x:id:...` database (`/etc/passwd`,
/// `/etc/group`). Directory services (NSS) are not consulted: give the number.
fn account_id(name: &str, database: &Path) -> Option<u32> {
    if let Ok(id) = name.parse() {
        return Some(id);
    }
    let text = std::fs::read_to_string(database).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_by_number_or_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("passwd");
        std::fs::write(
            &db,
            "root:x:0:0:root:/root:/bin/sh\nkube:x:990:990::/:/bin/false\n",
        )
        .unwrap();
        assert_eq!(account_id("1234", &db), Some(1234));
        assert_eq!(account_id("kube", &db), Some(990));
        assert_eq!(account_id("root", &db), Some(0));
        assert_eq!(account_id("nobody-here", &db), None);
    }

    #[test]
    fn a_socket_twice_or_too_long_is_refused() {
        let t = |socket: &str| FileKubernetes {
            socket: socket.into(),
            key: "k8s".into(),
            identity: "spiffe://x/apiserver".into(),
            owner: None,
            group: None,
        };
        let resolve = |p: &Path| p.to_path_buf();
        let twice = validate_all(vec![t("/run/a.sock"), t("/run/a.sock")], &resolve).unwrap_err();
        assert_eq!(twice.0, "kubernetes[1].socket");
        let long = format!("/run/{}.sock", "x".repeat(120));
        let too_long = validate_all(vec![t(&long)], &resolve).unwrap_err();
        assert_eq!(too_long.0, "kubernetes[0].socket");
        assert!(validate_all(vec![t("/run/a.sock"), t("/run/b.sock")], &resolve).is_ok());
    }
}
