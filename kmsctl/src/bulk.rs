//! `kmsctl rewrap --in FILE`: bulk rewrap of a provider's stored wrapped DEKs. Reads JSON
//! lines `{"wrapped": "<base64>", "context": {...}, ...}`, sends them in `POST /v1/batch`
//! requests of `rewrap` items (each item keeps its own context), and writes one JSON line
//! per input line, in order: the input's other fields (an `id`, say) unchanged, `wrapped`
//! replaced by the new wrapped DEK, plus `key` and `version`, and without any `error`; or,
//! for an item that failed, the input unchanged plus `error`. So a run's output can be fed
//! back in once the failures are dealt with: a line that rewraps then loses the earlier
//! run's `error`. The output file appears only when complete.

use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kms_client::api::{BatchItem, BatchResult, Context, WrappedKey};
use kms_client::Client;
use serde_json::{Map, Value};

use crate::files::{open_input, progress_over, Staged};

/// Input files at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN: u64 = 64 << 10;

fn parse_line(n: usize, line: &str) -> anyhow::Result<(Map<String, Value>, BatchItem)> {
    let obj: Map<String, Value> =
        serde_json::from_str(line).with_context(|| format!("line {n}: not a JSON object"))?;
    let wrapped = obj
        .get("wrapped")
        .and_then(Value::as_str)
        .with_context(|| format!("line {n}: no \"wrapped\" string"))?;
    let wrapped = B64
        .decode(wrapped)
        .with_context(|| format!("line {n}: \"wrapped\" is not standard base64"))?;
    let context: Context = match obj.get("context") {
        None | Some(Value::Null) => Context::new(),
        Some(v) => serde_json::from_value(v.clone())
            .with_context(|| format!("line {n}: \"context\" is not a string-to-string map"))?,
    };
    Ok((
        obj,
        BatchItem::Rewrap {
            wrapped: WrappedKey::from(wrapped),
            context,
        },
    ))
}

fn result_line(mut obj: Map<String, Value>, result: BatchResult) -> (Value, bool) {
    match result {
        BatchResult::Rewrap(w) => {
            // Left by an earlier run over this line; it no longer holds.
            obj.remove("error");
            obj.insert(
                "wrapped".into(),
                Value::String(B64.encode(w.wrapped.as_bytes())),
            );
            obj.insert("key".into(), Value::String(w.key));
            obj.insert("version".into(), Value::from(w.version));
            (Value::Object(obj), true)
        }
        BatchResult::Error(e) => {
            obj.insert(
                "error".into(),
                serde_json::to_value(&e).unwrap_or(Value::Null),
            );
            (Value::Object(obj), false)
        }
        _ => {
            obj.insert(
                "error".into(),
                serde_json::json!({"code": "InvalidResponse", "message": "the server answered another operation"}),
            );
            (Value::Object(obj), false)
        }
    }
}

/// Rewraps every line of `input` into `output` (stdout when `None`), `batch` items per
/// request. Fails (after writing the output) when any item failed.
pub(crate) async fn rewrap_file(
    client: &Client,
    input: Option<&Path>,
    output: Option<&Path>,
    batch: usize,
) -> anyhow::Result<()> {
    if !(1..=1000).contains(&batch) {
        bail!("--batch-size must be 1 to 1000");
    }
    let (reader, len) = open_input(input)?;
    let pb = progress_over(len, PROGRESS_MIN);
    let mut lines = BufReader::new(pb.wrap_read(reader)).lines();
    let mut staged = match output {
        Some(p) => Some(Staged::create(p)?),
        None => None,
    };
    let mut stdout = io::stdout().lock();
    let (mut total, mut failed, mut n) = (0usize, 0usize, 0usize);
    loop {
        let mut objs = Vec::with_capacity(batch);
        let mut items = Vec::with_capacity(batch);
        for line in lines.by_ref() {
            n += 1;
            let line = line.with_context(|| format!("reading line {n}"))?;
            if line.trim().is_empty() {
                continue;
            }
            let (obj, item) = parse_line(n, &line)?;
            objs.push(obj);
            items.push(item);
            if items.len() == batch {
                break;
            }
        }
        if items.is_empty() {
            break;
        }
        let count = items.len();
        let results = client
            .batch(items)
            .await
            .with_context(|| format!("rewrapping items {} to {}", total + 1, total + count))?;
        if results.len() != count {
            bail!(
                "the server answered {} results for {count} items",
                results.len()
            );
        }
        for (obj, result) in objs.into_iter().zip(results) {
            let (line, ok) = result_line(obj, result);
            failed += usize::from(!ok);
            let w: &mut dyn Write = match staged.as_mut() {
                Some(s) => s.writer(),
                None => &mut stdout,
            };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        total += count;
    }
    match staged {
        Some(s) => s.commit()?,
        None => stdout.flush()?,
    }
    pb.finish_and_clear();
    if failed > 0 {
        bail!("{failed} of {total} items failed: their lines carry an \"error\" field");
    }
    eprintln!("rewrapped {total} wrapped DEKs");
    Ok(())
}
