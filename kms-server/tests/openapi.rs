//! The OpenAPI document and the router list the same routes and methods.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;

/// (method, path) pairs documented in openapi.yaml.
fn documented() -> BTreeSet<(String, String)> {
    let text = include_str!("../openapi.yaml");
    let mut out = BTreeSet::new();
    let mut path = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if !line.starts_with("  ") {
            path = None;
        } else if let (Some(p), Some(m)) = (&path, line.strip_prefix("    ")) {
            for method in ["get:", "post:", "put:", "delete:"] {
                if m == method {
                    out.insert((method.trim_end_matches(':').to_owned(), p.clone()));
                }
            }
        }
    }
    out
}

/// (method, path) pairs the router registers (read from the router's source; a
/// `.route(...)` call may span lines, as rustfmt writes long ones).
fn routed() -> BTreeSet<(String, String)> {
    let text = include_str!("../src/api/mod.rs");
    let mut out = BTreeSet::new();
    for call in text.split(".route(").skip(1) {
        let Some(rest) = call.trim_start().strip_prefix('"') else {
            continue;
        };
        let (path, handlers) = rest.split_once('"').unwrap();
        // The handlers end at the call's closing parenthesis, before the next method.
        let handlers = handlers.split("\n        .").next().unwrap();
        for method in ["get", "post", "put", "delete"] {
            if handlers.contains(&format!("{method}(")) {
                out.insert((method.to_owned(), path.to_owned()));
            }
        }
    }
    out
}

#[test]
fn openapi_matches_router() {
    let doc = documented();
    let routes = routed();
    assert!(
        routes.len() >= 13,
        "router parse found too little: {routes:?}"
    );
    assert_eq!(doc, routes, "openapi.yaml and routes/mod.rs disagree");
}
