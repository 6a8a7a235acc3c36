//! AWS Signature Version 4 verification, as the XKS proxy API requires of every request
//! (`AWS4-HMAC-SHA256`, service `kms-xks-proxy`, the key store's region).
//!
//! The server side of SigV4: the canonical request is rebuilt from what arrived — method,
//! the path as it was on the wire (URI-encoded once more, as SigV4 does for every service
//! but S3), the query, exactly the headers the client listed in `SignedHeaders` (values
//! trimmed, inner runs of spaces collapsed, repeated headers joined by `,`), and the
//! SHA-256 of the body actually received — then the string to sign, the signing key
//! derived from the credential's secret (`AWS4`+secret → date → region → service →
//! `aws4_request`), and the signature is checked in constant time. The credential scope
//! must name the expected region and service and the date of `X-Amz-Date`, which must be
//! within the allowed skew of now. Checked against the AWS SigV4 test-suite vectors.

use std::fmt;
use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const TERMINATOR: &str = "aws4_request";

/// One access key: an id (not secret) and its secret access key (zeroized on drop, never
/// printed).
pub struct Credential {
    access_key_id: String,
    secret: Zeroizing<String>,
}

impl Credential {
    /// A credential; `None` when either part is empty.
    pub fn new(access_key_id: &str, secret: Zeroizing<String>) -> Option<Self> {
        (!access_key_id.is_empty() && !secret.is_empty()).then(|| Self {
            access_key_id: access_key_id.to_owned(),
            secret,
        })
    }

    /// The access key id.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    fn signing_key(&self, date: &str, region: &str, service: &str) -> ring::hmac::Key {
        use ring::hmac::{sign, Key, HMAC_SHA256};
        let mut first = Zeroizing::new(String::with_capacity(4 + self.secret.len()));
        first.push_str("AWS4");
        first.push_str(&self.secret);
        let k_date = sign(&Key::new(HMAC_SHA256, first.as_bytes()), date.as_bytes());
        let k_region = sign(&Key::new(HMAC_SHA256, k_date.as_ref()), region.as_bytes());
        let k_service = sign(
            &Key::new(HMAC_SHA256, k_region.as_ref()),
            service.as_bytes(),
        );
        let k_signing = sign(
            &Key::new(HMAC_SHA256, k_service.as_ref()),
            TERMINATOR.as_bytes(),
        );
        Key::new(HMAC_SHA256, k_signing.as_ref())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What arrived: the pieces SigV4 signs.
pub struct SignedRequest<'a> {
    /// `POST`, ...
    pub method: &'a str,
    /// The path exactly as on the wire (already percent-encoded by the client).
    pub path: &'a str,
    /// The raw query string, without `?` (empty when none).
    pub query: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The `:authority` of an HTTP/2 request, used as `host` when that header is absent.
    pub authority: Option<&'a str>,
    /// The body as received.
    pub body: &'a [u8],
}

/// What the verifier expects of the credential scope and the clock.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The region (the KMS region of the external key store).
    pub region: &'a str,
    /// The service (`kms-xks-proxy`).
    pub service: &'a str,
    /// Now.
    pub now: SystemTime,
    /// How far `X-Amz-Date` may be from now, either way.
    pub max_skew: Duration,
}

/// Why a request's signature was refused. Callers answer all of them with one opaque
/// authentication failure; the variant goes to the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// A required header is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A part does not parse.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The access key id is not one of the configured credentials.
    #[error("unknown access key id")]
    UnknownAccessKey,
    /// The credential scope names another date, region, service or terminator.
    #[error("credential scope: wrong {0}")]
    Scope(&'static str),
    /// `X-Amz-Date` is too far from now.
    #[error("request time is outside the allowed skew")]
    Skew,
    /// `host` or `x-amz-date` is not among the signed headers.
    #[error("{0} is not signed")]
    NotSigned(&'static str),
    /// A header listed in `SignedHeaders` is not in the request.
    #[error("signed header {0} is absent")]
    SignedHeaderAbsent(String),
    /// The signature does not match.
    #[error("signature mismatch")]
    Mismatch,
}

struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    terminator: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, SigV4Error> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(SigV4Error::Malformed("Authorization algorithm"))?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        } else {
            return Err(SigV4Error::Malformed("Authorization"));
        }
    }
    let credential = credential.ok_or(SigV4Error::Malformed("Authorization Credential"))?;
    let mut scope = credential.split('/');
    let mut next = || scope.next().filter(|s| !s.is_empty());
    let auth = Authorization {
        access_key_id: next().ok_or(SigV4Error::Malformed("Credential"))?,
        date: next().ok_or(SigV4Error::Malformed("Credential"))?,
        region: next().ok_or(SigV4Error::Malformed("Credential"))?,
        service: next().ok_or(SigV4Error::Malformed("Credential"))?,
        terminator: next().ok_or(SigV4Error::Malformed("Credential"))?,
        signed_headers: signed_headers.ok_or(SigV4Error::Malformed("SignedHeaders"))?,
        signature: signature.ok_or(SigV4Error::Malformed("Signature"))?,
    };
    if scope.next().is_some() {
        return Err(SigV4Error::Malformed("Credential"));
    }
    Ok(auth)
}

/// `YYYYMMDDTHHMMSSZ` → the time.
fn parse_amz_date(s: &str) -> Result<SystemTime, SigV4Error> {
    let b = s.as_bytes();
    let ok = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    if !ok {
        return Err(SigV4Error::Malformed("X-Amz-Date"));
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).map_err(|_| SigV4Error::Malformed("X-Amz-Date"))
}

/// RFC 3986 unreserved characters stay; every other byte becomes `%XX` (upper-case hex).
/// `/` stays too when `keep_slash`.
fn uri_encode(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h << 4) | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The canonical query: each name and value decoded then encoded, sorted by name, then
/// value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let (mut ek, mut ev) = (String::new(), String::new());
            uri_encode(&percent_decode(k), false, &mut ek);
            uri_encode(&percent_decode(v), false, &mut ev);
            (ek, ev)
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A header value as SigV4 canonicalizes it: trimmed, inner runs of spaces collapsed.
fn canonical_value(v: &str, out: &mut String) {
    let mut space = false;
    for c in v.trim().chars() {
        if c == ' ' {
            space = true;
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
}

fn canonical_request(req: &SignedRequest<'_>, signed_headers: &str) -> Result<String, SigV4Error> {
    // The path must already be in normal form: SigV4 signs a normalized path, and routing
    // used this one, so a path with dot segments or empty segments is refused rather
    // than normalized into another.
    if !req.path.starts_with('/')
        || req.path.contains("//")
        || req.path.split('/').any(|s| s == "." || s == "..")
    {
        return Err(SigV4Error::Malformed("path"));
    }
    let mut out = String::with_capacity(512);
    out.push_str(req.method);
    out.push('\n');
    uri_encode(req.path.as_bytes(), true, &mut out);
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    let names: Vec<&str> = signed_headers.split(';').collect();
    let sorted = names.windows(2).all(|w| w[0] < w[1]);
    let lower = names
        .iter()
        .all(|n| !n.is_empty() && !n.bytes().any(|b| b.is_ascii_uppercase()));
    if !sorted || !lower {
        return Err(SigV4Error::Malformed("SignedHeaders"));
    }
    for &name in &names {
        out.push_str(name);
        out.push(':');
        let values: Vec<&str> = req
            .headers
            .get_all(name)
            .iter()
            .map(|v| {
                v.to_str()
                    .map_err(|_| SigV4Error::Malformed("header value"))
            })
            .collect::<Result<_, _>>()?;
        if values.is_empty() {
            match (name, req.authority) {
                ("host", Some(authority)) => canonical_value(authority, &mut out),
                _ => return Err(SigV4Error::SignedHeaderAbsent(name.to_owned())),
            }
        }
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            canonical_value(v, &mut out);
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(signed_headers);
    out.push('\n');
    out.push_str(&kms_client::hex::encode(&Sha256::digest(req.body)));
    Ok(out)
}

/// Verifies `req`'s signature against `credentials`; returns the credential that signed.
pub fn verify<'c>(
    req: &SignedRequest<'_>,
    credentials: &'c [Credential],
    expect: &Expect<'_>,
) -> Result<&'c Credential, SigV4Error> {
    let header = |name: &'static str| -> Result<&str, SigV4Error> {
        req.headers
            .get(name)
            .ok_or(SigV4Error::Missing(name))?
            .to_str()
            .map_err(|_| SigV4Error::Malformed(name))
    };
    let auth = parse_authorization(header("authorization")?)?;
    let amz_date = header("x-amz-date")?;
    let when = parse_amz_date(amz_date)?;
    let skew = match expect.now.duration_since(when) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > expect.max_skew {
        return Err(SigV4Error::Skew);
    }
    if auth.date != &amz_date[..8] {
        return Err(SigV4Error::Scope("date"));
    }
    if auth.region != expect.region {
        return Err(SigV4Error::Scope("region"));
    }
    if auth.service != expect.service {
        return Err(SigV4Error::Scope("service"));
    }
    if auth.terminator != TERMINATOR {
        return Err(SigV4Error::Scope("terminator"));
    }
    let signed: Vec<&str> = auth.signed_headers.split(';').collect();
    for required in ["host", "x-amz-date"] {
        if !signed.contains(&required) {
            return Err(SigV4Error::NotSigned(required));
        }
    }
    if let Some(v) = req.headers.get("x-amz-content-sha256") {
        let claimed = v
            .to_str()
            .map_err(|_| SigV4Error::Malformed("x-amz-content-sha256"))?;
        if !claimed.eq_ignore_ascii_case(&kms_client::hex::encode(&Sha256::digest(req.body))) {
            return Err(SigV4Error::Malformed("x-amz-content-sha256"));
        }
    }
    let signature = kms_client::hex::decode(auth.signature)
        .filter(|s| s.len() == 32)
        .ok_or(SigV4Error::Malformed("Signature"))?;
    let credential = credentials
        .iter()
        .find(|c| c.access_key_id == auth.access_key_id)
        .ok_or(SigV4Error::UnknownAccessKey)?;
    let canonical = canonical_request(req, auth.signed_headers)?;
    let scope = format!(
        "{}/{}/{}/{TERMINATOR}",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        kms_client::hex::encode(&Sha256::digest(canonical.as_bytes()))
    );
    let key = credential.signing_key(auth.date, auth.region, auth.service);
    ring::hmac::verify(&key, string_to_sign.as_bytes(), &signature)
        .map_err(|_| SigV4Error::Mismatch)?;
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20150830T123600Z";

    fn creds() -> Vec<Credential> {
        vec![
            Credential::new("OTHERKEYIDEXAMPLE", Zeroizing::new("x".repeat(40))).unwrap(),
            Credential::new("AKIDEXAMPLE", Zeroizing::new(SECRET.to_owned())).unwrap(),
        ]
    }

    fn at(s: &str) -> SystemTime {
        parse_amz_date(s).unwrap()
    }

    fn expect(now: SystemTime) -> Expect<'static> {
        Expect {
            region: "us-east-1",
            service: "service",
            now,
            max_skew: Duration::from_secs(300),
        }
    }

    /// One AWS test-suite vector: request parts, signed headers, expected signature.
    struct Vector {
        method: &'static str,
        path: &'static str,
        query: &'static str,
        extra: &'static [(&'static str, &'static str)],
        body: &'static [u8],
        signed: &'static str,
        signature: &'static str,
    }

    fn headers(v: &Vector, signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.amazonaws.com"));
        h.insert("x-amz-date", HeaderValue::from_static(DATE));
        for (k, val) in v.extra {
            h.append(*k, HeaderValue::from_static(val));
        }
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders={}, Signature={signature}",
            v.signed
        );
        h.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        h
    }

    fn check(v: &Vector, h: &HeaderMap, e: &Expect<'_>) -> Result<String, SigV4Error> {
        let creds = creds();
        let req = SignedRequest {
            method: v.method,
            path: v.path,
            query: v.query,
            headers: h,
            authority: None,
            body: v.body,
        };
        verify(&req, &creds, e).map(|c| c.access_key_id().to_owned())
    }

    const SUITE: &[Vector] = &[
        // get-vanilla
        Vector {
            method: "GET",
            path: "/",
            query: "",
            extra: &[],
            body: b"",
            signed: "host;x-amz-date",
            signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        },
        // post-vanilla
        Vector {
            method: "POST",
            path: "/",
            query: "",
            extra: &[],
            body: b"",
            signed: "host;x-amz-date",
            signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        },
        // get-utf8 (the path on the wire: /ሴ)
        Vector {
            method: "GET",
            path: "/\u{1234}",
            query: "",
            extra: &[],
            body: b"",
            signed: "host;x-amz-date",
            signature: "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
        },
        // get-space
        Vector {
            method: "GET",
            path: "/example space/",
            query: "",
            extra: &[],
            body: b"",
            signed: "host;x-amz-date",
            signature: "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
        },
        // get-vanilla-query-order-key-case: parameters sorted
        Vector {
            method: "GET",
            path: "/",
            query: "Param2=value2&Param1=value1",
            extra: &[],
            body: b"",
            signed: "host;x-amz-date",
            signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        },
        // post-x-www-form-urlencoded: a signed content-type and a body
        Vector {
            method: "POST",
            path: "/",
            query: "",
            extra: &[("content-type", "application/x-www-form-urlencoded")],
            body: b"Param1=value1",
            signed: "content-type;host;x-amz-date",
            signature: "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        },
    ];

    #[test]
    fn the_aws_test_suite_vectors_verify() {
        for v in SUITE {
            let h = headers(v, v.signature);
            assert_eq!(
                check(v, &h, &expect(at(DATE))).as_deref(),
                Ok("AKIDEXAMPLE"),
                "{} {}",
                v.method,
                v.path
            );
        }
    }

    #[test]
    fn every_change_to_a_signed_part_is_refused() {
        let v = &SUITE[5];
        let e = expect(at(DATE));
        // A flipped signature bit.
        let mut bad = v.signature.to_owned();
        bad.replace_range(0..1, "6");
        assert_eq!(check(v, &headers(v, &bad), &e), Err(SigV4Error::Mismatch));
        // Another body, method, path or query.
        let h = headers(v, v.signature);
        for changed in [
            Vector {
                body: b"Param1=value2",
                ..*v
            },
            Vector {
                method: "PUT",
                ..*v
            },
            Vector { path: "/x", ..*v },
            Vector { query: "a=b", ..*v },
        ] {
            assert_eq!(check(&changed, &h, &e), Err(SigV4Error::Mismatch));
        }
        // A signed header's value.
        let mut h2 = headers(v, v.signature);
        h2.insert("content-type", HeaderValue::from_static("application/json"));
        assert_eq!(check(v, &h2, &e), Err(SigV4Error::Mismatch));
        // An unsigned header may change.
        let mut h3 = headers(v, v.signature);
        h3.insert("user-agent", HeaderValue::from_static("anything"));
        assert_eq!(check(v, &h3, &e).as_deref(), Ok("AKIDEXAMPLE"));
        // A signed header removed.
        let mut h4 = headers(v, v.signature);
        h4.remove("content-type");
        assert_eq!(
            check(v, &h4, &e),
            Err(SigV4Error::SignedHeaderAbsent("content-type".into()))
        );
        // A body hash header that does not match the body.
        let mut h5 = headers(v, v.signature);
        h5.insert("x-amz-content-sha256", HeaderValue::from_static("00"));
        assert_eq!(
            check(v, &h5, &e),
            Err(SigV4Error::Malformed("x-amz-content-sha256"))
        );
    }

    #[test]
    fn scope_clock_and_credentials_are_enforced() {
        let v = &SUITE[1];
        let h = headers(v, v.signature);
        // Within five minutes either way: fine; beyond: refused.
        let now = at(DATE);
        for offset in [0, 299] {
            assert!(check(v, &h, &expect(now + Duration::from_secs(offset))).is_ok());
            assert!(check(v, &h, &expect(now - Duration::from_secs(offset))).is_ok());
        }
        assert_eq!(
            check(v, &h, &expect(now + Duration::from_secs(301))),
            Err(SigV4Error::Skew)
        );
        assert_eq!(
            check(v, &h, &expect(now - Duration::from_secs(301))),
            Err(SigV4Error::Skew)
        );
        let e = expect(now);
        assert_eq!(
            check(
                v,
                &h,
                &Expect {
                    region: "eu-west-1",
                    ..e
                }
            ),
            Err(SigV4Error::Scope("region"))
        );
        assert_eq!(
            check(
                v,
                &h,
                &Expect {
                    service: "kms-xks-proxy",
                    ..e
                }
            ),
            Err(SigV4Error::Scope("service"))
        );
        // Unknown access key; the scope's date must be the request's.
        let mut h2 = h.clone();
        let auth = h2["authorization"]
            .to_str()
            .unwrap()
            .replace("AKIDEXAMPLE", "AKIDUNKNOWN");
        h2.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        assert_eq!(check(v, &h2, &e), Err(SigV4Error::UnknownAccessKey));
        let mut h3 = h.clone();
        let auth = h3["authorization"]
            .to_str()
            .unwrap()
            .replace("/20150830/", "/20150831/");
        h3.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        assert_eq!(check(v, &h3, &e), Err(SigV4Error::Scope("date")));
        // host and x-amz-date must be signed.
        let unsigned = Vector {
            signed: "x-amz-date",
            ..*v
        };
        assert_eq!(
            check(&unsigned, &headers(&unsigned, v.signature), &e),
            Err(SigV4Error::NotSigned("host"))
        );
        // Missing or malformed pieces.
        let mut h4 = h.clone();
        h4.remove("authorization");
        assert_eq!(check(v, &h4, &e), Err(SigV4Error::Missing("authorization")));
        let mut h5 = h.clone();
        h5.insert(
            "authorization",
            HeaderValue::from_static("AWS4-HMAC-SHA1 x"),
        );
        assert!(matches!(check(v, &h5, &e), Err(SigV4Error::Malformed(_))));
        let mut h6 = h.clone();
        h6.insert(
            "x-amz-date",
            HeaderValue::from_static("2015-08-30T12:36:00Z"),
        );
        assert_eq!(check(v, &h6, &e), Err(SigV4Error::Malformed("X-Amz-Date")));
        // Paths that normalization would change are refused, not normalized.
        for path in ["/a/../", "/./", "//"] {
            assert_eq!(
                check(&Vector { path, ..*v }, &h, &e),
                Err(SigV4Error::Malformed("path"))
            );
        }
    }

    #[test]
    fn http2_authority_stands_in_for_host_and_secrets_never_print() {
        let v = &SUITE[1];
        let mut h = headers(v, v.signature);
        h.remove("host");
        let creds = creds();
        let req = SignedRequest {
            method: v.method,
            path: v.path,
            query: v.query,
            headers: &h,
            authority: Some("example.amazonaws.com"),
            body: v.body,
        };
        assert!(verify(&req, &creds, &expect(at(DATE))).is_ok());
        let shown = format!("{:?}", creds);
        assert!(
            shown.contains("AKIDEXAMPLE") && !shown.contains(SECRET),
            "{shown}"
        );
    }

    #[test]
    fn uri_encoding_and_header_values() {
        let mut s = String::new();
        uri_encode("/a b/%41~é".as_bytes(), true, &mut s);
        assert_eq!(s, "/a%20b/%2541~%C3%A9");
        let mut v = String::new();
        canonical_value("  a   b  c ", &mut v);
        assert_eq!(v, "a b c");
        assert_eq!(canonical_query("b=2&a=%41&a=1"), "a=1&a=A&b=2");
    }
}
