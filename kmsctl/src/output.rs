//! Printing results (table or JSON) and explaining errors with a hint of what to try.

use std::fmt::Write as _;

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kms_client::api::{
    AuditPage, BatchResult, DatakeyResponse, ErrorCode, KeyInfo, LockoutList, SysStatus,
    UnwrapResponse, WrapResponse,
};
use serde::Serialize;

use crate::Output;

/// Prints in the chosen format.
pub(crate) struct Printer {
    format: Output,
}

pub(crate) fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Decodes a base64 argument, naming the flag on error.
pub(crate) fn b64_decode(s: &str, flag: &str) -> anyhow::Result<Vec<u8>> {
    B64.decode(s.trim())
        .with_context(|| format!("{flag} is not standard base64"))
}

/// Renders rows as aligned columns.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn state(k: &KeyInfo) -> String {
    serde_json::to_value(k.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn algorithm(k: &KeyInfo) -> String {
    serde_json::to_value(k.algorithm)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The table form of one key.
pub(crate) fn key_table(k: &KeyInfo) -> String {
    let mut out = table(
        &["FIELD", "VALUE"],
        &[
            vec!["name".into(), k.name.clone()],
            vec!["id".into(), k.id.clone()],
            vec!["algorithm".into(), algorithm(k)],
            vec!["state".into(), state(k)],
            vec!["created".into(), k.created_at.clone()],
            vec!["current version".into(), k.current_version.to_string()],
            vec![
                "min decrypt version".into(),
                k.min_decrypt_version.to_string(),
            ],
            vec![
                "rotation period".into(),
                k.rotation_period.clone().unwrap_or_else(|| "-".into()),
            ],
            vec![
                "deletion date".into(),
                k.deletion_date.clone().unwrap_or_else(|| "-".into()),
            ],
            vec!["grants".into(), k.grants.len().to_string()],
        ],
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = k
        .versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.created_at.clone(),
                if v.can_unwrap { "no" } else { "yes" }.into(),
                v.wraps.to_string(),
                v.unwraps.to_string(),
                v.last_used_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "VERSION",
            "CREATED",
            "RETIRED",
            "WRAPS",
            "UNWRAPS",
            "LAST USED",
        ],
        &rows,
    ));
    out
}

fn context_text(c: &kms_client::api::Context) -> String {
    c.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The table form of a key's grants.
pub(crate) fn grants_table(k: &KeyInfo) -> String {
    if k.grants.is_empty() {
        return format!(
            "no grants on {}: no identity may use it (default deny)\n",
            k.name
        );
    }
    let rows: Vec<Vec<String>> = k
        .grants
        .iter()
        .map(|g| {
            let mut when = Vec::new();
            if let Some(c) = &g.constraints.context_subset {
                when.push(format!("context has {}", context_text(c)));
            }
            if let Some(c) = &g.constraints.context_equals {
                when.push(format!("context is {}", context_text(c)));
            }
            vec![
                g.identity.clone(),
                g.operations
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                if when.is_empty() {
                    "always".into()
                } else {
                    when.join("; ")
                },
            ]
        })
        .collect();
    table(&["IDENTITY", "OPERATIONS", "WHEN"], &rows)
}

/// The table form of a key list.
pub(crate) fn key_list_table(keys: &[KeyInfo]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                state(k),
                k.current_version.to_string(),
                algorithm(k),
                k.created_at.clone(),
                k.rotation_period.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "VERSION",
            "ALGORITHM",
            "CREATED",
            "ROTATION",
        ],
        &rows,
    )
}

impl Printer {
    pub(crate) fn new(format: Output) -> Self {
        Self { format }
    }

    pub(crate) fn format(&self) -> Output {
        self.format
    }

    pub(crate) fn key_list(&self, keys: &[KeyInfo]) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(&serde_json::json!({ "keys": keys })),
            Output::Table => {
                print!("{}", key_list_table(keys));
                Ok(())
            }
        }
    }

    pub(crate) fn key(&self, k: &KeyInfo) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(k),
            Output::Table => {
                print!("{}", key_table(k));
                Ok(())
            }
        }
    }

    pub(crate) fn dry_run(&self, d: &kms_client::api::MinVersionDryRun) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(d),
            Output::Table => {
                println!(
                    "min_decrypt_version {} on {} would have refused {} unwrap(s) in the last {} day(s)",
                    d.version, d.key, d.unwraps_refused, d.window_days
                );
                let rows: Vec<Vec<String>> = d
                    .by_version
                    .iter()
                    .map(|v| vec![v.version.to_string(), v.unwraps.to_string()])
                    .collect();
                if !rows.is_empty() {
                    print!("{}", table(&["VERSION", "UNWRAPS IN WINDOW"], &rows));
                }
                Ok(())
            }
        }
    }

    pub(crate) fn grants(&self, k: &KeyInfo) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(&serde_json::json!({ "key": k.name, "grants": k.grants })),
            Output::Table => {
                print!("{}", grants_table(k));
                Ok(())
            }
        }
    }

    pub(crate) fn datakey(&self, d: &DatakeyResponse) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(d),
            Output::Table => {
                let pt = zeroize::Zeroizing::new(B64.encode(d.plaintext.expose_secret()));
                print!(
                    "{}",
                    table(
                        &["FIELD", "VALUE"],
                        &[
                            vec!["key".into(), d.key.clone()],
                            vec!["version".into(), d.version.to_string()],
                            vec!["plaintext".into(), pt.to_string()],
                            vec!["wrapped".into(), B64.encode(d.wrapped.as_bytes())],
                        ]
                    )
                );
                Ok(())
            }
        }
    }

    pub(crate) fn public_key(&self, p: &kms_client::api::PublicKeyResponse) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(p),
            Output::Table => {
                print!("{}", p.pem);
                Ok(())
            }
        }
    }

    pub(crate) fn wrapped(&self, w: &WrapResponse) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(w),
            Output::Table => {
                print!(
                    "{}",
                    table(
                        &["FIELD", "VALUE"],
                        &[
                            vec!["key".into(), w.key.clone()],
                            vec!["version".into(), w.version.to_string()],
                            vec!["wrapped".into(), B64.encode(w.wrapped.as_bytes())],
                        ]
                    )
                );
                Ok(())
            }
        }
    }

    pub(crate) fn unwrapped(&self, u: &UnwrapResponse) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(u),
            Output::Table => {
                let pt = zeroize::Zeroizing::new(B64.encode(u.plaintext.expose_secret()));
                print!(
                    "{}",
                    table(
                        &["FIELD", "VALUE"],
                        &[
                            vec!["key".into(), u.key.clone()],
                            vec!["version".into(), u.version.to_string()],
                            vec!["plaintext".into(), pt.to_string()],
                        ]
                    )
                );
                Ok(())
            }
        }
    }

    pub(crate) fn batch(&self, results: &[BatchResult]) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(&serde_json::json!({ "results": results })),
            Output::Table => {
                let rows: Vec<Vec<String>> = results
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let (op, outcome) = match r {
                            BatchResult::Datakey(d) => {
                                ("datakey", format!("ok (key {} v{})", d.key, d.version))
                            }
                            BatchResult::Wrap(w) => {
                                ("wrap", format!("ok (key {} v{})", w.key, w.version))
                            }
                            BatchResult::Unwrap(u) => {
                                ("unwrap", format!("ok (key {} v{})", u.key, u.version))
                            }
                            BatchResult::Rewrap(w) => {
                                ("rewrap", format!("ok (key {} v{})", w.key, w.version))
                            }
                            BatchResult::Error(e) => ("-", format!("{:?}: {}", e.code, e.message)),
                        };
                        vec![i.to_string(), op.into(), outcome]
                    })
                    .collect();
                print!("{}", table(&["ITEM", "OP", "RESULT"], &rows));
                println!("(use --output json for the keys and wrapped DEKs)");
                Ok(())
            }
        }
    }

    pub(crate) fn audit(&self, page: &AuditPage) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(page),
            Output::Table => {
                let rows: Vec<Vec<String>> = page
                    .records
                    .iter()
                    .map(|r| {
                        vec![
                            r.seq.to_string(),
                            r.time.clone(),
                            r.identity.clone().unwrap_or_else(|| "-".into()),
                            r.operation.clone(),
                            match (&r.key, r.version) {
                                (Some(k), Some(v)) => format!("{k} v{v}"),
                                (Some(k), None) => k.clone(),
                                _ => "-".into(),
                            },
                            r.outcome.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["SEQ", "TIME", "IDENTITY", "OPERATION", "KEY", "OUTCOME"],
                        &rows
                    )
                );
                println!(
                    "head: record {} (MAC {})",
                    page.head.seq,
                    match page.head.mac_valid {
                        Some(true) => "verified",
                        Some(false) => "INVALID",
                        None => "not verifiable now",
                    }
                );
                Ok(())
            }
        }
    }

    pub(crate) fn lockouts(&self, l: &LockoutList) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(l),
            Output::Table => {
                let rows: Vec<Vec<String>> = l
                    .lockouts
                    .iter()
                    .map(|x| vec![x.identity.clone(), format!("{}s", x.seconds_left)])
                    .collect();
                print!("{}", table(&["IDENTITY", "LOCKED FOR"], &rows));
                Ok(())
            }
        }
    }

    pub(crate) fn identities(&self, l: &kms_client::api::IdentityList) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(l),
            Output::Table => {
                let rows: Vec<Vec<String>> = l
                    .identities
                    .iter()
                    .map(|x| {
                        vec![
                            x.identity.clone(),
                            format!("{:?}", x.role).to_lowercase(),
                            x.source.clone(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["IDENTITY", "ROLE", "SOURCE"], &rows));
                Ok(())
            }
        }
    }

    pub(crate) fn status(&self, s: &SysStatus) -> anyhow::Result<()> {
        match self.format {
            Output::Json => json(s),
            Output::Table => {
                let mut rows = vec![
                    vec!["sealed".into(), s.sealed.to_string()],
                    vec!["seal method".into(), s.seal_method.clone()],
                    vec!["server version".into(), s.version.clone()],
                ];
                if let Some(p) = s.unseal_progress {
                    rows.push(vec![
                        "unseal shares".into(),
                        format!("{} of {} received", p.received, p.threshold),
                    ]);
                }
                if let Some(c) = &s.cluster {
                    rows.push(vec!["node".into(), c.node.clone()]);
                    let peers: Vec<&str> = c.peers.iter().map(|p| p.id.as_str()).collect();
                    rows.push(vec![
                        "cluster nodes".into(),
                        format!("{}: {}", peers.len(), peers.join(", ")),
                    ]);
                    if let Some(e) = &c.erasure {
                        let pending = if e.rotation_pending {
                            " (rotation pending: a destruction is not final yet)"
                        } else {
                            ""
                        };
                        rows.push(vec![
                            "erasure epoch".into(),
                            format!("{}{pending}", e.epoch),
                        ]);
                        let retained: Vec<String> =
                            e.retained_epochs.iter().map(u64::to_string).collect();
                        rows.push(vec![
                            "retained epochs".into(),
                            format!(
                                "{} (each kept {} after it is replaced)",
                                if retained.is_empty() {
                                    "none".to_owned()
                                } else {
                                    retained.join(", ")
                                },
                                match e.retention_secs {
                                    0 => "no time".to_owned(),
                                    s if s % 86_400 == 0 => format!("{} days", s / 86_400),
                                    s => format!("{s} s"),
                                }
                            ),
                        ]);
                    }
                }
                print!("{}", table(&["FIELD", "VALUE"], &rows));
                Ok(())
            }
        }
    }
}

/// The error, its causes, and a hint of what to try.
pub(crate) fn explain(e: &anyhow::Error) -> String {
    let mut out = format!("error: {e}");
    for cause in e.chain().skip(1) {
        let _ = write!(out, "\n  caused by: {cause}");
    }
    let client_error = e
        .chain()
        .find_map(|c| c.downcast_ref::<kms_client::Error>());
    let envelope_failed = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<envelope::Error>(),
            Some(envelope::Error::DecryptFailed)
        )
    });
    let hint = client_error.and_then(|ce| match ce {
        kms_client::Error::Unreachable { .. } => Some(
            "is kms-server running at that address? Check --endpoint (or KMSCTL_ENDPOINT / your profile); \
             a TLS refusal means the server does not accept this certificate or CA",
        ),
        kms_client::Error::Timeout { .. } => Some("the server did not answer in time; try --timeout or check its health (/readyz)"),
        kms_client::Error::Api { code, .. } => Some(match code {
            ErrorCode::PermissionDenied => {
                "this identity may not do this: keys, identities and lockouts need an admin certificate; seal, unseal, backup \
                 and rotate-master need a sys certificate; key use needs an app certificate \
                 and a grant on the key for this operation and context (`kmsctl keys grants <name>` shows them)"
            }
            ErrorCode::NotFound => "no such key for your tenant: `kmsctl keys list` (admin) shows them",
            ErrorCode::KeyDisabled => {
                "the key is disabled, pending deletion or destroyed (`kmsctl keys get <name>`): an admin can \
                 `kmsctl keys enable` a disabled key or `kmsctl keys cancel-deletion` a pending one"
            }
            ErrorCode::DecryptFailed => {
                "the data does not decrypt with this key and context: check every --context entry, and that the file is intact"
            }
            ErrorCode::Sealed => "the server is sealed: `kmsctl sys unseal` (admin)",
            ErrorCode::AlreadyExists => "pick another name, or use the existing key",
            ErrorCode::LockedOut => "this identity is locked out after repeated denials; an admin can lift it",
            _ => "see the server log for details (the request id is in the x-request-id header)",
        }),
        kms_client::Error::Config(_) => Some("check the certificate, key and CA files and the endpoint URLs"),
        kms_client::Error::ResponseTooLarge { .. } => Some(
            "a Keyhold answer is this large only for a very long key list or audit page: ask for less \
             (`audit list --limit`), or raise the limit with --max-response-mib if this endpoint is yours",
        ),
        _ => None,
    });
    let hint = hint.or(envelope_failed.then_some(
        "check that every --context entry is the one used to encrypt, and that the file is a complete kmsctl/envelope file",
    ));
    if let Some(h) = hint {
        let _ = write!(out, "\n  hint: {h}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns() {
        let t = table(&["A", "LONGER"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    LONGER\nxxx  y\n");
    }
}
