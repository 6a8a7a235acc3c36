//! The checks of `Settings::parse`, section by section, and the bounds of every numeric
//! setting ([`Bound`]: one constant for the check and its message).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{Engine, ErasureMode, FileConfig, FileTls, SealMethod};

/// `[tls]`: its files exist, and the minimum version; whether TLS 1.2 is allowed.
pub(super) fn check_tls_files(
    tls: &FileTls,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<bool, (String, String)> {
    let e = |field: &str, message: String| (field.to_owned(), message);
    for (field, p) in [
        ("tls.cert", &tls.cert),
        ("tls.key", &tls.key),
        ("tls.client_ca", &tls.client_ca),
    ] {
        let p = resolve(p);
        if !p.is_file() {
            return Err(e(field, format!("{} is not a readable file", p.display())));
        }
    }
    let allow_tls12 = match tls.min_version.as_str() {
        "1.3" => false,
        "1.2" => true,
        other => {
            return Err(e(
                "tls.min_version",
                format!("`{other}`: must be \"1.3\" or \"1.2\""),
            ))
        }
    };
    for (i, p) in tls.crls.iter().enumerate() {
        let p = resolve(p);
        if !p.is_file() {
            return Err(e(
                &format!("tls.crls[{i}]"),
                format!("{} is not a readable file", p.display()),
            ));
        }
    }
    Ok(allow_tls12)
}

/// The protocol adapters' tables, as written (taken out of [`FileConfig`]: serde's
/// `flatten` does not work with `deny_unknown_fields`).
pub(super) struct FileAdapters {
    pub(super) xks: Option<crate::adapters::xks::settings::FileXks>,
    pub(super) public: Option<crate::app::public::FilePublic>,
    pub(super) dke: Option<crate::adapters::dke::settings::FileDke>,
    pub(super) cse: Option<crate::adapters::cse::settings::FileCse>,
    pub(super) ekm: Option<crate::adapters::ekm::settings::FileEkm>,
    pub(super) salesforce: Option<crate::adapters::salesforce::settings::FileSalesforce>,
    pub(super) kubernetes: Vec<crate::adapters::kubernetes::settings::FileKubernetes>,
    pub(super) kmip: Option<crate::adapters::kmip::settings::FileKmip>,
}

/// The protocol adapters, validated.
pub(super) struct Adapters {
    pub(super) xks: Option<crate::adapters::xks::settings::XksSettings>,
    pub(super) public: Option<crate::app::public::PublicSettings>,
    pub(super) dke: Option<crate::adapters::dke::settings::DkeSettings>,
    pub(super) cse: Option<crate::adapters::cse::settings::CseSettings>,
    pub(super) ekm: Option<crate::adapters::ekm::settings::EkmSettings>,
    pub(super) salesforce: Option<crate::adapters::salesforce::settings::SalesforceSettings>,
    pub(super) kubernetes: Vec<crate::adapters::kubernetes::KubernetesSettings>,
    pub(super) kmip: Option<crate::adapters::kmip::KmipSettings>,
}

/// `[audit] jsonl`: none, `-` (stdout), or a file.
pub(super) fn audit_sink(
    jsonl: Option<&str>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> crate::security::audit::Sink {
    match jsonl {
        None => crate::security::audit::Sink::None,
        Some("-") => crate::security::audit::Sink::Stdout,
        Some(p) => crate::security::audit::Sink::File(resolve(Path::new(p))),
    }
}

/// `listen` and `ops_listen` (`"off"`: no ops listener).
pub(super) fn listen_addrs(
    listen: &str,
    ops_listen: &str,
) -> Result<(SocketAddr, Option<SocketAddr>), (&'static str, String)> {
    let api: SocketAddr = listen
        .parse()
        .map_err(|e| ("listen", format!("`{listen}` is not host:port ({e})")))?;
    let ops = if ops_listen == "off" {
        None
    } else {
        Some(ops_listen.parse().map_err(|e| {
            (
                "ops_listen",
                format!("`{ops_listen}` is not host:port or \"off\" ({e})"),
            )
        })?)
    };
    Ok((api, ops))
}

impl Adapters {
    /// Each table validated; listeners distinct from the API's and ops'; the public
    /// listener's protocols only with `[public]`.
    pub(super) fn validate(
        raw: FileAdapters,
        resolve: &dyn Fn(&Path) -> PathBuf,
        listen: SocketAddr,
        ops_listen: Option<SocketAddr>,
    ) -> Result<Self, (String, String)> {
        let e = |field: &str, message: String| (field.to_owned(), message);
        let xks = match raw.xks {
            None => None,
            Some(x) => Some(x.validate(resolve)?),
        };
        if let Some(x) = &xks {
            if x.listen.port() != 0 && (Some(x.listen) == ops_listen || x.listen == listen) {
                return Err(e(
                    "xks.listen",
                    "must differ from listen and ops_listen".into(),
                ));
            }
        }
        let public = match raw.public {
            None => None,
            Some(p) => Some(p.validate(resolve)?),
        };
        if let Some(p) = &public {
            let taken = [Some(listen), ops_listen, xks.as_ref().map(|x| x.listen)];
            if p.listen.port() != 0 && taken.contains(&Some(p.listen)) {
                return Err(e(
                    "public.listen",
                    "must differ from listen, ops_listen and xks.listen".into(),
                ));
            }
        }
        let dke = match raw.dke {
            None => None,
            Some(d) => Some(d.validate(resolve)?),
        };
        if dke.is_some() && public.is_none() {
            return Err(e(
                "dke",
                "DKE is served on the public listener: configure [public] too".into(),
            ));
        }
        let cse = match raw.cse {
            None => None,
            Some(c) => Some(c.validate(resolve)?),
        };
        if cse.is_some() && public.is_none() {
            return Err(e(
                "cse",
                "CSE is served on the public listener: configure [public] too".into(),
            ));
        }
        let ekm = match raw.ekm {
            None => None,
            Some(c) => Some(c.validate(resolve)?),
        };
        if ekm.is_some() && public.is_none() {
            return Err(e(
                "ekm",
                "EKM is served on the public listener: configure [public] too".into(),
            ));
        }
        // One host cannot serve two protocols at its root: the routes would overlap. Two
        // host names can (`host`: each protocol alone on its name).
        if let (Some(d), Some(k)) = (&dke, &ekm) {
            if d.mount == "/" && k.mount == "/" && d.host == k.host {
                return Err(e(
                    "ekm.mount",
                    "DKE is mounted at the root of the same host: one host serves one protocol there (give each its own name: [dke] host and [ekm] host)".into(),
                ));
            }
        }
        let salesforce = match raw.salesforce {
            None => None,
            Some(c) => Some(c.validate(resolve)?),
        };
        if salesforce.is_some() && public.is_none() {
            return Err(e(
                "salesforce",
                "Salesforce is served on the public listener: configure [public] too".into(),
            ));
        }
        let kubernetes =
            crate::adapters::kubernetes::settings::validate_all(raw.kubernetes, resolve)?;
        let kmip = raw.kmip.map(|k| k.validate()).transpose()?;
        if let Some(k) = &kmip {
            let taken = [
                Some(listen),
                ops_listen,
                xks.as_ref().map(|x| x.listen),
                public.as_ref().map(|p| p.listen),
            ];
            if k.listen.port() != 0 && taken.contains(&Some(k.listen)) {
                return Err(e(
                    "kmip.listen",
                    "must differ from listen, ops_listen, xks.listen and public.listen".into(),
                ));
            }
        }
        Ok(Self {
            xks,
            public,
            dke,
            cse,
            ekm,
            salesforce,
            kubernetes,
            kmip,
        })
    }
}

/// A numeric setting's allowed range: the check and its message from one place.
pub struct Bound {
    /// The setting, dotted under its table.
    pub field: &'static str,
    /// Smallest allowed.
    pub min: u64,
    /// Largest allowed.
    pub max: u64,
}

impl Bound {
    fn check(&self, value: u64) -> Result<(), (String, String)> {
        if (self.min..=self.max).contains(&value) {
            return Ok(());
        }
        let message = if self.min == 0 {
            format!("must be 0 ({}) to {}", self.zero_means(), self.max)
        } else {
            format!("must be {} to {}", self.min, self.max)
        };
        Err((self.field.to_owned(), message))
    }

    fn zero_means(&self) -> &'static str {
        match self.field {
            "tls.crl_poll_secs" => "SIGHUP only",
            _ => "off",
        }
    }
}

/// Request bodies, bytes.
pub const MAX_BODY_BYTES: Bound = Bound {
    field: "max_body_bytes",
    min: 1024,
    max: 16 * 1024 * 1024,
};
/// Seconds a body may take.
pub const BODY_TIMEOUT_SECS: Bound = Bound {
    field: "body_timeout_secs",
    min: 1,
    max: 300,
};
/// Seconds request headers may take.
pub const HEADER_TIMEOUT_SECS: Bound = Bound {
    field: "header_timeout_secs",
    min: 1,
    max: 300,
};
/// Seconds a connection may stay idle.
pub const IDLE_TIMEOUT_SECS: Bound = Bound {
    field: "idle_timeout_secs",
    min: 1,
    max: 3600,
};
/// Established connections per listener.
pub const MAX_CONNECTIONS: Bound = Bound {
    field: "max_connections",
    min: 1,
    max: 1_000_000,
};
/// Handshakes in progress per listener.
pub const MAX_HANDSHAKES: Bound = Bound {
    field: "max_handshakes",
    min: 1,
    max: 100_000,
};
/// Items per batch request.
pub const MAX_BATCH_ITEMS: Bound = Bound {
    field: "max_batch_items",
    min: 1,
    max: 10_000,
};
/// Seconds between key sweeps.
pub const SWEEP_INTERVAL_SECS: Bound = Bound {
    field: "keys.sweep_interval_secs",
    min: 1,
    max: 3600,
};
/// Keys kept in the cache.
pub const CACHE_KEYS: Bound = Bound {
    field: "keys.cache_keys",
    min: 100,
    max: 10_000_000,
};
/// Seconds between CRL file checks (0: SIGHUP only).
pub const CRL_POLL_SECS: Bound = Bound {
    field: "tls.crl_poll_secs",
    min: 0,
    max: 3600,
};
/// Seconds a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT_SECS: Bound = Bound {
    field: "tls.handshake_timeout_secs",
    min: 1,
    max: 120,
};
/// Denials before a lockout.
pub const LOCKOUT_THRESHOLD: Bound = Bound {
    field: "lockout.threshold",
    min: 1,
    max: 1000,
};
/// Seconds over which denials are counted.
pub const LOCKOUT_WINDOW_SECS: Bound = Bound {
    field: "lockout.window_secs",
    min: 1,
    max: 86_400,
};
/// Seconds a lockout lasts.
pub const LOCKOUT_DURATION_SECS: Bound = Bound {
    field: "lockout.duration_secs",
    min: 1,
    max: 7 * 86_400,
};
/// Seconds of an alert coalescing interval.
pub const ALERTS_COALESCE_SECS: Bound = Bound {
    field: "alerts.coalesce_secs",
    min: 1,
    max: 3600,
};
/// PostgreSQL connections per node.
pub const POOL_SIZE: Bound = Bound {
    field: "store.pool_size",
    min: 1,
    max: 64,
};

/// Milliseconds a bounded-lag audit record may wait for its flush.
pub const AUDIT_MAX_LAG_MS: Bound = Bound {
    field: "audit.max_lag_ms",
    min: 1,
    max: 1000,
};
/// Microseconds an audit batch may wait for the callers expected to join it.
pub const AUDIT_COMMIT_WINDOW_US: Bound = Bound {
    field: "audit.commit_window_us",
    min: 0,
    max: 10_000,
};

/// Every numeric setting within its [`Bound`]; `per_source_connections` at most
/// `max_connections`.
pub(super) fn check_bounds(raw: &FileConfig) -> Result<(), (String, String)> {
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    let mut checks = vec![
        (&MAX_BODY_BYTES, n(raw.max_body_bytes)),
        (&BODY_TIMEOUT_SECS, raw.body_timeout_secs),
        (&HEADER_TIMEOUT_SECS, raw.header_timeout_secs),
        (&IDLE_TIMEOUT_SECS, raw.idle_timeout_secs),
        (&MAX_CONNECTIONS, n(raw.max_connections)),
        (&MAX_HANDSHAKES, n(raw.max_handshakes)),
        (&MAX_BATCH_ITEMS, n(raw.max_batch_items)),
        (&SWEEP_INTERVAL_SECS, raw.keys.sweep_interval_secs),
        (&CACHE_KEYS, n(raw.keys.cache_keys)),
        (&CRL_POLL_SECS, raw.tls.crl_poll_secs),
        (&HANDSHAKE_TIMEOUT_SECS, raw.tls.handshake_timeout_secs),
        (&LOCKOUT_THRESHOLD, u64::from(raw.lockout.threshold)),
        (&LOCKOUT_WINDOW_SECS, raw.lockout.window_secs),
        (&LOCKOUT_DURATION_SECS, raw.lockout.duration_secs),
        (&ALERTS_COALESCE_SECS, raw.alerts.coalesce_secs),
        (&AUDIT_MAX_LAG_MS, raw.audit.max_lag_ms),
        (&AUDIT_COMMIT_WINDOW_US, raw.audit.commit_window_us),
    ];
    if raw.store.engine == Engine::Postgres {
        checks.push((&POOL_SIZE, n(raw.store.pool_size)));
    }
    for (bound, value) in checks {
        bound.check(value)?;
    }
    if raw.per_source_connections > raw.max_connections {
        return Err((
            "per_source_connections".into(),
            "must be 0 (unbounded) or at most max_connections".into(),
        ));
    }
    Ok(())
}

/// `[seal]` against `[store]`: the sealing method's own settings, and where a shared
/// store keeps its erasure keys; the erasure epochs' retention when they are in the
/// database.
pub(super) fn check_seal_and_erasure(raw: &FileConfig) -> Result<Option<u64>, (String, String)> {
    let e = |field: &str, message: String| (field.to_owned(), message);
    let seal = &raw.seal;
    match seal.method {
        SealMethod::KeyFile if seal.key_file.is_none() => {
            return Err(e(
                "seal.key_file",
                "required when seal.method = \"key-file\"".into(),
            ))
        }
        SealMethod::Passphrase if seal.key_file.is_some() => {
            return Err(e(
                "seal.key_file",
                "only for seal.method = \"key-file\"".into(),
            ))
        }
        SealMethod::Pkcs11 if seal.pkcs11.is_none() => {
            return Err(e(
                "seal.pkcs11",
                "required when seal.method = \"pkcs11\" (module, token_label, pin_file)".into(),
            ))
        }
        m if m != SealMethod::Pkcs11 && seal.pkcs11.is_some() => {
            return Err(e("seal.pkcs11", "only for seal.method = \"pkcs11\"".into()))
        }
        _ => {}
    }
    let retention = match (raw.store.engine, raw.store.erasure) {
        (Engine::Postgres, Some(ErasureMode::Token)) if seal.method != SealMethod::Pkcs11 => {
            return Err(e(
                "store.erasure",
                "\"token\" keeps the erasure epoch keys in the sealing HSM: it needs seal.method = \"pkcs11\"".into(),
            ))
        }
        (Engine::Postgres, Some(ErasureMode::Token) | None)
            if seal.method == SealMethod::Pkcs11 =>
        {
            let secs = raw
                .store
                .erasure_retention_secs
                .unwrap_or(crate::storage::erasure::shared::DEFAULT_RETENTION_SECS);
            if secs > 366 * 86_400 {
                return Err(e(
                    "store.erasure_retention_secs",
                    "must be at most a year (31622400)".into(),
                ));
            }
            Some(secs)
        }
        (Engine::Postgres, _) if raw.store.erasure_retention_secs.is_some() => {
            return Err(e(
                "store.erasure_retention_secs",
                "only with erasure keys in the database (store.erasure = \"token\")".into(),
            ))
        }
        (Engine::Postgres, _) => None,
        (_, None) if raw.store.erasure_retention_secs.is_none() => None,
        _ => {
            return Err(e(
                "store.erasure",
                "only for engine = \"postgres\" (the embedded store keeps its erasure file beside it)".into(),
            ))
        }
    };
    Ok(retention)
}

/// `[alerts]`, `[identity]` and `[[identities]]`.
pub(super) fn check_alerts_and_identities(raw: &FileConfig) -> Result<(), (String, String)> {
    let e = |field: &str, message: String| (field.to_owned(), message);
    if let Some(url) = &raw.alerts.webhook {
        crate::security::alert::check_webhook(url).map_err(|m| e("alerts.webhook", m))?;
    }
    if raw.alerts.webhook_ca.is_some()
        && !raw
            .alerts
            .webhook
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    {
        return Err(e(
            "alerts.webhook_ca",
            "only for an https:// webhook".into(),
        ));
    }
    if raw.alerts.command.as_ref().is_some_and(Vec::is_empty) {
        return Err(e("alerts.command", "must name a program".into()));
    }
    if raw.identity.sources.is_empty() {
        return Err(e(
            "identity.sources",
            "must name at least one source".into(),
        ));
    }
    let mut seen = HashSet::new();
    for (i, m) in raw.identities.iter().enumerate() {
        if m.identity.is_empty() {
            return Err(e(
                &format!("identities[{i}].identity"),
                "must not be empty".into(),
            ));
        }
        if !seen.insert(m.identity.as_str()) {
            return Err(e(
                &format!("identities[{i}].identity"),
                format!("`{}` is mapped twice", m.identity),
            ));
        }
        let tenant_ok = !m.tenant.is_empty()
            && m.tenant.len() <= 64
            && m.tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !tenant_ok {
            return Err(e(
                &format!("identities[{i}].tenant"),
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -".into(),
            ));
        }
    }
    Ok(())
}
