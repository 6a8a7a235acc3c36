//! What the protocol adapters (XKS, DKE, CSE, EKM, Salesforce, Transit, Kubernetes KMS,
//! KMIP) share: reading a bearer token, checking a protocol's own URL, and the client
//! certificate a public-listener connection presented. Below the adapters and the public listener that composes them:
//! it imports no adapter.

pub mod cse;
pub mod dke;
pub mod ekm;
pub mod jwt;
pub mod kmip;
pub mod kubernetes;
pub mod salesforce;
pub mod transit;
pub mod xks;

/// Whether `mount` may place a protocol's routes on the public listener: `/` (the root of
/// the host, where a vendor calls it so) or `/segments` of `A-Z a-z 0-9 . _ -`.
pub(crate) fn valid_mount(mount: &str) -> bool {
    mount == "/"
        || (mount.starts_with('/')
            && !mount.ends_with('/')
            && !mount.contains("//")
            && mount.len() <= 64
            && mount
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.')))
}

/// A protocol's own host name (`[dke] host`, `[ekm] host`), lower-cased: DNS labels of
/// a-z 0-9 and inner hyphens, no trailing dot, no port, not an IP address.
pub(crate) fn valid_host(value: &str) -> Option<String> {
    let host = value.to_ascii_lowercase();
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let ip = host.parse::<std::net::IpAddr>().is_ok();
    (host.len() <= 253 && !ip && host.split('.').all(label)).then_some(host)
}

/// The route pattern of `rest` under `mount` (`/{name}` at the root, `/dke/{name}` under
/// `/dke`).
pub(crate) fn mounted(mount: &str, rest: &str) -> String {
    match mount {
        "/" => rest.to_owned(),
        prefix => format!("{prefix}{rest}"),
    }
}

/// Why an adapter could not start: which setting, and what is wrong with what it names (a
/// file that does not load, a certificate that is not RSA, ...). Checked at start, after
/// the configuration's own checks, which cannot open files.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct SetupError {
    /// The setting, as the configuration file names it (`salesforce.certificate`).
    pub setting: String,
    /// What is wrong.
    pub reason: String,
}

impl SetupError {
    pub(crate) fn new(setting: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            setting: setting.into(),
            reason: reason.to_string(),
        }
    }
}

/// The bearer token of a request (`Authorization: Bearer <token>`, the scheme in any
/// case), trimmed; `None` without one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// A protocol's own URL from the configuration (`[dke] url`, `[cse] kacls_url`,
/// `[ekm] url`): an `https://` URL with a host, without a trailing slash.
pub fn service_url(value: &str) -> Option<String> {
    let url = value.trim_end_matches('/');
    let host = url.strip_prefix("https://")?;
    (!host.is_empty()).then(|| url.to_owned())
}

/// The client certificate a public-listener connection presented (verified against the
/// listener's client CA during the handshake), as the SHA-256 of its DER; a request
/// extension on every request of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate(pub Option<[u8; 32]>);

impl ClientCertificate {
    /// What `conn`'s handshake presented.
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        Self(
            conn.peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| {
                    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
                    let mut out = [0u8; 32];
                    out.copy_from_slice(digest.as_ref());
                    out
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_plain_dns_names() {
        assert_eq!(
            valid_host("DKE.Example.com").as_deref(),
            Some("dke.example.com")
        );
        assert_eq!(valid_host("localhost").as_deref(), Some("localhost"));
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a.b.",
            "a.b:443",
            "https://a.b",
            "10.0.0.1",
            "a b",
            "*.a.b",
        ] {
            assert!(valid_host(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn mounts_are_the_root_or_plain_prefixes() {
        for good in ["/", "/dke", "/ekm", "/a/b-c_d.e"] {
            assert!(valid_mount(good), "{good}");
        }
        for bad in ["", "dke", "/dke/", "//", "/a//b", "/a b", "/%2e"] {
            assert!(!valid_mount(bad), "{bad}");
        }
        assert_eq!(mounted("/", "/{name}"), "/{name}");
        assert_eq!(mounted("/dke", "/{name}"), "/dke/{name}");
    }

    #[test]
    fn bearer_tokens_and_service_urls() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for (value, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ] {
            h.insert(
                axum::http::header::AUTHORIZATION,
                axum::http::HeaderValue::from_static(value),
            );
            assert_eq!(bearer(&h).as_deref(), want, "{value}");
        }
        assert_eq!(
            service_url("https://kms.example/dke/").as_deref(),
            Some("https://kms.example/dke")
        );
        assert_eq!(service_url("https://"), None);
        assert_eq!(service_url("http://kms.example"), None);
    }
}
