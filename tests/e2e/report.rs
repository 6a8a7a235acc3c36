//! `kmsctl report` (issue 28): a usage report of the real server, opened in a real browser.
//! Headless Chromium (Debian's `chromium`) renders the file offline and takes a screenshot;
//! the test reads the screenshot's pixels: both plotted series must be drawn, with a
//! shape (many pixel rows, not a flat line). The HTML must name what happened (keys,
//! identities, the pending approval, the brake's hold, the refusals) and hold no DEK, in
//! clear or wrapped.
//!
//! `KEYHOLD_REPORT_SCREENSHOT=docs/report.png` also copies the screenshot there (the one
//! in the documentation was made so).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use keyhold_tests::{TestSeal, TestServer, APP_A};
use kms_client::api::{ApprovalPolicy, ApprovalScope, Context, Gate, Grant, GrantOperation, Role};
use kms_client::Error;

use crate::kmsctl::{conn, kmsctl};

const APP2_A: &str = "spiffe://test/acme/app2";

/// The browser: Debian's package, or a name on PATH.
fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
        .expect("headless Chromium is needed (Debian package chromium; .ci/run installs it)")
}

/// Renders `html` in headless Chromium: the screenshot (PNG) and the DOM it built.
fn render(html: &Path, png: &Path) -> String {
    let url = format!("file://{}", html.display());
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1100,2600",
    ];
    let profile = tempfile::tempdir().unwrap();
    let user = format!("--user-data-dir={}", profile.path().display());
    let shot = std::process::Command::new(chromium())
        .args(common)
        .arg(&user)
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        png.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let dom = std::process::Command::new(chromium())
        .args(common)
        .arg(&user)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    String::from_utf8(dom.stdout).unwrap()
}

/// The pixel rows of `png` holding colour `rgb` (within a small distance, for
/// antialiasing), and how many such pixels.
fn rows_with(png: &Path, rgb: [u8; 3]) -> (usize, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(png).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let (mut rows, mut pixels) = (0, 0);
    for row in buf[..info.buffer_size()].chunks(info.line_size) {
        let n = row
            .chunks(channels)
            .filter(|p| (0..3).all(|c| p[c].abs_diff(rgb[c]) <= 12))
            .count();
        pixels += n;
        rows += usize::from(n > 0);
    }
    (rows, pixels)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_renders_in_chromium_with_its_plots_and_no_key_material() {
    let s = TestServer::start_with(
        TestSeal::KeyFile,
        "[brake]\nmode = \"enforce\"\nidentity = [{ unwraps = 40, per_secs = 3600 }]\n",
    )
    .await;
    s.pki.issue("admin2-a", "spiffe://test/acme/admin2");
    let admin = s.kms_client("admin-a");
    admin
        .set_identity("spiffe://test/acme/admin2", Role::Admin)
        .await
        .unwrap();
    for name in ["invoices", "payroll"] {
        let mut req = keyhold_tests::create_granted(name, APP_A);
        req.grants.push(Grant::new(APP2_A, &GrantOperation::ALL));
        admin.create_key(&req).await.unwrap();
    }
    admin
        .set_approval_policy(
            ApprovalScope::Tenant,
            Some(ApprovalPolicy {
                operations: vec![Gate::Destroy],
                approvers: 1,
                window_secs: 3600,
            }),
        )
        .await
        .unwrap();
    let pending = match admin.schedule_deletion("payroll", 7).await {
        Err(Error::ApprovalPending(p)) => p.approval.id,
        other => panic!("{other:?}"),
    };

    // Traffic in phases a second and more apart, so the plots have a shape.
    let (app, app2) = (s.kms_client("app-a"), s.kms_client("app2-a"));
    let none = Context::new();
    let mut secrets = Vec::new();
    let mut wrapped = Vec::new();
    for _ in 0..30 {
        let d = app.datakey("invoices", &none).await.unwrap();
        secrets.push(d.plaintext.expose_secret().to_vec());
        wrapped.push(d.wrapped.into_bytes());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for w in &wrapped {
        app.unwrap(w, &none).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..12 {
        let d = app2.datakey("payroll", &none).await.unwrap();
        app2.unwrap(d.wrapped.as_bytes(), &none).await.unwrap();
        secrets.push(d.plaintext.expose_secret().to_vec());
        wrapped.push(d.wrapped.into_bytes());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // app-a goes past its budget of 40 and is held; it also tries what it may not.
    let refused = {
        let mut refused = 0;
        for w in wrapped.iter().take(15) {
            refused += usize::from(app.unwrap(w, &none).await.is_err());
        }
        refused
    };
    assert_eq!(refused, 5);
    assert!(app.list_keys().await.is_err());

    let dir = tempfile::tempdir().unwrap();
    let html_path = dir.path().join("report.html");
    let mut args = conn(&s, "admin-a");
    args.extend(
        [
            "report",
            "--since",
            "30s",
            "--out",
            html_path.to_str().unwrap(),
            "--auditor-cert",
            s.pki.cert("auditor-a").to_str().unwrap(),
            "--auditor-key",
            s.pki.key("auditor-a").to_str().unwrap(),
        ]
        .map(String::from),
    );
    let out = kmsctl(args, vec![]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&html_path).unwrap();

    for expected in [
        "invoices",
        "payroll",
        APP_A,
        APP2_A,
        pending.as_str(),
        "Mode <b>enforce</b>",
        "POST /v1/unwrap",
        "LockedOut",
        "PermissionDenied",
    ] {
        assert!(html.contains(expected), "{expected} missing");
    }
    // No DEK, in clear or wrapped, in any encoding the API uses.
    let b64 = base64::engine::general_purpose::STANDARD;
    for bytes in secrets.iter().chain(&wrapped) {
        for text in [b64.encode(bytes), kms_client::hex::encode(bytes)] {
            assert!(!html.contains(&text[..24]), "key material in the report");
        }
    }

    let png_path = dir.path().join("report.png");
    let dom = tokio::task::spawn_blocking({
        let (h, p) = (html_path.clone(), png_path.clone());
        move || render(&h, &p)
    })
    .await
    .unwrap();
    // The browser built the page: every plot, both series each.
    let plots = dom.matches("<svg").count();
    assert!(plots >= 5, "{plots} plots in the rendered page");
    assert_eq!(dom.matches("class=\"unwraps\"").count(), plots);
    // And drew them: each colour on many rows (a shape, not a flat line at zero).
    let (unwrap_rows, unwrap_px) = rows_with(&png_path, [0xc0, 0x39, 0x2b]);
    let (wrap_rows, wrap_px) = rows_with(&png_path, [0x1f, 0x6f, 0xb2]);
    assert!(
        unwrap_rows >= 60 && wrap_rows >= 60,
        "plotted rows: unwraps {unwrap_rows} ({unwrap_px} px), wraps {wrap_rows} ({wrap_px} px)"
    );
    if let Some(to) = std::env::var_os("KEYHOLD_REPORT_SCREENSHOT") {
        std::fs::copy(&png_path, to).unwrap();
    }
}
