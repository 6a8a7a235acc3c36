//! The KMS v2 wire: the messages of `KeyManagementService` (package `v2`) as the upstream
//! proto defines them (`kubernetes/kubernetes`,
//! `staging/src/k8s.io/kms/apis/v2/api.proto`; a copy with its source beside the tests,
//! `tests/fixtures/kubernetes/api.proto`), and the gRPC routing of its three unary
//! methods onto a [`Plugin`] with tonic's server codec.
//!
//! The plaintexts (Encrypt's request, Decrypt's answer) are secrets: no derived `Debug`,
//! zeroized on drop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use tonic::server::{Grpc, UnaryService};
use tonic::{Code, Status};
use zeroize::Zeroize;

use super::Plugin;

/// The largest gRPC message taken or sent: a call carries at most 1 KiB ciphertext,
/// 1 KiB `key_id` and annotations under 32 KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// `StatusRequest {}`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// `StatusResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    /// The plugin API version: `v2`.
    #[prost(string, tag = "1")]
    pub version: String,
    /// `ok`, or why not.
    #[prost(string, tag = "2")]
    pub healthz: String,
    /// The current write key.
    #[prost(string, tag = "3")]
    pub key_id: String,
}

/// `DecryptRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DecryptRequest {
    /// What Encrypt returned.
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
    /// The API server's request id.
    #[prost(string, tag = "2")]
    pub uid: String,
    /// The `key_id` Encrypt returned with it.
    #[prost(string, tag = "3")]
    pub key_id: String,
    /// The annotations Encrypt returned (none from Keyhold).
    #[prost(map = "string, bytes", tag = "4")]
    pub annotations: HashMap<String, Vec<u8>>,
}

/// `DecryptResponse`: the plaintext, a secret.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct DecryptResponse {
    /// The decrypted seed.
    #[prost(bytes = "vec", tag = "1")]
    pub plaintext: Vec<u8>,
}

impl DecryptResponse {
    /// An answer carrying a copy of `plaintext` (zeroized when dropped).
    pub fn new(plaintext: &[u8]) -> Self {
        Self {
            plaintext: plaintext.to_vec(),
        }
    }
}

/// `EncryptRequest`: the plaintext, a secret.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct EncryptRequest {
    /// The seed to encrypt.
    #[prost(bytes = "vec", tag = "1")]
    pub plaintext: Vec<u8>,
    /// The API server's request id.
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// `EncryptResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncryptResponse {
    /// The ciphertext the API server keeps in etcd.
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
    /// The key version that made it.
    #[prost(string, tag = "2")]
    pub key_id: String,
    /// Kept beside the ciphertext (none from Keyhold).
    #[prost(map = "string, bytes", tag = "3")]
    pub annotations: HashMap<String, Vec<u8>>,
}

macro_rules! secret_message {
    ($t:ty) => {
        impl Drop for $t {
            fn drop(&mut self) {
                self.plaintext.zeroize();
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    .field(
                        "plaintext",
                        &format_args!("<{} bytes>", self.plaintext.len()),
                    )
                    .finish_non_exhaustive()
            }
        }
    };
}
secret_message!(DecryptResponse);
secret_message!(EncryptRequest);

/// The service name of the method paths (`/v2.KeyManagementService/Status`).
pub const SERVICE: &str = "v2.KeyManagementService";

/// One unary method: a function from the request message to the answer.
struct Unary<F>(F);

impl<F, Req, Resp, Fut> UnaryService<Req> for Unary<F>
where
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<tonic::Response<Resp>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let answer = (self.0)(request.into_inner());
        Box::pin(async move { answer.await.map(tonic::Response::new) })
    }
}

/// Routes one HTTP/2 request to `plugin`'s method by its path; an unknown path is
/// `UNIMPLEMENTED`, as gRPC servers answer.
pub async fn route<B>(
    plugin: Arc<Plugin>,
    req: http::Request<B>,
) -> Result<http::Response<tonic::body::Body>, Infallible>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    fn grpc<Req, Resp>() -> Grpc<tonic_prost::ProstCodec<Resp, Req>>
    where
        Req: prost::Message + Default + Send + 'static,
        Resp: prost::Message + Send + 'static,
    {
        Grpc::new(tonic_prost::ProstCodec::default())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
    let path = req.uri().path().strip_prefix('/').unwrap_or_default();
    let method = path.strip_prefix(SERVICE).and_then(|m| m.strip_prefix('/'));
    let resp = match method {
        Some("Status") => {
            let svc = Unary(move |_: StatusRequest| {
                let p = plugin.clone();
                async move { p.status().await }
            });
            grpc::<StatusRequest, StatusResponse>()
                .unary(svc, req)
                .await
        }
        Some("Encrypt") => {
            let svc = Unary(move |r: EncryptRequest| {
                let p = plugin.clone();
                async move { p.encrypt(r).await }
            });
            grpc::<EncryptRequest, EncryptResponse>()
                .unary(svc, req)
                .await
        }
        Some("Decrypt") => {
            let svc = Unary(move |r: DecryptRequest| {
                let p = plugin.clone();
                async move { p.decrypt(r).await }
            });
            grpc::<DecryptRequest, DecryptResponse>()
                .unary(svc, req)
                .await
        }
        _ => Status::new(Code::Unimplemented, format!("no method {path}")).into_http(),
    };
    Ok(resp)
}
