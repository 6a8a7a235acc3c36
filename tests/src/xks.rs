//! Test helpers for the AWS XKS endpoint: the `[xks]` config, credentials files, and a
//! client that signs with AWS's own SigV4 signer (`aws-sigv4`, as the AWS SDKs do).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::{client_for, TestPki};

/// A credential in AWS's format (access key id of A-Z 2-7, 43-character secret).
pub const ACCESS_KEY: &str = "AKIAI2SFODNN7EXAMPLE";
/// Its secret.
pub const SECRET: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";
/// A second one (rotation).
pub const ACCESS_KEY_2: &str = "AKIAQ7XKSROTATION2ND";
/// Its secret.
pub const SECRET_2: &str = "n3wS3cr3tAcc3ssK3yF0rR0tat10nT3st1ngXKSv2+/=";
/// The region of the test key store.
pub const REGION: &str = "eu-west-1";
/// The identity the test key store acts as.
pub const IDENTITY: &str = "xks:aws";

/// Writes a credentials file (mode 600) holding `creds`.
pub fn write_credentials(path: &Path, creds: &[(&str, &str)]) {
    use std::os::unix::fs::PermissionsExt;
    let mut text = String::new();
    for (id, secret) in creds {
        text.push_str(&format!(
            "[[credential]]\naccess_key_id = \"{id}\"\nsecret_access_key = \"{secret}\"\n\n"
        ));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The `[xks]` section for [`crate::TestServer::start_with`]: one key store at prefix
/// `/aws` (tenant `acme`, identity [`IDENTITY`], region [`REGION`]) with the credentials
/// in `creds`, the given key mappings (TOML `[[xks.stores.keys]]` text), and `xks_extra`
/// lines in `[xks]` (mTLS and the like). The listener reuses the test PKI's server
/// certificate.
pub fn config(creds: &Path, rate: u32, keys: &str, xks_extra: &str) -> String {
    format!(
        r#"
[xks]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"
node_id = "node-1"
health_cache_secs = 2
credentials_poll_secs = 1
{xks_extra}

[[xks.stores]]
name = "aws"
prefix = "/aws"
region = "{REGION}"
tenant = "acme"
identity = "{IDENTITY}"
credentials = "{}"
rate_limit = {rate}

{keys}
"#,
        creds.display()
    )
}

/// A signed XKS request's answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body (or the text as a string).
    pub body: Value,
}

impl Answer {
    /// `errorName`, when an error.
    pub fn error_name(&self) -> &str {
        self.body["errorName"].as_str().unwrap_or("")
    }
}

/// A client of the XKS endpoint.
pub struct XksClient {
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    http: reqwest::Client,
    /// Access key id.
    pub access_key: String,
    /// Secret.
    pub secret: String,
    /// Region signed into the scope.
    pub region: String,
    /// Service signed into the scope.
    pub service: String,
    /// The signing time (`None`: now).
    pub time: Option<SystemTime>,
}

impl XksClient {
    /// A client of the listener at `addr`, trusting the test CA, presenting `cert` (a
    /// test PKI certificate stem) or none.
    pub fn new(pki: &TestPki, addr: std::net::SocketAddr, cert: Option<&str>) -> Self {
        Self {
            base: format!("https://127.0.0.1:{}", addr.port()),
            http: client_for(pki, cert, false),
            access_key: ACCESS_KEY.into(),
            secret: SECRET.into(),
            region: REGION.into(),
            service: "kms-xks-proxy".into(),
            time: None,
        }
    }

    /// The SigV4 headers AWS's signer adds for a POST of `body` to `path` (with a
    /// `content-type: application/json` header, signed as AWS KMS does not but curl does).
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> Vec<(String, String)> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        use aws_sigv4::sign::v4;
        let identity: aws_smithy_runtime_api::client::identity::Identity =
            aws_credential_types::Credentials::new(
                &self.access_key,
                &self.secret,
                None,
                None,
                "keyhold-tests",
            )
            .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(&self.service)
            .time(self.time.unwrap_or_else(SystemTime::now))
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let url = format!("{}{path}", self.base);
        let headers = [("content-type", "application/json")];
        let signable =
            SignableRequest::new(method, &url, headers.into_iter(), SignableBody::Bytes(body))
                .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        instructions
            .headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// POSTs `body` to `path` signed, with the signed headers changed by `tamper`.
    pub async fn post_with(
        &self,
        path: &str,
        body: &Value,
        tamper: impl FnOnce(&mut Vec<(String, String)>),
    ) -> Answer {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut headers = self.sign("POST", path, &bytes);
        tamper(&mut headers);
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(bytes);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        answer(req.send().await.unwrap()).await
    }

    /// POSTs `body` to `path`, signed.
    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.post_with(path, body, |_| {}).await
    }

    /// A raw request (any method, any body, no signature).
    pub async fn raw(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> Answer {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        answer(r).await
    }
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// A fresh temporary path for a credentials file.
pub fn credentials_path(dir: &Path) -> PathBuf {
    dir.join("xks-credentials.toml")
}
