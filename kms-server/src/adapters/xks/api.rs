//! The XKS wire: request and response bodies (camelCase JSON; unknown fields ignored, as
//! the specification requires) and the error table.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kms_client::api::SecretBytes;
use serde::{Deserialize, Serialize};

/// Largest plaintext (and ciphertext) accepted: the specification's minimum.
pub const MAX_PLAINTEXT: usize = 4300;
/// Largest additional authenticated data accepted: the specification's minimum.
pub const MAX_AAD: usize = 8192;
/// Largest `ciphertextMetadata`.
pub const MAX_METADATA: usize = 20;
/// Largest request body: the largest encrypt or decrypt (base64 of 4300 + 8192 bytes, two
/// 2048-character ARNs and the rest) fits with room to spare.
pub const MAX_BODY: usize = 32 * 1024;
/// The only encryption algorithm of version 1.
pub const AES_GCM: &str = "AES_GCM";
/// The only CDIV algorithm of version 1.
pub const SHA_256: &str = "SHA_256";

/// `requestMetadata`: required fields are checked per operation
/// ([`RequestMetadata::check`]); values are opaque and never validated beyond that.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    /// The AWS principal (absent from health).
    #[serde(default)]
    pub aws_principal_arn: Option<String>,
    /// `awsSourceVpc`.
    #[serde(default)]
    pub aws_source_vpc: Option<String>,
    /// `awsSourceVpce`.
    #[serde(default)]
    pub aws_source_vpce: Option<String>,
    /// The KMS key (encrypt, decrypt; optional for metadata).
    #[serde(default)]
    pub kms_key_arn: Option<String>,
    /// The KMS API call behind this request. Any value is accepted.
    pub kms_operation: String,
    /// KMS's request id (CloudTrail): opaque, logged.
    pub kms_request_id: String,
    /// `kmsViaService`.
    #[serde(default)]
    pub kms_via_service: Option<String>,
}

impl RequestMetadata {
    /// The fields `op` requires.
    pub fn check(&self, op: Operation) -> Result<(), XksError> {
        if matches!(
            op,
            Operation::Metadata | Operation::Encrypt | Operation::Decrypt
        ) && self.aws_principal_arn.is_none()
        {
            return Err(XksError::validation(
                "requestMetadata.awsPrincipalArn is required",
            ));
        }
        if matches!(op, Operation::Encrypt | Operation::Decrypt) && self.kms_key_arn.is_none() {
            return Err(XksError::validation(
                "requestMetadata.kmsKeyArn is required",
            ));
        }
        Ok(())
    }

    /// The audit attributes: every field present.
    pub fn attributes(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::new();
        m.insert("kmsRequestId".to_owned(), self.kms_request_id.clone());
        m.insert("kmsOperation".to_owned(), self.kms_operation.clone());
        for (k, v) in [
            ("awsPrincipalArn", &self.aws_principal_arn),
            ("awsSourceVpc", &self.aws_source_vpc),
            ("awsSourceVpce", &self.aws_source_vpce),
            ("kmsKeyArn", &self.kms_key_arn),
            ("kmsViaService", &self.kms_via_service),
        ] {
            if let Some(v) = v {
                m.insert(k.to_owned(), v.clone());
            }
        }
        m
    }
}

/// The four operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `POST .../health` (GetHealthStatus).
    Health,
    /// `POST .../keys/{id}/metadata` (GetKeyMetadata).
    Metadata,
    /// `POST .../keys/{id}/encrypt`.
    Encrypt,
    /// `POST .../keys/{id}/decrypt`.
    Decrypt,
}

impl Operation {
    /// The specification's name (audit, logs, metrics).
    pub fn name(self) -> &'static str {
        match self {
            Self::Health => "GetHealthStatus",
            Self::Metadata => "GetKeyMetadata",
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
        }
    }
}

/// Any body: only the metadata (health, GetKeyMetadata).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOnly {
    /// `requestMetadata`.
    pub request_metadata: RequestMetadata,
}

/// Base64 bytes that are not secret.
#[derive(Debug, Clone, Default)]
pub struct Bytes64(pub Vec<u8>);

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        B64.decode(s.as_bytes())
            .map(Bytes64)
            .map_err(|_| serde::de::Error::custom("not standard base64"))
    }
}

impl Serialize for Bytes64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

/// `POST .../encrypt`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    /// `requestMetadata`.
    pub request_metadata: RequestMetadata,
    /// The plaintext (zeroized on drop).
    pub plaintext: SecretBytes,
    /// `AES_GCM`.
    pub encryption_algorithm: String,
    /// Optional AAD.
    #[serde(default)]
    pub additional_authenticated_data: Option<Bytes64>,
    /// Optional `SHA_256`: asks for the CDIV.
    #[serde(default)]
    pub ciphertext_data_integrity_value_algorithm: Option<String>,
}

/// The encrypt answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    /// Same length as the plaintext.
    pub ciphertext: Bytes64,
    /// Keyhold's version marker (authenticated).
    pub ciphertext_metadata: Bytes64,
    /// 16 bytes.
    pub initialization_vector: Bytes64,
    /// 16 bytes.
    pub authentication_tag: Bytes64,
    /// When asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<String>,
}

/// `POST .../decrypt`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    /// `requestMetadata`.
    pub request_metadata: RequestMetadata,
    /// The ciphertext.
    pub ciphertext: Bytes64,
    /// What encrypt returned.
    #[serde(default)]
    pub ciphertext_metadata: Option<Bytes64>,
    /// `AES_GCM`.
    pub encryption_algorithm: String,
    /// The AAD given to encrypt.
    #[serde(default)]
    pub additional_authenticated_data: Option<Bytes64>,
    /// The IV.
    pub initialization_vector: Bytes64,
    /// The tag.
    pub authentication_tag: Bytes64,
}

/// The decrypt answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptResponse {
    /// The plaintext (zeroized on drop; serialized only here).
    pub plaintext: SecretBytes,
}

/// The GetKeyMetadata answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMetadataResponse {
    /// `AES_256`.
    pub key_spec: &'static str,
    /// `ENCRYPT`, `DECRYPT` as the grants allow.
    pub key_usage: Vec<&'static str>,
    /// `ENABLED` or `DISABLED`.
    pub key_status: &'static str,
}

/// One key manager of the fleet.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetMember {
    /// Node id.
    pub id: String,
    /// Product and version.
    pub model: String,
    /// `ACTIVE`, `DEGRADED` or `UNAVAILABLE`.
    pub health_status: &'static str,
}

/// The GetHealthStatus answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    /// Proxy nodes.
    pub xks_proxy_fleet_size: u32,
    /// `Keyhold`.
    pub xks_proxy_vendor: &'static str,
    /// `Keyhold XKS <version>`.
    pub xks_proxy_model: String,
    /// `Keyhold`.
    pub ekm_vendor: &'static str,
    /// 1 to 10 entries.
    pub ekm_fleet_details: Vec<FleetMember>,
}

/// The error names of the specification's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorName {
    /// 400.
    ValidationException,
    /// 400.
    InvalidStateException,
    /// 400.
    InvalidCiphertextException,
    /// 400.
    InvalidKeyUsageException,
    /// 401.
    AuthenticationFailedException,
    /// 403.
    AccessDeniedException,
    /// 404.
    KeyNotFoundException,
    /// 404.
    InvalidUriPathException,
    /// 429.
    ThrottlingException,
    /// 500.
    InternalException,
    /// 501.
    UnsupportedOperationException,
    /// 503.
    DependencyTimeoutException,
}

impl ErrorName {
    /// Its HTTP status.
    pub fn status(self) -> StatusCode {
        use ErrorName::*;
        match self {
            ValidationException
            | InvalidStateException
            | InvalidCiphertextException
            | InvalidKeyUsageException => StatusCode::BAD_REQUEST,
            AuthenticationFailedException => StatusCode::UNAUTHORIZED,
            AccessDeniedException => StatusCode::FORBIDDEN,
            KeyNotFoundException | InvalidUriPathException => StatusCode::NOT_FOUND,
            ThrottlingException => StatusCode::TOO_MANY_REQUESTS,
            InternalException => StatusCode::INTERNAL_SERVER_ERROR,
            UnsupportedOperationException => StatusCode::NOT_IMPLEMENTED,
            DependencyTimeoutException => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        use ErrorName::*;
        match self {
            ValidationException => "ValidationException",
            InvalidStateException => "InvalidStateException",
            InvalidCiphertextException => "InvalidCiphertextException",
            InvalidKeyUsageException => "InvalidKeyUsageException",
            AuthenticationFailedException => "AuthenticationFailedException",
            AccessDeniedException => "AccessDeniedException",
            KeyNotFoundException => "KeyNotFoundException",
            InvalidUriPathException => "InvalidUriPathException",
            ThrottlingException => "ThrottlingException",
            InternalException => "InternalException",
            UnsupportedOperationException => "UnsupportedOperationException",
            DependencyTimeoutException => "DependencyTimeoutException",
        }
    }
}

/// An XKS error: a name from the table and a message (printable ASCII, under 512
/// characters, never holding key material or plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksError {
    /// The table row.
    pub name: ErrorName,
    /// `errorMessage`.
    pub message: String,
}

/// `errorMessage` as the specification allows it: printable ASCII, under 512 characters.
pub fn clean_message(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    out.truncate(500);
    out
}

impl XksError {
    /// A new error.
    pub fn new(name: ErrorName, message: impl AsRef<str>) -> Self {
        Self {
            name,
            message: clean_message(message.as_ref()),
        }
    }

    /// 400 ValidationException.
    pub fn validation(message: impl AsRef<str>) -> Self {
        Self::new(ErrorName::ValidationException, message)
    }

    /// Core errors in the terms of the table: every variant named (a new one must be placed
    /// here), server faults as 5xx.
    pub fn from_keyring(e: &crate::base::error::Error, op: Operation) -> Self {
        use crate::base::error::Error as E;
        use kms_client::api::KeyState;
        match e {
            E::NotFound | E::KeyDisabled(KeyState::Destroyed) => Self::new(
                ErrorName::KeyNotFoundException,
                "the external key is not found (its Keyhold key does not exist or was destroyed)",
            ),
            E::KeyDisabled(state) => Self::new(
                ErrorName::InvalidStateException,
                format!("the external key is not enabled in Keyhold (state {state:?})"),
            ),
            E::PermissionDenied(_) => Self::new(
                ErrorName::InvalidKeyUsageException,
                format!(
                    "no Keyhold grant allows this key store the {} operation on this key",
                    if op == Operation::Decrypt { "unwrap (decrypt)" } else { "wrap (encrypt)" }
                ),
            ),
            E::DecryptFailed => Self::new(
                ErrorName::InvalidCiphertextException,
                "the ciphertext, initialization vector, additional authenticated data, metadata or tag is corrupted or does not belong to this key",
            ),
            E::InvalidRequest(m) => Self::new(ErrorName::ValidationException, m),
            E::Sealed => Self::new(
                ErrorName::DependencyTimeoutException,
                "the key manager is sealed: an operator must unseal it",
            ),
            E::Storage(_) | E::AuditUnavailable | E::MasterKeyChanged => Self::new(
                ErrorName::DependencyTimeoutException,
                "the key manager's store is unavailable",
            ),
            E::InvalidState(m) => Self::new(ErrorName::InvalidStateException, m),
            E::LockedOut => Self::new(ErrorName::ThrottlingException, "the key store is locked out"),
            E::Braked(m) => Self::new(ErrorName::ThrottlingException, *m),
            E::Unauthenticated => Self::new(
                ErrorName::AuthenticationFailedException,
                "the request is not authenticated",
            ),
            E::AlreadyExists
            | E::PayloadTooLarge(_)
            | E::UnsupportedMediaType
            | E::BodyTimeout(_)
            | E::NoRoute
            | E::MethodNotAllowed => Self::new(ErrorName::ValidationException, e.to_string()),
            // A stored version that does not open is the server's fault, not the caller's.
            E::Corrupt(_) | E::Unreadable(_) | E::Internal(_) | E::Seal(_) => {
                Self::new(ErrorName::InternalException, "internal error; see the Keyhold log")
            }
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    error_name: &'a str,
    error_message: &'a str,
}

impl IntoResponse for XksError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error_name: self.name.as_str(),
            error_message: &self.message,
        };
        let mut resp = (self.name.status(), axum::Json(body)).into_response();
        resp.extensions_mut().insert(self.name);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_printable_ascii_under_512() {
        let m = clean_message(&format!("é\n{}", "x".repeat(2000)));
        assert!(m.len() < 512);
        assert!(m.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }

    #[test]
    fn unknown_fields_are_ignored_and_required_ones_checked() {
        let r: EncryptRequest = serde_json::from_str(
            r#"{"requestMetadata":{"awsPrincipalArn":"a","kmsKeyArn":"k","kmsOperation":"Future","kmsRequestId":"r","newField":1},
                "plaintext":"SGVsbG8=","encryptionAlgorithm":"AES_GCM","somethingNew":{"x":[1]}}"#,
        )
        .unwrap();
        assert_eq!(r.plaintext.expose_secret(), b"Hello");
        assert!(r.request_metadata.check(Operation::Encrypt).is_ok());
        let m: MetadataOnly = serde_json::from_str(
            r#"{"requestMetadata":{"kmsOperation":"CreateKey","kmsRequestId":"r"}}"#,
        )
        .unwrap();
        assert!(m.request_metadata.check(Operation::Health).is_ok());
        assert_eq!(
            m.request_metadata
                .check(Operation::Metadata)
                .unwrap_err()
                .name,
            ErrorName::ValidationException
        );
        assert!(serde_json::from_str::<DecryptRequest>(r#"{"requestMetadata":{"kmsOperation":"a","kmsRequestId":"r"},"ciphertext":"!!","encryptionAlgorithm":"AES_GCM","initializationVector":"","authenticationTag":""}"#).is_err());
    }
}

/// Issue 23: every core error has its answer, and the server's faults are 5xx (the map
/// ended in a wildcard answering 400, so a corrupt record or an internal fault reached
/// the caller as the caller's error).
#[cfg(test)]
mod error_map_tests {
    use super::*;

    #[test]
    fn server_faults_are_5xx_and_the_rest_4xx() {
        let (server, client) = crate::base::error::every_variant();
        for e in &server {
            let status = XksError::from_keyring(e, Operation::Decrypt).name.status();
            assert!(status.is_server_error(), "{e:?}: {status}");
        }
        for e in &client {
            let status = XksError::from_keyring(e, Operation::Decrypt).name.status();
            assert!(status.is_client_error(), "{e:?}: {status}");
        }
    }
}
