//! TTLV, KMIP's binary encoding (KMIP 1.4 §9.1, 2.1 §9.1): each item is a 3-byte tag, a
//! 1-byte type, a 4-byte big-endian length, and the value padded with zeros to a multiple
//! of 8 bytes. A structure's value is its items, one after another.
//!
//! Decoding is strict and bounded: the length a type fixes (4 for Integer, Enumeration and
//! Interval; 8 for Long Integer, Boolean and Date-Time), Big Integers in whole 8-byte
//! words, padding of zeros, Text Strings in UTF-8, Booleans 0 or 1, a structure's items
//! filling it exactly; at most [`Limits::max_depth`] nested structures and
//! [`Limits::max_items`] items in a message. Anything else is an [`Error`], never a panic.
//! Byte strings may carry key material or plaintext: they are zeroized when dropped and
//! never printed.

use std::fmt;

use zeroize::Zeroizing;

/// Bounds on what one message may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Nesting of structures (the message itself is depth 1).
    pub max_depth: usize,
    /// Items in the whole message.
    pub max_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 16,
            max_items: 4096,
        }
    }
}

/// Why bytes are not a TTLV item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input ends inside an item.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A type byte TTLV does not define.
    #[error("unknown item type 0x{ty:02x} at byte {at}")]
    UnknownType {
        /// The type byte.
        ty: u8,
        /// Where.
        at: usize,
    },
    /// A length the type does not allow, or padding that is not zero.
    #[error("bad length or padding for item type 0x{ty:02x} at byte {at}")]
    BadLength {
        /// The type byte.
        ty: u8,
        /// Where.
        at: usize,
    },
    /// A value its type does not allow (invalid UTF-8, a Boolean other than 0 or 1).
    #[error("bad value for item type 0x{ty:02x} at byte {at}")]
    BadValue {
        /// The type byte.
        ty: u8,
        /// Where.
        at: usize,
    },
    /// Structures nested deeper than [`Limits::max_depth`].
    #[error("structures nested deeper than {0}")]
    TooDeep(usize),
    /// More items than [`Limits::max_items`].
    #[error("more than {0} items")]
    TooMany(usize),
    /// Bytes after the message.
    #[error("{0} bytes after the message")]
    Trailing(usize),
}

/// A tag (24 bits: `0x42xxxx` for KMIP's own, `0x54xxxx` for extensions).
pub type Tag = u32;

/// An item's value, by TTLV type.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// 0x01.
    Structure(Vec<Item>),
    /// 0x02.
    Integer(i32),
    /// 0x03.
    LongInteger(i64),
    /// 0x04: big-endian two's complement, a multiple of 8 bytes.
    BigInteger(Vec<u8>),
    /// 0x05.
    Enumeration(u32),
    /// 0x06.
    Boolean(bool),
    /// 0x07.
    TextString(String),
    /// 0x08: zeroized when dropped, never printed.
    ByteString(Zeroizing<Vec<u8>>),
    /// 0x09: seconds since the Unix epoch.
    DateTime(i64),
    /// 0x0A: seconds.
    Interval(u32),
    /// 0x0B (KMIP 2.0): microseconds since the Unix epoch.
    DateTimeExtended(i64),
}

impl Value {
    /// The TTLV type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Value::Structure(_) => 0x01,
            Value::Integer(_) => 0x02,
            Value::LongInteger(_) => 0x03,
            Value::BigInteger(_) => 0x04,
            Value::Enumeration(_) => 0x05,
            Value::Boolean(_) => 0x06,
            Value::TextString(_) => 0x07,
            Value::ByteString(_) => 0x08,
            Value::DateTime(_) => 0x09,
            Value::Interval(_) => 0x0A,
            Value::DateTimeExtended(_) => 0x0B,
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            Value::BigInteger(v) => write!(f, "BigInteger(<{} bytes>)", v.len()),
            Value::Enumeration(v) => write!(f, "Enumeration(0x{v:08x})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::TextString(v) => write!(f, "TextString({v:?})"),
            Value::ByteString(v) => write!(f, "ByteString(<{} bytes>)", v.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
            Value::DateTimeExtended(v) => write!(f, "DateTimeExtended({v})"),
        }
    }
}

/// One tagged item.
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    /// Its tag.
    pub tag: Tag,
    /// Its value.
    pub value: Value,
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:06x} {:?}", self.tag, self.value)
    }
}

impl Item {
    /// An item.
    pub fn new(tag: Tag, value: Value) -> Self {
        Self { tag, value }
    }

    /// A structure of `items`.
    pub fn structure(tag: Tag, items: Vec<Item>) -> Self {
        Self::new(tag, Value::Structure(items))
    }

    /// The items of a structure (none for any other type).
    pub fn children(&self) -> &[Item] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }

    /// The first child with `tag`.
    pub fn child(&self, tag: Tag) -> Option<&Item> {
        self.children().iter().find(|i| i.tag == tag)
    }

    /// Every child with `tag`.
    pub fn all(&self, tag: Tag) -> impl Iterator<Item = &Item> {
        self.children().iter().filter(move |i| i.tag == tag)
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        out.push(self.value.type_byte());
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        match &self.value {
            Value::Structure(items) => items.iter().for_each(|i| i.encode_into(out)),
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) | Value::DateTime(v) | Value::DateTimeExtended(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::BigInteger(v) => {
                // Sign-extended to whole 8-byte words.
                let fill = if v.first().is_some_and(|b| b & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                out.extend(std::iter::repeat_n(fill, (8 - v.len() % 8) % 8));
                out.extend_from_slice(v);
            }
            Value::TextString(v) => out.extend_from_slice(v.as_bytes()),
            Value::ByteString(v) => out.extend_from_slice(v),
        }
        let len = out.len() - start;
        // A message is bounded far below 4 GiB by the listener; saturate rather than wrap.
        let declared = u32::try_from(len).unwrap_or(u32::MAX);
        out[at..at + 4].copy_from_slice(&declared.to_be_bytes());
        out.extend(std::iter::repeat_n(0, (8 - len % 8) % 8));
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.encode_into(&mut out);
        out
    }

    /// Decodes exactly one item filling `bytes`.
    pub fn decode(bytes: &[u8], limits: Limits) -> Result<Item, Error> {
        let mut d = Decoder {
            bytes,
            limits,
            items: 0,
        };
        let (item, end) = d.item(0, 1)?;
        if end != bytes.len() {
            return Err(Error::Trailing(bytes.len() - end));
        }
        Ok(item)
    }
}

/// The length of the message that starts with `header` (its first 8 bytes): what a
/// reader must read after them.
pub fn message_length(header: &[u8; 8]) -> u32 {
    u32::from_be_bytes([header[4], header[5], header[6], header[7]])
}

struct Decoder<'a> {
    bytes: &'a [u8],
    limits: Limits,
    items: usize,
}

impl Decoder<'_> {
    /// The item at `at`, and where the next one starts.
    fn item(&mut self, at: usize, depth: usize) -> Result<(Item, usize), Error> {
        self.items += 1;
        if self.items > self.limits.max_items {
            return Err(Error::TooMany(self.limits.max_items));
        }
        let head = self
            .bytes
            .get(at..at + 8)
            .ok_or(Error::Truncated(self.bytes.len()))?;
        let tag = u32::from_be_bytes([0, head[0], head[1], head[2]]);
        let ty = head[3];
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let start = at + 8;
        let padded = len
            .checked_add((8 - len % 8) % 8)
            .ok_or(Error::BadLength { ty, at })?;
        let end = start
            .checked_add(padded)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(Error::Truncated(self.bytes.len()))?;
        let raw = &self.bytes[start..start + len];
        if self.bytes[start + len..end].iter().any(|b| *b != 0) {
            return Err(Error::BadLength { ty, at });
        }
        let fixed = |n: usize| -> Result<&[u8], Error> {
            if len == n {
                Ok(raw)
            } else {
                Err(Error::BadLength { ty, at })
            }
        };
        let bad = Error::BadValue { ty, at };
        let value = match ty {
            0x01 => {
                if depth >= self.limits.max_depth {
                    return Err(Error::TooDeep(self.limits.max_depth));
                }
                let mut items = Vec::new();
                let mut next = start;
                while next < start + len {
                    let (child, after) = self.item(next, depth + 1)?;
                    if after > start + len {
                        return Err(Error::BadLength { ty, at });
                    }
                    items.push(child);
                    next = after;
                }
                Value::Structure(items)
            }
            0x02 => Value::Integer(i32::from_be_bytes(arr4(fixed(4)?))),
            0x03 => Value::LongInteger(i64::from_be_bytes(arr8(fixed(8)?))),
            0x04 => {
                if len == 0 || len % 8 != 0 {
                    return Err(Error::BadLength { ty, at });
                }
                Value::BigInteger(raw.to_vec())
            }
            0x05 => Value::Enumeration(u32::from_be_bytes(arr4(fixed(4)?))),
            0x06 => match u64::from_be_bytes(arr8(fixed(8)?)) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                _ => return Err(bad),
            },
            0x07 => Value::TextString(String::from_utf8(raw.to_vec()).map_err(|_| bad)?),
            0x08 => Value::ByteString(Zeroizing::new(raw.to_vec())),
            0x09 => Value::DateTime(i64::from_be_bytes(arr8(fixed(8)?))),
            0x0A => Value::Interval(u32::from_be_bytes(arr4(fixed(4)?))),
            0x0B => Value::DateTimeExtended(i64::from_be_bytes(arr8(fixed(8)?))),
            _ => return Err(Error::UnknownType { ty, at }),
        };
        Ok((Item { tag, value }, end))
    }
}

fn arr4(b: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(b);
    a
}

fn arr8(b: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '|')
            .collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The examples of KMIP 1.4 §9.1.2 (the specification's own encodings).
    #[test]
    fn the_specifications_examples() {
        let cases = [
            (Item::new(0x420020, Value::Integer(8)), "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00"),
            (
                Item::new(0x420020, Value::LongInteger(123_456_789_000_000_000)),
                "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00",
            ),
            (
                Item::new(0x420020, Value::BigInteger(hex("0000000003FD35EB6BC2DF4618080000"))),
                "42 00 20 | 04 | 00 00 00 10 | 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00",
            ),
            (Item::new(0x420020, Value::Enumeration(255)), "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00"),
            (Item::new(0x420020, Value::Boolean(true)), "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01"),
            (
                Item::new(0x420020, Value::TextString("Hello World".into())),
                "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00",
            ),
            (
                Item::new(0x420020, Value::ByteString(Zeroizing::new(vec![1, 2, 3]))),
                "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00",
            ),
            (
                Item::new(0x420020, Value::DateTime(0x47DA_67F8)),
                "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8",
            ),
            (Item::new(0x420020, Value::Interval(864_000)), "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00"),
            (
                Item::structure(
                    0x420020,
                    vec![
                        Item::new(0x420004, Value::Enumeration(254)),
                        Item::new(0x420005, Value::Integer(255)),
                    ],
                ),
                "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | 42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
            ),
        ];
        for (item, bytes) in cases {
            let bytes = hex(bytes);
            assert_eq!(item.encode(), bytes, "{item:?}");
            assert_eq!(Item::decode(&bytes, Limits::default()).unwrap(), item);
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        let ok = hex("42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00");
        let l = Limits::default();
        for cut in 0..ok.len() {
            assert!(Item::decode(&ok[..cut], l).is_err(), "cut at {cut}");
        }
        let mut long = ok.clone();
        long[7] = 8; // an Integer of 8 bytes
        assert!(matches!(
            Item::decode(&long, l),
            Err(Error::BadLength { .. })
        ));
        let mut huge = ok.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Item::decode(&huge, l).is_err());
        let mut pad = ok.clone();
        pad[15] = 1;
        assert!(matches!(
            Item::decode(&pad, l),
            Err(Error::BadLength { .. })
        ));
        let mut ty = ok.clone();
        ty[3] = 0x0C;
        assert!(matches!(
            Item::decode(&ty, l),
            Err(Error::UnknownType { .. })
        ));
        let bad_bool = hex("42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 02");
        assert!(matches!(
            Item::decode(&bad_bool, l),
            Err(Error::BadValue { .. })
        ));
        let bad_utf8 = hex("42 00 20 | 07 | 00 00 00 01 | FF 00 00 00 00 00 00 00");
        assert!(matches!(
            Item::decode(&bad_utf8, l),
            Err(Error::BadValue { .. })
        ));
        let mut trailing = ok.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(matches!(
            Item::decode(&trailing, l),
            Err(Error::Trailing(8))
        ));
        // A structure whose child runs past it.
        let overrun = hex(
            "42 00 20 | 01 | 00 00 00 08 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00",
        );
        assert!(Item::decode(&overrun, l).is_err());
    }

    #[test]
    fn depth_and_count_are_bounded() {
        let mut item = Item::new(0x420001, Value::Integer(1));
        for _ in 0..40 {
            item = Item::structure(0x420001, vec![item]);
        }
        let bytes = item.encode();
        assert!(matches!(
            Item::decode(&bytes, Limits::default()),
            Err(Error::TooDeep(16))
        ));
        let many = Item::structure(0x420001, vec![Item::new(0x420002, Value::Integer(0)); 5000]);
        assert!(matches!(
            Item::decode(&many.encode(), Limits::default()),
            Err(Error::TooMany(4096))
        ));
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let tag = 0x420000u32..0x4200ffu32;
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::LongInteger),
            prop::collection::vec(any::<u8>(), 1..4).prop_map(|w| {
                // Whole words, as a decoder gives them back.
                let mut v = vec![0u8; 8 * w.len()];
                v.iter_mut()
                    .zip(w.iter().cycle())
                    .for_each(|(b, x)| *b = *x);
                Value::BigInteger(v)
            }),
            any::<u32>().prop_map(Value::Enumeration),
            any::<bool>().prop_map(Value::Boolean),
            ".{0,40}".prop_map(Value::TextString),
            prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| Value::ByteString(Zeroizing::new(b))),
            any::<i64>().prop_map(Value::DateTime),
            any::<u32>().prop_map(Value::Interval),
            any::<i64>().prop_map(Value::DateTimeExtended),
        ];
        let leaf_item = (tag.clone(), leaf).prop_map(|(t, v)| Item::new(t, v));
        leaf_item.prop_recursive(6, 64, 8, move |inner| {
            (tag.clone(), prop::collection::vec(inner, 0..8))
                .prop_map(|(t, v)| Item::structure(t, v))
        })
    }

    proptest! {
        /// Every item decodes to itself; every encoding is a multiple of 8 bytes.
        #[test]
        fn round_trip(item in arb_item()) {
            let bytes = item.encode();
            prop_assert_eq!(bytes.len() % 8, 0);
            prop_assert_eq!(Item::decode(&bytes, Limits::default()).unwrap(), item);
        }

        /// Arbitrary bytes decode or fail, never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Item::decode(&bytes, Limits::default());
        }
    }
}
