//! The English pages and their Japanese translations show the same commands.
//!
//! For each pair of pages (README.md and README.ja.md, docs/X.md and docs/ja/X.md), the
//! commands each page shows are extracted: every non-empty line of a ```sh, ```bash,
//! ```console or ```shell block (a leading `$ ` prompt stripped, comment-only lines
//! skipped, a trailing comment after two spaces cut), and every inline code span that
//! starts with `kmsctl `, `kms-server ` or `cargo `. Whitespace is compared collapsed, so
//! a page may wrap a span differently. A command one page shows and the other does not
//! fails the test, naming the page, the command and the other page. No server is needed.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

/// (English page, Japanese page), relative to the repository's root. Both must exist.
const PAIRS: &[(&str, &str)] = &[
    ("README.md", "README.ja.md"),
    ("docs/install.md", "docs/ja/install.md"),
    ("docs/operations.md", "docs/ja/operations.md"),
    ("docs/compliance.md", "docs/ja/compliance.md"),
];

/// Fenced blocks whose lines are commands.
const COMMAND_BLOCKS: &[&str] = &["sh", "bash", "console", "shell"];

/// Inline code spans that are commands.
const INLINE_COMMANDS: &[&str] = &["kmsctl ", "kms-server ", "cargo "];

/// Whitespace runs (line breaks included) collapsed to one space, ends trimmed.
fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An opening code fence: its character, its length and its info string.
fn fence_open(line: &str) -> Option<(u8, usize, &str)> {
    let t = line.trim_start().as_bytes();
    let ch = *t.first()?;
    if ch != b'`' && ch != b'~' {
        return None;
    }
    let len = t.iter().take_while(|&&c| c == ch).count();
    if len < 3 {
        return None;
    }
    let info = &line.trim_start()[len..];
    // A backtick fence's info string holds no backtick (CommonMark): that is inline code.
    if ch == b'`' && info.contains('`') {
        return None;
    }
    Some((ch, len, info.trim()))
}

/// Whether `line` closes a fence opened with `len` times `ch`.
fn fence_close(line: &str, ch: u8, len: usize) -> bool {
    let t = line.trim();
    t.len() >= len && t.bytes().all(|c| c == ch)
}

/// One line of a command block as the command it shows, if it shows one.
fn command_line(line: &str) -> Option<String> {
    let mut c = line.trim();
    if c == "$" {
        return None;
    }
    if let Some(rest) = c.strip_prefix("$ ") {
        c = rest.trim_start();
    }
    if c.is_empty() || c.starts_with('#') {
        return None;
    }
    if let Some(at) = c.find("  #") {
        c = &c[..at];
    }
    let c = collapse(c);
    (!c.is_empty()).then_some(c)
}

/// The inline code spans of one paragraph (CommonMark: a run of N backticks opens a span
/// that the next run of exactly N backticks closes; an unclosed run is literal text).
fn code_spans(paragraph: &str) -> Vec<&str> {
    let bytes = paragraph.as_bytes();
    let run = |at: usize| bytes[at..].iter().take_while(|&&c| c == b'`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let open = run(i);
        let start = i + open;
        let mut j = start;
        let mut end = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let n = run(j);
                if n == open {
                    end = Some(j);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        match end {
            Some(end) => {
                spans.push(&paragraph[start..end]);
                i = end + open;
            }
            None => i = start,
        }
    }
    spans
}

/// The commands a Markdown page shows, in the order it shows them.
fn commands(markdown: &str) -> Vec<String> {
    let mut found = Vec::new();
    // The text outside fenced blocks, a fenced block standing as a paragraph break.
    let mut prose: Vec<&str> = Vec::new();
    let mut fence: Option<(u8, usize, bool)> = None;
    for line in markdown.lines() {
        match fence {
            None => {
                if let Some((ch, len, info)) = fence_open(line) {
                    let lang = info.split_whitespace().next().unwrap_or("");
                    let shows_commands =
                        COMMAND_BLOCKS.iter().any(|l| l.eq_ignore_ascii_case(lang));
                    fence = Some((ch, len, shows_commands));
                    prose.push("");
                } else {
                    prose.push(line);
                }
            }
            Some((ch, len, shows_commands)) => {
                if fence_close(line, ch, len) {
                    fence = None;
                } else if shows_commands {
                    found.extend(command_line(line));
                }
                prose.push("");
            }
        }
    }
    for paragraph in prose.split(|l| l.trim().is_empty()) {
        let paragraph = paragraph.join("\n");
        for span in code_spans(&paragraph) {
            let span = collapse(span);
            if INLINE_COMMANDS.iter().any(|p| span.starts_with(p)) {
                found.push(span);
            }
        }
    }
    found
}

/// One line per command that `a` shows and `b` does not, naming both pages.
fn missing_from(a_name: &str, a: &str, b_name: &str, b: &str) -> Vec<String> {
    let in_b: BTreeSet<String> = commands(b).into_iter().collect();
    let mut seen = BTreeSet::new();
    commands(a)
        .into_iter()
        .filter(|c| !in_b.contains(c) && seen.insert(c.clone()))
        .map(|c| format!("{a_name} shows `{c}`, which {b_name} does not"))
        .collect()
}

/// Both directions of a pair.
fn differences(a_name: &str, a: &str, b_name: &str, b: &str) -> Vec<String> {
    let mut out = missing_from(a_name, a, b_name, b);
    out.extend(missing_from(b_name, b, a_name, a));
    out
}

#[test]
fn translations_show_the_same_commands() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut problems = Vec::new();
    let mut compared = 0;
    for &(en, ja) in PAIRS {
        let mut read = |name: &str, other: &str| match std::fs::read_to_string(root.join(name)) {
            Ok(text) => Some(text),
            Err(e) => {
                problems.push(format!(
                    "{name} cannot be read ({e}): it is paired with {other}, and both must exist"
                ));
                None
            }
        };
        let en_text = read(en, ja);
        let ja_text = read(ja, en);
        let (Some(en_text), Some(ja_text)) = (en_text, ja_text) else {
            continue;
        };
        compared += commands(&en_text).len();
        problems.extend(differences(en, &en_text, ja, &ja_text));
    }
    // The README's set-up commands are always there: an extractor that finds nothing
    // would pass vacuously.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        commands(&readme).contains(&"cargo test --workspace --locked".to_owned()),
        "the extractor no longer finds README.md's set-up commands"
    );
    assert!(
        problems.is_empty(),
        "the English pages and their Japanese translations must show the same commands \
         ({compared} compared):\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_command_missing_from_the_translation_is_reported() {
    let en = "# Install\n\n```sh\nsudo systemctl enable --now keyhold\nkmsctl sys unseal\n```\n\
              Then check it with `kmsctl sys status`.\n";
    let ja = "# インストール\n\n```sh\nsudo systemctl enable --now keyhold\n```\n\
              `kmsctl sys status` で確認します。\n";
    assert_eq!(
        differences("en.md", en, "ja.md", ja),
        vec!["en.md shows `kmsctl sys unseal`, which ja.md does not".to_owned()]
    );
    // And the other way round: a command only the translation shows.
    let ja_extra = format!("{ja}\n`cargo test --workspace --locked`\n");
    let en_full = en.replace("kmsctl sys unseal\n", "");
    assert_eq!(
        differences("en.md", &en_full, "ja.md", &ja_extra),
        vec!["ja.md shows `cargo test --workspace --locked`, which en.md does not".to_owned()]
    );
    // The same commands: nothing to report.
    assert!(differences("en.md", en, "en-copy.md", en).is_empty());
}

#[test]
fn what_counts_as_a_command() {
    let page = "\
Prose with `kms-server check-config --config
/etc/keyhold/kms-server.toml` wrapped, `kmsctl` alone, `kms-server/src/main.rs` and
`curl -s http://x` (none of these three are commands).

```console
$ kmsctl sys status
```

  ```bash
  # a comment line
  curl -s http://127.0.0.1:9443/readyz    # 503 until unsealed

  export A=1 \\
         B=2
  ```

```toml
cargo = \"not a command: a TOML block\"
```

``cargo `odd` span``

````sh
```
cargo build
````
";
    assert_eq!(
        commands(page),
        vec![
            "kmsctl sys status",
            "curl -s http://127.0.0.1:9443/readyz",
            "export A=1 \\",
            "B=2",
            "```",
            "cargo build",
            "kms-server check-config --config /etc/keyhold/kms-server.toml",
            "cargo `odd` span",
        ]
    );
}
