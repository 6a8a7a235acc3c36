//! A scripted campaign of malformed requests over real mTLS (issue 7): for every route
//! that reads input, mutations of a valid request — truncated and corrupted JSON, wrong
//! types, unknown fields, huge fields, deep nesting, bad base64, invalid UTF-8, bad key
//! names in the path, query abuse, header abuse (content types, huge and many headers),
//! wrong methods. Every answer must be a 4xx with the JSON error body; afterwards the
//! server still serves and no key changed. Deterministic (seeded), so a failure replays.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyhold_tests::TestServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::{create_key, get, post};

/// Requests in the campaign must be at least this many (the issue asks for 1 000).
const MIN_REQUESTS: usize = 1000;

#[derive(Clone)]
struct Case {
    method: reqwest::Method,
    path: String,
    who: &'static str,
    body: Vec<u8>,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
    what: String,
}

fn case(
    method: &reqwest::Method,
    path: &str,
    who: &'static str,
    body: Vec<u8>,
    what: String,
) -> Case {
    Case {
        method: method.clone(),
        path: path.into(),
        who,
        body,
        content_type: Some("application/json".into()),
        headers: Vec::new(),
        what,
    }
}

/// Values of every JSON type but `like`'s.
fn other_types(like: &Value) -> Vec<Value> {
    let all = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1.5e308),
        json!("s"),
        json!([1, "a"]),
        json!({"x": 1}),
    ];
    let kind = |v: &Value| match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    };
    all.into_iter().filter(|v| kind(v) != kind(like)).collect()
}

/// Every object path (list of keys) to a leaf or container in `v`, below the root.
fn paths(v: &Value, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let mut p = prefix.clone();
            p.push(k.clone());
            out.push(p.clone());
            paths(child, p, out);
        }
    }
}

fn set_at(v: &mut Value, path: &[String], new: Value) {
    let mut cur = v;
    for k in &path[..path.len() - 1] {
        cur = cur.get_mut(k).unwrap();
    }
    cur[path.last().unwrap().as_str()] = new;
}

fn get_at<'a>(v: &'a Value, path: &[String]) -> &'a Value {
    path.iter().fold(v, |c, k| &c[k.as_str()])
}

/// Mutations of one valid JSON request, each of which must be refused.
fn mutations(
    rng: &mut StdRng,
    method: &reqwest::Method,
    path: &str,
    who: &'static str,
    valid: &Value,
    b64_fields: &[&str],
) -> Vec<Case> {
    let text = serde_json::to_vec(valid).unwrap();
    let mut out = Vec::new();
    let mut add = |body: Vec<u8>, what: String| out.push(case(method, path, who, body, what));
    // Truncations (never the whole text).
    for _ in 0..20 {
        let at = rng.gen_range(0..text.len());
        add(text[..at].to_vec(), format!("truncated at {at}"));
    }
    // A structural character replaced by junk.
    // (Outside strings only: a ':' inside "spiffe://..." is data, and changing it can
    // leave a valid request.)
    let mut structural = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for (i, b) in text.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    structural.push(i);
                }
                _ => {}
            }
        } else if *b == b'"' {
            in_string = true;
            structural.push(i);
        } else if b"{}[]:,".contains(b) {
            structural.push(i);
        }
    }
    for _ in 0..20 {
        let at = structural[rng.gen_range(0..structural.len())];
        let mut t = text.clone();
        t[at] = *[b'#', b'\\', b'\x00', b'\x7f', b'\xff', b'{', b'[']
            .get(rng.gen_range(0..7))
            .unwrap();
        if t[at] == text[at] {
            t[at] = b'#';
        }
        add(t, format!("byte {at} corrupted"));
    }
    // Not JSON at all, and JSON of the wrong shape.
    for junk in [
        &b""[..],
        b"null",
        b"[]",
        b"\"x\"",
        b"42",
        b"{",
        b"}{",
        b"\xef\xbb\xbf{}",
        b"{\"a\":1,\"a\":2}",
    ] {
        add(
            junk.to_vec(),
            format!("body {:?}", String::from_utf8_lossy(junk)),
        );
    }
    let mut field_paths = Vec::new();
    paths(valid, Vec::new(), &mut field_paths);
    for p in &field_paths {
        let current = get_at(valid, p).clone();
        // Wrong types.
        for wrong in other_types(&current) {
            // null is a valid "absent" for optional fields.
            if wrong.is_null() {
                continue;
            }
            let mut v = valid.clone();
            set_at(&mut v, p, wrong.clone());
            add(
                serde_json::to_vec(&v).unwrap(),
                format!("{} = {wrong}", p.join(".")),
            );
        }
        // Huge strings and deep nesting in every field.
        let mut v = valid.clone();
        set_at(&mut v, p, Value::String("A".repeat(300_000)));
        add(
            serde_json::to_vec(&v).unwrap(),
            format!("{} = 300 kB string", p.join(".")),
        );
        let mut v = valid.clone();
        set_at(&mut v, p, json!("__NEST__"));
        let deep = serde_json::to_string(&v).unwrap().replace(
            "\"__NEST__\"",
            &format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
        );
        add(
            deep.into_bytes(),
            format!("{} = 5000-deep array", p.join(".")),
        );
        // Invalid UTF-8 inside a string.
        if current.is_string() {
            let mut v = valid.clone();
            set_at(&mut v, p, json!("__UTF8__"));
            let t = serde_json::to_vec(&v).unwrap();
            let s = String::from_utf8_lossy(&t).replace("__UTF8__", "\u{1}");
            let mut bytes = s.into_bytes();
            let i = bytes.iter().position(|b| *b == 1).unwrap();
            bytes.splice(i..i + 1, [0xff, 0xfe, 0xc3]);
            add(bytes, format!("{} = invalid UTF-8", p.join(".")));
        }
    }
    // Unknown fields, at the top and inside objects.
    let mut v = valid.clone();
    v["zzz_unknown"] = json!(1);
    add(
        serde_json::to_vec(&v).unwrap(),
        "unknown top-level field".into(),
    );
    // Bad base64.
    for f in b64_fields {
        for bad in [
            "!!!!",
            "QQ",
            "====",
            "QUJD\nREVG",
            "\u{e9}\u{e9}\u{e9}\u{e9}",
            "A",
            "QUJDRA===",
            &"QUJD".repeat(20_000),
        ] {
            let mut v = valid.clone();
            v[*f] = json!(bad);
            add(
                serde_json::to_vec(&v).unwrap(),
                format!("{f} = bad base64 ({} chars)", bad.len()),
            );
        }
    }
    // Context abuse: too many entries, empty key, huge key, non-string values.
    if valid.get("context").is_some() {
        let many: serde_json::Map<String, Value> =
            (0..5000).map(|i| (format!("k{i}"), json!("v"))).collect();
        for ctx in [
            json!(many),
            json!({"": "v"}),
            json!({"k".repeat(5000): "v"}),
            json!({"k": 1}),
            json!({"k": ["v"]}),
            json!({"k": null}),
        ] {
            let mut v = valid.clone();
            v["context"] = ctx;
            add(serde_json::to_vec(&v).unwrap(), "context abuse".into());
        }
    }
    // Header abuse on the valid body.
    for (ct, what) in [
        (None, "no content type"),
        (Some("text/plain"), "text/plain"),
        (Some("application/x-www-form-urlencoded"), "form"),
        (Some("application/json; charset=latin1"), "json latin1"),
        (Some("multipart/form-data; boundary=x"), "multipart"),
        (Some("application/jsonx"), "jsonx"),
    ] {
        let mut c = case(
            method,
            path,
            who,
            text.clone(),
            format!("content-type: {what}"),
        );
        c.content_type = ct.map(str::to_owned);
        if ct != Some("application/json; charset=latin1") {
            out.push(c);
        }
    }
    let mut c = case(method, path, who, text.clone(), "a 32 KiB header".into());
    c.headers = vec![("x-junk".into(), "y".repeat(32 << 10))];
    c.body = b"[".to_vec();
    out.push(c);
    let mut c = case(method, path, who, text.clone(), "200 junk headers".into());
    c.headers = (0..200)
        .map(|i| (format!("x-junk-{i}"), "y".repeat(50)))
        .collect();
    c.body = b"{".to_vec();
    out.push(c);
    out
}

/// Key-name abuse in paths of `template` (with `{name}`).
fn bad_names(
    method: &reqwest::Method,
    template: &str,
    who: &'static str,
    body: &Value,
) -> Vec<Case> {
    let long = "n".repeat(300);
    [
        "%00",
        "a%2Fb",
        "..",
        "%2e%2e",
        "a b",
        "%C3%A9t%C3%A9",
        "%FF%FE",
        &long,
        "a;b",
        "%25",
        "-",
        "_x_*",
    ]
    .iter()
    .map(|n| {
        case(
            method,
            &template.replace("{name}", n),
            who,
            serde_json::to_vec(body).unwrap(),
            format!("name {n:.20}"),
        )
    })
    .collect()
}

/// Lockout would turn later cases into 429s before they reach a parser.
const NO_LOCKOUT: &str = "[lockout]\nthreshold = 1000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_malformed_requests_get_4xx_and_change_nothing() {
    campaign(TestServer::start_with(keyhold_tests::TestSeal::KeyFile, NO_LOCKOUT).await).await;
}

/// The same campaign against a node on a PostgreSQL store (issue 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_malformed_requests_on_postgres_get_4xx_and_change_nothing() {
    if !keyhold_tests::pg::available("malformed requests on postgres") {
        return;
    }
    let s = TestServer::start_on_postgres_with(NO_LOCKOUT).await;
    s.wait_ready().await;
    campaign(s).await;
}

async fn campaign(s: TestServer) {
    create_key(&s, "admin-a", "k").await;
    let app = s.client(Some("app-a"));
    let ctx = json!({"c": "1"});
    let (_, dk) = post(&app, &s.url("/v1/keys/k/datakey"), json!({"context": ctx})).await;
    let wrapped = dk["wrapped"].as_str().unwrap().to_owned();
    let before = get(&s.client(Some("admin-a")), &s.url("/v1/keys")).await;

    let post_m = reqwest::Method::POST;
    let put_m = reqwest::Method::PUT;
    let dek = B64.encode([7u8; 32]);
    let routes: Vec<(reqwest::Method, &str, &'static str, Value, Vec<&str>)> = vec![
        (
            post_m.clone(),
            "/v1/keys",
            "admin-a",
            json!({"name": "new-key", "algorithm": "aes-256-gcm", "rotation_period": "90d", "grants": [{"identity": "spiffe://x/app", "operations": ["wrap"]}]}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/keys/k/schedule-deletion",
            "admin-a",
            json!({"pending_days": 7}),
            vec![],
        ),
        (
            put_m.clone(),
            "/v1/keys/k/min-decrypt-version",
            "admin-a",
            json!({"version": 1}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/keys/k/min-decrypt-version/dry-run",
            "admin-a",
            json!({"version": 1, "window_days": 7}),
            vec![],
        ),
        (
            put_m.clone(),
            "/v1/keys/k/grants",
            "admin-a",
            json!({"grants": [{"identity": "spiffe://x/app", "operations": ["wrap"], "constraints": {"context_subset": {"a": "b"}}}]}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/keys/k/datakey",
            "app-a",
            json!({"context": ctx}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/keys/k/wrap",
            "app-a",
            json!({"plaintext": dek, "context": ctx}),
            vec!["plaintext"],
        ),
        (
            post_m.clone(),
            "/v1/unwrap",
            "app-a",
            json!({"wrapped": wrapped, "context": ctx}),
            vec!["wrapped"],
        ),
        (
            post_m.clone(),
            "/v1/rewrap",
            "app-a",
            json!({"wrapped": wrapped, "context": ctx}),
            vec!["wrapped"],
        ),
        (
            post_m.clone(),
            "/v1/batch",
            "app-a",
            json!({"items": [{"op": "unwrap", "wrapped": wrapped, "context": ctx}]}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/sys/unseal",
            "admin-a",
            json!({"passphrase": "x"}),
            vec![],
        ),
        (
            put_m.clone(),
            "/v1/sys/identities",
            "admin-a",
            json!({"identity": "spiffe://x/y", "role": "app"}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/sys/identities/remove",
            "admin-a",
            json!({"identity": "spiffe://x/y"}),
            vec![],
        ),
        (
            post_m.clone(),
            "/v1/sys/lockouts/lift",
            "admin-a",
            json!({"identity": "spiffe://x/y"}),
            vec![],
        ),
    ];
    let mut rng = StdRng::seed_from_u64(0x006b_6579_686f_6c64);
    let mut cases = Vec::new();
    for (m, path, who, valid, b64) in &routes {
        cases.extend(mutations(&mut rng, m, path, who, valid, b64));
    }
    // The valid unseal/identities/lockout bodies above would be accepted; their mutations
    // are not. Key names in paths, query strings, and wrong methods:
    cases.extend(bad_names(
        &post_m,
        "/v1/keys/{name}/datakey",
        "app-a",
        &json!({}),
    ));
    cases.extend(bad_names(
        &post_m,
        "/v1/keys/{name}/rotate",
        "admin-a",
        &json!({}),
    ));
    cases.extend(bad_names(
        &reqwest::Method::GET,
        "/v1/keys/{name}/public-key",
        "app-a",
        &json!({}),
    ));
    for q in [
        "after=-1",
        "after=x",
        "limit=0",
        "limit=100000",
        "limit=1.5",
        "after=99999999999999999999999",
        "x=1",
        "after=1&after=2",
        "%zz",
        "limit=",
    ] {
        let mut c = case(
            &reqwest::Method::GET,
            &format!("/v1/audit?{q}"),
            "auditor-a",
            Vec::new(),
            format!("audit ?{q}"),
        );
        c.content_type = None;
        cases.push(c);
    }
    for q in [
        "version=0x1",
        "version=-1",
        "version=",
        "v=1",
        "version=1e3",
    ] {
        let mut c = case(
            &reqwest::Method::GET,
            &format!("/v1/keys/k/public-key?{q}"),
            "app-a",
            Vec::new(),
            format!("public-key ?{q}"),
        );
        c.content_type = None;
        cases.push(c);
    }
    for (m, path) in [
        (reqwest::Method::DELETE, "/v1/keys/k"),
        (reqwest::Method::PATCH, "/v1/unwrap"),
        (reqwest::Method::GET, "/v1/unwrap"),
        (reqwest::Method::PUT, "/v1/batch"),
        (reqwest::Method::POST, "/v1/nope"),
        (reqwest::Method::GET, "/v2/keys"),
        (reqwest::Method::GET, "/"),
        (reqwest::Method::OPTIONS, "/v1/keys"),
    ] {
        cases.push(case(
            &m,
            path,
            "admin-a",
            b"{}".to_vec(),
            format!("{m} {path}"),
        ));
    }
    // A body over the limit.
    cases.push(case(
        &post_m,
        "/v1/unwrap",
        "app-a",
        vec![b'{'; 2 << 20],
        "2 MiB body".into(),
    ));

    assert!(cases.len() >= MIN_REQUESTS, "only {} cases", cases.len());
    let clients: std::collections::HashMap<&str, reqwest::Client> =
        ["admin-a", "app-a", "auditor-a"]
            .into_iter()
            .map(|w| (w, s.client(Some(w))))
            .collect();
    let mut by_status = std::collections::BTreeMap::new();
    for c in &cases {
        let send = || {
            let mut req = clients[c.who]
                .request(c.method.clone(), s.url(&c.path))
                .body(c.body.clone());
            if let Some(ct) = &c.content_type {
                req = req.header("content-type", ct);
            }
            for (k, v) in &c.headers {
                req = req.header(k, v);
            }
            req.send()
        };
        // A body over the limit is refused from its Content-Length before it is read; the
        // server then reads the rest and throws it away (`request_body`), so the client
        // gets its 413 and keeps its connection: no retry (there was one here, for the
        // reset the server's early answer caused, and for the next request on a
        // connection closed under it).
        let attempt = send().await;
        let r = attempt.unwrap_or_else(|e| panic!("{}: {e:?}", c.what));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            (400..500).contains(&status),
            "{} {} [{}]: HTTP {status} {text:.300}",
            c.method,
            c.path,
            c.what
        );
        // One exception, by design: a header section over hyper's limits (more than 100
        // headers) is refused by the HTTP layer before a request exists, with 431 and no
        // body; nothing of Keyhold runs for it.
        assert!(
            (status == 431 && text.is_empty())
                || (body["error"]["code"].is_string() && body["error"]["message"].is_string()),
            "{} {} [{}]: HTTP {status} without the error body: {text:.300}",
            c.method,
            c.path,
            c.what
        );
        *by_status.entry(status).or_insert(0usize) += 1;
    }
    eprintln!(
        "malformed-request campaign: {} requests, by status {by_status:?}",
        cases.len()
    );

    // The server still serves, and nothing changed.
    let un = post(
        &app,
        &s.url("/v1/unwrap"),
        json!({"wrapped": wrapped, "context": ctx}),
    )
    .await;
    assert_eq!(
        (un.0, &un.1["plaintext"]),
        (200, &dk["plaintext"]),
        "{un:?}"
    );
    let after = get(&s.client(Some("admin-a")), &s.url("/v1/keys")).await;
    let strip = |v: &Value| {
        let mut v = v.clone();
        for k in v["keys"].as_array_mut().unwrap() {
            for ver in k["versions"].as_array_mut().unwrap() {
                ver.as_object_mut()
                    .unwrap()
                    .retain(|f, _| f == "version" || f == "created_at" || f == "can_unwrap");
            }
        }
        v
    };
    assert_eq!(
        strip(&before.1),
        strip(&after.1),
        "a malformed request changed a key"
    );
    let ids = get(&s.client(Some("admin-a")), &s.url("/v1/sys/identities")).await;
    assert_eq!(ids.0, 200);
    assert!(!ids.1.to_string().contains("spiffe://x/y"), "{ids:?}");
}

/// Issue 22: the request metrics' labels are a closed set. Made-up HTTP methods (each
/// label set is kept until the process ends) are counted as `other`: they grow neither the
/// server's memory nor the scrape. On the code before, 200 requests with 50 kB methods
/// took the server from 35 MB to 483 MB after one scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_http_methods_do_not_grow_the_metrics() {
    let s = TestServer::start().await;
    s.wait_ready().await;
    let app = s.client(Some("app-a"));
    for i in 0..200 {
        let method = format!("JUNK{i:04}{}", "X".repeat(4000));
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app
            .request(method, s.url("/v1/unwrap"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let scrape = reqwest::get(s.ops_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!scrape.contains("JUNK"), "a made-up method became a label");
    assert!(scrape.contains(r#"method="other""#), "not counted as other");
    assert!(
        scrape.len() < 64 * 1024,
        "a scrape of {} bytes",
        scrape.len()
    );
}

/// Issue 22: the server, not the client, chooses the cipher suite. A client offering
/// ChaCha20 before AES-256-GCM gets AES-256-GCM (the server's first choice), on the mTLS
/// API (here) as on every listener (one `tls::finish_server_config`). Checked with
/// OpenSSL's client, which sends the suites in the order given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_chooses_the_cipher_suite() {
    let s = TestServer::start().await;
    s.wait_ready().await;
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-brief", "-connect"])
        .arg(s.addr.to_string())
        .args([
            "-ciphersuites",
            "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384",
        ])
        .arg("-CAfile")
        .arg(s.pki.ca())
        .arg("-cert")
        .arg(s.pki.cert("app-a"))
        .arg("-key")
        .arg(s.pki.key("app-a"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let suite = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Ciphersuite: "))
        .unwrap_or_else(|| panic!("no handshake: {text}"));
    assert_eq!(suite, "TLS_AES_256_GCM_SHA384", "{text}");
}

/// Issue 22: an over-limit body gets the API's 413 over HTTP/2 as over HTTP/1.1 (it got a
/// stream reset over HTTP/2: "Stream error in the HTTP/2 framing layer" in curl), from our
/// client and from curl, several times over (the answer must not race the upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_body_gets_413_over_http2_too() {
    let s = TestServer::start().await;
    s.wait_ready().await;
    let body = format!(r#"{{"wrapped":"{}"}}"#, "A".repeat(2 << 20));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, &body).unwrap();
    let mut failures = Vec::new();
    for round in 0..5 {
        for h2 in [false, true] {
            let client = keyhold_tests::client_for(&s.pki, Some("app-a"), h2);
            let r = client
                .post(s.url("/v1/unwrap"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 413 => {
                    let v: Value = r.json().await.unwrap_or_default();
                    if v["error"]["code"] != "PayloadTooLarge" {
                        failures.push(format!("{round} reqwest h2={h2}: {v}"));
                    }
                }
                Ok(r) => failures.push(format!("{round} reqwest h2={h2}: {}", r.status())),
                Err(e) => failures.push(format!("{round} reqwest h2={h2}: {e:?}")),
            }
        }
        for version in ["--http1.1", "--http2"] {
            let out = std::process::Command::new("curl")
                .args([
                    "-sS",
                    version,
                    "-o",
                    "-",
                    "-w",
                    "\n%{http_code}",
                    "--cacert",
                ])
                .arg(s.pki.ca())
                .arg("--cert")
                .arg(s.pki.cert("app-a"))
                .arg("--key")
                .arg(s.pki.key("app-a"))
                .args(["-H", "content-type: application/json", "--data-binary"])
                .arg(format!("@{}", file.display()))
                .arg(s.url("/v1/unwrap"))
                .output()
                .expect("curl runs");
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !(out.status.success()
                && stdout.ends_with("\n413")
                && stdout.contains("PayloadTooLarge"))
            {
                failures.push(format!(
                    "{round} curl {version}: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Issue 22, point 7: a certificate's URI SAN, DNS SAN and common name do not share one
/// namespace. Before, a certificate whose only name was the common name
/// `spiffe://test/acme/app` (a CA lets a requester choose a common name far more freely
/// than a URI SAN) was the app identity of tenant A; now its identity is
/// `subject-cn:spiffe://test/acme/app`, which nobody configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_name_shaped_like_a_uri_identity_is_not_that_identity() {
    let s = TestServer::start().await;
    create_key(&s, "admin-a", "k").await;
    s.pki
        .issue_common_name_only("cn-impostor", keyhold_tests::APP_A);
    let impostor = s.client(Some("cn-impostor"));
    let (st, body) = post(&impostor, &s.url("/v1/keys/k/datakey"), json!({})).await;
    assert_eq!(st, 403, "{body}");
    // Its denials are its own, under its own name: they lock out nothing of the real
    // identity (the threshold is 5).
    for _ in 0..6 {
        post(&impostor, &s.url("/v1/keys/k/datakey"), json!({})).await;
    }
    let real = s.client(Some("app-a"));
    assert_eq!(
        post(&real, &s.url("/v1/keys/k/datakey"), json!({})).await.0,
        200
    );
}
