//! The crate's layers, as ARCHITECTURE.md's module table gives them, and the imports
//! between them (issue 23).
//!
//! - Each layer is a folder of `src/`; every module of a layer folder is in the table under
//!   that layer, and every module of the table is in its folder.
//! - No file imports from a higher layer: a `crate::LAYER` path (in `use` or in code;
//!   `kms_server::LAYER` in `main.rs`, which is in `tools`) outside comments and
//!   `#[cfg(test)]` items names the file's own layer or a lower one. Imports go one way, so
//!   no cycle can form between layers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ARCHITECTURE: &str = "../ARCHITECTURE.md";

/// The layers, lowest first, and the modules of each, from ARCHITECTURE.md: the line
/// "Layers, lowest first: a, b, ..." and the rows `| layer | module | concept |` of the
/// module table. A layer is a folder of `src/`; a module is a file or folder in it
/// (`main`, the binary's root, is `src/main.rs`).
fn layers() -> (Vec<String>, BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(ARCHITECTURE).expect("ARCHITECTURE.md");
    let order: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("Layers, lowest first: "))
        .expect("ARCHITECTURE.md names its layers: \"Layers, lowest first: ...\"")
        .trim_end_matches('.')
        .split(',')
        .map(|s| s.trim().trim_matches('`').to_owned())
        .collect();
    let mut of = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", layer, modules, concept, ""]
        if cells.len() < 4 {
            continue;
        }
        let Some(layer) = order.iter().position(|l| l == cells[1]) else {
            continue;
        };
        // Code spans naming modules (`xks/` for a folder); others (`format.md`) are not.
        for module in cells[2].split('`').skip(1).step_by(2) {
            let name = module.trim_end_matches('/').to_owned();
            if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                continue;
            }
            let path = if name == "main" {
                name
            } else {
                format!("{}/{name}", order[layer])
            };
            if let Some(prev) = of.insert(path.clone(), layer) {
                assert_eq!(prev, layer, "`{path}` is in two layers of ARCHITECTURE.md");
            }
        }
    }
    (order, of)
}

/// The module a file of `src/` belongs to, as `layer/module` (`api/crypto.rs` →
/// `api/crypto`, `adapters/xks/sigv4.rs` → `adapters/xks`), `main`, or `None` for a
/// layer's own `mod.rs` and `lib.rs`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [root] if root == "main.rs" => Some("main".into()),
        [_] => None,
        [_, file] if file == "mod.rs" => None,
        [layer, module, ..] => Some(format!(
            "{layer}/{}",
            module.strip_suffix(".rs").unwrap_or(module)
        )),
        [] => None,
    }
}

/// The layer a file of `src/` is in: its folder (`main.rs` is in `tools`).
fn layer_of_file(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_string_lossy().into_owned();
    match parts.next() {
        Some(_) => Some(first),
        None if first == "main.rs" => Some("tools".into()),
        None => None,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without `//` comments (doc comments name paths of every layer) and without the
/// items under `#[cfg(test)]` (tests may reach anywhere).
fn code_only(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    strip_tests(code)
}

/// `code` without the items under `#[cfg(test)]`.
fn strip_tests(mut code: String) -> String {
    const TEST: &str = "#[cfg(test)]";
    while let Some(at) = code.find(TEST) {
        let rest = &code[at + TEST.len()..];
        let (brace, semi) = (rest.find('{'), rest.find(';'));
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => at + TEST.len() + s + 1,
            (None, Some(s)) => at + TEST.len() + s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = code.len();
                for (i, c) in rest[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = at + TEST.len() + b + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => code.len(),
        };
        code.replace_range(at..end, "");
    }
    code
}

fn ident_at(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    let id = &s[..end];
    (!id.is_empty() && id.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')).then_some(id)
}

/// The top-level modules `code` names through `prefix` (`crate::`): `crate::a::b`,
/// `crate::a`, and each tree of `use crate::{a, b::{c}, d::e}`.
fn named_modules(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        let rest = &code[at + prefix.len()..];
        if let Some(tree) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (1usize, 0usize);
            for (i, c) in tree.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        if let Some(id) = ident_at(tree[start..i].trim_start()) {
                            names.insert(id.to_owned());
                        }
                        start = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
        } else if let Some(id) = ident_at(rest) {
            names.insert(id.to_owned());
        }
    }
    names
}

#[test]
fn every_module_is_in_a_layer_and_imports_go_down_only() {
    let (order, module_layer) = layers();
    let src = Path::new("src");
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules = BTreeSet::new();
    let mut misplaced = Vec::new();
    let mut upward = Vec::new();
    for file in &files {
        if let Some(module) = module_of(src, file) {
            modules.insert(module);
        }
        let Some(layer) = layer_of_file(src, file) else {
            continue;
        };
        let Some(mine) = order.iter().position(|l| *l == layer) else {
            misplaced.push(file.display().to_string());
            continue;
        };
        let code = code_only(&std::fs::read_to_string(file).expect("readable"));
        let mut named = named_modules(&code, "crate::");
        if file.ends_with("main.rs") {
            named.extend(named_modules(&code, "kms_server::"));
        }
        for other in named {
            match order.iter().position(|l| *l == other) {
                Some(theirs) if theirs > mine => upward.push(format!(
                    "{} ({}) imports `{other}`",
                    file.display(),
                    order[mine],
                )),
                Some(_) => {}
                None if ["Settings", "Error", "run", "Listeners"].contains(&other.as_str()) => {}
                None => misplaced.push(format!(
                    "{} names `crate::{other}`, not a layer",
                    file.display()
                )),
            }
        }
    }
    let listed: BTreeSet<String> = module_layer.keys().cloned().collect();
    let unlisted: Vec<_> = modules.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&modules).collect();
    assert!(
        unlisted.is_empty() && gone.is_empty(),
        "ARCHITECTURE.md's module table and src/ disagree: not in the table {unlisted:?}, not in src/ {gone:?}"
    );
    assert!(misplaced.is_empty(), "outside the layers: {misplaced:?}");
    assert!(
        upward.is_empty(),
        "imports against the layers (lowest first: {}):\n{}",
        order.join(", "),
        upward.join("\n")
    );
}

#[test]
fn the_scanner_sees_paths_and_trees_and_skips_comments_and_tests() {
    let code = code_only(
        "use crate::a::X;\nuse crate::{b, c::{D, e}, f::g};\n// crate::hidden\nfn x() { crate::h::y(); }\n#[cfg(test)]\nmod tests { use crate::t; }\n#[cfg(test)]\nuse crate::u;\n",
    );
    let names = named_modules(&code, "crate::");
    let want: BTreeSet<String> = ["a", "b", "c", "f", "h"].map(String::from).into();
    assert_eq!(names, want);
}

/// ARCHITECTURE.md names every subcommand of the binary.
#[test]
fn architecture_names_every_subcommand() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kms-server"))
        .arg("--help")
        .output()
        .expect("kms-server --help runs");
    let help = String::from_utf8_lossy(&out.stdout);
    let text = std::fs::read_to_string(ARCHITECTURE).expect("ARCHITECTURE.md");
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 9, "{help}");
    let missing: Vec<_> = commands
        .iter()
        .filter(|c| !text.contains(&format!("`{c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name {missing:?}"
    );
}

/// `text` without the items under `#[cfg(test)]`, comments kept.
fn without_tests(text: &str) -> String {
    strip_tests(text.to_owned())
}

/// The functions of `code` (comments and tests removed) longer than `max` lines, as
/// `(name, lines)`: from the line of `fn` to the line of its closing brace.
fn long_functions(code: &str, max: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(at) = line.find("fn ") else { continue };
        let before = line[..at].trim();
        let is_item = before.is_empty()
            || before.split_whitespace().all(|w| {
                [
                    "pub",
                    "pub(crate)",
                    "pub(super)",
                    "async",
                    "const",
                    "unsafe",
                    "extern",
                ]
                .contains(&w)
            });
        if !is_item {
            continue;
        }
        let Some(name) = ident_at(&line[at + 3..]) else {
            continue;
        };
        // The body: from the first `{` at depth 0 after the signature to its match.
        let (mut depth, mut opened, mut end) = (0i64, false, None);
        'scan: for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    ';' if !opened && depth == 0 => break 'scan,
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth -= 1;
                        if opened && depth == 0 {
                            end = Some(j);
                            break 'scan;
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(end) = end {
            let len = end - i + 1;
            if len > max {
                found.push((name.to_owned(), len));
            }
        }
    }
    found
}

/// Issue 23, must-show 2: no non-test file over ~800 lines, no non-test function over ~120.
#[test]
fn no_file_over_800_lines_and_no_function_over_120() {
    let src = Path::new("src");
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut over = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        let code = without_tests(&text);
        let n = code.lines().count();
        if n > 800 {
            over.push(format!("{}: {n} lines", file.display()));
        }
        for (name, len) in long_functions(&code_only(&text), 120) {
            over.push(format!("{}: fn {name} is {len} lines", file.display()));
        }
    }
    assert!(over.is_empty(), "too long:\n{}", over.join("\n"));
}

#[test]
fn the_length_scanner_measures_bodies_not_signatures() {
    let body = "x();\n".repeat(5);
    let code = format!(
        "pub fn long(\n    a: u8,\n) -> u8 {{\n{body}}}\nfn decl();\nfn short() {{ x() }}\n"
    );
    assert_eq!(long_functions(&code, 3), vec![("long".to_owned(), 9)]);
    assert!(long_functions(&code, 9).is_empty());
    let with_tests = "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() {}\n}\nfn c() {}\n";
    assert_eq!(without_tests(with_tests).lines().count(), 3);
}

/// Issue 23: one request-completion path. Outside the audit module itself, only
/// `api/completion.rs` builds a request's audit record and records its metrics; the app's
/// background sweeps (`SYSTEM ...` records) are the one other writer, and they are not
/// requests.
#[test]
fn requests_are_audited_and_measured_in_one_place() {
    let src = Path::new("src");
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut elsewhere = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(src).expect("under src");
        let rel = rel.to_string_lossy();
        let code = code_only(&std::fs::read_to_string(file).expect("readable"));
        let builds_record = code.contains("AuditDraft {");
        let measures = code.contains(".observe(");
        let allowed_record = rel == "api/completion.rs"
            || rel.starts_with("security/audit/")
            || rel == "app/tasks.rs";
        let allowed_metrics = rel == "api/completion.rs" || rel == "base/metrics.rs";
        if builds_record && !allowed_record {
            elsewhere.push(format!("{rel} builds an audit record"));
        }
        if measures && !allowed_metrics {
            elsewhere.push(format!("{rel} records request metrics"));
        }
    }
    assert!(
        elsewhere.is_empty(),
        "requests finish through api::completion only:\n{}",
        elsewhere.join("\n")
    );
}
