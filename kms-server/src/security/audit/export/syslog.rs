//! Audit records as RFC 5424 syslog messages, over RELP on TLS or RFC 5425 TLS.
//!
//! A message:
//!
//! ```text
//! <PRI>1 TIME HOST keyhold PID audit [keyhold@32473 seq="N" hash="…" outcome="…"] MSG
//! ```
//!
//! `PRI` is the facility (default authpriv) and a severity from the record: informational
//! for a success, warning for a refusal (4xx), error for a failure (5xx), notice for a
//! chain event. `MSG` is the record's JSON line as it is in the chain (`format = "json"`),
//! or a CEF line (`format = "cef"`). The structured data's SD-ID uses the private
//! enterprise number RFC 5612 sets aside for documentation (32473).
//!
//! RELP (librelp's protocol, rsyslog's `imrelp`) frames each message as
//! `TXNR syslog LEN MSG\n` and the receiver answers `TXNR rsp LEN 200 OK\n` once it has
//! taken the message: a record counts as delivered only then. Up to [`WINDOW`] messages
//! are in flight at once. RFC 5425 (`transport = "tls"`) writes `LEN MSG` frames and gets
//! no answer: a record counts as delivered once written, so a receiver that dies with
//! records unread loses them; use it only for receivers that cannot speak RELP.

use std::sync::Arc;

use kms_client::api::AuditRecord;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_rustls::client::TlsStream;

use super::{ExportTarget, SendError, SyslogFormat, SyslogTransport};

/// Most RELP messages sent before their answers are read (librelp's default window is
/// 128).
pub const WINDOW: usize = 64;
/// The longest one exchange (connect, a window's answers) may take.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest RELP frame read (answers are a few bytes).
const MAX_FRAME: usize = 64 * 1024;

/// Splits `host:port`.
pub fn split_address(address: &str) -> Result<(String, u16), &'static str> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or("address must be host:port")?;
    let port = port.parse::<u16>().map_err(|_| "address: bad port")?;
    if host.is_empty() {
        return Err("address: no host");
    }
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

/// A syslog exporter's connection and message format.
pub struct Sender {
    host: String,
    port: u16,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: Option<tokio_rustls::TlsConnector>,
    tls_settings: (
        Option<std::path::PathBuf>,
        Option<(std::path::PathBuf, std::path::PathBuf)>,
    ),
    transport: SyslogTransport,
    format: SyslogFormat,
    facility: u8,
    hostname: String,
    conn: Option<Conn>,
}

struct Conn {
    stream: BufReader<TlsStream<tokio::net::TcpStream>>,
    /// The next RELP transaction number.
    txnr: u64,
}

impl Sender {
    /// A sender for `target` (connects on the first send).
    pub fn new(target: &ExportTarget, node: &str) -> Result<Self, String> {
        let (host, port) = split_address(&target.address).map_err(str::to_owned)?;
        let name = target.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|_| "server_name: not a DNS name or an IP address".to_owned())?;
        let client = target.cert_file.clone().zip(target.key_file.clone());
        Ok(Self {
            host,
            port,
            server_name,
            tls: None,
            tls_settings: (target.ca_file.clone(), client),
            transport: target.transport,
            format: target.format,
            facility: target.facility,
            hostname: node
                .rsplit_once(':')
                .map_or(node, |(h, _)| h)
                .chars()
                .filter(char::is_ascii_graphic)
                .take(255)
                .collect(),
            conn: None,
        })
    }

    fn connector(&mut self) -> Result<tokio_rustls::TlsConnector, String> {
        if let Some(c) = &self.tls {
            return Ok(c.clone());
        }
        let (ca, client) = &self.tls_settings;
        let config = crate::transport::http_client::client_tls_config(
            ca.as_deref(),
            client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .map_err(|e| e.to_string())?;
        let c = tokio_rustls::TlsConnector::from(Arc::new(config));
        self.tls = Some(c.clone());
        Ok(c)
    }

    async fn connect(&mut self) -> Result<Conn, String> {
        let connector = self.connector()?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut conn = Conn {
            stream: BufReader::new(tls),
            txnr: 1,
        };
        if self.transport == SyslogTransport::RelpTls {
            let offers = format!(
                "relp_version=0\nrelp_software=keyhold,{},-\ncommands=syslog",
                env!("CARGO_PKG_VERSION")
            );
            let n = conn.txnr;
            conn.txnr += 1;
            write_frame(&mut conn, n, "open", offers.as_bytes()).await?;
            conn.stream
                .flush()
                .await
                .map_err(|e| format!("RELP open: {e}"))?;
            let (txnr, command, data) = read_frame(&mut conn.stream).await?;
            if txnr != n || command != "rsp" || !data.starts_with(b"200") {
                return Err(format!(
                    "RELP open refused: {}",
                    String::from_utf8_lossy(&data[..data.len().min(200)])
                ));
            }
        }
        Ok(conn)
    }

    /// Sends `records` in order; on failure, says how many were acknowledged first.
    pub async fn send(&mut self, records: &[AuditRecord]) -> Result<(), SendError> {
        match tokio::time::timeout(DEADLINE * 3, self.send_all(records)).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(SendError::new(0, "syslog receiver: no answer in time"))
            }
        }
    }

    async fn send_all(&mut self, records: &[AuditRecord]) -> Result<(), SendError> {
        let mut acked = 0;
        if self.conn.is_none() {
            let conn = tokio::time::timeout(DEADLINE, self.connect())
                .await
                .map_err(|_| SendError::new(0, "syslog receiver: connect timed out"))?
                .map_err(|e| SendError::new(0, e))?;
            self.conn = Some(conn);
        }
        for window in records.chunks(WINDOW) {
            let result = self.send_window(window).await;
            match result {
                Ok(()) => acked += window.len(),
                Err((n, reason)) => {
                    self.conn = None;
                    return Err(SendError::new(acked + n, reason));
                }
            }
        }
        Ok(())
    }

    /// Sends one window; on failure, how many of it were acknowledged.
    async fn send_window(&mut self, window: &[AuditRecord]) -> Result<(), (usize, String)> {
        let messages: Vec<Vec<u8>> = window
            .iter()
            .map(|r| message(r, self.facility, &self.hostname, self.format))
            .collect();
        let transport = self.transport;
        let Some(conn) = self.conn.as_mut() else {
            return Err((0, "not connected".into()));
        };
        if transport == SyslogTransport::Tls {
            // An RFC 5425 receiver never writes: anything readable is its close. Seen
            // before writing, the window goes to a new connection instead of being lost.
            let peek = tokio::time::timeout(std::time::Duration::ZERO, conn.stream.fill_buf());
            if let Ok(read) = peek.await {
                match read {
                    Ok([]) | Err(_) => {
                        return Err((0, "the receiver closed the connection".into()))
                    }
                    Ok(data) => {
                        let n = data.len();
                        conn.stream.consume(n);
                    }
                }
            }
        }
        let first = conn.txnr;
        for m in &messages {
            match transport {
                SyslogTransport::RelpTls => {
                    let n = conn.txnr;
                    conn.txnr = if n >= 999_999_999 { 1 } else { n + 1 };
                    write_frame(conn, n, "syslog", m)
                        .await
                        .map_err(|e| (0, e))?;
                }
                SyslogTransport::Tls => {
                    let mut frame = format!("{} ", m.len()).into_bytes();
                    frame.extend_from_slice(m);
                    conn.stream
                        .get_mut()
                        .write_all(&frame)
                        .await
                        .map_err(|e| (0, format!("write: {e}")))?;
                }
            }
        }
        conn.stream
            .get_mut()
            .flush()
            .await
            .map_err(|e| (0, format!("write: {e}")))?;
        if transport == SyslogTransport::Tls {
            return Ok(());
        }
        // Answers come in order (librelp answers each frame as it takes it).
        for i in 0..messages.len() {
            let expected = (first - 1 + i as u64) % 999_999_999 + 1;
            let (txnr, command, data) =
                tokio::time::timeout(DEADLINE, read_frame(&mut conn.stream))
                    .await
                    .map_err(|_| (i, "RELP: no answer in time".to_owned()))?
                    .map_err(|e| (i, e))?;
            if command == "serverclose" {
                return Err((i, "RELP: the receiver closed the session".into()));
            }
            if command != "rsp" || txnr != expected {
                return Err((i, format!("RELP: unexpected `{command}` for {txnr}")));
            }
            if !data.starts_with(b"200") {
                return Err((
                    i,
                    format!(
                        "RELP: refused: {}",
                        String::from_utf8_lossy(&data[..data.len().min(200)])
                    ),
                ));
            }
        }
        Ok(())
    }
}

async fn write_frame(conn: &mut Conn, txnr: u64, command: &str, data: &[u8]) -> Result<(), String> {
    let mut frame = format!("{txnr} {command} {}", data.len()).into_bytes();
    if !data.is_empty() {
        frame.push(b' ');
        frame.extend_from_slice(data);
    }
    frame.push(b'\n');
    conn.stream
        .get_mut()
        .write_all(&frame)
        .await
        .map_err(|e| format!("write: {e}"))
}

/// Reads one RELP frame: `TXNR SP COMMAND SP DATALEN [SP DATA] LF`.
async fn read_frame<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<(u64, String, Vec<u8>), String> {
    let closed = || "RELP: the receiver closed the connection".to_owned();
    let mut token = Vec::new();
    let mut fields = Vec::new();
    // TXNR and COMMAND end at a space; DATALEN at a space or, when 0, the LF.
    for _ in 0..3 {
        token.clear();
        loop {
            let b = r.read_u8().await.map_err(|_| closed())?;
            if b == b' ' || b == b'\n' {
                fields.push((std::mem::take(&mut token), b));
                break;
            }
            if token.len() > 32 {
                return Err("RELP: bad frame header".into());
            }
            token.push(b);
        }
        if fields.last().is_some_and(|(_, end)| *end == b'\n') {
            break;
        }
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let [(txnr, _), (command, _), (len, end)] =
        <[_; 3]>::try_from(fields).map_err(|_| "RELP: bad frame header".to_owned())?;
    let txnr = text(&txnr)
        .parse::<u64>()
        .map_err(|_| "RELP: bad transaction number".to_owned())?;
    let len = text(&len)
        .parse::<usize>()
        .map_err(|_| "RELP: bad data length".to_owned())?;
    if len > MAX_FRAME {
        return Err("RELP: answer too long".into());
    }
    let mut data = vec![0; len];
    if end == b' ' {
        r.read_exact(&mut data).await.map_err(|_| closed())?;
        let mut lf = Vec::new();
        r.read_until(b'\n', &mut lf).await.map_err(|_| closed())?;
    }
    Ok((txnr, text(&command), data))
}

/// The severity of a record: 6 informational, 5 notice (chain events), 4 warning
/// (refused), 3 error (failed).
fn severity(r: &AuditRecord) -> u8 {
    match r.status {
        0 => 5,
        s if s >= 500 => 3,
        s if s >= 400 => 4,
        _ => 6,
    }
}

fn sd_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RFC 5424 message for `r`.
pub fn message(r: &AuditRecord, facility: u8, hostname: &str, format: SyslogFormat) -> Vec<u8> {
    let pri = u16::from(facility) * 8 + u16::from(severity(r));
    let host = if hostname.is_empty() { "-" } else { hostname };
    let mut m = format!(
        "<{pri}>1 {} {host} keyhold {} audit [keyhold@32473 seq=\"{}\" hash=\"{}\" outcome=\"{}\"] ",
        r.time,
        std::process::id(),
        r.seq,
        sd_escape(&r.hash),
        sd_escape(&r.outcome),
    )
    .into_bytes();
    match format {
        SyslogFormat::Json => {
            // The record as in the chain: its hash verifies.
            if serde_json::to_writer(&mut m, r).is_err() {
                m.extend_from_slice(b"{}");
            }
        }
        SyslogFormat::Cef => m.extend_from_slice(cef(r).as_bytes()),
    }
    m
}

fn cef_header(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\r', '\n'], " ")
}

fn cef_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\r', "\\r")
        .replace('\n', "\\n")
}

/// The record as an ArcSight CEF line (revision 0).
pub fn cef(r: &AuditRecord) -> String {
    let severity = match severity(r) {
        3 => 8,
        4 => 6,
        5 => 5,
        _ => 3,
    };
    let mut ext = vec![
        format!("rt={}", super::unix_nanos(&r.time) / 1_000_000),
        format!("externalId={}", r.seq),
        format!("act={}", cef_value(&r.operation)),
        format!("outcome={}", cef_value(&r.outcome)),
        "cn1Label=status".into(),
        format!("cn1={}", r.status),
        "cn2Label=requestId".into(),
        format!("cn2={}", r.request_id),
        "cs3Label=chainHash".into(),
        format!("cs3={}", r.hash),
    ];
    if let Some(i) = &r.identity {
        ext.push(format!("suser={}", cef_value(i)));
    }
    if let Some(k) = &r.key {
        ext.push("cs1Label=key".into());
        ext.push(format!("cs1={}", cef_value(k)));
    }
    if let Some(v) = r.version {
        ext.push("cn3Label=keyVersion".into());
        ext.push(format!("cn3={v}"));
    }
    if let Some(t) = &r.tenant {
        ext.push("cs2Label=tenant".into());
        ext.push(format!("cs2={}", cef_value(t)));
    }
    if let Some(c) = &r.context_hash {
        ext.push("cs4Label=contextHash".into());
        ext.push(format!("cs4={}", cef_value(c)));
    }
    format!(
        "CEF:0|Keyhold|kms-server|{}|{}|{} {}|{severity}|{}",
        env!("CARGO_PKG_VERSION"),
        cef_header(&r.operation),
        cef_header(&r.operation),
        cef_header(&r.outcome),
        ext.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            seq: 7,
            time: "2026-12-05T10:00:00.123Z".into(),
            request_id: 9,
            identity: Some("spiffe://prov/app|x=y".into()),
            tenant: None,
            operation: "POST /v1/unwrap".into(),
            key: Some("orders".into()),
            version: Some(2),
            context_hash: None,
            outcome: "PermissionDenied".into(),
            status: 403,
            latency_us: 10,
            attributes: None,
            prev: "a".repeat(64),
            hash: "b".repeat(64),
        }
    }

    #[test]
    fn a_message_is_rfc5424_with_the_record_as_in_the_chain() {
        let r = record();
        let m = String::from_utf8(message(&r, 10, "kms-a", SyslogFormat::Json)).unwrap();
        // authpriv (10) * 8 + warning (4).
        assert!(m.starts_with("<84>1 2026-12-05T10:00:00.123Z kms-a keyhold "));
        assert!(m.contains(" audit [keyhold@32473 seq=\"7\" hash=\"bbbb"));
        let json = &m[m.find("] {").unwrap() + 2..];
        let back: AuditRecord = serde_json::from_str(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn cef_escapes_its_separators() {
        let c = cef(&record());
        assert!(c.starts_with("CEF:0|Keyhold|kms-server|"));
        assert!(c.contains("|POST /v1/unwrap|POST /v1/unwrap PermissionDenied|6|"));
        assert!(c.contains("suser=spiffe://prov/app|x\\=y"));
        assert!(c.contains("rt=1796464800123"));
        assert!(c.contains("externalId=7"));
    }

    #[tokio::test]
    async fn relp_frames_are_read_with_and_without_data() {
        let input: &[u8] = b"1 rsp 6 200 OK\n2 rsp 0\n0 serverclose 0\n";
        let mut r = BufReader::new(input);
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            (1, "rsp".into(), b"200 OK".to_vec())
        );
        assert_eq!(read_frame(&mut r).await.unwrap(), (2, "rsp".into(), vec![]));
        assert_eq!(
            read_frame(&mut r).await.unwrap().1,
            "serverclose".to_owned()
        );
        assert!(read_frame(&mut r).await.is_err());
    }
}
