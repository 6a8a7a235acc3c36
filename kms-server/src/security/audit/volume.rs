//! What one caller can make the audit trail hold: bounded records, and refusals of
//! unauthenticated requests past a rate counted into summaries.
//!
//! - **Bounded records** ([`bound`]): every text field of a draft is cut to a fixed
//!   length and a record carries at most [`MAX_ATTRIBUTES`] attributes. Adapters copy
//!   what a caller claims (XKS `requestMetadata`, up to the 32 KiB of a body) into the
//!   record; cut, a record stays under a few KiB whatever was sent.
//! - **Summaries of unauthenticated refusals** ([`Refusals`]): a request refused before
//!   any identity was established (no identity, a 4xx answer: a bad signature, a bad
//!   token, an unknown path) can be sent by anyone who reaches a listener. The first
//!   [`RECORDED_PER_INTERVAL`] of each [`INTERVAL`] get their own record; the others are
//!   counted and one summary record ([`SUMMARY_OPERATION`]) closes the interval with their
//!   number, their statuses and operations. Every refusal is thus accounted for in the
//!   chain, and a flood costs the disk one record per interval. The counted refusals are
//!   answered without waiting for the disk (their answers carry nothing), so a crash
//!   before the interval closes loses their count, never a key use.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::AuditDraft;

/// Longest text field kept (characters); the rest is cut and the cut said.
pub const MAX_FIELD: usize = 256;
/// Most attributes one record keeps.
pub const MAX_ATTRIBUTES: usize = 32;
/// Unauthenticated refusals recorded one by one per interval.
pub const RECORDED_PER_INTERVAL: u32 = 100;
/// The interval over which further refusals are counted.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// The operation of a summary record.
pub const SUMMARY_OPERATION: &str = "summary: unauthenticated refusals";
/// Distinct operations named in a summary; the others are counted as `other`.
const SUMMARY_OPERATIONS: usize = 8;

fn cut(text: &mut String, max: usize) {
    // At most `max` bytes is at most `max` characters: the common case costs a comparison.
    if text.len() <= max {
        return;
    }
    if let Some((at, _)) = text.char_indices().nth(max) {
        let dropped = text.len() - at;
        text.truncate(at);
        text.push_str(&format!("…[{dropped} more bytes]"));
    }
}

/// Cuts `d`'s text fields to [`MAX_FIELD`] characters (identities to four times that)
/// and its attributes to [`MAX_ATTRIBUTES`] (an `attributes_dropped` count says how many
/// went).
pub fn bound(d: &mut AuditDraft) {
    cut(&mut d.operation, MAX_FIELD);
    cut(&mut d.outcome, MAX_FIELD);
    for f in [&mut d.identity, &mut d.tenant, &mut d.key] {
        if let Some(t) = f.as_mut() {
            cut(t, 4 * MAX_FIELD);
        }
    }
    let Some(attrs) = d.attributes.as_mut() else {
        return;
    };
    if attrs.len() > MAX_ATTRIBUTES {
        let dropped = attrs.len() - (MAX_ATTRIBUTES - 1);
        let keep: Vec<String> = attrs.keys().take(MAX_ATTRIBUTES - 1).cloned().collect();
        attrs.retain(|k, _| keep.contains(k));
        attrs.insert("attributes_dropped".into(), dropped.to_string());
    }
    let long_keys: Vec<String> = attrs
        .keys()
        .filter(|k| k.len() > MAX_FIELD / 4 && k.chars().count() > MAX_FIELD / 4)
        .cloned()
        .collect();
    for k in long_keys {
        if let Some(v) = attrs.remove(&k) {
            let mut short = k;
            cut(&mut short, MAX_FIELD / 4);
            attrs.insert(short, v);
        }
    }
    for v in attrs.values_mut() {
        cut(v, MAX_FIELD);
    }
}

/// Whether `d` records a request refused before any identity was established.
pub fn is_unauthenticated_refusal(d: &AuditDraft) -> bool {
    d.identity.is_none() && (400..500).contains(&d.status)
}

/// The unauthenticated refusals of the current interval.
pub struct Refusals {
    started: Instant,
    recorded: u32,
    counted: u64,
    statuses: BTreeMap<u16, u64>,
    operations: BTreeMap<String, u64>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            recorded: 0,
            counted: 0,
            statuses: BTreeMap::new(),
            operations: BTreeMap::new(),
        }
    }
}

impl Refusals {
    /// Whether `d` gets its own record; if not, it is counted.
    pub fn record(&mut self, d: &AuditDraft) -> bool {
        if !is_unauthenticated_refusal(d) {
            return true;
        }
        if self.recorded < RECORDED_PER_INTERVAL {
            self.recorded += 1;
            return true;
        }
        self.counted += 1;
        *self.statuses.entry(d.status).or_default() += 1;
        let op = if self.operations.len() < SUMMARY_OPERATIONS
            || self.operations.contains_key(&d.operation)
        {
            d.operation.clone()
        } else {
            "other".to_owned()
        };
        *self.operations.entry(op).or_default() += 1;
        false
    }

    /// When the interval is over: its summary record, if anything was counted, and a
    /// fresh interval.
    pub fn close_if_due(&mut self) -> Option<AuditDraft> {
        if self.started.elapsed() < INTERVAL {
            return None;
        }
        let done = std::mem::take(self);
        (done.counted > 0).then(|| done.summary())
    }

    /// The summary of what was counted so far (the server stopping), if anything.
    pub fn close_now(&mut self) -> Option<AuditDraft> {
        let done = std::mem::take(self);
        (done.counted > 0).then(|| done.summary())
    }

    fn summary(self) -> AuditDraft {
        let join = |m: BTreeMap<String, u64>| {
            m.into_iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut attributes = BTreeMap::new();
        attributes.insert("count".to_owned(), self.counted.to_string());
        attributes.insert("recorded_one_by_one".to_owned(), self.recorded.to_string());
        attributes.insert(
            "interval_ms".to_owned(),
            self.started.elapsed().as_millis().to_string(),
        );
        attributes.insert(
            "statuses".to_owned(),
            join(
                self.statuses
                    .into_iter()
                    .map(|(s, n)| (s.to_string(), n))
                    .collect(),
            ),
        );
        attributes.insert("operations".to_owned(), join(self.operations));
        AuditDraft {
            operation: SUMMARY_OPERATION.to_owned(),
            outcome: "counted".to_owned(),
            attributes: Some(attributes),
            ..AuditDraft::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_and_many_attributes_are_cut() {
        let mut d = AuditDraft {
            operation: "x".repeat(10_000),
            identity: Some("é".repeat(5_000)),
            attributes: Some(
                (0..100)
                    .map(|i| (format!("k{i:03}{}", "y".repeat(i * 10)), "v".repeat(40_000)))
                    .collect(),
            ),
            ..AuditDraft::default()
        };
        bound(&mut d);
        assert!(d.operation.len() < MAX_FIELD + 32, "{}", d.operation.len());
        assert!(
            d.operation.ends_with("…[9744 more bytes]"),
            "{}",
            &d.operation[240..]
        );
        assert!(d.identity.as_ref().unwrap().chars().count() < 4 * MAX_FIELD + 32);
        let attrs = d.attributes.unwrap();
        assert_eq!(attrs.len(), MAX_ATTRIBUTES);
        assert_eq!(attrs["attributes_dropped"], "69");
        let bytes: usize = attrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes < MAX_ATTRIBUTES * 2 * (MAX_FIELD + 32), "{bytes}");
    }

    #[test]
    fn refusals_past_the_rate_are_counted_and_summarized() {
        let mut r = Refusals::default();
        let refusal = |op: &str| AuditDraft {
            operation: op.into(),
            status: 401,
            ..AuditDraft::default()
        };
        let served = AuditDraft {
            identity: Some("a".into()),
            status: 200,
            ..AuditDraft::default()
        };
        let mut own = 0;
        for i in 0..1000 {
            own += u32::from(r.record(&refusal(&format!("op{}", i % 20))));
            assert!(r.record(&served), "a served request always gets its record");
        }
        assert_eq!(own, RECORDED_PER_INTERVAL);
        assert!(r.close_if_due().is_none(), "not before the interval ends");
        r.started = r.started.checked_sub(INTERVAL).unwrap();
        let s = r.close_if_due().unwrap();
        let a = s.attributes.unwrap();
        assert_eq!(a["count"], "900");
        assert_eq!(a["statuses"], "401: 900");
        assert!(a["operations"].contains("other: "), "{}", a["operations"]);
        assert!(r.close_if_due().is_none(), "a fresh interval");
        assert!(
            r.record(&refusal("op")),
            "recorded again in the new interval"
        );
    }
}
