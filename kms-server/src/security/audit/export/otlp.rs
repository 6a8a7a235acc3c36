//! Audit records as OpenTelemetry logs, sent with OTLP/HTTP in binary protobuf
//! (`POST /v1/logs`, `application/x-protobuf`).
//!
//! The messages are those of the OpenTelemetry protocol (`opentelemetry-proto`,
//! `opentelemetry/proto/collector/logs/v1/logs_service.proto`, `logs/v1/logs.proto`,
//! `common/v1/common.proto`, `resource/v1/resource.proto`), written here with `prost` for
//! the fields Keyhold sends; the e2e test decodes them with the Python classes generated
//! from the upstream definitions. One log record per audit record:
//!
//! - `time_unix_nano`: the record's time; `observed_time_unix_nano`: when it was sent;
//! - `severity_number`/`severity_text`: INFO for a success, WARN for a refusal (4xx), ERROR
//!   for a failure (5xx), INFO2 for a chain event;
//! - `body`: the record's JSON line, as in the chain (its hash verifies);
//! - attributes `keyhold.audit.seq` (int), `keyhold.audit.hash`, `keyhold.operation`,
//!   `keyhold.outcome`, `http.response.status_code`, and `keyhold.identity`,
//!   `keyhold.key`, `keyhold.tenant` when the record has them;
//! - `event_name`: `keyhold.audit`.
//!
//! A batch is delivered when the receiver answers 200 (a partial success that rejects
//! records is logged with the receiver's reason: the OTLP specification forbids resending
//! it). Any other answer is retried.

use kms_client::api::AuditRecord;
use prost::Message;

use super::{ExportTarget, SendError};
use crate::transport::http_client::{self, Schemes};

/// `ExportLogsServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceRequest {
    /// One per resource (Keyhold sends one).
    #[prost(message, repeated, tag = "1")]
    pub resource_logs: Vec<ResourceLogs>,
}

/// `ExportLogsServiceResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceResponse {
    /// Set when the receiver rejected some records.
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportLogsPartialSuccess>,
}

/// `ExportLogsPartialSuccess`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsPartialSuccess {
    /// How many were rejected.
    #[prost(int64, tag = "1")]
    pub rejected_log_records: i64,
    /// Why.
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// `ResourceLogs`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceLogs {
    /// The service that logged.
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// The records, by scope.
    #[prost(message, repeated, tag = "2")]
    pub scope_logs: Vec<ScopeLogs>,
}

/// `Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    /// `service.name`, `service.version`, `service.instance.id`.
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ScopeLogs`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeLogs {
    /// `keyhold.audit`.
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// The records.
    #[prost(message, repeated, tag = "2")]
    pub log_records: Vec<LogRecord>,
}

/// `InstrumentationScope`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Version.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `LogRecord`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    /// When the event happened.
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    /// `SeverityNumber`.
    #[prost(int32, tag = "2")]
    pub severity_number: i32,
    /// Its name.
    #[prost(string, tag = "3")]
    pub severity_text: String,
    /// The record's JSON.
    #[prost(message, optional, tag = "5")]
    pub body: Option<AnyValue>,
    /// The record's main fields.
    #[prost(message, repeated, tag = "6")]
    pub attributes: Vec<KeyValue>,
    /// When it was sent.
    #[prost(fixed64, tag = "11")]
    pub observed_time_unix_nano: u64,
    /// `keyhold.audit`.
    #[prost(string, tag = "12")]
    pub event_name: String,
}

/// `KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Name.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Value.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// `AnyValue`, for the two kinds Keyhold sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    /// The value.
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

/// `AnyValue.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    /// `string_value`.
    #[prost(string, tag = "1")]
    String(String),
    /// `int_value`.
    #[prost(int64, tag = "3")]
    Int(i64),
}

fn text(key: &str, v: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::String(v.to_owned())),
        }),
    }
}

fn int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::Int(v)),
        }),
    }
}

/// The log record for `r`, observed at `now` (Unix nanoseconds).
pub fn log_record(r: &AuditRecord, now: u64) -> LogRecord {
    let (number, name) = match r.status {
        0 => (10, "INFO2"),
        s if s >= 500 => (17, "ERROR"),
        s if s >= 400 => (13, "WARN"),
        _ => (9, "INFO"),
    };
    let mut attributes = vec![
        int(
            "keyhold.audit.seq",
            i64::try_from(r.seq).unwrap_or(i64::MAX),
        ),
        text("keyhold.audit.hash", &r.hash),
        text("keyhold.operation", &r.operation),
        text("keyhold.outcome", &r.outcome),
        int("http.response.status_code", i64::from(r.status)),
    ];
    for (k, v) in [
        ("keyhold.identity", &r.identity),
        ("keyhold.key", &r.key),
        ("keyhold.tenant", &r.tenant),
    ] {
        if let Some(v) = v {
            attributes.push(text(k, v));
        }
    }
    LogRecord {
        time_unix_nano: super::unix_nanos(&r.time),
        severity_number: number,
        severity_text: name.to_owned(),
        body: Some(AnyValue {
            value: Some(Value::String(
                serde_json::to_string(r).unwrap_or_else(|_| "{}".into()),
            )),
        }),
        attributes,
        observed_time_unix_nano: now,
        event_name: "keyhold.audit".to_owned(),
    }
}

/// The request carrying `records`.
pub fn request(records: &[AuditRecord], instance: &str, now: u64) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", "keyhold"),
                    text("service.version", env!("CARGO_PKG_VERSION")),
                    text("service.instance.id", instance),
                ],
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "keyhold.audit".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }),
                log_records: records.iter().map(|r| log_record(r, now)).collect(),
            }],
        }],
    }
}

/// An OTLP exporter's endpoint.
pub struct Sender {
    url: String,
    ca: Option<std::path::PathBuf>,
    instance: String,
}

/// The longest one export call may take.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

impl Sender {
    /// A sender for `target`.
    pub fn new(target: &ExportTarget, node: &str) -> Self {
        Self {
            url: target.address.clone(),
            ca: target.ca_file.clone(),
            instance: node.to_owned(),
        }
    }

    /// Sends `records` in one call: all of them are delivered, or none.
    pub async fn send(&mut self, records: &[AuditRecord]) -> Result<(), SendError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let body = request(records, &self.instance, now).encode_to_vec();
        let (status, answer) = http_client::request_typed(
            "POST",
            &self.url,
            Schemes::HttpOrHttps,
            self.ca.as_deref(),
            Some(("application/x-protobuf", &body)),
            DEADLINE,
        )
        .await
        .map_err(|e| SendError::new(0, format!("OTLP: {e}")))?;
        if status != 200 {
            return Err(SendError::new(
                0,
                format!("OTLP receiver answered {status}"),
            ));
        }
        if let Ok(ExportLogsServiceResponse {
            partial_success: Some(p),
        }) = ExportLogsServiceResponse::decode(answer.as_slice())
        {
            if p.rejected_log_records > 0 {
                tracing::error!(
                    rejected = p.rejected_log_records,
                    reason = %p.error_message,
                    "the OTLP receiver rejected audit records (not resent, as OTLP requires)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_maps_to_one_log_record() {
        let r = AuditRecord {
            seq: 3,
            time: "2026-12-05T10:00:00.5Z".into(),
            request_id: 1,
            identity: Some("app".into()),
            tenant: None,
            operation: "POST /v1/unwrap".into(),
            key: Some("k".into()),
            version: Some(1),
            context_hash: None,
            outcome: "ok".into(),
            status: 200,
            latency_us: 5,
            attributes: None,
            prev: "0".repeat(64),
            hash: "1".repeat(64),
        };
        let req = request(std::slice::from_ref(&r), "node-a", 7);
        let bytes = req.encode_to_vec();
        let back = ExportLogsServiceRequest::decode(bytes.as_slice()).unwrap();
        let l = &back.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(l.severity_number, 9);
        assert_eq!(l.time_unix_nano, 1_796_464_800_500_000_000);
        assert_eq!(l.attributes[0], int("keyhold.audit.seq", 3));
        let Some(Value::String(json)) = l.body.clone().unwrap().value else {
            panic!("body")
        };
        assert_eq!(serde_json::from_str::<AuditRecord>(&json).unwrap(), r);
    }
}
