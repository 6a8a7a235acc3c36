//! KMIP messages (KMIP 1.4 §7, 2.1 §8): a Request Message's header and batch items in, a
//! Response Message out, and the typed reads of payload fields every operation shares.

use zeroize::Zeroizing;

use super::tags as t;
use super::ttlv::{Item, Tag, Value};

/// A protocol version, ordered (1.0 < 1.4 < 2.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: i32,
    /// Minor.
    pub minor: i32,
}

impl Version {
    /// What this server speaks, most preferred first (Discover Versions answers in this
    /// order).
    pub const SUPPORTED: [Version; 7] = [
        Version::new(2, 1),
        Version::new(2, 0),
        Version::new(1, 4),
        Version::new(1, 3),
        Version::new(1, 2),
        Version::new(1, 1),
        Version::new(1, 0),
    ];

    /// `major.minor`.
    pub const fn new(major: i32, minor: i32) -> Self {
        Self { major, minor }
    }

    /// Whether this server speaks it.
    pub fn supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// The Protocol Version structure.
    pub fn item(self) -> Item {
        Item::structure(
            t::PROTOCOL_VERSION,
            vec![
                Item::new(t::PROTOCOL_VERSION_MAJOR, Value::Integer(self.major)),
                Item::new(t::PROTOCOL_VERSION_MINOR, Value::Integer(self.minor)),
            ],
        )
    }

    /// Reads a Protocol Version structure.
    pub fn of(item: &Item) -> Result<Self, Failure> {
        Ok(Self::new(
            int(item, t::PROTOCOL_VERSION_MAJOR)?,
            int(item, t::PROTOCOL_VERSION_MINOR)?,
        ))
    }
}

/// A failed batch item: the Result Reason and the Result Message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A Result Reason (`tags::REASON_*`).
    pub reason: u32,
    /// What went wrong, for the client's log (never a secret).
    pub message: String,
    /// A refusal to alert on: `Some(true)` also counts toward the caller's lockout (a
    /// missing role or grant), `Some(false)` only alerts (an attempt to extract a key).
    pub denial: Option<bool>,
}

impl Failure {
    /// A failure.
    pub fn new(reason: u32, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            denial: None,
        }
    }

    /// `Permission Denied` for want of a role or grant: alerted, and counted toward the
    /// caller's lockout.
    pub fn denied(message: impl Into<String>) -> Self {
        Self {
            denial: Some(true),
            ..Self::new(super::tags::REASON_PERMISSION_DENIED, message)
        }
    }

    /// `Invalid Message`: the request cannot be read.
    pub fn invalid_message(message: impl Into<String>) -> Self {
        Self::new(t::REASON_INVALID_MESSAGE, message)
    }

    /// `Invalid Field`.
    pub fn invalid_field(message: impl Into<String>) -> Self {
        Self::new(t::REASON_INVALID_FIELD, message)
    }

    /// `Missing Data`: a required field is absent.
    pub fn missing(what: &str) -> Self {
        Self::new(t::REASON_MISSING_DATA, format!("{what} is missing"))
    }
}

/// One batch item of a request.
#[derive(Debug)]
pub struct BatchItem {
    /// The Operation.
    pub operation: u32,
    /// The Unique Batch Item ID, echoed in the answer.
    pub id: Option<Zeroizing<Vec<u8>>>,
    /// The Request Payload (an empty structure when absent).
    pub payload: Item,
}

/// A request: its version and its batch items.
#[derive(Debug)]
pub struct Request {
    /// The Protocol Version of the header.
    pub version: Version,
    /// The Maximum Response Size the client set, if any.
    pub max_response: Option<usize>,
    /// Whether the client asked that a failed item stop the rest (`Stop`, the default)
    /// or not (`Continue`; `Undo` is treated as `Stop`).
    pub continue_on_error: bool,
    /// The batch items, in order.
    pub items: Vec<BatchItem>,
}

impl Request {
    /// Reads a Request Message; a message that is not one is a [`Failure`] with reason
    /// Invalid Message (answered with the version it names, if it can be read).
    pub fn of(message: &Item) -> Result<Self, (Option<Version>, Failure)> {
        let fail = |v: Option<Version>, m: &str| (v, Failure::invalid_message(m));
        if message.tag != t::REQUEST_MESSAGE {
            return Err(fail(None, "not a Request Message"));
        }
        let header = message
            .child(t::REQUEST_HEADER)
            .ok_or_else(|| fail(None, "the Request Header is missing"))?;
        let version = header
            .child(t::PROTOCOL_VERSION)
            .map(Version::of)
            .transpose()
            .map_err(|e| (None, Failure::invalid_message(e.message)))?
            .ok_or_else(|| fail(None, "the Protocol Version is missing"))?;
        let v = Some(version);
        if header.child(t::AUTHENTICATION).is_some() {
            // Identity is the client certificate; a second credential is not read.
            tracing::debug!(
                "KMIP Authentication in the header ignored: identity is the client certificate"
            );
        }
        let max_response = match header.child(t::MAXIMUM_RESPONSE_SIZE) {
            Some(Item {
                value: Value::Integer(n),
                ..
            }) if *n > 0 => Some(*n as usize),
            Some(_) => return Err(fail(v, "Maximum Response Size must be a positive Integer")),
            None => None,
        };
        let continue_on_error = matches!(
            header.child(t::BATCH_ERROR_CONTINUATION_OPTION),
            Some(Item {
                value: Value::Enumeration(2),
                ..
            })
        );
        // A header or batch item that cannot be read makes the whole message invalid.
        let invalid = |e: Failure| (v, Failure::invalid_message(e.message));
        let count = int(header, t::BATCH_COUNT).map_err(invalid)?;
        let mut items = Vec::new();
        for b in message.all(t::BATCH_ITEM) {
            let operation = enumeration(b, t::OPERATION).map_err(invalid)?;
            let id = match b.child(t::UNIQUE_BATCH_ITEM_ID) {
                Some(Item {
                    value: Value::ByteString(id),
                    ..
                }) => Some(id.clone()),
                Some(_) => return Err(fail(v, "Unique Batch Item ID must be a Byte String")),
                None => None,
            };
            let payload = b
                .child(t::REQUEST_PAYLOAD)
                .cloned()
                .unwrap_or_else(|| Item::structure(t::REQUEST_PAYLOAD, Vec::new()));
            items.push(BatchItem {
                operation,
                id,
                payload,
            });
        }
        if items.is_empty() || usize::try_from(count).ok() != Some(items.len()) {
            return Err(fail(v, "the Batch Count does not match the batch items"));
        }
        Ok(Self {
            version,
            max_response,
            continue_on_error,
            items,
        })
    }
}

/// One answered batch item.
#[derive(Debug)]
pub struct Answer {
    /// The request's Operation (absent when the request's could not be read).
    pub operation: Option<u32>,
    /// The request's Unique Batch Item ID.
    pub id: Option<Zeroizing<Vec<u8>>>,
    /// The Response Payload's items, or the failure.
    pub result: Result<Vec<Item>, Failure>,
}

/// A Response Message answering `answers` under `version`, stamped `now` (Unix seconds).
pub fn response(version: Version, now: i64, answers: Vec<Answer>) -> Item {
    let count = i32::try_from(answers.len()).unwrap_or(i32::MAX);
    let header = Item::structure(
        t::RESPONSE_HEADER,
        vec![
            version.item(),
            Item::new(t::TIME_STAMP, Value::DateTime(now)),
            Item::new(t::BATCH_COUNT, Value::Integer(count)),
        ],
    );
    let mut items = vec![header];
    for a in answers {
        let mut b = Vec::with_capacity(5);
        if let Some(op) = a.operation {
            b.push(Item::new(t::OPERATION, Value::Enumeration(op)));
        }
        if let Some(id) = a.id {
            b.push(Item::new(t::UNIQUE_BATCH_ITEM_ID, Value::ByteString(id)));
        }
        match a.result {
            Ok(payload) => {
                b.push(Item::new(
                    t::RESULT_STATUS,
                    Value::Enumeration(t::STATUS_SUCCESS),
                ));
                b.push(Item::structure(t::RESPONSE_PAYLOAD, payload));
            }
            Err(f) => {
                b.push(Item::new(
                    t::RESULT_STATUS,
                    Value::Enumeration(t::STATUS_OPERATION_FAILED),
                ));
                b.push(Item::new(t::RESULT_REASON, Value::Enumeration(f.reason)));
                // ASCII only: strict clients (PyKMIP) refuse anything else.
                let message = crate::adapters::xks::api::clean_message(&f.message);
                b.push(Item::new(t::RESULT_MESSAGE, Value::TextString(message)));
            }
        }
        items.push(Item::structure(t::BATCH_ITEM, b));
    }
    Item::structure(t::RESPONSE_MESSAGE, items)
}

/// The Integer child `tag` of `item` (required).
pub fn int(item: &Item, tag: Tag) -> Result<i32, Failure> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::Integer(v)) => Ok(*v),
        Some(_) => Err(Failure::invalid_field(format!(
            "0x{tag:06x} must be an Integer"
        ))),
        None => Err(Failure::missing(&format!("0x{tag:06x}"))),
    }
}

/// The Enumeration child `tag` of `item` (required).
pub fn enumeration(item: &Item, tag: Tag) -> Result<u32, Failure> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::Enumeration(v)) => Ok(*v),
        Some(_) => Err(Failure::invalid_field(format!(
            "0x{tag:06x} must be an Enumeration"
        ))),
        None => Err(Failure::missing(&format!("0x{tag:06x}"))),
    }
}

/// The Text String child `tag` of `item`, if present.
pub fn text(item: &Item, tag: Tag) -> Result<Option<&str>, Failure> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::TextString(v)) => Ok(Some(v)),
        Some(_) => Err(Failure::invalid_field(format!(
            "0x{tag:06x} must be a Text String"
        ))),
        None => Ok(None),
    }
}

/// The Byte String child `tag` of `item`, if present.
pub fn bytes(item: &Item, tag: Tag) -> Result<Option<&[u8]>, Failure> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::ByteString(v)) => Ok(Some(v)),
        Some(_) => Err(Failure::invalid_field(format!(
            "0x{tag:06x} must be a Byte String"
        ))),
        None => Ok(None),
    }
}

/// The Unique Identifier of a payload (required: Keyhold keeps no ID Placeholder).
pub fn unique_identifier(payload: &Item) -> Result<&str, Failure> {
    text(payload, t::UNIQUE_IDENTIFIER)?.ok_or_else(|| {
        Failure::missing("Unique Identifier (Keyhold keeps no ID Placeholder between batch items)")
    })
}

/// A text item.
pub fn text_item(tag: Tag, v: &str) -> Item {
    Item::new(tag, Value::TextString(v.to_owned()))
}

/// An enumeration item.
pub fn enum_item(tag: Tag, v: u32) -> Item {
    Item::new(tag, Value::Enumeration(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(count: i32, items: usize) -> Item {
        let mut m = vec![Item::structure(
            t::REQUEST_HEADER,
            vec![
                Version::new(1, 2).item(),
                Item::new(t::BATCH_COUNT, Value::Integer(count)),
            ],
        )];
        for _ in 0..items {
            m.push(Item::structure(
                t::BATCH_ITEM,
                vec![enum_item(t::OPERATION, t::OP_QUERY)],
            ));
        }
        Item::structure(t::REQUEST_MESSAGE, m)
    }

    #[test]
    fn requests_read_and_batch_counts_checked() {
        let r = Request::of(&request(2, 2)).unwrap();
        assert_eq!((r.version, r.items.len()), (Version::new(1, 2), 2));
        assert_eq!(r.items[0].payload.tag, t::REQUEST_PAYLOAD);
        let (v, f) = Request::of(&request(3, 2)).unwrap_err();
        assert_eq!(
            (v, f.reason),
            (Some(Version::new(1, 2)), t::REASON_INVALID_MESSAGE)
        );
        assert!(Request::of(&request(0, 0)).is_err());
        assert!(Request::of(&Item::structure(t::RESPONSE_MESSAGE, vec![])).is_err());
    }

    #[test]
    fn versions_order_and_support() {
        assert!(Version::new(1, 4) > Version::new(1, 0));
        assert!(Version::new(2, 0) > Version::new(1, 4));
        assert!(Version::new(1, 2).supported());
        assert!(!Version::new(3, 0).supported());
    }
}
